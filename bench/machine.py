"""What the numbers were measured on, and the thread count they were measured with."""

from __future__ import annotations

import datetime
import os
import platform
import sys
from typing import Any


def machine_info() -> dict[str, Any]:
    import torch

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "load_average_1m": load_average(),
        "command": " ".join(sys.argv),
    }


def load_average() -> float:
    """Recorded before and after: other jobs on a shared machine stretch every timing."""
    return os.getloadavg()[0]


def set_threads(threads: int) -> None:
    """Pin torch threads here and, through OMP_NUM_THREADS, in subprocess workers too."""
    if threads <= 0:
        return
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
