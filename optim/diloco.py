"""The DiLoCo outer-loop optimizer: a drop-in wrapper around any inner ``torch.optim``.

Implements DiLoCo (Douillard et al. 2023, "DiLoCo: Distributed Low-Communication Training of
Language Models"), its streaming variant with overlapped fragment syncs (Douillard et al.
2025, "Streaming DiLoCo with overlapping communication"), and eager updates (Kale et al.
2025, "Eager Updates For Overlapped Communication and Computation in DiLoCo").

One fragment sync, end to end: the pseudo-gradient is computed into one flat fp32 buffer on
the parameters' device (staging the global parameters there when they live on the host),
handed to the backend, which encodes it once and returns the mean and this worker's own
decoded contribution; every mode (mix, eager, delayed, and ``flush``) lands it through
:meth:`DiLoCo._result` (wait, error feedback, non-finite repair) and :meth:`DiLoCo._apply`
(outer step, local update).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lowcomm.comm.base import (
    AverageResult,
    AverageWork,
    Backend,
    ConsistencyError,
    DoneWork,
    ElasticBackend,
)
from lowcomm.comm.compression.base import Compressor, LayoutCompressor
from lowcomm.comm.compression.feedback import ErrorFeedback
from lowcomm.comm.local import LocalBackend
from lowcomm.comm.timeline import TIMELINE, span
from lowcomm.optim.agreement import config_fingerprint, shard_fingerprint
from lowcomm.optim.amp import scaled_inner_step
from lowcomm.optim.fragments import check_partition, partition
from lowcomm.optim.outer import (
    check_outer_kind,
    default_outer_optimizer,
    prime_outer_state,
    sync_outer_counts,
)
from lowcomm.optim.params import (
    fp32_copy,
    local_view,
    refuse_flat_parameters,
    repair_nonfinite,
    reshard_optimizer_state,
    single_device,
    synced_parameters,
)
from lowcomm.optim.schedule import DeadlineSchedule, StaggeredSchedule
from lowcomm.optim.state import (
    load_shared,
    outer_extras,
    pending_record,
    pending_result,
    restore_outer_extras,
    shared_tensors,
    upgrade_v1,
)
from lowcomm.optim.stats import DiLoCoStats, MemoryReport
from lowcomm.optim.wrapper import WrappingOptimizer

__all__ = ["MAX_SKIPPED_ROUNDS", "OVERLAP_MODES", "DiLoCo", "DiLoCoStats"]

logger = logging.getLogger(__name__)

OVERLAP_MODES = ("mix", "eager", "delayed")
MAX_SKIPPED_ROUNDS = 3
"""Consecutive syncs of one fragment with no finite average after which training stops.

