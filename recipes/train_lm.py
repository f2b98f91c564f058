r"""Train a small byte-level GPT with DiLoCo, synchronous DDP, or no communication at all.

Launch (from the repository root; ``--config demo`` and ``--config tiny`` name the configs
shipped in ``recipes/configs/``, a path to a TOML file works too)::

    python recipes/train_lm.py --config tiny                             # 1 process
    torchrun --standalone --nproc_per_node 2 recipes/train_lm.py --config recipes/configs/demo.toml
    torchrun --standalone --nproc_per_node 2 recipes/train_lm.py --config recipes/configs/demo.toml \
        --mode ddp --run-dir runs/demo-ddp                                 # the synchronous baseline
    accelerate launch --multi_gpu --num_processes 2 recipes/train_lm.py \
        --config recipes/configs/demo.toml --run-dir runs/demo-accelerate
    python recipes/train_lm.py --help                                     # every option

From an installed wheel (no checkout), ``lowcomm train --config demo [options]`` runs this
module (``lowcomm.recipes.train_lm``) in one process, and ``torchrun --standalone
--nproc_per_node 2 -m lowcomm.recipes.train_lm --config demo`` on two.

(``accelerate launch --multi_gpu`` only picks accelerate's torchrun launcher; without GPUs
the workers run on CPU over gloo.) Every config key can be overridden as ``--key=value`` or
``--key value``, dashes or underscores alike: ``--sync-every 50 --compression int8
--error-feedback --fragments 4``. ``--resume auto`` continues from the latest checkpoint in
``--run-dir`` that verifies (sizes and SHA-256 digests; damaged newer ones are skipped with a
warning); ``--resume PATH`` from a given checkpoint (or run) directory; ``--overwrite``
starts over in a run directory that holds checkpoints. A run directory is locked while a run
uses it: a second run there fails at once, on every rank.

What one run does, per worker (rank r of N):

1. Data: the default corpus is the Python standard library's source, bytes as tokens, with
   ~2% of the files held out (``lowcomm.data``). Rank r trains on its own contiguous shard;
   the batch of inner step s is a pure function of (seed, r, s), so DiLoCo, DDP and local
   runs of one config see the same tokens, and a resumed run sees the same batches as an
   uninterrupted one.
2. Model: ``lowcomm.gpt.GPT``, the same initialisation on every rank (seeded).
3. Optimizer: AdamW with linear warm-up and cosine decay (the inner optimizer), wrapped by
   ``DiLoCo`` in ``--mode diloco``: every ``sync_every`` inner steps the workers average
   their pseudo-gradients (compressed with ``--compression``) and take an outer step: by
   default plain averaging ramping to Nesterov SGD (``--outer-warmup``, the library's
   default outer step). ``--mode ddp`` all-reduces gradients every step instead (torch DDP);
   ``--mode local`` trains every worker alone (the throughput ceiling).
4. Every ``eval_every`` inner steps: the loss on fixed held-out batches, of the global
   parameters in DiLoCo mode. Every ``ckpt_every`` outer steps: an atomic checkpoint.
5. At the end rank 0 prints the eval loss curve's ends and the bytes each worker sent,
   against a per-step fp32 all-reduce of the gradients (ring bound 2(N-1)/N * 4 * params
   bytes per step per worker).

``main(argv)`` runs all of this in-process and returns the summary dict.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lowcomm import checkpoint as ckpt
from lowcomm.comm.ddp_wait import DDPWaitClock
from lowcomm.comm.timeline import TIMELINE, span
from lowcomm.comm.torch_dist import init_process_group_from_env
from lowcomm.config import (
    RESUMABLE_KEYS,
    SWARM_LOCAL_KEYS,
    TrainConfig,
    config_help,
    explicit_keys,
    load_config,
)
from lowcomm.data import eval_batches, load_corpus, sample_batch, shard_bounds
from lowcomm.gpt import GPT, GPTConfig, parameter_signature
from lowcomm.metrics import MetricsLogger, Progress, format_bytes
from lowcomm.optim.diloco import DiLoCo
from lowcomm.optim.outer import OuterWarmup, outer_warmup_for
from lowcomm.optim.params import local_view
from lowcomm.rundir import RunDirLock, lock_run_dir

logger = logging.getLogger("lowcomm.recipes.train_lm")


# -- setup: processes, device, optional accelerate -------------------------------------------


class Runtime:
    """Where this process runs: rank, world size, device, and how it was launched."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.accelerator: Any = None
        self.owns_process_group = False
        self.run_dir_lock: RunDirLock | None = None  # taken by prepare_run_dir
        env_world = int(os.environ.get("WORLD_SIZE", "1"))
        self.use_accelerate = cfg.accelerate or "ACCELERATE_MIXED_PRECISION" in os.environ
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device ('cuda') was requested but CUDA is not available")
        use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        if self.use_accelerate:
            from accelerate import Accelerator

            # Accelerate reads its launch config from the environment; only bf16 is forced here.
            self.accelerator = Accelerator(
                cpu=not use_cuda, mixed_precision="bf16" if cfg.dtype == "bf16" else None
            )
            self.rank = self.accelerator.process_index
            self.world_size = self.accelerator.num_processes
            self.device = self.accelerator.device
            return
        self.rank = int(os.environ.get("RANK", "0"))
        self.world_size = env_world
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        # Local mode never communicates, so it needs no process group at all.
        if self.world_size > 1 and cfg.mode != "local" and not dist.is_initialized():
            # lowcomm's own: NCCL or gloo for the device, and torchrun restarts that work.
            init_process_group_from_env(self.device, timeout_seconds=cfg.ckpt_timeout)
            self.owns_process_group = True

    def close(self) -> None:
        """Tear down the process group if this runtime created it; release the run dir."""
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
        if self.run_dir_lock is not None:
            self.run_dir_lock.release()
            self.run_dir_lock = None


