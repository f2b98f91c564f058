"""Peer baseline: torchft 0.2.0's DiLoCo on lowcomm's task, data and budget (CPU, gloo, loopback).

Run from the repository root, with the interpreter of torchft's own venv::

    make bench-peers        # builds .venv-torchft (torch, torchft, lowcomm) and runs both peers
    .venv-torchft/bin/python -m scripts.bench.peers.torchft_diloco \\
        --config recipes/configs/tiny.toml --workers 2 --steps 100 --sync-every 25 \\
        --out runs/peers/torchft.jsonl

What it runs: ``--workers`` M forked processes (:mod:`scripts.bench.peers.workers`) training
with the shared loop (:mod:`scripts.bench.peers.loop`), each its own torchft replica group
of one process (its own TCPStore on port 0, a ``ProcessGroupGloo`` and a ``Manager`` with
``use_async_quorum=False`` and ``init_sync=False``: every worker builds the same seeded
model), coordinated by an in-process ``LighthouseServer(bind="[::]:0", min_replicas=M)`` in
this (parent) process, started only after the workers are forked (a process forked from one
whose torchft Rust runtime is running segfaults in its first quorum call). The recipe's AdamW
is wrapped in ``torchft.local_sgd.DiLoCo(manager, [model], inner, outer, sync_every=H)`` with
outer ``SGD(lr=outer_lr, momentum=outer_momentum, nesterov=True)`` (0.7 / 0.9 by default).

torchft's DiLoCo (one fragment) is the algorithm lowcomm implements: at inner step H it forms a
quorum through the lighthouse, all-reduces (averages) the fp32 pseudo-gradient
``theta_global - theta_local`` parameter by parameter over gloo, asks every replica whether to
commit (``should_commit``), restores the global parameters and steps the outer optimizer on
them. A failed round is discarded and the parameters fall back to the last global ones.

Measured and written to ``--out`` (JSON lines): the shared loop's evaluation records with
``averaging_rounds`` (committed outer steps, torchft's ``Manager.current_step()``), then a
summary line. The evaluated parameters are the global ones, as in lowcomm's recipe: rank 0
swaps in the copy torchft keeps for rollback (``DiLoCo._fragments[0].original_parameters``,
a private attribute of torchft 0.2.0) for the evaluation and then restores its local ones.

What torchft does not expose, and what is reported instead: bytes on the wire. torchft has no
byte counter and gloo's all-reduce algorithm choice is internal, so ``bytes_sent`` is null.
``allreduce_payload_bytes`` is measured (the bytes of the tensors each worker handed to the
process group's ``allreduce``), and ``bytes_sent_ring_estimate`` is the ring bound 2(M-1)/M
times that payload. Quorum, should_commit and heartbeat RPCs are not counted.

torchft's Rust logs stay at ``warn`` unless ``RUST_LOG`` says otherwise (read once, at import).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator
from datetime import timedelta
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowcomm.config import TrainConfig
from scripts.bench.peers import command, loop
from scripts.bench.peers.workers import Worker, run_one_worker, run_workers

os.environ.setdefault("RUST_LOG", "warn")
try:
    from torch.distributed import TCPStore
    from torchft.coordination import LighthouseServer
    from torchft.local_sgd import DiLoCo
    from torchft.manager import Manager
    from torchft.process_group import ProcessGroupGloo
except ImportError as e:
    command.library_missing(
        "torchft",
        e,
        "it runs from a venv of its own: `make bench-peers` builds .venv-torchft (torch==2.13.0, "
        "torchft==0.2.0, lowcomm)",
    )

LIBRARY = "torchft"
DESCRIPTION = "torchft 0.2.0 DiLoCo on lowcomm's task (peer baseline)"


class CountingGloo(ProcessGroupGloo):
    """torchft's gloo group, counting the payload bytes handed to ``allreduce``."""

    payload_bytes = 0

    def allreduce(self, tensors: list[torch.Tensor], opts: object) -> Any:
        self.payload_bytes += sum(t.numel() * t.element_size() for t in tensors)
        return super().allreduce(tensors, opts)


