"""The benchmarks' shared ending: the JSON report written where ``--out`` says."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_report(report: dict[str, Any], out: str | Path) -> Path:
    """Write ``report`` as indented JSON to ``out`` (its folders created); returns the path."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