def launch_id() -> str:
    """What every rank of one launch shares and overlapping launches do not: torchrun's run
    id (a fresh uuid under ``--standalone``) and rendezvous address."""
    env = os.environ
    return "{}@{}:{}".format(
        env.get("TORCHELASTIC_RUN_ID", ""), env.get("MASTER_ADDR", ""), env.get("MASTER_PORT", "")
    )


class Replicas:
    """Which DiLoCo worker (replica) this rank belongs to, and its place inside it.

    ``--replicas R`` under torchrun: ranks ``r·G .. r·G+G−1`` (``G = WORLD_SIZE / R``) train
    replica ``r`` together (DDP or FSDP2 inside), and DiLoCo averages across replicas. By
    default every rank is a replica of one rank.
    """

    def __init__(self, cfg: TrainConfig, rt: Runtime) -> None:
        self.mesh: Any = None
        count = cfg.replicas or rt.world_size
        if cfg.mode != "diloco" or count == rt.world_size:
            self.count, self.index, self.size, self.rank_in = rt.world_size, rt.rank, 1, 0
            return
        if rt.world_size % count or cfg.batch_size % (rt.world_size // count):
            raise ValueError(
                f"replicas ({count}) must divide the world size ({rt.world_size}), and the "
                f"ranks per replica ({rt.world_size // max(count, 1)}) must divide batch_size "
                f"({cfg.batch_size}): each rank of a replica takes an equal slice of its batch"
            )
        from lowcomm.comm import init_replica_mesh

        self.mesh = init_replica_mesh(count, "cuda" if rt.device.type == "cuda" else "cpu")
        self.count, self.index = count, self.mesh.replica
        self.size, self.rank_in = self.mesh.shard_size, self.mesh.shard_rank

    def wrap(self, cfg: TrainConfig, model: nn.Module) -> nn.Module:
        """The module to train through: DDP over the replica's ranks, or FSDP2 in place."""
        if self.mesh is None:
            return model
        if cfg.shard == "fsdp":
            from torch.distributed.fsdp import fully_shard

            blocks = getattr(model, "blocks", [])
            for block in blocks:
                fully_shard(block, mesh=self.mesh.mesh["shard"])
            fully_shard(model, mesh=self.mesh.mesh["shard"])
            return model
        return nn.parallel.DistributedDataParallel(model, process_group=self.mesh.shard_group)

    def backend(self, cfg: TrainConfig) -> Any:
        """DiLoCo's backend: the cross-replica group (None: every rank is a replica)."""
        if self.mesh is None:
            return None
        from lowcomm.comm import TorchDistBackend

        return TorchDistBackend(group=self.mesh.replicate_group, timeout=cfg.ckpt_timeout)

    def rows(self, batch_size: int) -> slice:
        """This rank's rows of its replica's batch."""
        per = batch_size // self.size
        return slice(self.rank_in * per, (self.rank_in + 1) * per)


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state as host tensors, local shards under FSDP2 (a per-rank checkpoint)."""
    return {k: local_view(v).detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def load_model_state(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Copy :func:`model_state`'s tensors back into the model (into local shards under FSDP2)."""
    current = model.state_dict()
    if set(current) != set(saved):
        raise ValueError(
            f"checkpoint model state has other keys: missing {sorted(set(current) - set(saved))[:5]}, "
            f"unexpected {sorted(set(saved) - set(current))[:5]}"
        )
    with torch.no_grad():
        for key, value in current.items():
            local_view(value).copy_(saved[key])


def prepare_run_dir(cfg: TrainConfig, rt: Runtime) -> Path | None:
    """Lock the run directory, find the checkpoint to resume from (one that verifies) and
    clear what an earlier attempt left behind.

    Runs before the first collective, so a run dir held by a live run stops every rank here,
    and rank 0's deletions happen before any rank of this run writes a file. Every rank
    reaches the same decision from the same files. The lock stays with ``rt`` until
    ``rt.close()``.
    """
    run_dir = Path(cfg.run_dir)
    root = ckpt.checkpoint_root(run_dir)
    rt.run_dir_lock = lock_run_dir(run_dir, rt.rank, run_id=launch_id())
    resume = ckpt.resolve_resume(cfg.resume, run_dir) if cfg.resume else None
    existing = ckpt.list_checkpoints(root)
    # Checkpoints here that are not this run's past would be mixed up with its future.
    resumed_here = resume is not None and resume.parent.resolve() == root.resolve()
    resume_step = ckpt.step_of(resume) if resumed_here else -1  # type: ignore[arg-type]
    newer = [p for p in existing if ckpt.step_of(p) > resume_step]
    # --resume auto took the newest checkpoint that verifies: the newer ones failed
    # verification (latest_checkpoint logged why), they are damaged, not another history.
    damaged = newer if cfg.resume == "auto" and resume is not None else []
    foreign = [p for p in newer if p not in damaged]
    if foreign and not cfg.overwrite:
        if cfg.resume == "auto":
            raise ValueError(
                f"run_dir {run_dir} holds checkpoints but none of them verifies (e.g. "
                f"{foreign[-1].name}; the warnings above say why): pass --overwrite to delete "
                "them and start over, or use another --run-dir"
            )
        hint = "--resume auto to continue the latest, " if resume is None else ""
        raise ValueError(
            f"run_dir {run_dir} already holds checkpoints this run would not continue from "
            f"(e.g. {foreign[-1].name}): pass {hint}--overwrite to delete them, or use "
            "another --run-dir"
        )
    if rt.rank == 0:
        for p in foreign:
            logger.warning("--overwrite: deleting %s", p)
            shutil.rmtree(p)
        for p in damaged:
            # Kept, not deleted: a damaged file is evidence, and may hold what a person
            # can still recover by hand.
            aside = run_dir / "damaged" / f"{p.name}.{time.strftime('%Y%m%dT%H%M%S')}"
            logger.warning("moving %s aside to %s: it does not verify (see above)", p, aside)
            aside.parent.mkdir(parents=True, exist_ok=True)
            os.replace(p, aside)
        ckpt.clean_incomplete(root)
        if resume is None and cfg.overwrite:
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    return resume


# -- the model, optimizer and schedule ---------------------------------------------------------


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Inner learning-rate multiplier at inner step ``step``: linear warm-up, cosine decay."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_inner_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on biases, norms or embeddings)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.dim() >= 2 and not name.startswith(("wte.", "wpe.")):
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.inner_lr, betas=(0.9, 0.95))


