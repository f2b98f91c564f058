"""torch.distributed backend: gloo on CPU, NCCL on GPU, launched by ``torchrun``."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta

import torch
import torch.distributed as dist

from lowcomm.comm.base import AverageResult, ConsistencyError, Timer, WireStats
from lowcomm.comm.compression.base import Compressor
from lowcomm.comm.reduce import (
    Identity,
    average_result,
    dense_average,
    finite_weight,
    sparse_average,
)
from lowcomm.comm.timeline import span

__all__ = ["TorchDistBackend", "init_process_group_from_env"]

logger = logging.getLogger(__name__)


class _FutureWork:
    """An :class:`~lowcomm.comm.base.AverageWork` backed by the backend's comm thread."""

    def __init__(
        self, future: Future[tuple[AverageResult, torch.cuda.Event | None]], stats: WireStats
    ) -> None:
        self._future = future
        self._stats = stats
        self._waited = False

    def wait(self) -> AverageResult:
        if self._waited:
            raise RuntimeError("AverageWork.wait() may be called once")
        self._waited = True
        with Timer(self._stats):
            result, done = self._future.result()
        if done is not None:
            # The result was written on the comm stream: order the caller's stream after it
            # (a device-side wait, no host sync), and tell the caching allocator that the
            # caller's stream now uses those blocks.
            stream = torch.cuda.current_stream(result.mean.device)
            stream.wait_event(done)
            result.mean.record_stream(stream)
            result.own.record_stream(stream)
        self._stats.record(result.bytes_sent, result.bytes_received)
        return result


