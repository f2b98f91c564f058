"""torch.distributed backend: gloo on CPU, NCCL on GPU, launched by ``torchrun``."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta

import torch
import torch.distributed as dist

from lowcomm.comm.base import AverageResult, ConsistencyError, Timer, WireStats
from lowcomm.comm.compression.base import Compressor
from lowcomm.comm.reduce import Identity, dense_average, sparse_average

__all__ = ["TorchDistBackend", "init_process_group_from_env"]

logger = logging.getLogger(__name__)


class _FutureWork:
    """An :class:`~lowcomm.comm.base.AverageWork` backed by the backend's comm thread."""

    def __init__(self, future: Future[AverageResult], stats: WireStats) -> None:
        self._future = future
        self._stats = stats
        self._waited = False

    def wait(self) -> AverageResult:
        if self._waited:
            raise RuntimeError("AverageWork.wait() may be called once")
        self._waited = True
        with Timer(self._stats):
            result = self._future.result()
        self._stats.record(result.bytes_sent, result.bytes_received)
        return result

    def is_completed(self) -> bool:
        return self._future.done()


class TorchDistBackend:
    """Averages through a ``torch.distributed`` process group.

    Every average is a compressed reduce-scatter (an uneven all-to-all of byte payloads, each
    worker decoding and summing its chunk in fp32 in rank order) followed by an all-gather of
    the re-compressed reduced chunks: ``2 (N-1)/N`` times the payload per worker, the ring
    all-reduce bound, for fp32 and compressed payloads alike. Sparse compressors (top-k)
    all-gather whole payloads instead. Sums run in rank order on every worker, so results are
    bit-identical across workers.

    Call protocol: every rank of ``group`` constructs the backend and calls
    ``check_consistent``, ``sync_state`` and ``average`` in the same order. ``average`` hands
    the work to one background thread per backend, which issues the collectives in call
    order (the same on every rank, so no deadlock) while the caller goes on computing; the
    caller must not modify the input tensors until ``wait`` returns. Collective timeouts are
    the process group's (``init_process_group(timeout=...)``).

    Args:
        group: the process group; None means the default (``init_process_group`` first).
    """

    elastic = False

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "TorchDistBackend needs an initialised process group: call "
                "torch.distributed.init_process_group() first (torchrun sets the env vars)"
            )
        self.group = group
        self.stats = WireStats()
        self.state_bytes = 0
        self._rank = dist.get_rank(group)
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="lowcomm-comm"
        )
        self._lock = threading.Lock()

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

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

    def sync_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Broadcast rank 0's tensors into every rank's (in place), as DDP does at start.

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
        for t in tensors.values():
            buf = t if t.is_contiguous() else t.contiguous()
            dist.broadcast(
                buf, src=dist.get_global_rank(self.group, 0) if self.group else 0, group=self.group
            )
            if buf is not t:
                t.copy_(buf)
            self.state_bytes += t.numel() * t.element_size()
        if not tensors:
            return  # every rank has the same (empty) layout, so every rank returns here
        # Each rank enters the all-reduce only after its receives completed, and its result
        # needs every rank's share: when it returns, every rank holds the state.
        device = next(iter(tensors.values())).device
        done = torch.ones(1, device=device)
        dist.all_reduce(done, group=self.group)
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()

    def average(
        self,
        tensors: Sequence[torch.Tensor],
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
        comp: Compressor = compressor if compressor is not None else Identity()
        shapes = [t.shape for t in tensors]
        device = tensors[0].device if tensors else torch.device("cpu")
        flat = torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors])
        ready = None
        if device.type == "cuda":
            # The comm thread runs on its own stream; it must not read ``flat`` before the
            # kernels that produce it have finished on the caller's stream.
            ready = torch.cuda.Event()
            ready.record()
        future = self._pool.submit(self._run, flat, float(weight), comp, shapes, ready)
        return _FutureWork(future, self.stats)

    def _run(
        self,
        flat: torch.Tensor,
        weight: float,
        comp: Compressor,
        shapes: list[torch.Size],
        ready: torch.cuda.Event | None,
    ) -> AverageResult:
        if ready is not None:
            ready.synchronize()
        world = self.world_size
        weights_t = torch.zeros(world, dtype=torch.float64, device=flat.device)
        mine = torch.tensor([weight], dtype=torch.float64, device=flat.device)
        _all_gather_into(weights_t, mine, self.group)
        weights = weights_t.tolist()
        if comp.dense:
            out, sent, recv = dense_average(
                flat, weights, self.rank, comp, self._all_to_all, self._all_gather
            )
        else:
            out, sent, recv = sparse_average(flat, weights, comp, self._all_gather)
        sent += 8 * (world - 1)
        recv += 8 * (world - 1)
        result_tensors = []
        offset = 0
        for shape in shapes:
            n = shape.numel()
            result_tensors.append(out[offset : offset + n].view(shape))
            offset += n
        if flat.device.type == "cuda":
            torch.cuda.current_stream().synchronize()
        return AverageResult(
            tensors=result_tensors,
            num_peers=sum(1 for w in weights if w > 0),
            total_weight=float(sum(weights)),
            bytes_sent=sent,
            bytes_received=recv,
        )

    def _all_to_all(
        self, send: torch.Tensor, send_sizes: list[int], recv_sizes: list[int]
    ) -> torch.Tensor:
        out = torch.empty(sum(recv_sizes), dtype=torch.uint8, device=send.device)
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
        _all_gather_into(out, buf, self.group)
        return out

    def close(self) -> None:
        """Stop the comm thread (after in-flight averages finish). Idempotent."""
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None


def _all_gather_into(out: torch.Tensor, inp: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp, group=group)


def init_process_group_from_env(timeout_seconds: float = 300.0) -> bool:
    """Initialise the default group from torchrun's env vars if they are set.

    Picks NCCL when CUDA is available, else gloo. Returns True if a group is (now) initialised.
    """
    if dist.is_initialized():
        return True
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_seconds))
    return True
