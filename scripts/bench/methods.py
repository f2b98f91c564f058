"""Training methods by name: ``diloco-h20-int8`` or ``streaming-p4-h100`` parses into the
recipe options it sets (:func:`parse_method`). The profiles (:mod:`scripts.bench.profiles`)
group them into benchmark matrices.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from lowcomm.comm.compression import TopK

# A non-negative decimal number: 0.7, 1, .5, 0.004 (no exponent: "-" separates tokens).
_NUMBER = r"(\d*\.?\d+)"


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
    ``fp16``, ``bf16``, ``topk<FRACTION>``, or ``tiled<K>[x<TILE>][q<BITS>]``: SparseLoCo's
    per-tensor tiled top-k, default tile 64 and 2-bit values, ``q32`` for fp32 values),
    ``v<CODEC>`` (``vint8``, ``vint4``, ``vint2``: top-k's values through that block codec, one
    scale per chunk),
    ``ef`` (error feedback) or ``ef<DECAY>`` (error
    feedback with a decayed residual, e.g. ``ef0.95``), ``lr<LR>`` and ``m<MOMENTUM>`` (outer
    SGD learning rate and momentum, e.g. ``lr1-m0`` is plain parameter averaging; default: the
    task's), ``ow<N>`` (outer warm-up: from averaging to that Nesterov SGD over N outer steps). Every kind, ``ddp`` and ``local`` included, takes ``ilr<LR>``: the inner (peak)
    learning rate, e.g. ``ddp-ilr0.004`` (default: the task's), so that a tuning grid gives
    DP the same knob as DiLoCo. Every kind but the peers' also takes ``bs<B>``: the batch per
    worker, at the task's tokens (the suite scales the steps, the evaluation and log
    intervals and the lr warm-up by task batch / B: :func:`scripts.bench.suite.same_tokens`),
    e.g. ``ddp-bs8-ilr0.004`` takes twice the steps of half the size; H stays in steps, so
    ``diloco-h25-bs8`` syncs after half the tokens of ``diloco-h25``.

    Raises:
        ValueError: for an unknown kind or token, or a token the kind does not take.
    """
    tokens = name.strip().lower().split("-")
    kind = tokens[0]
    inner_lr, tokens = _inner_lr(name, tokens)
    if kind in ("ddp", "local"):
        batch = None
        for tok in tokens[1:]:
            if not (m := re.fullmatch(r"bs(\d+)", tok)) or int(m.group(1)) < 1 or batch:
                raise ValueError(
                    f"method {name!r}: {kind} takes only bs<BATCH> and ilr<INNER_LR> "
                    f"(got {tokens[1:]})"
                )
            batch = int(m.group(1))
        label = "DP (DDP, all-reduce every step)" if kind == "ddp" else "local (no communication)"
        opts: tuple[tuple[str, Any], ...] = (("mode", kind),)
        parts = [kind]
        if batch is not None:
            opts += (("batch_size", batch),)
            parts.append(f"bs{batch}")
            label += f", batch {batch} per worker (same tokens)"
        if inner_lr is not None:
            opts += (("inner_lr", inner_lr),)
            parts.append(f"ilr{_decimal(inner_lr)}")
            label += f", inner lr {inner_lr:g}"
        return Method("-".join(parts), opts, label)
    if kind in PEER_LABELS:
        if inner_lr is not None:
            raise ValueError(f"method {name!r}: {kind} takes only h<H> (got an ilr token)")
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
    values: str | None = None  # top-k's value codec
    momentum: float | None = None
    warmup = 0  # outer steps of the averaging-to-Nesterov ramp
    outer_lr: float | None = None
    batch: int | None = None  # per worker, at the task's tokens (the suite scales the steps)
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
        elif m := re.fullmatch("topk" + _NUMBER, tok):
            compression = f"topk:{m.group(1)}"
        elif m := re.fullmatch(r"v(int8|int4|int2)", tok):
            values = m.group(1)
        elif m := re.fullmatch(r"tiled(\d+)(?:x(\d+))?(?:q(\d+))?", tok):
            k, tile, bits = m.group(1), m.group(2) or "64", m.group(3) or "2"
            compression = f"tiled:{k}:{tile}:{bits}"
        elif tok == "ef":
            ef = True
        elif m := re.fullmatch(r"ef(\d*\.\d+|[01])", tok):
            ef, ef_decay = True, float(m.group(1))
        elif m := re.fullmatch(r"ow(\d+)", tok):
            warmup = int(m.group(1))
        elif (m := re.fullmatch(r"bs(\d+)", tok)) and int(m.group(1)) > 0:
            batch = int(m.group(1))
        elif m := re.fullmatch(r"m(\d*\.?\d+)", tok):
            momentum = float(m.group(1))
        elif m := re.fullmatch(r"lr" + _NUMBER, tok):
            outer_lr = float(m.group(1))
        else:
            raise ValueError(
                f"method {name!r}: unknown token {tok!r}; valid: h<H>, p<P>, o<tau>, eager, "
                "delayed, int8, int4, int2, fp16, bf16, topk<FRACTION>, v<INT8|INT4|INT2>, "
                "tiled<K>[x<TILE>][q<BITS>], ef, ef<DECAY>, "
                "ilr<INNER_LR>, lr<OUTER_LR>, m<OUTER_MOMENTUM>, ow<OUTER_WARMUP>, bs<BATCH>"
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
    if values is not None:
        if not compression.startswith("topk:"):
            raise ValueError(f"method {name!r}: v{values} quantizes top-k values; add topk<F>")
        # One scale per chunk's kept values (a block of k), as sparseloco() does.
        k = TopK(float(compression[5:])).k
        compression += f"+{values}:{k * 4 // math.gcd(k, 4)}"
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
    if batch is not None:
        parts.append(f"bs{batch}")
    if compression.startswith("tiled:"):
        k, tile, bits = compression.split(":")[1:]
        parts.append(f"tiled{k}x{tile}q{bits}")
    elif compression != "none":
        parts.append(compression.split("+")[0].replace("topk:", "topk"))
        if values is not None:
            parts.append(f"v{values}")
    if ef:
        parts.append("ef" if ef_decay is None else f"ef{ef_decay:g}")
    if inner_lr is not None:
        parts.append(f"ilr{_decimal(inner_lr)}")
    if outer_lr is not None:
        parts.append(f"lr{outer_lr:g}")
    if momentum is not None:
        parts.append(f"m{momentum:g}")
    if warmup:
        parts.append(f"ow{warmup}")
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
    if inner_lr is not None:
        options["inner_lr"] = inner_lr
    if outer_lr is not None:
        options["outer_lr"] = outer_lr
    if momentum is not None:
        options["outer_momentum"] = momentum
    if warmup:
        options["outer_warmup"] = warmup
    if batch is not None:
        options["batch_size"] = batch
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
        label += f" top-k {float(compression[5:].split('+')[0]) * 100:g}%"
        if values is not None:
            label += f" {values} values"
    elif compression.startswith("tiled:"):
        k, tile, bits = compression.split(":")[1:]
        values = "fp32" if bits == "32" else f"{bits}-bit"
        label += f" tiled top-{k} per {tile}x{tile}, {values} values"
    elif compression != "none":
        label += f" {compression}"
    if ef:
        label += " +EF" if ef_decay is None else f" +EF(decay {ef_decay:g})"
    if inner_lr is not None:
        label += f", inner lr {inner_lr:g}"
    if outer_lr is not None:
        label += f", outer lr {outer_lr:g}"
    if momentum is not None:
        label += f", outer momentum {momentum:g}"
    if warmup:
        label += f", outer warm-up {warmup} steps"
    if batch is not None:
        label += f", batch {batch} per worker (same tokens)"
    return Method(canonical, tuple(options.items()), label)


def _inner_lr(name: str, tokens: list[str]) -> tuple[float | None, list[str]]:
    """Take the ``ilr<LR>`` token out of ``tokens``: (the inner lr or None, the rest)."""
    values = [m.group(1) for tok in tokens[1:] if (m := re.fullmatch("ilr" + _NUMBER, tok))]
    if len(values) > 1:
        raise ValueError(f"method {name!r}: ilr<INNER_LR> given {len(values)} times")
    if not values:
        return None, tokens
    inner_lr = float(values[0])
    if not inner_lr > 0:
        raise ValueError(f"method {name!r}: inner learning rate ({inner_lr}) must be > 0")
    rest = [tok for tok in tokens if not re.fullmatch("ilr" + _NUMBER, tok)]
    return inner_lr, rest


def _decimal(value: float) -> str:
    """``value`` in positional notation, as short as it reads back (0.0001, not 1e-04)."""
    text = f"{value:.12f}".rstrip("0").rstrip(".")
    return text or "0"
