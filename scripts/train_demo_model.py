"""Train the demo model shipped in `models/kjv-llama-tiny/`.

A Llama-architecture model of 4.2M parameters trained on the King James Bible (public domain),
with a byte-level BPE tokenizer trained by the `tokenizers` library, on a 2-core CPU in well
under an hour (36 minutes on a busy shared machine). The model is built and trained with this project's own model code
(`runtime.architectures`), then saved as a standard Hugging Face folder.

Corpus (Debian's `bible-kjv` package; its data is the `bible-kjv-text` package)::

    apt-get update && apt-get install -y bible-kjv

The default corpus is the package's data file `/usr/lib/bible.data`, dumped to plain text with the
package's `bible` program. `--corpus FILE` takes any file in the same format instead: either the
`bible.data` file of the package, or the text the `bible` program prints (`bible -l100000
gen1:1-rev22:21 > kjv.txt`).

Reproduce the shipped model (same seed, same data, float32; every option at its default)::

    PYTHONPATH=. .venv/bin/python scripts/train_demo_model.py --out models/kjv-llama-tiny

Training checkpoints into `--work-dir` (default `/tmp/kjv-llama-train`) every `--ckpt-every`
steps and resumes from there when restarted with the same arguments, so a killed run loses little.
`--eval-only` skips training and (re)computes the model-card numbers of a saved folder
(`training_summary.json`). The model card is `models/kjv-llama-tiny/README.md`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Before torch loads OpenMP: on a busy shared machine, spinning OpenMP threads made a 2-thread
# training step 4-5x slower than one thread; passive waiting makes 2 threads no worse than 1.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

DEFAULT_CORPUS = "/usr/lib/bible.data"
VERSE_SPEC = "gen1:1-rev22:21"

BOS, EOS, USER, ASSISTANT, SYSTEM = "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>"
SPECIAL_TOKENS = [BOS, EOS, USER, ASSISTANT, SYSTEM]

# One message per turn: `<|role|>\ncontent<|eos|>\n`, the whole chat opened by `<|bos|>`.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

INIT_STD = 0.02
HELDOUT_EVERY = 40  # chapter i is held out when i % HELDOUT_EVERY == HELDOUT_OFFSET
HELDOUT_OFFSET = 20


# --------------------------------------------------------------------------------------------
# Corpus


@dataclass
class Chapter:
    title: str  # "Genesis 1"
    verses: list[str]

    def text(self) -> str:
        return self.title + "\n" + "\n".join(self.verses)


def read_corpus_text(path: str) -> str:
    """The corpus as the `bible` program prints it (one verse per line, chapter headings)."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"EC02":  # the package's compressed data file: dump it with its own reader
        exe = shutil.which("bible")
        if exe is None:
            sys.exit("the `bible` program is missing: apt-get install -y bible-kjv")
        folder, name = os.path.split(os.path.abspath(path))
        out = subprocess.run(
            [exe, "-l100000", "-p", folder, "-d", name, VERSE_SPEC],
            check=True,
            capture_output=True,
            text=True,
        )
        return out.stdout
    return Path(path).read_text(encoding="utf-8")


_VERSE = re.compile(r"^\s+(\d+)\s+(.*)$")


def parse_chapters(text: str) -> list[Chapter]:
    chapters: list[Chapter] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        m = _VERSE.match(line)
        if m:
            if not chapters:
                raise ValueError(f"verse before any chapter heading: {line!r}")
            chapters[-1].verses.append(" ".join(m.group(2).split()))
        elif line[0].isspace() or not line.rstrip()[-1].isdigit():
            raise ValueError(f"unexpected line (neither a verse nor a chapter heading): {line!r}")
        else:
            chapters.append(Chapter(line.strip(), []))
    if len(chapters) != 1189:
        raise ValueError(f"expected the 1189 chapters of the KJV, found {len(chapters)}")
    return chapters


