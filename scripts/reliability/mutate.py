"""Small planted bugs in ``optim/`` and ``comm/``, one at a time, against the fast tests.

Run by hand from the repository root (about half an hour on two cores)::

    .venv/bin/python -m scripts.reliability.mutate                 # every mutation
    .venv/bin/python -m scripts.reliability.mutate --only reduce-unweighted,mac-always-true
    .venv/bin/python -m scripts.reliability.mutate --list

Each mutation replaces one exact snippet of one library file by a plausible bug (a weight
ignored, a sign flipped, a check skipped, an offset off by one). It is planted in a copy of
the tree, never in the checkout: the copy lays the files out as the installed package
(``lowcomm/``, ``lowcomm/optim``, ``lowcomm/comm``, ``lowcomm/recipes``) on ``PYTHONPATH``
ahead of the editable install, with the tests beside it, and each file is written back from
the checkout after its mutation. The tests relevant to the file run against the copy
(``-x``; markers ``not slow and not hivemind and not gpu``, except node ids named
explicitly); a mutation is *killed* when they fail and *survives* when they pass. Before the
mutations, each group of tests runs once on the unmutated copy and must pass. The first six
are the issue's (#11) mutations that survived the suite then. Results:
``benchmarks/reliability/mutate.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from scripts.reliability import REPO, RESULTS_DIR

__all__ = ["MUTATIONS", "Mutation", "main", "run_mutation"]

REDUCE = ("tests/test_reduce.py", "tests/test_compressed_sync.py")
FEEDBACK = ("tests/test_compression.py", "tests/test_compressed_sync.py", "tests/test_diloco.py")
SCHEDULE = ("tests/test_streaming.py", "tests/test_deadlines.py")
DILOCO = (
    "tests/test_diloco.py",
    "tests/test_streaming.py",
    "tests/test_faults.py",
    "tests/test_deadlines.py",
)
FAULTS = ("tests/test_faults.py",)
AGREEMENT = ("tests/test_diloco.py", "tests/test_faults.py")
STATE = ("tests/test_diloco.py", "tests/test_checkpoint.py", "tests/test_reliability.py")
SWARM_RULES = ("tests/test_swarm_rules.py",)
RESYNC = ("tests/test_hivemind.py::test_resync_rule", "tests/test_swarm_rules.py")
TIMEOUTS = ("tests/test_hivemind.py::test_timeouts_follow_round_length",)
CODECS = ("tests/test_compression.py", "tests/test_codec_payloads.py")


@dataclass(frozen=True)
class Mutation:
    """One planted bug: ``old`` (exactly once in ``path``) becomes ``new``.

    Attributes:
        name: a short name.
        path: the file, relative to the repository root.
        old: the exact text replaced (must occur once).
        new: the buggy text.
        tests: test files or node ids that should notice.
        issue: one of the issue's mutations.
    """

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    issue: bool = False


MUTATIONS: tuple[Mutation, ...] = (
    # -- the issue's ---------------------------------------------------------------------
    Mutation(
        "reduce-unweighted",
        "comm/reduce.py",
        "    scaled, total = _scales(weights)\n    bounds = chunk_bounds(",
        "    scaled, total = _scales([1.0 if w > 0 else 0.0 for w in weights])\n"
        "    bounds = chunk_bounds(",
        REDUCE,
        issue=True,
    ),
    Mutation(
        "ef-record-skipped",
        "comm/compression/feedback.py",
        "        _check_key(key)\n        if x.shape != sent.shape:",
        "        _check_key(key)\n        return\n        if x.shape != sent.shape:",
        FEEDBACK,
        issue=True,
    ),
    Mutation(
        "chunk-bounds-ignore-granularity",
        "comm/reduce.py",
        "    per = -(-per // granularity) * granularity\n",
        "",
        REDUCE,
        issue=True,
    ),
    Mutation(
        "staggered-offset-off-by-one",
        "optim/schedule.py",
        "        return self._offsets[fragment]\n",
        "        return self._offsets[fragment] + 1\n",
        SCHEDULE,
        issue=True,
    ),
    Mutation(
        "overlap-state-dropped-on-load",
        "optim/diloco.py",
        '                self._previous[item["fragment"]] = pending\n',
        "                pass\n",
        DILOCO,
        issue=True,
    ),
    Mutation(
        "mac-always-true",
        "comm/_swarm_membership.py",
        "    return key is None or (isinstance(mac, str) and hmac.compare_digest(_mac(key, message), mac))",
        "    return True",
        SWARM_RULES,
        issue=True,
    ),
    # -- comm/reduce.py ------------------------------------------------------------------
    Mutation(
        "reduce-weight0-summed",
        "comm/reduce.py",
        "            if scaled[src] != 0.0:\n                part = _decode(compressor, received[",
        "            if True:\n                part = _decode(compressor, received[",
        REDUCE,
    ),
    Mutation(
        "reduce-no-division",
        "comm/reduce.py",
        "        if total > 0:\n            acc.div_(total)\n    pad = sizes[0]",
        "    pad = sizes[0]",
        REDUCE,
    ),
    Mutation(
        "sparse-reduce-no-division",
        "comm/reduce.py",
        "        if total > 0:\n            acc.div_(total)\n    return acc, own",
        "    return acc, own",
        REDUCE,
    ),
    Mutation(
        "finite-weight-ignores-nan",
        "comm/reduce.py",
        "    return torch.where(torch.isfinite(flat).all(), w, torch.zeros_like(w))",
        "    return w",
        REDUCE,
    ),
    Mutation(
        "reduce-weights-unscaled",
        "comm/reduce.py",
        "    scaled = [w / top for w in weights]\n    return scaled, sum(scaled)",
        "    return list(weights), sum(weights)",
        REDUCE,
    ),
    # -- comm/compression ----------------------------------------------------------------
    Mutation(
        "ef-decay-ignored",
        "comm/compression/feedback.py",
        "        return torch.add(delta.float(), residual.to(delta.device), alpha=self.decay)",
        "        return torch.add(delta.float(), residual.to(delta.device), alpha=1.0)",
        FEEDBACK,
    ),
    Mutation(
        "ef-residual-sign",
        "comm/compression/feedback.py",
        "            torch.sub(x, sent, out=residual)",
        "            torch.sub(sent, x, out=residual)",
        FEEDBACK,
    ),
    Mutation(
        "int8-nbytes-floor",
        "comm/compression/int8.py",
        "        return 4 * self.num_blocks(numel) + -(-numel // self._per_byte)",
        "        return 4 * self.num_blocks(numel) + numel // self._per_byte",
        CODECS,
    ),
    Mutation(
        "topk-indices-unchecked",
        "comm/compression/topk.py",
        "        self._check_indices(indices, numel)\n        out = torch.zeros",
        "        out = torch.zeros",
        CODECS,
    ),
    # -- optim/schedule.py ---------------------------------------------------------------
    Mutation(
        "staggered-last-sync-off-by-one",
        "optim/schedule.py",
        "        last = inner_steps - ((inner_steps - offset) % self.period)",
        "        last = inner_steps - ((inner_steps - offset + 1) % self.period)",
        SCHEDULE,
    ),
    Mutation(
        "staggered-due-shifted",
        "optim/schedule.py",
        "        fragment = self._fragment_at.get(step % self.period)",
        "        fragment = self._fragment_at.get((step + 1) % self.period)",
        SCHEDULE,
    ),
    Mutation(
        "deadline-never-stale",
        "optim/schedule.py",
        "        self._stale = previous is not None and target - previous > self.num_fragments",
        "        self._stale = False",
        SCHEDULE,
    ),
    Mutation(
        "deadline-stale-one-slot-late",
        "optim/schedule.py",
        "        self._stale = previous is not None and target - previous > self.num_fragments",
        "        self._stale = previous is not None and target - previous > self.num_fragments + 1",
        SCHEDULE,
    ),
    # -- optim/diloco.py -----------------------------------------------------------------
    Mutation(
        "stale-weight-kept",
        "optim/diloco.py",
        "        weight = 0.0 if stale else float(step - self._last_sync[frag])",
        "        weight = float(step - self._last_sync[frag])",
        DILOCO,
    ),
    Mutation(
        "mix-alpha-swapped",
        "optim/diloco.py",
        "                merged = g.to(local.device, non_blocking=True) * (1.0 - alpha)\n"
        "                merged += local.to(torch.float32) * alpha",
        "                merged = g.to(local.device, non_blocking=True) * alpha\n"
        "                merged += local.to(torch.float32) * (1.0 - alpha)",
        DILOCO,
    ),
    Mutation(
        "pseudo-gradient-sign",
        "optim/diloco.py",
        "            view.sub_(local)\n",
        "            view.sub_(local).neg_()\n",
        DILOCO,
    ),
    Mutation(
        "eager-own-share-sign",
        "optim/diloco.py",
        "torch.where(ok, delta - result.own, 0.0)",
        "torch.where(ok, result.own - delta, 0.0)",
        DILOCO,
    ),
    Mutation(
        "skip-count-never-reset",
        "optim/diloco.py",
        "        self._skipped_in_a_row[frag] = 0\n",
        "",
        DILOCO,
    ),
    Mutation(
        "nonfinite-not-repaired",
        "optim/diloco.py",
        "            if result.own_weight == 0 and pending.weight > 0:",
        "            if False:",
        DILOCO,
    ),
    Mutation(
        "residuals-not-loaded",
        "optim/diloco.py",
        '            self._feedback.load_state_dict(worker["feedback"])',
        "            pass",
        DILOCO,
    ),
    Mutation(
        "skip-keeps-local-params",
        "optim/diloco.py",
        "        self._update_local(frag, 0.0)\n        if self._skipped_in_a_row[frag] >= MAX_SKIPPED_ROUNDS:",
        "        if self._skipped_in_a_row[frag] >= MAX_SKIPPED_ROUNDS:",
        DILOCO,
    ),
    # -- optim/params.py, agreement.py, state.py -----------------------------------------
    Mutation(
        "repair-keeps-inner-state",
        "optim/params.py",
        "            inner.state.pop(params[i], None)",
        "            pass",
        FAULTS,
    ),
    Mutation(
        "repair-keeps-local-params",
        "optim/params.py",
        "            local_view(params[i]).copy_(global_params[i])",
        "            pass",
        FAULTS,
    ),
    Mutation(
        "fingerprint-fragment-counts-only",
        "optim/agreement.py",
        "            [list(f) for f in fragments],",
        "            [len(f) for f in fragments],",
        AGREEMENT,
    ),
    Mutation(
        "fingerprint-outer-class-only",
        "optim/agreement.py",
        "            outer_settings,\n",
        "            [s[0] for s in outer_settings],\n",
        AGREEMENT,
    ),
    Mutation(
        "load-shared-drops-outer-state",
        "optim/state.py",
        "            outer[f].state[g][field] = value.detach().to(device, copy=True)",
        "            pass",
        STATE,
    ),
    # -- the swarm -----------------------------------------------------------------------
    Mutation(
        "record-age-unchecked",
        "comm/_swarm_membership.py",
        "    if not now - _RECORD_MAX_AGE <= signed_at <= now + _CLOCK_SKEW:\n        return False",
        "    if False:\n        return False",
        SWARM_RULES,
    ),
    Mutation(
        "resync-quorum-of-one",
        "comm/_swarm_state.py",
        "    quorum = len(others) // 2 + 1",
        "    quorum = 1",
        RESYNC,
    ),
    Mutation(
        "download-digest-unchecked",
        "comm/_swarm_state.py",
        '    if _state_hash(dict(zip(names, received))) != metadata.get("h"):',
        "    if False:",
        RESYNC,
    ),
    Mutation(
        "norm-ratio-unchecked",
        "comm/_swarm_averaging.py",
        "            if own > 0 and norm > self.norm_ratio * own * scale:",
        "            if False:",
        SWARM_RULES,
    ),
    Mutation(
        "weight-bound-ignored",
        "comm/_swarm_averaging.py",
        "        return declared if self.max_weight is None else min(declared, self.max_weight)",
        "        return declared",
        SWARM_RULES,
    ),
    Mutation(
        "trimmed-mean-trims-nothing",
        "comm/_swarm_averaging.py",
        "    cut = max(1, count // 4)",
        "    cut = 0",
        SWARM_RULES,
    ),
    Mutation(
        "wait-timeout-without-slack",
        "comm/_swarm_timeouts.py",
        "        return self.matchmaking_timeout + self.averaging_timeout + 10.0",
        "        return self.matchmaking_timeout + self.averaging_timeout",
        TIMEOUTS,
    ),
)

#: Where each library directory lives in the copy: laid out as the installed package.
_LAYOUT = {
    "lowcomm": "pkg/lowcomm",
    "optim": "pkg/lowcomm/optim",
    "comm": "pkg/lowcomm/comm",
    "recipes": "pkg/lowcomm/recipes",
    "tests": "tests",
    "scripts": "scripts",
}
_MARKERS = "not slow and not hivemind and not gpu"


def _copy_path(path: str) -> str:
    top, _, rest = path.partition("/")
    return f"{_LAYOUT[top]}/{rest}"


def make_copy(root: Path) -> dict[str, str]:
    """Lay out the checkout in ``root`` as the installed package, with the tests beside it;
    return the environment that makes Python import it instead of the checkout."""
    for src, dst in _LAYOUT.items():
        shutil.copytree(
            REPO / src, root / dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    # Tests that read the shipped configs by their checkout path find them here too.
    shutil.copytree(
        REPO / "recipes", root / "recipes", ignore=shutil.ignore_patterns("__pycache__")
    )
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root / "pkg"), str(root)]),
        # No stale bytecode of a mutant may outlive it (mtimes can tie within a second).
        "PYTHONDONTWRITEBYTECODE": "1",
        "GLOO_SOCKET_IFNAME": "lo",
    }


def _pytest(
    root: Path, env: dict[str, str], tests: tuple[str, ...], timeout: float
) -> tuple[bool, str]:
    """Run ``tests`` in the copy; (passed, last lines of output)."""
    files = [t for t in tests if "::" not in t]
    nodes = [t for t in tests if "::" in t]
    base = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--no-header"]
    runs = ([[*base, "-m", _MARKERS, *files]] if files else []) + (
        [[*base, *nodes]] if nodes else []
    )
    tail = ""
    for cmd in runs:
        try:
            proc = subprocess.run(
                cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return False, f"timed out after {timeout}s"
        tail = (proc.stdout + proc.stderr)[-1500:]
        if proc.returncode != 0:
            return False, tail
    return True, tail


def run_mutation(
    mutation: Mutation, root: Path, env: dict[str, str], timeout: float
) -> dict[str, Any]:
    """Plant ``mutation`` in the copy, run its tests, restore the file: the outcome."""
    target = root / _copy_path(mutation.path)
    original = (REPO / mutation.path).read_text()
    count = original.count(mutation.old)
    if count != 1:
        return {**asdict(mutation), "outcome": "stale", "detail": f"snippet found {count} times"}
    t0 = time.monotonic()
    try:
        target.write_text(original.replace(mutation.old, mutation.new))
        passed, tail = _pytest(root, env, mutation.tests, timeout)
    finally:
        target.write_text(original)
    failed = [line for line in tail.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return {
        "name": mutation.name,
        "path": mutation.path,
        "issue": mutation.issue,
        "tests": list(mutation.tests),
        "outcome": "survived" if passed else "killed",
        "by": failed[:3] if not passed else [],
        "seconds": round(time.monotonic() - t0, 1),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the mutations; write the results; print the kill rate and the survivors."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts.reliability.mutate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--only", default="", help="comma-separated mutation names")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per test run")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "mutate.json")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only.split(",")]
    if args.list:
        for m in chosen:
            print(f"{m.name:36s} {m.path:32s} {'(issue)' if m.issue else ''}")
        return 0
    results: list[dict[str, Any]] = []
    baseline: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="lowcomm-mutate-") as tmp:
        root = Path(tmp)
        env = make_copy(root)
        # Every test the mutations use, once, on the unmutated copy: they must pass.
        tests = tuple(sorted({t for m in chosen for t in m.tests}))
        passed, tail = _pytest(root, env, tests, args.timeout)
        baseline[" ".join(tests)] = passed
        if not passed:
            print(f"mutate: the unmutated copy fails {tests}:\n{tail}", file=sys.stderr)
            return 2
        for m in chosen:
            out = run_mutation(m, root, env, args.timeout)
            results.append(out)
            print(f"mutate: {out['outcome']:8s} {m.name} ({out.get('seconds', 0)}s)", flush=True)
    killed = sum(1 for r in results if r["outcome"] == "killed")
    judged = sum(1 for r in results if r["outcome"] in ("killed", "survived"))
    summary = {
        "command": "python -m scripts.reliability.mutate " + " ".join(argv or sys.argv[1:]),
        "mutations": results,
        "killed": killed,
        "judged": judged,
        "kill_rate": killed / judged if judged else None,
        "baseline_passed": baseline,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    survivors = [r["name"] for r in results if r["outcome"] == "survived"]
    print(f"mutate: killed {killed} of {judged}; survived: {survivors or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
