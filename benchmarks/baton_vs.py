"""BATON against the built-in default (per-request packed passes) and static schedulers.

One process, one in-memory random model, the same seeded workload for every scheduler, repeats
interleaved (runtime.bench's offline machinery); prints throughput/latency ratios, the idle
computation, and BATON's own layout copies (row moves, window shifts, reallocations).

    .venv/bin/python benchmarks/baton_vs.py --workload short-long-mix --num-requests 24 \\
        --rate 8 --repeats 2 --threads 1
"""

from __future__ import annotations

import argparse
import statistics

import torch

from runtime.architectures import build_model
from runtime.bench.metrics import compute_metrics
from runtime.bench.model_spec import SPECS
from runtime.bench.offline import EngineContender
from runtime.bench.workload import generate_requests, load_workload
from runtime.engine import Engine, EngineLimits
from runtime.plugins import installed_schedulers

ROWS = (
    ("request_throughput", "req/s", 1.0),
    ("output_throughput", "out tok/s", 1.0),
    ("mean_ttft_ms", "mean TTFT ms", 1.0),
    ("mean_tpot_ms", "mean TPOT ms", 1.0),
    ("duration", "makespan s", 1.0),
    ("idle_token_fraction", "idle token slots %", 100.0),
    ("idle_attention_fraction", "idle attn pairs %", 100.0),
    ("kv_usage", "KV used/alloc %", 100.0),
)


class RecordingContender(EngineContender):
    """Keeps the last engine so BATON's layout counters can be read after a run."""

    engine: Engine | None = None

    def make_engine(self, observers: tuple[object, ...] = ()) -> Engine:
        self.engine = super().make_engine(observers)
        return self.engine


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="short-long-mix", help="named workload or YAML file")
    p.add_argument("--num-requests", type=int, default=24, help="requests (default 24)")
    p.add_argument("--rate", type=float, help="Poisson rate override (req/s)")
    p.add_argument("--all-at-once", action="store_true", help="every request at t=0")
    p.add_argument("--model-spec", default="demo", choices=sorted(SPECS), help="model shape")
    p.add_argument("--max-num-seqs", type=int, default=16, help="batch rows (default 16)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument(
        "--schedulers", default="baton,static,default", help="comma list; 'default' = built-in"
    )
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    config = SPECS[args.model_spec]
    model = build_model(config).init_weights(0).eval()
    spec = load_workload(args.workload).with_overrides(
        args.num_requests, args.rate, args.all_at_once
    )
    max_len = min(config.max_position_embeddings, spec.max_total_len())
    requests = generate_requests(spec, config.vocab_size, max_len)
    installed = {i.name for i in installed_schedulers()} | {"default"}
    names = [n for n in args.schedulers.split(",") if n in installed]
    limits = EngineLimits(args.max_num_seqs, max_len)
    contenders = [RecordingContender(n, n, model, None, limits) for n in names]
    for c in contenders:
        c.warmup()
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for rep in range(args.repeats):
        for c in contenders[rep % len(contenders) :] + contenders[: rep % len(contenders)]:
            runs[c.label].append(compute_metrics(c.run(requests)))
            print(f"  {c.label:<8} repeat {rep + 1}: {runs[c.label][-1]['duration']:.2f} s")
    print(
        f"\n{spec.name}: {len(requests)} requests, "
        f"{'all at once' if spec.rate is None else f'Poisson {spec.rate:g}/s'}, "
        f"model {args.model_spec}, max_num_seqs {args.max_num_seqs}, {args.threads} thread(s), "
        f"median of {args.repeats}"
    )
    report(names, runs)
    baton = next((c for c in contenders if c.label == "baton"), None)
    if baton is not None and baton.engine is not None:
        print(f"\nbaton layout copies (last run): {baton.engine.kv_cache.copies}")


def report(names: list[str], runs: dict[str, list[dict]]) -> None:
    """Absolute values, then ratios against the first scheduler (baton by default)."""
    med = {n: {k: statistics.median(r[k] for r in runs[n]) for k, _, _ in ROWS} for n in names}
    print(f"{'metric':<22}" + "".join(f"{n:>12}" for n in names))
    for key, label, scale in ROWS:
        print(f"{label:<22}" + "".join(f"{med[n][key] * scale:>12.2f}" for n in names))
    base = names[0]
    print(f"\nratios {base} / other (>1 means {base} is higher)")
    for key, label, _ in ROWS[:5]:
        cells = "".join(
            f"{med[base][key] / med[n][key]:>12.2f}x" if med[n][key] else f"{'-':>13}"
            for n in names[1:]
        )
        print(f"{label:<22}{cells}")


if __name__ == "__main__":
    main()