def split_chapters(chapters: list[Chapter]) -> tuple[list[Chapter], list[Chapter]]:
    train = [c for i, c in enumerate(chapters) if i % HELDOUT_EVERY != HELDOUT_OFFSET]
    held = [c for i, c in enumerate(chapters) if i % HELDOUT_EVERY == HELDOUT_OFFSET]
    return train, held


# --------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(chapters: list[Chapter], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((c.text() for c in chapters), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # A plain prompt is encoded the way every training document starts: after `<|bos|>`.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """What CHAT_TEMPLATE renders, in Python (the tests check they agree)."""
    s = BOS
    for m in messages:
        s += f"<|{m['role']}|>\n{m['content']}{EOS}\n"
    if add_generation_prompt:
        s += f"{ASSISTANT}\n"
    return s


# --------------------------------------------------------------------------------------------
# Model


def model_config(vocab_size: int, args) -> dict:
    tok_ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.hidden // args.heads,
        "hidden_act": "silu",
        "max_position_embeddings": args.seq_len,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "initializer_range": INIT_STD,
        "bos_token_id": tok_ids[BOS],
        "eos_token_id": tok_ids[EOS],
        "torch_dtype": "float32",
        "use_cache": True,
    }


class LocalLlama(torch.nn.Module):
    """A minimal Llama with Hugging Face parameter names (fallback when the runtime's is absent)."""

    def __init__(self, cfg: dict):
        super().__init__()
        nn = torch.nn
        h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
        self.n_heads, self.n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        self.head_dim = cfg["head_dim"]
        self.eps = cfg["rms_norm_eps"]
        self.theta = cfg["rope_theta"]
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(v, h)
        self.model.layers = nn.ModuleList()
        for _ in range(cfg["num_hidden_layers"]):
            layer = nn.Module()
            layer.self_attn = nn.Module()
            layer.self_attn.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=False)
            layer.self_attn.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=False)
            layer.self_attn.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=False)
            layer.self_attn.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)
            layer.mlp = nn.Module()
            layer.mlp.gate_proj = nn.Linear(h, inter, bias=False)
            layer.mlp.up_proj = nn.Linear(h, inter, bias=False)
            layer.mlp.down_proj = nn.Linear(inter, h, bias=False)
            layer.input_layernorm = nn.RMSNorm(h, eps=self.eps)
            layer.post_attention_layernorm = nn.RMSNorm(h, eps=self.eps)
            self.model.layers.append(layer)
        self.model.norm = nn.RMSNorm(h, eps=self.eps)

    def rope(self, positions: torch.Tensor):
        d = self.head_dim
        inv = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        ang = positions.to(torch.float32)[:, None] * inv[None, :]
        ang = torch.cat([ang, ang], dim=-1)
        return ang.cos(), ang.sin()

    @staticmethod
    def rotate(x, cos, sin):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        b, t = input_ids.shape
        cos, sin = self.rope(torch.arange(t))
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            a = layer.self_attn
            y = layer.input_layernorm(x)
            q = a.q_proj(y).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
            k = a.k_proj(y).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
            v = a.v_proj(y).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
            q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            x = x + a.o_proj(o.transpose(1, 2).reshape(b, t, -1))
            y = layer.post_attention_layernorm(x)
            m = layer.mlp
            x = x + m.down_proj(F.silu(m.gate_proj(y)) * m.up_proj(y))
        x = self.model.norm(x)
        return x @ self.model.embed_tokens.weight.T


def init_weights(model: torch.nn.Module, std: float, n_layers: int) -> None:
    """GPT-2 style init: normal(0, std), residual output projections scaled by 1/sqrt(2L)."""
    for name, p in model.named_parameters():
        if p.dim() == 1:
            torch.nn.init.ones_(p)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            torch.nn.init.normal_(p, 0.0, std / math.sqrt(2 * n_layers))
        else:
            torch.nn.init.normal_(p, 0.0, std)


