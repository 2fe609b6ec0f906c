"""The plugin docs are code that runs, on the public API only.

Every Python block of docs/plugin-hooks.md and docs/writing-a-scheduler.md is executed and every
scheduler it defines serves requests; the docs and the plugin packages import nothing from
`runtime` but `runtime.api` (and the test kit); the worked layout of writing-a-scheduler.md,
installed from the page as a distribution of its own, passes the conformance suite.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.api import FinishReason, Request
from runtime.conformance import SchedulerConformance
from runtime.testing import greedy, make_engine
from tests.plugin_dist import install_fake_dist, uninstall_fake_dist

ROOT = Path(__file__).parent.parent
PAGES = ("plugin-hooks.md", "writing-a-scheduler.md")
PUBLIC = {"runtime", "runtime.api"}
TEST_KIT = {"runtime.testing", "runtime.conformance"}
PLUGIN_PACKAGES = ("baton_plugin", "orca_plugin", "plugins/static_plugin",
                   "plugins/template/sjf_scheduler")
ENGINE_INTERNAL = {"generator", "detokenizer", "stop_checker", "output_logprobs", "output_text",
                   "token_times", "last_token_time", "prompt"}
MODEL_SEED = 4


def python_blocks(page: str | Path) -> list[str]:
    """The page's Python blocks, but a hook's signature line (test_hooks.py checks those)."""
    text = (ROOT / "docs" / page).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    return [b for b in blocks if not re.fullmatch(r"\w+\(.*\) -> .+\n", b)]


def module_file(block: str) -> str | None:
    """`paged_layout.py` for a block that starts `# paged_layout.py`: a file, not a snippet."""
    match = re.match(r"# (\w+)\.py\n", block)
    return match.group(1) if match else None


def entry_points(page: str, module: str) -> dict[str, str]:
    """The page's `name = "module:Class"` entry-point lines for `module`."""
    text = (ROOT / "docs" / page).read_text()
    return dict(re.findall(rf'^(\w+) = "({module}:\w+)"$', text, re.M))


def runtime_imports(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n == "runtime" or n.startswith("runtime.")}


@pytest.fixture(scope="module")
def worked_layout(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """writing-a-scheduler.md's `paged_layout.py`, installed as the distribution it describes."""
    (source,) = [b for b in python_blocks("writing-a-scheduler.md")
                 if module_file(b) == "paged_layout"]
    eps = entry_points("writing-a-scheduler.md", "paged_layout")
    site = tmp_path_factory.mktemp("site")
    install_fake_dist(site, "paged-layout", eps, "paged_layout", source)
    yield eps
    uninstall_fake_dist(site, "paged_layout")


def test_the_worked_layout_is_declared_as_an_entry_point(worked_layout) -> None:
    assert worked_layout == {"paged": "paged_layout:PagedScheduler"}


@pytest.mark.parametrize("page", PAGES)
def test_every_code_block_runs_and_its_schedulers_serve(page: str, worked_layout, model) -> None:
    namespace: dict = {"__name__": f"docs.{page}"}
    for block in python_blocks(page):
        if module_file(block) is None:
            exec(compile(block, f"docs/{page}", "exec"), namespace)  # the docs, run as written
    plugins = [obj for obj in namespace.values()
               if isinstance(obj, type) and obj.__module__ == namespace["__name__"]
               and any(hasattr(f, "baton_runtime_impl") for f in vars(obj).values())]
    assert plugins, f"docs/{page} defines no plugin"
    for cls in plugins:
        engine = make_engine(model, cls(), cls.__name__, max_num_seqs=2)
        reqs = engine.generate([[1, 2, 3], [4, 5], [6, 7, 8, 9]], greedy(3))
        assert [(r.finish_reason, r.error) for r in reqs] == [(FinishReason.LENGTH, None)] * 3
        assert engine.kv_cache.is_empty()


@pytest.mark.parametrize("path", sorted((ROOT / "docs").glob("*.md")) + [
    ROOT / "plugins" / "template" / "README.md"], ids=lambda p: p.name)
def test_docs_import_only_the_public_api(path: Path) -> None:
    blocks = python_blocks(path)
    used = set().union(*(runtime_imports(b) for b in blocks)) if blocks else set()
    assert used <= PUBLIC | TEST_KIT, f"{path.name} imports {sorted(used - PUBLIC - TEST_KIT)}"


@pytest.mark.parametrize("package", PLUGIN_PACKAGES)
def test_plugins_import_only_the_public_api(package: str) -> None:
    for path in sorted((ROOT / package).glob("*.py")):
        allowed = PUBLIC | TEST_KIT if path.name == "trace.py" else PUBLIC  # a tool, not the plugin
        used = runtime_imports(path.read_text())
        assert used <= allowed, f"{path} imports {sorted(used - allowed)}"


def test_every_request_field_is_documented() -> None:
    doc = (ROOT / "docs" / "plugin-hooks.md").read_text()
    table = doc.split("## `Request`", 1)[1].split("\n## ", 1)[0]
    public = {f.name for f in dataclasses.fields(Request)} - ENGINE_INTERNAL
    public |= {n for n, v in vars(Request).items()
               if not n.startswith("_") and (isinstance(v, property) or callable(v))}
    missing = sorted(n for n in public if f"`{n}" not in table)
    assert not missing, f"docs/plugin-hooks.md does not explain Request.{missing}"


@pytest.mark.usefixtures("worked_layout")
class TestWorkedLayout(SchedulerConformance):
    """The conformance suite over the docs' paged layout, installed from the page."""

    scheduler = "paged"
    scheduler_options = {"block_size": 4}
