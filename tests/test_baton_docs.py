"""docs/baton.md's worked example is the output of the code, not a drawing of it."""

from __future__ import annotations

from pathlib import Path

import torch

from baton_plugin.trace import worked_example

DOC = Path(__file__).parent.parent / "docs" / "baton.md"


def test_worked_example_matches_the_code() -> None:
    text = DOC.read_text()
    block = text.split("<!-- example:start -->\n```text\n", 1)[1].split(
        "```\n<!-- example:end -->"
    )[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generated = worked_example()
    finally:
        torch.set_num_threads(threads)
    assert block.strip() == generated.strip(), "regenerate: python -m baton_plugin.trace"


def test_scheduler_options_are_documented() -> None:
    import inspect

    from baton_plugin import BatonScheduler

    text = DOC.read_text()
    for name in inspect.signature(BatonScheduler).parameters:
        assert f"{name}:" in text, f"docs/baton.md lacks the option {name}"
