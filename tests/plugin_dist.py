"""Install a throwaway scheduler distribution on sys.path, as a third party would ship one."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path


def install_fake_dist(site: Path, dist: str, entry_points: dict[str, str], module: str,
                      source: str) -> None:
    """Write `<module>.py` and a `<dist>-1.0.dist-info` registering `entry_points`."""
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    lines = "\n".join(f"{name} = {value}" for name, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[baton_runtime.schedulers]\n{lines}\n")
    sys.path.insert(0, str(site))


def uninstall_fake_dist(site: Path, module: str) -> None:
    if str(site) in sys.path:
        sys.path.remove(str(site))
    sys.modules.pop(module, None)
