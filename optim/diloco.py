"""The DiLoCo outer-loop optimizer: a drop-in wrapper around any inner ``torch.optim``.

Implements DiLoCo (Douillard et al. 2023, "DiLoCo: Distributed Low-Communication Training of
Language Models"), its streaming variant with overlapped fragment syncs (Douillard et al.
2025, "Streaming DiLoCo with overlapping communication"), and eager updates (Kale et al.
2025, "Eager Updates For Overlapped Communication and Computation in DiLoCo").
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lowcomm.comm.base import AverageResult, AverageWork, Backend, ConsistencyError
from lowcomm.comm.compression.base import Compressor
from lowcomm.comm.local import LocalBackend
from lowcomm.optim.fragments import check_partition, partition
from lowcomm.optim.outer import default_outer_optimizer, prime_outer_state
from lowcomm.optim.schedule import StaggeredSchedule
from lowcomm.optim.stats import DiLoCoStats

__all__ = ["DiLoCo", "DiLoCoStats", "OVERLAP_MODES"]

logger = logging.getLogger(__name__)

OVERLAP_MODES = ("mix", "eager", "delayed")
_STATE_KEY = "lowcomm"
_STATE_VERSION = 1


@dataclass(eq=False)
class _Pending:
    """A fragment sync in flight."""

    fragment: int
    land_step: int
    work: AverageWork
    delta: torch.Tensor  # this worker's fresh pseudo-gradient (eager mode adds it)
    sent: torch.Tensor  # what this worker contributed, decoded (eager mode subtracts it)
    weight: float
    launch_step: int
    nbytes: int
    result: AverageResult | None = field(default=None)

    def result_now(self) -> AverageResult:
        if self.result is None:
            self.result = self.work.wait()
        return self.result


class DiLoCo(torch.optim.Optimizer):
    """Wraps an inner optimizer; every ``sync_every`` inner steps, averages pseudo-gradients.

    Per worker, with global parameters θ identical on all workers::

        H inner steps:  θ_i ← inner_optimizer.step()      (inner state stays local)
        Δ_i = θ − θ_i                                     (pseudo-gradient, fp32)
        Δ   = weighted mean over workers of Δ_i           (through ``backend``, compressed)
        θ   ← outer_optimizer.step(θ, grad=Δ)             (default Nesterov SGD, lr 0.7)
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
    and ``defaults`` with the inner optimizer, so LR schedulers, step hooks, grad scalers,
    accelerate and ``isinstance`` checks work on it.

    Call protocol:
        * Construction is collective: every worker builds the same model and a ``DiLoCo`` with
          the same settings; the backend checks that (``check_consistent``) and gives every
          worker the reference worker's parameters (rank 0's under torch.distributed).
        * ``step()`` is collective at sync steps: every worker calls it the same number of
          times. Averages are issued in the same order on every worker.
        * ``state_dict()`` waits for syncs in flight (their results are saved, so a resumed
          run applies them at the same step, bit-identically).
        * After the last step, ``flush()`` applies the syncs still in flight (overlap,
          eager, delayed); without it the final θ misses them. Every worker flushes at the
          same step.
        * ``close()`` waits for what is still on the wire and releases the backend.

    Args:
        model: the model being trained; its trainable parameters that the inner optimizer
            steps are synced. Frozen parameters (``requires_grad=False``) are left alone.
        inner_optimizer: any ``torch.optim.Optimizer`` over the model's parameters.
        sync_every: ``H``, inner steps between two syncs of one fragment.
        outer_optimizer: callable ``params -> torch.optim.Optimizer`` applied to the global
            copy; default ``SGD(lr=0.7, momentum=0.9, nesterov=True)``.
        backend: how to average; None picks torch.distributed if a process group is
            initialised, else a single process.
        compression: a :class:`~lowcomm.comm.compression.base.Compressor` or an
            ``ErrorFeedback`` wrapping one; None sends fp32.
        fragments: ``P``, or a list of parameter lists (your own partition).
        overlap_steps: ``τ``, inner steps between launching a sync and applying it
            (``mix`` mode); must be less than ``H/P``.
        mix: ``α`` in ``θ_i ← α·θ_i + (1−α)·θ`` when an overlapped sync lands (``τ > 0``).
        overlap_mode: ``"mix"``, ``"eager"`` or ``"delayed"``.
        fragment_strategy: ``"strided"`` (default) or ``"sequential"``, for integer ``P``.
        global_device: where the fp32 global copy lives (default: with each parameter).
    """

    _inner: torch.optim.Optimizer

    def __init__(
        self,
        model: nn.Module,
        inner_optimizer: torch.optim.Optimizer,
        sync_every: int = 500,
        outer_optimizer: Callable[[Sequence[torch.Tensor]], torch.optim.Optimizer] | None = None,
        backend: Backend | None = None,
        compression: Any = None,
        fragments: int | Sequence[Sequence[nn.Parameter]] = 1,
        overlap_steps: int = 0,
        mix: float = 0.5,
        overlap_mode: str = "mix",
        fragment_strategy: str = "strided",
        global_device: torch.device | str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(inner_optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"inner_optimizer must be a torch.optim.Optimizer, got "
                f"{type(inner_optimizer).__name__}"
            )
        if isinstance(inner_optimizer, DiLoCo):
            raise TypeError("inner_optimizer is already a DiLoCo; wrap the inner optimizer once")
        if overlap_mode not in OVERLAP_MODES:
            raise ValueError(f"overlap_mode ({overlap_mode!r}) must be one of {OVERLAP_MODES}")
        if not isinstance(overlap_steps, int) or overlap_steps < 0:
            raise ValueError(f"overlap_steps ({overlap_steps!r}) must be an integer >= 0")
        if not 0.0 <= mix <= 1.0:
            raise ValueError(f"mix ({mix}) must be in [0, 1]")
        if overlap_mode != "mix" and overlap_steps:
            raise ValueError(
                f"overlap_steps ({overlap_steps}) is for overlap_mode='mix'; "
                f"'{overlap_mode}' always overlaps a whole period of sync_every steps"
            )

        # Optimizer.__init__ assigns state/param_groups/defaults and adds groups; those must
        # not touch the inner optimizer, so they go to a scratch space until it returns.
        self.__dict__["_inner"] = inner_optimizer
        self.__dict__["_scratch"] = {}
        super().__init__([p for g in inner_optimizer.param_groups for p in g["params"]], {})
        del self.__dict__["_scratch"]

        self.model = model
        self.overlap_mode = overlap_mode
        self.overlap_steps = overlap_steps
        self.mix = float(mix)

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        model_ids = {id(p) for p in model.parameters()}
        inner_ids = [id(p) for g in inner_optimizer.param_groups for p in g["params"]]
        foreign = [i for i in inner_ids if i not in model_ids]
        if foreign:
            raise ValueError(
                f"inner_optimizer holds {len(foreign)} parameter(s) that are not the model's; "
                f"build it from model.parameters()"
            )
        inner_set = set(inner_ids)
        self._names = [n for n, p in named if id(p) in inner_set]
        self._params: list[nn.Parameter] = [p for _, p in named if id(p) in inner_set]
        unstepped = [n for n, p in named if id(p) not in inner_set]
        if unstepped:
            logger.warning(
                "DiLoCo: %d trainable parameter(s) are not in the inner optimizer and will not "
                "be synced: %s",
                len(unstepped),
                unstepped[:5],
            )
        if not self._params:
            raise ValueError("the model has no trainable parameters in the inner optimizer")

        # Fragments.
        if isinstance(fragments, int) and not isinstance(fragments, bool):
            self._schedule = StaggeredSchedule(sync_every, fragments)
            frags = partition(model, self._params, fragments, fragment_strategy)
        else:
            frags = [list(f) for f in fragments]  # type: ignore[union-attr]
            check_partition(self._params, frags)
            self._schedule = StaggeredSchedule(sync_every, len(frags))
        if overlap_steps >= self._schedule.spacing:
            raise ValueError(
                f"overlap_steps ({overlap_steps}) must be less than the fragment spacing "
                f"sync_every/fragments ({self._schedule.spacing}), so a sync lands before the "
                f"next one starts"
            )
        index = {id(p): i for i, p in enumerate(self._params)}
        self._fragments: list[list[int]] = [[index[id(p)] for p in f] for f in frags]

        # Compression: a Compressor, or an ErrorFeedback (duck-typed: it has .compressor).
        self._feedback = compression if hasattr(compression, "record") else None
        self._compressor: Compressor | None = (
            compression.compressor if self._feedback is not None else compression
        )

        # Backend.
        if backend is None:
            if dist.is_available() and dist.is_initialized():
                from lowcomm.comm.torch_dist import TorchDistBackend

                backend = TorchDistBackend()
            else:
                backend = LocalBackend()
        self.backend = backend
        self._world_size = backend.world_size

        # Global copy (fp32), one outer optimizer per fragment.
        self._global_device = torch.device(global_device) if global_device is not None else None
        self.backend.check_consistent(self._fingerprint(sync_every, compression))
        self._global = [
            p.detach().to(self._global_device or p.device, torch.float32, copy=True)
            for p in self._params
        ]
        make_outer = outer_optimizer or default_outer_optimizer
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
        self._inner_steps = 0
        self._last_sync = [0] * len(self._fragments)
        self._pending: list[_Pending] = []
        self._previous: dict[int, _Pending] = {}  # eager/delayed: last round's average
        self._stats = DiLoCoStats()
        self._stats.dense_bytes_per_sync = 4 * sum(p.numel() for p in self._params)
        self._sent_numel = 0
        self._sent_bytes_compressed = 0
        self._overlap_total = 0
        self._round_started: float | None = None
        self._elastic = bool(getattr(self.backend, "elastic", False))
        if self._elastic:
            prime_outer_state(self._outer)
        # Every worker starts from the reference worker's θ (rank 0's under torch.distributed,
        # a live peer's in a swarm, with its outer state and step counters too).
        self._sync_shared_state()

    # -- the torch.optim contract: state and groups are the inner optimizer's ----------------

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        scratch = self.__dict__.get("_scratch")
        if scratch is not None:
            return scratch.setdefault("param_groups", [])
        return self._inner.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        scratch = self.__dict__.get("_scratch")
        if scratch is not None:
            scratch["param_groups"] = value
        else:
            self._inner.param_groups = value

    @property  # type: ignore[override]
    def state(self) -> Any:
        scratch = self.__dict__.get("_scratch")
        if scratch is not None:
            return scratch.setdefault("state", {})
        return self._inner.state

    @state.setter
    def state(self, value: Any) -> None:
        scratch = self.__dict__.get("_scratch")
        if scratch is not None:
            scratch["state"] = value
        else:
            self._inner.state = value

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:
        scratch = self.__dict__.get("_scratch")
        if scratch is not None:
            return scratch.setdefault("defaults", {})
        return self._inner.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        scratch = self.__dict__.get("_scratch")
        if scratch is not None:
            scratch["defaults"] = value
        else:
            self._inner.defaults = value

    @property
    def inner_optimizer(self) -> torch.optim.Optimizer:
        """The wrapped optimizer."""
        return self._inner

    @property
    def outer_optimizers(self) -> list[torch.optim.Optimizer]:
        """One outer optimizer per fragment, over the global copy."""
        return list(self._outer)

    @property
    def fragments(self) -> list[list[str]]:
        """Parameter names in each fragment."""
        return [[self._names[i] for i in f] for f in self._fragments]

    @property
    def schedule(self) -> StaggeredSchedule:
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
        s.comm_seconds = self.backend.stats.comm_seconds
        if self._sent_bytes_compressed:
            s.compression_ratio = 4 * self._sent_numel / self._sent_bytes_compressed
        if s.fragment_syncs:
            s.mean_overlap_steps = self._overlap_total / s.fragment_syncs
        return s

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the inner optimizer's gradients."""
        self._inner.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Refused once constructed: the set of synced parameters is fixed at start."""
        scratch = self.__dict__.get("_scratch")
        if scratch is not None:
            return  # Optimizer.__init__ adding the inner's groups again: they exist already.
        raise RuntimeError(
            "DiLoCo cannot add parameter groups after construction: the global copy, "
            "fragments and outer optimizers are fixed; build a new DiLoCo"
        )

    # -- stepping ----------------------------------------------------------------------------

    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        """One inner step; at a fragment's sync step, also its outer step.

        Args:
            closure: passed to the inner optimizer (re-evaluates the loss).

        Returns:
            The inner optimizer's return value (the loss when a closure is given).
        """
        loss = self._inner.step(closure) if closure is not None else self._inner.step()
        self._inner_steps += 1
        step = self._inner_steps
        with torch.no_grad():
            applied = self._stats.fragment_syncs
            landing = [p for p in self._pending if p.land_step <= step]
            for pending in landing:
                self._pending.remove(pending)
                self._apply_mix(pending)
            for frag in self._schedule.due(step):
                self._sync(frag, step)
            if self._stats.fragment_syncs != applied:
                self._after_outer_step()
        return loss

    def _sync(self, frag: int, step: int) -> None:
        if not getattr(self.backend, "elastic", False):
            world = self.backend.world_size
            if world != self._world_size:
                raise ConsistencyError(
                    f"the backend's world size changed from {self._world_size} to {world} "
                    f"under DiLoCo; restart every worker from the last checkpoint"
                )
        idx = self._fragments[frag]
        weight = float(step - self._last_sync[frag])
        self._last_sync[frag] = step
        delta = torch.cat(
            [
                (
                    self._global[i]
                    - self._params[i].detach().to(self._global[i].device, torch.float32)
                ).reshape(-1)
                for i in idx
            ]
        )
        if not bool(torch.isfinite(delta).all()):
            # Left out of the average (weight 0) rather than poisoning everyone's θ.
            self._stats.nonfinite_rounds += 1
            logger.warning(
                "DiLoCo rank %d step %d: non-finite pseudo-gradient in fragment %d; "
                "leaving this worker's contribution out",
                self.backend.rank,
                step,
                frag,
            )
            delta.zero_()
            weight = 0.0
        if self._feedback is not None and weight > 0:
            key = f"fragment.{frag}"
            send = self._feedback.prepare(key, delta)
            sent = self._feedback.roundtrip(send)
            self._feedback.record(key, send, sent)
        elif self._compressor is not None and self.overlap_mode == "eager":
            send = delta
            sent = self._compressor.decompress(self._compressor.compress(delta))
        else:
            send = sent = delta
        if self._round_started is None or frag == 0:
            self._round_timing(frag)
        work = self.backend.average([send], weight=weight, compressor=self._compressor, step=step)
        comp = self._compressor
        nbytes = comp.nbytes(send.numel()) if comp is not None else 4 * send.numel()
        self._sent_numel += send.numel()
        self._sent_bytes_compressed += nbytes
        land = step + (self.overlap_steps if self.overlap_mode == "mix" else self._schedule.period)
        pending = _Pending(frag, land, work, delta, sent, weight, step, nbytes)
        in_flight = nbytes + sum(p.nbytes for p in self._pending)
        self._stats.max_in_flight_bytes = max(self._stats.max_in_flight_bytes, in_flight)
        if self.overlap_mode == "mix":
            if self.overlap_steps == 0:
                self._apply_mix(pending)
            else:
                self._pending.append(pending)
            return
        # eager / delayed: consume last round's average of this fragment, keep this one.
        previous = self._previous.pop(frag, None)
        self._previous[frag] = pending
        self._apply_delayed(frag, pending, previous, step)

    def _record_result(self, result: AverageResult) -> None:
        """Counters every landed average updates: its bytes and who was in it."""
        s = self._stats
        s.peak_sync_bytes = max(s.peak_sync_bytes, result.bytes_sent)
        s.num_peers = result.num_peers
        s.max_peers = max(s.max_peers, result.num_peers)

    def _record_sync(self, pending: _Pending, result: AverageResult, overlap: int) -> None:
        s = self._stats
        s.fragment_syncs += 1
        self._record_result(result)
        s.overlap_steps = overlap
        self._overlap_total += overlap

    def _outer_step(self, frag: int, grad: torch.Tensor) -> None:
        offset = 0
        for i in self._fragments[frag]:
            g = self._global[i]
            n = g.numel()
            g.grad = grad[offset : offset + n].view_as(g).to(g.device)
            offset += n
        self._outer[frag].step()
        for i in self._fragments[frag]:
            self._global[i].grad = None

    def _apply_mix(self, pending: _Pending) -> None:
        result = pending.result_now()
        frag = pending.fragment
        self._record_sync(pending, result, self._inner_steps - pending.launch_step)
        if result.total_weight <= 0:
            self._skip(frag)
            return
        self._outer_step(frag, result.tensors[0].reshape(-1))
        alpha = self.mix if self.overlap_steps > 0 else 0.0
        for i in self._fragments[frag]:
            p, g = self._params[i], self._global[i]
            if alpha == 0.0:
                p.copy_(g)
            else:
                merged = g.to(p.device) * (1.0 - alpha) + p.to(torch.float32) * alpha
                p.copy_(merged)

    def _apply_delayed(
        self, frag: int, fresh: _Pending, previous: _Pending | None, step: int
    ) -> None:
        if previous is None:
            # First round: no other worker's pseudo-gradient has arrived yet. Eager steps with
            # its own (the best estimate of the others'); delayed has nothing to apply.
            self._stats.fragment_syncs += 1
            if self.overlap_mode == "delayed" or fresh.weight <= 0:
                self._reset_local(frag)
                return
            grad = fresh.delta
        else:
            result = previous.result_now()
            self._record_sync(previous, result, step - previous.launch_step)
            if result.total_weight <= 0:
                self._skip(frag)
                return
            mean = result.tensors[0].reshape(-1)
            total = result.total_weight
            if self.overlap_mode == "delayed" or fresh.weight <= 0:
                grad = mean
            elif previous.weight > 0:
                # (1/M)(Δ_m(t) + Σ_{m'≠m} Δ_{m'}(t−1)), weighted: swap this worker's stale
                # share of last round's mean for its fresh pseudo-gradient.
                grad = mean + (fresh.delta - previous.sent) * (previous.weight / total)
            else:
                # This worker sat out last round: its fresh share joins the others' mean.
                grad = (mean * total + fresh.delta * fresh.weight) / (total + fresh.weight)
        self._outer_step(frag, grad)
        self._reset_local(frag)

    def _after_outer_step(self) -> None:
        """Swarm backends: serve the new state to joiners; catch up if this worker fell behind."""
        if not self._elastic:
            return
        publish = getattr(self.backend, "publish_state", None)
        if publish is not None:
            publish(self._shared_state())
        needs = getattr(self.backend, "needs_resync", None)
        if needs is not None and needs():
            logger.warning(
                "DiLoCo step %d: this worker's state differs from the swarm's; downloading it",
                self._inner_steps,
            )
            # In-flight syncs were computed against the state being replaced.
            for pending in self._pending:
                pending.result_now()
            self._pending, self._previous = [], {}
            self._sync_shared_state()

    def _round_timing(self, frag: int) -> None:
        now = time.monotonic()
        set_round = getattr(self.backend, "set_round_seconds", None)
        if self._round_started is not None and set_round is not None:
            set_round(now - self._round_started)
        self._round_started = now

    def _shared_state(self) -> dict[str, torch.Tensor]:
        """Everything a joiner needs to continue as this worker: θ, outer state, counters."""
        state: dict[str, torch.Tensor] = {
            f"param.{n}": g for n, g in zip(self._names, self._global)
        }
        if self._elastic:
            for f, (frag, outer) in enumerate(zip(self._fragments, self._outer)):
                for i in frag:
                    for key, value in sorted(outer.state.get(self._global[i], {}).items()):
                        if isinstance(value, torch.Tensor):
                            state[f"outer.{f}.{self._names[i]}.{key}"] = value
            state["meta.outer_step"] = torch.tensor([self._stats.fragment_syncs])
            state["meta.inner_steps"] = torch.tensor([self._inner_steps])
        return state

    def _sync_shared_state(self) -> None:
        state = self._shared_state()
        with torch.no_grad():
            self.backend.sync_state(state)
            for p, g in zip(self._params, self._global):
                p.copy_(g)
        if "meta.inner_steps" in state:
            self._stats.fragment_syncs = int(state["meta.outer_step"].item())
            self._inner_steps = int(state["meta.inner_steps"].item())
            period = self._schedule.period
            for f in range(len(self._fragments)):
                # The last step <= inner_steps at which fragment f synced (0: never).
                offset = self._schedule.offset(f) or period
                last = self._inner_steps - ((self._inner_steps - offset) % period)
                self._last_sync[f] = last if last >= offset else 0

    def _reset_local(self, frag: int) -> None:
        for i in self._fragments[frag]:
            self._params[i].copy_(self._global[i])

    def _skip(self, frag: int) -> None:
        self._stats.skipped_outer_steps += 1
        logger.warning(
            "DiLoCo rank %d step %d: no finite contribution to fragment %d; outer step "
            "skipped, global parameters kept",
            self.backend.rank,
            self._inner_steps,
            frag,
        )
        self._reset_local(frag)

    # -- global parameters -------------------------------------------------------------------

    @contextlib.contextmanager
    def global_parameters(self) -> Iterator[None]:
        """Temporarily load the global θ into the model (for evaluation or export)."""
        with torch.no_grad():
            saved = [p.detach().clone() for p in self._params]
            for p, g in zip(self._params, self._global):
                p.copy_(g)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self._params, saved):
                    p.copy_(s)

    def global_tensors(self) -> list[torch.Tensor]:
        """The fp32 global copy, in model parameter order (do not modify)."""
        return list(self._global)

    # -- state_dict --------------------------------------------------------------------------

    def _fingerprint(self, sync_every: int, compression: Any) -> str:
        layout = [(n, tuple(p.shape), str(p.dtype)) for n, p in zip(self._names, self._params)]
        try:
            from lowcomm.comm.compression.registry import compression_spec

            comp = compression_spec(compression)
        except ImportError:  # pragma: no cover - registry ships with the package
            comp = type(compression).__name__
        blob = repr(
            (
                layout,
                sync_every,
                [len(f) for f in self._fragments],
                self.overlap_mode,
                self.overlap_steps,
                comp,
            )
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus ``"lowcomm"``: everything to resume exactly.

        Syncs in flight are waited for and their averaged results saved.
        """
        sd = self._inner.state_dict()
        pending = []
        previous_ids = {id(p) for p in self._previous.values()}
        for p in self._pending + list(self._previous.values()):
            result = p.result_now()
            pending.append(
                {
                    "fragment": p.fragment,
                    "land_step": p.land_step,
                    "launch_step": p.launch_step,
                    "weight": p.weight,
                    "nbytes": p.nbytes,
                    "delta": p.delta.detach().cpu().clone(),
                    "sent": p.sent.detach().cpu().clone(),
                    "result": [t.detach().cpu().clone() for t in result.tensors],
                    "num_peers": result.num_peers,
                    "total_weight": result.total_weight,
                    "bytes_sent": result.bytes_sent,
                    "previous": id(p) in previous_ids,
                }
            )
        sd[_STATE_KEY] = {
            "version": _STATE_VERSION,
            "names": list(self._names),
            "shapes": [tuple(p.shape) for p in self._params],
            "fragments": [list(f) for f in self._fragments],
            "sync_every": self._schedule.period,
            "overlap_mode": self.overlap_mode,
            "overlap_steps": self.overlap_steps,
            "global": [g.detach().cpu().clone() for g in self._global],
            "outer": [o.state_dict() for o in self._outer],
            "feedback": self._feedback.state_dict() if self._feedback is not None else None,
            "inner_steps": self._inner_steps,
            "last_sync": list(self._last_sync),
            "pending": pending,
            "stats": self.stats.as_dict(),
            "counters": [self._sent_numel, self._sent_bytes_compressed, self._overlap_total],
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved.

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
        expect = {
            "names": list(self._names),
            "shapes": [tuple(p.shape) for p in self._params],
            "fragments": [list(f) for f in self._fragments],
            "sync_every": self._schedule.period,
            "overlap_mode": self.overlap_mode,
            "overlap_steps": self.overlap_steps,
        }
        for key, want in expect.items():
            got = mine.get(key)
            if key == "shapes":
                got = [tuple(s) for s in got]
            if got != want:
                raise ValueError(
                    f"DiLoCo state dict does not match this optimizer: {key} is {got!r} in the "
                    f"checkpoint but {want!r} here"
                )
        self._inner.load_state_dict(sd)
        with torch.no_grad():
            for g, saved in zip(self._global, mine["global"]):
                g.copy_(saved)
        for o, osd in zip(self._outer, mine["outer"]):
            o.load_state_dict(osd)
        if self._feedback is not None:
            if mine["feedback"] is None:
                raise ValueError(
                    "checkpoint has no error-feedback residuals but this run uses them"
                )
            self._feedback.load_state_dict(mine["feedback"])
        self._inner_steps = mine["inner_steps"]
        self._last_sync = list(mine["last_sync"])
        self._sent_numel, self._sent_bytes_compressed, self._overlap_total = mine["counters"]
        saved_stats = mine["stats"]
        for k, v in saved_stats.items():
            if k not in ("bytes_sent", "bytes_received", "comm_seconds"):
                setattr(self._stats, k, v)
        self._pending, self._previous = [], {}
        for item in mine["pending"]:
            device = self._global[self._fragments[item["fragment"]][0]].device
            result = AverageResult(
                [t.to(device) for t in item["result"]],
                item["num_peers"],
                item["total_weight"],
                item["bytes_sent"],
            )
            pending = _Pending(
                item["fragment"],
                item["land_step"],
                _Done(result),
                item["delta"].to(device),
                item["sent"].to(device),
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
                self._apply_mix(pending)
                applied += 1
            self._pending = []
            for frag, previous in sorted(self._previous.items()):
                result = previous.result_now()
                self._record_result(result)
                if result.total_weight <= 0:
                    self._skip(frag)
                    continue
                grad = result.tensors[0].reshape(-1)
                if self.overlap_mode == "eager" and previous.weight > 0:
                    grad = grad - previous.sent * (previous.weight / result.total_weight)
                self._outer_step(frag, grad)
                self._reset_local(frag)
                applied += 1
            self._previous = {}
        if applied:
            self._after_outer_step()
        return applied

    def close(self) -> None:
        """Wait for syncs in flight (without applying them: see :meth:`flush`) and release
        the backend."""
        for p in self._pending + list(self._previous.values()):
            p.result_now()
        self.backend.close()


@dataclass
class _Done:
    result: AverageResult

    def wait(self) -> AverageResult:
        return self.result

    def is_completed(self) -> bool:
        return True
