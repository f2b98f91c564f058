"""torchrun restarts: a rank SIGKILLed at seeded steps, several times; the job resumes from
its last complete checkpoint and ends with the same state as an uninterrupted run, bit for bit.

Run from the repository root::

    .venv/bin/python -m scripts.reliability.restarts --kills 5 --steps 400 --seed 1

Both runs are ``torchrun --standalone --nproc_per_node 2 --max-restarts N -m
lowcomm.recipes.train_lm --config tiny --steps S --ckpt-every 1 --resume auto`` (a
checkpoint every outer step) in run directories of their own. In the interrupted one the
harness waits until the newest complete checkpoint has reached the next seeded step
(observed progress), then SIGKILLs a seeded rank's process; torchrun stops the other rank and
restarts both, which resume from the newest checkpoint that verifies. At the end every rank's
final checkpoint is compared with the uninterrupted run's, tensor by tensor and value by
value; only wire counters and timings (:data:`VOLATILE`) may differ. Results:
``benchmarks/reliability/restarts.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from scripts.reliability import RESULTS_DIR

__all__ = ["VOLATILE", "compare_states", "main", "run_torchrun"]

#: Keys whose values may differ between an interrupted and an uninterrupted run: bytes on
#: the wire and seconds (a restarted job counts its own), nothing the model depends on.
VOLATILE = frozenset(
    {
        "bytes_sent",
        "bytes_received",
        "comm_seconds",
        "peak_sync_bytes",
        "max_in_flight_bytes",
        "compression_ratio",
    }
)


def compare_states(a: Any, b: Any, path: str = "") -> list[str]:
    """Paths where ``a`` and ``b`` differ: tensors by dtype, shape and every bit; containers
    by keys and items; anything else by ``==``."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return [path]
        if a.dtype != b.dtype or a.shape != b.shape:
            return [path]
        bits = [t.detach().cpu().contiguous().reshape(-1).view(torch.uint8) for t in (a, b)]
        return [] if torch.equal(*bits) else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}/{k}" for k in sorted(set(a) ^ set(b), key=str)]
        for k in sorted(set(a) & set(b), key=str):
            out += compare_states(a[k], b[k], f"{path}/{k}")
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [path]
        return [
            p for i, (x, y) in enumerate(zip(a, b)) for p in compare_states(x, y, f"{path}/{i}")
        ]
    return [] if a == b else [path]


def _ranks(torchrun: subprocess.Popen[bytes]) -> dict[int, int]:
    """{rank: pid} of the torchrun job's worker processes now."""
    out = {}
    try:
        children = psutil.Process(torchrun.pid).children(recursive=True)
    except psutil.Error:
        return out
    for child in children:
        try:
            env = child.environ()
        except psutil.Error:
            continue
        if "RANK" in env and "LOCAL_RANK" in env:
            out[int(env["RANK"])] = child.pid
    return out


def _newest_checkpoint(run_dir: Path) -> int:
    from lowcomm import checkpoint as ckpt

    done = ckpt.list_checkpoints(ckpt.checkpoint_root(run_dir))
    return ckpt.step_of(done[-1]) if done else -1


def run_torchrun(
    run_dir: Path,
    steps: int,
    kills: list[tuple[int, int]],
    *,
    data_dir: Path,
    max_restarts: int,
    timeout: float = 600.0,
) -> dict[str, Any]:
    """One job; ``kills``: (step, rank) pairs, in step order, each carried out once the
    newest complete checkpoint is at ``step`` or later. Returns what happened."""
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    log_path = run_dir.with_suffix(".log")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "--max-restarts",
        str(max_restarts),
        "-m",
        "lowcomm.recipes.train_lm",
        "--config",
        "tiny",
        "--steps",
        str(steps),
        "--ckpt-every",
        "1",
        "--keep",
        "3",
        "--resume",
        "auto",
        "--run-dir",
        str(run_dir),
        "--data-dir",
        str(data_dir),
    ]
    t0 = time.time()
    done: list[dict[str, Any]] = []
    with open(log_path, "wb") as log:
        job = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            pending = list(kills)
            while job.poll() is None:
                if time.time() - t0 > timeout:
                    raise TimeoutError(f"torchrun ran past {timeout}s; see {log_path}")
                if pending and _newest_checkpoint(run_dir) >= pending[0][0]:
                    ranks = _ranks(job)
                    step, rank = pending[0]
                    if rank in ranks:
                        os.kill(ranks[rank], signal.SIGKILL)
                        at = _newest_checkpoint(run_dir)
                        pending.pop(0)
                        done.append({"target": step, "rank": rank, "newest_checkpoint": at})
                        # Wait for torchrun to replace this attempt's workers.
                        while job.poll() is None and ranks[rank] in _ranks(job).values():
                            time.sleep(0.05)
                time.sleep(0.05)
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
                job.wait()
    text = log_path.read_text(errors="replace")
    return {
        "returncode": job.returncode,
        "wall_s": round(time.time() - t0, 1),
        "kills": done,
        "kills_missed": len(kills) - len(done),
        "resumed_from": text.count("resumed from"),
        "command": " ".join(cmd[1:]),
    }