A worker whose own round was not finite is repaired and contributes again in the next one;
when *nobody* contributes anything finite several rounds in a row, the global parameters or
every worker have diverged, and going on would only burn compute while reporting success.
"""

_STATE_KEY = "lowcomm"
_STATE_VERSION = 3


@dataclass(eq=False)
class _Pending:
    """A fragment sync in flight."""

    fragment: int
    land_step: int
    work: AverageWork
    send: torch.Tensor  # what this worker handed to the backend (kept alive until the wait)
    weight: float
    launch_step: int
    nbytes: int
    result: AverageResult | None = field(default=None)


class DiLoCo(WrappingOptimizer):
    """Wraps an inner optimizer; every ``sync_every`` inner steps, averages pseudo-gradients.

    Per worker, with global parameters θ identical on all workers::

        H inner steps:  θ_i ← inner_optimizer.step()      (inner state stays local)
        Δ_i = θ − θ_i                                     (pseudo-gradient, fp32)
        Δ   = weighted mean over workers of Δ_i           (through ``backend``, compressed)
        θ   ← outer_optimizer.step(θ, grad=Δ)             (default: averaging → Nesterov SGD)
        θ_i ← θ

    With ``fragments=P`` the parameters are split into ``P`` fragments, fragment ``p`` synced
    every ``H`` steps at offset ``p·H/P`` with its own outer optimizer (Streaming DiLoCo).
    ``overlap_steps=τ`` launches each sync asynchronously and applies it ``τ`` inner steps
    later, merging ``θ_i ← mix·θ_i + (1−mix)·θ`` to keep the local progress made meanwhile.
    ``overlap_mode="eager"`` instead overlaps a whole period: worker ``m`` steps the outer
    optimizer with ``Δ_m(t)/M + Σ_{m'≠m} Δ_{m'}(t−1)/M`` (its own fresh pseudo-gradient plus
    the others' from the last round); ``"delayed"`` applies the stale mean ``Δ(t−1)`` (the
    naive one-step delay; it needs a lower outer learning rate).

    Which modes keep θ bit-identical on every worker: plain and streaming (``mix``, any τ)
    and ``delayed`` do; there the global θ is the same on every worker after every sync
    (the local θ_i differ between syncs, as in any DiLoCo). ``eager`` does not: each worker
    mixes in its own fresh pseudo-gradient, so θ differs by ``(Δ_m(t) − Δ_m(t−1))/M`` between
    workers until the next round.

    ``DiLoCo`` subclasses ``torch.optim.Optimizer`` and shares ``param_groups``, ``state``
    and ``defaults`` with the inner optimizer, so LR schedulers, step hooks, accelerate and
    ``isinstance`` checks work on it. ``torch.amp.GradScaler`` calls ``step()`` on every
    iteration (DiLoCo declares ``_step_supports_amp_scaling``): a step with inf/NaN gradients
    skips the inner update but still counts, so the sync schedule stays the same on every
    worker.

    Faults: a pseudo-gradient that is not finite (a NaN loss, an overflow) is left out of the
    average by the backend; when the verdict comes back this worker resets every parameter
    whose values or inner-optimizer state are not finite to θ and drops that state, so it is
    back in the next round. An average that is not finite (nothing finite arrived) skips the
    outer step on every worker; :data:`MAX_SKIPPED_ROUNDS` in a row stop training with an
    error.

    Call protocol:
        * Construction is collective: every worker builds the same model and a ``DiLoCo`` with
          the same settings; the backend checks that (``check_consistent``) and gives every
          worker the reference worker's parameters (rank 0's under torch.distributed).
        * ``step()`` is collective at sync steps: every worker calls it the same number of
          times. Averages are issued in the same order on every worker, on the backend's
          own process group and thread, so the caller's collectives never interleave with
          them.
        * ``state_dict()`` waits for syncs in flight (their results are saved, so a resumed
          run applies them at the same step, bit-identically). Its tensors are host copies.
        * After the last step, ``flush()`` applies the syncs still in flight (overlap,
          eager, delayed); without it the final θ misses them. Every worker flushes at the
          same step.
        * ``close()`` waits for what is still on the wire and releases the backend (and the
          process group DiLoCo created, if it created one). ``step()`` after ``close()``
          raises.

    Args:
        model: the model being trained; its trainable parameters that the inner optimizer
            steps are synced. Frozen parameters (``requires_grad=False``) are left alone.
            Under FSDP2 (``fully_shard``) each rank syncs its local shards; FSDP1 is refused.
        inner_optimizer: any ``torch.optim.Optimizer`` over the model's parameters.
        sync_every: ``H``, inner steps between two syncs of one fragment.
        outer_optimizer: callable ``params -> torch.optim.Optimizer`` applied to the global
            copy; default :func:`~lowcomm.optim.outer.default_outer_optimizer`: plain
            averaging ramping to ``SGD(lr=0.7, momentum=0.9, nesterov=True)`` over the outer
            steps of the first 750 inner steps (measured: see its docstring).
        backend: how to average. None picks torch.distributed when a process group is
            initialised; when the process was launched by ``torchrun`` (``WORLD_SIZE > 1``)
            without one, DiLoCo initialises it from the environment (NCCL for CUDA
            parameters, else gloo); otherwise a single process. ``LocalBackend()`` is the
            explicit way to train alone.
        compression: a :class:`~lowcomm.comm.compression.base.Compressor` or an
            :class:`~lowcomm.comm.compression.ErrorFeedback` wrapping one; None sends fp32.
        fragments: ``P``, or a list of parameter lists (your own partition).
        overlap_steps: ``τ``, inner steps between launching a sync and applying it
            (``mix`` mode); must be less than ``H/P``.
        mix: ``α`` in ``θ_i ← α·θ_i + (1−α)·θ`` when an overlapped sync lands (``τ > 0``).
        overlap_mode: ``"mix"``, ``"eager"`` or ``"delayed"``.
        fragment_strategy: ``"strided"`` (default) or ``"sequential"``, for integer ``P``.
        global_device: where the fp32 global copy, the outer optimizer's state and the
            error-feedback residuals live (default: with the parameters). ``"cpu"`` for a
            model on the GPU keeps them in pinned host memory and stages one fragment at a
            time, so DiLoCo holds no persistent memory on the GPU (see :meth:`memory`).
        round_seconds: sync at wall-clock deadlines, every ``round_seconds`` (fragment ``p``
            at ``p/P`` of the way), instead of every ``sync_every`` inner steps
            (:class:`~lowcomm.optim.schedule.DeadlineSchedule`): for swarms of machines of
            unequal speed, each of which then contributes the inner steps it managed.
            ``sync_every`` stays the nominal steps per round (for bounds and fingerprints).
            None (default): the step-keyed schedule, bit-exact across workers.
    """

    # torch.amp.GradScaler then calls step() every iteration, with ``grad_scale`` and
    # ``found_inf`` set on this object, instead of skipping the call on inf gradients.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        model: nn.Module,
        inner_optimizer: torch.optim.Optimizer,
        sync_every: int = 500,
        outer_optimizer: Callable[[Sequence[torch.Tensor]], torch.optim.Optimizer] | None = None,
        backend: Backend | None = None,
        compression: Compressor | ErrorFeedback | None = None,
        fragments: int | Sequence[Sequence[nn.Parameter]] = 1,
        overlap_steps: int = 0,
        mix: float = 0.5,
        overlap_mode: str = "mix",
        fragment_strategy: str = "strided",
        global_device: torch.device | str | None = None,
        round_seconds: float | None = None,
    ) -> None:
        _check_arguments(model, inner_optimizer, overlap_mode, overlap_steps, mix, compression)

        super().__init__(inner_optimizer)

        self.model = model
        self.overlap_mode = overlap_mode
        self.overlap_steps = overlap_steps
        self.mix = float(mix)
        self._closed = False
        self._owns_process_group = False

        refuse_flat_parameters(model)
        self._names, self._params = synced_parameters(model, inner_optimizer)
        self._device = single_device(self._names, self._params)

        # Fragments.
        if isinstance(fragments, int) and not isinstance(fragments, bool):
            num_fragments = fragments
            frags = partition(model, self._params, fragments, fragment_strategy)
        else:
            frags = [list(f) for f in fragments]  # type: ignore[union-attr]
            check_partition(self._params, frags)
            num_fragments = len(frags)
        self._schedule: StaggeredSchedule | DeadlineSchedule = (
            StaggeredSchedule(sync_every, num_fragments)
            if round_seconds is None
            else DeadlineSchedule(round_seconds, num_fragments, sync_every)
        )
        if overlap_steps >= self._schedule.spacing:
            raise ValueError(
                f"overlap_steps ({overlap_steps}) must be less than the fragment spacing (the "
                f"smallest gap between two fragment syncs, sync_every // fragments = "
                f"{self._schedule.spacing}), so a sync lands before the next one starts"
            )
        index = {id(p): i for i, p in enumerate(self._params)}
        self._fragments: list[list[int]] = [[index[id(p)] for p in f] for f in frags]
        self._fragment_numel = [
            sum(local_view(self._params[i]).numel() for i in f) for f in self._fragments
        ]

        self._feedback = compression if isinstance(compression, ErrorFeedback) else None
        self._compressor: Compressor | None = (
            compression.compressor if isinstance(compression, ErrorFeedback) else compression
        )

        # A compressor that chunks per tensor is told each fragment's tensors, in buffer order.
        comp = self._compressor
        self._fragment_compressors = [
            comp.for_layout([local_view(self._params[i]).shape for i in f])
            if isinstance(comp, LayoutCompressor)
            else comp
            for f in self._fragments
        ]

        self.backend = self._pick_backend(backend)
        self.backend.check_compressor(self._compressor)
        self._world_size = self.backend.world_size
        # A swarm backend (workers come and go), or None.
        self._swarm: ElasticBackend | None = (
            self.backend
            if isinstance(self.backend, ElasticBackend) and self.backend.elastic
            else None
        )
        round_clock = getattr(self.backend, "set_round_clock", None)
        if isinstance(self._schedule, DeadlineSchedule) and callable(round_clock):
            # Its round keys are clock slots: the backend can hold groups for their start.
            round_clock(self._schedule.round_seconds / self._schedule.num_fragments)

        # Global copy (fp32), one outer optimizer per fragment.
        self._global_device = (
            torch.device(global_device) if global_device is not None else self._device
        )
        pin = (
            self._global_device.type == "cpu"
            and self._device.type == "cuda"
            and torch.cuda.is_available()
        )
        self._global = [fp32_copy(local_view(p), self._global_device, pin) for p in self._params]
        make_outer = outer_optimizer or functools.partial(
            default_outer_optimizer, sync_every=sync_every
        )
        self._outer = [make_outer([self._global[i] for i in f]) for f in self._fragments]
        for o in self._outer:
            if not isinstance(o, torch.optim.Optimizer):
                raise TypeError(
                    f"outer_optimizer must return a torch.optim.Optimizer, got {type(o).__name__}"
                )
        if self._feedback is not None and any(
            g.get("momentum", 0) or g.get("betas") for o in self._outer for g in o.param_groups
        ):
            # Measured: top-k 1% + error feedback under Nesterov 0.9 ended at a clearly worse
            # loss than without feedback; under plain SGD it was clearly better.
            logger.warning(
                "DiLoCo: error feedback with an outer optimizer that has momentum; both carry "
                "history and together they overshoot. Use an outer SGD without momentum "
                "(SparseLoCo's decayed residual stands in for it)."
            )
        if self._swarm is not None:
            prime_outer_state(self._outer)
            # A fragment's weight is the inner steps since its last sync: never more than H
            # on a step-keyed schedule; on deadlines a machine up to 4x the nominal pace
            # counts in full.
            bound = self._schedule.period * (1 if round_seconds is None else 4)
            self._swarm.bound_weights(float(bound))

        self._inner_steps = 0
        self._last_sync = [0] * len(self._fragments)
        self._skipped_in_a_row = [0] * len(self._fragments)
        self._pending: list[_Pending] = []
        self._previous: dict[int, _Pending] = {}  # eager/delayed: last round's average
        self._stats = DiLoCoStats()
        self._stats.dense_bytes_per_sync = 4 * sum(self._fragment_numel)
        self._sent_numel = 0
        self._sent_bytes_compressed = 0
        self._overlap_total = 0
        # Steps of rounds averaged alone since this worker last agreed with the swarm: lost
        # if it then adopts the swarm's state (stats.discarded_steps), kept if it agrees.
        self._solo_steps = 0.0
        self._round_started: float | None = None
        # Seconds blocked in backend calls other than wait(), which the backend times itself.
        self._blocked_seconds = 0.0

        self._check_shards()
        self.backend.check_consistent(self._fingerprint())
        # Every worker starts from the reference worker's θ (rank 0's under torch.distributed,
        # a live peer's in a swarm, with its outer state and step counters too).
        self._sync_shared_state()

    # -- construction helpers ----------------------------------------------------------------

    def _pick_backend(self, backend: Backend | None) -> Backend:
        if backend is not None:
            if not isinstance(backend, Backend):
                raise TypeError(
                    f"backend must implement lowcomm.comm.Backend (rank, world_size, stats, "
                    f"check_compressor, check_consistent, sync_state, average, close), got "
                    f"{type(backend).__name__}"
                )
            return backend
        from lowcomm.comm.torch_dist import TorchDistBackend, init_process_group_from_env

        # torchrun's environment says this process is one of several: training alone here
        # would silently be N independent runs. accelerate does the same.
        if (
            dist.is_available()
            and not dist.is_initialized()
            and init_process_group_from_env(self._device)
        ):
            self._owns_process_group = True
            logger.info(
                "DiLoCo: launched as rank %s of %s (torchrun); initialised the process "
                "group (%s). Pass backend=LocalBackend() to train alone.",
                os.environ.get("RANK"),
                os.environ.get("WORLD_SIZE"),
                dist.get_backend(),
            )
        if dist.is_available() and dist.is_initialized():
            return TorchDistBackend()
        return LocalBackend()

    def _check_shards(self) -> None:
        shards = shard_fingerprint(self._names, self._params)
        if shards is None:
            return
        try:
            self.backend.check_consistent(shards)
        except ConsistencyError as e:
            raise ConsistencyError(
                "DiLoCo's group spans ranks that hold different shards of the model's sharded "
                "(DTensor/FSDP2) parameters; averaging them would mix different slices of each "
                "weight. Average over the cross-replica group only: "
                "TorchDistBackend(group=mesh['replicate'].get_group()), see "
                f"lowcomm.comm.init_replica_mesh. ({e})"
            ) from None

    def _fingerprint(self) -> str:
        return config_fingerprint(
            self._names,
            self._params,
            repr(self._schedule),
            self.fragments,
            self.overlap_mode,
            self.overlap_steps,
            self.mix,
            self._feedback or self._compressor,
            self._outer,
        )

    @property
    def outer_optimizers(self) -> list[torch.optim.Optimizer]:
        """One outer optimizer per fragment, over the global copy."""
        return list(self._outer)

    @property
    def fragments(self) -> list[list[str]]:
        """Parameter names in each fragment."""
        return [[self._names[i] for i in f] for f in self._fragments]

    @property
    def schedule(self) -> StaggeredSchedule | DeadlineSchedule:
        """Which fragment syncs when."""
        return self._schedule

    @property
    def stats(self) -> DiLoCoStats:
        """Counters so far; see :class:`DiLoCoStats`."""
        s = self._stats
        s.inner_steps = self._inner_steps
        s.outer_steps = s.fragment_syncs // len(self._fragments)
        s.bytes_sent = self.backend.stats.bytes_sent
        s.bytes_received = self.backend.stats.bytes_received
        s.comm_seconds = self.backend.stats.comm_seconds + self._blocked_seconds
        if self._sent_bytes_compressed:
            s.compression_ratio = 4 * self._sent_numel / self._sent_bytes_compressed
        if s.fragment_syncs:
            s.mean_overlap_steps = self._overlap_total / s.fragment_syncs
        return s

    def memory(self) -> MemoryReport:
        """The memory DiLoCo holds beside the model and the inner optimizer, by device.

        Counts the global copy, the outer optimizers' state, error-feedback residuals and
        the buffers of syncs in flight (eager/delayed keep one per fragment for a whole
        round): what was sent, and the mean and decoded own contribution it brings back
        (counted at their size before they arrive). A sync's other buffers (payloads, the
        backend's receive buffers) live only while it is on the wire; ``max_in_flight_bytes``
        in :attr:`stats` bounds their payload.
        """
        tensors: list[torch.Tensor] = list(self._global)
        for o in self._outer:
            for st in o.state.values():
                tensors += [v for v in st.values() if isinstance(v, torch.Tensor)]
        if self._feedback is not None:
            for key in self._feedback.keys():  # noqa: SIM118 - ErrorFeedback is not a dict
                tensors.append(self._feedback.residual(key))  # type: ignore[arg-type]
        coming: dict[str, int] = {}
        lossless = self._compressor is None
        for p in self._pending + list(self._previous.values()):
            tensors.append(p.send)
            if p.result is not None:
                tensors += [p.result.mean, p.result.own]
            else:
                # Not waited for yet: the mean (and, for a lossy wire, the decoded own
                # contribution) exist on the backend's side or will when it completes.
                dev = str(p.send.device)
                coming[dev] = coming.get(dev, 0) + 4 * p.send.numel() * (1 if lossless else 2)
        return MemoryReport.of(
            [local_view(t) for t in tensors], sum(self._fragment_numel), extra=coming
        )

    # -- stepping ----------------------------------------------------------------------------

    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        """One inner step; at a fragment's sync step, also its outer step.

        Args:
            closure: passed to the inner optimizer (re-evaluates the loss).

        Returns:
            The inner optimizer's return value (the loss when a closure is given; None when
            a grad scaler skipped the step).

        Raises:
            RuntimeError: after :meth:`close`.
            FloatingPointError: :data:`MAX_SKIPPED_ROUNDS` syncs of one fragment in a row
                had no finite average.
        """
        if self._closed:
            raise RuntimeError("DiLoCo.step() after close(): build a new DiLoCo to train on")
        with span("compute"):
            loss = self._inner_step(closure)
        self._inner_steps += 1
        step = self._inner_steps
        with torch.no_grad():
            applied = self._stats.fragment_syncs
            landing = [p for p in self._pending if p.land_step <= step]
            for pending in landing:
                self._pending.remove(pending)
                self._land(pending)
            for frag in self._schedule.due(step):
                self._sync(frag, step)
            if self._stats.fragment_syncs != applied:
                self._after_outer_step()
        return loss

    def _inner_step(self, closure: Callable[[], float] | None) -> Any:
        # GradScaler.step() sets grad_scale/found_inf on this object around the call.
        return scaled_inner_step(
            self._inner,
            self._params,
            closure,
            self.__dict__.get("grad_scale"),
            self.__dict__.get("found_inf"),
        )

    def _check_world(self) -> None:
        if self._swarm is not None:
            return
        world = self.backend.world_size
        if world != self._world_size:
            raise ConsistencyError(
                f"the backend's world size changed from {self._world_size} to {world} "
                f"under DiLoCo; restart every worker from the last checkpoint"
            )

    def _pseudo_gradient(self, frag: int) -> torch.Tensor:
        """Δ = θ − θ_i of one fragment, as one flat fp32 buffer on the parameters' device."""
        out = torch.empty(self._fragment_numel[frag], dtype=torch.float32, device=self._device)
        offset = 0
        for i in self._fragments[frag]:
            local = local_view(self._params[i])
            n = local.numel()
            view = out[offset : offset + n].view(local.shape)
            # Stages θ when it lives on the host; a no-op move when it lives with the model.
            view.copy_(self._global[i], non_blocking=True)
            view.sub_(local)
            offset += n
        return out

    def _sync(self, frag: int, step: int) -> None:
        with span("prepare"):
            self._start_sync(frag, step)

    def _start_sync(self, frag: int, step: int) -> None:
        self._check_world()
        # A stale fragment (this worker missed a round of it) sits this one out: its
        # pseudo-gradient is against global parameters the others moved on from.
        stale = self._schedule.stale(frag)
        weight = 0.0 if stale else float(step - self._last_sync[frag])
        if stale:
            self._stats.discarded_steps += (step - self._last_sync[frag]) / len(self._fragments)
        self._last_sync[frag] = step
        delta = self._pseudo_gradient(frag)
        landed = None
        if self.overlap_mode != "mix":
            landed = self._previous.pop(frag, None)
            if landed is not None:
                # Before prepare(): error feedback must record last round's residual first.
                self._result(landed)
        send = self._feedback.prepare(f"fragment.{frag}", delta) if self._feedback else delta
        if self._round_started is None or frag == 0:
            self._round_timing()
        key = self._schedule.key(frag, step)
        comp = self._fragment_compressors[frag]
        with self._blocking():
            work = self.backend.average(send, weight=weight, compressor=comp, step=key)
        nbytes = comp.nbytes(send.numel()) if comp is not None else 4 * send.numel()
        self._sent_numel += send.numel()
        self._sent_bytes_compressed += nbytes
        land = step + (self.overlap_steps if self.overlap_mode == "mix" else self._schedule.period)
        fresh = _Pending(frag, land, work, send, weight, step, nbytes)
        in_flight = nbytes + sum(p.nbytes for p in self._pending)
        self._stats.max_in_flight_bytes = max(self._stats.max_in_flight_bytes, in_flight)
        if self.overlap_mode == "mix":
            if self.overlap_steps == 0:
                self._land(fresh)
            else:
                self._pending.append(fresh)
            return
        # eager / delayed: consume last round's average of this fragment, keep this one.
        self._previous[frag] = fresh
        self._land_overlapped(frag, landed, fresh, delta, step)

    # -- landing: every mode goes through _result and _apply ---------------------------------

    def _result(self, pending: _Pending) -> AverageResult:
        """Wait for a sync once; record its error-feedback residual or repair this worker."""
        if pending.result is None:
            with span("wait"):
                result = pending.result = pending.work.wait()
            if result.own_weight == 0 and pending.weight > 0:
                self._on_nonfinite(pending.fragment)
            elif self._feedback is not None and result.own_weight > 0:
                # residual = x − (what the others decoded of x), kept where θ lives.
                home = self._global_device
                with span("apply"):
                    self._feedback.record(
                        f"fragment.{pending.fragment}", pending.send.to(home), result.own.to(home)
                    )
        return pending.result

    def _land(self, pending: _Pending) -> None:
        """Apply a ``mix``-mode sync: outer step with the mean, then merge or reset."""
        result = self._result(pending)
        self._record_sync(result, self._inner_steps - pending.launch_step)
        alpha = self.mix if self.overlap_steps > 0 else 0.0
        self._apply(pending.fragment, result.mean if result.total_weight > 0 else None, alpha)

    def _land_overlapped(
        self,
        frag: int,
        landed: _Pending | None,
        fresh: _Pending,
        delta: torch.Tensor,
        step: int,
    ) -> None:
        """Eager/delayed at a sync: step with last round's average (``landed``) and ``delta``."""
        if landed is None:
            # First round: no other worker's pseudo-gradient has arrived yet. Eager steps with
            # its own (the best estimate of the others'); delayed has nothing to apply.
            self._stats.fragment_syncs += 1
            if self.overlap_mode == "eager" and bool(torch.isfinite(delta).all()):
                self._apply(frag, delta, 0.0)
            else:
                self._update_local(frag, 0.0)
            return
        result = self._result(landed)
        self._record_sync(result, step - landed.launch_step)
        if result.total_weight <= 0:
            self._apply(frag, None, 0.0)
            return
        mean, total = result.mean, result.total_weight
        if self.overlap_mode == "delayed":
            grad = mean
        else:
            # (1/M)(Δ_m(t) + Σ_{m'≠m} Δ_{m'}(t−1)), weighted. Whether this worker's fresh Δ is
            # finite is decided on the device (the backend's verdict comes a round later):
            # if it is not, this is the delayed step.
            ok = torch.isfinite(delta).all()
            delta = delta.to(mean.device)
            if result.own_weight > 0:
                # Swap this worker's stale share of last round's mean for its fresh Δ.
                grad = mean + torch.where(ok, delta - result.own, 0.0) * (result.own_weight / total)
            else:
                # This worker sat out last round: its fresh share joins the others' mean.
                w = ok.to(torch.float32) * fresh.weight
                grad = (mean * total + torch.where(ok, delta, 0.0) * w) / (total + w)
        self._apply(frag, grad, 0.0)

    def _apply(self, frag: int, grad: torch.Tensor | None, alpha: float) -> None:
        """Outer step with ``grad`` (None: no finite average, skip) and update θ_i."""
        if grad is None:
            self._skip(frag)
            return
        self._skipped_in_a_row[frag] = 0
        with span("apply"):
            self._outer_step(frag, grad)
            self._update_local(frag, alpha)

    def _outer_step(self, frag: int, grad: torch.Tensor) -> None:
        grad = grad.to(self._global_device)
        offset = 0
        for i in self._fragments[frag]:
            g = self._global[i]
            n = g.numel()
            g.grad = grad[offset : offset + n].view_as(g)
            offset += n
        self._outer[frag].step()
        for i in self._fragments[frag]:
            self._global[i].grad = None

    def _update_local(self, frag: int, alpha: float) -> None:
        """θ_i ← θ (``alpha`` 0) or ``alpha·θ_i + (1−alpha)·θ``, for one fragment."""
        for i in self._fragments[frag]:
            local, g = local_view(self._params[i]), self._global[i]
            # A host θ is pinned, so these copies do not block; θ is next written by an
            # outer step, which first reads a later result back, after these copies ran.
            if alpha == 0.0:
                local.copy_(g, non_blocking=True)
            else:
                merged = g.to(local.device, non_blocking=True) * (1.0 - alpha)
                merged += local.to(torch.float32) * alpha
                local.copy_(merged)

    def _record_result(self, result: AverageResult) -> None:
        """Counters every landed average updates: its bytes and who was in it."""
        s = self._stats
        s.peak_sync_bytes = max(s.peak_sync_bytes, result.bytes_sent)
        s.num_peers = result.num_peers
        s.max_peers = max(s.max_peers, result.num_peers)
        if result.num_peers >= 2 and result.own_weight > 0 and result.total_weight > 0:
            s.averaged_steps += result.own_weight / len(self._fragments)
        elif result.num_peers == 1 and result.own_weight > 0:
            self._solo_steps += result.own_weight / len(self._fragments)

    def _record_sync(self, result: AverageResult, overlap: int) -> None:
        s = self._stats
        s.fragment_syncs += 1
        self._record_result(result)
        s.overlap_steps = overlap
        self._overlap_total += overlap

    def _skip(self, frag: int) -> None:
        self._stats.skipped_outer_steps += 1
        self._skipped_in_a_row[frag] += 1
        logger.warning(
            "DiLoCo rank %d step %d: no finite contribution to fragment %d; outer step "
            "skipped, global parameters kept",
            self.backend.rank,
            self._inner_steps,
            frag,
        )
        self._update_local(frag, 0.0)
        if self._skipped_in_a_row[frag] >= MAX_SKIPPED_ROUNDS:
            raise FloatingPointError(
                f"DiLoCo: {self._skipped_in_a_row[frag]} syncs of fragment {frag} in a row had "
                f"no finite average (step {self._inner_steps}): every worker's training has "
                f"diverged. Resume from the last checkpoint with a lower learning rate"
            )

    def _on_nonfinite(self, frag: int) -> None:
        """This worker's own contribution was not finite: repair it for the next round."""
        self._stats.nonfinite_rounds += 1
        with torch.no_grad():
            reset = repair_nonfinite(self._params, self._global, self._inner)
        logger.warning(
            "DiLoCo rank %d step %d: non-finite pseudo-gradient in fragment %d; it was left out "
            "of the average, and %d parameter(s) with non-finite values or optimizer state "
            "were reset to the global parameters",
            self.backend.rank,
            self._inner_steps,
            frag,
            len(reset),
        )

    # -- swarm backends ----------------------------------------------------------------------

    def _after_outer_step(self) -> None:
        """Swarm backends: serve the new state to joiners; catch up if this worker fell behind."""
        backend = self._swarm
        if backend is None:
            return
        with self._blocking():
            backend.publish_state(self._shared_state())
            resync = backend.needs_resync()
        if not resync:
            if self._stats.num_peers >= 2:
                self._solo_steps = 0.0  # it met the others and its state is theirs
            return
        # What it did alone since it last agreed with the swarm is replaced now.
        self._stats.discarded_steps += self._solo_steps
        self._solo_steps = 0.0
        logger.warning(
            "DiLoCo step %d: this worker's state differs from the swarm's; downloading it",
            self._inner_steps,
        )
        # In-flight syncs were computed against the state being replaced.
        for pending in self._pending + list(self._previous.values()):
            if pending.result is None:
                pending.work.wait()
        self._pending, self._previous = [], {}
        with self._blocking():
            self._sync_shared_state()

    @contextlib.contextmanager
    def _blocking(self) -> Iterator[None]:
        """Count a backend call that talks to other workers (beside ``wait``, which the
        backend times itself) in ``stats.comm_seconds``, and as a ``wait`` span."""
        start = time.perf_counter()
        try:
            yield
        finally:
            end = time.perf_counter()
            self._blocked_seconds += end - start
            TIMELINE.add("wait", start, end)

    def _round_timing(self) -> None:
        now = time.monotonic()
        if self._round_started is not None and self._swarm is not None:
            self._swarm.set_round_seconds(now - self._round_started)
        self._round_started = now

    def _shared_state(self) -> dict[str, torch.Tensor]:
        """The shared part of the state (:mod:`lowcomm.optim.state`), as live references."""
        return shared_tensors(
            self._names,
            self._fragments,
            self._global,
            self._outer,
            self._stats.fragment_syncs,
            self._inner_steps,
        )

    def _sync_shared_state(self) -> None:
        state = self._shared_state()
        with torch.no_grad():
            self.backend.sync_state(state)  # in place: θ and the outer state are live
            sync_outer_counts(self._outer)  # an OuterWarmup's count came as a tensor
            for p, g in zip(self._params, self._global):
                local_view(p).copy_(g)
        self._stats.fragment_syncs = int(state["meta.outer_step"].item())
        self._inner_steps = int(state["meta.inner_steps"].item())
        for f in range(len(self._fragments)):
            self._last_sync[f] = self._schedule.last_sync_step(f, self._inner_steps)

    # -- global parameters -------------------------------------------------------------------

    @contextlib.contextmanager
    def global_parameters(self) -> Iterator[None]:
        """Temporarily load the global θ into the model (for evaluation or export)."""
        with torch.no_grad():
            saved = [local_view(p).detach().clone() for p in self._params]
            for p, g in zip(self._params, self._global):
                local_view(p).copy_(g)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self._params, saved):
                    local_view(p).copy_(s)

    def global_tensors(self) -> list[torch.Tensor]:
        """The fp32 global copy, in model parameter order (local shards under FSDP2; do not
        modify)."""
        return list(self._global)

    # -- state_dict --------------------------------------------------------------------------

    def _layout(self) -> dict[str, Any]:
        return {
            "names": list(self._names),
            "shapes": [tuple(local_view(p).shape) for p in self._params],
            "fragments": [list(f) for f in self._fragments],
            "sync_every": self._schedule.period,
            "overlap_mode": self.overlap_mode,
            "overlap_steps": self.overlap_steps,
        }

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus ``"lowcomm"``: everything to resume exactly.

        ``"lowcomm"`` holds the layout it belongs to, the ``shared`` part a joining swarm
        peer would download (:mod:`lowcomm.optim.state`), and this ``worker``'s own part.
        Syncs in flight are waited for and their averaged results saved. Every tensor is a
        host copy, so a checkpoint can be written, and later loaded, without a second copy
        of the state on the accelerator.
        """
        sd = _to_host(self._inner.state_dict())
        pending = []
        previous_ids = {id(p) for p in self._previous.values()}
        for p in self._pending + list(self._previous.values()):
            record = pending_record(self._result(p), p.weight, p.nbytes)
            pending.append(
                {
                    **record,
                    "fragment": p.fragment,
                    "land_step": p.land_step,
                    "launch_step": p.launch_step,
                    "previous": id(p) in previous_ids,
                }
            )
        sd[_STATE_KEY] = {
            "version": _STATE_VERSION,
            "layout": self._layout(),
            "shared": {k: _to_host(v) for k, v in self._shared_state().items()},
            "outer_extras": outer_extras(self._outer),
            "worker": {
                "feedback": self._feedback.state_dict() if self._feedback is not None else None,
                "last_sync": list(self._last_sync),
                "skipped_in_a_row": list(self._skipped_in_a_row),
                "pending": pending,
                "stats": self.stats.as_dict(),
                "counters": [self._sent_numel, self._sent_bytes_compressed, self._overlap_total],
                "solo_steps": self._solo_steps,
            },
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (tensors may be on any device).

        Also reads the state dicts of lowcomm 0.1.0 (format version 1).

        Raises:
            ValueError: if the state comes from another model, fragment layout or config.
        """
        sd = dict(state_dict)
        mine = sd.pop(_STATE_KEY, None)
        if mine is None:
            raise ValueError(
                f"state dict has no {_STATE_KEY!r} key: it is not a DiLoCo state dict "
                f"(load an inner optimizer's with opt.inner_optimizer.load_state_dict)"
            )
        if mine.get("version", 1) < 3:
            mine = upgrade_v1(mine, list(self._layout()), len(self._fragments))
        for key, want in self._layout().items():
            got = mine["layout"].get(key)
            if key == "shapes":
                got = [tuple(s) for s in got]
            if got != want:
                raise ValueError(
                    f"DiLoCo state dict does not match this optimizer: {key} is {got!r} in the "
                    f"checkpoint but {want!r} here"
                )
        check_outer_kind(self._outer, mine.get("outer_extras", []))
        worker = mine["worker"]
        if self._feedback is not None and worker["feedback"] is None:
            raise ValueError("checkpoint has no error-feedback residuals but this run uses them")
        self._inner.load_state_dict(reshard_optimizer_state(self._inner, sd))
        for o in self._outer:
            o.state.clear()
        self._stats.fragment_syncs, self._inner_steps = load_shared(
            mine["shared"], self._names, self._fragments, self._global, self._outer
        )
        restore_outer_extras(self._outer, mine["outer_extras"])
        if self._feedback is not None:
            self._feedback.load_state_dict(worker["feedback"])
        self._last_sync = list(worker["last_sync"])
        self._skipped_in_a_row = list(worker["skipped_in_a_row"])
        self._sent_numel, self._sent_bytes_compressed, self._overlap_total = worker["counters"]
        self._solo_steps = float(worker.get("solo_steps", 0.0))
        for k, v in worker["stats"].items():
            if k not in ("bytes_sent", "bytes_received", "comm_seconds", "fragment_syncs"):
                setattr(self._stats, k, v)
        self._pending, self._previous = [], {}
        for item in worker["pending"]:
            result = pending_result(item, self._device)
            # Saved results were waited for, and their residuals recorded, before saving.
            pending = _Pending(
                item["fragment"],
                item["land_step"],
                DoneWork(result),
                result.own,
                item["weight"],
                item["launch_step"],
                item["nbytes"],
                result,
            )
            if item["previous"]:
                self._previous[item["fragment"]] = pending
            else:
                self._pending.append(pending)

    def flush(self) -> int:
        """Land every sync still in flight now; call it after the last training step.

        Without it, a sync launched near the end (``overlap_steps``, or eager/delayed, which
        consume a round's average at the next round) would be on the wire but never applied:
        the final θ would miss it and :attr:`stats` would not count its bytes.

        * ``mix``: each in-flight sync is applied as if its ``overlap_steps`` had passed.
        * ``delayed``: the last round's mean is applied (the step the next round would take).
        * ``eager``: the last round's average minus this worker's own share, which eager
          already applied; every worker's pseudo-gradient of every round then lands once.

        Training may continue afterwards: the next round of a flushed eager/delayed fragment
        starts like the first one. Collective-free; every worker must flush at the same step
        (elastic backends: a worker that flushes and goes on may resync).

        Returns:
            The number of fragment syncs applied.
        """
        applied = 0
        with torch.no_grad():
            for pending in sorted(self._pending, key=lambda p: p.launch_step):
                self._land(pending)
                applied += 1
            self._pending = []
            for frag, previous in sorted(self._previous.items()):
                result = self._result(previous)
                self._record_result(result)
                grad = None
                if result.total_weight > 0:
                    grad = result.mean
                    if self.overlap_mode == "eager" and result.own_weight > 0:
                        grad = grad - result.own * (result.own_weight / result.total_weight)
                self._apply(frag, grad, 0.0)
                applied += 1
            self._previous = {}
        if applied:
            self._after_outer_step()
        return applied

    def close(self) -> None:
        """Wait for syncs in flight (without applying them: see :meth:`flush`) and release
        the backend, and the process group if DiLoCo initialised it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for p in self._pending + list(self._previous.values()):
            if p.result is None:
                p.result = p.work.wait()
        self.backend.close()
        if self._owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


# -- helpers ------------------------------------------------------------------------------------


def _check_arguments(
    model: object,
    inner: object,
    overlap_mode: object,
    overlap_steps: object,
    mix: object,
    compression: object,
) -> None:
    """User mistakes in DiLoCo's arguments, refused before anything is built."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(
            f"inner_optimizer must be a torch.optim.Optimizer, got {type(inner).__name__}"
        )
    if isinstance(inner, DiLoCo):
        raise TypeError("inner_optimizer is already a DiLoCo; wrap the inner optimizer once")
    if overlap_mode not in OVERLAP_MODES:
        raise ValueError(f"overlap_mode ({overlap_mode!r}) must be one of {OVERLAP_MODES}")
    if isinstance(overlap_steps, bool) or not isinstance(overlap_steps, int) or overlap_steps < 0:
        raise ValueError(f"overlap_steps ({overlap_steps!r}) must be an integer >= 0")
    if isinstance(mix, bool) or not isinstance(mix, (int, float)) or not 0.0 <= mix <= 1.0:
        raise ValueError(f"mix ({mix!r}) must be a number in [0, 1]")
    if overlap_mode != "mix" and overlap_steps:
        raise ValueError(
            f"overlap_steps ({overlap_steps}) is for overlap_mode='mix'; "
            f"'{overlap_mode}' always overlaps a whole period of sync_every steps"
        )
    if isinstance(compression, str):
        raise TypeError(
            f"compression must be a Compressor or ErrorFeedback object, not the string "
            f"{compression!r}: build it with lowcomm.parse_compression({compression!r})"
        )
    if compression is not None and not isinstance(compression, (Compressor, ErrorFeedback)):
        raise TypeError(
            f"compression must be None, a lowcomm Compressor (dense, granularity, nbytes, "
            f"compress, decompress) or an ErrorFeedback, got {type(compression).__name__}"
        )


def _to_host(obj: Any) -> Any:
    """A copy of a (nested) state dict with every tensor copied to the host."""
    if isinstance(obj, torch.Tensor):
        return local_view(obj).detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_host(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_host(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_host(v) for v in obj)
    return obj
