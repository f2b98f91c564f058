"""The subclasses of hivemind 1.1.12 internals that carry the swarm backend's wire format.

The only module of lowcomm that imports hivemind at its top: everything else reaches it
through :func:`lowcomm.comm._swarm_procs._subclasses`, only when a backend or DHT is built,
so ``import lowcomm.comm`` works without the ``hivemind`` extra. What lives here:

* :class:`SwarmDHT`: hivemind's DHT whose process and ``p2pd`` die with their parent.
* :class:`WireCodec`: sends a lowcomm compressor's payload bytes verbatim.
* :class:`Reducer` and :class:`Runner`: a butterfly all-reduce that validates every incoming
  part and returns bit-identical averages to every member of a group.
* :class:`Averager`: a ``DecentralizedAverager`` steered round by round from the parent
  (group key = round, run-key proofs on joins and state downloads).
* ``PeerID`` and ``get_dht_time``, re-exported for the modules that must not import hivemind.

This is the code that reaches into hivemind's internals and must follow them from version
to version; the rest of the backend only calls the methods named ``lowcomm_*`` here.
"""

from __future__ import annotations

import asyncio
import logging
import math
import multiprocessing as mp
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, AsyncIterator  # noqa: UP035 - hivemind reads typing's _name

import torch
from hivemind.averaging.allreduce import AllReduceRunner, AveragingMode
from hivemind.averaging.averager import DecentralizedAverager
from hivemind.averaging.control import StepControl
from hivemind.averaging.load_balancing import load_balance_peers
from hivemind.averaging.matchmaking import MatchmakingException
from hivemind.averaging.partition import AllreduceException, BannedException, TensorPartReducer
from hivemind.compression import CompressionBase, CompressionInfo, deserialize_torch_tensor
from hivemind.dht import DHT
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils import MPFuture, get_dht_time
from hivemind.utils.asyncio import aiter_with_timeout, attach_event_on_finished
from hivemind.utils.asyncio import enter_asynchronously as enter_async
from hivemind.utils.streaming import combine_from_streaming

from lowcomm.comm._swarm_averaging import _Admission, _decode, _roundtrip
from lowcomm.comm._swarm_membership import _PROTOCOL, _mac_ok, _record_ok
from lowcomm.comm._swarm_procs import _die_with_parent
from lowcomm.comm.compression.base import PayloadError

if TYPE_CHECKING:
    from lowcomm.comm._swarm_timeouts import SwarmTimeouts
    from lowcomm.comm.compression.base import Compressor

__all__ = [
    "Averager",
    "PeerID",
    "Reducer",
    "Runner",
    "SwarmDHT",
    "WireCodec",
    "get_dht_time",
]

# The backend's own logger, whichever of its modules the message comes from.
logger = logging.getLogger("lowcomm.comm.hivemind")


class _NoGroupIsNormal(logging.Filter):
    # hivemind logs a traceback at ERROR when a step finds no group; here that is a round
    # that proceeds alone, which the backend reports itself at INFO.
    def filter(self, record: logging.LogRecord) -> bool:
        return "could not find a group" not in record.getMessage()


logging.getLogger("hivemind.averaging.averager").addFilter(_NoGroupIsNormal())


class SwarmDHT(DHT):
    """hivemind's DHT whose process and p2pd die with the process that started them."""

    def run(self) -> None:
        parent = self._parent_pid
        if self._lowcomm_pdeathsig:
            _die_with_parent()
            if os.getppid() != parent:
                os._exit(1)
            original = asyncio.create_subprocess_exec

            async def exec_with_pdeathsig(*args: Any, **kwargs: Any) -> Any:
                # p2pd must die with this process too, or a SIGKILL leaves it orphaned.
                kwargs.setdefault("preexec_fn", _die_with_parent)
                return await original(*args, **kwargs)

            # hivemind starts p2pd with asyncio.subprocess.create_subprocess_exec.
            subprocess_module: Any = asyncio.subprocess
            subprocess_module.create_subprocess_exec = exec_with_pdeathsig
        super().run()