#: A 2-rank gloo job without lowcomm whose rank 1 SIGKILLs itself mid-run once: whether
#: ``torchrun --max-restarts`` can restart a gloo job at all on this machine.
# {init}: torch's own env:// rendezvous, or lowcomm's (a store prefix per torchrun attempt).
_INITS = {
    "torch": 'dist.init_process_group("gloo")',
    "lowcomm": "init_process_group_from_env('cpu')",
}
_PROBE = """
import os, time, torch, torch.distributed as dist
from lowcomm.comm.torch_dist import init_process_group_from_env
{init}
group = dist.new_group(backend="gloo")
attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
for i in range(60):
    dist.all_reduce(torch.ones(1000), group=group)
    if attempt == 0 and dist.get_rank() == 1 and i == 20:
        os.kill(os.getpid(), 9)
    time.sleep(0.01)
print("restarted job finished" if attempt else "no restart", flush=True)
dist.destroy_process_group()
"""


def torchrun_restarts_work(
    work_dir: Path, timeout: float = 60.0, init: str = "lowcomm"
) -> tuple[bool, str]:
    """Run :data:`_PROBE` under ``torchrun --max-restarts 1``: (it recovered, output tail).

    ``init``: how the job makes its process group (a key of :data:`_INITS`): torch's
    ``init_process_group`` often does not recover here (torch 2.13: the restarted ranks can
    read the dead ones' addresses from the agent's store, and fail or hang), lowcomm's
    ``init_process_group_from_env`` does.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    script = work_dir / f"restart_probe_{init}.py"
    script.write_text(_PROBE.replace("{init}", _INITS[init]))
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.Popen(
        [*cmd, "--max-restarts", "1", str(script)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # so that a hung job's workers can be killed with it
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # torchrun's workers may sit in sessions of their own: kill the whole tree, by
        # ancestry, so that nothing keeps the output pipe open.
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=10)
        return False, f"timed out after {timeout}s"
    ok = proc.returncode == 0 and "restarted job finished" in out
    errors = [line for line in out.splitlines() if "Error" in line or "refused" in line]
    return ok, "\n".join(errors[-3:])


def _final_states(run_dir: Path, steps: int) -> list[dict[str, Any]]:
    from lowcomm import checkpoint as ckpt

    final = ckpt.checkpoint_root(run_dir) / f"step_{steps:09d}"
    ckpt.verify_checkpoint(final)
    return [ckpt.load_rank_state(final, rank) for rank in range(2)]


def main(argv: list[str] | None = None) -> int:
    """Run both jobs, compare their final states; exit 1 unless they are bit-identical."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts.reliability.restarts", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--steps", type=int, default=400, help="inner steps of each job")
    parser.add_argument("--kills", type=int, default=5, help="ranks SIGKILLed in the job")
    parser.add_argument("--seed", type=int, default=1, help="seeds the kill steps and ranks")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/reliability/restarts"))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "restarts.json")
    parser.add_argument(
        "--probes",
        default=",".join(_INITS),
        help="plain gloo jobs to restart first, by how they make their group (comma-separated "
        f"of {', '.join(_INITS)}; empty: none)",
    )
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    # Distinct checkpoints (every 4 steps: tiny's sync_every), spread over the run.
    outer = args.steps // 4
    picks = sorted(rng.sample(range(max(2, outer // 10), outer - 2), args.kills))
    kills = [(4 * p, rng.randrange(2)) for p in picks]
    work = args.work_dir.resolve()
    if work.exists():
        import shutil

        shutil.rmtree(work)
    work.mkdir(parents=True)
    data = work / "data"
    wanted = [p for p in args.probes.split(",") if p]
    unknown = sorted(set(wanted) - set(_INITS))
    if unknown:
        parser.error(f"--probes: unknown {unknown}; valid: {', '.join(_INITS)}")
    probes = {init: torchrun_restarts_work(work / "probe", init=init) for init in wanted}
    probe_ok = probes.get("lowcomm", (True, ""))[0]
    plain = run_torchrun(work / "uninterrupted", args.steps, [], data_dir=data, max_restarts=0)
    killed = run_torchrun(
        work / "killed", args.steps, kills, data_dir=data, max_restarts=args.kills + 1
    )
    differences: list[str] = []
    volatile: list[str] = []
    if plain["returncode"] == 0 and killed["returncode"] == 0:
        for rank, (a, b) in enumerate(
            zip(
                _final_states(work / "uninterrupted", args.steps),
                _final_states(work / "killed", args.steps),
            )
        ):
            for path in compare_states(a, b, f"rank{rank}"):
                (volatile if path.rsplit("/", 1)[-1] in VOLATILE else differences).append(path)
    identical = plain["returncode"] == 0 and killed["returncode"] == 0 and not differences
    results = {
        "command": "python -m scripts.reliability.restarts " + " ".join(argv or sys.argv[1:]),
        "steps": args.steps,
        "seed": args.seed,
        "planned_kills": [{"step": s, "rank": r} for s, r in kills],
        # Whether torchrun restarts a plain gloo job here, by how it makes its group.
        "torchrun_restart_probes": {
            init: {"recovered": ok, "errors": errors} for init, (ok, errors) in probes.items()
        },
        "uninterrupted": plain,
        "killed": killed,
        "identical": identical,
        "differences": differences,
        "volatile_differences": volatile,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(
        f"restarts: {len(killed['kills'])} kill(s) at {[k['newest_checkpoint'] for k in killed['kills']]}, "
        f"{killed['resumed_from']} resume(s); final state bit-identical: {identical}"
        + (f" (differs at {differences[:5]})" if differences else "")
        + ("" if probe_ok else "; torchrun could not restart a plain gloo job here")
    )
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
