"""Every decoder linear of one pass, on each GEMM kernel the engine can pick, at each row count.

`runtime.linear_kernels` chooses the linears' kernel by a short probe at decode sizes (1 to 64
rows). This times the whole set of a pass's decoder linears (the LM head left out: it runs on
the sampled rows only) at any row count, prefill sizes included, so that the choice can be
checked on a new machine: plain `F.linear`, oneDNN-packed and MKL-packed weights (where they
build), interleaved round by round in one process. The linears run one after the other over
distinct weights, so each weight comes from memory as in a real pass, not from the cache the
previous call left it in (a single GEMM timed in a loop reads its weight hot and can be 1.3x
faster than it is in a pass).

With `--threads-scaling`, each kernel is also timed on one thread, to show how much of the
second core a row count uses.

    python benchmarks/linear_backends.py --rows 1 8 32 64 256 1024 2048

`--only openblas` times numpy's BLAS (OpenBLAS in numpy's wheels) on the same weights, as a
reference from outside torch, not a kernel the engine can pick. Its threads spin after each
call and slow torch's (and torch's slow it), so run each kernel in its own process, alternated:

    for i in 1 2; do for b in onednn openblas; do
        python benchmarks/linear_backends.py --rows 1 8 32 64 256 --only $b; done; done
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from runtime.architectures import build_model
from runtime.architectures.layers import Linear
from runtime.bench.model_spec import SPECS
from runtime.hardware import cpu_info
from runtime.linear_kernels import PACKED_BACKENDS, model_linears, pack_weight, packing_supported


def decoder_linears(model: torch.nn.Module) -> list[Linear]:
    """The linears of one pass but the LM head."""
    return [m for m in model_linears(model) if m is not model.lm_head]


def pass_linears(linears: list[Linear], packed: list[torch.Tensor] | None, backend: str,
                 rows: int) -> Callable[[], None]:
    """One pass's decoder linears on `rows` rows with `backend`'s kernel (`packed`: their
    weights in its layout, None for `F.linear`)."""
    dtype = linears[0].weight.dtype
    xs = {m.in_features: torch.randn(rows, m.in_features, dtype=dtype) for m in linears}
    if backend == "openblas":
        return _numpy_pass(linears, {k: x.numpy() for k, x in xs.items()}, rows)
    if packed is None:
        def run() -> None:
            for m in linears:
                F.linear(xs[m.in_features], m.weight, m.bias)
        return run

    def run_packed() -> None:
        for m, w in zip(linears, packed, strict=True):
            m.packed_forward(xs[m.in_features], w, backend)
    return run_packed


def _numpy_pass(linears: list[Linear], xs: dict[int, np.ndarray], rows: int
                ) -> Callable[[], None]:
    """The pass through numpy's `matmul` (its BLAS), each weight a transposed view as
    `F.linear` reads it, into preallocated outputs."""
    weights = [m.weight.detach().numpy().T for m in linears]
    outs = [np.empty((rows, m.out_features), np.float32) for m in linears]

    def run() -> None:
        for m, w, out in zip(linears, weights, outs, strict=True):
            np.matmul(xs[m.in_features], w, out=out)
    return run


def median_seconds(fns: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    """Median time of each function, called in turn round after round (after one warm-up)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 64, 256, 1024, 2048])
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--threads-scaling", action="store_true",
                        help="also time each kernel on one thread")
    parser.add_argument("--seed", type=int, default=0, help="weight seed")
    parser.add_argument("--only", choices=["torch", *PACKED_BACKENDS, "openblas"],
                        help="time this kernel alone (openblas: numpy's BLAS, float32 only)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    model = build_model(SPECS["smollm2-135m-shape"]).init_weights(args.seed).to(dtype).eval()
    model.requires_grad_(False)
    cpu = torch.device("cpu")
    backends = ["torch"] + [b for b in PACKED_BACKENDS if packing_supported(b, dtype, cpu)]
    if args.only == "openblas" and (dtype != torch.float32 or args.threads_scaling):
        parser.error("--only openblas: float32, and its threads are OPENBLAS_NUM_THREADS's "
                     "(every core by default), not --threads")
    if args.only:
        if args.only not in backends + ["openblas"]:
            parser.error(f"--only {args.only}: no such kernel for {args.dtype} here")
        backends = [args.only]
    linears = decoder_linears(model)
    packed = {b: None if b in ("torch", "openblas") else [pack_weight(m.weight, b)
                                                          for m in linears]
              for b in backends}  # once: every row count runs the same packed copies
    flops_per_row = sum(2 * m.in_features * m.out_features for m in linears)
    print(f"SmolLM2-135M shape, {args.dtype}, decoder linears of one pass, {args.threads} "
          f"threads, load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; "
          f"{cpu_info().model_name}")
    header = "".join(f"{b + ' ms':>12}{'GF/s':>6}" for b in backends)
    scaling = "".join(f"{b + ' 2t/1t':>13}" for b in backends) if args.threads_scaling else ""
    print(f"{'rows':>6}{header}{'fastest':>9}{scaling}")
    with torch.inference_mode():
        for rows in args.rows:
            torch.set_num_threads(args.threads)
            fns = {b: pass_linears(linears, packed[b], b, rows) for b in backends}
            rounds = max(3, min(20, 4096 // rows))
            seconds = median_seconds(fns, rounds)
            line = "".join(f"{1000 * seconds[b]:>12.1f}"
                           f"{flops_per_row * rows / seconds[b] / 1e9:>6.0f}" for b in backends)
            line += f"{min(seconds, key=seconds.__getitem__):>9}"
            if args.threads_scaling:
                torch.set_num_threads(1)
                single = median_seconds(fns, rounds)
                line += "".join(f"{single[b] / seconds[b]:>12.2f}x" for b in backends)
            print(f"{rows:>6}{line}", flush=True)


if __name__ == "__main__":
    main()