class TorchftPeer:
    """torchft's DiLoCo around the inner optimizer (a :class:`~loop.PeerOptimizer`)."""

    def __init__(
        self,
        model: nn.Module,
        inner: torch.optim.Optimizer,
        manager: Manager,
        pg: CountingGloo,
        diloco: DiLoCo,
    ) -> None:
        self._model, self._inner, self._manager, self._pg = model, inner, manager, pg
        self._diloco = diloco

    def step(self) -> None:
        self._inner.step()  # DiLoCo's post-hook syncs here every H steps

    def zero_grad(self) -> None:
        self._inner.zero_grad(set_to_none=True)

    @contextlib.contextmanager
    def eval_parameters(self) -> Iterator[None]:
        # The global parameters, as lowcomm's recipe evaluates them: torchft keeps them (its
        # rollback copy, private) in the fragment's original_parameters between syncs.
        global_params = self._diloco._fragments[0].original_parameters
        named = list(self._model.named_parameters())
        with torch.no_grad():
            local = {n: p.detach().clone() for n, p in named}
            for n, p in named:
                p.copy_(global_params[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in named:
                    p.copy_(local[n])

    def progress(self) -> dict[str, Any]:
        return {"averaging_rounds": self._manager.current_step()}

    def finish(self) -> None:
        pass  # the sync at step H*k completes inside that step

    def result(self) -> dict[str, Any]:
        return {
            "averaging_rounds": self._manager.current_step(),
            "batches_committed": self._manager.batches_committed(),
            "allreduce_payload_bytes": self._pg.payload_bytes,
        }


@contextlib.contextmanager
def torchft_diloco(
    worker: Worker,
    cfg: TrainConfig,
    model: nn.Module,
    inner: torch.optim.Optimizer,
    host: str = "127.0.0.1",
) -> Iterator[TorchftPeer]:
    """One torchft replica group (this process) running DiLoCo around ``inner``; ``host`` is
    the address the other replicas reach it at."""
    outer = torch.optim.SGD(
        model.parameters(),
        lr=cfg.outer_lr,
        momentum=cfg.outer_momentum,
        nesterov=cfg.nesterov and cfg.outer_momentum > 0,
    )
    # A replica group of one process still needs its own store: the manager publishes its
    # address there and the quorum's gloo groups rendezvous under a prefix of one of them.
    lighthouse_addr = worker.receive("lighthouse address")
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    timeout = timedelta(seconds=worker.timeout)
    pg = CountingGloo(timeout=timeout)

    def state_dict() -> dict[str, Any]:
        return {"model": model.state_dict(), "inner": inner.state_dict()}

    def load_state_dict(sd: dict[str, Any]) -> None:
        model.load_state_dict(sd["model"])
        inner.load_state_dict(sd["inner"])

    manager = Manager(
        pg=pg,
        load_state_dict=load_state_dict,
        state_dict=state_dict,
        min_replica_size=worker.num_workers,  # every round waits for all M, as lowcomm's does
        use_async_quorum=False,  # DiLoCo refuses async quorum
        init_sync=False,  # identical seeded init everywhere: no step-0 checkpoint transfer
        timeout=timeout,
        quorum_timeout=timeout,
        connect_timeout=timeout,
        rank=0,
        world_size=1,
        # Other replicas rendezvous through this store when the quorum picks it: they
        # must reach it at this host's address (the store listens on every interface).
        store_addr=host,
        store_port=store.port,
        lighthouse_addr=lighthouse_addr,
        replica_id=f"lowcomm_peer_{worker.rank}",
        hostname=host,
        max_retries=3,
    )
    try:
        with DiLoCo(manager, [model], inner, outer, sync_every=cfg.sync_every) as diloco:
            yield TorchftPeer(model, inner, manager, pg, diloco)
    finally:
        manager.shutdown(wait=False)


def _one_worker(
    args: Any, cfg: TrainConfig, threads: int, servers: list[LighthouseServer]
) -> list[dict[str, Any]] | None:
    """``--rank``: this process is one replica group; rank 0 also runs the lighthouse (on
    its host, every address) and tells the others where it is."""
    worker = command.process_worker(args)
    if worker.rank == 0:
        lighthouse = LighthouseServer(
            bind="[::]:0",
            min_replicas=args.workers,
            join_timeout_ms=int(command.op_timeout(args) * 1000),
        )
        servers.append(lighthouse)
        address = f"http://{args.host}:{lighthouse.address().rsplit(':', 1)[1]}"
        worker.broadcast(address)
        worker.inbox.append(address)
    factory = functools.partial(torchft_diloco, host=args.host)
    return run_one_worker(
        functools.partial(loop.train, cfg=cfg, threads=threads, factory=factory), worker
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the torchft baseline; write and print the summary; return it."""
    args = command.parse_args(argv, DESCRIPTION)
    # Before anything is forked: loopback only, and the library's INFO logs off unless asked.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if not args.verbose:
        for name in ("torchft", "torchft_quorums", "torchft_commits", "torchft_errors"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # It warns on every quorum that it cannot reset NCCL's flight recorder (gloo here).
        logging.getLogger("torchft.manager").setLevel(logging.ERROR)
    cfg = command.build_config(args)
    threads = command.threads(args)
    eval_set = loop.load_eval_set(cfg)
    op_timeout = command.op_timeout(args)
    servers: list[LighthouseServer] = []

    def start_lighthouse() -> str:
        # Started only after the workers are forked: a child forked from a process whose
        # torchft (Rust/tokio) runtime is running segfaults in its first quorum call.
        # The lighthouse waits for all M replicas (min_replicas) before it forms a quorum.
        lighthouse = LighthouseServer(
            bind="[::]:0", min_replicas=args.workers, join_timeout_ms=int(op_timeout * 1000)
        )
        servers.append(lighthouse)
        # The advertised address carries the machine's hostname; loopback needs only the port.
        return f"http://127.0.0.1:{lighthouse.address().rsplit(':', 1)[1]}"

    try:
        if args.rank is None:
            results = run_workers(
                functools.partial(loop.train, cfg=cfg, threads=threads, factory=torchft_diloco),
                args.workers,
                (),
                args.timeout,
                op_timeout,
                Path(args.out),
                on_started=start_lighthouse,
            )
        else:
            results = _one_worker(args, cfg, threads, servers)
    finally:
        for server in servers:
            server.shutdown()
    if results is None:
        return {}  # not rank 0: rank 0 writes the summary

    payload = results[0]["allreduce_payload_bytes"]
    m = args.workers
    summary = loop.summarise(
        LIBRARY,
        version("torchft"),
        cfg,
        threads,
        results,
        eval_set,
        {
            "bytes_sent_note": (
                "torchft exposes no byte counter; allreduce_payload_bytes is measured (fp32 "
                "pseudo-gradient bytes handed to ProcessGroupGloo.allreduce per worker); "
                "bytes_sent_ring_estimate = 2(M-1)/M * payload; lighthouse/manager RPCs "
                "(quorum, should_commit, heartbeats) are not counted"
            ),
            "allreduce_payload_bytes": payload,
            "bytes_sent_ring_estimate": int(2 * (m - 1) / m * payload),
            "outer_optimizer": {
                "name": "SGD",
                "lr": cfg.outer_lr,
                "momentum": cfg.outer_momentum,
                "nesterov": cfg.nesterov and cfg.outer_momentum > 0,
            },
        },
    )
    return command.write_summary(args.out, summary)


if __name__ == "__main__":
    command.cli(main)
