"""DiLoCo's state in one format, for checkpoints and for peers joining a swarm.

The state has two parts:

* **shared**: what every worker of a run holds identically, and what a joining peer
  downloads: ``param.<name>`` (θ), ``outer.<fragment>.<name>.<key>`` (each outer
  optimizer's per-parameter state tensors) and the counters ``meta.outer_step`` (fragment
  syncs applied) and ``meta.inner_steps``. A flat ``dict[str, Tensor]``: a swarm moves it
  as tensors (nothing from a peer is ever unpickled).
* **worker**: what is this worker's own: error-feedback residuals, syncs in flight, the
  schedule position, counters.

``DiLoCo.state_dict()["lowcomm"]`` holds both (the shared part as host copies); an elastic
backend's ``sync_state``/``publish_state`` carry the shared part. Loading either goes through
:func:`load_shared`, so a resumed worker and a joined one are built from the same tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lowcomm.comm.base import AverageResult

__all__ = [
    "load_shared",
    "outer_extras",
    "pending_record",
    "pending_result",
    "restore_outer_extras",
    "shared_tensors",
    "upgrade_v1",
]


def _outer_key(fragment: int, name: str, key: str) -> str:
    return f"outer.{fragment}.{name}.{key}"


def shared_tensors(
    names: Sequence[str],
    fragments: Sequence[Sequence[int]],
    global_params: Sequence[torch.Tensor],
    outer: Sequence[torch.optim.Optimizer],
    fragment_syncs: int,
    inner_steps: int,
) -> dict[str, torch.Tensor]:
    """The shared part, as references to the live tensors (``sync_state`` writes into them).

    Outer-optimizer state a parameter does not have yet (SGD's momentum before the first
    outer step) is simply absent.
    """
    state = {f"param.{n}": g for n, g in zip(names, global_params)}
    for f, (frag, opt) in enumerate(zip(fragments, outer)):
        for i in frag:
            for key, value in sorted(opt.state.get(global_params[i], {}).items()):
                if isinstance(value, torch.Tensor):
                    state[_outer_key(f, names[i], key)] = value
    state["meta.outer_step"] = torch.tensor([fragment_syncs])
    state["meta.inner_steps"] = torch.tensor([inner_steps])
    return state


def load_shared(
    tensors: dict[str, torch.Tensor],
    names: Sequence[str],
    fragments: Sequence[Sequence[int]],
    global_params: Sequence[torch.Tensor],
    outer: Sequence[torch.optim.Optimizer],
) -> tuple[int, int]:
    """Copy a shared part into θ and the outer optimizers' state.

    Returns:
        (fragment syncs applied, inner steps) from its counters.

    Raises:
        ValueError: a θ entry is missing or has another shape, or an outer state entry names
            no parameter of its fragment.
    """
    known: dict[str, tuple[int, int]] = {}
    for f, frag in enumerate(fragments):
        for i in frag:
            known[f"outer.{f}.{names[i]}."] = (f, i)
    with torch.no_grad():
        for name, g in zip(names, global_params):
            saved = tensors.get(f"param.{name}")
            if saved is None or tuple(saved.shape) != tuple(g.shape):
                raise ValueError(
                    f"DiLoCo state has no global parameter {name!r} of shape {tuple(g.shape)} "
                    f"(got {None if saved is None else tuple(saved.shape)})"
                )
            g.copy_(saved)
        for key, value in tensors.items():
            if not key.startswith("outer."):
                continue
            prefix, _, field = key.rpartition(".")
            where = known.get(prefix + ".")
            if where is None:
                raise ValueError(f"DiLoCo state holds {key!r}, which names no synced parameter")
            f, i = where
            g = global_params[i]
            # Scalars (Adam's step) stay where torch keeps them; the rest lives with θ.
            device = value.device if value.dim() == 0 else g.device
            outer[f].state[g][field] = value.detach().to(device, copy=True)
    return int(tensors["meta.outer_step"].reshape(-1)[0]), int(
        tensors["meta.inner_steps"].reshape(-1)[0]
    )


def outer_extras(outer: Sequence[torch.optim.Optimizer]) -> list[dict[str, Any]]:
    """What :func:`shared_tensors` leaves out of each outer optimizer: its hyperparameters
    (``param_groups`` without the parameters) and any per-parameter state that is not a
    tensor, by parameter index."""
    extras = []
    for opt in outer:
        sd = opt.state_dict()
        extras.append(
            {
                "param_groups": sd["param_groups"],
                "non_tensor_state": {
                    index: {k: v for k, v in st.items() if not isinstance(v, torch.Tensor)}
                    for index, st in sd["state"].items()
                    if any(not isinstance(v, torch.Tensor) for v in st.values())
                },
            }
        )
    return extras


def restore_outer_extras(
    outer: Sequence[torch.optim.Optimizer], extras: Sequence[dict[str, Any]]
) -> None:
    """Put back what :func:`outer_extras` saved (after :func:`load_shared`)."""
    for opt, extra in zip(outer, extras):
        params = [p for group in opt.param_groups for p in group["params"]]
        for group, saved in zip(opt.param_groups, extra["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})
        for index, values in extra["non_tensor_state"].items():
            opt.state[params[int(index)]].update(values)


def pending_record(result: AverageResult, weight: float, nbytes: int) -> dict[str, Any]:
    """A waited-for sync's result as plain values and host tensors, for a checkpoint."""
    return {
        "weight": weight,
        "nbytes": nbytes,
        "mean": result.mean.detach().to("cpu", copy=True),
        "own": result.own.detach().to("cpu", copy=True),
        "num_peers": result.num_peers,
        "total_weight": result.total_weight,
        "own_weight": result.own_weight,
        "bytes_sent": result.bytes_sent,
        "bytes_received": result.bytes_received,
    }


