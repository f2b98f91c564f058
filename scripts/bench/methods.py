"""Training methods by name: ``diloco-h20-int8`` or ``streaming-p4-h100`` parses into the
recipe options it sets (:func:`parse_method`). The profiles (:mod:`scripts.bench.profiles`)
group them into benchmark matrices.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any


@dataclasses.dataclass(frozen=True)
class Method:
    """One training method: a name and the recipe options it sets.

    Names are ``-``-separated tokens (see :func:`parse_method`), e.g. ``ddp``, ``local``,
    ``diloco-h20``, ``diloco-h20-int8``, ``diloco-h20-topk0.01-ef``, ``streaming-p4-h20``.

    Attributes:
        name: the canonical name.
        overrides: recipe options (``mode``, ``sync_every``, ``compression`` ...).
        label: a human-readable label for tables and plots.
    """

    name: str
    overrides: tuple[tuple[str, Any], ...]
    label: str

    @property
    def options(self) -> dict[str, Any]:
        """The recipe options as a dict."""
        return dict(self.overrides)

    @property
    def mode(self) -> str:
        """The recipe ``--mode``."""
        return str(self.options["mode"])

    @property
    def swarm(self) -> bool:
        """Whether the workers are hivemind swarm peers (one bootstrap DHT, no process group)."""
        return self.options.get("backend") == "hivemind"

    @property
    def peer(self) -> str | None:
        """The peer library (``torchft``, ``hivemind``) that runs this method, or None for
        lowcomm's recipe."""
        value = self.options.get("peer")
        return None if value is None else str(value)

    @property
    def sync_every(self) -> int | None:
        """H, or None for DP and local training."""
        value = self.options.get("sync_every")
        return None if value is None else int(value)


#: The peer libraries' optimizers (:mod:`scripts.bench.peers`), by method kind.
PEER_LABELS = {
    "torchft": "torchft DiLoCo",
    "hivemind": "hivemind Optimizer (local updates)",
}


