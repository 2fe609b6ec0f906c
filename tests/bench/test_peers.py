"""Peer adapters (Hugging Face transformers) replay the same requests on the same folder."""

from __future__ import annotations

import pytest

from runtime.bench.metrics import compute_metrics
from runtime.bench.model_spec import resolve_model
from runtime.bench.peers import PeerUnavailable, make_peer
from runtime.bench.workload import BenchRequest

pytest.importorskip("transformers")

REQUESTS = [
    BenchRequest(0, 0.0, (20, 21, 22, 23), 3),
    BenchRequest(1, 0.0, (24, 25), 5),
    BenchRequest(2, 0.05, (26, 27, 28), 2),
]


@pytest.mark.parametrize("name", ["transformers", "transformers-cb"])
def test_peer_generates_forced_lengths(name, tmp_path, monkeypatch):
    monkeypatch.setenv("BATON_RUNTIME_CACHE", str(tmp_path))
    try:
        peer = make_peer(name, resolve_model("tiny"), max_batch_size=4, max_total_len=64)
    except PeerUnavailable as exc:
        pytest.skip(str(exc))
    trace = peer.run(REQUESTS)
    assert sorted(r.output_len for r in trace.requests) == [2, 3, 5]
    m = compute_metrics(trace)
    assert m["completed"] == 3 and m["total_output_tokens"] == 10
    assert all(len(r.token_times) == r.output_len for r in trace.requests)


def test_unknown_peer_says_which_exist(tmp_path):
    with pytest.raises(PeerUnavailable, match="transformers-cb"):
        make_peer("llama.cpp", tmp_path, 4, 64)


@pytest.mark.parametrize("name", ["transformers", "transformers-cb"])
def test_peer_runs_in_the_contenders_dtype(name, tmp_path, monkeypatch):
    """A peer compared in float64 (or bfloat16) runs in it too, not in float32."""
    import torch

    monkeypatch.setenv("BATON_RUNTIME_CACHE", str(tmp_path))
    try:
        peer = make_peer(name, resolve_model("tiny"), 4, 64, dtype=torch.float64, device="cpu")
    except PeerUnavailable as exc:
        pytest.skip(str(exc))
    assert {p.dtype for p in peer.model.parameters()} == {torch.float64}
    assert sorted(r.output_len for r in peer.run(REQUESTS).requests) == [2, 3, 5]
