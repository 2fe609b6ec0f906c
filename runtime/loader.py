"""Load (and save) Hugging Face model folders: config.json plus safetensors, single or sharded.

The model is built on the `meta` device, its parameters are allocated once in the target dtype
and device, and checkpoint tensors are copied in one at a time, so loading never holds two
copies of the weights. Every failure is a `ModelLoadError` naming the file, key or tensor.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from runtime.architectures import ARCHITECTURES, CausalLM
from runtime.architectures.weights import Target, checkpoint_targets, checkpoint_tensors
from runtime.hardware import choose_auto_dtype, cpu_info, warn_if_slow_dtype
from runtime.model_config import ModelConfig, ModelLoadError

__all__ = ["ModelLoadError", "load_model", "load_model_config", "resolve_dtype", "save_model"]

logger = logging.getLogger(__name__)
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "float64": torch.float64,
    "double": torch.float64,
    "fp64": torch.float64,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
}


def load_model_config(path: str | Path) -> ModelConfig:
    """Parse `path/config.json`; `eos_token_id` prefers generation_config.json (may be a list)."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"model folder not found: {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"no config.json in model folder {path}")
    d = _read_json(config_file)
    gen_file = path / "generation_config.json"
    if gen_file.is_file() and _read_json(gen_file).get("eos_token_id") is not None:
        d = d | {"eos_token_id": _read_json(gen_file)["eos_token_id"]}
    return ModelConfig.from_hf_dict(d, source=str(config_file))


def resolve_dtype(
    dtype: str | torch.dtype, config: ModelConfig, device: str | torch.device = "cpu"
) -> torch.dtype:
    """Resolve a dtype name; "auto" follows `hardware.choose_auto_dtype` (logged)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ModelLoadError(
                f"unsupported dtype {dtype}; use float32, float64, bfloat16, float16"
            )
        return dtype
    device_type = torch.device(device).type
    if dtype == "auto":
        checkpoint = str(_DTYPES[config.torch_dtype]).removeprefix("torch.")
        choice = choose_auto_dtype(checkpoint, device_type, cpu_info())
        logger.info("dtype auto: %s (%s)", choice.dtype, choice.reason)
        return _DTYPES[choice.dtype]
    if warning := warn_if_slow_dtype(str(_DTYPES.get(dtype, dtype)).removeprefix("torch."),
                                     device_type, cpu_info()):
        logger.warning("%s", warning)
    if dtype not in _DTYPES:
        raise ModelLoadError(f"unsupported dtype {dtype!r}; use auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def load_model(
    path: str | Path, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu"
) -> CausalLM:
    """Load a HF folder into our model, in eval mode with `requires_grad=False`.

    The returned `model.config.torch_dtype` is the dtype the model was loaded in.
    """
    path, device = Path(path), torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {str(device)!r} requested but CUDA is not available")
    config = load_model_config(path)
    torch_dtype = resolve_dtype(dtype, config, device)
    config = config.replace(torch_dtype=str(torch_dtype).removeprefix("torch."))
    files = _weight_files(path)
    with torch.device("meta"):
        model = ARCHITECTURES[config.architecture](config)
    plan = _plan(model, files)
    _materialize(model, torch_dtype, device)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for file, entries in plan.items():
            with _open(file) as f:
                for name, target in entries:
                    tensor = _read_tensor(f, file, name)
                    dst = params[target.param]
                    if target.rows is not None:
                        dst = dst[target.rows[0] : target.rows[1]]
                    dst.copy_(tensor.T if target.transpose else tensor)
                    del tensor
    return model.eval()


def save_model(model: CausalLM, path: str | Path, *, max_shard_bytes: int | None = None) -> Path:
    """Write config.json and safetensors (sharded with an index above `max_shard_bytes`).

    HF names and layouts, so `transformers` and `load_model` both read the folder back.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype_name = str(model.dtype).removeprefix("torch.")
    config = model.config.replace(torch_dtype=dtype_name).to_hf_dict()
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in checkpoint_tensors(model):
        nbytes = tensor.numel() * tensor.element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.cpu()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], path / SINGLE_FILE, metadata={"format": "pt"})
        return path
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / fname, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, fname)
    index = {"metadata": {"total_size": sum(t.nbytes for s in shards for t in s.values())}}
    (path / INDEX_FILE).write_text(json.dumps(index | {"weight_map": weight_map}, indent=2))
    return path


