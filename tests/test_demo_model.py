"""The demo model shipped in `models/kjv-llama-tiny` (trained by scripts/train_demo_model.py).

It must load in the runtime and in `transformers` with the same logits, be far better than a
same-shape random model on held-out text (scored by the runtime's own model code), generate
deterministically through the engine, and be what `runtime serve`/`generate` use by default.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from runtime.architectures import CausalSelfAttention, build_model
from runtime.config import RuntimeConfig
from runtime.engine import Engine, EngineLimits
from runtime.loader import load_model
from runtime.sampling_params import SamplingParams
from runtime.tokenizer import Tokenizer

MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "kjv-llama-tiny"
FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "README.md",
    "heldout_sample.txt",
    "training_summary.json",
)


@pytest.fixture(scope="module")
def model():
    return load_model(MODEL_DIR, dtype="float32")


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_dir(MODEL_DIR)


@pytest.fixture(scope="module")
def heldout_ids(tokenizer):
    return tokenizer.encode((MODEL_DIR / "heldout_sample.txt").read_text())


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    """Cache-less causal forward of a padded batch (B, T) through the runtime's model code."""
    b, t = ids.shape
    positions = torch.arange(t).expand(b, t)
    with torch.inference_mode():
        hidden = model(ids, positions, CausalSelfAttention(), None)
        return model.compute_logits(hidden.reshape(b * t, -1)).view(b, t, -1)


def chunked_loss(model, ids: list[int], seq_len: int) -> float:
    """Mean next-token loss over consecutive windows of at most seq_len + 1 tokens."""
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, seq_len):
        w = torch.tensor([ids[start : start + seq_len + 1]])
        logits = logits_of(model, w[:, :-1])
        total += F.cross_entropy(logits[0], w[0, 1:], reduction="sum").item()
        count += w.shape[1] - 1
    return total / count


def test_folder_is_a_small_standard_hf_llama_folder():
    for name in FILES:
        assert (MODEL_DIR / name).is_file(), f"missing {name}"
    size = sum(f.stat().st_size for f in MODEL_DIR.iterdir() if f.is_file())
    assert size < 30 * 2**20, f"model folder is {size / 2**20:.1f} MiB"
    cfg = json.loads((MODEL_DIR / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["tie_word_embeddings"] is True and cfg["torch_dtype"] == "float32"
    from safetensors import safe_open

    with safe_open(MODEL_DIR / "model.safetensors", "pt") as f:
        names = set(f.keys())
        assert all(f.get_slice(n).get_dtype() == "F32" for n in names)
    assert "lm_head.weight" not in names  # tied to the input embedding
    layer0 = {n.removeprefix("model.layers.0.") for n in names if n.startswith("model.layers.0.")}
    assert layer0 == {
        f"{m}.weight"
        for m in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
            "input_layernorm",
            "post_attention_layernorm",
        )
    }
    gen = json.loads((MODEL_DIR / "generation_config.json").read_text())
    assert gen["eos_token_id"] == cfg["eos_token_id"] and gen["bos_token_id"] == cfg["bos_token_id"]


def test_it_is_the_default_model():
    assert RuntimeConfig().resolved_model().resolve() == MODEL_DIR.resolve()


def test_runtime_and_transformers_agree_on_tokens_and_logits(model, tokenizer, heldout_ids):
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    text = (MODEL_DIR / "heldout_sample.txt").read_text()
    assert hf_tok(text)["input_ids"] == heldout_ids
    assert heldout_ids[0] == tokenizer.bos_token_id == model.config.bos_token_id
    messages = [
        {"role": "user", "content": "In the beginning God created the heaven and the earth."},
        {"role": "assistant", "content": "And the earth was without form, and void."},
        {"role": "user", "content": "And God said,"},
    ]
    ours = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    theirs = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours == theirs
    assert ours.startswith("<|bos|><|user|>\n") and ours.endswith("<|eos|>\n<|assistant|>\n")

    hf = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    ids = torch.tensor([heldout_ids[:160], heldout_ids[160:320]])
    with torch.no_grad():
        expected = hf(ids).logits
    got = logits_of(model, ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_heldout_perplexity_far_below_random_model(model, heldout_ids):
    seq_len = model.config.max_position_embeddings
    assert len(heldout_ids) > seq_len  # more than one window, a few KB of text
    trained = chunked_loss(model, heldout_ids, seq_len)
    random_model = build_model(model.config).init_weights(seed=0).eval()
    random = chunked_loss(random_model, heldout_ids, seq_len)
    ppl, random_ppl = math.exp(trained), math.exp(random)
    assert random_ppl > 1000  # near the vocabulary size: chance
    assert ppl < 60 and ppl * 50 < random_ppl, (ppl, random_ppl)
    # The numbers in the model card come from the same computation.
    card = json.loads((MODEL_DIR / "training_summary.json").read_text())["evaluation"]
    assert trained == pytest.approx(card["heldout_sample_loss"], abs=2e-3)
    assert random == pytest.approx(card["random_heldout_sample_loss"], abs=2e-3)


def test_greedy_continuation_of_a_heldout_prompt_is_deterministic(model, tokenizer):
    # "And the LORD visited Sarah as he had said," (Genesis 21:1, a held-out chapter)
    prompt = (MODEL_DIR / "heldout_sample.txt").read_text().splitlines()[1].split(",")[0] + ","
    params = SamplingParams(max_tokens=24, temperature=0.0)
    runs = []
    for batch in ([prompt], [prompt, "And the LORD said unto Moses,"]):
        engine = Engine(model, tokenizer, limits=EngineLimits(max_num_seqs=4))
        runs.append(engine.generate(batch, params)[0])
    first, second = runs
    assert first.output_token_ids and first.output_token_ids == second.output_token_ids
    assert first.output_text == second.output_text
    # The same tokens as a plain cache-less argmax loop over the model.
    ids = tokenizer.encode(prompt)
    for token in first.output_token_ids:
        assert int(logits_of(model, torch.tensor([ids]))[0, -1].argmax()) == token
        ids.append(token)
    assert len(re.findall(r"[A-Za-z]{2,}", first.output_text)) >= 3, first.output_text
