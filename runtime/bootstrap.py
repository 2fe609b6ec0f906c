"""From a RuntimeConfig to a ready engine: device, dtype, model, tokenizer, scheduler."""

from __future__ import annotations

import logging

import torch

from runtime.config import RuntimeConfig
from runtime.engine import Engine, EngineLimits
from runtime.graph_packages import cache_spec
from runtime.hardware import choose_num_threads, cpu_info, keep_freed_memory
from runtime.package_builder import ModelSource
from runtime.plugins import instantiate_scheduler

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when available; asking for CUDA without it is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return device


def create_engine(config: RuntimeConfig, observers: tuple[object, ...] = ()) -> Engine:
    """Load the model folder and tokenizer, select the scheduler by name, build the engine."""
    from runtime.loader import load_model
    from runtime.tokenizer import Tokenizer

    configure_host(config.num_threads)
    torch.manual_seed(config.seed)
    scheduler = instantiate_scheduler(config.scheduler, config.scheduler_options)
    path = config.resolved_model()
    device = resolve_device(config.device)
    model = load_model(path, dtype=config.dtype, device=device)
    tokenizer = Tokenizer.from_dir(path)
    limits = EngineLimits(config.max_num_seqs, config.max_model_len, config.kv_cache_tokens,
                          config.kv_cache_memory, config.kv_cache_dtype)
    # Missing bucket packages are built by another process loading the same folder and dtype.
    builder = ModelSource(path, model.config.torch_dtype)
    engine = Engine(model, tokenizer, scheduler, config.scheduler, limits, observers,
                    linear_backend=config.linear_backend, compile_model=config.compile,
                    attention_backend=config.attention_backend,
                    static_decode_rows=config.static_decode_rows,
                    static_graph_cache=cache_spec(config.static_graph_cache,
                                                  config.static_graph_cache_gib, builder))
    if config.compile is True:
        logger.info("compiling the decoder (warm-up requests) ...")
        try:
            seconds = engine.warm_up()
        except Exception as exc:  # no C++ compiler, an inductor bug: say which setting to drop
            raise RuntimeError(
                f"compile: true: compiling the decoder failed ({exc}); run without --compile "
                "(compile: false) to use the eager forward") from exc
        logger.info("compiled in %.1f s", seconds)
    return engine


def configure_host(num_threads: int | None) -> None:
    """Threads (one per physical core unless set) and the allocator, logged with reasons."""
    threads = choose_num_threads(num_threads)
    torch.set_num_threads(threads.num_threads)
    kept = keep_freed_memory()
    logger.info("torch threads: %d (%s); allocator keeps freed buffers: %s; CPU: %s",
                threads.num_threads, threads.reason, kept, cpu_info().model_name)
