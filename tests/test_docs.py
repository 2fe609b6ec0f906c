"""The configuration reference lists every key RuntimeConfig accepts."""

from pathlib import Path

from runtime.config import CONFIG_KEYS

DOCS = Path(__file__).parent.parent / "docs"


def test_every_config_key_is_documented() -> None:
    text = (DOCS / "configuration.md").read_text()
    missing = [key for key in CONFIG_KEYS if f"`{key}`" not in text]
    assert not missing, f"docs/configuration.md lacks: {missing}"
