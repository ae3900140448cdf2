"""Model specs and weights: validation messages, weight sources, safe loading."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hybridserve.models import UnsafeWeights, WeightsMismatch, create_model, read_state_dict, resolve_weights
from hybridserve.server.core.spec import SpecError
from hybridserve.server.repository import builtin_repository, load_repository, load_spec

GOOD = """
name: tiny
task: classification
architecture: timm:convnext_atto
architecture_args: {num_classes: 3}
preprocessing: {input_size: [32, 32]}
labels: [a, b, c]
"""


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def test_builtin_repository_is_valid():
    specs = load_repository(builtin_repository())
    assert {s.task for s in specs} == {"classification", "detection", "restoration", "iqa", "segmentation"}


def test_spec_is_frozen_and_defaults_apply(tmp_path):
    spec = load_spec(write(tmp_path, "tiny.yaml", GOOD))
    assert spec.batching.max_batch_size == 8 and spec.compile.backend == "eager" and spec.verb == "classify"
    with pytest.raises(Exception):
        spec.name = "other"


def test_unknown_key_names_file_and_key(tmp_path):
    path = write(tmp_path, "bad.yaml", GOOD + "batching: {max_batch_size: 4, max_wiat_ms: 3}\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert "bad.yaml" in str(info.value) and "batching.max_wiat_ms: unknown key" in str(info.value)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ("task: panoptic\n", "task"),
        ("batching: {max_batch_size: 0}\n", "batching.max_batch_size"),
        ("device: {type: tpu}\n", "device.type"),
        ("compile: {backend: magic}\n", "compile.backend"),
        ("weights: https://example.com/w.safetensors\n", "sha256"),
        ("name: Bad Name\n", "name"),
    ],
)
def test_invalid_values_are_rejected_with_the_reason(tmp_path, extra, needle):
    lines = [line for line in GOOD.splitlines() if not line.startswith(extra.split(":")[0] + ":")]
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, "x.yaml", "\n".join(lines) + "\n" + extra))
    assert needle in str(info.value)


def test_repository_rejects_duplicate_names_and_reports_every_broken_file(tmp_path):
    write(tmp_path, "a.yaml", GOOD)
    write(tmp_path, "b.yaml", GOOD)
    with pytest.raises(SpecError, match="used twice: tiny"):
        load_repository(tmp_path)
    write(tmp_path, "c.yaml", "name: [oops\n")
    write(tmp_path, "d.yaml", "name: d\ntask: iqa\narchitecture: hybridserve:psnr\nlabelz: []\n")
    with pytest.raises(SpecError) as info:
        load_repository(tmp_path)
    assert "c.yaml" in str(info.value) and "d.yaml" in str(info.value) and "labelz: unknown key" in str(info.value)


def test_fractional_gpu_and_cuda_default(tmp_path):
    spec = load_spec(write(tmp_path, "g.yaml", GOOD + "device: {type: cuda, gpus: 0.25}\n"))
    assert spec.device.gpus == 0.25
    assert load_spec(write(tmp_path, "h.yaml", GOOD + "device: {type: cuda}\n")).device.gpus == 1.0


# ------------------------------------------------------------------ weights


def test_state_dict_wrappers_and_prefixes(tmp_path):
    weights = {"a.weight": torch.ones(2)}
    torch.save({"params": {f"module.{k}": v for k, v in weights.items()}}, tmp_path / "w.pth")
    assert list(read_state_dict(tmp_path / "w.pth")) == ["a.weight"]
    save_file(weights, str(tmp_path / "w.safetensors"))
    assert torch.equal(read_state_dict(tmp_path / "w.safetensors")["a.weight"], torch.ones(2))


class _Payload:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (Path(self.target).write_text, ("pwned",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "marker.txt"
    with open(tmp_path / "evil.pth", "wb") as handle:
        pickle.dump({"state_dict": _Payload(str(marker))}, handle)
    with pytest.raises(UnsafeWeights, match="arbitrary code"):
        read_state_dict(tmp_path / "evil.pth")
    assert not marker.exists()


def test_weight_sources(tmp_path):
    save_file({"x": torch.zeros(1)}, str(tmp_path / "w.safetensors"))
    assert resolve_weights("w.safetensors", tmp_path) == tmp_path / "w.safetensors"
    with pytest.raises(FileNotFoundError):
        resolve_weights("missing.safetensors", tmp_path)
    with pytest.raises(UnsafeWeights, match="sha256"):
        resolve_weights("https://example.com/w.safetensors", tmp_path)
    with pytest.raises(UnsafeWeights, match="only files"):
        resolve_weights("ftp://example.com/w.pth", tmp_path)
    with pytest.raises(UnsafeWeights, match="do not match"):
        resolve_weights("w.safetensors", tmp_path, sha256="0" * 64)


def test_hf_hub_source_uses_the_local_cache_offline(tmp_path):
    """hf-hub: resolves from the Hugging Face cache when the hub cannot be reached."""
    import os
    import subprocess
    import sys

    repo = tmp_path / "hub" / "models--acme--tiny"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    save_file({"x": torch.zeros(1)}, str(snapshot / "model.safetensors"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    code = "from hybridserve.models import resolve_weights; print(resolve_weights('hf-hub:acme/tiny'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).resolve() == (snapshot / "model.safetensors").resolve()


def test_mismatched_weights_name_missing_and_unexpected_keys(tmp_path):
    import timm

    state = timm.create_model("convnext_atto", num_classes=3).state_dict()
    state.pop("head.fc.bias")
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(WeightsMismatch) as info:
        create_model("timm:convnext_atto", weights="w.safetensors", base_dir=tmp_path, args={"num_classes": 3})
    assert "missing keys: head.fc.bias" in str(info.value) and "unexpected keys: extra.weight" in str(info.value)


def test_python_architecture_from_a_file(tmp_path):
    (tmp_path / "mine.py").write_text(
        "import torch\n\ndef build(width=4):\n    return torch.nn.Conv2d(3, width, 1)\n"
    )
    loaded = create_model("python:mine.py:build", base_dir=tmp_path, args={"width": 5})
    assert loaded.module.out_channels == 5 and not loaded.module.training