class WireCodec(CompressionBase):
    """Puts a lowcomm Compressor's payload bytes in hivemind's tensor message verbatim."""

    compression_type = runtime_pb2.CompressionType.NONE

    def __init__(self, codec: Compressor) -> None:
        self.codec = codec

    def compress(
        self, tensor: torch.Tensor, info: CompressionInfo, allow_inplace: bool = False
    ) -> Any:
        flat = tensor.detach().reshape(-1).to(torch.float32)
        payload = self.codec.compress(flat)
        return runtime_pb2.Tensor(
            compression=self.compression_type,
            buffer=payload.data.cpu().numpy().tobytes(),
            size=[flat.numel()],
            dtype="uint8",
        )

    def extract(self, serialized_tensor: Any) -> torch.Tensor:
        return _decode(self.codec, serialized_tensor.buffer, int(serialized_tensor.size[0]))

    def estimate_compression_ratio(self, info: CompressionInfo) -> float:
        # 1.0 keeps hivemind's part size (bytes / 4) an exact multiple of the
        # compressor's granularity, which the averager's part_size_bytes is built for.
        return 1.0


class Reducer(TensorPartReducer):
    """Collects each part's contributions, then combines them by the admission's rule.

    hivemind sums parts as they arrive (weights times values, which can overflow a large
    finite contribution, and leaves no room for a robust rule); here the parts of the
    current slice are kept until every sender's is in. Remembers each part's total weight
    and contributor count; a part with no weight gives zeros.
    """

    def __init__(self, part_shapes: Any, num_senders: int, admission: _Admission) -> None:
        self.finished_parts: dict[int, tuple[float, int]] = {}
        self._admission = admission
        self._received: list[tuple[torch.Tensor, float]] = []
        super().__init__(part_shapes, num_senders)

    def reset_accumulators(self) -> None:
        super().reset_accumulators()
        self._received = []

    async def accumulate_part(
        self, sender_index: int, part_index: int, tensor_part: torch.Tensor, weight: float = 1.0
    ) -> torch.Tensor:
        # hivemind 1.1.12's method, with the running sum replaced by keeping the part.
        assert 0 <= sender_index < self.num_senders, "invalid sender index"
        assert 0 <= part_index < self.num_parts, "invalid part index"
        self.num_parts_received[sender_index] += 1
        while part_index > self.current_part_index:
            await asyncio.wait(
                {self.current_part_future, asyncio.create_task(self.finished.wait())},
                return_when=asyncio.FIRST_COMPLETED,
            )
            if self.finished.is_set():
                raise AllreduceException(f"attempted to aggregate part in a finalized {self}")
        if self.sender_failed_after[sender_index] != float("inf"):
            raise BannedException(f"sender {sender_index} was banned in background")
        assert part_index == self.current_part_index
        current_part_future = self.current_part_future
        if part_index < self.sender_failed_after[sender_index]:
            self._received.append((tensor_part, weight))
            self.current_part_accumulated_from += 1
            self.denominator += weight
            self.check_current_part_finished()
        return await current_part_future

    def check_current_part_finished(self) -> None:
        assert self.current_part_accumulated_from <= self.num_current_senders
        if self.current_part_accumulated_from == self.num_current_senders:
            index = self.current_part_index
            self.finished_parts[index] = (self.denominator, self.current_part_accumulated_from)
            if self._received:
                parts = [p for p, _ in self._received]
                result = self._admission.combine(parts, [w for _, w in self._received])
            else:
                result = self.accumulator.zero_()
            self.current_part_future.set_result(result)
            self.reset_accumulators()


