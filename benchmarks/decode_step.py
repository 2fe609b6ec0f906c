"""Time the engine's forward step of a SmolLM2-135M-shaped model against its GEMMs alone.

For each dtype this machine runs natively (float32 always; bfloat16 on a CPU with AMX or
AVX-512 BF16, or on CUDA), with the engine's fast path applied (`--linear-backend`):

- decode: one engine step of B running rows (`--scheduler`, default baton) at each batch
  size, against the same linears run alone on B rows with the same kernels; "attn" is the
  engine's decode attention per layer (its native kernel, or a folded-GQA SDPA) over the rows'
  cache alone, "other" what is left (norms, RoPE, residuals, cache writes, sampling, Python);
- prefill: one request's prompt of 256 and 1,024 tokens, with minor page faults per pass;
- GEMM rate: GFLOP/s of the linears at each row count, as a fraction of their rate at 256 rows;
- `--split`: the real step taken apart in place: the same step with every linear replaying its
  output from a cache (no GEMM), then with the attention (SDPA or the decode kernel) replaying
  too; the differences are what the GEMMs and the attention cost inside the step (including
  what they evict from the caches for the ops around them), and the remainder is everything
  else. With `--compile` the linears then go through the compiled decoder's Python op, which
  can be replayed, rather than its C++ op (about 50 us more per call);
- `--static-decode-rows N ...` (with `--compile`): the buckets are built first, as serving's
  warm-up builds them (a bucket slower than the dynamic graph is dropped, and the run says
  so); a batch size that is a kept bucket is timed in its fixed-shape graph, against the same
  linears frozen and autotuned as the bucket builds them (runtime/static_graphs.py);
  `--kv-cache-dtype bfloat16` stores the cache in 16 bits.

- `--device cuda`: the same on a GPU (each timed call ends with a synchronize; the decode
  kernel is CPU-only, so the attention is SDPA's there), for float32 and bfloat16.

Random seeded weights; each figure is the median of interleaved repeats, so background load
hits the step and its GEMMs alike.

    .venv/bin/python benchmarks/decode_step.py --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from runtime import compiled_forward
from runtime.architectures import build_model
from runtime.architectures.layers import Linear
from runtime.attention_kernels import DecodeKernel
from runtime.bench.model_spec import SPECS
from runtime.bootstrap import resolve_device
from runtime.engine import Engine, EngineLimits
from runtime.hardware import cpu_info, keep_freed_memory
from runtime.linear_kernels import model_linears
from runtime.plugins import instantiate_scheduler
from runtime.sampling_params import SamplingParams

SMOLLM2_135M = SPECS["smollm2-135m-shape"].replace(max_position_embeddings=4096)


def synchronize() -> None:
    """Wait for the GPU's queued work, so a timer reads what a call cost (no-op on CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def interleaved_median_ms(fns: list[Callable[[], object]], iters: int) -> list[float]:
    """Median ms of each function, run in turn each round so background load hits all alike."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(iters):
        for fn, out in zip(fns, times, strict=True):
            synchronize()
            start = time.perf_counter()
            fn()
            synchronize()
            out.append(time.perf_counter() - start)
    return [1000 * statistics.median(t) for t in times]


COMPILE = False  # --compile: the engine's compiled decoder (runtime/compiled_forward.py)
ATTENTION = "auto"  # --attention-backend: the engine's decode attention (runtime.attention_kernels)
STATIC_ROWS: tuple[int, ...] = ()  # --static-decode-rows: fixed-shape buckets (runtime.static_graphs)
KV_DTYPE = "auto"  # --kv-cache-dtype: the cache's dtype (runtime.model_runner.resolve_kv_dtype)
DEVICE = torch.device("cpu")  # --device: where the model, its engine and the timed tensors live


def make_engine(model: torch.nn.Module, scheduler: str, rows: int, backend: str,
                max_model_len: int) -> Engine:
    limits = EngineLimits(max_num_seqs=max(rows, 1), max_model_len=max_model_len,
                          kv_cache_tokens=max(rows, 1) * max_model_len, kv_cache_dtype=KV_DTYPE)
    engine = Engine(model, None, instantiate_scheduler(scheduler, {}), scheduler, limits,
                    linear_backend=backend, compile_model=COMPILE, attention_backend=ATTENTION,
                    static_decode_rows=STATIC_ROWS)
    graphs = engine.runner.static_graphs
    if graphs is not None and not graphs.built and not graphs.failed:
        # Built before any pass, as `runtime serve`'s warm-up builds them, each bucket kept
        # only where it beats the dynamic graph.
        engine.runner.build_static_graphs()
        for rows, (mine, theirs) in sorted(graphs.compared.items()):
            verdict = "kept" if rows in graphs.built else "dropped"
            print(f"{rows}-row bucket {verdict}: {mine:.1f} ms a pass against {theirs:.1f} in "
                  "the dynamic graph")
    return engine


def start_decoding(engine: Engine, contexts: list[int], max_tokens: int) -> Engine:
    """`engine` with one greedy request per entry of `contexts` (its prompt's length)
    prefilled and every row decoding: the state a decode step's benchmark times."""
    vocab = engine.shape.vocab_size
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    requests = [engine.add_request([(13 * i + j) % vocab for j in range(context)], params)
                for i, context in enumerate(contexts)]
    while not all(r.num_output_tokens for r in requests):  # every prompt prefilled
        engine.step()
    engine.step()  # every row decoding
    return engine


def linears_alone(model: torch.nn.Module, rows: int, head_rows: int | None = None
                  ) -> Callable[[], None]:
    """Every linear of one pass on `rows` rows (the LM head on `head_rows`, the rows that are
    sampled), with the pass's kernels."""
    dtype = next(model.parameters()).dtype
    linears = model_linears(model)
    head = model.lm_head
    xs = [torch.randn(rows if m is not head or head_rows is None else head_rows, m.in_features,
                      dtype=dtype, device=DEVICE) for m in linears]

    def run() -> None:
        with torch.inference_mode():
            for x, m in zip(xs, linears, strict=True):
                m(x)

    return run


def frozen_linears_alone(model: torch.nn.Module, rows: int) -> Callable[[], None]:
    """The same linears as a `static_decode_rows` bucket of `rows` rows runs them: the dense
    weights frozen into one fixed-shape graph, each GEMM autotuned (inductor's C++ template or
    ATen) as `runtime.static_graphs` builds a bucket, so the step in a bucket is set against
    its own kernels. Compiles at the first call (about a minute)."""
    from runtime.static_graphs import FROZEN_GEMM_SETTINGS, dense_twin

    dtype = next(model.parameters()).dtype
    linears = model_linears(dense_twin(model))

    class Linears(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linears = torch.nn.ModuleList(linears)

        def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
            return [m(x) for m, x in zip(self.linears, xs, strict=True)]

    graph = torch.compile(Linears().eval(), dynamic=False, options={"cpp_wrapper": True})
    xs = [torch.randn(rows, m.in_features, dtype=dtype, device=DEVICE) for m in linears]
    with torch.inference_mode(), torch._inductor.config.patch(FROZEN_GEMM_SETTINGS):
        graph(xs)

    def run() -> None:
        with torch.inference_mode():
            graph(xs)

    return run


def gemm_flops(model: torch.nn.Module, rows: int) -> int:
    return sum(2 * rows * m.in_features * m.out_features for m in model_linears(model))


def attention_alone(model: torch.nn.Module, rows: int, context: int,
                    kernel: DecodeKernel | None = None,
                    kv_dtype: torch.dtype | None = None) -> Callable[[], None]:
    """The decode attention of `rows` rows over `context + 1` keys in every layer: the
    engine's decode kernel when it has one, else a folded-GQA SDPA. Each layer has its own K
    and V, so the keys stream from memory as in a step (one buffer reused for every layer
    stayed in the caches and read 3.5x faster than the step's attention ran)."""
    cfg = model.config
    dtype = next(model.parameters()).dtype
    kv_dtype = dtype if kernel is None or kv_dtype is None else kv_dtype  # SDPA: q's dtype
    kv_heads, dim = cfg.num_key_value_heads, cfg.head_dim
    group = cfg.num_attention_heads // kv_heads
    q = torch.randn(rows, kv_heads, group, dim, dtype=dtype, device=DEVICE)
    layers = [tuple(torch.randn(rows, kv_heads, context + 1, dim, dtype=kv_dtype, device=DEVICE)
                    for _ in "kv")
              for _ in range(cfg.num_hidden_layers)]
    offsets = torch.arange(rows) * kv_heads * (context + 1) * dim
    counts = torch.full((rows,), context + 1)

    def run() -> None:
        for k, v in layers:
            if kernel is None:
                F.scaled_dot_product_attention(q, k, v)
            else:
                kernel(q.view(rows, -1, dim), k, v, offsets, counts, dim, (context + 1) * dim,
                       kv_heads)

    return run


def decode_rows(model, scheduler: str, rows: int, context: int, iters: int, backend: str):
    """(step ms, GEMMs ms, attention ms) for `rows` rows decoding at about `context`."""
    vocab = model.config.vocab_size
    engine = make_engine(model, scheduler, rows, backend, context + 2 * iters + 16)
    params = SamplingParams(max_tokens=iters + 8, temperature=0.0, ignore_eos=True)
    for i in range(rows):
        engine.add_request([(13 * i + j) % vocab for j in range(context)], params)
    engine.step()  # prefill every row and their first decode
    engine.step()
    kernel = engine.kv_cache.decode_kernel
    graphs = engine.runner.static_graphs
    in_bucket = graphs is not None and rows in graphs.built
    gemms = frozen_linears_alone(model, rows) if in_bucket else linears_alone(model, rows)
    return interleaved_median_ms(
        [engine.step, gemms, attention_alone(model, rows, context, kernel, engine.runner.kv_dtype)],
        iters)


@contextlib.contextmanager
def replayed(owner: object, name: str, key: Callable[..., object], outputs: dict):
    """Within the block, `owner.name` returns the output `outputs` holds for `key` (computing
    it once), so repeated steps skip the work."""
    original = getattr(owner, name)

    def replay(*args, **kwargs):
        k = key(*args)
        if k not in outputs:
            outputs[k] = original(*args, **kwargs)
        return outputs[k]

    setattr(owner, name, replay)
    try:
        yield
    finally:
        setattr(owner, name, original)


def split_step(model, scheduler: str, rows: int, context: int, iters: int, backend: str):
    """(step ms, GEMMs ms, SDPA ms, rest ms) inside one real step, by replaying outputs."""
    vocab = model.config.vocab_size
    engine = make_engine(model, scheduler, rows, backend, context + 6 * iters + 64)
    params = SamplingParams(max_tokens=6 * iters + 32, temperature=0.0, ignore_eos=True)
    for i in range(rows):
        engine.add_request([(13 * i + j) % vocab for j in range(context)], params)
    engine.step()
    engine.step()
    linear_key = lambda module, x: (id(module), tuple(x.shape))  # noqa: E731
    sdpa_key = lambda q, k, v: (tuple(q.shape), tuple(k.shape))  # noqa: E731
    linear_out: dict = {}
    sdpa_out: dict = {}

    def no_gemm() -> None:
        with replayed(Linear, "forward", linear_key, linear_out):
            engine.step()

    kernel_key = lambda kernel, q, k, *rest: (tuple(q.shape), k.data_ptr())  # noqa: E731

    def no_gemm_no_sdpa() -> None:
        with replayed(Linear, "forward", linear_key, linear_out), \
                replayed(F, "scaled_dot_product_attention", sdpa_key, sdpa_out), \
                replayed(DecodeKernel, "__call__", kernel_key, sdpa_out):
            engine.step()

    step, without_gemm, bare = interleaved_median_ms([engine.step, no_gemm, no_gemm_no_sdpa],
                                                     iters)
    return step, step - without_gemm, without_gemm - bare, bare


def prefill(model, scheduler: str, tokens: int, iters: int, backend: str):
    """(pass ms, GEMMs ms, minor faults per pass) of one prompt of `tokens` tokens."""
    engine = make_engine(model, scheduler, 1, backend, tokens + 8)
    prompt = [(7 * j) % model.config.vocab_size for j in range(tokens)]
    faults: list[int] = []

    def one_prompt() -> None:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        engine.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0,
                                                 ignore_eos=True))
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

    step_ms, gemm_ms = interleaved_median_ms([one_prompt, linears_alone(model, tokens, 1)], iters)
    return step_ms, gemm_ms, int(statistics.median(faults))


