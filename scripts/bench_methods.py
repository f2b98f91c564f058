"""The benchmark's vocabulary: training methods by name, and the profiles that group them.

A method name such as ``diloco-h20-int8`` or ``streaming-p4-h100`` parses into the recipe
options it sets (:func:`parse_method`); a :class:`Profile` fixes the task, the seeds, the
methods of each phase and the headline comparisons. Used by ``scripts/bench_suite.py``.
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
    def sync_every(self) -> int | None:
        """H, or None for DP and local training."""
        value = self.options.get("sync_every")
        return None if value is None else int(value)


def parse_method(name: str) -> Method:
    """Build a :class:`Method` from its name.

    Grammar: a kind (``ddp``, ``local``, ``diloco``, ``streaming``, or ``swarm``: DiLoCo over
    the hivemind backend, every worker a peer found through a bootstrap DHT), then for the
    DiLoCo kinds
    any of ``h<H>`` (sync_every, default 20), ``p<P>`` (fragments; streaming default 4),
    ``o<tau>`` (overlap_steps; streaming default 1), one compression token (``int8``, ``int4``,
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
    if kind not in ("diloco", "streaming", "swarm"):
        raise ValueError(
            f"method {name!r}: kind {kind!r} must be one of ddp, local, diloco, streaming, "
            "swarm (e.g. diloco-h20-int8, streaming-p4-h20, diloco-h20-topk0.01-ef, swarm-h20)"
        )
    h, p, tau = 20, (4 if kind == "streaming" else 1), (1 if kind == "streaming" else 0)
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
                f"method {name!r}: unknown token {tok!r}; valid: h<H>, p<P>, o<tau>, int8, int4, "
                "int2, fp16, bf16, topk<FRACTION>, ef, ef<DECAY>, lr<OUTER_LR>, m<OUTER_MOMENTUM>"
            )
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
    if kind == "streaming":
        parts = [f"p{p}", f"h{h}", f"o{tau}"]
    else:  # fragments and overlap only when set, so that no two methods share a name
        parts = [f"h{h}"] + [f"p{p}"] * (p > 1) + [f"o{tau}"] * (tau > 0)
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
    if outer_lr is not None:
        options["outer_lr"] = outer_lr
    if momentum is not None:
        options["outer_momentum"] = momentum
    if kind == "swarm":
        options["backend"] = "hivemind"
    label = {"streaming": "Streaming DiLoCo", "swarm": "Swarm DiLoCo (hivemind backend)"}.get(
        kind, "DiLoCo"
    ) + f" H={h}"
    if kind == "streaming" or p > 1 or tau:
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


# -- profiles --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Profile:
    """A benchmark matrix: the task (recipe config), the methods, seeds, rates and peers.

    Attributes:
        name: the profile's name.
        base_config: a recipe TOML the task starts from (None: the recipe's defaults).
        task: recipe options on top of ``base_config`` (model, data, inner optimizer, evals).
        seeds: the quality runs' seeds.
        methods: methods of the quality runs.
        throughput_methods: methods of the throughput runs (the ceiling is always added).
        throughput_steps: inner steps of each throughput run.
        rates: link rates of the throughput runs (``loopback``, ``unshaped`` or e.g.
            ``100mbit``).
        peers: peer libraries to compare (``torchft``, ``hivemind``).
        peer_sync_every: H of the peer runs (compared with lowcomm's ``diloco-h<H>``).
        headline: role -> method for the headline table (``main``, ``fp32``, ``streaming``,
            ``topk``, ``topk_ef``).
        throughput_repeats: passes over a rate's runs (ceiling, then every method); each
            cell reports its fastest pass, since other processes on the machine only ever
            slow a run down.
        run_timeout: seconds one quality run may take.
    """

    name: str
    base_config: str | None
    task: dict[str, Any]
    seeds: tuple[int, ...]
    methods: tuple[str, ...]
    throughput_methods: tuple[str, ...]
    throughput_steps: int
    rates: tuple[str, ...]
    peers: tuple[str, ...]
    peer_sync_every: int
    headline: dict[str, str]
    throughput_repeats: int = 3
    run_timeout: float = 1800.0