def make_compression(cfg: TrainConfig) -> Any:
    """The compressor ``--compression`` names, in ErrorFeedback with ``--error-feedback``."""
    from lowcomm.comm.compression import ErrorFeedback, parse_compression

    compressor = parse_compression(cfg.compression)
    if cfg.error_feedback and not isinstance(compressor, ErrorFeedback):
        if compressor is None:
            raise ValueError("error_feedback needs a compression other than 'none'")
        compressor = ErrorFeedback(compressor)
    return compressor


def load_training_corpus(cfg: TrainConfig) -> Any:
    """The corpus the config names (the embedded stdlib source by default)."""
    return load_corpus(
        cfg.dataset,
        cache_dir=cfg.data_dir,
        heldout_fraction=cfg.heldout_fraction,
        split=cfg.split,
        text_field=cfg.text_field,
        dataset_config=cfg.dataset_config,
        data_files=cfg.data_files,
        streaming=cfg.streaming,
        max_bytes=cfg.max_bytes,
    )


def _run_key(cfg: TrainConfig) -> str | None:
    key = os.environ.get("LOWCOMM_RUN_KEY")
    if cfg.run_key_file:
        key = Path(cfg.run_key_file).read_text().strip()
    return key or None


def _initial_peers(cfg: TrainConfig) -> list[str]:
    return [a.strip() for a in cfg.initial_peers.split(",") if a.strip()]