def runtime_logits_fn(model):
    """Batched causal forward through the runtime's model: ids (B, T) -> logits (B, T, V)."""
    from runtime.architectures import CausalSelfAttention

    attn = CausalSelfAttention()  # cache-less, differentiable

    def logits_fn(ids: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        positions = torch.arange(t).expand(b, t)
        hidden = model(ids, positions, attn, None)  # (B, T, hidden)
        return model.compute_logits(hidden.reshape(b * t, -1)).view(b, t, -1)

    return logits_fn


def build_model(cfg: dict, impl: str):
    """(module, logits_fn) where logits_fn(ids (B, T)) returns logits (B, T, V)."""
    if impl == "local":
        model = LocalLlama(cfg)
        return model, model
    from runtime.architectures import ModelConfig
    from runtime.architectures import build_model as build_runtime_model

    model = build_runtime_model(ModelConfig.from_hf_dict(cfg))
    return model, runtime_logits_fn(model)


def load_logits_fn(folder: Path, impl: str):
    """The saved folder loaded for evaluation: logits_fn(ids (B, T)) -> logits (B, T, V)."""
    if impl == "local":
        from safetensors.torch import load_file

        model = LocalLlama(json.loads((folder / "config.json").read_text()))
        model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
        return model.eval()
    from runtime.loader import load_model

    return runtime_logits_fn(load_model(folder, dtype="float32"))


# --------------------------------------------------------------------------------------------
# Data


class Batches:
    """Seeded random windows of the packed training stream, mixed with packed chat examples."""

    def __init__(self, tok, chapters: list[Chapter], seq_len: int, chat_frac: float, seed: int):
        self.tok = tok
        self.seq_len = seq_len
        self.chat_frac = chat_frac
        self.rng = random.Random(seed)
        self.bos, self.eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
        ids: list[int] = []
        for c in chapters:
            ids += [self.bos, *tok.encode(c.text(), add_special_tokens=False).ids, self.eos]
        self.stream = torch.tensor(ids, dtype=torch.long)
        self.chapters = chapters

    def chat_example(self) -> list[int]:
        rng = self.rng
        c = rng.choice(self.chapters)
        n = len(c.verses)
        i = rng.randrange(n)
        nu = rng.choice([1, 1, 2])
        na = rng.choice([1, 2, 3])
        user = " ".join(c.verses[i : i + nu])
        if rng.random() < 0.15:
            user = c.title
            i, nu = 0, 0
        answer = c.verses[i + nu : i + nu + na] or [c.verses[-1]]
        text = render_chat(
            [{"role": "user", "content": user}, {"role": "assistant", "content": " ".join(answer)}],
            add_generation_prompt=False,
        )
        return self.tok.encode(text, add_special_tokens=False).ids

    def chat_window(self) -> torch.Tensor:
        ids: list[int] = []
        while len(ids) < self.seq_len + 1:
            ids += self.chat_example()
        return torch.tensor(ids[: self.seq_len + 1], dtype=torch.long)

    def next(self, batch: int) -> torch.Tensor:
        rows = []
        for _ in range(batch):
            if self.rng.random() < self.chat_frac:
                rows.append(self.chat_window())
            else:
                s = self.rng.randrange(len(self.stream) - self.seq_len - 1)
                rows.append(self.stream[s : s + self.seq_len + 1])
        return torch.stack(rows)


def heldout_windows(tok, chapters: list[Chapter], seq_len: int) -> torch.Tensor:
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    ids: list[int] = []
    for c in chapters:
        ids += [bos, *tok.encode(c.text(), add_special_tokens=False).ids, eos]
    n = (len(ids) - 1) // seq_len
    x = torch.tensor(ids[: n * seq_len + 1], dtype=torch.long)
    return torch.stack([x[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)])


@torch.no_grad()
def eval_loss(logits_fn, windows: torch.Tensor, batch: int = 8) -> float:
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        w = windows[i : i + batch]
        logits = logits_fn(w[:, :-1])
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += w[:, 1:].numel()
    return total / count


@torch.no_grad()
def chunked_loss(logits_fn, ids: list[int], seq_len: int) -> float:
    """Mean next-token loss over consecutive windows of at most seq_len + 1 tokens (each scored
    from position 0): how the tests score `heldout_sample.txt`."""
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, seq_len):
        w = torch.tensor([ids[start : start + seq_len + 1]])
        logits = logits_fn(w[:, :-1])
        total += F.cross_entropy(logits[0], w[0, 1:], reduction="sum").item()
        count += w.shape[1] - 1
    return total / count


