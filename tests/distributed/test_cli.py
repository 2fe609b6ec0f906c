"""The command line: without --replicas nothing imports Ray; `runtime serve --replicas 1`
starts its own Ray, or joins a running cluster with `--ray-address ADDR`, and either way
drains on SIGTERM and exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from tests.server.test_shutdown import free_port
from tests.server.test_streaming import events


def runtime_command() -> list[str]:
    exe = Path(sys.executable).with_name("runtime")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "runtime.cli"]


def test_without_replicas_ray_is_never_imported(model_dir: Path) -> None:
    """The real `runtime serve` path up to uvicorn's run, in a fresh interpreter."""
    script = textwrap.dedent("""
        import sys
        import runtime.server.app as app
        from runtime.cli import build_parser, cmd_serve
        ran = []
        app.GracefulServer.run = lambda self, sockets=None: ran.append(True)
        args = build_parser().parse_args(["serve", sys.argv[1], "--num-threads", "1"])
        assert cmd_serve(args) == 0 and ran
        loaded = sorted(m for m in sys.modules if m == "ray" or m.startswith(("ray.",
                        "runtime.distributed")))
        assert not loaded, loaded
        print("no ray")
    """)
    out = subprocess.run([sys.executable, "-c", script, str(model_dir)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "no ray" in out.stdout, out.stdout + out.stderr


def test_missing_ray_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime.distributed.frontend import require_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(RuntimeError, match=r"--replicas needs Ray: pip install"):
        require_ray()


@pytest.mark.parametrize("ray_mode", ["join", "local"])
def test_serve_replicas_drains_on_sigterm_and_exits_zero(model_dir: Path, ray_local,
                                                        ray_mode: str) -> None:
    """`join`: --ray-address of the session's cluster; `local`: the one-line command that
    starts (and stops) its own Ray. Ray's crash handler must not take SIGTERM (it would
    print a stack trace and abort the process 3 s later, exit 134)."""
    joining = ["--ray-address", ray_local.get_runtime_context().gcs_address]
    port = free_port()
    cmd = runtime_command() + ["serve", str(model_dir), "--replicas", "1", "--port", str(port),
                               "--num-threads", "1", "--kv-cache-tokens", "2048",
                               "--served-model-name", "tiny",
                               *(joining if ray_mode == "join" else [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=os.environ | {"PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "server did not become ready"
            try:
                if httpx.get(base + "/health", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        body = {"prompt": "In the beginning", "max_tokens": 100, "stream": True,
                "ignore_eos": True}
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as resp:
            it = events(resp)
            assert next(it)["choices"]
            proc.send_signal(signal.SIGTERM)  # drains: the stream runs to its end
            rest = list(it)
        assert rest[-1] == "[DONE]" and rest[-2]["choices"][0]["finish_reason"] == "length"
        code = proc.wait(timeout=60)
        log = proc.stdout.read()
        assert code == 0, log
        started = "joined the Ray cluster" if ray_mode == "join" else "started a local Ray"
        assert started in log and "1 replicas" in log, log
        assert "Traceback" not in log and "SIGTERM received" not in log, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