def pending_result(item: dict[str, Any], device: torch.device) -> AverageResult:
    """The :class:`AverageResult` a :func:`pending_record` saved, on ``device``."""
    return AverageResult(
        item["mean"].reshape(-1).to(device),
        item["own"].reshape(-1).to(device),
        item["num_peers"],
        item["total_weight"],
        item["own_weight"],
        item["bytes_sent"],
        item["bytes_received"],
    )


def upgrade_v1(
    old: dict[str, Any], layout_keys: Sequence[str], num_fragments: int
) -> dict[str, Any]:
    """A lowcomm 0.1.0 ``"lowcomm"`` state (format version 1) in today's format."""
    shared: dict[str, torch.Tensor] = {f"param.{n}": t for n, t in zip(old["names"], old["global"])}
    for f, (frag, osd) in enumerate(zip(old["fragments"], old["outer"])):
        for index, st in osd["state"].items():
            name = old["names"][frag[int(index)]]
            for key, value in st.items():
                if isinstance(value, torch.Tensor):
                    shared[f"outer.{f}.{name}.{key}"] = value
    shared["meta.outer_step"] = torch.tensor([old["stats"]["fragment_syncs"]])
    shared["meta.inner_steps"] = torch.tensor([old["inner_steps"]])
    pending = []
    for item in old["pending"]:
        # v1 kept one tensor per input and the caller-side roundtrip as "sent".
        pending.append(
            {
                **item,
                "mean": item["result"][0],
                "own": item["sent"],
                "own_weight": item["weight"],
                "bytes_received": item.get("bytes_received", 0),
            }
        )
    layout = {k: old[k] for k in layout_keys}
    extras = [{"param_groups": osd["param_groups"], "non_tensor_state": {}} for osd in old["outer"]]
    worker = {
        "feedback": old["feedback"],
        "last_sync": old["last_sync"],
        "skipped_in_a_row": [0] * num_fragments,
        "pending": pending,
        "stats": old["stats"],
        "counters": old["counters"],
    }
    return {"layout": layout, "shared": shared, "outer_extras": extras, "worker": worker}
