"""The stop rules decided after each sampled token (stop strings are in test_stop.py)."""

from __future__ import annotations

from runtime.postprocess import check_stop_token
from runtime.request import FinishReason, Request
from runtime.sampling_params import SamplingParams


def _req(**kw) -> Request:
    return Request("r", [1, 2, 3], SamplingParams(**kw))


def test_check_stop_token() -> None:
    req = _req(max_tokens=3, stop_token_ids=(42,))
    req.output_token_ids.append(5)
    assert check_stop_token(req, 5, (2, 7)) is None
    assert check_stop_token(req, 7, (2, 7)) is FinishReason.STOP
    assert check_stop_token(req, 42, (2, 7)) is FinishReason.STOP
    ignoring = _req(max_tokens=3, ignore_eos=True, stop_token_ids=(42,))
    ignoring.output_token_ids.append(2)
    assert check_stop_token(ignoring, 2, (2,)) is None
    assert check_stop_token(ignoring, 42, (2,)) is FinishReason.STOP
    req.output_token_ids += [5, 5]
    assert check_stop_token(req, 5, (2,)) is FinishReason.LENGTH
    assert check_stop_token(_req(max_tokens=9), 1, (), max_model_len=3) is FinishReason.LENGTH
