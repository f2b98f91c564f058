"""How bytes move: the Backend protocol, its implementations, and compression.

``HivemindBackend`` is imported lazily so that ``import lowcomm.comm`` works without the
``hivemind`` extra installed.
"""

from __future__ import annotations

from typing import Any

from lowcomm.comm.base import (
    AverageResult,
    AverageWork,
    Backend,
    ConsistencyError,
    DoneWork,
    WireStats,
)
from lowcomm.comm.compression.base import Compressor, Payload, PayloadError
from lowcomm.comm.local import LocalBackend
from lowcomm.comm.torch_dist import TorchDistBackend

__all__ = [
    "AverageResult",
    "AverageWork",
    "Backend",
    "Compressor",
    "ConsistencyError",
    "DoneWork",
    "HivemindBackend",
    "LocalBackend",
    "Payload",
    "PayloadError",
    "TorchDistBackend",
    "WireStats",
]


def __getattr__(name: str) -> Any:
    if name == "HivemindBackend":
        from lowcomm.comm.hivemind import HivemindBackend

        return HivemindBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
