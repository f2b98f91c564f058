"""The README's launch commands run as written (shortened to a few steps of a tiny model)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.dist, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Appended to every command: a tiny model, few steps, files in the test's tmp dir, CPU (two
# ranks on a lent machine's one GPU would share it under NCCL). Nothing here touches what a
# README line sets (sync_every, fragments, overlap, compression, mode), and 60 steps reach
# the syncs of every fragment of a sync_every-50 schedule.
SHORTEN = shlex.split(
    "--steps 60 --warmup-steps 1 --n-layer 1 --n-embd 16 --n-head 1 --seq-len 16 "
    "--batch-size 2 --eval-batches 1 --no-progress --overwrite --device cpu"
)


LAUNCH = re.compile(r"\s*(torchrun|python recipes/train_lm\.py|lowcomm train)\s")


def readme_commands() -> list[str]:
    """Every recipe launch in the README's code blocks, continuation lines joined."""
    text = (REPO / "README.md").read_text()
    commands = []
    for lang, block in re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        if lang not in ("bash", "sh", "console", ""):
            continue
        for line in block.replace("\\\n", " ").splitlines():
            if LAUNCH.match(line):
                commands.append(shlex.join(shlex.split(line, comments=True)))
    return commands


COMMANDS = readme_commands()


def test_the_readme_launches_are_found() -> None:
    assert len(COMMANDS) >= 5, COMMANDS
    assert any("--fragments 4 --overlap-steps 2" in c for c in COMMANDS), COMMANDS


@pytest.mark.parametrize("command", COMMANDS, ids=range(len(COMMANDS)))
def test_readme_command_runs(
    command: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    words = shlex.split(command)
    # The README's programs, from this venv: `python` is this interpreter.
    words[0] = sys.executable if words[0] == "python" else str(BIN / words[0])
    data_dir = tmp_path_factory.getbasetemp() / "lowcomm-data"  # shared with test_recipe.py
    extra = [*SHORTEN, "--run-dir", str(tmp_path / "run"), "--data-dir", str(data_dir)]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [*words, *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"{command}\n{out[-4000:]}"
    if "--help" in words:
        assert "--sync-every" in r.stdout
    else:
        assert "eval loss: " in r.stdout and "60 inner steps" in r.stdout, out[-4000:]
