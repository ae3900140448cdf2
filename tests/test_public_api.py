"""Each package's curated public API exists; the server package imports without Ray."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest


@pytest.mark.parametrize("package", ["hybridserve.server", "hybridserve.server.tasks", "hybridserve.models",
                                     "hybridserve_client"])
def test_every_exported_name_exists(package):
    module = importlib.import_module(package)
    assert module.__all__, f"{package} exports nothing"
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert not missing, f"{package}.__all__ names missing attributes: {missing}"


def test_importing_the_server_package_does_not_import_ray():
    """The data plane, handlers and HTTP app run in-process where Ray is absent (e.g. a bare GPU box)."""
    code = "import sys, hybridserve.server; print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
