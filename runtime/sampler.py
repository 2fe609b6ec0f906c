"""Token sampling for one step of a batch, vectorised over rows (gpt-fast style).

Order per row, as vLLM: temperature -> min-p -> top-k -> top-p -> draw. Greedy rows
(temperature 0) take the exact argmax of the logits as given. The draw is the exponential race
(`argmax(probs / E)`, `E ~ Exp(1)`), equivalent to sampling from `probs`, with each seeded
row's noise drawn from that request's own generator, so a seed gives the same tokens whatever
the request is batched with (every step is row-local and prefix-stable: bitwise on CPU; on
CUDA up to the kernels' choice of reduction order). Logprobs are the model's raw distribution (`log_softmax` of the
logits before temperature and filtering), vLLM's default `raw_logprobs`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from runtime.request import Request

__all__ = ["SampleResult", "get_generator", "row_argmax", "sample"]

ARGMAX_BLOCKS = (256, 128, 64)  # block widths `row_argmax` tries, widest first
WIDEN_ARGMAX_ROWS = 8  # 16-bit logits of this many rows or more are widened first


def row_argmax(x: Tensor) -> Tensor:
    """`x.argmax(dim=-1)` of a 2-D tensor, the same indices (the first maximum; NaN counts as
    the maximum, as in torch), faster on CPU.

    Why: torch's CPU argmax over a row is a scalar loop on one thread: 1.8 ms for 32 rows of a
    49k vocabulary on a 2-core AVX2 host, 1.7% of a compiled decode step. `amax` is vectorised
    and threaded, so the row is cut into blocks: the block maxima (vectorised), the first block
    holding the row's maximum (a short argmax), then the argmax inside that block. The first
    maximum of the row lies in the first block whose maximum equals it, so the result is exact
    (0.2 ms for the 32 rows). Other devices, or a vocabulary no block width divides: torch's.

    16-bit logits of `WIDEN_ARGMAX_ROWS` rows or more are widened to float32 first, which is
    exact and keeps their order (NaN too): torch's bfloat16 `amax` ran about 6x slower than its
    float32 one, so 32-64 rows took 1.8-1.9x less time widened (0.49 against 0.93 ms for 64
    rows on a 2-core Zen 4); one row took 11 us more.
    """
    rows, width = x.shape
    block = next((b for b in ARGMAX_BLOCKS if width % b == 0 and width > b), None)
    if x.device.type != "cpu" or block is None or rows == 0:
        return x.argmax(dim=-1)
    if x.dtype.itemsize == 2 and rows >= WIDEN_ARGMAX_ROWS:
        x = x.float()
    blocks = x.reshape(rows, width // block, block)  # a view unless x is strided
    first = blocks.amax(dim=-1).argmax(dim=-1)  # (rows,) first block holding the maximum
    inner = blocks[torch.arange(rows, device=x.device), first].argmax(dim=-1)
    return first * block + inner


@dataclass(frozen=True, slots=True)
class SampleResult:
    """One token per row; `logprobs[i]` is None unless request i asked for logprobs.

    A logprobs entry is `{"token_logprob": float, "top": [(token_id, logprob), ...]}` with
    `params.logprobs` entries, most likely first.
    """

    token_ids: list[int]
    logprobs: list[dict | None]


def get_generator(request: Request, device: torch.device) -> torch.Generator | None:
    """The request's own generator (created on first use from `params.seed`), or None."""
    seed = request.params.seed
    if seed is None:
        return None
    if request.generator is None:
        request.generator = torch.Generator(device=device)
        request.generator.manual_seed(seed)
    return request.generator


@torch.no_grad()
def sample(
    logits: Tensor, requests: Sequence[Request], generator: torch.Generator | None = None
) -> SampleResult:
    """Pick the next token of each row of `logits` [M, V] for `requests[i]` (row i).

    `generator` draws the noise of unseeded rows (torch's default generator when None).
    """
    if logits.dim() != 2 or logits.shape[0] != len(requests):
        raise ValueError(f"logits {tuple(logits.shape)} do not match {len(requests)} requests")
    params = [r.params for r in requests]
    device = logits.device
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if not random_rows:
        tokens = row_argmax(logits)
    elif len(random_rows) == len(requests):
        tokens = _sample_rows(logits, requests, generator)
    else:  # mixed: argmax everywhere, then overwrite the sampled rows
        idx = torch.tensor(random_rows, device=device)
        picked = _sample_rows(
            logits.index_select(0, idx), [requests[i] for i in random_rows], generator
        )
        tokens = row_argmax(logits).index_copy_(0, idx, picked)
    token_ids: list[int] = tokens.tolist()
    logprobs: list[dict | None] = [None] * len(requests)
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if rows:
        _fill_logprobs(logprobs, logits, tokens, rows, [params[i].logprobs for i in rows], device)
    return SampleResult(token_ids=token_ids, logprobs=logprobs)


def _sample_rows(
    logits: Tensor, requests: Sequence[Request], generator: torch.Generator | None
) -> Tensor:
    """Temperature, filters and the exponential race for rows that all have temperature > 0."""
    device = logits.device
    params = [r.params for r in requests]
    temps = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
    x = logits.to(torch.float32) / temps.unsqueeze(1)  # a new tensor: the caller's is untouched
    if any(p.min_p > 0.0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device)
        x = apply_min_p(x, min_p)
    x = apply_top_k_top_p(x, [p.top_k for p in params], [p.top_p for p in params])
    probs = torch.softmax(x, dim=-1)
    noise = _exponential_noise(probs, requests, generator)
    return row_argmax(probs.div_(noise))