# --------------------------------------------------------------------------------------------
# Main


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--corpus", default=DEFAULT_CORPUS)
    p.add_argument("--out", default="models/kjv-llama-tiny")
    p.add_argument("--work-dir", default="/tmp/kjv-llama-train")
    p.add_argument("--impl", choices=["runtime", "local"], default="runtime")
    p.add_argument("--seed", type=int, default=1611)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-frac", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--chat-frac", type=float, default=0.2)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--ckpt-every", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--max-minutes",
        type=float,
        default=110.0,
        help="safety stop: save what is trained after this much training time (default 110)",
    )
    p.add_argument("--eval-only", action="store_true")
    return p.parse_args(argv)


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def save_tokenizer_files(tok, out: Path, max_len: int) -> None:
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": BOS,
                "eos_token": EOS,
                "pad_token": EOS,
                "unk_token": None,
                "additional_special_tokens": [USER, ASSISTANT, SYSTEM],
                "add_bos_token": True,
                "add_eos_token": False,
                "clean_up_tokenization_spaces": False,
                "model_max_length": max_len,
                "chat_template": CHAT_TEMPLATE,
            },
            indent=2,
        )
        + "\n"
    )


def export(model: torch.nn.Module, cfg: dict, tok, out: Path, held: list[Chapter]) -> None:
    """The HF folder: config, weights, tokenizer files, generation config, held-out sample."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model, LocalLlama):
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    else:  # the runtime's own saver: HF names, unfused q/k/v and gate/up, no tied lm_head
        from runtime.loader import save_model

        save_model(model, out)
    gen = {
        "bos_token_id": cfg["bos_token_id"],
        "eos_token_id": cfg["eos_token_id"],
        "pad_token_id": cfg["eos_token_id"],
        "do_sample": True,
        "temperature": 0.8,
        "top_p": 0.95,
        "max_new_tokens": 128,
    }
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    save_tokenizer_files(tok, out, cfg["max_position_embeddings"])
    # A few KB of held-out text (never trained on) for the tests' perplexity check.
    sample = ""
    for c in held:
        if len(sample) + len(c.text()) > 6000:
            break
        sample += c.text() + "\n\n"
    (out / "heldout_sample.txt").write_text(sample)


def train(args, train_ch: list[Chapter], held_ch: list[Chapter], tok, cfg: dict, work: Path):
    started = time.time()
    torch.manual_seed(args.seed)
    model, logits_fn = build_model(cfg, args.impl)
    init_weights(model, INIT_STD, cfg["num_hidden_layers"])
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params:,} parameters, impl={args.impl}")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    data = Batches(tok, train_ch, args.seq_len, args.chat_frac, args.seed)
    held = heldout_windows(tok, held_ch, args.seq_len)
    log(
        f"data: {len(data.stream):,} train tokens, {held.numel():,} held-out tokens ({len(held)} windows)"
    )
    history: dict = {"train": [], "heldout": []}
    step, elapsed, ema = 0, 0.0, None
    ckpt = work / "ckpt.pt"
    if ckpt.exists():
        st = torch.load(ckpt, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        data.rng.setstate(st["data_rng"])
        torch.set_rng_state(st["torch_rng"])
        step, elapsed, history = st["step"], st["elapsed"], st["history"]
        ema = st["ema"]
        log(f"resumed from step {step} ({elapsed / 60:.1f} min trained)")
    model.train()
    t_last = time.time()
    while step < args.steps:
        if elapsed > args.max_minutes * 60:
            log(f"--max-minutes reached: stopping at step {step} of {args.steps}")
            break
        lr = lr_at(step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        x = data.next(args.batch)
        logits = logits_fn(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
        opt.step()
        step += 1
        now = time.time()
        elapsed += now - t_last
        t_last = now
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        history["train"].append([step, round(loss.item(), 4)])
        if step % 10 == 0:
            log(
                f"step {step}/{args.steps} lr {lr:.2e} loss {loss.item():.4f} ema {ema:.4f} gnorm {gnorm:.2f} {elapsed / 60:.1f} min"
            )
        last_step = step == args.steps or elapsed > args.max_minutes * 60
        if step % args.eval_every == 0 or last_step:
            model.eval()
            hl = eval_loss(logits_fn, held)
            model.train()
            history["heldout"].append([step, round(hl, 4)])
            log(f"eval step {step}: held-out loss {hl:.4f} ppl {math.exp(hl):.2f}")
            t_last = time.time()
        if step % args.ckpt_every == 0 or last_step:
            tmp = work / "ckpt.pt.tmp"
            torch.save(
                {
                    "model": model.state_dict(),
                    "opt": opt.state_dict(),
                    "data_rng": data.rng.getstate(),
                    "torch_rng": torch.get_rng_state(),
                    "step": step,
                    "elapsed": elapsed,
                    "history": history,
                    "ema": ema,
                },
                tmp,
            )
            os.replace(tmp, ckpt)
            t_last = time.time()
    model.eval()
    last = [loss for _, loss in history["train"][-50:]]
    summary = {
        "parameters": n_params,
        "steps": step,
        "planned_steps": args.steps,
        "tokens_seen": step * args.batch * args.seq_len,
        "train_tokens": len(data.stream),
        "heldout_tokens": int(held[:, 1:].numel()),
        "train_minutes": round(elapsed / 60, 1),  # optimizer steps only, summed over resumes
        "wall_minutes_last_run": round((time.time() - started) / 60, 1),  # with evals, this run
        "final_train_loss_last50_mean": round(sum(last) / len(last), 4),
        "final_heldout_loss": history["heldout"][-1][1],
        "history": history,
    }
    return model, summary


SAMPLE_PROMPTS = [
    "In the beginning",
    "And the LORD said unto Moses,",
    "Blessed are",
]


@torch.no_grad()
def generate(logits_fn, ids: list[int], n: int, eos: int, temperature: float = 0.0, seed: int = 0):
    """Plain full-recompute generation (no cache): greedy when temperature is 0."""
    g = torch.Generator().manual_seed(seed)
    ids = list(ids)
    new: list[int] = []
    for _ in range(n):
        logits = logits_fn(torch.tensor([ids]))[0, -1]
        if temperature == 0.0:
            t = int(logits.argmax())
        else:
            t = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=g))
        if t == eos:
            break
        ids.append(t)
        new.append(t)
    return new


def evaluate(out: Path, held_ch: list[Chapter], args, summary: dict | None = None) -> dict:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    cfg = json.loads((out / "config.json").read_text())
    seq_len = cfg["max_position_embeddings"]
    held = heldout_windows(tok, held_ch, seq_len)
    trained_fn = load_logits_fn(out, args.impl)
    if args.impl == "runtime":  # the runtime's own fresh init: N(0, 0.02) matrices, unit norms
        rand_model, rand_fn = build_model(cfg, args.impl)
        rand_model.init_weights(seed=0)
    else:
        torch.manual_seed(0)
        rand_model, rand_fn = build_model(cfg, args.impl)
        init_weights(rand_model, INIT_STD, cfg["num_hidden_layers"])
    rand_model.eval()
    t0 = time.time()
    hl = eval_loss(trained_fn, held)
    rl = eval_loss(rand_fn, held)
    log(
        f"held-out loss {hl:.4f} (ppl {math.exp(hl):.2f}); random model {rl:.4f} (ppl {math.exp(rl):.1f}) [{time.time() - t0:.0f}s]"
    )
    sample_ids = tok.encode((out / "heldout_sample.txt").read_text()).ids
    sl = chunked_loss(trained_fn, sample_ids, seq_len)
    srl = chunked_loss(rand_fn, sample_ids, seq_len)
    log(f"heldout_sample.txt ({len(sample_ids)} tokens): loss {sl:.4f}, random model {srl:.4f}")
    eos = tok.token_to_id(EOS)
    samples = []
    prompts = [*SAMPLE_PROMPTS, held_ch[1].verses[0]]
    for i, p in enumerate(prompts):
        ids = tok.encode(p).ids
        greedy = tok.decode(generate(trained_fn, ids, 48, eos))
        hot = tok.decode(generate(trained_fn, ids, 48, eos, temperature=0.8, seed=args.seed + i))
        samples.append({"prompt": p, "greedy": greedy, "temperature_0.8_seed": hot})
        log(f"{p!r} -> greedy {greedy!r}\n    t=0.8: {hot!r}")
    chat = render_chat([{"role": "user", "content": "The LORD is my shepherd;"}], True)
    ids = tok.encode(chat, add_special_tokens=False).ids
    reply = tok.decode(generate(trained_fn, ids, 48, eos))
    log(f"chat {chat!r} -> {reply!r}")
    samples.append({"chat_user": "The LORD is my shepherd;", "greedy": reply})
    result = {
        "heldout_loss": round(hl, 4),
        "heldout_perplexity": round(math.exp(hl), 2),
        "random_heldout_loss": round(rl, 4),
        "random_heldout_perplexity": round(math.exp(rl), 1),
        "heldout_sample_loss": round(sl, 4),
        "random_heldout_sample_loss": round(srl, 4),
        "eval_impl": args.impl,
        "samples": samples,
    }
    path = out / "training_summary.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    if summary is not None:
        s = dict(summary)
        s["history"] = {
            "train_every_10": [x for x in summary["history"]["train"] if x[0] % 10 == 0],
            "heldout": summary["history"]["heldout"],
        }
        s.pop("args", None)
        old["training"] = s
    old["evaluation"] = result
    path.write_text(json.dumps(old, indent=2) + "\n")
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    repo = str(Path(__file__).resolve().parent.parent)
    if repo not in sys.path:  # `runtime` importable without PYTHONPATH
        sys.path.insert(0, repo)
    torch.set_num_threads(args.threads)
    out, work = Path(args.out), Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    chapters = parse_chapters(read_corpus_text(args.corpus))
    train_ch, held_ch = split_chapters(chapters)
    log(f"corpus: {len(train_ch)} train chapters, {len(held_ch)} held-out chapters")
    if args.eval_only:
        evaluate(out, held_ch, args)
        return
    tok_path = work / "tokenizer.json"
    if tok_path.exists():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tok_path))
    else:
        tok = train_tokenizer(train_ch, args.vocab_size)
        tok.save(str(tok_path))
    cfg = model_config(tok.get_vocab_size(), args)
    model, summary = train(args, train_ch, held_ch, tok, cfg, work)
    export(model, cfg, tok, out, held_ch)
    summary["command"] = " ".join(
        ["scripts/train_demo_model.py", *(argv if argv is not None else sys.argv[1:])]
    )
    summary["args"] = vars(args)
    (work / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(
        f"saved {out}: train loss {summary['final_train_loss_last50_mean']}, held-out {summary['final_heldout_loss']}"
    )
    evaluate(out, held_ch, args, summary)


if __name__ == "__main__":
    main()
