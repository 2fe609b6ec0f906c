"""Prefill passes of growing size under three allocator settings: rate and page faults.

A pass of K prompts of `--prompt-len` tokens, packed (Orca's initiation pass, one pass per
step: `max_pass_tokens` above the largest size), timed as `engine.generate(..., max_tokens=1)`
on a thread other than the one that built the engine, as the server's engine loop runs it.
Allocator settings (`malloc`), each in its own process since glibc's arenas are per thread
and fixed once taken, the processes alternating round after round:

- `glibc`: glibc's defaults (buffers over 128 KiB mapped afresh and unmapped when freed);
- `thresholds`: the mmap and trim thresholds raised to glibc's cap (32 MiB), which is what
  `runtime.hardware.keep_freed_memory` did until the sixteenth session;
- `runtime`: what it does now (no mmap, one arena), applied before any thread starts.

    .venv/bin/python benchmarks/prefill_passes.py --sizes 1024 2048 4096 8192 --rounds 2
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import statistics
import subprocess
import sys
import threading
import time

MODES = ("glibc", "thresholds", "runtime")


def apply(mode: str) -> None:
    """Set the allocator before torch loads or any thread starts."""
    from runtime import hardware

    if mode == "runtime":
        hardware.keep_freed_memory()
    elif mode == "thresholds":
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(hardware.M_MMAP_THRESHOLD, 32 * 2**20)
        libc.mallopt(hardware.M_TRIM_THRESHOLD, 128 * 2**20)


def child(mode: str, sizes: list[int], prompt_len: int, iters: int, threads: int,
          compile_model: bool) -> dict[int, tuple[float, float, float]]:
    """{tokens: (median seconds, median minor faults, median system CPU s)} per pass size."""
    apply(mode)
    import torch
    from decode_step import SMOLLM2_135M

    from runtime.architectures import build_model
    from runtime.engine import Engine, EngineLimits
    from runtime.hardware import call_on_fresh_thread
    from runtime.plugins import instantiate_scheduler
    from runtime.sampling_params import SamplingParams

    torch.set_num_threads(threads)
    rows = max(sizes) // prompt_len

    def build() -> Engine:
        model = build_model(SMOLLM2_135M).init_weights(0).float().eval().requires_grad_(False)
        limits = EngineLimits(max_num_seqs=rows, max_model_len=prompt_len + 8,
                              kv_cache_tokens=rows * (prompt_len + 8))
        scheduler = instantiate_scheduler("orca", {"max_pass_tokens": max(sizes)})
        return Engine(model, None, scheduler, "orca", limits, compile_model=compile_model)

    engine = call_on_fresh_thread(build)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    vocab = SMOLLM2_135M.vocab_size
    samples: dict[int, list[tuple[float, int, float]]] = {n: [] for n in sizes}

    def one_pass(tokens: int, seed: int) -> tuple[float, int, float]:
        prompts = [[(7 * j + 13 * i + seed) % vocab for j in range(prompt_len)]
                   for i in range(tokens // prompt_len)]
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        engine.generate(prompts, params)
        seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF)
        return seconds, after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime

    def loop() -> None:
        for n in sizes:  # warm-up: compiles, grows the heap
            one_pass(n, 0)
        for it in range(iters):
            for n in sizes:
                samples[n].append(one_pass(n, it + 1))

    thread = threading.Thread(target=loop, name="engine-loop")
    thread.start()
    thread.join()
    return {n: tuple(statistics.median(s[i] for s in samples[n]) for i in range(3))
            for n in sizes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192],
                   help="tokens per pass")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--iters", type=int, default=3, help="timed passes per size per process")
    p.add_argument("--rounds", type=int, default=2, help="processes per mode, alternating")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--compile", action="store_true", help="the compiled decoder")
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        out = child(args.child, args.sizes, args.prompt_len, args.iters, args.threads,
                    args.compile)
        print(json.dumps({str(n): v for n, v in out.items()}))
        return
    results: dict[str, list[dict[str, list[float]]]] = {m: [] for m in args.modes}
    for _ in range(args.rounds):
        for mode in args.modes:
            cmd = [sys.executable, __file__, "--child", mode, "--sizes", *map(str, args.sizes),
                   "--prompt-len", str(args.prompt_len), "--iters", str(args.iters),
                   "--threads", str(args.threads), *(["--compile"] if args.compile else [])]
            run = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[mode].append(json.loads(run.stdout.strip().splitlines()[-1]))
    print(f"prefill passes of {args.prompt_len}-token prompts, {args.threads} threads, "
          f"{'compiled' if args.compile else 'eager'}; median of {args.iters} passes per "
          f"process, then of {args.rounds} alternating processes per mode")
    print(f"{'tokens':>7} " + "".join(f"{m:>34}" for m in args.modes))
    print(f"{'':>7} " + "".join(f"{'tok/s   faults   sys s':>34}" for _ in args.modes))
    for n in args.sizes:
        cells = []
        for mode in args.modes:
            seconds, faults, sys_s = (statistics.median(r[str(n)][i] for r in results[mode])
                                      for i in range(3))
            cells.append(f"{n / seconds:>17.0f} {faults:>9.0f} {sys_s:>6.2f}")
        print(f"{n:>7} " + "".join(f"{c:>34}" for c in cells))


if __name__ == "__main__":
    main()
