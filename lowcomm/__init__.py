"""lowcomm: low-communication decentralized training (DiLoCo, Streaming DiLoCo)."""

from __future__ import annotations

from typing import Any

from lowcomm.comm import (
    Backend,
    ElasticBackend,
    LocalBackend,
    ReplicaMesh,
    TorchDistBackend,
    init_replica_mesh,
)
from lowcomm.comm.compression import (
    BF16,
    FP16,
    Compressor,
    ErrorFeedback,
    Int4,
    Int8,
    TopK,
    parse_compression,
    sparseloco,
)
from lowcomm.optim import (
    DeadlineSchedule,
    DiLoCo,
    DiLoCoStats,
    MemoryReport,
    StaggeredSchedule,
)

__version__ = "0.1.0"

__all__ = [
    "BF16",
    "FP16",
    "Backend",
    "Compressor",
    "DeadlineSchedule",
    "DiLoCo",
    "DiLoCoStats",
    "ElasticBackend",
    "ErrorFeedback",
    "HivemindBackend",
    "Int4",
    "Int8",
    "LocalBackend",
    "MemoryReport",
    "ReplicaMesh",
    "StaggeredSchedule",
    "TopK",
    "TorchDistBackend",
    "init_replica_mesh",
    "parse_compression",
    "sparseloco",
]


def __getattr__(name: str) -> Any:
    if name == "HivemindBackend":  # lazily, through lowcomm.comm: hivemind is an extra
        from lowcomm import comm

        return comm.HivemindBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