def join_run_config(cfg: TrainConfig, explicit: set[str]) -> TrainConfig:
    """A swarm peer's config: the run's, as its live peers publish it, with this peer's own
    settings (:data:`~lowcomm.config.SWARM_LOCAL_KEYS`) on top.

    Nothing is unpickled: the run's config is JSON text, signed with the run key when the run
    has one, and builds a :class:`TrainConfig` like any other (every value validated).

    Args:
        cfg: this peer's config as given.
        explicit: the keys given explicitly (its ``--config`` file and its options).

    Raises:
        ValueError: the live peers run another lowcomm version (both named); an explicit
            setting contradicts the run's config (every difference listed); the peers do not
            agree on the run's config; or nobody publishes one and this peer gave none.
    """
    from collections import Counter

    from lowcomm.comm.hivemind import fetch_run_info, lowcomm_version

    # A volunteer may say how long it trains (--steps); every other run key must match.
    own = explicit - SWARM_LOCAL_KEYS - {"steps"}
    # A peer that brings a config looks briefly (it may be starting the run); one without
    # waits for the run's peers to show up.
    infos = fetch_run_info(
        cfg.run_id,
        _initial_peers(cfg),
        run_key=_run_key(cfg),
        timeout=2.0 if own else 30.0,
    )
    if not infos:
        if not own:
            raise ValueError(
                f"no live peer of run {cfg.run_id!r} publishes its config (is the run id right, "
                f"and the run key? is a peer of it running?); to start the run, give its "
                f"config (e.g. --config demo)"
            )
        return cfg
    counts = Counter(info.text for info in infos)
    text, count = counts.most_common(1)[0]
    if len(counts) > 1 and count <= len(infos) // 2:
        raise ValueError(
            f"the live peers of run {cfg.run_id!r} publish {len(counts)} different configs "
            f"(no majority): give the run's config explicitly"
        )
    versions = sorted({info.version for info in infos if info.text == text})
    mine = lowcomm_version()
    if versions != [mine]:
        raise ValueError(
            f"run {cfg.run_id!r} runs lowcomm {', '.join(versions)}, this peer lowcomm {mine}: "
            f"install the run's version (pip install lowcomm=={versions[0]}) to join it"
        )
    run = json.loads(text)
    if not isinstance(run, dict):
        raise ValueError(f"run {cfg.run_id!r} publishes a config that is not a JSON object")
    mine_cfg = cfg.to_dict()
    differences = [
        f"{key} ({mine_cfg.get(key)!r} here, {run.get(key)!r} in the run)"
        for key in sorted(own)
        if mine_cfg.get(key) != run.get(key)
    ]
    if differences:
        raise ValueError(
            f"these settings contradict run {cfg.run_id!r}'s config: {'; '.join(differences)}. "
            f"Leave them out to take the run's, or use another run id"
        )
    local = {k: v for k, v in mine_cfg.items() if k in SWARM_LOCAL_KEYS}
    if "steps" in explicit:
        local["steps"] = cfg.steps  # how long this volunteer trains (its own cosine's length)
    logger.info("joining run %r with its config, from %d live peer(s)", cfg.run_id, count)
    return TrainConfig(**{**run, **local})


def make_backend(cfg: TrainConfig) -> Any:
    """The swarm backend for ``--backend hivemind``; None lets DiLoCo pick (torch.distributed).

    The swarm peer publishes the run's config (JSON, signed with the run key) beside its
    heartbeat, so that volunteers can join by address alone (:func:`join_run_config`).
    """
    if cfg.backend != "hivemind":
        return None
    from lowcomm.comm.hivemind import HivemindBackend

    return HivemindBackend(
        cfg.run_id,
        initial_peers=_initial_peers(cfg),
        run_key=_run_key(cfg),
        round_seconds=cfg.round_seconds,
        wait_for_peers=cfg.wait_for_peers,
        wait_for_peers_timeout=cfg.wait_for_peers_timeout,
        max_norm=cfg.max_norm or None,
        norm_ratio=cfg.norm_ratio or None,
        aggregation=cfg.aggregation,
        run_info=cfg.run_config_text(),
    )


