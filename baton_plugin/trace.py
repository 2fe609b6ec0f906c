"""A picture of the BATON cache (rows, window, padding mask, positions), and the worked example
of docs/baton.md generated from the real code:

    .venv/bin/python -m baton_plugin.trace
"""

from __future__ import annotations

from baton_plugin.cache import BatonCache
from runtime.kv_cache import PassStats


def render(cache: BatonCache) -> str:
    """One line per row: its request, real keys, next position and mask (`.` pad, `#` key)."""
    head = (
        f"window [{cache.start}, {cache.end}) of {cache.k.shape[3]} columns, "
        f"{cache.num_rows} of {cache.k.shape[1]} rows"
    )
    if not cache.num_rows:
        return head + ": empty"
    lines = [head, "row  request  keys  next pos  padding mask (B x S)"]
    mask = cache.padding_mask().tolist()
    for b, req in enumerate(cache.rows):
        cells = "".join("#" if m else "." for m in mask[b])
        lines.append(
            f"{b:>3}  {req.request_id:>7}  {cache.lengths[b]:>4}  {cache.lengths[b]:>8}  {cells}"
        )
    return "\n".join(lines)


def describe_pass(p: PassStats) -> str:
    return (
        f"{p.phase.value:>7} pass: {p.num_requests} row(s), token slots "
        f"{p.useful_tokens}/{p.computed_tokens} useful, attention pairs "
        f"{p.useful_attention_pairs}/{p.computed_attention_pairs} useful"
    )


def worked_example() -> str:
    """A and B decoding; C (shorter), D (equal) and E (longer) arrive; E and A leave."""
    from baton_plugin.scheduler import BatonScheduler
    from runtime.sampling_params import SamplingParams
    from runtime.testing import make_engine, tiny_model

    engine = make_engine(tiny_model(seed=0), BatonScheduler(prefill_pad_tolerance=0.0), "baton")
    cache: BatonCache = engine.kv_cache

    def params(n: int) -> SamplingParams:
        return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)

    arrivals = {
        1: [("A", 4, 4), ("B", 6, 8)],
        2: [("C", 3, 6)],
        3: [("D", 8, 6), ("E", 11, 2)],
    }
    out: list[str] = []
    insert = cache.insert_prefilled

    def insert_and_show(requests, kv) -> None:
        insert(requests, kv)
        out.append(f"after embedding {', '.join(r.request_id for r in requests)}:")
        out.append(render(cache))

    cache.insert_prefilled = insert_and_show
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
