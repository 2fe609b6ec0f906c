"""Build a model's missing bucket packages in a separate process (`python -m runtime.package_builder`).

Why: building a bucket's package (`runtime.graph_packages`: export, AOTInductor compile,
autotuning, the probe) in the serving process left that process holding what the build
allocated until it exited: inductor's compile-time heap, and every exported weight, which the
AOTInductor compile keeps alive (so the dense copies the buckets freeze from could not be
released). On the 135M shape in float32 the start that built `1 2 4 8` stayed at 4.6-5.1 GB
of anonymous memory against 1.6 GB for a start that loads them. A fresh interpreter builds
them instead and exits, returning all of that to the OS; the server then loads the packages as
any later start does. While it builds, a `compile: background` server keeps serving on the
dynamic graph, its compile thread waiting on the child without holding the GIL.

The child loads the same folder in the same dtype and runs the same code as the server
(`StaticDecodeGraphs` over the model after `compile_decoder`), so it computes the same package
key (config, dtype, weight bytes, torch, CPU, traced source) and writes where the server looks;
where it fails or disagrees, the server finds no package and builds the bucket in its own
process, as before. A fork of the server would share its memory but cannot build: GNU
OpenMP's thread pool hangs in a forked child once the parent has used it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ModelSource:
    """Where another process loads the serving process's model from: its folder and dtype."""

    path: Path
    dtype: str  # as loaded (`model.config.torch_dtype`), never "auto": no second choice


def build_apart(source: ModelSource, root: Path, max_bytes: int, rows: tuple[int, ...]) -> bool:
    """Run the builder for `rows`' buckets of `source` into `root` with this process's thread
    count and environment; its log lines go to this process's stderr. True if it finished
    them all. Interrupting the caller (Ctrl-C, an exception) kills the child."""
    command = [sys.executable, "-m", "runtime.package_builder", "--model", str(source.path),
               "--dtype", source.dtype, "--cache", str(root), "--max-bytes", str(max_bytes),
               "--num-threads", str(torch.get_num_threads()),
               "--rows", *map(str, rows)]
    start = time.perf_counter()
    logger.info("static_decode_rows: building the packages of buckets %s in a separate "
                "process", ", ".join(map(str, rows)))
    try:
        done = subprocess.run(command, stdin=subprocess.DEVNULL, check=False)
    except OSError as exc:
        logger.warning("static_decode_rows: could not start the package builder (%s)", exc)
        return False
    if done.returncode != 0:
        logger.warning("static_decode_rows: the package builder exited with status %d after "
                       "%.0f s", done.returncode, time.perf_counter() - start)
        return False
    logger.info("static_decode_rows: the package builder finished in %.0f s",
                time.perf_counter() - start)
    return True


def _exit_with_parent() -> None:
    """End this process if the one that started it goes (it would build for no one)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def build(source: ModelSource, root: Path, max_bytes: int, rows: tuple[int, ...]) -> bool:
    """Load the model and build every missing package of `rows` (the serving process's code
    path, so the same key); True if every bucket came out of a package."""
    from runtime import compiled_forward
    from runtime.graph_packages import PackageCacheSpec
    from runtime.loader import load_model

    model = load_model(source.path, dtype=source.dtype, device="cpu")
    compiled_forward.compile_decoder(model)
    factory_log = logging.getLogger(compiled_forward.__name__)
    level = factory_log.level
    factory_log.setLevel(logging.WARNING)  # the serving process has stated the buckets' cost
    try:
        graphs = compiled_forward.static_decode_graphs(
            model, rows, lazy=False, packages=PackageCacheSpec(root, max_bytes))
    finally:
        factory_log.setLevel(level)
    if graphs is None or graphs.packages is None:
        return False
    with one_builder_at_a_time(graphs.packages.directory):
        graphs.build_all()  # loads what another builder finished meanwhile
    return graphs.packaged() == set(graphs.rows)


@contextlib.contextmanager
def one_builder_at_a_time(directory: Path) -> Iterator[None]:
    """Hold the model directory's build lock: servers starting together on one machine (Ray
    replicas, a restart beside a running server) would each build the same packages; the
    later builders wait, then load what the first built. Released if the holder dies."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".build.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("another process is building the packages in %s; waiting for it",
                        directory)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="the model folder")
    parser.add_argument("--dtype", required=True, help="the dtype the server loaded it in")
    parser.add_argument("--rows", required=True, type=int, nargs="+", help="bucket row counts")
    parser.add_argument("--cache", required=True, type=Path, help="the package root")
    parser.add_argument("--max-bytes", type=int, default=16 * 2**30,
                        help="bound on the package root (least recently used models go)")
    parser.add_argument("--num-threads", type=int, default=None,
                        help="torch threads (the server's: autotuning times kernels on them)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(levelname)s [package builder] %(name)s: %(message)s")
    _exit_with_parent()
    from runtime.bootstrap import configure_host

    configure_host(args.num_threads)
    try:
        ok = build(ModelSource(args.model, args.dtype), args.cache, args.max_bytes,
                   tuple(args.rows))
    except Exception as exc:  # a bad folder, a loader error: said once, no traceback
        logger.error("cannot build the packages of %s: %s: %s", args.model,
                     type(exc).__name__, exc)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
