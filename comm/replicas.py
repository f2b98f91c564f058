"""Replicas of several ranks: the 2-D mesh a cluster run needs, and both of its groups.

A DiLoCo worker (a *replica*) may itself be G ranks training one copy of the model with DDP
or FSDP2; DiLoCo then syncs across replicas, each rank with the ranks that hold the same
shard in the other replicas. With ``torchrun --nnodes R --nproc_per_node G`` and
:func:`init_replica_mesh`, replica ``r`` is node ``r``::

    from torch.distributed.fsdp import fully_shard
    from lowcomm import DiLoCo, TorchDistBackend
    from lowcomm.comm import init_replica_mesh

    rm = init_replica_mesh(num_replicas=2)                  # after init_process_group
    fully_shard(model, mesh=rm.mesh["shard"])               # FSDP2 inside the replica
    # or: model = DistributedDataParallel(model, process_group=rm.shard_group)
    opt = DiLoCo(model, inner, sync_every=500,
                 backend=TorchDistBackend(group=rm.replicate_group))

Every rank feeds its replica's data, split across the replica's ranks as DDP/FSDP expect.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

__all__ = ["ReplicaMesh", "init_replica_mesh"]


@dataclass(frozen=True)
class ReplicaMesh:
    """The mesh ``("replicate", "shard")`` and this rank's place in it.

    Attributes:
        mesh: the 2-D ``DeviceMesh``; ``mesh["shard"]`` for ``fully_shard``.
        replicate_group: the ranks holding the same shard in every replica: DiLoCo's group
            (``TorchDistBackend(group=replicate_group)``).
        shard_group: the ranks of this replica: DDP's ``process_group``.
        replica: this rank's replica index (the DiLoCo worker it belongs to).
        num_replicas: number of replicas (DiLoCo workers).
        shard_rank: this rank's index inside its replica.
        shard_size: ranks per replica.
    """

    mesh: Any
    replicate_group: dist.ProcessGroup
    shard_group: dist.ProcessGroup
    replica: int
    num_replicas: int
    shard_rank: int
    shard_size: int


def init_replica_mesh(num_replicas: int, device_type: str | None = None) -> ReplicaMesh:
    """Split the default group into ``num_replicas`` replicas of consecutive ranks.

    Collective over the default group (every rank calls it, after
    ``init_process_group``). Ranks ``r·G .. r·G+G−1`` form replica ``r``, so under
    ``torchrun --nnodes R --nproc_per_node G`` a replica is a node and the fast intra-node
    links carry DDP/FSDP traffic while DiLoCo's rare syncs cross nodes.

    Args:
        num_replicas: DiLoCo workers; must divide the world size.
        device_type: the mesh's device type; default ``"cuda"`` when the default group
            runs NCCL, else ``"cpu"``.

    Raises:
        RuntimeError: no process group is initialised.
        ValueError: ``num_replicas`` does not divide the world size.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "init_replica_mesh needs an initialised default process group "
            "(torch.distributed.init_process_group, or launch with torchrun)"
        )
    world = dist.get_world_size()
    if isinstance(num_replicas, bool) or not isinstance(num_replicas, int) or num_replicas < 1:
        raise ValueError(f"num_replicas ({num_replicas!r}) must be an integer >= 1")
    if world % num_replicas:
        raise ValueError(
            f"num_replicas ({num_replicas}) must divide the world size ({world}): every "
            f"replica has the same number of ranks"
        )
    from torch.distributed.device_mesh import init_device_mesh

    if device_type is None:
        device_type = "cuda" if "nccl" in str(dist.get_backend()) else "cpu"
    size = world // num_replicas
    mesh = init_device_mesh(
        device_type, (num_replicas, size), mesh_dim_names=("replicate", "shard")
    )
    rank = dist.get_rank()
    return ReplicaMesh(
        mesh=mesh,
        replicate_group=mesh["replicate"].get_group(),
        shard_group=mesh["shard"].get_group(),
        replica=rank // size,
        num_replicas=num_replicas,
        shard_rank=rank % size,
        shard_size=size,
    )
