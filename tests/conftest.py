"""Session fixtures: one real Ray Serve instance for the whole test session, on loopback.

The test repository is the built-in repository plus the specs in ``tests/specs/`` (templates
whose ``{eval}`` is ``../shared/eval`` and ``{tmp}`` a session folder for generated weights).
Specs that need ``../shared/eval`` are left out, and their tests skip, where it is absent.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

ROOT = Path(__file__).resolve().parents[1]
EVAL = ROOT.parent / "shared" / "eval"
SPECS = Path(__file__).resolve().parent / "specs"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def needs_eval(*parts: str) -> Path:
    """The path of a file in ../shared/eval, or skip the test with the reason."""
    path = EVAL.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs ../shared/eval/{'/'.join(parts)} (published test data), which is absent here")
    return path


def write_generated_weights(folder: Path) -> None:
    """Weights the test specs point at: real checkpoints of real architectures, random values."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=4)
    save_file(model.state_dict(), str(folder / "convnext_atto.safetensors"))


def build_test_repository(folder: Path, tmp: Path) -> Path:
    """The built-in specs (weights made absolute) plus the test specs, in one folder."""
    from hybridserve.server.repository import builtin_repository

    folder.mkdir(parents=True, exist_ok=True)
    builtin = builtin_repository()
    for path in sorted(builtin.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if data.get("weights") and "://" not in data["weights"] and not data["weights"].startswith("hf-hub:"):
            weights = (builtin / data["weights"]).resolve()
            if not weights.is_file():  # a built-in model whose training has not produced weights yet
                continue
            data["weights"] = str(weights)
        (folder / path.name).write_text(yaml.safe_dump(data, sort_keys=False))
    for path in sorted(SPECS.glob("*.yaml")):
        text = path.read_text()
        if "{eval}" in text and not EVAL.is_dir():
            continue
        text = text.replace("{eval}", str(EVAL)).replace("{tmp}", str(tmp)).replace("{fixtures}", str(FIXTURES))
        (folder / path.name).write_text(text)
    return folder


@dataclass
class Server:
    http_url: str
    grpc_target: str
    metrics_url: str
    repository: Path
    specs: dict

    def has(self, model: str) -> bool:
        return model in self.specs

    def need(self, model: str) -> None:
        if model not in self.specs:
            pytest.skip(f"model {model!r} is not in the test repository (its data or weights are absent)")


@pytest.fixture(scope="session")
def test_repository(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("generated")
    write_generated_weights(tmp)
    return build_test_repository(tmp_path_factory.mktemp("repository"), tmp)


@pytest.fixture(scope="session")
def server(test_repository) -> Server:
    """Ray + Serve started once per session; every model loaded and warmed up before tests run."""
    import httpx
    import ray
    from ray import serve

    from hybridserve.server.cli.serve import grpc_servicers, local_serve_env
    from hybridserve.server.rayserve.app import APP_NAME, AppArgs, app
    from hybridserve.server.repository import load_repository

    specs = {spec.name: spec for spec in load_repository(test_repository)}
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    # The ingress `hybridserve serve` runs (HAProxy where a binary exists), for this cluster's processes only.
    added = local_serve_env()
    os.environ.update(added)
    try:
        ray.init(num_cpus=len(specs) + 2, include_dashboard=False, log_to_driver=False,
                 _metrics_export_port=metrics_port,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    finally:
        for key in added:
            del os.environ[key]
    serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                grpc_options={"port": grpc_port, "grpc_servicer_functions": grpc_servicers()})
    # HYBRIDSERVE_TEST_LAYOUT=combined runs the suite against the combined layout (docs/performance.md).
    layout = os.environ.get("HYBRIDSERVE_TEST_LAYOUT", "deployments")
    serve.run(app(AppArgs(repository=str(test_repository), layout=layout)), name=APP_NAME, route_prefix="/")
    url = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            ready = httpx.get(f"{url}/readyz", timeout=5)
            if ready.status_code == 200:
                break
            if "failed" in ready.json().get("models", {}).values():
                raise RuntimeError(f"a model failed to load: {ready.text}")
        except httpx.HTTPError:
            pass
        time.sleep(1)
    else:
        raise RuntimeError(f"server at {url} never became ready: {httpx.get(url + '/readyz').text}")
    yield Server(url, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{metrics_port}/metrics", test_repository, specs)
    serve.shutdown()
    ray.shutdown()


class LocalServer:
    """``hybridserve serve --no-ray`` in a subprocess on free loopback ports (real HTTP and gRPC, no Ray)."""

    def __init__(self, repository: Path, env: dict[str, str] | None = None):
        self.repository, self.env = repository, env
        self._start()

    def _start(self) -> None:
        import subprocess
        import sys

        self.port, self.grpc_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hybridserve.server.cli.main", "serve", "--no-ray", "--host", "127.0.0.1",
             "--port", str(self.port), "--grpc-port", str(self.grpc_port), "--repository", str(self.repository)],
            env={**os.environ, "HF_HUB_OFFLINE": "1", **(self.env or {})},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )

    def wait_live(self, timeout: float = 180) -> LocalServer:
        """Answering /healthz; started again on fresh ports (3 tries) when another process took a picked one."""
        import httpx

        deadline, tries = time.monotonic() + timeout, 0
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                output = self.process.stdout.read()
                if "address already in use" not in output.lower() or tries == 3:
                    raise RuntimeError(f"server exited: {output}")
                tries += 1
                self._start()
                continue
            try:
                httpx.get(f"{self.url}/healthz", timeout=2)
                return self
            except httpx.HTTPError:
                time.sleep(0.5)
        raise RuntimeError("server did not start")

    def wait_ready(self, timeout: float = 300) -> LocalServer:
        """Live, then ready: every model loaded and warmed up (``/readyz`` answers 200)."""
        import httpx

        self.wait_live(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.process.stdout.read()}")
            if httpx.get(f"{self.url}/readyz", timeout=10).status_code == 200:
                return self
            time.sleep(0.5)
        raise RuntimeError("server did not become ready")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except Exception:
            self.process.kill()


def write_spec(folder: Path, name: str, **fields) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, **fields}, sort_keys=False))
    return path


PSNR_SPEC = {"task": "iqa", "architecture": "hybridserve:psnr", "preprocessing": {"normalize": False},
             "iqa": {"kind": "full-reference", "range": [0, 100]}}