def native_dtypes(device: str) -> list[torch.dtype]:
    if device == "cuda" or cpu_info().native_bf16:
        return [torch.float32, torch.bfloat16]
    return [torch.float32]


def report(model, args) -> None:
    dtype = next(model.parameters()).dtype
    peak_rows = 256
    gemm_256 = interleaved_median_ms([linears_alone(model, peak_rows)], args.iters)[0]
    rate_256 = gemm_flops(model, peak_rows) / gemm_256 / 1e6
    print(f"\n{str(dtype).removeprefix('torch.')}: GEMMs at 256 rows {rate_256:.0f} GFLOP/s")
    print(f"{'batch':>6} {'step ms':>8} {'GEMM ms':>8} {'ratio':>6} {'attn ms':>8} "
          f"{'other ms':>8} {'tok/s':>7} {'GFLOP/s':>8} {'of 256':>7}")
    for rows in args.batch_sizes:
        step, gemm, attn = decode_rows(model, args.scheduler, rows, args.context, args.iters,
                                       args.linear_backend)
        rate = gemm_flops(model, rows) / gemm / 1e6
        print(f"{rows:>6} {step:>8.1f} {gemm:>8.1f} {step / gemm:>6.2f} {attn:>8.1f} "
              f"{step - gemm - attn:>8.1f} {1000 * rows / step:>7.0f} {rate:>8.0f} "
              f"{rate / rate_256:>7.2f}")
    if args.split:
        print(f"{'batch':>6} {'step ms':>8} {'in-step: GEMMs':>15} {'attn':>6} {'rest':>6} "
              f"{'step / GEMMs':>12}")
        for rows in args.batch_sizes:
            step, gemm, sdpa, rest = split_step(model, args.scheduler, rows, args.context,
                                                args.iters, args.linear_backend)
            print(f"{rows:>6} {step:>8.1f} {gemm:>15.1f} {sdpa:>6.1f} {rest:>6.1f} "
                  f"{step / gemm:>12.2f}")
    print(f"{'prompt':>6} {'pass ms':>8} {'GEMM ms':>8} {'ratio':>6} {'faults':>8} {'tok/s':>7}")
    for tokens in args.prefill:
        step, gemm, faults = prefill(model, args.scheduler, tokens, max(3, args.iters // 3),
                                     args.linear_backend)
        print(f"{tokens:>6} {step:>8.1f} {gemm:>8.1f} {step / gemm:>6.2f} {faults:>8} "
              f"{1000 * tokens / step:>7.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--prefill", type=int, nargs="*", default=[256, 1024],
                        help="prompt lengths of the prefill rows")
    parser.add_argument("--context", type=int, default=128, help="cached tokens per row")
    parser.add_argument("--iters", type=int, default=10, help="timed repeats per figure")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--scheduler", default="baton", help="whose step to time")
    parser.add_argument("--linear-backend", default="auto", help="auto, torch, onednn, mkl or native")
    parser.add_argument("--dtypes", nargs="*", help="default: those this machine runs natively")
    parser.add_argument("--seed", type=int, default=0, help="weight seed")
    parser.add_argument("--attention-backend", default="auto",
                        help="decode attention: auto, native (the kernel) or sdpa")
    parser.add_argument("--compile", action="store_true",
                        help="time the compiled decoder (the first step of each size compiles)")
    parser.add_argument("--static-decode-rows", type=int, nargs="*", default=[],
                        help="with --compile: fixed-shape buckets; a batch size that is one "
                             "is timed in its bucket, against the same linears frozen and "
                             "autotuned as the bucket builds them")
    parser.add_argument("--kv-cache-dtype", default="auto",
                        help="auto (the model's dtype), bfloat16 or float16")
    parser.add_argument("--device", default="cpu",
                        help="cpu, cuda or cuda:N: where the model runs (on CUDA each timed "
                             "call ends with a synchronize)")
    parser.add_argument("--split", action="store_true",
                        help="also take the real decode step apart: GEMMs, SDPA, the rest")
    parser.add_argument("--default-allocator", action="store_true",
                        help="leave glibc's mmap/trim thresholds alone (to count the faults)")
    args = parser.parse_args()
    global COMPILE, ATTENTION, STATIC_ROWS, KV_DTYPE, DEVICE
    try:
        DEVICE = resolve_device(args.device)
    except RuntimeError as exc:
        parser.error(str(exc))
    COMPILE, ATTENTION = args.compile, args.attention_backend
    STATIC_ROWS, KV_DTYPE = tuple(args.static_decode_rows), args.kv_cache_dtype
    if STATIC_ROWS and not COMPILE:
        parser.error("--static-decode-rows needs --compile")
    if args.split and args.compile:  # the C++ linear op cannot be replayed from Python
        compiled_forward.use_python_linear_op()
        print("--split --compile: linears run through the Python op (about 50 us more per "
              "call than the engine's C++ op) so that they can be replayed")
    torch.set_num_threads(args.threads)
    if not args.default_allocator:
        keep_freed_memory()
    dtypes = ([getattr(torch, d) for d in args.dtypes] if args.dtypes
              else native_dtypes(DEVICE.type))
    print(f"SmolLM2-135M shape, {args.threads} threads, {args.scheduler} step, context "
          f"{args.context}, linears {args.linear_backend}, median of {args.iters}, load average "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; {cpu_info().model_name}"
          + (f"; {torch.cuda.get_device_name(DEVICE)}" if DEVICE.type == "cuda" else ""))
    for dtype in dtypes:
        model = build_model(SMOLLM2_135M).init_weights(args.seed).to(DEVICE, dtype).eval()
        report(model.requires_grad_(False), args)


if __name__ == "__main__":
    main()
