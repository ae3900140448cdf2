"""Where weights come from and how they are read, safely.

Sources resolve in a fixed order, as timm does: a local file (relative to the spec),
then ``hf-hub:<repo>[/<file>]`` (the local Hugging Face cache answers when offline),
then an ``https://`` URL whose sha256 must be given and is verified before use.

Weights are read only from safetensors or ``torch.load(weights_only=True)``: a pickle
that needs arbitrary code is refused, never executed.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
import urllib.request
from pathlib import Path

import torch

WRAPPER_KEYS = ("params_ema", "params", "state_dict", "model", "module")


class UnsafeWeights(ValueError):
    """The weights file needs arbitrary code to load, or failed its checksum."""


class WeightsMismatch(ValueError):
    """The weights do not fit the architecture (missing or unexpected keys, wrong shapes)."""


def cache_dir() -> Path:
    root = os.environ.get("HYBRIDSERVE_CACHE", str(Path.home() / ".cache" / "hybridserve"))
    return Path(root)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_weights(source: str, base_dir: Path | None = None, sha256: str | None = None) -> Path:
    """Turn a weights reference into a local file path (downloading if needed and allowed)."""
    if source.startswith("hf-hub:"):
        path = _from_hf_hub(source.removeprefix("hf-hub:"))
    elif source.startswith("https://"):
        if not sha256:
            raise UnsafeWeights(f"weights URL {source!r} needs a sha256 to be verified before use")
        path = _from_url(source, sha256)
    elif "://" in source:
        raise UnsafeWeights(f"weights source {source!r}: only files, hf-hub: and https:// are allowed")
    else:
        path = Path(source).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            raise FileNotFoundError(f"weights file not found: {path}")
    if sha256 and sha256_of(path) != sha256.lower():
        raise UnsafeWeights(f"weights {path} do not match sha256 {sha256}")
    return path


def _from_hf_hub(ref: str) -> Path:
    from huggingface_hub import hf_hub_download

    parts = ref.split("/")
    if len(parts) < 2:
        raise ValueError(f"hf-hub reference {ref!r} must be <owner>/<repo>[/<file>]")
    repo = "/".join(parts[:2])
    filename = "/".join(parts[2:]) or "model.safetensors"
    try:
        return Path(hf_hub_download(repo, filename))
    except Exception:
        # Offline, or the hub is unreachable: the local cache may still hold the file.
        return Path(hf_hub_download(repo, filename, local_files_only=True))


def _from_url(url: str, sha256: str) -> Path:
    target = cache_dir() / "weights" / sha256.lower()
    if target.is_file() and sha256_of(target) == sha256.lower():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
        with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 - https only, checked above
            for block in iter(lambda: response.read(1 << 20), b""):
                tmp.write(block)
    if sha256_of(Path(tmp.name)) != sha256.lower():
        os.unlink(tmp.name)
        raise UnsafeWeights(f"download of {url} does not match sha256 {sha256}")
    os.replace(tmp.name, target)
    return target


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors or a weights-only torch pickle, unwrapping containers."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UnsafeWeights(
                f"{path.name} is not a plain weights file: loading it would run arbitrary code "
                f"({str(exc).splitlines()[0]}). Convert it to safetensors."
            ) from exc
    return _unwrap(state, path)


def _unwrap(state: object, path: Path) -> dict[str, torch.Tensor]:
    while isinstance(state, dict):
        inner = next((state[key] for key in WRAPPER_KEYS if isinstance(state.get(key), dict)), None)
        if inner is None or any(isinstance(v, torch.Tensor) for v in state.values()):
            break
        state = inner
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path.name} holds no state dict")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if tensors and all(k.startswith("module.") for k in tensors):
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    return tensors
