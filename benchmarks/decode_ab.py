"""One decode step of several schedulers' engines on the same rows, interleaved in one process.

Each engine gets the same requests (contexts all `--context` tokens, or spread over 16-255
tokens with `--spread`), prefills them, and then its `engine.step()` is timed in turn with
the others, round after round, so background load hits all alike: a ratio between two
schedulers' decode passes that is the layouts' and kernels' own, not the arrival pattern's.

    .venv/bin/python benchmarks/decode_ab.py --rows 64 --spread --schedulers baton,orca --compile
"""

from __future__ import annotations

import argparse

import decode_step
import torch
from decode_step import SMOLLM2_135M, interleaved_median_ms, make_engine, start_decoding

from runtime.architectures import build_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--context", type=int, default=128, help="cached tokens per row")
    p.add_argument("--spread", action="store_true", help="contexts spread over 16-255 tokens")
    p.add_argument("--schedulers", default="baton,orca")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="the engine's compiled decoder")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--linear-backends", default="auto",
                   help="comma list: each scheduler runs on each (a model of its own per "
                        "backend), e.g. onednn,native")
    args = p.parse_args()
    decode_step.COMPILE = args.compile  # its make_engine reads the flag
    if args.threads:
        torch.set_num_threads(args.threads)
    backends = args.linear_backends.split(",")
    models = {b: build_model(SMOLLM2_135M).init_weights(0).to(getattr(torch, args.dtype)).eval()
              for b in backends}
    contenders = [(name, b) for name in args.schedulers.split(",") for b in backends]
    names = [name if len(backends) == 1 else f"{name}/{b}" for name, b in contenders]
    engines = []
    for name, backend in contenders:
        contexts = [16 + (37 * i) % 240 if args.spread else args.context
                    for i in range(args.rows)]
        engines.append(start_decoding(make_engine(models[backend], name, args.rows, backend, 1024),
                                      contexts, 6 * args.iters + 64))
    times = interleaved_median_ms([e.step for e in engines], args.iters)
    contexts = "16-255 (spread)" if args.spread else str(args.context)
    print(f"{args.rows} rows, contexts {contexts}, {torch.get_num_threads()} threads, "
          f"{args.dtype}, median ms per step of {args.iters} interleaved rounds")
    for name, ms in zip(names, times, strict=True):
        print(f"{name:>12} {ms:8.1f} ms  {times[0] / ms:5.2f}x {names[0]}'s speed")


if __name__ == "__main__":
    main()
