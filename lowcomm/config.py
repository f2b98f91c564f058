"""The training recipe's configuration: one flat dataclass, loaded from TOML plus overrides.

Precedence, lowest first: the dataclass defaults, the TOML file named by ``--config``, then
``--key=value`` / ``--key value`` options in the order given. ``--config`` takes a path, or the
name of a config shipped with lowcomm (``demo``, ``tiny``: :func:`shipped_configs`). Keys may be spelled with dashes
or underscores (``--sync-every 50`` is ``sync_every = 50``). A boolean option given alone
(``--wandb``) means true; ``--no-wandb`` means false.

Example::

    cfg = load_config(["--config", "tiny", "--steps=20", "--wandb"])
    cfg.fingerprint()  # identifies everything a checkpoint depends on

Resuming checks that a checkpoint was written under the same configuration, except for the
keys in :data:`RESUMABLE_KEYS`, which only change how long the run goes on, what it logs and
where, or where it runs (see that constant for the list and the caveats).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.resources
import json
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowcomm.optim.schedule import StaggeredSchedule

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "DEVICES",
    "DTYPES",
    "MODES",
    "OVERLAP_MODES",
    "RESUMABLE_KEYS",
    "SWARM_LOCAL_KEYS",
    "SHARDS",
    "SYNC_CLOCKS",
    "TrainConfig",
    "config_help",
    "explicit_keys",
    "load_config",
    "shipped_configs",
]

MODES = ("diloco", "ddp", "local")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("fp32", "bf16")
SHARDS = ("ddp", "fsdp")
SYNC_CLOCKS = ("auto", "steps", "deadline")
AGGREGATIONS = ("mean", "trimmed_mean", "centered_clip")
OVERLAP_MODES = ("mix", "eager", "delayed")

#: Keys that may differ between a checkpoint and the run resuming from it. They do not change
#: what any saved tensor means: run length and logging/eval/checkpoint cadence, where files go,
#: and which device runs the arithmetic. Two caveats: the cosine schedule decays over ``steps``,
#: so a longer ``steps`` re-shapes the rest of the learning-rate curve; and moving between CPU
#: and CUDA (``device``) resumes correctly but not bit-identically.
RESUMABLE_KEYS = frozenset(
    {
        "initial_peers",
        "run_key_file",
        "round_seconds",
        "wait_for_peers",
        "wait_for_peers_timeout",
        "accelerate",
        "ckpt_every",
        "ckpt_timeout",
        "config",
        "data_dir",
        "device",
        "eval_batches",
        "eval_every",
        "keep",
        "log_every",
        "overwrite",
        "progress",
        "resume",
        "run_dir",
        "run_name",
        "steps",
        "wandb",
        "wandb_project",
    }
)

#: Keys a swarm volunteer sets for itself; every other key is the run's (model, data,
#: optimizers, schedule, compression, the swarm's rules) and comes from the live peers when a
#: volunteer joins by address (``lowcomm join --initial-peers ADDR --run-id RUN``).
SWARM_LOCAL_KEYS = frozenset(
    {
        "accelerate",
        "backend",
        "ckpt_every",
        "ckpt_timeout",
        "config",
        "data_dir",
        "device",
        "eval_batches",
        "eval_every",
        "initial_peers",
        "keep",
        "log_every",
        "overwrite",
        "progress",
        "resume",
        "run_dir",
        "run_id",
        "run_key_file",
        "run_name",
        "seed",
        "wait_for_peers",
        "wait_for_peers_timeout",
        "wandb",
        "wandb_project",
    }
)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_NONE = {"", "none", "null"}


@dataclass
class TrainConfig:
    """Everything ``recipes/train_lm.py`` needs: run, data, model, inner and outer optimizer.

    Periods: ``steps``, ``log_every``, ``eval_every`` and ``warmup_steps`` count inner steps
    (one batch per worker each); ``ckpt_every`` counts outer steps of ``sync_every`` inner
    steps, in every mode, so DiLoCo and DDP runs checkpoint at the same inner steps.

    Attributes:
        config: the TOML file the values came from (informational; ``--config`` also takes
            the name of a shipped config, stored here as its path).
        mode: ``diloco`` (DiLoCo outer loop), ``ddp`` (all-reduce gradients every step) or
            ``local`` (no communication: each worker trains alone; the throughput ceiling).
        run_dir: directory for metrics, config and checkpoints.
        resume: None, ``auto`` (latest complete checkpoint in ``run_dir``, fresh start if
            there is none) or a path to a checkpoint directory or a run directory.
        overwrite: delete the checkpoints and metrics of an earlier run in ``run_dir``.
        seed: seeds the model initialisation and, with rank and step, every batch.
        device: ``cpu``, ``cuda`` or ``auto`` (CUDA when available).
        dtype: ``fp32``, or ``bf16`` autocast for forward/backward (parameters stay fp32).
        accelerate: prepare model and optimizer with Hugging Face ``accelerate`` (also on
            automatically under ``accelerate launch``).
        steps: total inner steps of the run.
        log_every: inner steps between metrics lines.
        eval_every: inner steps between evaluations (also at the start and the end).
        eval_batches: held-out batches per evaluation (the same batches every time and on
            every worker).
        ckpt_every: outer steps between checkpoints (and one at the end); 0 disables them.
        ckpt_timeout: seconds rank 0 waits for the other ranks' checkpoint files.
        keep: complete checkpoints kept; older ones are deleted.
        progress: show the rank-0 progress bar.
        wandb: log to Weights & Biases (``WANDB_MODE=offline`` works without an account).
        wandb_project: the wandb project.
        run_name: the wandb run name (default: the run directory's name).
        dataset: ``stdlib`` (the Python standard library's source, always present), a local
            text file, directory or glob, a directory written by ``Dataset.save_to_disk``, or
            a Hugging Face dataset name for ``datasets.load_dataset``.
        dataset_config: the ``name`` argument of ``load_dataset`` (a dataset's sub-config).
        data_files: the ``data_files`` argument of ``load_dataset`` (e.g. with ``text``).
        split: the dataset split to read; the held-out split is carved out of it.
        text_field: the column holding the text.
        streaming: stream a Hugging Face dataset instead of downloading it whole; its first
            ``max_bytes`` bytes are cached.
        max_bytes: stop reading the dataset after this many bytes (0: read all of it).
        heldout_fraction: fraction of documents held out for evaluation.
        data_dir: cache directory for the tokenised corpus (default ``~/.cache/lowcomm``).
        seq_len: tokens (bytes) per training sequence; also the model's context length.
        n_layer: transformer blocks.
        n_head: attention heads per block.
        n_embd: model width.
        tie_weights: share the token embedding with the output head.
        batch_size: sequences per worker per inner step (the same in every mode).
        inner_lr: peak learning rate of the inner AdamW.
        min_lr_ratio: the cosine schedule decays to ``inner_lr * min_lr_ratio``.
        warmup_steps: linear warm-up of the inner learning rate.
        weight_decay: AdamW weight decay on matrices (not on biases, norms or embeddings).
        grad_clip: clip the global gradient norm to this (0: no clipping).
        sync_every: H, inner steps per outer step.
        outer_lr: outer SGD learning rate.
        outer_momentum: outer SGD momentum.
        nesterov: use Nesterov momentum in the outer SGD.
        outer_warmup: outer steps over which the outer step ramps from plain averaging (SGD
            lr 1, no momentum) to ``outer_lr`` with Nesterov ``outer_momentum``
            (:class:`lowcomm.optim.outer.OuterWarmup`); 0: no ramp; -1 (default): the
            library's rule, the outer steps of the first 750 inner steps
            (:func:`lowcomm.optim.outer.default_outer_optimizer`), or no ramp where the
            outer SGD has no Nesterov momentum to ramp to. A count needs Nesterov momentum.
        fragments: streaming fragments (1: sync the whole model at once).
        overlap_steps: inner steps a sync may stay in flight before it is applied.
        mix: how much of its local parameters a worker keeps when an overlapped sync lands.
        overlap_mode: ``mix`` (Streaming DiLoCo), ``eager`` or ``delayed`` (see DiLoCo).
        compression: compressor spec for the pseudo-gradient (``none``, ``int8``, ...).
        error_feedback: wrap the compressor in error feedback.
        replicas: DiLoCo workers under torchrun; each is ``WORLD_SIZE / replicas`` ranks
            training one copy of the model with ``shard`` inside (consecutive ranks form a
            replica: a node under ``--nnodes R --nproc_per_node G``). 0: one rank per
            replica (every rank is a DiLoCo worker).
        shard: how the ranks of one replica share it: ``ddp`` (each holds the model, gradients
            all-reduced every step) or ``fsdp`` (FSDP2 ``fully_shard``; each holds a shard,
            and DiLoCo syncs each shard with the same shard of the other replicas).
        backend: ``auto`` (torch.distributed under torchrun, else one process) or
            ``hivemind`` (a volunteer swarm; what ``lowcomm join`` sets).
        initial_peers: comma-separated multiaddrs of live swarm peers (``lowcomm dht`` prints
            one); empty starts a new swarm.
        run_id: the swarm run's name; peers with the same run id (and key) train together.
        run_key_file: a file holding the shared secret of a private swarm run (kept out of the
            config, checkpoints and logs; ``LOWCOMM_RUN_KEY`` works too).
        round_seconds: one outer round's wall time: its length with ``sync_clock`` deadline,
            else an estimate; swarm timeouts follow it.
        sync_clock: what cuts rounds: ``steps`` (every ``sync_every`` inner steps, the same on
            every worker, bit-exact), ``deadline`` (every ``round_seconds`` of wall clock; each
            worker contributes the inner steps it managed, so slow machines are never left
            out; swarms only) or ``auto`` (deadline for backend hivemind, else steps).
        wait_for_peers: a swarm peer starts training only once this many peers of the run
            (itself included) are live; 1 starts at once.
        wait_for_peers_timeout: seconds a swarm peer waits for them before failing.
        max_norm: a swarm peer refuses any part of a pseudo-gradient (or of an average coming
            back) whose L2 norm exceeds this; 0: no absolute bound.
        norm_ratio: a swarm peer refuses any part more than this many times the norm of its
            own part of the same slice, per inner step behind each where the sender took
            more (scale-free: the default 10 needs no tuning per model); 0: no relative
            bound.
        aggregation: how a swarm peer's reducers combine the parts they accepted: ``mean``,
            ``trimmed_mean`` or ``centered_clip`` (robust rules, for swarms whose peers are
            not all trusted).
    """

    config: str | None = None
    # run
    mode: str = "diloco"
    run_dir: str = "runs/train_lm"
    resume: str | None = None
    overwrite: bool = False
    seed: int = 0
    device: str = "auto"
    dtype: str = "fp32"
    accelerate: bool = False
    steps: int = 1000
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    ckpt_every: int = 10
    ckpt_timeout: float = 600.0
    keep: int = 3
    progress: bool = True
    wandb: bool = False
    wandb_project: str = "lowcomm"
    run_name: str | None = None
    # data
    dataset: str = "stdlib"
    dataset_config: str | None = None
    data_files: str | None = None
    split: str = "train"
    text_field: str = "text"
    streaming: bool = False
    max_bytes: int = 0
    heldout_fraction: float = 0.02
    data_dir: str | None = None
    # model
    seq_len: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    tie_weights: bool = False
    # inner optimizer
    batch_size: int = 16
    inner_lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # outer optimizer (DiLoCo)
    sync_every: int = 50
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    nesterov: bool = True
    outer_warmup: int = -1
    fragments: int = 1
    overlap_steps: int = 0
    mix: float = 0.5
    overlap_mode: str = "mix"
    compression: str = "none"
    error_feedback: bool = False
    replicas: int = 0
    shard: str = "ddp"
    # swarm
    backend: str = "auto"
    initial_peers: str = ""
    run_id: str = "lowcomm"
    run_key_file: str | None = None
    round_seconds: float = 60.0
    sync_clock: str = "auto"
    wait_for_peers: int = 1
    wait_for_peers_timeout: float = 600.0
    max_norm: float = 0.0
    norm_ratio: float = 10.0
    aggregation: str = "mean"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every value; raise ValueError naming the key, the value and the rule."""
        _choice("mode", self.mode, MODES)
        _choice("device", self.device, DEVICES)
        _choice("dtype", self.dtype, DTYPES)
        _choice("overlap_mode", self.overlap_mode, OVERLAP_MODES)
        _choice("backend", self.backend, ("auto", "hivemind"))
        _choice("shard", self.shard, SHARDS)
        _choice("sync_clock", self.sync_clock, SYNC_CLOCKS)
        if self.sync_clock == "deadline" and self.backend != "hivemind":
            raise ValueError(
                "sync_clock 'deadline' is for swarms (backend 'hivemind'): under torchrun every "
                "rank must sync at the same steps, or the collectives would pair different rounds"
            )
        _choice("aggregation", self.aggregation, AGGREGATIONS)
        if self.max_norm < 0 or self.norm_ratio < 0:
            raise ValueError(
                f"max_norm ({self.max_norm}) and norm_ratio ({self.norm_ratio}) must be >= 0 "
                f"(0: no bound)"
            )
        if 0 < self.norm_ratio < 1:
            raise ValueError(f"norm_ratio ({self.norm_ratio}) must be 0 or >= 1")
        if self.replicas < 0:
            raise ValueError(f"replicas ({self.replicas}) must be >= 0 (0: one rank per replica)")
        if self.replicas and self.mode != "diloco":
            raise ValueError(
                f"replicas ({self.replicas}) groups ranks into DiLoCo workers: it needs mode "
                f"'diloco', got mode {self.mode!r}"
            )
        if self.replicas and self.backend == "hivemind":
            raise ValueError("replicas applies under torchrun, not to backend 'hivemind'")
        if self.backend == "hivemind" and self.mode != "diloco":
            raise ValueError(f"backend 'hivemind' needs mode 'diloco', got mode {self.mode!r}")
        if self.wait_for_peers > 1 and self.backend != "hivemind":
            raise ValueError(
                f"wait_for_peers ({self.wait_for_peers}) applies to backend 'hivemind' only "
                f"(under torchrun every rank already waits for the others at start)"
            )
        if not self.round_seconds > 0:
            raise ValueError(f"round_seconds ({self.round_seconds}) must be > 0")
        for name in (
            "steps",
            "log_every",
            "eval_every",
            "eval_batches",
            "keep",
            "seq_len",
            "n_layer",
            "n_head",
            "n_embd",
            "batch_size",
            "sync_every",
            "fragments",
            "wait_for_peers",
        ):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name} ({value}) must be >= 1")
        if self.outer_warmup > 0 and not (self.nesterov and 0 < self.outer_momentum < 1):
            raise ValueError(
                f"outer_warmup ({self.outer_warmup}) ramps up Nesterov momentum: it needs "
                f"nesterov and 0 < outer_momentum < 1 (got {self.nesterov}, "
                f"{self.outer_momentum})"
            )
        for name in (
            "ckpt_every",
            "warmup_steps",
            "overlap_steps",
            "max_bytes",
            "seed",
        ):
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"{name} ({value}) must be >= 0")
        if self.outer_warmup < -1:
            raise ValueError(f"outer_warmup ({self.outer_warmup}) must be >= 0, or -1 (auto)")
        for name in ("inner_lr", "outer_lr", "ckpt_timeout", "wait_for_peers_timeout"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name} ({value}) must be > 0")
        for name in ("weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"{name} ({value}) must be >= 0")
        for name in ("outer_momentum", "mix", "min_lr_ratio"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} ({value}) must be in [0, 1]")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction ({self.heldout_fraction}) must be in (0, 1)")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be <= steps ({self.steps})")
        if self.overlap_steps and self.overlap_mode != "mix":
            raise ValueError(
                f"overlap_steps ({self.overlap_steps}) is for overlap_mode 'mix'; "
                f"{self.overlap_mode!r} always overlaps a whole period of sync_every steps"
            )
        # The schedule DiLoCo will build: fragments <= sync_every, and an overlapped sync must
        # land before the next fragment's starts. Checked here so that every worker refuses
        # the config at start, not after the process group, the corpus and the model.
        spacing = StaggeredSchedule(self.sync_every, self.fragments).spacing
        if self.overlap_steps >= spacing:
            raise ValueError(
                f"overlap_steps ({self.overlap_steps}) must be < the fragment spacing ({spacing}: "
                f"the fewest inner steps between two fragment syncs with sync_every "
                f"{self.sync_every} and fragments {self.fragments})"
            )
        if self.streaming and self.max_bytes == 0:
            raise ValueError(
                "streaming reads the first max_bytes bytes of the stream: set max_bytes > 0"
            )
        if self.resume is not None and not self.resume:
            raise ValueError("resume must be None, 'auto' or a path, got ''")
        if self.error_feedback and self.compression.strip().lower() == "none":
            raise ValueError("error_feedback needs a compression other than 'none'")
        try:
            from lowcomm.comm.compression.registry import parse_compression
        except ImportError:  # pragma: no cover - the registry ships with lowcomm
            return
        parse_compression(self.compression)  # raises ValueError listing the valid forms

    @property
    def deadline_rounds(self) -> bool:
        """Whether rounds are cut by the clock (``sync_clock`` deadline, or auto in a swarm)."""
        return self.sync_clock == "deadline" or (
            self.sync_clock == "auto" and self.backend == "hivemind"
        )

    def to_dict(self) -> dict[str, Any]:
        """The configuration as a plain JSON-able dict."""
        return dataclasses.asdict(self)

    def run_config_text(self) -> str:
        """The run's part of this config (every key but :data:`SWARM_LOCAL_KEYS`) as JSON: what
        a swarm peer publishes so that volunteers can join by address alone."""
        run = {k: v for k, v in self.to_dict().items() if k not in SWARM_LOCAL_KEYS}
        return json.dumps(run, sort_keys=True)

    def fingerprint(self) -> str:
        """Hex digest of every key outside :data:`RESUMABLE_KEYS` (what checkpoints depend on)."""
        return fingerprint_of(self.to_dict())


def fingerprint_of(config: dict[str, Any]) -> str:
    """Fingerprint of a config dict as :meth:`TrainConfig.fingerprint` computes it.

    Args:
        config: a dict from :meth:`TrainConfig.to_dict` (e.g. read back from a checkpoint).
    """
    kept = {k: v for k, v in sorted(config.items()) if k not in RESUMABLE_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} ({value!r}) must be one of {', '.join(choices)}")


def _fields() -> dict[str, Any]:
    """Field name -> resolved type annotation."""
    return typing.get_type_hints(TrainConfig)


def _base_type(tp: Any) -> tuple[type, bool]:
    """(the non-None type, whether None is allowed) of an annotation like ``str | None``."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        assert len(args) == 1, tp
        return args[0], True
    return tp, False


def _unknown_key(key: str, where: str) -> ValueError:
    names = list(_fields())
    close = difflib.get_close_matches(key, names, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ValueError(f"unknown config key {key!r} {where}{hint} (valid keys: {', '.join(names)})")


def _from_string(key: str, text: str) -> Any:
    """Convert a command-line string to the type of field ``key``."""
    base, optional = _base_type(_fields()[key])
    if optional and text.strip().lower() in _NONE:
        return None
    try:
        if base is bool:
            low = text.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError
        if base is int:
            try:
                return int(text)
            except ValueError:
                number = float(text)  # accepts "1e3"
                if not number.is_integer():
                    raise
                return int(number)
        if base is float:
            return float(text)
    except ValueError:
        raise ValueError(f"--{key} expects {base.__name__}, got {text!r}") from None
    return text


def _check_toml_value(key: str, value: Any, path: Path) -> Any:
    base, optional = _base_type(_fields()[key])
    if value is None and optional:
        return None
    ok = isinstance(value, base) and not (base is int and isinstance(value, bool))
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ValueError(
            f"{key} in {path} must be {base.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


def shipped_configs() -> dict[str, Path]:
    """The configs that ship with lowcomm (``lowcomm.recipes``' ``configs/``), by name.

    Returns:
        Name (the file name without ``.toml``) -> path, sorted by name.
    """
    root = Path(str(importlib.resources.files("lowcomm.recipes") / "configs"))
    return {p.stem: p for p in sorted(root.glob("*.toml"))}


def _config_file(value: str) -> Path:
    """The TOML file ``--config value`` means: a path, else a shipped config's name."""
    path = Path(value)
    if path.is_file():
        return path
    shipped = shipped_configs()
    bare = path.name == value and path.suffix in ("", ".toml")
    if bare and path.stem in shipped:
        return shipped[path.stem]
    what = "is not the name of a shipped config" if bare else "does not exist"
    raise ValueError(f"config {value!r} {what}; pass a TOML file or one of: {', '.join(shipped)}")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ValueError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"config file {path} is not valid TOML: {e}") from None
    names = _fields()
    values: dict[str, Any] = {}
    for raw_key, value in raw.items():
        key = raw_key.replace("-", "_")
        if key not in names or key == "config":
            if isinstance(value, dict):
                raise ValueError(
                    f"config file {path}: tables ([{raw_key}]) are not used; keys are flat"
                )
            raise _unknown_key(raw_key, f"in {path}")
        values[key] = _check_toml_value(key, value, path)
    return values


def _parse_argv(argv: list[str]) -> list[tuple[str, str]]:
    """Split ``--key=value`` / ``--key value`` / ``--flag`` / ``--no-flag`` into pairs."""
    names = _fields()
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or token == "--":
            raise ValueError(
                f"unexpected argument {token!r}: options are --key=value or --key value"
            )
        raw, eq, value = token[2:].partition("=")
        key = raw.replace("-", "_")
        if key not in names and key.startswith("no_") and key[3:] in names and not eq:
            if _base_type(names[key[3:]])[0] is not bool:
                raise ValueError(f"--{raw} only exists for boolean keys; {key[3:]} is not one")
            pairs.append((key[3:], "false"))
            i += 1
            continue
        if key not in names:
            raise _unknown_key(raw, "on the command line")
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if _base_type(names[key])[0] is bool and (
                nxt is None or nxt.lower() not in _TRUE | _FALSE
            ):
                value = "true"
            elif nxt is None or nxt.startswith("--"):
                raise ValueError(f"--{raw} needs a value")
            else:
                value = nxt
                i += 1
        pairs.append((key, value))
        i += 1
    return pairs


def load_config(argv: list[str] | None = None, **defaults: Any) -> TrainConfig:
    """Build a :class:`TrainConfig` from ``--config FILE`` and ``--key value`` options.

    Args:
        argv: command-line options (without the program name); None means none.
        **defaults: values applied before the TOML file (the caller's own defaults).

    Returns:
        The validated configuration.

    Raises:
        ValueError: for an unknown key, a value of the wrong type, a missing or invalid TOML
            file (or unknown config name), or a value that breaks a rule of :meth:`TrainConfig.validate`.
    """
    pairs = _parse_argv(list(argv or []))
    values: dict[str, Any] = {}
    for key, value in defaults.items():
        if key not in _fields():
            raise _unknown_key(key, "in defaults")
        values[key] = value
    config_path = next((v for k, v in reversed(pairs) if k == "config"), None)
    if config_path is not None:
        path = _config_file(config_path)
        values.update(_read_toml(path))
        values["config"] = str(path)
    for key, value in pairs:
        if key != "config":
            values[key] = _from_string(key, value)
    return TrainConfig(**values)


def explicit_keys(argv: list[str] | None) -> set[str]:
    """The keys ``argv`` sets itself: every key of its ``--config`` file and of its options.

    Raises:
        ValueError: as :func:`load_config` for unknown keys or a bad config file.
    """
    pairs = _parse_argv(list(argv or []))
    keys = {k for k, _ in pairs}
    config_path = next((v for k, v in reversed(pairs) if k == "config"), None)
    if config_path is not None:
        keys |= set(_read_toml(_config_file(config_path)))
    return keys


def config_help() -> str:
    """A usage text listing every key with its type and default."""
    lines = ["options (--key=value or --key value; dashes or underscores):"]
    hints = _fields()
    for f in dataclasses.fields(TrainConfig):
        base, optional = _base_type(hints[f.name])
        kind = base.__name__ + (" | None" if optional else "")
        lines.append(f"  --{f.name.replace('_', '-'):<20} {kind:<12} default {f.default!r}")
    return "\n".join(lines)