def make_optimizer(
    cfg: TrainConfig,
    model: nn.Module,
    inner: torch.optim.Optimizer,
    compression: Any,
    backend: Any = None,
) -> torch.optim.Optimizer:
    """DiLoCo around ``inner`` in diloco mode; ``inner`` itself otherwise.

    Collective in diloco mode under a process group (rank 0's parameters are broadcast).
    """
    if cfg.mode != "diloco":
        return inner

    warmup = cfg.outer_warmup
    if warmup < 0:  # the library's rule, where there is Nesterov momentum to ramp to
        ramps = cfg.nesterov and 0 < cfg.outer_momentum < 1
        warmup = outer_warmup_for(cfg.sync_every) if ramps else 0

    def outer(params: Any) -> torch.optim.Optimizer:
        if warmup:
            return OuterWarmup(params, cfg.outer_lr, cfg.outer_momentum, warmup)
        nesterov = cfg.nesterov and cfg.outer_momentum > 0
        return torch.optim.SGD(
            params, lr=cfg.outer_lr, momentum=cfg.outer_momentum, nesterov=nesterov
        )

    return DiLoCo(
        model,
        inner,
        sync_every=cfg.sync_every,
        outer_optimizer=outer,
        compression=compression,
        fragments=cfg.fragments,
        overlap_steps=cfg.overlap_steps,
        mix=cfg.mix,
        overlap_mode=cfg.overlap_mode,
        backend=backend,
        round_seconds=cfg.round_seconds if cfg.deadline_rounds else None,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    autocast: Any,
) -> float:
    """Mean loss over the fixed held-out batches (no communication)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for x, y in batches:
        with autocast():
            _, loss = model(x.to(device), y.to(device))
        total += float(loss)
    model.train(was_training)
    return total / len(batches)


def theta_digest(tensors: list[torch.Tensor]) -> str:
    """A digest of global parameters in model order (shapes and bytes): equal iff θ is
    bit-identical. A checkpoint's ``shared["param.*"]`` entries, in their stored order, give
    the same digest as the live ``DiLoCo.global_tensors()``."""
    digest = hashlib.blake2b(digest_size=16)
    for i, tensor in enumerate(tensors):
        host = tensor.detach().to("cpu").contiguous()
        digest.update(f"{i}|{tuple(host.shape)}|{host.dtype};".encode())
        data: Any = host.reshape(-1).view(torch.uint8).numpy()  # the buffer, no copy
        digest.update(data)
    return digest.hexdigest()


def swarm_round_metrics(diloco: DiLoCo, backend: Any) -> dict[str, Any]:
    """What a swarm peer logs after each applied outer step (a ``swarm/version`` record in
    ``metrics.jsonl``), so that a run's peers can be compared round by round
    (``scripts/reliability/soak.py`` checks them): the state version, :func:`theta_digest`,
    who was in the last average, whether this peer sat it out, the state it downloaded so
    far, the seconds it spent blocked in averages so far, and the bounds on one round's
    blocking and on a catch-up download (:class:`~lowcomm.comm.hivemind.SwarmTimeouts`).
    """
    s = diloco.stats
    return {
        "swarm/version": s.fragment_syncs,
        "swarm/theta": theta_digest(diloco.global_tensors()),
        "swarm/peer": backend.peer_id,
        "swarm/peers": s.num_peers,
        "swarm/sat_out": diloco.schedule.stale(0),
        "swarm/state_bytes": backend.state_bytes,
        "swarm/comm_s": s.comm_seconds,
        "swarm/wait_timeout_s": backend.timeouts.wait_timeout,
        "swarm/round_bound_s": backend.timeouts.round_bound,
        "swarm/download_bound_s": backend.timeouts.download_bound,
        "swarm/inner_steps": s.inner_steps,
    }


def allreduce_bytes(num_params: int, world_size: int, steps: int) -> int:
    """Bytes one worker sends for a ring all-reduce of fp32 gradients every step."""
    return int(2 * (world_size - 1) / world_size * 4 * num_params * steps)


# -- the run ------------------------------------------------------------------------------------


def train(cfg: TrainConfig, rt: Runtime) -> dict[str, Any]:
    """Run training as configured; return the summary (see the module docstring)."""
    rank, world_size, device = rt.rank, rt.world_size, rt.device
    run_dir = Path(cfg.run_dir)
    compression = make_compression(cfg) if cfg.mode == "diloco" else None
    resume = prepare_run_dir(cfg, rt)
    replicas = Replicas(cfg, rt)
    # Workers that see different data: every rank, or every replica of several ranks.
    workers = replicas.count

    corpus = load_training_corpus(cfg)
    # The smallest shard decides, so that every rank raises alike (none waits in a collective).
    smallest = min(
        hi - lo for lo, hi in (shard_bounds(len(corpus.train), r, workers) for r in range(workers))
    )
    if smallest <= cfg.seq_len:
        raise ValueError(
            f"the smallest training shard holds {smallest} bytes, not more than seq_len "
            f"({cfg.seq_len}); use more data or fewer workers ({workers})"
        )
    eval_set = eval_batches(
        corpus.val, num_batches=cfg.eval_batches, batch_size=cfg.batch_size, seq_len=cfg.seq_len
    )

    torch.manual_seed(cfg.seed)
    gpt_config = GPTConfig(
        block_size=cfg.seq_len,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_embd=cfg.n_embd,
        tie_weights=cfg.tie_weights,
    )
    raw_model = GPT(gpt_config).to(device)
    num_params = raw_model.num_params()
    signature = parameter_signature(raw_model)
    manifest_body = {
        "fingerprint": cfg.fingerprint(),
        "config": cfg.to_dict(),
        "signature": signature,
        "num_params": num_params,
    }
    if resume is not None:
        # Before any collective or training: a wrong checkpoint fails on every rank alike.
        ckpt.validate_manifest(
            ckpt.read_manifest(resume),
            config=cfg.to_dict(),
            fingerprint=cfg.fingerprint(),
            signature=signature,
            world_size=world_size,
            resumable_keys=RESUMABLE_KEYS,
        )

    # Model wrapping and optimizer. DiLoCo must see the bare model: DDP (from accelerate or
    # torch) across workers would all-reduce every gradient, which is what DiLoCo is there to
    # avoid; DDP or FSDP2 *inside* a replica (--replicas) is what clusters run.
    acc = rt.accelerator
    model: nn.Module = raw_model
    if acc is not None:
        model = acc.prepare_model(raw_model, evaluation_mode=cfg.mode != "ddp")
        model.train()
    elif cfg.mode == "ddp" and world_size > 1:
        model = nn.parallel.DistributedDataParallel(
            raw_model, device_ids=[device.index] if device.type == "cuda" else None
        )
    else:
        model = replicas.wrap(cfg, raw_model)
    # DDP's all-reduce blocks backward; the clock counts for how long (blocked_seconds).
    ddp_clock = (
        DDPWaitClock(model) if isinstance(model, nn.parallel.DistributedDataParallel) else None
    )
    # After wrapping: FSDP2 replaces the parameters with sharded ones.
    inner = make_inner_optimizer(cfg, raw_model)
    if cfg.backend == "hivemind" and world_size > 1:
        raise ValueError(
            f"backend 'hivemind' runs one process per peer; got WORLD_SIZE={world_size} "
            "(start each volunteer with `lowcomm join`, not torchrun)"
        )
    backend = make_backend(cfg)
    base_opt = make_optimizer(cfg, raw_model, inner, compression, backend or replicas.backend(cfg))
    opt = acc.prepare_optimizer(base_opt) if acc is not None else base_opt
    sched = torch.optim.lr_scheduler.LambdaLR(inner, lambda s: lr_factor(cfg, s))
    diloco = base_opt if isinstance(base_opt, DiLoCo) else None

    use_bf16 = cfg.dtype == "bf16" and acc is None

    def autocast() -> contextlib.AbstractContextManager[None]:
        if use_bf16:
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def global_view() -> contextlib.AbstractContextManager[None]:
        # DiLoCo evaluates the global parameters, not this worker's drifted local copy.
        return diloco.global_parameters() if diloco is not None else contextlib.nullcontext()

    # Resume: everything that makes the continuation bit-identical.
    start_step, evals = 0, []
    if resume is not None:
        # To the host first: the model and optimizers copy it into place, so the
        # accelerator never holds the checkpoint beside the live state.
        state = ckpt.load_rank_state(resume, rank, map_location="cpu")
        load_model_state(raw_model, state["model"])
        base_opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), device)
        start_step = int(state["step"])
        evals = [tuple(e) for e in state["evals"]]
        logger.info("rank %d resumed from %s at inner step %d", rank, resume, start_step)
    data_seed = cfg.seed
    if backend is not None:
        # A volunteer continues at the swarm's step (DiLoCo downloaded it), on a data stream
        # of its own: world_size stays 1, and its peer id joins the sampler's seed.
        start_step = max(start_step, diloco.stats.inner_steps if diloco is not None else 0)
        sched.last_epoch = start_step
        for group, base_lr in zip(inner.param_groups, sched.base_lrs):
            group["lr"] = base_lr * lr_factor(cfg, start_step)
        data_seed = cfg.seed * 2**28 + int(
            hashlib.sha256(backend.peer_id.encode()).hexdigest()[:7], 16
        )

    metrics = MetricsLogger(
        run_dir,
        enabled=rank == 0,
        wandb=cfg.wandb,
        config=cfg.to_dict(),
        project=cfg.wandb_project,
        name=cfg.run_name,
    )
    if rank == 0:
        ckpt.atomic_write_bytes(
            run_dir / "config.json", json.dumps(cfg.to_dict(), indent=1).encode()
        )
    progress = Progress(cfg.steps, start_step, enabled=cfg.progress and rank == 0)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    ckpt_period = cfg.ckpt_every * cfg.sync_every
    last_ckpt: Path | None = None
    logged_version = diloco.stats.fragment_syncs if diloco is not None else 0

    def blocked_seconds() -> float:
        # The training loop's seconds blocked on communication: DiLoCo's syncs, DDP's
        # all-reduce (across workers, or inside a replica).
        seconds = diloco.stats.comm_seconds if diloco is not None else 0.0
        return seconds + (ddp_clock.seconds if ddp_clock is not None else 0.0)

    def stats() -> dict[str, Any]:
        if diloco is None:
            sent = allreduce_bytes(num_params, world_size, step - start_step)
            return {
                "bytes_sent": sent if cfg.mode == "ddp" else 0,
                "outer_steps": 0,
                "comm_seconds": blocked_seconds(),
            }
        s = diloco.stats
        return {
            "bytes_sent": s.bytes_sent,
            "bytes_received": s.bytes_received,
            "outer_steps": s.outer_steps,
            "comm_seconds": blocked_seconds(),
            "compression_ratio": s.compression_ratio,
            "peak_sync_bytes": s.peak_sync_bytes,
            "averaged_steps": s.averaged_steps,
            "discarded_steps": s.discarded_steps,
            # Who met in the last average (before the first: the backend's world); the
            # heartbeat view (live_peers) drops as soon as a peer that finished first leaves.
            "peers": s.num_peers if s.outer_steps else diloco.backend.world_size,
            **({"live_peers": diloco.backend.world_size} if backend is not None else {}),
        }

    def swarm_size() -> int:
        # The most peers in any one average: a round that fell back to fewer (a peer timed
        # out and averaged alone, as the swarm allows) does not shrink what was trained in.
        return diloco.stats.max_peers if diloco is not None else world_size

    def run_eval() -> None:
        with global_view():
            loss = evaluate(raw_model, eval_set, device, autocast)
        evals.append((step, loss))
        metrics.log(step, {"eval/loss": loss, "tokens": step * tokens_per_step * workers})
        if rank == 0 and cfg.progress:
            progress.write(f"step {step}: eval loss {loss:.4f}")
        elif rank == 0:
            logger.info("step %d: eval loss %.4f", step, loss)

    step = start_step
    # This worker's training window (from the first step's start to the last one's end, the
    # final evaluation left out) and its blocked seconds in it, for worker<R>.json.
    window: dict[str, float] = {}
    try:
        if not evals:
            run_eval()
        model.train()
        t_start = t_log = time.perf_counter()
        window = {"start": time.time(), "blocked_at_start": blocked_seconds()}
        loss_sum, loss_count = torch.zeros((), device=device), 0
        # With rounds cut by the clock, a peer that stopped mid-round would lose the work of
        # its last partial round: past --steps it trains on to the end of the round (less
        # than round_seconds), averages it, then stops.
        on_deadlines = diloco is not None and cfg.deadline_rounds
        rounds_at_target: int | None = None
        last = step >= cfg.steps and not on_deadlines
        while not last:
            rounds_before = diloco.stats.outer_steps if diloco is not None else 0
            with span("compute"):
                x, y = sample_batch(
                    corpus.train,
                    batch_size=cfg.batch_size,
                    seq_len=cfg.seq_len,
                    seed=data_seed,
                    rank=replicas.index,
                    world_size=workers,
                    step=step,
                )
                rows = replicas.rows(cfg.batch_size)
                x, y = x[rows].to(device), y[rows].to(device)
                with autocast():
                    _, loss = model(x, y)
                if acc is not None:
                    acc.backward(loss)
                else:
                    loss.backward()
                if ddp_clock is not None:
                    ddp_clock.backward_done()
                if cfg.grad_clip > 0:
                    if acc is not None:
                        acc.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
                    else:
                        nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            step += 1
            loss_sum += loss.detach()
            loss_count += 1
            if on_deadlines and step >= cfg.steps:
                assert diloco is not None
                if rounds_at_target is None:
                    rounds_at_target = rounds_before
                last = diloco.stats.outer_steps > rounds_at_target
            else:
                last = step >= cfg.steps
            if last and diloco is not None:
                # Land the syncs still in flight: the final model, its evaluation, the last
                # log line and the byte counters all include them.
                window["blocked_before_flush"] = blocked_seconds()
                diloco.flush()
            if last:
                window.update(end=time.time(), blocked_at_end=blocked_seconds())

            applied = diloco.stats.fragment_syncs if diloco is not None else 0
            if backend is not None and diloco is not None and applied != logged_version:
                logged_version = applied
                metrics.log(step, swarm_round_metrics(diloco, backend))

            if step % cfg.log_every == 0 or last:
                now = time.perf_counter()
                train_loss = float(loss_sum) / loss_count
                tps = loss_count * tokens_per_step * workers / max(now - t_log, 1e-9)
                s = stats()
                metrics.log(
                    step,
                    {
                        "train/loss": train_loss,
                        "lr": sched.get_last_lr()[0],
                        "tokens_per_s": tps,
                        "tokens": step * tokens_per_step * workers,
                        **{k: v for k, v in s.items() if v is not None},
                    },
                )
                postfix = {"loss": f"{train_loss:.3f}", "tok/s": f"{tps:.3g}"}
                if diloco is not None:
                    postfix["outer"] = s["outer_steps"]
                postfix["sent"] = format_bytes(s["bytes_sent"])
                if s.get("compression_ratio") not in (None, 1.0):
                    postfix["ratio"] = f"{s['compression_ratio']:.3g}x"
                if s.get("peak_sync_bytes"):
                    postfix["peak"] = format_bytes(s["peak_sync_bytes"])
                progress.update(loss_count, **postfix)
                t_log, loss_sum, loss_count = now, torch.zeros((), device=device), 0

            if step % cfg.eval_every == 0 or last:
                run_eval()
            if cfg.ckpt_every and (step % ckpt_period == 0 or last):
                state = {
                    "model": model_state(raw_model),
                    "optimizer": base_opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "rng": {
                        "torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                    },
                    "step": step,
                    "evals": [list(e) for e in evals],
                }
                last_ckpt = ckpt.save_checkpoint(
                    ckpt.checkpoint_root(run_dir),
                    step,
                    state,
                    rank=rank,
                    world_size=world_size,
                    manifest=manifest_body,
                    keep=cfg.keep,
                    timeout=cfg.ckpt_timeout,
                )
        elapsed = time.perf_counter() - t_start
        steps_run = step - start_step
        s = stats()
        # A swarm peer is a world of one; the per-step all-reduce it is compared with runs
        # among as many peers as the largest round it averaged in.
        group = workers if backend is None else max(workers, swarm_size())
        bound = allreduce_bytes(num_params, group, steps_run)
        summary: dict[str, Any] = {
            "mode": cfg.mode,
            "world_size": world_size,
            "replicas": workers,
            "shard": cfg.shard if workers != world_size else None,
            "swarm_peers": swarm_size() if backend is not None else None,
            "last_round_peers": diloco.stats.num_peers if diloco is not None else world_size,
            "rank": rank,
            "num_params": num_params,
            "steps": step,
            "steps_run": steps_run,
            "tokens_per_worker": steps_run * tokens_per_step,
            "first_eval_loss": evals[0][1],
            "final_eval_loss": evals[-1][1],
            "evals": evals,
            "bytes_sent": s["bytes_sent"],
            "bytes_sent_estimated": cfg.mode == "ddp",
            "allreduce_bytes": bound,
            "allreduce_ratio": bound / s["bytes_sent"] if s["bytes_sent"] else None,
            "outer_steps": s["outer_steps"],
            "elapsed_s": elapsed,
            "tokens_per_s": steps_run * tokens_per_step * workers / max(elapsed, 1e-9),
            "comm_seconds": s["comm_seconds"],
            "run_dir": str(run_dir),
            "checkpoint": str(last_ckpt) if last_ckpt is not None else None,
        }
        metrics.log(step, {f"summary/{k}": v for k, v in summary.items() if k != "evals"})
        if "end" in window:
            write_worker_record(run_dir, rank, window)
    finally:
        if TIMELINE.enabled:
            TIMELINE.write(run_dir / f"timeline.rank{rank}.jsonl", rank=rank, mode=cfg.mode)
        # Also on errors: flush the metrics file, stop wandb and the bar, wait for syncs.
        progress.close()
        metrics.close()
        if diloco is not None:
            diloco.close()
    return summary


def write_worker_record(run_dir: Path, rank: int, window: dict[str, float]) -> None:
    """``run_dir/worker<rank>.json``: this worker's training window (wall-clock ``start`` and
    ``end``, first step to last) and the seconds its loop was blocked on communication in it,
    ``flush_seconds`` of them after the last step (landing the syncs still in flight).

    Every rank writes its own, so a benchmark can report each worker's blocked fraction:
    other processes on the machine slow every step alike, which moves tokens/s, while the
    blocked seconds grow only when communication is not hidden behind compute.
    """
    seconds = window["end"] - window["start"]
    blocked = window["blocked_at_end"] - window["blocked_at_start"]
    flushed = window["blocked_at_end"] - window.get(
        "blocked_before_flush", window["blocked_at_end"]
    )
    record = {
        "rank": rank,
        "start": window["start"],
        "end": window["end"],
        "train_seconds": seconds,
        "blocked_seconds": blocked,
        "blocked_fraction": blocked / seconds if seconds > 0 else None,
        # Of those, the wait for what was still in flight after the last step (flush()):
        # a cost per run, not per step, which a longer run spreads thinner.
        "flush_seconds": flushed,
    }
    ckpt.atomic_write_bytes(run_dir / f"worker{rank}.json", json.dumps(record).encode())


def format_summary(summary: dict[str, Any]) -> str:
    """The few lines rank 0 prints at the end of a run."""
    n = summary["world_size"]
    lines = [
        f"== {summary['mode']}: "
        + (
            f"swarm peer (up to {summary['swarm_peers']} per round, "
            f"{summary['last_round_peers']} in the last)"
            if summary.get("swarm_peers")
            else f"{summary['replicas']} replicas of {n // summary['replicas']} ranks "
            f"({summary['shard']})"
            if summary.get("replicas", n) != n
            else f"{n} worker(s)"
        )
        + f", {summary['steps_run']} inner steps, "
        f"{summary['num_params']:,} parameters, {summary['tokens_per_s']:.3g} tokens/s ==",
        f"eval loss: {summary['first_eval_loss']:.4f} -> {summary['final_eval_loss']:.4f}",
    ]
    sent, bound = summary["bytes_sent"], summary["allreduce_bytes"]
    label = "all-reduce sent (ring estimate)" if summary["bytes_sent_estimated"] else "sent"
    lines.append(f"bytes {label} per worker: {format_bytes(sent)} ({sent:,} B)")
    lines.append(
        f"fp32 gradient all-reduce every step would send: {format_bytes(bound)} ({bound:,} B; "
        f"2(N-1)/N * 4 * params per step per worker)"
    )
    if summary["bytes_sent_estimated"]:
        pass  # DDP is the per-step all-reduce; there is no ratio to show
    elif summary["allreduce_ratio"] is not None:
        lines.append(f"ratio: {summary['allreduce_ratio']:.1f}x fewer bytes")
    elif n == 1:
        lines.append("ratio: n/a with one worker (nothing to send)")
    else:
        lines.append("ratio: n/a (nothing sent)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse options, train, print the summary on rank 0, and return it.

    Args:
        argv: options (without the program name); None reads ``sys.argv[1:]``.

    Returns:
        The summary dict (empty after ``--help``).

    Raises:
        SystemExit: with status 2 for an invalid configuration (unknown key, bad value,
            impossible combination), after printing ``lowcomm: error: <why>`` to stderr;
            every rank checks its options before any process group or training starts.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        print(config_help())
        return {}
    try:
        cfg = load_config(argv)
        if cfg.backend == "hivemind":
            cfg = join_run_config(cfg, explicit_keys(argv))
    except ValueError as e:
        # A user's mistake, not the program's: one line, not a traceback per rank.
        print(f"lowcomm: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    rt = Runtime(cfg)
    try:
        summary = train(cfg, rt)
    finally:
        rt.close()
    if rt.rank == 0:
        print(format_summary(summary), flush=True)
    return summary


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    main()
