"""Where a result came from: the commit (``git describe --always --dirty``), date and versions.

The copy of the checkout on the GPU machine carries a stale ``.git`` (or none), so the caller
passes the description made here in ``$PAGEDKV_GIT_DESCRIBE``, which wins when set.
"""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def git_describe() -> str:
    """``$PAGEDKV_GIT_DESCRIBE`` when set, else ``git describe --always --dirty``."""
    given = os.environ.get("PAGEDKV_GIT_DESCRIBE", "").strip()
    if given:
        return given
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=False,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except OSError:
        pass
    return "unknown"


def provenance() -> dict[str, Any]:
    """The fields every results JSON starts with."""
    info: dict[str, Any] = {
        "git_describe": git_describe(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info
