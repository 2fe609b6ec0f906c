"""Feasibility probe: one `static_decode_rows` bucket as an AOTInductor package.

Every server start rebuilds the frozen bucket graphs (~90 s each on 2 cores): inductor's FX
graph cache bypasses them because freezing packs the weights into oneDNN tensors it cannot
pickle (docs/benchmarks.md, seventeenth session). This exports the bucket's decoder (attention
through the opaque op, stubbed with zeros), compiles it ahead of time with the same inductor
settings into a package on disk, loads it back, and times it against the bucket graph the
engine builds today. Measured on the 2-core Zen 3 host (float32, 1 row): export + compile 117 s,
package 921 MB, load 1.3-5.7 s, 20.5-26.3 ms a pass against the in-process bucket's 24.6-29.1 ms, outputs
within 2e-5 of the eager twin. The engine now does this itself (`static_graph_cache`, runtime/graph_packages.py); this probe stays as the standalone measurement.

    .venv/bin/python benchmarks/aoti_bucket_probe.py --rows 1 --package /tmp/bucket1.pt2
"""

from __future__ import annotations

import argparse
import os
import time

import decode_step
import torch
from decode_step import SMOLLM2_135M, interleaved_median_ms, make_engine

from runtime import compiled_forward, static_graphs
from runtime.architectures import build_model
from runtime.hardware import keep_freed_memory


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1, help="the bucket's row count")
    p.add_argument("--package", default="/tmp/baton-bucket.pt2", help="reused if it exists")
    p.add_argument("--iters", type=int, default=40)
    args = p.parse_args()
    keep_freed_memory()
    torch.set_num_threads(2)
    decode_step.COMPILE = True  # the engine routes linears and RoPE through the graph's ops
    model = build_model(SMOLLM2_135M).init_weights(0).eval().requires_grad_(False)
    make_engine(model, "baton", 8, "auto", 256)
    decoder = static_graphs._Decoder(static_graphs.dense_twin(model),
                                     compiled_forward._OPAQUE).eval()
    rows = args.rows
    ids, positions = torch.zeros(rows, dtype=torch.long), torch.arange(rows)
    graphs = compiled_forward.static_decode_graphs(model, (rows,), True)
    graphs.build_all()  # the bucket as the engine builds it today

    def with_zero_attention(model_fn) -> torch.Tensor:
        """`model_fn` with the pass state the opaque attention op reads (zeros, every row
        real), set per call: the bucket's own calls clear it when they return."""
        state = compiled_forward._PASS
        state.attn, state.mask, state.rows = compiled_forward._ZeroAttention(), None, rows
        return model_fn(ids, positions)

    if not os.path.exists(args.package):
        start = time.perf_counter()
        with torch.no_grad():
            exported = with_zero_attention(
                lambda *inputs: torch.export.export(decoder, inputs, strict=False))
        settings = dict(static_graphs.FROZEN_GEMM_SETTINGS)
        settings.pop("autotune_num_choices_displayed", None)
        torch._inductor.aoti_compile_and_package(exported, package_path=args.package,
                                                 inductor_configs=settings)
        print(f"export + compile {time.perf_counter() - start:.1f} s, package "
              f"{os.path.getsize(args.package) / 2**20:.0f} MB")
    start = time.perf_counter()
    runner = torch._inductor.aoti_load_package(args.package)
    print(f"load {time.perf_counter() - start:.1f} s")
    with torch.inference_mode():
        diff = (with_zero_attention(runner) - with_zero_attention(decoder)).abs().max().item()
        print(f"max |AOTI - eager twin| {diff:.2e}")
        aoti, jit = interleaved_median_ms(
            [lambda: with_zero_attention(runner),
             lambda: graphs._call(rows, ids, positions, graphs._zero, None, rows)], args.iters)
    print(f"{rows}-row decoder: AOTI package {aoti:.2f} ms, in-process bucket {jit:.2f} ms")


if __name__ == "__main__":
    main()