PROFILES: dict[str, Profile] = {
    # A few seconds per run: the test suite's smoke run.
    "smoke": Profile(
        name="smoke",
        base_config="recipes/configs/tiny.toml",
        task={"steps": 16, "eval_every": 8, "log_every": 4, "eval_batches": 2},
        seeds=(0,),
        methods=("ddp", "diloco-h4"),
        throughput_methods=("diloco-h4",),
        throughput_steps=16,
        rates=("loopback",),
        peers=(),
        peer_sync_every=4,
        headline={"main": "diloco-h4"},
        throughput_repeats=1,
        run_timeout=300.0,
    ),
    # Minutes on 2 CPU cores: a 137k-parameter byte GPT, 400 steps, 3 seeds.
    "default": Profile(
        name="default",
        base_config=None,
        task={
            "seq_len": 64,
            "n_layer": 2,
            "n_head": 2,
            "n_embd": 64,
            "batch_size": 8,
            "steps": 400,
            "warmup_steps": 20,
            "inner_lr": 2e-3,
            "eval_every": 20,
            "eval_batches": 4,
            "log_every": 10,
        },
        seeds=(0, 1, 2),
        methods=(
            "ddp",
            "diloco-h20",
            "diloco-h100",
            "diloco-h20-int8",
            "streaming-p4-h20",
            "diloco-h20-topk0.01",
            "diloco-h20-topk0.01-ef",
            # SparseLoCo's pairing (Sarfi et al. 2025): a decayed residual, no outer momentum.
            "diloco-h20-topk0.01-ef0.95-m0",
            # Parameter averaging (outer SGD lr 1, no momentum): hivemind's outer step.
            "diloco-h20-lr1-m0",
        ),
        throughput_methods=(
            "ddp",
            "diloco-h20",
            "diloco-h100",
            "diloco-h20-int8",
            "streaming-p4-h20",
            "diloco-h20-topk0.01-ef",
            # The same averaging over lowcomm's hivemind backend (DHT, peers join and leave).
            "swarm-h20-int8",
        ),
        throughput_steps=100,
        rates=("unshaped", "100mbit", "20mbit"),
        peers=("torchft", "hivemind"),
        peer_sync_every=20,
        headline={
            "main": "diloco-h20-int8",
            "fp32": "diloco-h20",
            "streaming": "streaming-p4-h20",
            "topk": "diloco-h20-topk0.01",
            "topk_ef": "diloco-h20-topk0.01-ef",
        },
        run_timeout=900.0,
    ),
    # The headline settings: the demo's 0.87M-parameter GPT, M=2, H=25, int8, 1,800
    # steps, 3 seeds. Hours on 2 CPU cores: run it in the background; it resumes.
    "headline": Profile(
        name="headline",
        base_config="recipes/configs/demo.toml",
        task={"steps": 1800, "eval_every": 100, "log_every": 25, "ckpt_every": 0},
        seeds=(0, 1, 2),
        methods=(
            "ddp",
            "diloco-h25",
            "diloco-h25-int8",
            "streaming-p4-h100",
            "diloco-h25-topk0.01",
            "diloco-h25-topk0.01-ef",
        ),
        throughput_methods=(
            "ddp",
            "diloco-h25",
            "diloco-h25-int8",
            "streaming-p4-h100",
            "diloco-h25-topk0.01-ef",
            "swarm-h25-int8",
        ),
        throughput_steps=200,
        rates=("unshaped", "100mbit", "20mbit"),
        peers=("torchft", "hivemind"),
        peer_sync_every=25,
        headline={
            "main": "diloco-h25-int8",
            "fp32": "diloco-h25",
            "streaming": "streaming-p4-h100",
            "topk": "diloco-h25-topk0.01",
            "topk_ef": "diloco-h25-topk0.01-ef",
        },
        run_timeout=7200.0,
    ),
}
