"""`runtime generate` end to end, against transformers' greedy `generate` on the same folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from runtime.cli import main
from tests.model_factory import make_hf_model_dir
from tests.tokenizer_factory import make_tokenizer_dir

PROMPTS = ["In the beginning was", "a b c", "The quick brown fox jumps"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = make_hf_model_dir(tmp_path_factory.mktemp("gen"), "llama", dtype=torch.float64, seed=4)
    make_tokenizer_dir(path, vocab_size=300)
    return path


def generate_json(capsys, *args: str) -> list[dict]:
    assert main(["generate", *args, "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.mark.parametrize("scheduler", ["static", "runtime-default"])
def test_greedy_generate_matches_transformers(model_dir: Path, capsys, scheduler: str) -> None:
    from transformers import AutoModelForCausalLM

    from runtime.tokenizer import Tokenizer

    sched = [] if scheduler == "runtime-default" else ["--scheduler", scheduler]
    args = ["--model", str(model_dir), "--max-tokens", "8", "--ignore-eos", "--dtype", "float64"]
    for p in PROMPTS:
        args += ["--prompt", p]
    records = generate_json(capsys, *args, *sched)
    assert [r["prompt"] for r in records] == PROMPTS
    tok = Tokenizer.from_dir(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    for rec in records:
        ids = torch.tensor([tok.encode(rec["prompt"])])
        out = hf.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert rec["token_ids"] == out[0, ids.shape[1]:].tolist()
        assert rec["finish_reason"] == "length"
        assert rec["text"] == tok.decode(rec["token_ids"])


def test_prompts_file_with_per_request_max_tokens(model_dir: Path, tmp_path: Path, capsys) -> None:
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a b", "max_tokens": 3}\n\n{"prompt": "c d"}\n')
    records = generate_json(capsys, "--model", str(model_dir), "--prompts-file", str(jsonl),
                            "--max-tokens", "5", "--ignore-eos")
    assert [len(r["token_ids"]) for r in records] == [3, 5]


def test_seeded_sampling_is_reproducible(model_dir: Path, capsys) -> None:
    args = ["--model", str(model_dir), "--prompt", "a b", "--prompt", "c", "--max-tokens", "6",
            "--temperature", "1.0", "--seed", "7", "--ignore-eos"]
    assert generate_json(capsys, *args) == generate_json(capsys, *args)


def test_cli_errors_are_clear(model_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["generate", "--model", str(model_dir)]) == 2
    assert "no prompts" in capsys.readouterr().err
    assert main(["generate", "--model", str(model_dir), "--prompt", "x",
                 "--scheduler", "statik"]) == 2
    assert "Did you mean 'static'" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    assert main(["generate", "--model", str(model_dir), "--prompts-file", str(bad)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err


BROKEN = """
from runtime.api import hookimpl


class Broken:
    @hookimpl
    def admit_requests(self, waiting, running, budget):
        raise RuntimeError("queue index out of range")
"""


def test_a_raising_plugin_names_itself_and_fails_the_run(model_dir: Path, install_plugin,
                                                         capsys, caplog) -> None:
    """The issue's researcher: every request failed, so say why, and exit non-zero."""
    install_plugin("broken-sched", {"broken": "broken_sched:Broken"}, "broken_sched", BROKEN)
    args = ["generate", "--model", str(model_dir), "--scheduler", "broken", "--json",
            "--prompt", "a b", "--prompt", "c d"]
    assert main(args) == 1
    out, err = capsys.readouterr()
    records = [json.loads(line) for line in out.splitlines()]
    message = ("scheduler 'broken' (broken-sched 1.0): admission failed: "
               "RuntimeError: queue index out of range")
    assert [(r["finish_reason"], r["error"]) for r in records] == [("error", message)] * 2
    assert f"error: prompt 1 (req-0) failed: {message}" in err.splitlines()
    assert f"error: prompt 2 (req-1) failed: {message}" in err.splitlines()
    assert err.splitlines()[-1] == "error: 2 of 2 requests failed"
    logged = [r for r in caplog.records if r.name == "runtime.engine"]
    assert logged and logged[0].getMessage() == message and logged[0].exc_info


def test_generate_reports_no_error_when_all_succeed(model_dir: Path, capsys) -> None:
    records = generate_json(capsys, "--model", str(model_dir), "--prompt", "a b",
                            "--max-tokens", "2", "--ignore-eos")
    assert records[0]["error"] is None and records[0]["finish_reason"] == "length"
