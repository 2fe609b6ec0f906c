"""One request at a time, as a served batch-1 client sees the engine: prefill step and decode step.

Builds the engine as `runtime serve` does for a model folder (`compile`, fixed-shape buckets
from their packages, `linear_backend`), then sends requests one after another and times the
step that prefills each (its first token: TTFT less HTTP) and every decode step after it
(TPOT less HTTP). No server, no client, so the figures are the engine's own.

To compare two commits, run it from worktrees of each, alternated, and compare the medians
(this host's noise is up to 30% between runs):

    for i in 1 2 3; do for w in /tmp/old /tmp/new; do
        (cd $w && PYTHONPATH=$w TORCH_EXTENSIONS_DIR=$w-ext \\
         python benchmarks/one_request_steps.py $MODEL --label $w); done; done
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from runtime.engine import Engine, EngineLimits
from runtime.graph_packages import cache_spec
from runtime.loader import load_model
from runtime.plugins import instantiate_scheduler
from runtime.sampling_params import SamplingParams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a model folder (config.json, safetensors)")
    p.add_argument("--scheduler", default="baton")
    p.add_argument("--requests", type=int, default=12)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--output-tokens", type=int, default=8)
    p.add_argument("--static-decode-rows", type=int, nargs="*", default=[1, 2])
    p.add_argument("--linear-backend", default="native")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    p.add_argument("--label", default="", help="printed before the figures")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    model = load_model(args.model, dtype=args.dtype)
    limits = EngineLimits(max_num_seqs=4, max_model_len=1024, kv_cache_tokens=4096)
    engine = Engine(model, None, instantiate_scheduler(args.scheduler, {}), args.scheduler,
                    limits, linear_backend=args.linear_backend, compile_model=True,
                    static_decode_rows=tuple(args.static_decode_rows),
                    static_graph_cache=cache_spec(True))
    engine.warm_up()
    params = SamplingParams(max_tokens=args.output_tokens, temperature=0.0, ignore_eos=True)
    vocab = model.config.vocab_size
    prefill, decode = [], []
    for i in range(args.requests):
        engine.add_request([(7 * i + j) % vocab for j in range(args.prompt_tokens)], params)
        start = time.perf_counter()
        engine.step()
        prefill.append(time.perf_counter() - start)
        while engine.has_unfinished():
            start = time.perf_counter()
            engine.step()
            decode.append(time.perf_counter() - start)
    settled = prefill[2:] or prefill  # the first requests meet cold caches
    print(f"{args.label} prefill step ms: median {statistics.median(settled) * 1e3:.1f}, "
          f"min {min(prefill) * 1e3:.1f}; decode step ms: median "
          f"{statistics.median(decode) * 1e3:.2f}")


if __name__ == "__main__":
    main()