def _read_json(file: Path) -> dict[str, Any]:
    try:
        d = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {file}: {e}") from None
    if not isinstance(d, dict):
        raise ModelLoadError(f"{file}: expected a JSON object, got {type(d).__name__}")
    return d


def _weight_files(path: Path) -> dict[Path, list[str] | None]:
    """Weight files and the tensors each holds per the index (None: every tensor of the file)."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index}: no 'weight_map' object")
        files: dict[Path, list[str]] = {}
        for tensor, shard in weight_map.items():
            files.setdefault(path / shard, []).append(tensor)
        for file in files:
            if not file.is_file():
                raise ModelLoadError(f"shard {file.name!r} listed in {index} is missing")
        return dict(files)
    if (path / SINGLE_FILE).is_file():
        return {path / SINGLE_FILE: None}
    raise ModelLoadError(f"no {SINGLE_FILE} or {INDEX_FILE} in model folder {path}")


@contextmanager
def _open(file: Path) -> Iterator[Any]:
    try:
        handle = safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        msg = f"corrupt or truncated safetensors file {file}: {e}{_diagnose(file)}"
        raise ModelLoadError(msg) from None
    with handle as f:
        yield f


def _read_tensor(f: Any, file: Path, name: str) -> torch.Tensor:
    try:
        return f.get_tensor(name)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ModelLoadError(f"cannot read tensor {name!r} from {file}: {e}") from None


def _diagnose(file: Path) -> str:
    """Name the first tensor whose bytes lie past the end of a truncated file, if any."""
    try:
        with file.open("rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(header_len))
        available = file.stat().st_size - 8 - header_len
        cut = [
            (info["data_offsets"][1], name)
            for name, info in header.items()
            if name != "__metadata__" and info["data_offsets"][1] > available
        ]
    except Exception:  # the header itself is unreadable: nothing more to say
        return ""
    return f" (tensor {min(cut)[1]!r} extends past the end of the file)" if cut else ""


def _plan(model: CausalLM, files: dict[Path, list[str] | None]) -> dict[Path, list[tuple]]:
    """Check every name and shape before allocating anything; group the copies by file."""
    targets = checkpoint_targets(model)
    tied = model.config.tie_word_embeddings
    plan: dict[Path, list[tuple[str, Target]]] = {}
    seen: set[str] = set()
    for file, listed in files.items():
        with _open(file) as f:
            present = set(f.keys())
            for raw in listed if listed is not None else sorted(present):
                if raw not in present:
                    raise ModelLoadError(f"tensor {raw!r} listed in the index is not in {file}")
                if model.ignored_checkpoint_tensors.fullmatch(raw):
                    continue
                name = model.checkpoint_name(raw)
                if tied and name == "lm_head.weight":
                    continue  # tied models may still save the head; the embedding is used
                target = targets.get(name)
                if target is None:
                    raise ModelLoadError(
                        f"unexpected tensor {raw!r} in {file} for {model.config.architecture}"
                    )
                shape = tuple(f.get_slice(raw).get_shape())
                if shape != target.shape:
                    raise ModelLoadError(
                        f"tensor {raw!r} in {file} has shape {list(shape)}, "
                        f"expected {list(target.shape)}"
                    )
                if name in seen:
                    raise ModelLoadError(f"duplicate tensor {raw!r} in {file} (already loaded)")
                seen.add(name)
                plan.setdefault(file, []).append((raw, target))
    missing = sorted(set(targets) - seen)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        shown = ", ".join(repr(m) for m in missing[:5])
        raise ModelLoadError(f"missing tensor(s) {shown}{more} in {_folder(files)}")
    return plan


def _folder(files: dict[Path, Any]) -> Path:
    return next(iter(files)).parent


def _materialize(model: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """Replace meta parameters by uninitialised ones on `device`, keeping tied ones shared."""
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if id(p) not in made:
                empty = torch.empty(p.shape, dtype=dtype, device=device)
                made[id(p)] = nn.Parameter(empty, requires_grad=False)
            setattr(module, name, made[id(p)])
    if any(b.is_meta for b in model.buffers()):
        raise RuntimeError("model has buffers on the meta device; make them plain attributes")
