"""Real servers on 127.0.0.1 for the server tests: a tiny random Llama plus a tiny tokenizer.

The model folder is written with `runtime.loader.save_model` (no `transformers` import, so the
suite starts fast); uvicorn runs in a thread with our `GracefulServer` on a free port.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from runtime.config import RuntimeConfig
from runtime.plugins import installed_schedulers
from runtime.server.app import GracefulServer, create_app
from runtime.server.http import uvicorn_config
from runtime.server.state import ServerSettings, ServerState
from tests.tokenizer_factory import make_tokenizer_dir

MODEL_NAME = "tiny-llama"
VOCAB = 512
CONTEXT = 128
INSTALLED = {info.name for info in installed_schedulers()}


def make_model_dir(path: Path, seed: int = 0, context: int = CONTEXT) -> Path:
    """A 2-layer Llama (hidden 64, GQA 4/2) with our test tokenizer, vocab 512.

    The LM-head rows of tokens that are not printable ASCII (byte pieces, specials, EOS) are
    zeroed, so their logits are 0 while the best of the others is well above: outputs are
    readable text (stop strings can be picked from them) and run to `max_tokens`.
    """
    import torch

    from runtime.architectures import ModelConfig, build_model
    from runtime.loader import save_model
    from runtime.tokenizer import Tokenizer

    make_tokenizer_dir(path, vocab_size=VOCAB)
    tok = Tokenizer.from_dir(path)
    config = ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=context,
    )
    model = build_model(config).init_weights(seed=seed, std=0.2)
    with torch.no_grad():
        for i in range(VOCAB):
            text = tok.decode([i], skip_special_tokens=False)
            if i in tok.special_token_ids or not re.fullmatch(r"[ -~]+", text):
                model.lm_head.weight[i].zero_()
    save_model(model, path)
    return path


@dataclass
class LiveServer:
    """A running server; `state` gives tests the engine for white-box checks."""

    server: GracefulServer
    thread: threading.Thread
    state: ServerState
    base_url: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def engine(self):  # the core Engine
        return self.state.core

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, **({"timeout": 30.0} | kwargs))

    def openai(self, **kwargs: Any):
        import openai

        return openai.OpenAI(
            base_url=self.base_url + "/v1", api_key="unused", max_retries=0, timeout=30.0, **kwargs
        )

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Until every request has left the engine (finished, aborted) and the cache is empty."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            eng = self.engine
            if not eng.has_unfinished() and not eng.running and eng.kv_cache.is_empty():
                return
            time.sleep(0.01)
        raise AssertionError(
            f"engine not idle: running={self.engine.running} waiting={self.engine.num_waiting}"
        )

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "server thread did not stop"


def serve_in_thread(app: Any, deadline: float) -> LiveServer:
    """Run `app` under uvicorn on a free port in a daemon thread, once it listens."""
    server = GracefulServer(
        uvicorn_config(app, app.state.server.settings, 0, log_level="warning"), app.state.server
    )
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    return LiveServer(server, thread, app.state.server, f"http://127.0.0.1:{port}")


def start_server(
    model_dir: Path,
    scheduler: str = "static",
    *,
    engine_factory=None,
    wait_ready: bool = True,
    **options: Any,
) -> LiveServer:
    """Start a server thread; with `wait_ready`, wait until /health says ready."""
    from runtime.bootstrap import create_engine

    config = RuntimeConfig(
        model=str(model_dir),
        scheduler=scheduler,
        served_model_name=MODEL_NAME,
        max_num_seqs=options.pop("max_num_seqs", 8),
        num_threads=1,
        log_interval=options.pop("log_interval", 60.0),
        **options,
    )
    app = create_app(
        engine_factory or (lambda: create_engine(config)), ServerSettings.from_config(config)
    )
    deadline = time.monotonic() + 60
    live = serve_in_thread(app, deadline)
    with live.client() as client:
        while wait_ready and client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "model did not load"
            time.sleep(0.02)
    return live


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[LiveServer]:
    live = start_server(model_dir, "static")
    yield live
    live.stop()


def require_scheduler(name: str) -> None:
    if name not in INSTALLED:
        pytest.skip(f"scheduler {name!r} is not installed yet")