def apply_min_p(x: Tensor, min_p: Tensor) -> Tensor:
    """Drop tokens whose probability is below `min_p[row]` times the row's top probability."""
    probs = torch.softmax(x, dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return x.masked_fill(probs < threshold, float("-inf"))


def apply_top_k_top_p(x: Tensor, top_k: Sequence[int], top_p: Sequence[float]) -> Tensor:
    """Keep each row's `top_k` best tokens, then the smallest set of them whose probability
    (renormalised over the top k) reaches `top_p`. top_k <= 0 or >= V and top_p = 1 are off.

    A full-vocabulary sort costs ~100 ms for 32 x 49152 on this CPU, so rows are cut at a
    threshold found among their best `_NUCLEUS_CANDIDATES` (or top_k) tokens, sorting the
    whole row only when its nucleus is wider. Ties with the threshold are kept, as in vLLM.
    """
    vocab = x.shape[-1]
    ks = [k if 0 < k < vocab else vocab for k in top_k]
    rows = [i for i, (k, p) in enumerate(zip(ks, top_p, strict=True)) if k < vocab or p < 1.0]
    if not rows:
        return x
    cut = torch.full((x.shape[0],), float("-inf"), device=x.device)
    num_candidates = max(ks[i] if ks[i] < vocab else _NUCLEUS_CANDIDATES for i in rows)
    todo = rows
    while todo:
        k = torch.tensor([ks[i] for i in todo], device=x.device)
        p = torch.tensor([top_p[i] for i in todo], dtype=torch.float32, device=x.device)
        idx = torch.tensor(todo, device=x.device)
        thr, complete = _threshold(x.index_select(0, idx), k, p, min(num_candidates, vocab))
        cut.index_copy_(0, idx, thr)
        todo = [i for i, ok in zip(todo, complete.tolist(), strict=True) if not ok]
        num_candidates = vocab  # rows whose nucleus was wider: sort them fully
    return x.masked_fill(x < cut.unsqueeze(1), float("-inf"))


# Candidates searched for a top-p nucleus before falling back to a full sort.
_NUCLEUS_CANDIDATES = 4096


def _threshold(x: Tensor, k: Tensor, p: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Lowest kept logit per row using the `n` best tokens, and whether `n` sufficed.

    Only row-local, prefix-stable operations (softmax, sort, cumsum) so that a row's cut
    does not depend on the other rows of the batch (seeded determinism).
    """
    vocab = x.shape[-1]
    vals, order = x.topk(n, dim=-1) if n < vocab else x.sort(dim=-1, descending=True)
    probs = torch.softmax(x, dim=-1).gather(1, order)  # [rows, n], most likely first
    cum = probs.cumsum(dim=-1)
    in_k = torch.arange(n, device=x.device).unsqueeze(0) < k.unsqueeze(1)
    has_k = k < vocab
    # Mass of the top k (renormalisation after top-k); the whole row when top-k is off.
    kth = (k.clamp(max=n) - 1).unsqueeze(1)
    mass = torch.where(has_k, cum.gather(1, kth).squeeze(1), torch.ones_like(p))
    before = torch.nn.functional.pad(cum[:, :-1], (1, 0))  # mass strictly more likely
    keep = in_k & (before < (p * mass).unsqueeze(1))
    num_keep = keep.sum(dim=-1).clamp(min=1)
    thr = vals.gather(1, (num_keep - 1).unsqueeze(1)).squeeze(1)
    complete = has_k | (num_keep < n) | (n == vocab)
    return thr, complete


def _exponential_noise(
    probs: Tensor, requests: Sequence[Request], generator: torch.Generator | None
) -> Tensor:
    """Exp(1) noise [M, V] as -log(U); a seeded row's noise comes only from its generator.

    `-log(uniform_)` is ~6x faster than `exponential_` on CPU; U in [0, 1) gives noise in
    (0, inf], and an infinite noise only makes that token lose.
    """
    noise = torch.empty_like(probs)
    unseeded = []
    for i, req in enumerate(requests):
        gen = get_generator(req, probs.device)
        if gen is None:
            unseeded.append(i)
        else:
            noise[i].uniform_(generator=gen)
    if len(unseeded) == len(requests):
        noise.uniform_(generator=generator)
    elif unseeded:
        rows = torch.tensor(unseeded, device=probs.device)
        fresh = torch.empty((len(unseeded), probs.shape[1]), device=probs.device)
        noise.index_copy_(0, rows, fresh.uniform_(generator=generator))
    return noise.log_().neg_()


def _fill_logprobs(
    out: list[dict | None],
    logits: Tensor,
    tokens: Tensor,
    rows: list[int],
    counts: list[int],
    device: torch.device,
) -> None:
    """Raw log-softmax logprobs of the sampled token and the top `counts[j]` of each row."""
    idx = torch.tensor(rows, device=device)
    lp = torch.log_softmax(logits.index_select(0, idx).to(torch.float32), dim=-1)
    chosen = lp.gather(1, tokens.index_select(0, idx).unsqueeze(1)).squeeze(1)
    k = min(max(counts), lp.shape[-1])
    top_vals, top_ids = lp.topk(k, dim=-1) if k > 0 else (lp[:, :0], lp[:, :0].long())
    chosen_l, vals_l, ids_l = chosen.tolist(), top_vals.tolist(), top_ids.tolist()
    for j, row in enumerate(rows):
        n = counts[j]
        out[row] = {
            "token_logprob": chosen_l[j],
            "top": list(zip(ids_l[j][:n], vals_l[j][:n], strict=True)),
        }
