"""What the numbers were measured on: CPU, cores, GPU, torch, Python, kernel, date, load.

Every results file records it, so that a table is never read without its machine.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import sys
from pathlib import Path
from typing import Any

from scripts.bench import REPO

__all__ = ["machine_info", "python_command"]


def python_command() -> str:
    """This interpreter as a results file records it: relative to the checkout if inside it."""
    python = Path(sys.executable)
    with contextlib.suppress(ValueError):
        python = python.relative_to(REPO)
    return str(python)


def machine_info() -> dict[str, Any]:
    """The machine, the software and the 1-minute load average, now."""
    import torch

    cpu = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "cpu_model": cpu or platform.processor() or None,
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    with contextlib.suppress(OSError):
        info["loadavg_1m"] = float(Path("/proc/loadavg").read_text().split()[0])
    return info