class Runner(AllReduceRunner):
    """Butterfly all-reduce that returns the average itself, identical on every peer.

    hivemind's runner sends each peer ``average - its own part`` and adds it back, which
    rounds differently on every peer (and differently again after compression). Here a
    reducer encodes the averaged part once and sends those same bytes to every peer,
    decoding them itself too, so all peers end with bit-identical tensors. Incoming parts
    are decoded with the lowcomm compressor and checked by the round's
    :class:`~lowcomm.comm._swarm_averaging._Admission` (size, finite, norm bounds, declared
    weight); a bad part drops its sender from this reducer's average from that part on.
    Weights count at most up to the admission's bound. Averaged parts coming back from
    other reducers pass the same checks: a reducer returning a scaled-up mean fails the
    round for this peer instead of entering its state.
    """

    def __init__(
        self,
        *,
        codec: Compressor,
        declared: dict[Any, float],
        admission: _Admission,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.codec = codec
        self.declared = declared
        self.admission = admission
        self.bytes_sent = 0
        self.bytes_received = 0
        self.part_stats: list[tuple[float, int]] = []
        self.dropped: list[str] = []
        self._replies: dict[int, tuple[bytes, torch.Tensor]] = {}
        container = self.tensor_part_container
        self.part_numels = [
            [part.numel() for part, _ in parts] for parts in container._input_parts_by_peer
        ]
        # The base class built a reducer we replace: finish it quietly (its finalizer
        # would warn that it received nothing).
        base_reducer: Any = self.tensor_part_reducer  # type: ignore[has-type]
        base_reducer.finished.set()
        self.tensor_part_reducer = Reducer(
            tuple(part.shape for part in self.parts_for_local_averaging),
            len(self.sender_peer_ids),
            admission,
        )

    def _reply(self, part_index: int, averaged: torch.Tensor) -> tuple[bytes, torch.Tensor]:
        cached = self._replies.get(part_index)
        if cached is None:
            data = self.codec.compress(averaged.reshape(-1)).data.cpu().numpy().tobytes()
            cached = (data, _decode(self.codec, data, averaged.numel()))
            self._replies[part_index] = cached
        return cached

    async def _communicate_with_peer(self, peer_id: Any) -> None:
        peer_index = self.ordered_peer_ids.index(peer_id)
        if peer_id == self.peer_id:
            sender_index = self.sender_peer_ids.index(peer_id)
            reducer = self.tensor_part_reducer
            for part_index, part in enumerate(self.parts_for_local_averaging):
                # Our own contribution enters as the wire would carry it, so error
                # feedback's residual is right for every part, ours included.
                mine = _roundtrip(self.codec, part.reshape(-1).to(torch.float32))
                averaged = await reducer.accumulate_part(
                    sender_index, part_index, mine, weight=self.admission.weight(self.weight)
                )
                decoded = self._reply(part_index, averaged)[1]
                self.part_stats.append(reducer.finished_parts[part_index])
                self.tensor_part_container.register_processed_part(peer_index, part_index, decoded)
            return
        try:
            done_sending = asyncio.Event()
            inputs = attach_event_on_finished(
                self._generate_input_for_peer(peer_index), done_sending
            )
            # Opening the stream has no timeout of hivemind's own: a reducer that died
            # after the group formed must not hold this peer until the averaging timeout.
            stream = await asyncio.wait_for(
                self._get_peer_stub(peer_id).rpc_aggregate_part(inputs), self.reducer_timeout
            )
            if self.should_delay_results(self.peer_id):
                await done_sending.wait()
            part_index = 0
            expected = self.part_numels[peer_index]
            async for msg in aiter_with_timeout(stream, self.reducer_timeout):
                if msg.code != averaging_pb2.AVERAGED_PART:
                    code = averaging_pb2.MessageCode.Name(msg.code)
                    raise AllreduceException(f"{peer_id} sent {code}")
                if part_index >= len(expected):
                    raise AllreduceException(f"{peer_id} sent too many parts")
                self.bytes_received += len(msg.tensor_part.buffer)
                try:
                    part = _decode(self.codec, msg.tensor_part.buffer, expected[part_index])
                    mine = self.tensor_part_container._input_parts_by_peer[peer_index]
                    problem = self.admission.problem(
                        part,
                        expected[part_index],
                        mine[part_index][0],
                        self.admission.steps_ratio(float(msg.weight), self.weight),
                    )
                except (PayloadError, RuntimeError, ValueError) as e:
                    problem = f"an undecodable payload ({e})"
                bound = self.admission.max_weight
                if problem is None and bound is not None:
                    # No honest reducer counts more than the bound per sender.
                    most = bound * len(self.sender_peer_ids) * (1 + 1e-6)
                    if not float(msg.weight) <= most:
                        problem = f"a total weight of {msg.weight:g}, above {most:g}"
                if problem is not None:
                    raise AllreduceException(f"reducer {peer_id} sent a part with {problem}")
                count = int(msg.peer_id.decode() or 0) if msg.peer_id.isdigit() else 0
                self.part_stats.append((float(msg.weight), count))
                self.tensor_part_container.register_processed_part(peer_index, part_index, part)
                part_index += 1
            if part_index != len(expected):
                raise AllreduceException(
                    f"peer {peer_id} sent {part_index} parts, but we expected {len(expected)}"
                )
        except BaseException as e:
            if isinstance(e, Exception):
                logger.debug("all-reduce with %s failed: %r", peer_id, e)
            self.tensor_part_container.register_failed_reducer(peer_index)
            raise

    async def _generate_input_for_peer(self, peer_index: int) -> Any:
        async for msg in super()._generate_input_for_peer(peer_index):
            self.bytes_sent += len(msg.tensor_part.buffer)
            yield msg

    async def _accumulate_parts_streaming(self, stream: Any, sender_index: int) -> Any:
        part_index = 0
        reducer = self.tensor_part_reducer
        sender = self.sender_peer_ids[sender_index]
        declared = self.declared.get(sender)
        try:
            async for msg in stream:
                if part_index >= reducer.num_parts:
                    break
                numel = reducer.part_shapes[part_index].numel()
                self.bytes_received += len(msg.tensor_part.buffer)
                try:
                    part = _decode(self.codec, msg.tensor_part.buffer, numel)
                    reference = self.parts_for_local_averaging[part_index]
                    problem = self.admission.problem(
                        part, numel, reference, self.admission.steps_ratio(declared, self.weight)
                    )
                except (PayloadError, RuntimeError, ValueError) as e:
                    problem = f"an undecodable payload ({e})"
                if problem is None and (
                    not math.isfinite(msg.weight) or msg.weight < 0 or msg.weight != declared
                ):
                    problem = f"weight {msg.weight} (declared {declared})"
                if problem is not None:
                    self.dropped.append(f"{sender}: part {part_index} has {problem}")
                    logger.warning(
                        "hivemind all-reduce: dropping peer %s from part %d on: %s",
                        sender,
                        part_index,
                        problem,
                    )
                    break
                try:
                    averaged = await reducer.accumulate_part(
                        sender_index, part_index, part, weight=self.admission.weight(msg.weight)
                    )
                except BannedException:
                    break
                data, _ = self._reply(part_index, averaged)
                total, count = reducer.finished_parts[part_index]
                part_index += 1
                self.bytes_sent += len(data)
                yield averaging_pb2.AveragingData(
                    code=averaging_pb2.AVERAGED_PART,
                    tensor_part=runtime_pb2.Tensor(buffer=data, size=[numel], dtype="uint8"),
                    weight=total,
                    peer_id=str(count).encode(),
                )
        finally:
            if part_index != reducer.num_parts:
                await self._ban_sender(sender)


class Averager(DecentralizedAverager):
    """A DecentralizedAverager speaking lowcomm's wire format, steered round by round.

    Runs in a forked child. The parent sets the group key bits (the round) before each
    step, so peers at different outer steps never group; group members must prove the
    run key; failed or partial all-reduces raise instead of leaving per-peer results.
    """

    # Collected for this class itself (hivemind caches them per class, inherited
    # otherwise, and names handlers after the class).
    _rpc_handlers = None
    _stub_type = None

    @staticmethod
    def _Popen(process_obj: Any) -> Any:  # noqa: N802 - multiprocessing's name
        # Always fork, whatever the global start method: a spawned averager fails with
        # "cannot pickle '_thread.lock'" (hivemind's DHT class already forks always).
        return mp.context.ForkProcess._Popen(process_obj)  # type: ignore[attr-defined]

    def __init__(
        self,
        *args: Any,
        codec: Compressor,
        run_key: bytes | None,
        pdeathsig: bool,
        state_provider: Callable[[], Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._codec = codec
        self._run_key = run_key
        self._admission = _Admission()
        self._pdeathsig = pdeathsig
        self._state_provider = state_provider
        super().__init__(*args, **kwargs)

    def run(self) -> None:
        if self._pdeathsig:
            _die_with_parent()
            if os.getppid() != self._parent_pid:
                os._exit(1)
        super().run()

    # -- parent side ---------------------------------------------------------------------------

    def _call(self, method: str, wait_s: float, **kwargs: Any) -> Any:
        if not self.is_alive():
            raise RuntimeError("the averager process is not running")
        future = MPFuture()
        self._outer_pipe.send((method, [], dict(future=future, **kwargs)))
        return future.result(timeout=wait_s)

    def lowcomm_step(
        self,
        bits: str,
        weight: float,
        gather: Any,
        admission: _Admission,
        timeout: float,
        init_timeout: float,
        early: float = 0.0,
    ) -> Any:
        """Start one step for the round ``bits`` under ``admission``; return its StepControl.

        ``early``: seconds until the round starts; matchmaking's times count from then.
        """
        self._call("_lowcomm_prepare", init_timeout, bits=bits, admission=admission)
        start = get_dht_time() + max(0.0, early)
        scheduled_time = start + self.matchmaking_kwargs["min_matchmaking_time"]
        user = self.serializer.dumps(gather)
        data = self.serializer.dumps([self.bandwidth, self.mode.value, user])
        step = StepControl(
            scheduled_time=scheduled_time,
            deadline=start + timeout,
            allow_retries=True,
            weight=weight,
            data_for_gather=data,
        )
        future_for_init = MPFuture()
        self._outer_pipe.send(("_step", [], dict(step=step, future_for_init=future_for_init)))
        step.attach(*future_for_init.result(timeout=init_timeout))
        step.allow_allreduce()
        return step

    def lowcomm_configure(self, timeouts: SwarmTimeouts, wait: float) -> None:
        """Push new timeouts into the running averager."""
        self.matchmaking_kwargs["min_matchmaking_time"] = timeouts.matchmaking_time
        self._call("_lowcomm_configure", wait, timeouts=timeouts)

    def lowcomm_download(self, peer: bytes, timeout: float) -> Any:
        """Download ``peer``'s served state: ``(metadata, tensors)``."""
        return self._call("_lowcomm_download", timeout + 5.0, peer=peer, timeout=timeout)

    def get_current_state(self) -> Any:
        # Runs in the parent, on hivemind's state-fetching thread.
        if self._state_provider is None:
            raise RuntimeError("this averager serves no state")
        return self._state_provider()

    # -- child side ----------------------------------------------------------------------------

    async def _lowcomm_prepare(self, bits: str, admission: _Admission, future: Any) -> None:
        try:
            self._admission = admission
            manager = self._matchmaking.group_key_manager
            manager.group_bits = bits

            async def keep_key(*_args: Any, **_kwargs: Any) -> None:
                # hivemind moves the key after each group (for its bucket scheme); the
                # key here is the round and must not change under a retry.
                return None

            manager.update_key_on_group_assembled = keep_key
            future.set_result(None)
        except Exception as e:
            future.set_exception(e)

    async def _lowcomm_configure(self, timeouts: SwarmTimeouts, future: Any) -> None:
        try:
            mm = self._matchmaking
            mm.min_matchmaking_time = timeouts.matchmaking_time
            mm.request_timeout = timeouts.request_timeout
            mm.potential_leaders.min_matchmaking_time = timeouts.matchmaking_time
            self._allreduce_timeout = timeouts.averaging_timeout
            self.next_chunk_timeout = timeouts.next_chunk_timeout
            self.allreduce_kwargs["sender_timeout"] = timeouts.next_chunk_timeout
            self.allreduce_kwargs["reducer_timeout"] = 2 * timeouts.next_chunk_timeout
            future.set_result(None)
        except Exception as e:
            future.set_exception(e)

    def _verify(self, peer: Any, group_key: str, user: Any) -> bool:
        if not isinstance(user, dict) or user.get("p") != _PROTOCOL:
            return False
        return _mac_ok(self._run_key, f"join|{peer}|{group_key}", user.get("mac"))

    async def rpc_join_group(self, request: Any, context: Any) -> Any:
        try:
            _bandwidth, _mode, user_bytes = self.serializer.loads(request.gather)
            user = self.serializer.loads(user_bytes)
        except Exception:
            user = None
        if not self._verify(context.remote_id, request.group_key, user):
            logger.warning(
                "hivemind: refused a join request from %s: it did not prove the run key",
                context.remote_id,
            )
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for response in super().rpc_join_group(request, context):
            yield response

    async def _aggregate_with_group(
        self, group_info: Any, min_vector_size: int, **kwargs: Any
    ) -> Any:
        try:
            loaded = [self.serializer.loads(item) for item in group_info.gathered]
            bandwidths, mode_ids, user_bytes = zip(*loaded)
            users = [self.serializer.loads(item) for item in user_bytes]
            key = self._matchmaking.group_key_manager.current_key
            for peer, user in zip(group_info.peer_ids, users):
                if not self._verify(peer, key, user):
                    raise AllreduceException(f"group member {peer} did not prove the run key")
            declared = {peer: float(u["w"]) for peer, u in zip(group_info.peer_ids, users)}
            modes = tuple(map(AveragingMode, mode_ids))
            download_bandwidths = [
                thr if mode != AveragingMode.CLIENT else 0.0 for thr, mode in zip(bandwidths, modes)
            ]
            peer_fractions = await asyncio.get_event_loop().run_in_executor(
                None, load_balance_peers, self.total_size, download_bandwidths, min_vector_size
            )
            async with enter_async(self.get_tensors()) as local_tensors:
                summary = await self._run_allreduce_inplace_(
                    local_tensors,
                    group_info,
                    peer_fractions=peer_fractions,
                    declared=declared,
                    **kwargs,
                )
            summary["group_size"] = len(group_info.peer_ids)
            summary["declared_weight"] = sum(self._admission.weight(w) for w in declared.values())
            summary["positive_peers"] = sum(1 for w in declared.values() if w > 0)
            return summary
        except BaseException as e:
            if isinstance(e, Exception):
                logger.info("hivemind: all-reduce attempt failed: %s", e)
            raise MatchmakingException(f"Unable to run All-Reduce: {e}") from e

    async def _run_allreduce_inplace_(
        self,
        tensors: Sequence[torch.Tensor],
        group_info: Any,
        group_id: bytes | None = None,
        declared: dict[Any, float] | None = None,
        **kwargs: Any,
    ) -> Any:
        group_id = group_info.group_id if group_id is None else group_id
        runner = Runner(
            p2p=self._p2p,
            servicer_type=type(self),
            prefix=self.prefix,
            tensors=tensors,
            group_id=group_id,
            ordered_peer_ids=group_info.peer_ids,
            codec=self._codec,
            declared=declared or {},
            admission=self._admission,
            **kwargs,
        )
        assert group_id in self._running_groups, "group was not registered"
        self._running_groups[group_id].set_result(runner)
        outputs = [out async for out in runner]
        if runner.tensor_part_container.failed_size:
            # Some peer did not return our parts: the others may hold results we lack,
            # so keep nothing and let hivemind retry with whoever is still here.
            raise AllreduceException(
                f"{runner.tensor_part_container.failed_size} elements were not reduced"
            )
        for tensor, out in zip(tensors, outputs):
            tensor.copy_(out.reshape(tensor.shape))
        self.last_updated = get_dht_time()
        return {
            "bytes_sent": runner.bytes_sent,
            "bytes_received": runner.bytes_received,
            "part_stats": list(runner.part_stats),
            "dropped": list(runner.dropped),
        }

    async def rpc_download_state(self, _request: Any, context: Any) -> Any:
        if self._run_key is not None and not await self._known_peer(context.remote_id):
            logger.warning(
                "hivemind: refused a state download by %s: no heartbeat signed with the run key",
                context.remote_id,
            )
            return
        async for message in super().rpc_download_state(_request, context):
            yield message

    async def _known_peer(self, peer: Any) -> bool:
        key = self._lowcomm_peers_key
        found = await self.dht.get(key, latest=True, return_future=True)
        if found is None or not isinstance(found.value, dict):
            return False
        entry = found.value.get(peer.to_bytes())
        value = getattr(entry, "value", None)
        return isinstance(value, list) and _record_ok(self._run_key, str(peer), value)

    async def _lowcomm_download(self, peer: bytes, timeout: float, future: Any) -> None:
        try:
            stub = self.get_stub(self._p2p, PeerID(peer), namespace=self.prefix)
            stream = await stub.rpc_download_state(averaging_pb2.DownloadRequest())
            metadata: Any = None
            parts: list[Any] = []
            tensors: list[torch.Tensor] = []
            async for message in aiter_with_timeout(stream, timeout=timeout):
                if message.metadata:
                    metadata = self.serializer.loads(message.metadata)
                if message.tensor_part.dtype and parts:
                    tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
                    parts = []
                parts.append(message.tensor_part)
            if parts:
                tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
            future.set_result((metadata, tensors))
        except BaseException as e:
            future.set_exception(RuntimeError(f"state download from {PeerID(peer)}: {e!r}"))


# hivemind reads the protobuf types of rpc_* handlers from their annotations, which this
# module's `from __future__ import annotations` turns into unresolvable strings.
Averager.rpc_join_group.__annotations__ = {
    "request": averaging_pb2.JoinRequest,
    "context": P2PContext,
    "return": AsyncIterator[averaging_pb2.MessageFromLeader],
}
Averager.rpc_download_state.__annotations__ = {
    "_request": averaging_pb2.DownloadRequest,
    "context": P2PContext,
    "return": AsyncIterator[averaging_pb2.DownloadData],
}
