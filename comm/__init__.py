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
    ElasticBackend,
    WireStats,
)
from lowcomm.comm.compression.base import Compressor, Payload, PayloadError
from lowcomm.comm.local import LocalBackend
from lowcomm.comm.replicas import ReplicaMesh, init_replica_mesh
from lowcomm.comm.torch_dist import TorchDistBackend, init_process_group_from_env

__all__ = [
    "AverageResult",
    "AverageWork",
    "Backend",
    "Compressor",
    "ConsistencyError",
    "DoneWork",
    "ElasticBackend",
    "HivemindBackend",
    "LocalBackend",
    "Payload",
    "PayloadError",
    "ReplicaMesh",
    "TorchDistBackend",
    "WireStats",
    "init_process_group_from_env",
    "init_replica_mesh",
]


def __getattr__(name: str) -> Any:
    if name == "HivemindBackend":
        from lowcomm.comm.hivemind import HivemindBackend

        return HivemindBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
