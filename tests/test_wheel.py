"""The installed wheel, with no source checkout: ``lowcomm train``, ``dht``, ``join`` and help.

The wheel is built from a copy of the files it is made of, installed into a fresh venv that
borrows torch and the other dependencies from this venv's site-packages (a path in a ``.pth``
file: the editable lowcomm's own ``.pth`` hook is not run, so only the wheel's code can be
imported), and every command runs from an empty directory.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# What the wheel is built from (pyproject.toml names the rest of the checkout nowhere).
SOURCES = ("pyproject.toml", "README.md", "lowcomm", "optim", "comm", "recipes")


class Installed:
    """A venv holding the wheel; ``run`` starts its ``lowcomm`` command in an empty dir."""

    def __init__(self, venv: Path, workdir: Path, data_dir: Path) -> None:
        self.venv, self.workdir, self.data_dir = venv, workdir, data_dir
        self.bin = venv / "bin"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        env.update(
            PATH=f"{self.bin}{os.pathsep}{env.get('PATH', '')}",
            GLOO_SOCKET_IFNAME="lo",
            OMP_NUM_THREADS="1",
        )
        self.env = env

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin / "lowcomm"), *args],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [str(self.bin / "lowcomm"), *args],
            cwd=self.workdir,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its p2pd daemon goes with its process group
        )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(path, src / name)
    dist = tmp / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)],
        check=True,
        timeout=120,
    )
    (wheel,) = dist.glob("lowcomm-*.whl")

    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        check=True,
        timeout=120,
    )
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # Appended after the venv's own site-packages, so the wheel's lowcomm comes first; a plain
    # path line does not run that directory's .pth files, so the editable finder stays out.
    (Path(site) / "project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    workdir = tmp / "empty"
    workdir.mkdir()
    # The same corpus cache as test_recipe.py and test_data.py: built once per session.
    data_dir = tmp_path_factory.getbasetemp() / "lowcomm-data"
    inst = Installed(venv, workdir, data_dir)
    where = subprocess.run(
        [str(python), "-c", "import lowcomm.recipes.train_lm as m; print(m.__file__)"],
        cwd=workdir,
        env=inst.env,
        capture_output=True,
        text=True,
    )
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout
    return inst


def test_train_runs_a_shipped_config_from_the_wheel(installed: Installed) -> None:
    run_dir = installed.workdir.parent / "run"
    r = installed.run(
        "train",
        "--config",
        "tiny",
        "--steps",
        "4",
        "--eval-every",
        "4",
        "--data-dir",
        str(installed.data_dir),
        "--run-dir",
        str(run_dir),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "== diloco: 1 worker(s), 4 inner steps" in r.stdout, r.stdout
    assert "eval loss: " in r.stdout
    assert (run_dir / "metrics.jsonl").is_file()
    assert not any(installed.workdir.iterdir())  # nothing written beside the user


def test_config_errors_are_one_line_and_list_the_shipped_configs(installed: Installed) -> None:
    r = installed.run("train", "--config", "tinyy")
    assert r.returncode == 2
    assert r.stderr.startswith("lowcomm: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "demo, tiny" in r.stderr and "Traceback" not in r.stderr


def test_every_command_has_working_help(installed: Installed) -> None:
    top = installed.run("--help")
    assert top.returncode == 0 and "lowcomm dht" in top.stdout
    helps = {}
    for command, expect in [
        ("train", "--sync-every"),
        ("join", "--initial-peers"),
        ("dht", "--addrs-file"),
    ]:
        r = installed.run(command, "--help")
        assert r.returncode == 0, (command, r.stdout + r.stderr)
        assert expect in r.stdout, (command, r.stdout)
        helps[command] = r.stdout
    # What the top-level help lists for `lowcomm dht` is what `lowcomm dht` accepts.
    dht_line = next(line for line in top.stdout.splitlines() if "lowcomm dht" in line)
    options = [w.strip("[]") for w in dht_line.split("#")[0].split() if w.startswith("[--")]
    assert options and all(o in helps["dht"] for o in options), (dht_line, helps["dht"])


@pytest.fixture
def dht(installed: Installed) -> Iterator[subprocess.Popen[str]]:
    if importlib.util.find_spec("hivemind") is None:  # not imported: that takes seconds
        pytest.skip("needs the hivemind extra")
    proc = installed.popen("dht", "--host", "127.0.0.1")
    yield proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def test_dht_prints_an_address_and_stops_on_sigterm(dht: subprocess.Popen[str]) -> None:
    assert dht.stdout is not None
    deadline = time.monotonic() + 90
    lines: list[str] = []
    while time.monotonic() < deadline:
        line = dht.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "/p2p/" in line:
            break
    addr = [w for line in lines for w in line.split() if w.startswith("/ip4/127.0.0.1/tcp/")]
    assert addr and "/p2p/" in addr[0], "".join(lines)
    dht.send_signal(signal.SIGTERM)
    assert dht.wait(timeout=30) == 0, dht.stdout.read()


@pytest.mark.hivemind
def test_two_volunteers_from_the_wheel_train_together_one_given_no_config(
    installed: Installed, tmp_path: Path
) -> None:
    if importlib.util.find_spec("hivemind") is None:
        pytest.skip("needs the hivemind extra")
    addrs = tmp_path / "addrs"
    procs = [installed.popen("dht", "--host", "127.0.0.1", "--addrs-file", str(addrs))]
    try:
        deadline = time.monotonic() + 90
        while not addrs.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        addr = addrs.read_text().split()[0]
        common = ["--initial-peers", addr, "--run-id", "wheel-join"]
        common += ["--data-dir", str(installed.data_dir), "--ckpt-every", "0"]
        first = installed.popen(
            "join", *common, "--config", "tiny", "--steps", "300", "--round-seconds", "4",
            "--wait-for-peers", "2", "--run-dir", str(tmp_path / "a"),
        )  # fmt: skip
        second = installed.popen("join", *common, "--run-dir", str(tmp_path / "b"))
        procs += [first, second]
        outs = [p.communicate(timeout=240)[0] for p in (first, second)]
        for p, out in zip((first, second), outs):
            assert p.returncode == 0, out[-3000:]
            assert "swarm peer (up to 2 per round" in out, out[-3000:]
        assert "joining run 'wheel-join' with its config" in outs[1]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
