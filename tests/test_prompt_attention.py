"""The prompt (prefill) kernel against SDPA, its invariances, and its use by every layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from runtime.attention_kernels import load_native_kernel
from runtime.testing import random_arrivals

pytestmark = pytest.mark.usefixtures("native_kernel")


@pytest.fixture(scope="module")
def kernel():
    kernel = load_native_kernel()
    if kernel._prompt_op is None:
        pytest.skip("the prompt kernel needs AVX2 and FMA")
    return kernel


def reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, past: int):
    """float64 SDPA of queries `(n, H, D)` at positions `past..` over keys `(S, H_kv, D)`."""
    n, s = q.shape[0], keys.shape[0]
    mask = torch.arange(s)[None, :] <= torch.arange(n)[:, None] + past
    out = F.scaled_dot_product_attention(
        q.double().transpose(0, 1)[None], keys.double().transpose(0, 1)[None],
        values.double().transpose(0, 1)[None], attn_mask=mask, enable_gqa=True)
    return out[0].transpose(0, 1)


def staged(lengths, pasts, heads, kv_heads, dim, seed=0):
    """Queries packed from row 2, keys and values packed token-major `(N, H_kv, D)` from
    token 5, and the kernel's segments for them."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lengths) + 4, heads, dim, generator=gen)
    total = sum(n + p for n, p in zip(lengths, pasts, strict=True)) + 10
    k = torch.randn(total, kv_heads, dim, generator=gen)
    v = torch.randn(total, kv_heads, dim, generator=gen)
    segments, row, token = [], 2, 5
    for n, p in zip(lengths, pasts, strict=True):
        segments.append([row, n, p, token * kv_heads * dim])
        row, token = row + n, token + n + p
    return q, k, v, torch.tensor(segments)


SHAPES = [(9, 3, 64), (8, 2, 128), (4, 4, 16), (14, 2, 32), (8, 8, 48)]  # group 1, 2, 3, 7


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), SHAPES)
def test_packed_prompts_match_sdpa(kernel, heads, kv_heads, dim) -> None:
    """New prompts (past 0) and resumed ones (past > 0) of lengths around the 6-row tile
    and the 16-key panel, each over its own keys only."""
    lengths, pasts = [1, 5, 16, 17, 100, 37, 2], [0, 0, 3, 0, 20, 7, 40]
    q, k, v, segments = staged(lengths, pasts, heads, kv_heads, dim)
    out = kernel.prompts(q, k, v, segments, kv_heads * dim, dim, kv_heads)
    assert out.shape == (sum(lengths), heads, dim)
    row = 0
    for q_row, n, past, offset in segments.tolist():
        first = offset // (kv_heads * dim)
        want = reference(q[q_row:q_row + n], k[first:first + past + n],
                         v[first:first + past + n], past)
        torch.testing.assert_close(out[row:row + n].double(), want, rtol=2e-6, atol=2e-6)
        row += n


def bfloat16_dot_products(kernel, dim: int) -> bool:
    """Whether bfloat16 prompts of this head size run on AVX-512 BF16's `vdpbf16ps`."""
    return kernel.isa == "avx512bf16" and dim % 32 == 0


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [*SHAPES[:3], (14, 2, 32)])
def test_bfloat16_prompts_are_as_close_to_exact_as_torchs_bfloat16_sdpa(kernel, heads, kv_heads,
                                                                          dim) -> None:
    """bfloat16 inputs, float32 arithmetic. Widened (AVX2, or a head size that is not a
    multiple of 32): the float32 kernel's output on the same inputs, rounded to bfloat16 once.
    On AVX-512 BF16's dot products: the probabilities rounded to bfloat16 before they weight
    the values, as torch's bfloat16 flash kernel does. Either way within one bfloat16 rounding
    of the exact attention, and no further from it than torch's bfloat16 SDPA."""
    lengths, pasts = [1, 5, 16, 17, 100, 37, 2], [0, 0, 3, 0, 20, 7, 40]
    q, k, v, segments = staged(lengths, pasts, heads, kv_heads, dim, seed=4)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    out = kernel.prompts(q, k, v, segments, kv_heads * dim, dim, kv_heads)
    assert out.dtype == torch.bfloat16 and out.shape == (sum(lengths), heads, dim)
    wide = kernel.prompts(q.float(), k.float(), v.float(), segments, kv_heads * dim, dim,
                          kv_heads)
    assert torch.equal(out, wide.bfloat16()) != bfloat16_dot_products(kernel, dim)
    row, ours, theirs = 0, 0.0, 0.0
    for q_row, n, past, offset in segments.tolist():
        first = offset // (kv_heads * dim)
        keys, values = k[first:first + past + n], v[first:first + past + n]
        exact = reference(q[q_row:q_row + n], keys, values, past)
        torch.testing.assert_close(out[row:row + n].double(), exact, rtol=8e-3, atol=8e-3)
        mask = torch.arange(past + n)[None, :] <= torch.arange(n)[:, None] + past
        sdpa = F.scaled_dot_product_attention(
            q[q_row:q_row + n].transpose(0, 1)[None], keys.transpose(0, 1)[None],
            values.transpose(0, 1)[None], attn_mask=mask, enable_gqa=True)[0].transpose(0, 1)
        ours += (out[row:row + n].double() - exact).abs().sum().item()
        theirs += (sdpa.double() - exact).abs().sum().item()
        row += n
    assert ours <= theirs * 1.02, (ours, theirs)


