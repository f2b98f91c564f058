"""What the workers of one run must agree on, as fingerprints they compare at start.

Workers that disagree on any of these would average numbers that do not belong together and
drift apart silently; the backend compares the fingerprints (``check_consistent``) and
refuses the start instead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from lowcomm.comm.compression.base import Compressor
from lowcomm.comm.compression.feedback import ErrorFeedback
from lowcomm.comm.compression.registry import compression_spec
from lowcomm.optim.params import local_view, shard_signature

__all__ = ["config_fingerprint", "shard_fingerprint"]


def config_fingerprint(
    names: Sequence[str],
    params: Sequence[torch.Tensor],
    schedule: str,
    fragments: Sequence[Sequence[str]],
    overlap_mode: str,
    overlap_steps: int,
    mix: float,
    compression: Compressor | ErrorFeedback | None,
    outer: Sequence[torch.optim.Optimizer],
) -> str:
    """A digest of the model layout (names, local shapes, dtypes), the schedule (its repr:
    kind, ``H``, ``P``, round length), each
    fragment's members by name, the overlap settings, the compression and every outer
    optimizer's class and hyperparameters."""
    layout = [(n, tuple(local_view(p).shape), str(p.dtype)) for n, p in zip(names, params)]
    outer_settings = [
        (
            type(o).__module__ + "." + type(o).__qualname__,
            [sorted((k, repr(v)) for k, v in g.items() if k != "params") for g in o.param_groups],
        )
        for o in outer
    ]
    blob = repr(
        (
            layout,
            schedule,
            [list(f) for f in fragments],
            overlap_mode,
            overlap_steps,
            mix,
            compression_spec(compression),
            outer_settings,
        )
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def shard_fingerprint(names: Sequence[str], params: Sequence[torch.Tensor]) -> str | None:
    """A digest of which shard of each sharded (DTensor) parameter this rank holds, or None
    when no parameter is sharded. Equal only on ranks that hold the same shards."""
    shards = [shard_signature(p) for p in params]
    if all(s is None for s in shards):
        return None
    return "shards:" + hashlib.sha256(repr(list(zip(names, shards))).encode()).hexdigest()
