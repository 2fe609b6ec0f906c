"""Servers that `runtime bench serve --servers FILE` starts itself, one at a time.

Comparing `runtime serve` with `vllm serve` on a small machine is only fair when one server
runs at a time (an idle engine can still poll a core). The file names each server's command,
its URL and optional environment (`$VARS` in the command are expanded); the bench starts it, waits for `GET /health`, replays the
workload with the same client, stops it, and moves to the next, rotating the order per repeat:

```yaml
baton:
  url: http://127.0.0.1:8202
  command: runtime serve MODEL --port 8202 --scheduler baton --max-num-seqs 64
vllm:
  url: http://127.0.0.1:8201
  command: /tmp/vllmenv/bin/python -m vllm.entrypoints.openai.api_server --model MODEL --port 8201
  env: {VLLM_CPU_OMP_THREADS_BIND: "0-1", VLLM_CPU_NUM_OF_RESERVED_CPU: "0"}
```
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True, slots=True)
class ServerSpec:
    name: str
    url: str
    command: str
    env: dict[str, str] = field(default_factory=dict)
    startup_timeout: float = 600.0


def load_servers(path: str | Path) -> list[ServerSpec]:
    """Parse the servers file; errors name the file and the entry."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read servers file: {exc}") from exc
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{path}: expected a mapping of server names to url/command")
    servers = []
    for name, entry in raw.items():
        if not isinstance(entry, dict) or not {"url", "command"} <= entry.keys():
            raise ValueError(f"{path}: server {name!r} needs 'url' and 'command'")
        unknown = set(entry) - {"url", "command", "env", "startup_timeout"}
        if unknown:
            raise ValueError(f"{path}: server {name!r}: unknown keys {sorted(unknown)}")
        env = {str(k): str(v) for k, v in (entry.get("env") or {}).items()}
        command = os.path.expandvars(str(entry["command"]))  # $HOME, $MODEL from the caller
        if not shlex.split(command):
            raise ValueError(f"{path}: server {name!r}: 'command' is empty")
        unset = sorted(set(re.findall(r"\$\{?([A-Za-z_]\w*)", command)))
        if unset:  # expandvars leaves them as they are: the server would get "$DTYPE"
            raise ValueError(f"{path}: server {name!r}: its command uses "
                             f"{', '.join('$' + v for v in unset)}, not set in the environment")
        servers.append(ServerSpec(str(name), str(entry["url"]).rstrip("/"), command, env,
                                  float(entry.get("startup_timeout", 600.0))))
    return servers


def pending_graphs(url: str) -> float | None:
    """`runtime:compile_pending_graphs` from `GET /metrics`: graphs a `compile: background`
    server is still building; None where the server does not report it (vLLM, a locked
    /metrics)."""
    try:
        families = text_string_to_metric_families(
            httpx.get(f"{url}/metrics", timeout=2.0).text)
        for family in families:
            if family.name == "runtime:compile_pending_graphs" and family.samples:
                return family.samples[0].value
    except (httpx.HTTPError, ValueError):  # unreachable, or not Prometheus text (a 401 body)
        return None
    return None


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    """Poll `GET /health` until 200, then until a background compile has built its graphs
    (so the run measures the server it will be, as vLLM's compile before ready does); fail
    early if the process exits."""
    deadline = time.monotonic() + timeout
    healthy = False
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before it was ready")
        with suppress(httpx.HTTPError):
            healthy = healthy or httpx.get(f"{url}/health", timeout=2.0).status_code == 200
        if healthy and not pending_graphs(url):
            return
        time.sleep(0.5)
    what = "compiled its graphs" if healthy else "ready (/health)"
    raise RuntimeError(f"{url} not {what} after {timeout:.0f} s")


def stop(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM the server's process group, then SIGKILL what is left after `grace` seconds."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@dataclass(frozen=True, slots=True)
class StartedServer:
    """A launched server once ready: where it listens and how long it took to get there."""

    url: str
    startup_s: float  # from launch until healthy, graphs built: what a user waits to serve


@contextmanager
def running(server: ServerSpec, log_dir: Path) -> Iterator[StartedServer]:
    """Start the server, yield it once healthy, stop it on exit (even on error)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{server.name}.log"
    argv = shlex.split(server.command)
    with open(log_path, "ab") as log:
        started = time.monotonic()
        try:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                    env=os.environ | server.env, start_new_session=True)
        except OSError as exc:  # no such program, not executable: the file's command is wrong
            raise RuntimeError(f"server {server.name!r}: cannot start {argv[0]!r} "
                               f"({exc.strerror}); its command: {server.command}") from exc
        try:
            try:
                wait_healthy(server.url, proc, server.startup_timeout)
            except RuntimeError as exc:
                raise RuntimeError(f"server {server.name!r}: {exc} (its output: {log_path})"
                                   ) from exc
            yield StartedServer(server.url, time.monotonic() - started)
        finally:
            stop(proc)
