"""Decode attention alone: the native kernel against torch's SDPA, per dtype.

One decode step's attention over every layer of a model shape (default: smollm2-135m's 30
layers, 9 query and 3 KV heads of 64), each layer its own K/V buffer so the keys stream from
memory as in a real step. The contenders run interleaved, round after round, and each figure
is a median, so machine noise hits them alike. Keys and values live in huge pages where the
engine's caches do (`runtime/huge_pages.py`; `BATON_HUGE_PAGES=0` for 4 KiB pages).

    python benchmarks/decode_attention.py --dtypes float32 bfloat16 --shapes 1x100 32x211 64x300

`--baseline-source` builds another version of the kernel's C++ file (say the last commit's,
`git show HEAD:runtime/kernels/decode_attention.cpp > /tmp/old.cpp`) under its own op
namespace and runs it in the same rounds, checking it gives the same output: an A/B of a
kernel change in one process, on one machine state.

`--cache-dtype bfloat16` (or float16) adds the kernel over the same keys and values stored in
16 bits under the model-dtype query (`kv_cache_dtype`), timed in the same rounds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from runtime.api import kv_empty
from runtime.attention_kernels import instruction_set, load_native_kernel


def load_baseline(source: Path) -> Callable[..., torch.Tensor]:
    """Build `source` (a version of decode_attention.cpp) as op `baton_baseline::...`."""
    from torch.utils import cpp_extension

    text = source.read_text()
    if "TORCH_LIBRARY(baton_kernels," not in text:
        raise SystemExit(f"{source}: no TORCH_LIBRARY(baton_kernels, ...) to rename")
    build = Path(tempfile.mkdtemp(prefix="baton-baseline-")) / "decode_attention.cpp"
    build.write_text(text.replace("TORCH_LIBRARY(baton_kernels,", "TORCH_LIBRARY(baton_baseline,"))
    for header in source.parent.glob("*.h"):  # the headers it includes, from the same version
        (build.parent / header.name).write_text(header.read_text())
    isa, flags = instruction_set()
    cpp_extension.load(name=f"baton_baseline_{isa}", sources=[str(build)],
                       extra_cflags=["-O3", "-fopenmp", *flags], extra_ldflags=["-fopenmp"],
                       is_python_module=False, verbose=False)
    return torch.ops.baton_baseline.decode_attention.default


def contenders(rows: int, keys: int, dtype: torch.dtype, layers: int, heads: int,
               kv_heads: int, dim: int, baseline: Callable[..., torch.Tensor] | None = None,
               cache_dtype: torch.dtype | None = None, columns: int | None = None,
               sdpa_too: bool = True) -> dict[str, Callable[[], None]]:
    """The timed closures for one shape: each attends (or reads) every layer once.

    `columns`: the buffer's width per row and KV head (default: the keys plus 16 pad columns
    on the left). BATON's buffer is the context length plus slack wide, so a row's keys are
    followed by unused columns, not by the next head's keys: what a kernel reads ahead past
    a row's last key matters there."""
    kernel = load_native_kernel()
    columns = max(columns or 0, keys + 16)  # a window with pad columns on the left
    shape = (rows, kv_heads, columns, dim)  # in huge pages, as the engine's KV caches
    ks = [kv_empty(shape, dtype).copy_(torch.randn(shape)) for _ in range(layers)]
    vs = [kv_empty(shape, dtype).copy_(torch.randn(shape)) for _ in range(layers)]
    q = torch.randn(rows, heads, dim).to(dtype)
    counts = torch.full((rows,), keys)
    offsets = torch.tensor([r * kv_heads * columns * dim + 16 * dim for r in range(rows)])
    real = slice(16, 16 + keys)

    def native() -> None:
        for k, v in zip(ks, vs, strict=True):
            kernel(q, k, v, offsets, counts, dim, columns * dim, kv_heads)

    def sdpa() -> None:
        for k, v in zip(ks, vs, strict=True):
            F.scaled_dot_product_attention(q[:, :, None], k[:, :, real], v[:, :, real],
                                           enable_gqa=True)

    runs = {"native": native, "sdpa": sdpa} if sdpa_too else {"native": native}
    if cache_dtype is not None:
        ks16, vs16 = [k.to(cache_dtype) for k in ks], [v.to(cache_dtype) for v in vs]

        def native16() -> None:
            for k, v in zip(ks16, vs16, strict=True):
                kernel(q, k, v, offsets, counts, dim, columns * dim, kv_heads)

        runs["cache16"] = native16
    if baseline is not None:
        def old() -> None:
            for k, v in zip(ks, vs, strict=True):
                baseline(q, k, v, offsets, counts, dim, columns * dim, kv_heads, None, None)

        k, v = ks[0], vs[0]
        same = torch.equal(kernel(q, k, v, offsets, counts, dim, columns * dim, kv_heads),
                           baseline(q, k, v, offsets, counts, dim, columns * dim, kv_heads,
                                    None, None))
        print(f"  {dtype} {rows}x{keys}: baseline output {'identical' if same else 'DIFFERS'}")
        runs["baseline"] = old
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--shapes", nargs="+", default=["1x100", "8x200", "32x211", "64x300"],
                        help="ROWSxKEYS: decode rows and keys per row")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--columns", type=int,
                        help="buffer columns per row and KV head, as BATON's context-wide "
                             "buffer (default: the keys plus 16)")
    parser.add_argument("--no-sdpa", action="store_true", help="time the native kernel only")
    parser.add_argument("--rounds", type=int, default=11, help="interleaved rounds per figure")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dtype", choices=["bfloat16", "float16"],
                        help="also time the kernel over a 16-bit copy of the keys and values")
    parser.add_argument("--baseline-source", type=Path,
                        help="another version of runtime/kernels/decode_attention.cpp to A/B")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    baseline = load_baseline(args.baseline_source) if args.baseline_source else None
    print(f"{args.layers} layers, {args.heads} q / {args.kv_heads} KV heads of {args.head_dim}; "
          f"{args.threads} threads; median of {args.rounds} interleaved rounds, ms per step")
    cache_dtype = getattr(torch, args.cache_dtype) if args.cache_dtype else None
    extra = " baseline | native / baseline |" if baseline else ""
    extra += f" {args.cache_dtype} cache | {args.cache_dtype} / native |" if cache_dtype else ""
    print(f"| dtype | rows x keys | native | SDPA | SDPA / native |{extra}")
    print("|---|---|---|---|---|" + "---|---|" * (bool(baseline) + bool(cache_dtype)))
    for name in args.dtypes:
        dtype = getattr(torch, name)
        for shape in args.shapes:
            rows, keys = (int(x) for x in shape.split("x"))
            runs = contenders(rows, keys, dtype, args.layers, args.heads, args.kv_heads,
                              args.head_dim, baseline,
                              cache_dtype if dtype.itemsize > 2 else None,  # 16-bit: its own
                              args.columns, not args.no_sdpa)
            times: dict[str, list[float]] = {label: [] for label in runs}
            for _ in range(args.rounds):
                for label, run in runs.items():
                    started = time.perf_counter()
                    run()
                    times[label].append(time.perf_counter() - started)
            ms = {label: 1e3 * statistics.median(t) for label, t in times.items()}
            sdpa = ms.get("sdpa", float("nan"))
            row = (f"| {name} | {shape} | {ms['native']:.2f} | {sdpa:.2f} | "
                   f"{sdpa / ms['native']:.2f}x |")
            if baseline:
                row += f" {ms['baseline']:.2f} | {ms['native'] / ms['baseline']:.2f}x |"
            if cache_dtype and "cache16" in ms:
                row += f" {ms['cache16']:.2f} | {ms['cache16'] / ms['native']:.2f}x |"
            elif cache_dtype:
                row += " - | - |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
