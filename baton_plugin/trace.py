"""A picture of the BATON cache (buckets, windows, padding masks, positions), and the worked
example of docs/baton.md generated from the real code:

    .venv/bin/python -m baton_plugin.trace
"""

from __future__ import annotations

from baton_plugin.cache import BatonCache
from runtime.api import PassStats


def render(cache: BatonCache) -> str:
    """Per bucket: its rows and window; per row its request, keys, next position and mask."""
    head = f"{cache.num_rows} of {cache.max_rows} rows, {cache.columns} columns"
    if not cache.num_rows:
        return head + ": empty"
    lines = [head]
    for i, bucket in enumerate(cache.buckets):
        lines.append(f"bucket {i}: rows [{bucket.first}, {bucket.stop}), window "
                     f"[{bucket.start}, {bucket.end})")
        lines.append("  row  request  keys  next pos  padding mask (B x S)")
        mask = cache.padding_mask(bucket).tolist()
        for j, req in enumerate(bucket.rows):
            cells = "".join("#" if m else "." for m in mask[j])
            n = bucket.lengths[j]
            lines.append(f"  {bucket.first + j:>3}  {req.request_id:>7}  {n:>4}  {n:>8}  {cells}")
    return "\n".join(lines)


def describe_pass(p: PassStats) -> str:
    return (
        f"{p.phase.value:>7} pass: {p.num_requests} request(s), token slots "
        f"{p.useful_tokens}/{p.computed_tokens} useful, attention pairs "
        f"{p.useful_attention_pairs}/{p.computed_attention_pairs} useful"
    )


def worked_example(max_buckets: int = 2) -> str:
    """A and B decoding; C (short), D (equal to B) and E (long) arrive; E and A leave.

    Attention through SDPA, as in the paper: each bucket's window is attended whole, the pad
    columns hidden by the mask (the native decode kernel reads real keys only).
    """
    from baton_plugin.scheduler import BatonScheduler
    from runtime.api import SamplingParams
    from runtime.testing import make_engine, tiny_model

    scheduler = BatonScheduler(max_buckets=max_buckets)
    engine = make_engine(tiny_model(seed=0), scheduler, "baton", max_num_seqs=6,
                         attention_backend="sdpa")
    cache: BatonCache = engine.kv_cache

    def params(n: int) -> SamplingParams:
        return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)

    arrivals = {
        1: [("A", 4, 5), ("B", 6, 8)],
        2: [("C", 3, 6)],
        3: [("D", 8, 6), ("E", 19, 2)],
    }
    out: list[str] = []
    for step in range(1, 6):
        names = []
        for rid, prompt_len, max_tokens in arrivals.get(step, []):
            engine.add_request(list(range(1, prompt_len + 1)), params(max_tokens), rid)
            names.append(f"{rid} (prompt {prompt_len}, max_tokens {max_tokens})")
        out.append(f"## step {step}" + (f": {', '.join(names)} arrive" if names else ""))
        outputs = engine.step()
        out += [describe_pass(p) for p in engine.last_step.passes]
        done = [o.request.request_id for o in outputs if o.finished]
        if done:
            out.append(f"finished and removed: {', '.join(done)}")
        out += ["at the end of the step:", render(cache), ""]
    return "\n".join(out)


if __name__ == "__main__":
    print(worked_example())
