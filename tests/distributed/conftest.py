"""One local Ray instance for every scale-out test, and servers whose replicas run on it.

Ray is started once per session (a few seconds) with a small object store; each server
module starts its own actors on it and kills them when it stops. Tests that need no Ray
(router, metrics merge, the replica in process) live beside these and do not use `ray_local`.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from runtime.config import RuntimeConfig
from runtime.server.state import ServerSettings
from tests.server.conftest import MODEL_NAME, LiveServer, serve_in_thread

LONG_CONTEXT = 2048  # room for requests long enough to still run when a replica is killed


@pytest.fixture(scope="session")
def ray_local() -> Iterator[Any]:
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=8, include_dashboard=False, object_store_memory=200 * 1024**2,
                 logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def long_model_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The server tests' tiny model with a longer context (RoPE has no weights to change)."""
    path = tmp_path_factory.mktemp("tiny-llama-long")
    for file in model_dir.iterdir():
        shutil.copy(file, path / file.name)
    config = json.loads((path / "config.json").read_text())
    config["max_position_embeddings"] = LONG_CONTEXT
    (path / "config.json").write_text(json.dumps(config))
    return path


def serve_config(model_dir: Path, **options: Any) -> RuntimeConfig:
    """The config of a test server: tiny, one thread per actor, float64 unless told."""
    defaults = {"scheduler": "baton", "dtype": "float64", "max_num_seqs": 8,
                "kv_cache_tokens": 4096, "num_threads": 1, "log_interval": 60.0,
                "linear_backend": "torch", "replicas": 1 if options.get("prefill_workers") else None}
    return RuntimeConfig(model=str(model_dir), served_model_name=MODEL_NAME,
                         **(defaults | options))


def start_replicas(model_dir: Path, wait_ready: bool = True, **options: Any) -> LiveServer:
    """A server with `replicas` (default 2) on the session's Ray, in a thread on a free port."""

    from runtime.distributed.frontend import create_distributed_app

    config = serve_config(model_dir, **({"replicas": 2} | options))
    app = create_distributed_app(config, ServerSettings.from_config(config))
    deadline = time.monotonic() + 120
    live = serve_in_thread(app, deadline)
    with live.client() as client:
        while wait_ready and client.get("/health").status_code != 200:
            assert app.state.server.load_error is None, app.state.server.load_error
            assert time.monotonic() < deadline, "replicas did not start"
            time.sleep(0.05)
    return live


def pool_of(live: LiveServer):
    """The server's `ReplicaPool` (white-box checks)."""
    return live.state.engine


def wait_for(condition, timeout: float, what: str, interval: float = 0.05) -> float:
    """Poll `condition` until true; returns the seconds it took, fails after `timeout`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"timed out waiting for {what}"
        time.sleep(interval)
    return time.monotonic() - started


def health(live: LiveServer) -> tuple[int, dict]:
    resp = httpx.get(live.base_url + "/health", timeout=10)
    return resp.status_code, resp.json()
