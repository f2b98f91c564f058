"""Splitting a model's parameters into fragments for streaming sync.

``strided`` (the default) spans the depth of the model in every fragment: the repeated blocks
(the largest ``nn.ModuleList``, e.g. a transformer's layers) go round-robin, fragment ``p``
getting blocks ``p, p+P, p+2P, ...``, as in Streaming DiLoCo; the parameters outside the
blocks (embeddings, head, final norm) are then placed largest first on the lightest fragment,
so they don't pile into one. When the block count is not a multiple of ``P`` a strict stride
would leave some fragments a whole block heavier, so blocks are balanced greedily as well.
``sequential`` cuts the parameters, in model order, into ``P`` runs of about equal bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["fragment_bytes", "partition"]


def _nbytes(params: Sequence[nn.Parameter]) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def fragment_bytes(fragments: Sequence[Sequence[nn.Parameter]]) -> list[int]:
    """Bytes of each fragment's parameters (in their own dtype)."""
    return [_nbytes(f) for f in fragments]


def _find_blocks(model: nn.Module, trainable: set[int]) -> list[list[nn.Parameter]]:
    best: list[list[nn.Parameter]] = []
    best_numel = 0
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            blocks = [[p for p in m.parameters() if id(p) in trainable] for m in module]
            numel = sum(p.numel() for b in blocks for p in b)
            if numel > best_numel:
                best, best_numel = blocks, numel
    return [b for b in best if b]


def _greedy(
    units: list[list[nn.Parameter]], loads: list[int], out: list[list[nn.Parameter]]
) -> None:
    # Largest first onto the lightest fragment (LPT): within 4/3 of optimal, and exact
    # round-robin for equal-size units.
    for unit in sorted(units, key=_nbytes, reverse=True):
        p = min(range(len(loads)), key=lambda i: (loads[i], i))
        out[p].extend(unit)
        loads[p] += _nbytes(unit)


def partition(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    num_fragments: int,
    strategy: str = "strided",
) -> list[list[nn.Parameter]]:
    """Split ``params`` (a subset of ``model``'s) into ``num_fragments`` disjoint fragments.

    Args:
        model: the model, for its module structure.
        params: the parameters to split (trainable ones, in model order).
        num_fragments: ``P``.
        strategy: ``"strided"`` or ``"sequential"``.

    Returns:
        ``P`` lists of parameters; every parameter of ``params`` is in exactly one, each list
        keeps model order.

    Raises:
        ValueError: unknown strategy, ``P < 1`` or more fragments than parameters.
    """
    if strategy not in ("strided", "sequential"):
        raise ValueError(f"fragment strategy {strategy!r} is not one of 'strided', 'sequential'")
    if num_fragments < 1:
        raise ValueError(f"fragments ({num_fragments}) must be >= 1")
    if num_fragments > len(params):
        raise ValueError(
            f"fragments ({num_fragments}) must not exceed the number of trainable "
            f"parameters ({len(params)})"
        )
    order = {id(p): i for i, p in enumerate(params)}
    out: list[list[nn.Parameter]] = [[] for _ in range(num_fragments)]
    if strategy == "sequential":
        total = _nbytes(params)
        acc, frag = 0, 0
        for i, p in enumerate(params):
            remaining_params = len(params) - i
            remaining_frags = num_fragments - frag
            # Move on when this fragment has its share, but never leave a fragment empty.
            if (
                out[frag]
                and frag < num_fragments - 1
                and (
                    acc >= (frag + 1) * total / num_fragments
                    or remaining_params <= remaining_frags - 1
                )
            ):
                frag += 1
            out[frag].append(p)
            acc += _nbytes([p])
    else:
        blocks = _find_blocks(model, set(order))
        in_blocks = {id(p) for b in blocks for p in b}
        rest = [[p] for p in params if id(p) not in in_blocks]
        loads = [0] * num_fragments
        if blocks and len(blocks) % num_fragments == 0:
            for i, block in enumerate(blocks):
                out[i % num_fragments].extend(block)
                loads[i % num_fragments] += _nbytes(block)
        else:
            rest = blocks + rest
        _greedy(rest, loads, out)
        if any(not f for f in out):
            # Fewer blocks and leftovers than fragments: fall back to single parameters.
            out = [[] for _ in range(num_fragments)]
            _greedy([[p] for p in params], [0] * num_fragments, out)
        for members in out:
            members.sort(key=lambda q: order[id(q)])
    sizes = fragment_bytes(out)
    if len(out) > 1 and max(sizes) > 1.1 * sum(sizes) / len(out):
        logger.info(
            "fragments are unbalanced: largest %d bytes vs %d mean (parameters are never split, "
            "so one large tensor bounds the peak)",
            max(sizes),
            sum(sizes) // len(out),
        )
    empty = [i for i, f in enumerate(out) if not f]
    if empty:
        raise ValueError(
            f"fragments {empty} would be empty: {num_fragments} fragments for parameters of "
            f"sizes {[p.numel() for p in params]}; use fewer fragments"
        )
    return out


def check_partition(
    params: Sequence[nn.Parameter], fragments: Sequence[Sequence[nn.Parameter]]
) -> None:
    """Raise ValueError unless ``fragments`` holds every one of ``params`` exactly once.

    Args:
        params: the parameters that must be covered.
        fragments: a user-supplied split.
    """
    if not fragments:
        raise ValueError("fragments must be a non-empty list of parameter lists")
    known = {id(p) for p in params}
    seen: dict[int, int] = {}
    for i, frag in enumerate(fragments):
        if not frag:
            raise ValueError(f"fragment {i} is empty; every fragment needs a parameter")
        for p in frag:
            if id(p) not in known:
                raise ValueError(
                    f"fragment {i} holds a parameter of shape {tuple(p.shape)} that is not a "
                    f"trainable parameter of the model in the inner optimizer"
                )
            if id(p) in seen:
                raise ValueError(
                    f"a parameter of shape {tuple(p.shape)} is in fragments {seen[id(p)]} "
                    f"and {i}; each parameter must be in exactly one"
                )
            seen[id(p)] = i
    missing = [tuple(p.shape) for p in params if id(p) not in seen]
    if missing:
        raise ValueError(
            f"{len(missing)} trainable parameter(s) are in no fragment (shapes {missing[:5]})"
        )
