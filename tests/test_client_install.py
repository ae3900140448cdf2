"""``pip install ./clients`` into a clean virtual environment resolves neither torch nor Ray.

pip resolves for real (``--dry-run --report``) against the package index, for a venv made
without any packages, with every extra of the client; nothing is installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CLIENTS = Path(__file__).resolve().parents[1] / "clients"
HEAVY = ("torch", "ray", "torchvision", "triton", "tensorflow", "jax")


def test_client_resolves_without_torch_or_ray(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    report = tmp_path / "report.json"
    resolve = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--dry-run", "--quiet",
         "--report", str(report), f"{CLIENTS}[grpc,bench]"],
        capture_output=True, text=True, timeout=600)
    if resolve.returncode != 0 and ("NewConnectionError" in resolve.stderr or "Network is unreachable" in resolve.stderr):
        pytest.skip(f"the package index is unreachable: {resolve.stderr.strip().splitlines()[-1]}")
    assert resolve.returncode == 0, resolve.stderr[-2000:]
    names = {item["metadata"]["name"].lower().replace("_", "-") for item in json.loads(report.read_text())["install"]}
    assert {"hybridserve-client", "pydantic", "httpx", "numpy", "pillow", "grpcio", "protobuf", "aiohttp"} <= names
    heavy = sorted(n for n in names if n in HEAVY or n.startswith("nvidia-"))
    assert not heavy, f"the client pulls heavy packages: {heavy}"


def test_importing_the_client_imports_neither_torch_nor_ray():
    probe = ("import sys, hybridserve_client, hybridserve_client.cli, hybridserve_client.bench; "
             "from hybridserve_client import _grpc_transport; "
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'ray', 'torchvision'}))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"
