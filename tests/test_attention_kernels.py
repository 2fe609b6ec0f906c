"""The native decode-attention kernel against SDPA, and the choice between them."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from runtime import attention_kernels
from runtime.attention_kernels import (
    NativeKernelUnavailable,
    choose_attention_backend,
    load_native_kernel,
)
from runtime.config import ConfigError, build_config
from runtime.testing import check_scheduling_invariance, random_arrivals

pytestmark = pytest.mark.usefixtures("native_kernel")


def reference(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]):
    """Per row: SDPA of its query heads over its own keys `(S_r, H_kv, D)`, GQA folded."""
    out = []
    for r, (k, v) in enumerate(zip(keys, values, strict=True)):
        kv_heads = k.shape[1]
        qr = q[r].view(kv_heads, -1, q.shape[-1])  # (H_kv, G, D)
        out.append(F.scaled_dot_product_attention(qr, k.transpose(0, 1), v.transpose(0, 1))
                   .reshape(q.shape[1:]))
    return torch.stack(out)


CASES = [  # (dtype, heads, kv_heads, head_dim): AVX2 path, its remainders, the portable loop
    (torch.float32, 9, 3, 64),
    (torch.float32, 4, 4, 24),
    (torch.float32, 8, 2, 128),
    (torch.float32, 6, 2, 12),
    (torch.float32, 4, 2, 80),  # 16-lane builds: a 64-wide chunk, then one of 16
    (torch.float32, 4, 2, 48),  # 16-lane builds: three 16-wide value vectors
    (torch.float64, 9, 3, 64),
    (torch.float64, 4, 2, 8),
    (torch.bfloat16, 9, 3, 64),  # widened block by block, arithmetic in float32
    (torch.bfloat16, 6, 2, 12),
    (torch.bfloat16, 10, 2, 32),  # AVX-512 BF16 builds: values widened through the buffer
    (torch.bfloat16, 8, 1, 128),  # AVX-512 BF16 builds: heads in register sets of 4, 2 chunks
    (torch.float16, 8, 2, 128),
    (torch.float16, 4, 4, 24),
]
# Per dtype (rtol, atol) against a float64 reference over the same (rounded) inputs: float32
# arithmetic, then one rounding of the output to the model's dtype (half an ulp, 2**-9 of a
# bfloat16's magnitude, 2**-12 of a float16's, plus float32 arithmetic's error).
TOLERANCE = {torch.float64: (1e-12, 1e-12), torch.float32: (2e-6, 2e-6),
             torch.bfloat16: (2**-8, 1e-5), torch.float16: (2**-10, 1e-5)}


@pytest.mark.parametrize(("dtype", "heads", "kv_heads", "dim"), CASES)
def test_rows_of_a_dense_window_match_sdpa(dtype, heads, kv_heads, dim) -> None:
    """BATON's addressing: rows of a `(R, H_kv, C, D)` buffer, each row's keys right-aligned
    at the window's end (its last `length` columns); pad columns hold garbage, never read."""
    gen = torch.Generator().manual_seed(0)
    rows, columns, end = 5, 40, 33
    lengths = [1, 7, 33, 20, 2]
    k = torch.randn(rows, kv_heads, columns, dim, generator=gen, dtype=dtype)
    v = torch.randn(rows, kv_heads, columns, dim, generator=gen, dtype=dtype)
    for r, n in enumerate(lengths):  # poison every column a row must not read
        k[r, :, : end - n] = float("nan")
        v[r, :, end:] = float("nan")
    q = torch.randn(rows, heads, dim, generator=gen, dtype=dtype)
    offsets = torch.tensor([r * kv_heads * columns * dim + (end - n) * dim
                            for r, n in enumerate(lengths)])
    got = load_native_kernel()(q, k, v, offsets, torch.tensor(lengths), dim, columns * dim,
                               kv_heads)
    keys = [k[r, :, end - n : end].transpose(0, 1) for r, n in enumerate(lengths)]
    values = [v[r, :, end - n : end].transpose(0, 1) for r, n in enumerate(lengths)]
    want = reference(q.double(), [t.double() for t in keys], [t.double() for t in values])
    assert got.dtype == dtype
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)


