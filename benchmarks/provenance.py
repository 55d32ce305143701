"""Where a benchmark's figures come from: the card, the software, the commit and the command. Every
benchmark writes these into its JSON, and `results_tables.py` prints them beside the figures."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from pathlib import Path


def commit() -> str:
    """``MOBA_COMMIT`` where set (code copied onto a lent GPU machine, whose git history is not the
    code's), else the checkout's commit (``+`` when it has uncommitted changes)."""
    if os.environ.get("MOBA_COMMIT"):
        return os.environ["MOBA_COMMIT"]
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance() -> dict:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return dict(
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        torch=torch.__version__,
        triton=triton_version,
        commit=commit(),
        date=datetime.date.today().isoformat(),
        command="python " + " ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
    )
