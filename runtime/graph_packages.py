"""The fixed-shape bucket graphs kept on disk as AOTInductor packages, so a restart loads them.

Why: a bucket's graph (`runtime.static_graphs`) freezes the weights into packed layouts that
inductor's FX graph cache cannot pickle ("mkldnn tensors unpickleable"), and its C++ source
names every constant by a per-process hash, so without this every server start lowers,
autotunes and compiles each bucket again: about 90 s a bucket for a SmolLM2-135M-shaped model
on 2 cores, six minutes for `--static-decode-rows 1 2 4 8`. Exported with `torch.export` and
compiled ahead of time with the same inductor settings, a bucket's decoder and LM head are two
`.pt2` packages, each a compiled library and its constants; loading one takes about a second.

A package is reused only where everything that shaped it is unchanged: the model's config,
dtype and every weight's bytes (a SHA-1 over them, about 0.4 s for 540 MB here), the torch
version, the CPU's instruction sets, the inductor settings, and the source of the modules that
trace into the graph, and which attention op the graph calls. Anything else is a different
directory, built on first use. The attention stays outside the package, as it does in the
in-process graph: the C++ `baton_kernels::attend` op where the engine's kernels build (it runs
a decode-only pass's plan and calls the layout's Python handle back otherwise; a process
loading such a package has built them first), else the Python `baton_runtime::attend`.

The constants are kept out of the package's library and out of the package itself: the graph
keeps the parameters it was exported with beside their packed forms, so at load those are
handed the module's own tensors, and the packed forms go to a content-addressed store,
`constants/<sha1>.pt` beside the packages. Which of the module's tensors the code never reads
(the dense weights of the GEMMs it packed) is shown when a package is built, by running it with
each replaced by NaNs, and listed in the package: a load hands those a one-element stand-in,
so the caller may free them (`runtime.static_graphs` drops the dense copies it froze from).
The buckets of one model freeze the same weights, and where inductor picked the same blocking for two row counts their
packed forms are byte for byte the same (all four of `1 2 4 8` for the 135M shape here): those
are stored once and loaded once, shared by every bucket's graph. A loaded bucket then costs
the memory of the packed forms no other bucket already has (from the library, every weight was
resident twice: the 135M shape's head took 292 MiB instead of 160; without the store, each
bucket held its own copy of the same packed weights: 3.84 GB RSS at four buckets).

Cost: disk, one copy of the packed linear weights per distinct blocking (0.5 GB for the four
buckets of the 135M shape in float32). `static_graph_cache_gib` bounds the directory: past it
the least recently used models' packages are removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import platform
import shutil
import threading
import weakref
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from runtime.package_builder import ModelSource

logger = logging.getLogger(__name__)

DEFAULT_MAX_GIB = 16.0
# The modules whose source traces into a bucket's graph: a change to any of them is a new key.
_TRACED_SOURCES = ("architectures", "static_graphs.py", "compiled_forward.py",
                   "graph_packages.py")


@dataclass(frozen=True, slots=True)
class PackageCacheSpec:
    """Where the packages live and how much disk they may take (from `static_graph_cache`),
    and where a separate process can load the model to build missing ones
    (`runtime.package_builder`; None: they are built in this process)."""

    root: Path
    max_bytes: int
    builder: ModelSource | None = None


def default_root() -> Path:
    """`$BATON_RUNTIME_CACHE/static-graphs` (else under `$XDG_CACHE_HOME` or ~/.cache)."""
    from runtime.bench.model_spec import default_cache_dir

    return default_cache_dir() / "static-graphs"


def cache_spec(setting: bool | str | os.PathLike, max_gib: float = DEFAULT_MAX_GIB,
               builder: ModelSource | None = None) -> PackageCacheSpec | None:
    """`static_graph_cache`: true (the default root), false (no packages) or a directory."""
    if setting is False:
        return None
    root = default_root() if setting is True else Path(setting).expanduser()
    return PackageCacheSpec(root, int(max_gib * 2**30), builder)


def _sha1() -> Any:
    return hashlib.sha1(usedforsecurity=False)


def _source_digest() -> str:
    digest = _sha1()
    base = Path(__file__).resolve().parent
    for name in _TRACED_SOURCES:
        path = base / name
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(file.relative_to(base).as_posix().encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


def model_key(model: nn.Module, settings: dict[str, Any]) -> str:
    """The key of `model`'s packages: its config and weights, and what builds the graphs."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    from runtime.hardware import cpu_info

    digest = _sha1()
    header = {"torch": torch.__version__, "machine": platform.machine(),
              "isa": str(pick_vec_isa()), "flags": sorted(cpu_info().flags),
              "settings": sorted(settings.items()), "config": repr(model.config),
              "source": _source_digest()}
    digest.update(json.dumps(header, default=str).encode())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        digest.update(f"{name} {tuple(tensor.shape)} {tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()[:24]


_CONFIG = "aotinductor/model/weights_config.json"  # inside a package's data folder
_MANIFEST = "baton_constants.json"  # ours, beside it: constant name -> digest in the store
_UNREAD = "baton_unread.json"  # ours too: the module's tensors the graph's code never reads
_STORE = "constants"  # the model directory's content-addressed packed constants
# The packed constants loaded in this process, by digest: every bucket (and every engine over
# the same model) that names one gets the same tensor while any of them holds it.
_LOADED: weakref.WeakValueDictionary[str, torch.Tensor] = weakref.WeakValueDictionary()


def _stand_in(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor of `tensor`'s shape and dtype over one element: for a constant never read."""
    return tensor.new_empty(1).expand(tensor.shape)


def _data_prefix(archive: zipfile.ZipFile) -> str:
    """The folder inside a package that holds `aotinductor/` and `weights/`."""
    config = next(n for n in archive.namelist() if n.endswith("/" + _CONFIG))
    return config[: -len(_CONFIG)]


def _sha1_of(blob: bytes) -> str:
    digest = _sha1()
    digest.update(blob)
    return digest.hexdigest()


def _write_once(path: Path, digest: str, blob: bytes) -> None:
    """`blob` at `path` unless an intact copy is there (its name is the digest of its bytes),
    written to a per-process file first so a reader never sees half of it."""
    if path.exists() and _sha1_of(path.read_bytes()) == digest:
        return
    partial = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.partial")
    try:
        partial.write_bytes(blob)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


class GraphPackages:
    """One model's bucket packages under `spec.root/<model key>/`: loaded, else built."""

    min_unread_bytes = 1 << 16  # smaller tensors are not worth a probe run each

    def __init__(self, spec: PackageCacheSpec, key: str, settings: dict[str, Any]) -> None:
        self.spec, self.key, self.settings = spec, key, settings
        self.directory = spec.root / key
        self.loaded: list[str] = []  # the packages loaded from disk, by name
        self.built: list[str] = []  # the packages compiled here
        self.constant_digests: set[str] = set()  # the packed constants the loaded graphs use
        self.constant_bytes = 0  # their memory, each counted once

    def has(self, name: str) -> bool:
        """Whether `name`'s package is on disk (readable or not: a load tells)."""
        return (self.directory / f"{name}.pt2").exists()

    def load_or_build(self, name: str, module: nn.Module, inputs: tuple[torch.Tensor, ...],
                      tracing: Callable[[], contextlib.AbstractContextManager],
                      probing: Callable[[], contextlib.AbstractContextManager] | None = None
                      ) -> Callable[..., torch.Tensor]:
        """The compiled `module` for `inputs`' shapes: `name`'s package, built if missing or
        unreadable. `tracing()` is held while the module is exported (the attention op's
        throwaway pass state); `probing()`, if given, while a new package is run to find the
        module's tensors its code never reads (`_find_unread`: they are not kept alive)."""
        path = self.directory / f"{name}.pt2"
        if path.exists():
            try:
                runner = self._load(path, module)
            except Exception as exc:  # truncated or from an incompatible build: rebuild it
                logger.warning("static graph package %s unreadable (%s: %s); rebuilding it",
                               path, type(exc).__name__, exc)
            else:
                os.utime(self.directory)  # recently used: the last to be evicted
                self.loaded.append(name)
                return runner
        self._build(path, module, inputs, tracing, probing)
        self.built.append(name)
        self.evict()
        return self._load(path, module)

    def _load(self, path: Path, module: nn.Module) -> Callable[..., torch.Tensor]:
        """The package's runner with its constants: the module's own parameters and buffers
        where the package names them (the graph keeps them beside their packed forms, which
        the kernels read), the packed forms from the store, each loaded once per process
        however many buckets' graphs name it."""
        runner = torch._inductor.aoti_load_package(str(path))
        own = dict(module.state_dict(keep_vars=True))
        with zipfile.ZipFile(path) as archive:
            data = _data_prefix(archive)
            manifest = json.loads(archive.read(data + _MANIFEST))
            names = set(archive.namelist())
            unread = (set(json.loads(archive.read(data + _UNREAD))) if data + _UNREAD in names
                      else set())
        constants: dict[str, torch.Tensor] = {}
        for fqn in runner.get_constant_fqns():
            own_tensor = own.get(fqn)
            if own_tensor is None:
                constants[fqn] = self._stored_constant(manifest[fqn])
            elif fqn in unread:  # shape and dtype only: one element, never read
                constants[fqn] = _stand_in(own_tensor)
            else:
                constants[fqn] = own_tensor.detach()
        runner.load_constants(constants, check_full_update=True, user_managed=True)
        runner.constants = constants  # user-managed: they live as long as the runner
        return runner

    def _find_unread(self, path: Path, module: nn.Module, inputs: tuple[torch.Tensor, ...],
                     probing: Callable[[], contextlib.AbstractContextManager]) -> list[str]:
        """The module's tensors of at least `min_unread_bytes` that `path`'s code never reads.

        A frozen graph computes from the packed forms of the weights it was exported with, yet
        names the originals too (the dense copies the twin made of packed linears: 405 MiB of
        the 135M shape's 540 MB). Shown, not assumed: each candidate in turn is replaced by a
        tensor of NaNs of its shape, and it is unread if the outputs stay bit for bit those
        of the real weights (a read would spread the NaNs; `probing()` is a pass state whose
        attention passes its inputs on, so even the projections feeding it would show)."""
        runner = self._load(path, module)
        own = {fqn: t for fqn, t in module.state_dict(keep_vars=True).items()
               if fqn in runner.constants
               and t.numel() * t.element_size() >= self.min_unread_bytes}

        def outputs() -> list[torch.Tensor]:
            with torch.inference_mode(), probing():
                result = runner(*inputs)
            return [t.clone() for t in (result if isinstance(result, list | tuple)
                                        else [result])]

        reference = outputs()
        if not all(torch.isfinite(t).all() for t in reference):
            return []  # nothing can be shown on these inputs
        unread = []
        constants = dict(runner.constants)
        for fqn, tensor in own.items():
            trial = {**constants, fqn: torch.full_like(tensor.detach(), float("nan"))}
            runner.load_constants(trial, check_full_update=True, user_managed=True)
            if all(torch.equal(a, b) for a, b in zip(outputs(), reference, strict=True)):
                unread.append(fqn)
        # Leave the runner pointing at nothing of the module's (its constants are user-managed
        # raw pointers): stand-ins, as a load gives the unread ones.
        stand_ins = {fqn: _stand_in(t) if fqn in own else t for fqn, t in constants.items()}
        runner.load_constants(stand_ins, check_full_update=True, user_managed=True)
        runner.constants = stand_ins
        return sorted(unread)

    def _stored_constant(self, digest: str) -> torch.Tensor:
        """The packed constant with this digest: the tensor already loaded for another
        bucket's graph if one is alive, else read from the store and checked against its
        digest (about 1 s a GB; a mismatch makes the package unreadable, so it is rebuilt)."""
        tensor = _LOADED.get(digest)
        if tensor is None:
            path = self.directory / _STORE / f"{digest}.pt"
            blob = path.read_bytes()
            if _sha1_of(blob) != digest:  # a damaged file would be wrong weights, silently
                raise ValueError(f"{path}: contents do not match the digest it is named by")
            tensor = torch.load(io.BytesIO(blob), weights_only=True).detach()
            _LOADED[digest] = tensor
        if digest not in self.constant_digests:
            self.constant_digests.add(digest)
            self.constant_bytes += tensor.untyped_storage().nbytes()
        return tensor

    def _build(self, path: Path, module: nn.Module, inputs: tuple[torch.Tensor, ...],
               tracing: Callable[[], contextlib.AbstractContextManager],
               probing: Callable[[], contextlib.AbstractContextManager] | None = None) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        # Another process may build the same package: each writes its own files, then renames.
        partial = path.with_name(f"{path.stem}.{os.getpid()}-{threading.get_ident()}.partial.pt2")
        compiled = partial.with_name(partial.name.replace(".partial.", ".partial-aoti."))
        try:
            with torch.inference_mode(False), torch.no_grad(), tracing():
                exported = torch.export.export(module, inputs, strict=False)
            torch._inductor.aoti_compile_and_package(  # a copy: it adds keys to the dict
                exported, package_path=str(compiled), inductor_configs=dict(self.settings))
            self._externalize(compiled, partial, set(module.state_dict()))
            if probing is not None:
                unread = self._find_unread(partial, module, inputs, probing)
                with zipfile.ZipFile(partial, "a") as package:
                    package.writestr(_data_prefix(package) + _UNREAD, json.dumps(unread))
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
            compiled.unlink(missing_ok=True)

    def _externalize(self, compiled: Path, package: Path, own: set[str]) -> None:
        """`compiled` again as `package`, without its constants: the module's own tensors are
        dropped (`_load` hands them over), the packed forms go to the store by the SHA-1 of
        their bytes, named in a manifest inside the package."""
        store = self.directory / _STORE
        store.mkdir(exist_ok=True)
        manifest: dict[str, str] = {}
        with zipfile.ZipFile(compiled) as archive, zipfile.ZipFile(package, "w") as result:
            data = _data_prefix(archive)
            stored = json.loads(archive.read(data + _CONFIG))
            names = {data + "weights/" + meta[0]: fqn for fqn, meta in stored.items()}
            for info in archive.infolist():
                fqn = names.get(info.filename)
                if fqn is None:
                    result.writestr(info, archive.read(info))
                elif fqn not in own:
                    blob = archive.read(info)
                    digest = _sha1_of(blob)
                    _write_once(store / f"{digest}.pt", digest, blob)
                    manifest[fqn] = digest
            result.writestr(data + _MANIFEST, json.dumps(manifest, sort_keys=True))

    def evict(self) -> None:
        """Remove the least recently used models' packages until the root fits its bound."""
        models = [(d.stat().st_mtime, d) for d in self.spec.root.iterdir() if d.is_dir()]
        sizes = {d: _tree_bytes(d) for _, d in models}
        total = sum(sizes.values())
        for _, directory in sorted(models):
            if total <= self.spec.max_bytes:
                break
            if directory == self.directory:
                continue
            shutil.rmtree(directory, ignore_errors=True)
            total -= sizes[directory]
            logger.info("static graph packages: removed %s (%.2f GiB; bound %.1f GiB)",
                        directory, sizes[directory] / 2**30, self.spec.max_bytes / 2**30)
        if total > self.spec.max_bytes:
            logger.warning("static graph packages: this model's take %.2f GiB, more than "
                           "static_graph_cache_gib (%.1f GiB); kept, as they are in use",
                           total / 2**30, self.spec.max_bytes / 2**30)

    def disk_bytes(self) -> int:
        return _tree_bytes(self.directory)


def _tree_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