def test_a_16_bit_model_is_at_least_as_close_to_float64_as_torch_sdpa() -> None:
    """bfloat16: the kernel's float32 arithmetic and single output rounding give an error no
    larger than torch's own bfloat16 SDPA on the same inputs."""
    gen = torch.Generator().manual_seed(3)
    rows, heads, kv_heads, dim, keys = 6, 9, 3, 64, 150
    k = torch.randn(rows, kv_heads, keys, dim, generator=gen).bfloat16()
    v = torch.randn(rows, kv_heads, keys, dim, generator=gen).bfloat16()
    q = torch.randn(rows, heads, dim, generator=gen).bfloat16()
    offsets = torch.arange(rows) * kv_heads * keys * dim
    got = load_native_kernel()(q, k, v, offsets, torch.full((rows,), keys), dim, keys * dim,
                               kv_heads)
    sdpa = F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]
    exact = F.scaled_dot_product_attention(q.double()[:, :, None], k.double(), v.double(),
                                           enable_gqa=True)[:, :, 0]
    kernel_error = (got.double() - exact).abs().mean()
    sdpa_error = (sdpa.double() - exact).abs().mean()
    assert kernel_error <= sdpa_error * 1.05


@pytest.mark.parametrize("head_major", [True, False], ids=["head-major", "token-major"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_slot_ranges_of_a_pool_match_sdpa(dtype, head_major: bool) -> None:
    """Orca's addressing: each request a slot range of an `(H_kv, capacity, D)` pool (Orca's),
    or of a `(capacity, H_kv, D)` one (heads interleaved per slot)."""
    gen = torch.Generator().manual_seed(1)
    kv_heads, dim, heads, capacity = 2, 64, 6, 300
    shape = (kv_heads, capacity, dim) if head_major else (capacity, kv_heads, dim)
    pool_k = torch.randn(shape, generator=gen, dtype=dtype)
    pool_v = torch.randn(shape, generator=gen, dtype=dtype)
    ranges = [(0, 5), (10, 130), (140, 141), (200, 299)]
    q = torch.randn(len(ranges), heads, dim, generator=gen, dtype=dtype)
    key_stride, head_stride = (dim, capacity * dim) if head_major else (kv_heads * dim, dim)
    got = load_native_kernel()(q, pool_k, pool_v,
                               torch.tensor([s * key_stride for s, _ in ranges]),
                               torch.tensor([e - s for s, e in ranges]), key_stride, head_stride,
                               kv_heads)
    token_major_k = pool_k.transpose(0, 1) if head_major else pool_k  # (capacity, H_kv, D)
    token_major_v = pool_v.transpose(0, 1) if head_major else pool_v
    want = reference(q.double(), [token_major_k[s:e].double() for s, e in ranges],
                     [token_major_v[s:e].double() for s, e in ranges])
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_each_row_gets_the_same_bits_alone_and_in_a_batch_on_any_threads(dtype, threads) -> None:
    """Threads claim (row, KV head) tasks from a shared counter, so which thread runs a row
    depends on timing: a row's output and its appended key and value must not. Rows of very
    different lengths, longest first as BATON's buckets order them, against each row alone."""
    gen = torch.Generator().manual_seed(5)
    kv_heads, dim, heads = 3, 64, 9
    lengths = sorted(torch.randint(1, 300, (37,), generator=gen).tolist(), reverse=True)
    columns = max(lengths)
    rows = len(lengths)
    k = torch.randn(rows, kv_heads, columns, dim, generator=gen).to(dtype)
    v = torch.randn(rows, kv_heads, columns, dim, generator=gen).to(dtype)
    q = torch.randn(rows, heads, dim, generator=gen).to(dtype)
    new_k = torch.randn(rows, kv_heads, dim, generator=gen).to(dtype)
    new_v = torch.randn(rows, kv_heads, dim, generator=gen).to(dtype)
    row_size = kv_heads * columns * dim
    offsets = [r * row_size + (columns - n) * dim for r, n in enumerate(lengths)]
    kernel = load_native_kernel()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        batch_k, batch_v = k.clone(), v.clone()
        got = kernel(q, batch_k, batch_v, torch.tensor(offsets), torch.tensor(lengths), dim,
                     columns * dim, kv_heads, new_k, new_v)
        for r, n in enumerate(lengths):
            alone_k, alone_v = k[r].clone(), v[r].clone()
            want = kernel(q[r:r + 1], alone_k, alone_v, torch.tensor([(columns - n) * dim]),
                          torch.tensor([n]), dim, columns * dim, kv_heads,
                          new_k[r:r + 1], new_v[r:r + 1])
            assert torch.equal(got[r:r + 1], want), f"row {r} ({n} keys)"
            assert torch.equal(batch_k[r], alone_k) and torch.equal(batch_v[r], alone_v)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_the_appended_key_and_value_are_written_then_attended(dtype) -> None:
    """`new_k`/`new_v` (strided, as a fused QKV projection leaves them) land at each row's
    last key position, nowhere else, and the row attends to them as if written beforehand."""
    gen = torch.Generator().manual_seed(2)
    rows, kv_heads, columns, dim, heads = 4, 3, 12, 64, 9
    lengths = [1, 12, 5, 8]
    k = torch.randn(rows, kv_heads, columns, dim, generator=gen, dtype=dtype)
    v = torch.randn(rows, kv_heads, columns, dim, generator=gen, dtype=dtype)
    q = torch.randn(rows, heads, dim, generator=gen, dtype=dtype)
    fused = torch.randn(rows, 2 * kv_heads + 1, dim, generator=gen, dtype=dtype)
    new_k, new_v = fused[:, :kv_heads], fused[:, kv_heads + 1:]  # row stride != kv_heads * dim
    want_k, want_v = k.clone(), v.clone()
    want_k[:, :, -1], want_v[:, :, -1] = new_k, new_v
    offsets = torch.tensor([r * kv_heads * columns * dim + (columns - n) * dim
                            for r, n in enumerate(lengths)])
    kernel = load_native_kernel()
    want = kernel(q, want_k.clone(), want_v.clone(), offsets, torch.tensor(lengths), dim,
                  columns * dim, kv_heads)
    got = kernel(q, k, v, offsets, torch.tensor(lengths), dim, columns * dim, kv_heads,
                 new_k, new_v)
    assert torch.equal(got, want)
    assert torch.equal(k, want_k) and torch.equal(v, want_v)


def test_queries_are_read_in_place_as_rows_of_a_fused_projection() -> None:
    """q as the model hands it over, the first H heads of each row of a fused `(n, H + H_kv,
    D)` projection: the same output as its contiguous copy, no copy made; a q whose heads are
    not dense is refused by name."""
    gen = torch.Generator().manual_seed(4)
    rows, kv_heads, columns, dim, heads = 5, 3, 9, 64, 9
    lengths = torch.tensor([1, 9, 3, 6, 2])
    offsets = torch.tensor([r * kv_heads * columns * dim + (columns - int(n)) * dim
                            for r, n in enumerate(lengths)])
    k = torch.randn(rows, kv_heads, columns, dim, generator=gen)
    v = torch.randn(rows, kv_heads, columns, dim, generator=gen)
    fused = torch.randn(rows, heads + kv_heads, dim, generator=gen)
    q = fused[:, :heads]
    assert not q.is_contiguous()
    kernel = load_native_kernel()
    got = kernel(q, k, v, offsets, lengths, dim, columns * dim, kv_heads)
    assert got.is_contiguous()
    assert torch.equal(got, kernel(q.contiguous(), k, v, offsets, lengths, dim, columns * dim,
                                   kv_heads))
    with pytest.raises(RuntimeError, match="dense heads"):
        kernel(torch.randn(rows, heads, 2 * dim)[:, :, :dim], k, v, offsets, lengths, dim,
               columns * dim, kv_heads)


def test_the_attend_op_runs_a_decode_plan_bit_for_bit_and_otherwise_the_python_handle() -> None:
    """`baton_kernels::attend` (the compiled decoder's attention op): with a decode plan set it
    makes the layer's kernel call itself (the same output, the same appended K/V, the seconds
    reported when the plan is cleared); bad layers and row counts are refused by name; with no
    plan it calls the pass's Python handle back."""
    from runtime import compiled_forward  # registers the Python op the C++ one calls back

    gen = torch.Generator().manual_seed(5)
    layers, rows, kv_heads, columns, dim, heads = 3, 4, 3, 10, 64, 9
    lengths = torch.tensor([1, 10, 4, 7])
    offsets = torch.tensor([r * kv_heads * columns * dim + (columns - int(n)) * dim
                            for r, n in enumerate(lengths)])
    k = torch.randn(layers, rows, kv_heads, columns, dim, generator=gen)
    v = torch.randn(layers, rows, kv_heads, columns, dim, generator=gen)
    q = torch.randn(rows, heads, dim, generator=gen)
    new_k = torch.randn(rows, kv_heads, dim, generator=gen)
    new_v = torch.randn(rows, kv_heads, dim, generator=gen)
    kernel = load_native_kernel()
    want_k, want_v = k.clone(), v.clone()
    want = kernel(q, want_k[1], want_v[1], offsets, lengths, dim, columns * dim, kv_heads,
                  new_k, new_v)
    ops = torch.ops.baton_kernels
    ops.set_decode_plan(list(k.unbind(0)), list(v.unbind(0)), offsets, lengths, dim,
                        columns * dim, kv_heads)
    try:
        assert torch.equal(ops.attend(1, q, new_k, new_v), want)
        assert torch.equal(k, want_k) and torch.equal(v, want_v)
        with pytest.raises(RuntimeError, match="layer 3 is outside the decode plan"):
            ops.attend(3, q, new_k, new_v)
        with pytest.raises(RuntimeError, match="the pass has 3 rows, the decode plan 4"):
            ops.attend(0, q[:3], new_k[:3], new_v[:3])
    finally:
        assert ops.clear_decode_plan() > 0

    class Handle:
        def attend(self, layer, q, k, v, mask):
            return torch.full_like(q, float(layer))

    compiled_forward._PASS.enter(Handle(), None, native_op=True)  # offers no plan
    try:
        assert torch.equal(ops.attend(2, q, new_k, new_v), torch.full_like(q, 2.0))
    finally:
        compiled_forward._PASS.leave()


MIXED_CASES = [  # (model dtype, cache dtype, heads, kv_heads, head_dim)
    (torch.float32, torch.bfloat16, 9, 3, 64),  # AVX-512 BF16 builds: keys widened in registers
    (torch.float32, torch.bfloat16, 6, 2, 24),  # the 8-lane widening path
    (torch.float32, torch.float16, 8, 2, 128),
    (torch.float64, torch.bfloat16, 4, 2, 8),  # the portable loop
    (torch.float64, torch.float16, 9, 3, 64),
]


@pytest.mark.parametrize(("dtype", "kv_dtype", "heads", "kv_heads", "dim"), MIXED_CASES)
def test_a_16_bit_cache_under_a_wider_model(dtype, kv_dtype, heads, kv_heads, dim) -> None:
    """`kv_cache_dtype`: keys and values stored in 16 bits, the query and output in the
    model's dtype. The new key and value are rounded as `Tensor.to` rounds them, and the result
    is attention over the widened 16-bit keys, in the model's arithmetic."""
    gen = torch.Generator().manual_seed(4)
    rows, columns = 4, 30
    lengths = [1, 30, 9, 17]
    k = torch.randn(rows, kv_heads, columns, dim, generator=gen).to(kv_dtype)
    v = torch.randn(rows, kv_heads, columns, dim, generator=gen).to(kv_dtype)
    q = torch.randn(rows, heads, dim, generator=gen, dtype=dtype)
    new_k = torch.randn(rows, kv_heads, dim, generator=gen, dtype=dtype)
    new_v = torch.randn(rows, kv_heads, dim, generator=gen, dtype=dtype)
    offsets = torch.tensor([r * kv_heads * columns * dim + (columns - n) * dim
                            for r, n in enumerate(lengths)])
    got = load_native_kernel()(q, k, v, offsets, torch.tensor(lengths), dim, columns * dim,
                               kv_heads, new_k, new_v)
    assert got.dtype == dtype
    assert torch.equal(k[:, :, -1], new_k.to(kv_dtype))
    assert torch.equal(v[:, :, -1], new_v.to(kv_dtype))
    keys = [k[r, :, columns - n :].transpose(0, 1).double() for r, n in enumerate(lengths)]
    values = [v[r, :, columns - n :].transpose(0, 1).double() for r, n in enumerate(lengths)]
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(got.double(), reference(q.double(), keys, values), rtol=rtol,
                               atol=atol)


def test_a_cache_dtype_the_kernel_does_not_take_is_refused() -> None:
    kernel = load_native_kernel()
    q, k = torch.zeros(1, 2, 8, dtype=torch.bfloat16), torch.zeros(1, 1, 4, 8, dtype=torch.half)
    with pytest.raises(RuntimeError, match="bfloat16 or float16 under a float32"):
        kernel(q, k, k.clone(), torch.tensor([0]), torch.tensor([4]), 8, 32, 1)
    with pytest.raises(RuntimeError, match="share q's dtype"):
        kernel(q.float(), k.float(), k.clone(), torch.tensor([0]), torch.tensor([4]), 8, 32, 1)


def test_a_malformed_append_is_refused() -> None:
    kernel = load_native_kernel()
    k, v = torch.zeros(2, 1, 4, 8), torch.zeros(2, 1, 4, 8)
    q, new = torch.zeros(2, 2, 8), torch.zeros(2, 1, 8)
    args = (q, k, v, torch.tensor([0, 32]), torch.tensor([4, 4]), 8, 32, 1)
    with pytest.raises(RuntimeError, match="go together"):
        kernel(*args, new_k=new)
    with pytest.raises(RuntimeError, match="kv_heads, D"):
        kernel(*args, torch.zeros(2, 2, 8), torch.zeros(2, 2, 8))
    with pytest.raises(RuntimeError, match="dtype"):
        kernel(*args, new.double(), new.double())
    with pytest.raises(RuntimeError, match="KV storage"):
        kernel(*args, new, v[:, :, 0])  # a view into the cache it writes


def test_large_scores_do_not_overflow() -> None:
    """Scores in the hundreds: the max is subtracted before the exponential."""
    q = torch.full((1, 2, 64), 3.0)
    k = torch.randn(1, 1, 50, 64) * 4
    v = torch.randn(1, 1, 50, 64)
    got = load_native_kernel()(q, k, v, torch.tensor([0]), torch.tensor([50]), 64, 50 * 64, 1)
    want = reference(q, [k[0].transpose(0, 1)], [v[0].transpose(0, 1)])
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_reads_outside_the_storage_are_refused() -> None:
    kernel = load_native_kernel()
    k = torch.zeros(10, 2, 8)
    q = torch.zeros(1, 2, 8)
    with pytest.raises(RuntimeError, match="reads outside"):
        kernel(q, k, k, torch.tensor([8 * 16]), torch.tensor([5]), 16, 8, 2)
    with pytest.raises(RuntimeError, match="int64"):
        kernel(q, k, k, torch.tensor([0], dtype=torch.int32), torch.tensor([1]), 16, 8, 2)
    with pytest.raises(RuntimeError, match="reads outside"):
        kernel(q, k, k, torch.tensor([0]), torch.tensor([0]), 16, 8, 2)  # no key at all


def test_auto_takes_the_kernel_for_every_float_dtype_on_cpu_and_sdpa_elsewhere() -> None:
    cpu = torch.device("cpu")
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        choice = choose_attention_backend("auto", cpu, dtype)
        assert choice.backend == "native" and choice.kernel is not None
        assert str(dtype).removeprefix("torch.") in choice.reason
    cuda = choose_attention_backend("auto", torch.device("cuda"), torch.bfloat16)
    assert cuda.backend == "sdpa" and "cuda" in cuda.reason and cuda.kernel is None
    assert choose_attention_backend("sdpa", cpu, torch.float32).kernel is None
    with pytest.raises(ValueError, match="native kernel runs on CPU, not torch.float32 on cuda"):
        choose_attention_backend("native", torch.device("cuda"), torch.float32)
    with pytest.raises(ValueError, match="expected one of auto, sdpa, native"):
        choose_attention_backend("flash", cpu, torch.float32)


def test_a_kernel_that_cannot_be_built_falls_back_or_fails_clearly(monkeypatch, caplog) -> None:
    def no_compiler() -> None:
        raise NativeKernelUnavailable("RuntimeError: Error building extension (no c++)")

    monkeypatch.setattr(attention_kernels, "load_native_kernel", no_compiler)
    with caplog.at_level(logging.WARNING, logger="runtime.attention_kernels"):
        choice = choose_attention_backend("auto", torch.device("cpu"), torch.float32)
    assert choice.backend == "sdpa" and "no c++" in choice.reason
    assert "could not be built" in caplog.text
    with pytest.raises(ValueError, match=r"native: the kernel could not be built .*no c\+\+"):
        choose_attention_backend("native", torch.device("cpu"), torch.float32)


def test_the_build_targets_this_cpu(monkeypatch) -> None:
    from runtime import hardware

    info = hardware.cpu_info()
    avx2 = hardware.CpuInfo(info.model_name, frozenset({"avx2", "fma", "f16c"}), 2)
    monkeypatch.setattr(attention_kernels, "cpu_info", lambda: avx2)
    assert attention_kernels.instruction_set() == ("avx2", ["-mavx2", "-mfma", "-mf16c"])
    avx512 = hardware.CpuInfo(info.model_name, frozenset({"avx2", "fma", "f16c", "avx512f"}), 2)
    monkeypatch.setattr(attention_kernels, "cpu_info", lambda: avx512)
    assert attention_kernels.instruction_set() == (
        "avx512", ["-mavx2", "-mfma", "-mf16c", "-mavx512f"])
    bf16 = hardware.CpuInfo(info.model_name, avx512.flags | {"avx512bw", "avx512vl",
                                                             "avx512_bf16"}, 2)
    monkeypatch.setattr(attention_kernels, "cpu_info", lambda: bf16)
    assert attention_kernels.instruction_set() == (
        "avx512bf16",
        ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"])
    plain = hardware.CpuInfo(info.model_name, frozenset({"sse4_2"}), 2)
    monkeypatch.setattr(attention_kernels, "cpu_info", lambda: plain)
    assert attention_kernels.instruction_set() == ("generic", [])


def test_config_validates_the_backend() -> None:
    assert build_config(overrides={"attention_backend": "sdpa"}).attention_backend == "sdpa"
    with pytest.raises(ConfigError, match="attention_backend"):
        build_config(overrides={"attention_backend": "flash"})


@pytest.mark.parametrize("scheduler", ["baton", "orca", "static"])
def test_both_backends_give_the_same_tokens(model, scheduler: str) -> None:
    """float64: the kernel and SDPA agree on every greedy token of a random mix."""
    from runtime.plugins import instantiate_scheduler
    from runtime.testing import run_mix

    arrivals = random_arrivals(3, num_requests=10, vocab_size=128, prompt_len=(1, 30),
                               max_tokens=(2, 10), max_arrival_step=6, abort_fraction=0.0)
    runs = [run_mix(model, lambda: instantiate_scheduler(scheduler, {}), arrivals,
                    max_num_seqs=6, attention_backend=backend)[0].tokens
            for backend in ("native", "sdpa")]
    assert runs[0] == runs[1]
    check_scheduling_invariance(model, lambda: instantiate_scheduler(scheduler, {}), arrivals,
                                max_num_seqs=6, attention_backend="native")


def test_static_decode_reads_each_rows_keys_from_its_first_real_column(model) -> None:
    """The static batch still computes every row (finished ones too) but, with the kernel,
    skips each row's left padding: computed pairs are the keys from each row's first real
    column to the one the pass appends."""
    from static_plugin import StaticScheduler

    from runtime.testing import greedy, make_engine

    engines = {b: make_engine(model, StaticScheduler(), "static", attention_backend=b)
               for b in ("native", "sdpa")}
    passes = {}
    for backend, engine in engines.items():
        engine.add_request([1, 2, 3], greedy(4))
        engine.add_request(list(range(1, 8)), greedy(2))
        engine.step()  # the padded prefill: width 7, the short prompt left-padded by 4
        engine.step()
        engine.step()  # the 7-token row has finished; it is still computed
        passes[backend] = engine.last_step.passes[0]
    native, sdpa = passes["native"], passes["sdpa"]
    assert native.useful_attention_pairs == sdpa.useful_attention_pairs == 3 + 2
    assert native.computed_attention_pairs == (3 + 2) + (7 + 2)  # keys 0..8, row 0 from 4
    assert sdpa.computed_attention_pairs == 2 * 9  # both rows over the padded window


@pytest.mark.parametrize("scheduler", ["baton", "orca", "static"])
def test_a_bfloat16_model_decodes_through_the_kernel(scheduler: str) -> None:
    """bfloat16 on CPU: `auto` picks the kernel, which every layout calls, and the greedy
    tokens agree with SDPA's. Not bit for bit: the two round differently (the kernel's float32
    arithmetic is the closer of the two, see above), so a near tie may flip a token on some
    CPU and the rest of that request with it; a wrong key or position would disagree from the
    first decode token on. Counted: tokens before each request's first disagreement (all 65
    here on an AVX2 host)."""
    from runtime.plugins import instantiate_scheduler
    from runtime.testing import run_mix, tiny_model

    model = tiny_model(seed=0, dtype=torch.bfloat16)
    arrivals = random_arrivals(4, num_requests=8, vocab_size=128, prompt_len=(1, 24),
                               max_tokens=(4, 12), max_arrival_step=5)
    runs = {}
    for backend in ("auto", "sdpa"):
        result, engine = run_mix(model, lambda: instantiate_scheduler(scheduler, {}), arrivals,
                                 max_num_seqs=4, attention_backend=backend)
        assert engine.kv_cache.decode_kernel is not None if backend == "auto" else True
        runs[backend] = result.tokens
    total = agreeing = 0
    for i, native in runs["auto"].items():
        sdpa = runs["sdpa"][i]
        total += len(native)
        pairs = enumerate(zip(native, sdpa, strict=True))
        agreeing += next((j for j, (a, b) in pairs if a != b), len(native))
    assert agreeing >= 0.75 * total, f"{agreeing} of {total} tokens agree"


def test_a_lock_left_by_a_killed_build_does_not_hang_the_next_load():
    """torch's build waits forever on a `lock` file; one left by a killed process is cleared."""
    import subprocess
    import sys
    from pathlib import Path

    from torch.utils.cpp_extension import _get_build_directory

    isa, _ = attention_kernels.instruction_set()
    lock = Path(_get_build_directory(f"baton_kernels_{isa}", verbose=False)) / "lock"
    lock.touch()  # as a build killed while it held the directory leaves it
    code = ("from runtime.attention_kernels import load_native_kernel; "
            "load_native_kernel(); print('loaded')")
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=90)
        left = lock.exists()
    finally:
        lock.unlink(missing_ok=True)
    assert done.returncode == 0 and "loaded" in done.stdout, done.stderr[-2000:]
    assert "left by a kernel build that was killed" in done.stderr
    assert not left
