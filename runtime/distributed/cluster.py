"""Everything that names Ray: joining or starting it, the actors' options, launch and teardown.

Each actor reserves `threads` Ray CPUs and runs that many torch threads. A local instance
started here is sized so the actors fit even when they oversubscribe the cores (that is the
user's choice to make with --num-threads). Replicas and workers are spread over the nodes
(`SPREAD`); Ray restarts any of them that dies, without limit, and never re-runs a call
that was in flight (the front decides what to retry).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import threading
from dataclasses import dataclass, field
from typing import Any

import ray

from runtime.config import RuntimeConfig
from runtime.distributed.prefill_pool import PrefillServer
from runtime.distributed.protocol import ReplicaInfo
from runtime.distributed.replica import ReplicaServer
from runtime.hardware import cpu_info
from runtime.kv_sizing import parse_kv_memory

logger = logging.getLogger("runtime.server")
STARTUP_SECONDS = 900.0  # every actor loads the model; beyond this the start fails
ENV_PASSED = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "RUNTIME_TRACE_HOOKS")


@dataclass(eq=False)
class Cluster:
    """The actors this server launched, and whether it started Ray itself."""

    started_ray: bool
    replicas: list[Any] = field(default_factory=list)
    workers: list[Any] = field(default_factory=list)

    def shutdown(self) -> None:
        """Kill our actors (no restart); stop Ray only if we started it."""
        for handle in [*self.replicas, *self.workers]:
            with contextlib.suppress(Exception):
                ray.kill(handle, no_restart=True)
        self.replicas, self.workers = [], []
        if self.started_ray and ray.is_initialized():
            ray.shutdown()


def actor_threads(config: RuntimeConfig) -> int:
    """`num_threads` per actor; by default this machine's cores shared among all the actors."""
    if config.num_threads:
        return config.num_threads
    actors = (config.replicas or 1) + config.prefill_workers
    return max(1, cpu_info().physical_cores // actors)


def replica_kv_memory(config: RuntimeConfig, local: bool) -> str | float:
    """Each replica's `kv_cache_memory`: on one machine (a local Ray this server started), a
    fraction of available memory (`auto` included) is split among the replicas, which all
    start together and see the same free memory; sizes, and clusters (where placement is
    Ray's), are passed as given."""
    budget = parse_kv_memory(config.kv_cache_memory)
    if not local or budget.fraction is None or config.replicas <= 1:
        return config.kv_cache_memory
    return budget.fraction / config.replicas


def connect(config: RuntimeConfig, threads: int) -> bool:
    """Join `ray_address`, or start a local Ray instance; True when this call started one.

    A process where Ray already runs (tests, a notebook) is used as it is.
    """
    if ray.is_initialized():
        return False
    common: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
    if config.ray_address:
        ray.init(address=config.ray_address, **common)
        logger.info("joined the Ray cluster at %s", config.ray_address)
        return False
    needed = threads * ((config.replicas or 1) + config.prefill_workers)
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, needed), **common)
    logger.info("started a local Ray instance (%d CPUs)", max(os.cpu_count() or 1, needed))
    return True


def keep_sigterm() -> None:
    """Give SIGTERM back to Python's handler (the server's drain) after `ray.init`.

    Ray's driver installs a C-level crash handler for SIGTERM: it prints a stack trace,
    chains to the previous handler and leaves a 3 s SIGALRM armed that aborts the process
    (exit 134) while it is still draining or stopping Ray. Re-setting Python's own handler
    replaces it; only the main thread may (a server in a test thread has none to keep).
    """
    handler = signal.getsignal(signal.SIGTERM)  # None: not set from Python, leave it
    if handler is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def _options(config: RuntimeConfig, threads: int) -> dict[str, Any]:
    env = {k: os.environ[k] for k in ENV_PASSED if k in os.environ}
    options: dict[str, Any] = {
        "num_cpus": threads,
        "max_restarts": -1,
        "max_task_retries": 0,
        "scheduling_strategy": "SPREAD",
    }
    if env:
        options["runtime_env"] = {"env_vars": env}
    if config.device.startswith("cuda") or (config.device == "auto" and _cluster_has_gpus()):
        options["num_gpus"] = 1
    return options


def _cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def launch(config: RuntimeConfig, model_name: str) -> Cluster:
    """Connect, then create the replica and worker actors (they load the model meanwhile)."""
    threads = actor_threads(config)
    cluster = Cluster(connect(config, threads))
    actor_config = dataclasses.replace(
        config, num_threads=threads,
        kv_cache_memory=replica_kv_memory(config, cluster.started_ray))
    options = _options(config, threads)
    cpus = ray.cluster_resources().get("CPU", 0)
    needed = threads * (config.replicas + config.prefill_workers)
    if cpus < needed:
        logger.warning("the Ray cluster has %g CPUs; %d replicas and %d prefill workers of %d "
                       "threads need %d: some will wait for resources", cpus, config.replicas,
                       config.prefill_workers, threads, needed)
    replica_actor = ray.remote(ReplicaServer)
    worker_actor = ray.remote(PrefillServer)
    cluster.replicas = [replica_actor.options(**options).remote(actor_config, i, model_name)
                        for i in range(config.replicas)]
    cluster.workers = [worker_actor.options(**options).remote(actor_config, i)
                       for i in range(config.prefill_workers)]
    logger.info("launched %d replicas and %d prefill workers, %d torch threads each",
                config.replicas, config.prefill_workers, threads)
    return cluster


async def started(cluster: Cluster) -> list[ReplicaInfo]:
    """Wait until every actor has loaded the model; the first failure (or the timeout) ends
    the start with a message naming its cause."""
    calls = [h.start.remote() for h in cluster.replicas] + \
            [h.load.remote() for h in cluster.workers]
    try:
        results = await asyncio.wait_for(asyncio.gather(*calls), STARTUP_SECONDS)
    except TimeoutError:
        raise RuntimeError(f"the replicas did not start within {STARTUP_SECONDS:.0f} s "
                           "(not enough CPUs or GPUs in the Ray cluster?)") from None
    except ray.exceptions.RayActorError as exc:
        raise RuntimeError(f"a replica or prefill worker failed to start: {root_cause(exc)}") \
            from None
    return list(results[: len(cluster.replicas)])


def root_cause(exc: BaseException) -> str:
    """The message of the exception an actor's constructor raised, without Ray's wrapping."""
    text = str(exc)
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line and ("Error:" in line or "Exception:" in line):
            return line
    return text.splitlines()[0] if text else type(exc).__name__
