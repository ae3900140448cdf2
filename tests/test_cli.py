"""The hybridserve command line: listing, checking and rendering a repository."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import save_file

from hybridserve.server.repository import builtin_repository, load_repository


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hybridserve.server.cli.main", *args], capture_output=True,
                          text=True, timeout=timeout, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


def test_models_list_shows_the_builtin_models():
    out = run("models", "list")
    assert out.returncode == 0, out.stderr
    names = {line.split()[0] for line in out.stdout.splitlines()}
    from hybridserve.server.repository import builtin_repository

    assert names == {path.stem for path in builtin_repository().glob("*.yaml")}
    assert {"classifier", "detector", "super-resolution-x2", "denoiser", "psnr", "ssim"} <= names


def test_models_check_reports_each_broken_spec(tmp_path: Path):
    import timm

    good = {"name": "good", "task": "iqa", "architecture": "hybridserve:psnr",
            "preprocessing": {"normalize": False}, "iqa": {"kind": "full-reference", "range": [0, 100]}}
    (tmp_path / "good.yaml").write_text(yaml.safe_dump(good))
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump({**good, "name": "typo", "replica": 2}))
    state = timm.create_model("convnext_atto", num_classes=5).state_dict()
    save_file({k: v for k, v in state.items() if not k.startswith("head")}, str(tmp_path / "w.safetensors"))
    wrong = {"name": "wrong", "task": "classification", "architecture": "timm:convnext_atto",
             "architecture_args": {"num_classes": 5}, "weights": "w.safetensors",
             "preprocessing": {"input_size": [32, 32]}}
    (tmp_path / "wrong.yaml").write_text(yaml.safe_dump(wrong))
    (tmp_path / "gone.yaml").write_text(yaml.safe_dump({**wrong, "name": "gone", "weights": "nope.safetensors"}))
    out = run("models", "check", str(tmp_path))
    assert out.returncode == 1
    lines = out.stdout.splitlines()
    assert any(line.startswith("ok   good") for line in lines)
    assert any("typo.yaml" in line and "replica: unknown key" in line for line in lines)
    assert any(line.startswith("FAIL wrong") and "missing keys: head" in line for line in lines)
    assert any(line.startswith("FAIL gone") and "nope.safetensors" in line for line in lines)


@pytest.mark.parametrize("layout", ["auto", "deployments"])
def test_config_renders_one_application_in_the_chosen_layout(layout):
    out = run("config", "--port", "8100", "--layout", layout)
    assert out.returncode == 0, out.stderr
    config = yaml.safe_load(out.stdout)
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config)
    (application,) = config["applications"]
    assert application["import_path"] == "hybridserve.server.rayserve.app:app"
    names = {d["name"] for d in application["deployments"]}
    assert config["http_options"]["port"] == 8100
    if layout == "auto":  # the built-in models fit one node as one unit: all in the gateway, no hop
        assert application["args"]["layout"] == "combined" and names == {"Gateway"}
        (gateway,) = application["deployments"]
        assert gateway["ray_actor_options"]["num_cpus"] == sum(s.device.cpus for s in load_repository(builtin_repository()))
    else:
        assert application["args"]["layout"] == "deployments" and "model-classifier" in names
        assert all("user_config" not in d for d in application["deployments"])  # batching is the ingress's
