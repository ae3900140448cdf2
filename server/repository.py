"""The model repository: spec files loaded, validated and checked against their task.

``ModelSpec`` (``core.spec``) validates a spec's fields; here each spec is also checked by its
task's declaration (``Task.check``), which is why loading lives above both.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from hybridserve.server.core.spec import ModelSpec, SpecError
from hybridserve.server.tasks import task_of


def load_spec(path: Path) -> ModelSpec:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SpecError(f"{path}: cannot read YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a spec must be a mapping of keys to values")
    data.pop("base_dir", None)
    try:
        spec = ModelSpec.model_validate({**data, "base_dir": path.parent.resolve()})
        task_of(spec.task).check(spec)
        return spec
    except ValueError as exc:
        if not isinstance(exc, ValidationError):
            raise SpecError(f"{path}: {exc}") from None
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<spec>'}: {_reason(err)}" for err in exc.errors()
        )
        raise SpecError(f"{path}: {problems}") from None


def _reason(err: dict) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown key"
    return err["msg"]


def load_repository(folder: Path) -> list[ModelSpec]:
    """Load every ``*.yaml`` spec in ``folder``; duplicate names or any invalid spec raise SpecError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SpecError(f"model repository {folder} is not a folder")
    specs, errors = [], []
    for path in sorted(folder.glob("*.yaml")) + sorted(folder.glob("*.yml")):
        try:
            specs.append(load_spec(path))
        except SpecError as exc:
            errors.append(str(exc))
    if errors:
        raise SpecError("\n".join(errors))
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SpecError(f"{folder}: model names used twice: {', '.join(dupes)}")
    if not specs:
        raise SpecError(f"{folder}: no *.yaml model specs")
    return specs


def builtin_repository() -> Path:
    """The model repository shipped inside the package."""
    import hybridserve.models

    return Path(hybridserve.models.__file__).resolve().parent / "repository"