def test_a_head_major_pool_and_strided_views(kernel) -> None:
    """Orca's pool `(H_kv, capacity, D)` read in place, and `segment` on a strided view."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(50, 9, 64, generator=gen)
    pool_k = torch.randn(3, 300, 64, generator=gen)
    pool_v = torch.randn(3, 300, 64, generator=gen)
    want = reference(q, pool_k[:, 7:67].transpose(0, 1), pool_v[:, 7:67].transpose(0, 1), 10)
    out = kernel.prompts(q, pool_k, pool_v, torch.tensor([[0, 50, 10, 7 * 64]]), 64, 300 * 64, 3)
    torch.testing.assert_close(out.double(), want, rtol=2e-6, atol=2e-6)
    view = kernel.segment(q, pool_k[:, 7:67].transpose(0, 1), pool_v[:, 7:67].transpose(0, 1),
                          10)
    assert torch.equal(view, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_prompt_is_computed_the_same_alone_batched_resumed_and_on_any_threads(kernel,
                                                                                dtype) -> None:
    """Bit for bit: a row's arithmetic does not depend on the tile, the thread, the other
    segments of the call, or where its prompt was cut into passes (odd cuts too: bfloat16's
    dot products take keys in pairs)."""
    lengths, pasts = [40, 23, 71], [0, 0, 0]
    q, k, v, segments = staged(lengths, pasts, 9, 3, 64, seed=2)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    batched = kernel.prompts(q, k, v, segments, 192, 64, 3)
    alone = kernel.prompts(q, k, v, segments[2:], 192, 64, 3)
    assert torch.equal(batched[63:], alone)
    q_row, n, _, offset = segments[2].tolist()  # the third prompt cut: a resumed pass
    for cut in (30, 33):
        tail = kernel.prompts(q, k, v, torch.tensor([[q_row + cut, n - cut, cut, offset]]), 192,
                              64, 3)
        assert torch.equal(tail, alone[cut:])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(kernel.prompts(q, k, v, segments, 192, 64, 3), batched)
    finally:
        torch.set_num_threads(threads)


def test_large_scores_do_not_overflow(kernel) -> None:
    q, k, v, segments = staged([33], [0], 4, 2, 32, seed=3)
    q, k = q * 300, k * 300
    out = kernel.prompts(q, k, v, segments, 64, 32, 2)
    assert torch.isfinite(out).all()
    want = reference(q[2:35], k[5:38], v[5:38], 0)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_what_the_kernel_cannot_take_is_refused_or_left_to_sdpa(kernel) -> None:
    q, k, v, segments = staged([10], [0], 4, 2, 32)
    with pytest.raises(RuntimeError, match="segment 0 reads outside the KV storage"):
        kernel.prompts(q, k[:10].clone(), v[:10].clone(), segments, 64, 32, 2)
    with pytest.raises(RuntimeError, match="segment 0 has bad rows"):
        kernel.prompts(q[:5], k, v, segments, 64, 32, 2)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        kernel.prompts(q[..., :24], k[..., :24], v[..., :24], segments, 48, 24, 2)
    assert kernel.attends_prompts(q, k)
    assert not kernel.attends_prompts(q.double(), k.double())
    assert kernel.attends_prompts(q.bfloat16(), k.bfloat16())
    assert not kernel.attends_prompts(q.half(), k.half())
    assert not kernel.attends_prompts(q, k.bfloat16())  # a 16-bit cache: SDPA widens it
    assert not kernel.attends_prompts(q[..., :24], k[..., :24])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheduler", ["baton", "orca", "orca-loop", "default"])
def test_every_layout_prefills_prompts_through_the_kernel(kernel, monkeypatch, scheduler,
                                                          dtype) -> None:
    """float32 and bfloat16 on CPU: BATON's staging, Orca's pool (the literal loop's
    initiations too) and the default slabs all call the prompt kernel, and the greedy tokens
    agree with SDPA's.
    Not bit for bit: the two round differently, so a near tie could flip a token and the rest
    of its request; a wrong key or position would disagree from the first token on."""
    from runtime.attention_kernels import DecodeKernel
    from runtime.plugins import instantiate_scheduler
    from runtime.testing import run_mix, tiny_model

    calls = []
    original = DecodeKernel.prompts
    monkeypatch.setattr(DecodeKernel, "prompts",
                        lambda self, *a: calls.append(1) or original(self, *a))
    name, options = {"orca-loop": ("orca", {"attention": "loop"}),
                     "default": (None, {})}.get(scheduler, (scheduler, {}))
    factory = (lambda: None) if name is None else (lambda: instantiate_scheduler(name, options))
    model = tiny_model(seed=0, dtype=dtype, hidden_size=96, num_attention_heads=6,
                       intermediate_size=128)  # head size 16, GQA groups of 3
    arrivals = random_arrivals(5, num_requests=8, vocab_size=128, prompt_len=(2, 40),
                               max_tokens=(3, 10), max_arrival_step=5, abort_fraction=0.0)
    runs = {}
    for backend in ("auto", "sdpa"):
        calls.clear()
        runs[backend] = run_mix(model, factory, arrivals, max_num_seqs=4,
                                attention_backend=backend)[0].tokens
        assert bool(calls) == (backend == "auto")
    total = agreeing = 0
    for i, native in runs["auto"].items():
        pairs = enumerate(zip(native, runs["sdpa"][i], strict=True))
        total += len(native)
        agreeing += next((j for j, (a, b) in pairs if a != b), len(native))
    assert agreeing >= 0.9 * total, f"{agreeing} of {total} tokens agree"