def parse_method(name: str) -> Method:
    """Build a :class:`Method` from its name.

    Grammar: a kind (``ddp``, ``local``, ``diloco``, ``streaming``, or ``swarm``: DiLoCo over
    the hivemind backend, every worker a peer found through a bootstrap DHT; or a peer
    library's optimizer on the same task, ``torchft-h<H>`` (torchft's DiLoCo) or
    ``hivemind-h<H>`` (hivemind's Optimizer averaging about every H steps)), then for the
    DiLoCo kinds
    any of ``h<H>`` (sync_every, default 20), ``p<P>`` (fragments; streaming default 4),
    ``o<tau>`` (overlap_steps; streaming default 1), ``eager`` or ``delayed`` (the overlap
    mode: a whole period of compute hides each sync), one compression token (``int8``, ``int4``,
    ``fp16``, ``bf16``, ``topk<FRACTION>``), ``ef`` (error feedback) or ``ef<DECAY>`` (error
    feedback with a decayed residual, e.g. ``ef0.95``), ``lr<LR>`` and ``m<MOMENTUM>`` (outer
    SGD learning rate and momentum, e.g. ``lr1-m0`` is plain parameter averaging; default: the
    task's).

    Raises:
        ValueError: for an unknown kind or token, or a token the kind does not take.
    """
    tokens = name.strip().lower().split("-")
    kind = tokens[0]
    if kind in ("ddp", "local"):
        if len(tokens) > 1:
            raise ValueError(f"method {name!r}: {kind} takes no options (got {tokens[1:]})")
        label = "DP (DDP, all-reduce every step)" if kind == "ddp" else "local (no communication)"
        return Method(kind, (("mode", kind),), label)
    if kind in PEER_LABELS:
        h = 20
        for tok in tokens[1:]:
            if not (m := re.fullmatch(r"h(\d+)", tok)) or int(m.group(1)) < 1:
                raise ValueError(f"method {name!r}: {kind} takes only h<H> (got {tok!r})")
            h = int(m.group(1))
        options = (("mode", "peer"), ("peer", kind), ("sync_every", h))
        return Method(f"{kind}-h{h}", options, f"{PEER_LABELS[kind]} H={h} (peer)")
    if kind not in ("diloco", "streaming", "swarm"):
        raise ValueError(
            f"method {name!r}: kind {kind!r} must be one of ddp, local, diloco, streaming, "
            "swarm, torchft, hivemind (e.g. diloco-h20-int8, streaming-p4-h20, "
            "diloco-h20-topk0.01-ef, swarm-h20, torchft-h25)"
        )
    h, p = 20, (4 if kind == "streaming" else 1)
    tau: int | None = None
    overlap_mode = "mix"
    compression, ef, ef_decay = "none", False, None
    momentum: float | None = None
    outer_lr: float | None = None
    for tok in tokens[1:]:
        if m := re.fullmatch(r"h(\d+)", tok):
            h = int(m.group(1))
        elif m := re.fullmatch(r"p(\d+)", tok):
            p = int(m.group(1))
        elif m := re.fullmatch(r"o(\d+)", tok):
            tau = int(m.group(1))
        elif tok in ("eager", "delayed"):
            overlap_mode = tok
        elif tok in ("int8", "int4", "int2", "fp16", "bf16"):
            compression = tok
        elif m := re.fullmatch(r"topk(\d*\.?\d+(?:e-?\d+)?)", tok):
            compression = f"topk:{m.group(1)}"
        elif tok == "ef":
            ef = True
        elif m := re.fullmatch(r"ef(\d*\.\d+|[01])", tok):
            ef, ef_decay = True, float(m.group(1))
        elif m := re.fullmatch(r"m(\d*\.?\d+)", tok):
            momentum = float(m.group(1))
        elif m := re.fullmatch(r"lr(\d*\.?\d+)", tok):
            outer_lr = float(m.group(1))
        else:
            raise ValueError(
                f"method {name!r}: unknown token {tok!r}; valid: h<H>, p<P>, o<tau>, eager, "
                "delayed, int8, int4, int2, fp16, bf16, topk<FRACTION>, ef, ef<DECAY>, "
                "lr<OUTER_LR>, m<OUTER_MOMENTUM>"
            )
    if tau is None:  # streaming overlaps one step by default; eager/delayed a whole period
        tau = 1 if kind == "streaming" and overlap_mode == "mix" else 0
    if ef_decay == 1.0:
        ef_decay = None  # classic error feedback: the same as plain ``ef``
    if ef_decay is not None and not 0.0 <= ef_decay <= 1.0:
        raise ValueError(f"method {name!r}: error feedback decay ({ef_decay}) must be in [0, 1]")
    if momentum is not None and not 0.0 <= momentum <= 1.0:
        raise ValueError(f"method {name!r}: outer momentum ({momentum}) must be in [0, 1]")
    if outer_lr is not None and not outer_lr > 0:
        raise ValueError(f"method {name!r}: outer learning rate ({outer_lr}) must be > 0")
    if h < 1 or p < 1 or h % p:
        raise ValueError(f"method {name!r}: fragments ({p}) must divide H ({h}), both >= 1")
    if tau and tau >= h // p:
        raise ValueError(
            f"method {name!r}: overlap ({tau}) must be less than the fragment spacing H/P "
            f"({h // p})"
        )
    if ef and compression == "none":
        raise ValueError(f"method {name!r}: ef needs a compression token (e.g. topk0.01)")
    if overlap_mode != "mix" and tau:
        raise ValueError(
            f"method {name!r}: {overlap_mode} overlaps a whole period of H steps; it takes no "
            f"o<tau> (got o{tau})"
        )
    if kind == "streaming":
        parts = [f"p{p}", f"h{h}"] + ([f"o{tau}"] if overlap_mode == "mix" else [overlap_mode])
    else:  # fragments and overlap only when set, so that no two methods share a name
        parts = [f"h{h}"] + [f"p{p}"] * (p > 1) + [f"o{tau}"] * (tau > 0)
        parts += [overlap_mode] * (overlap_mode != "mix")
    if compression != "none":
        parts.append(compression.replace("topk:", "topk"))
    if ef:
        parts.append("ef" if ef_decay is None else f"ef{ef_decay:g}")
    if outer_lr is not None:
        parts.append(f"lr{outer_lr:g}")
    if momentum is not None:
        parts.append(f"m{momentum:g}")
    canonical = "-".join([kind, *parts])
    options: dict[str, Any] = {
        "mode": "diloco",
        "sync_every": h,
        "fragments": p,
        "overlap_steps": tau,
        # A decayed residual is spelled in the compression spec; --error-feedback means decay 1.
        "compression": compression if ef_decay is None else f"ef@{ef_decay:g}:{compression}",
        "error_feedback": ef and ef_decay is None,
    }
    if overlap_mode != "mix":  # only when set: the cache keys of mix-mode methods stay put
        options["overlap_mode"] = overlap_mode
    if outer_lr is not None:
        options["outer_lr"] = outer_lr
    if momentum is not None:
        options["outer_momentum"] = momentum
    if kind == "swarm":
        options["backend"] = "hivemind"
        # Rounds every H steps, as diloco-h<H> (a swarm peer would default to wall-clock
        # deadlines): the benchmark compares the same schedule over two transports.
        options["sync_clock"] = "steps"
    label = {"streaming": "Streaming DiLoCo", "swarm": "Swarm DiLoCo (hivemind backend)"}.get(
        kind, "DiLoCo"
    ) + f" H={h}"
    if overlap_mode != "mix":
        label += f" P={p}" * (p > 1) + f" {overlap_mode}"
    elif kind == "streaming" or p > 1 or tau:
        label += f" P={p} τ={tau}"
    if compression.startswith("topk:"):
        label += f" top-k {float(compression[5:]) * 100:g}%"
    elif compression != "none":
        label += f" {compression}"
    if ef:
        label += " +EF" if ef_decay is None else f" +EF(decay {ef_decay:g})"
    if outer_lr is not None:
        label += f", outer lr {outer_lr:g}"
    if momentum is not None:
        label += f", outer momentum {momentum:g}"
    return Method(canonical, tuple(options.items()), label)
