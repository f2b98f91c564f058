"""Time a hivemind swarm on loopback: rounds, a SIGKILL mid-average, a join mid-run.

    .venv/bin/python scripts/hivemind_probe.py --numel 2000000 --rounds 8

Forks ``--peers`` peers (each one ``HivemindBackend``) and a bootstrap DHT on 127.0.0.1. The
state is a parameter vector and a momentum buffer of ``--numel`` fp32 each plus a step
counter; each round averages a random pseudo-gradient of the same size and applies a toy
momentum step. The last peer is SIGKILLed while its all-reduce of ``--kill-round`` is on the
wire; a new peer joins when peer 0 starts ``--join-round``. Prints every peer's rounds (peers
in the group, seconds) and the joiner's download time, and checks that all survivors end
with bit-identical state.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import signal
import time
import traceback
from typing import Any

import torch

from lowcomm.comm.hivemind import HivemindBackend, start_bootstrap_dht

LOOP = ["/ip4/127.0.0.1/tcp/0"]


def peer(index: int, args: argparse.Namespace, maddrs: list[str], out: Any, events: Any) -> None:
    torch.set_num_threads(1)
    try:
        backend = HivemindBackend(
            "probe", initial_peers=maddrs, host_maddrs=LOOP, round_seconds=args.round_seconds
        )
        joiner = index == args.peers
        victim = index == args.peers - 1
        backend.check_consistent("probe")
        if joiner:
            events["join"].wait(600)
        g = torch.Generator().manual_seed(99 if joiner else 0)
        state = {
            "param.0": torch.randn(args.numel, generator=g),
            "outer.0.momentum_buffer": torch.zeros(args.numel),
            "meta.outer_step": torch.zeros(1, dtype=torch.int64),
        }
        t0 = time.monotonic()
        backend.sync_state(state)
        if joiner:
            out.put((index, "join", (int(state["meta.outer_step"]), time.monotonic() - t0)))
        log = []
        while int(state["meta.outer_step"]) < args.rounds:
            step = int(state["meta.outer_step"])
            if index == 0 and step == args.join_round:
                events["join"].set()
            x = torch.randn(args.numel, generator=torch.Generator().manual_seed(step * 100 + index))
            t1 = time.monotonic()
            if victim and step == args.kill_round:
                out.put((index, "killed", step))
                time.sleep(0.2)  # let the queue flush before the process dies
            work = backend.average(x * 0.01, weight=1.0, step=step)
            if victim and step == args.kill_round:
                from hivemind.averaging.control import AveragingStage

                control = work._control
                while control.stage != AveragingStage.RUNNING_ALLREDUCE:
                    time.sleep(0.001)
                time.sleep(0.05)
                os.kill(os.getpid(), signal.SIGKILL)
            res = work.wait()
            state["outer.0.momentum_buffer"].mul_(0.9).add_(res.mean)
            state["param.0"].sub_(0.1 * state["outer.0.momentum_buffer"])
            state["meta.outer_step"] += 1
            backend.publish_state(state)
            resynced = backend.needs_resync()
            if resynced:
                backend.sync_state(state)
            log.append((step, res.num_peers, round(time.monotonic() - t1, 2), resynced))
            time.sleep(args.train_seconds)
        events["done"].wait(600)
        time.sleep(2 * backend.timeouts.heartbeat_period)
        if backend.needs_resync():
            backend.sync_state(state)
        digest = hash(state["param.0"].numpy().tobytes())
        out.put((index, "done", (log, digest, backend.stats.bytes_sent)))
        backend.close()
    except BaseException:
        out.put((index, "error", traceback.format_exc()))
    finally:
        out.close()
        out.join_thread()
        os._exit(0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peers", type=int, default=3)
    p.add_argument("--numel", type=int, default=2_000_000)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--kill-round", type=int, default=2)
    p.add_argument("--join-round", type=int, default=4)
    p.add_argument("--round-seconds", type=float, default=15.0)
    p.add_argument("--train-seconds", type=float, default=0.5)
    args = p.parse_args()
    ctx = mp.get_context("fork")
    dht, maddrs = start_bootstrap_dht(host_maddrs=LOOP)
    out = ctx.Queue()
    survivors = args.peers  # peers - victim + joiner
    events = {"join": ctx.Event(), "done": ctx.Barrier(survivors)}
    procs = [
        ctx.Process(target=peer, args=(i, args, maddrs, out, events)) for i in range(args.peers + 1)
    ]
    t0 = time.monotonic()
    for proc in procs:
        proc.start()
    digests = {}
    try:
        while len(digests) < survivors:
            try:
                index, kind, value = out.get(timeout=600)
            except queue.Empty:
                raise SystemExit("timed out") from None
            at = time.monotonic() - t0
            if kind == "error":
                raise SystemExit(f"peer {index} failed:\n{value}")
            if kind == "join":
                print(
                    f"[{at:6.1f}s] peer {index} joined: state version {value[0]} in {value[1]:.2f}s"
                )
            elif kind == "killed":
                print(f"[{at:6.1f}s] peer {index} SIGKILLed mid-average in round {value}")
            else:
                log, digest, sent = value
                digests[index] = digest
                print(
                    f"[{at:6.1f}s] peer {index} done, sent {sent / 1e6:.1f} MB; rounds "
                    f"(step, peers, seconds, resynced): {log}"
                )
        same = len(set(digests.values())) == 1
        print(f"survivors bit-identical: {same}")
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join(5)
        dht.shutdown()


if __name__ == "__main__":
    main()
