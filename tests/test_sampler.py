"""Sampler: greedy, filters, seeded determinism across batch mixes, distribution, stop tokens."""

from __future__ import annotations

import math

import pytest
import torch

from runtime.request import Request
from runtime.sampler import apply_top_k_top_p, row_argmax, sample
from runtime.sampling_params import SamplingParams

V = 1000


def _req(i: int = 0, **kw) -> Request:
    return Request(f"r{i}", [1, 2, 3], SamplingParams(**kw))


def _logits(m: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (torch.randn(m, V, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_greedy_is_exact_argmax(dtype: torch.dtype) -> None:
    logits = _logits(6, dtype=dtype)
    out = sample(logits, [_req(i, temperature=0.0) for i in range(6)])
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 6


def test_greedy_rows_exact_in_a_mixed_batch() -> None:
    logits = _logits(4, dtype=torch.float64)
    logits[1, 7] = logits[1].max() + 1e-12  # float32 would tie this; the logits' dtype decides
    reqs = [_req(0), _req(1, temperature=0.0), _req(2, top_k=5), _req(3, temperature=0.0)]
    out = sample(logits, reqs)
    assert out.token_ids[1] == 7
    assert out.token_ids[3] == logits[3].argmax().item()


@pytest.mark.parametrize(
    "kw", [{"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}, {"top_k": 1, "top_p": 0.5}]
)
def test_filters_that_leave_one_token_are_greedy(kw: dict) -> None:
    logits = _logits(8, seed=1)
    reqs = [_req(i, temperature=1.5, **kw) for i in range(8)]
    for _ in range(3):
        assert sample(logits, reqs).token_ids == logits.argmax(-1).tolist()


def test_top_k_keeps_only_k_best() -> None:
    logits = _logits(3, seed=2)
    reqs = [_req(i, top_k=5, temperature=2.0) for i in range(3)]
    allowed = logits.topk(5, dim=-1).indices
    for _ in range(20):
        for row, t in enumerate(sample(logits, reqs).token_ids):
            assert t in allowed[row].tolist()


def test_top_k_top_p_per_row_masks() -> None:
    x = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]]))
    out = apply_top_k_top_p(x, [0, 2], [0.7, 1.0])
    # row 0: nucleus 0.7 needs {0.5, 0.3}; row 1: top-2 only
    assert torch.isfinite(out).tolist() == [[True, True, False, False], [True, True, False, False]]
    out = apply_top_k_top_p(x, [-1, 3], [0.75, 1.0])
    assert torch.isfinite(out).tolist() == [[True, True, False, False], [True, True, True, False]]
    assert torch.equal(out[1, :3], x[1, :3])
    # top-p applies to the distribution renormalised over the top k: 0.5/0.8 < 0.7
    out = apply_top_k_top_p(x[:1], [2], [0.7])
    assert torch.isfinite(out).tolist() == [[True, True, False, False]]


def _reference_mask(row: torch.Tensor, k: int, p: float) -> torch.Tensor:
    """Textbook top-k then top-p on one row with a full sort."""
    vals, order = row.sort(descending=True)
    if 0 < k < row.numel():
        vals = vals.clone()
        vals[k:] = float("-inf")
    probs = torch.softmax(vals.double(), dim=-1)
    before = torch.cumsum(probs, 0) - probs
    keep = (before < p) & torch.isfinite(vals)
    keep[0] = True
    return torch.zeros_like(keep).scatter(0, order, keep)


@pytest.mark.parametrize("scale", [0.05, 1.0, 8.0])  # near-uniform rows need the full sort
def test_top_k_top_p_match_reference(scale: float) -> None:
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(6, 6000, generator=gen) * scale
    ks, ps = [0, 40, 5000, -1, 1, 300], [0.9, 0.5, 0.95, 1.0, 0.3, 0.99]
    out = apply_top_k_top_p(x, ks, ps)
    for i in range(6):
        assert torch.equal(torch.isfinite(out[i]), _reference_mask(x[i], ks[i], ps[i])), i


def test_min_p_filters_unlikely_tokens() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = torch.log(probs).repeat(2000, 1)
    reqs = [_req(i, min_p=0.25) for i in range(2000)]  # keep p >= 0.125
    counts = torch.bincount(torch.tensor(sample(logits, reqs).token_ids), minlength=4)
    assert counts[3] == 0 and counts[2] > 0


def test_distribution_matches_softmax() -> None:
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    temperature = 0.7
    n = 20000
    logits = (torch.log(probs) * temperature).repeat(n, 1)  # softmax(logits / T) == probs
    gen = torch.Generator().manual_seed(123)
    out = sample(logits, [_req(i, temperature=temperature) for i in range(n)], generator=gen)
    freq = torch.bincount(torch.tensor(out.token_ids), minlength=4).double() / n
    assert torch.allclose(freq, probs.double(), atol=0.02), freq


def test_top_p_renormalises() -> None:
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    n = 20000
    logits = torch.log(probs).repeat(n, 1)
    gen = torch.Generator().manual_seed(7)
    out = sample(logits, [_req(i, top_p=0.6) for i in range(n)], generator=gen)
    freq = torch.bincount(torch.tensor(out.token_ids), minlength=4).double() / n
    assert torch.allclose(freq, torch.tensor([0, 0, 3 / 7, 4 / 7]).double(), atol=0.02), freq


@pytest.mark.parametrize(
    "kw",
    [
        {"seed": 1234, "temperature": 0.9, "top_p": 0.95, "top_k": 50, "min_p": 0.01},
        {"seed": 5, "temperature": 1.0},  # no filters itself, filters on for other rows
    ],
)
def test_seed_is_independent_of_batch_composition(kw: dict) -> None:
    alone, batched = _req(0, **kw), _req(0, **kw)
    others = [
        _req(1, temperature=1.3),
        _req(2, seed=99, temperature=0.5),
        _req(3, temperature=0.0),
        _req(4, top_k=3, logprobs=2),
    ]
    tokens_alone, tokens_batched = [], []
    for step in range(6):
        row = _logits(1, seed=100 + step)
        tokens_alone += sample(row, [alone]).token_ids
        batch = torch.cat([_logits(2, seed=200 + step), row, _logits(2, seed=300 + step)])
        reqs = [others[0], others[1], batched, others[2], others[3]]
        tokens_batched.append(sample(batch, reqs).token_ids[2])
    assert tokens_alone == tokens_batched
    assert len(set(tokens_alone)) > 1  # it really sampled


def test_unseeded_rows_use_given_generator() -> None:
    logits = _logits(4, seed=5)
    reqs = [_req(i, temperature=1.0) for i in range(4)]
    a = sample(logits, reqs, generator=torch.Generator().manual_seed(1)).token_ids
    b = sample(logits, reqs, generator=torch.Generator().manual_seed(1)).token_ids
    assert a == b


def test_logprobs_are_raw_log_softmax() -> None:
    logits = _logits(3, seed=9, dtype=torch.float64)
    reqs = [_req(0, logprobs=3, temperature=0.5), _req(1), _req(2, logprobs=0, temperature=0.0)]
    out = sample(logits, reqs)
    lp = torch.log_softmax(logits.float(), dim=-1)
    assert out.logprobs[1] is None
    first = out.logprobs[0]
    assert math.isclose(first["token_logprob"], lp[0, out.token_ids[0]].item(), rel_tol=1e-6)
    top_ids = [t for t, _ in first["top"]]
    assert top_ids == lp[0].topk(3).indices.tolist()
    assert out.logprobs[2] == {"token_logprob": pytest.approx(lp[2].max().item()), "top": []}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_seeded_matches_across_batches() -> None:
    kw = {"seed": 7, "temperature": 1.0, "top_p": 0.9}
    a, b = _req(0, **kw), _req(0, **kw)
    row = _logits(1).cuda()
    batch = torch.cat([_logits(3, seed=4).cuda(), row])
    others = [_req(1), _req(2, temperature=0.0), _req(3, seed=3)]
    for _ in range(3):
        assert sample(row, [a]).token_ids == sample(batch, [*others, b]).token_ids[-1:]
    assert a.generator.device.type == "cuda"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("width", [49152, 1000, 256, 7])
def test_row_argmax_is_torch_argmax(dtype: torch.dtype, width: int) -> None:
    """The blocked argmax gives torch's indices: the first maximum, NaN as the maximum,
    ties across and inside blocks, rows of -inf, widths no block divides; 16-bit rows widened
    (9 rows) or not (one row)."""
    gen = torch.Generator().manual_seed(width)
    x = torch.randn(9, width, generator=gen).to(dtype)
    x[1] = 0.0  # every entry ties: index 0
    x[2] = float("-inf")
    x[3, width // 2] = x[3, width - 1] = 50.0  # a tie in different blocks
    x[4, 1] = x[4, 2] = 50.0  # a tie inside one block
    x[5, width - 1] = float("nan")
    x[6, width // 3] = float("nan")
    x[6, width - 1] = float("nan")
    x[7, width - 1] = 50.0  # the last column
    assert torch.equal(row_argmax(x), x.argmax(dim=-1))
    for i in range(8):  # one row at a time: below WIDEN_ARGMAX_ROWS
        assert torch.equal(row_argmax(x[i : i + 1]), x[i : i + 1].argmax(dim=-1))
    strided = x.t().contiguous().t()  # a non-contiguous view of the same values
    assert torch.equal(row_argmax(strided), x.argmax(dim=-1))
    assert row_argmax(x[:0]).shape == (0,)