class TorchDistBackend:
    """Averages through a ``torch.distributed`` process group of its own.

    Every average is a compressed reduce-scatter (an uneven all-to-all of byte payloads, each
    worker decoding and summing its chunk in fp32 in rank order) followed by an all-gather of
    the re-compressed reduced chunks: ``2 (N-1)/N`` times the payload per worker, the ring
    all-reduce bound, for fp32 and compressed payloads alike. Sparse compressors (top-k)
    all-gather whole payloads instead. Sums run in rank order on every worker, so results are
    bit-identical across workers.

    **Its own group.** The averages run on a background thread while the training loop goes
    on, so they must never share a process group with the user's collectives (a logging
    all-reduce, DDP's or FSDP's): two threads issuing collectives on one group interleave in
    a different order on different ranks and hang. At construction the backend creates a
    private group over the same ranks as ``group`` (``new_group(...,
    use_local_synchronization=True)``: only those ranks take part, so every replica group of
    a 2-D mesh can build its own at once) with the same transport.

    **Replicas.** To sync workers that are themselves several ranks (DDP or FSDP2 inside a
    replica), pass the cross-replica group: the ranks that hold the same shard in every
    replica (``lowcomm.comm.init_replica_mesh`` builds it). Each rank then syncs its local
    shard with the same shard of the other replicas.

    **Devices.** On CUDA the comm thread sets its device and works on its own stream: it waits
    for the pseudo-gradient with an event recorded on the caller's stream, and the caller's
    stream waits for the result with another, so the training loop never blocks on the host.
    An NCCL group needs CUDA tensors (the pseudo-gradient lives with the parameters; the
    global parameters may live on the host and are staged per fragment by
    :class:`lowcomm.DiLoCo`); a gloo group given CUDA tensors copies them to the host on the
    comm stream.

    Call protocol: every rank of ``group`` constructs the backend (collectively, at the same
    point of the program) and calls ``check_consistent``, ``sync_state`` and ``average`` in
    the same order. ``average`` hands the work to one background thread, which issues the
    collectives in call order while the caller goes on computing; the caller must not modify
    the input until ``wait`` returns.

    Args:
        group: the ranks to average over (their group); None means the default group
            (``init_process_group`` first). With replicas: the cross-replica group.
        timeout: seconds before a collective of the private group fails; None uses
            torch's default for the transport (10 minutes).
    """

    elastic = False

    def __init__(
        self, group: dist.ProcessGroup | None = None, *, timeout: float | None = None
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "TorchDistBackend needs an initialised process group: call "
                "torch.distributed.init_process_group() first (torchrun sets the env vars)"
            )
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout ({timeout}) must be a positive number of seconds or None")
        ranks = (
            dist.get_process_group_ranks(group)
            if group is not None
            else list(range(dist.get_world_size()))
        )
        me = dist.get_rank()
        if me not in ranks:
            raise ValueError(
                f"TorchDistBackend: this process (global rank {me}) is not in the group it was "
                f"given (ranks {ranks}); pass the group this rank averages in"
            )
        self.transport = str(dist.get_backend(group))
        self.group = dist.new_group(
            sorted(ranks),
            backend=self.transport,
            timeout=timedelta(seconds=timeout) if timeout is not None else None,
            use_local_synchronization=True,
            group_desc="lowcomm_outer_sync",
        )
        self.ranks = sorted(ranks)
        self.stats = WireStats()
        self.state_bytes = 0
        self._rank = self.ranks.index(me)
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="lowcomm-comm"
        )
        self._lock = threading.Lock()
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    @property
    def needs_cuda(self) -> bool:
        """True if the transport moves only CUDA tensors (NCCL without a CPU fallback)."""
        return "nccl" in self.transport and "gloo" not in self.transport

    @property
    def takes_cuda(self) -> bool:
        """True if the transport moves CUDA tensors directly (NCCL)."""
        return "nccl" in self.transport

    def check_compressor(self, compressor: Compressor | None) -> None:
        """Every compressor works (sparse ones are all-gathered)."""

    def _gather_objects(self, obj: object) -> list[object]:
        out: list[object] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def check_consistent(self, fingerprint: str) -> None:
        """Raise :class:`ConsistencyError` on every rank unless all ranks agree."""
        prints = self._gather_objects(fingerprint)
        differ = [r for r, p in enumerate(prints) if p != prints[0]]
        if differ:
            raise ConsistencyError(
                f"ranks {differ} differ from rank 0 in model shapes or lowcomm config "
                f"(fingerprints: {prints}); every rank must build the same model and optimizer"
            )

    def _transport_device(self, device: torch.device) -> torch.device:
        if device.type == "cuda" and not self.takes_cuda:
            return torch.device("cpu")
        if device.type != "cuda" and device.type != "meta" and self.needs_cuda:
            cuda = torch.device("cuda", torch.cuda.current_device())
            return cuda
        return device

    def sync_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Broadcast rank 0's tensors into every rank's (in place), as DDP does at start.

        Tensors the transport cannot move where they are (host tensors under NCCL, e.g. the
        global parameters kept with ``global_device="cpu"``) are staged one at a time.

        Returns on every rank only once every rank holds the state: a broadcast returns on
        the sender as soon as its bytes are in the socket buffers, which on a slow link can
        be seconds before they arrive, so a one-element all-reduce closes the call. Without
        it the start-up transfer would still be on the wire during the first inner steps,
        charged to them by anything that times or counts them.
        """
        layout = [(k, tuple(t.shape), str(t.dtype)) for k, t in tensors.items()]
        layouts = self._gather_objects(layout)
        differ = [r for r, lay in enumerate(layouts) if lay != layouts[0]]
        if differ:
            raise ConsistencyError(
                f"ranks {differ} hold state of other names/shapes/dtypes than rank 0: "
                f"{layouts[differ[0]]} vs {layouts[0]}"
            )
        src = dist.get_global_rank(self.group, 0)
        device = None
        for t in tensors.values():
            device = self._transport_device(t.device)
            buf = t if t.is_contiguous() and t.device == device else t.to(device, copy=True)
            buf = buf.contiguous()
            dist.broadcast(buf, src=src, group=self.group)
            if buf is not t:
                t.copy_(buf)
            self.state_bytes += t.numel() * t.element_size()
        if device is None:
            return  # every rank has the same (empty) layout, so every rank returns here
        # Each rank enters the all-reduce only after its receives completed, and its result
        # needs every rank's share: when it returns, every rank holds the state.
        done = torch.ones(1, device=device)
        dist.all_reduce(done, group=self.group)
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()

    def average(
        self,
        flat: torch.Tensor,
        *,
        weight: float = 1.0,
        compressor: Compressor | None = None,
        step: int | None = None,
    ) -> _FutureWork:
        """Start a weighted average; see :class:`~lowcomm.comm.base.Backend`."""
        if weight < 0 or weight != weight:
            raise ValueError(f"weight ({weight}) must be >= 0")
        if self._pool is None:
            raise RuntimeError("backend is closed")
        if flat.dim() != 1 or flat.dtype != torch.float32:
            raise ValueError(
                f"average takes one flat fp32 tensor, got shape {tuple(flat.shape)} {flat.dtype}"
            )
        if flat.device.type != "cuda" and self.needs_cuda:
            raise ValueError(
                f"TorchDistBackend: the group's transport ({self.transport}) moves only CUDA "
                f"tensors but the pseudo-gradient is on {flat.device}. Keep the model on the "
                f"GPU (global_device='cpu' still keeps the global parameters on the host), or "
                f"average over a gloo group"
            )
        comp: Compressor = compressor if compressor is not None else Identity()
        ready = None
        if flat.device.type == "cuda":
            # The comm thread works on its own stream; it must not read ``flat`` before the
            # kernels that produce it have run on the caller's stream.
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(flat.device))
        future = self._pool.submit(self._run, flat, float(weight), comp, ready)
        return _FutureWork(future, self.stats)

    @contextlib.contextmanager
    def _on_comm_stream(self, device: torch.device) -> Iterator[torch.cuda.Stream | None]:
        if device.type != "cuda":
            yield None
            return
        # This thread's current device decides where NCCL and the caching allocator work;
        # without it every rank would open a context on GPU 0.
        torch.cuda.set_device(device)
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        with torch.cuda.stream(stream):
            yield stream

    def _run(
        self,
        flat: torch.Tensor,
        weight: float,
        comp: Compressor,
        ready: torch.cuda.Event | None,
    ) -> tuple[AverageResult, torch.cuda.Event | None]:
        with self._on_comm_stream(flat.device) as stream:
            if stream is not None:
                assert ready is not None
                stream.wait_event(ready)
                flat.record_stream(stream)
            wire = flat.to(self._transport_device(flat.device), non_blocking=False)
            mine = finite_weight(wire, weight)
            weights_t = torch.zeros(self.world_size, dtype=torch.float64, device=wire.device)
            with span("wire"):
                _all_gather_into(weights_t, mine, self.group)
            # A host read on this thread only: the training loop is not held up by it.
            weights = weights_t.tolist()
            if comp.dense:
                mean, own, sent, recv = dense_average(
                    wire, weights, self.rank, comp, self._all_to_all, self._all_gather
                )
            else:
                mean, own, sent, recv = sparse_average(
                    wire, weights, self.rank, comp, self._all_gather
                )
            result = average_result(
                mean, own, weights, self.rank, sent + 8 * (self.world_size - 1), recv
            )
            result.bytes_received += 8 * (self.world_size - 1)
            done = None
            if stream is not None:
                if wire.device != flat.device:
                    result.mean = result.mean.to(flat.device, non_blocking=True)
                    result.own = result.own.to(flat.device, non_blocking=True)
                done = torch.cuda.Event()
                done.record(stream)
        return result, done

    def _all_to_all(
        self, send: torch.Tensor, send_sizes: list[int], recv_sizes: list[int]
    ) -> torch.Tensor:
        out = torch.empty(sum(recv_sizes), dtype=torch.uint8, device=send.device)
        with span("wire"):
            dist.all_to_all_single(
                out,
                send,
                output_split_sizes=recv_sizes,
                input_split_sizes=send_sizes,
                group=self.group,
            )
        return out

    def _all_gather(self, buf: torch.Tensor) -> torch.Tensor:
        out = torch.empty(buf.numel() * self.world_size, dtype=buf.dtype, device=buf.device)
        with span("wire"):
            _all_gather_into(out, buf, self.group)
        return out

    def close(self) -> None:
        """Stop the comm thread (after in-flight averages finish) and free the private group.

        Idempotent.
        """
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
                if dist.is_initialized():
                    with contextlib.suppress(Exception):
                        dist.destroy_process_group(self.group)


def _all_gather_into(out: torch.Tensor, inp: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp, group=group)


def init_process_group_from_env(
    device: torch.device | str | None = None, timeout_seconds: float = 300.0
) -> bool:
    """Initialise the default group from torchrun's env vars if they are set.

    Picks NCCL for a CUDA ``device`` (default: CUDA when available) and gloo otherwise; with
    NCCL it first makes ``cuda:LOCAL_RANK`` this process's device, so that ranks on one
    machine do not all land on GPU 0.

    Under ``torchrun --max-restarts``, a restarted job rendezvouses under a key prefix of
    its own attempt (:func:`_attempt_store`): torch's own ``env://`` rendezvous reuses the
    agent's store across attempts, and gloo then connects to the dead ranks' addresses
    (``Connection refused`` at the restart's ``init_process_group``, or a hang: torch 2.13,
    in 3 of 4 tries here; whether it happens depends on the order of the ranks' reads).

    Returns:
        True if a group is (now) initialised, False if the environment names no
        multi-process launch (``WORLD_SIZE`` unset or 1).
    """
    if dist.is_initialized():
        return True
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if device is None:
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if kind == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_seconds)
    store = _attempt_store(timeout)
    if store is None:
        dist.init_process_group(backend, timeout=timeout)
    else:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return True


def _attempt_store(timeout: timedelta) -> dist.Store | None:
    """The torchrun agent's store under a prefix of this attempt, or None outside torchrun.

    torchrun's agent serves one store for the whole job; its attempts differ only in
    ``TORCHELASTIC_RESTART_COUNT``. Keys that a dead attempt left there (the ranks'
    addresses) would otherwise be read by the next one.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        int(os.environ["WORLD_SIZE"]),
        is_master=False,
        timeout=timeout,
    )
    return dist.PrefixStore(f"lowcomm/attempt_{attempt}", store)
