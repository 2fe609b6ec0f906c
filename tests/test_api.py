"""`runtime.api` is the plugin surface, re-exported by `runtime` without loading torch early."""

from __future__ import annotations

import subprocess
import sys

import runtime
from runtime import api


def test_every_api_name_is_reexported_by_runtime() -> None:
    assert len(api.__all__) == len(set(api.__all__))
    for name in api.__all__:
        assert getattr(runtime, name) is getattr(api, name)
    assert set(api.__all__) <= set(dir(runtime))


def test_importing_runtime_does_not_load_torch() -> None:
    """The CLI sets OpenMP's environment after `import runtime`, before torch loads."""
    code = "import sys, runtime, runtime.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_unknown_names_and_submodules() -> None:
    from runtime import hardware  # a submodule, not an API name

    assert hardware.__name__ == "runtime.hardware"
    try:
        runtime.no_such_name  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("runtime.no_such_name did not raise")
