"""The parameters DiLoCo syncs: their local shards, their identity across workers, their repair.

Under FSDP2 (``fully_shard``) every parameter is a ``DTensor`` and each rank holds one shard
of it; DiLoCo syncs that local shard with the same shard of the other replicas, so all of its
arithmetic runs on :func:`local_view` (a plain tensor sharing the shard's storage). Which
shard a rank holds is part of what the workers of one DiLoCo group must agree on
(:func:`shard_signature`), so a group that spans shards is refused instead of averaging
different slices of a weight with each other.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "fp32_copy",
    "local_view",
    "refuse_flat_parameters",
    "repair_nonfinite",
    "reshard_optimizer_state",
    "shard_signature",
    "single_device",
    "synced_parameters",
]


def _dtensor_type() -> Any:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return DTensor


def local_view(param: torch.Tensor) -> torch.Tensor:
    """The part of ``param`` this process holds: its local shard for a DTensor, else itself.

    In-place writes to the view change the parameter (FSDP2's sharded parameters keep their
    local shard as a view of their storage).
    """
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(param, dtensor):
        return cast(Any, param).to_local()
    return param


def shard_signature(param: torch.Tensor) -> tuple[object, ...] | None:
    """Which shard of ``param`` this process holds, or None if it holds all of it.

    For a DTensor: its global shape, placements, mesh dimension names and this rank's
    coordinate on its mesh. Two workers may average a parameter only if they hold the same
    shard of it, i.e. have the same signature.
    """
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(param, dtensor):
        return None
    sharded: Any = param
    mesh = sharded.device_mesh
    return (
        tuple(param.shape),
        tuple(str(p) for p in sharded.placements),
        tuple(mesh.mesh_dim_names or ()),
        tuple(mesh.get_coordinate() or ()),
    )


def refuse_flat_parameters(model: nn.Module) -> None:
    """Raise TypeError for an FSDP1-wrapped model.

    FSDP1 flattens parameters into per-rank slices whose names and shapes do not say which
    slice a rank holds: ranks holding different slices would pass every start-up check and
    be averaged with each other, a silently wrong result.
    """
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch built without distributed
        return
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise TypeError(
            "DiLoCo does not sync FSDP1 (FullyShardedDataParallel) models: its flat shards "
            "cannot be matched across replicas. Shard with FSDP2 instead "
            "(torch.distributed.fsdp.fully_shard(model, mesh=mesh['shard'])) and pass "
            "TorchDistBackend(group=<cross-replica group>); see lowcomm.comm.init_replica_mesh"
        )


def repair_nonfinite(
    params: Sequence[torch.Tensor],
    global_params: Sequence[torch.Tensor],
    inner: torch.optim.Optimizer,
) -> list[int]:
    """Reset every parameter whose local values or inner-optimizer state are not finite.

    Such a parameter gets its global value back, and its inner-optimizer state is dropped
    (the optimizer starts it afresh at the next step, as for a new parameter): a NaN in
    Adam's moments would otherwise make every later step NaN, and the worker would sit out
    every later round.

    Args:
        params: the synced parameters (DTensors allowed).
        global_params: their global values, in the same order.
        inner: the inner optimizer, whose ``state`` is keyed by ``params``.

    Returns:
        The indices of the parameters that were reset.
    """
    checks = []
    for p in params:
        local = local_view(p)
        state = inner.state.get(p, {})
        tensors = [local] + [
            local_view(v)
            for v in state.values()
            if isinstance(v, torch.Tensor) and v.is_floating_point()
        ]
        # Adam keeps its step count on the host even for GPU parameters: gather the verdicts
        # on the parameter's device so that one read back covers them all.
        flags = [torch.isfinite(t).all().to(local.device) for t in tensors]
        checks.append(torch.stack(flags).all())
    # One read back for all parameters; this runs only after a round that was not finite.
    bad = [i for i, ok in enumerate(torch.stack(checks).tolist()) if not ok]
    with torch.no_grad():
        for i in bad:
            local_view(params[i]).copy_(global_params[i])
            inner.state.pop(params[i], None)
    return bad


def synced_parameters(
    model: nn.Module, inner: torch.optim.Optimizer
) -> tuple[list[str], list[nn.Parameter]]:
    """The model's trainable parameters that ``inner`` steps, with their names, in model order."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    model_ids = {id(p) for p in model.parameters()}
    inner_ids = [id(p) for g in inner.param_groups for p in g["params"]]
    foreign = [i for i in inner_ids if i not in model_ids]
    if foreign:
        raise ValueError(
            f"inner_optimizer holds {len(foreign)} parameter(s) that are not the model's; "
            f"build it from model.parameters()"
        )
    inner_set = set(inner_ids)
    unstepped = [n for n, p in named if id(p) not in inner_set]
    if unstepped:
        logger.warning(
            "DiLoCo: %d trainable parameter(s) are not in the inner optimizer and will not "
            "be synced: %s",
            len(unstepped),
            unstepped[:5],
        )
    names = [n for n, p in named if id(p) in inner_set]
    params = [p for n, p in named if id(p) in inner_set]
    if not params:
        raise ValueError("the model has no trainable parameters in the inner optimizer")
    return names, params


def single_device(names: list[str], params: list[nn.Parameter]) -> torch.device:
    """The one device every synced parameter (its local shard) lives on.

    Raises:
        ValueError: the parameters live on several devices.
    """
    devices = {local_view(p).device for p in params}
    if len(devices) != 1:
        where = {
            str(d): [n for n, p in zip(names, params) if local_view(p).device == d][:3]
            for d in devices
        }
        raise ValueError(
            f"DiLoCo syncs parameters that live on one device, but they are on {where}; "
            f"move the model to one device (global_device= may still be 'cpu')"
        )
    return devices.pop()


def fp32_copy(t: torch.Tensor, device: torch.device, pin: bool) -> torch.Tensor:
    """A new fp32 copy of ``t`` on ``device`` (in pinned host memory with ``pin``)."""
    out = torch.empty(t.shape, dtype=torch.float32, device=device, pin_memory=pin)
    out.copy_(t.detach())
    return out


def reshard_optimizer_state(
    optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]
) -> dict[str, Any]:
    """``state_dict`` with local-shard state of DTensor parameters wrapped as DTensors again.

    :meth:`DiLoCo.state_dict` saves each rank's optimizer state as host copies of its local
    shards (a per-rank checkpoint needs nothing more). ``torch.optim`` would load those as
    plain tensors beside DTensor parameters and fail at the next step; this re-wraps every
    state tensor shaped like its parameter's local shard with the parameter's mesh and
    placements (scalars such as Adam's step stay as they are).
    """
    dtensor = _dtensor_type()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if dtensor is None or not any(isinstance(p, dtensor) for p in params):
        return state_dict
    state: dict[Any, Any] = {}
    for index, entry in state_dict["state"].items():
        param: Any = params[int(index)]
        if isinstance(param, dtensor):
            local = param.to_local()
            entry = {
                key: dtensor.from_local(
                    value.to(local.device),
                    param.device_mesh,
                    param.placements,
                    run_check=False,
                    shape=param.shape,
                    stride=param.stride(),
                )
                if isinstance(value, torch.Tensor)
                and not isinstance(value, dtensor)
                and value.dim() > 0
                and value.shape == local.shape
                else value
                for key, value in entry.items()
            }
        state[index] = entry
    return {**state_dict, "state": state}
