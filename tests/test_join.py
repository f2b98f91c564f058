"""Joining a swarm by address alone: the run's config comes from its live peers.

The rules (version, contradictions, majority) are tested with the DHT look-up replaced; one
end-to-end test runs two real ``lowcomm join`` peers, one of them given no config at all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lowcomm.config import load_config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def recipe():  # type: ignore[no-untyped-def]
    from lowcomm.recipes import train_lm

    return train_lm


def _infos(monkeypatch, recipe, infos, version="9.9.9"):  # type: ignore[no-untyped-def]
    from lowcomm.comm import hivemind

    monkeypatch.setattr(hivemind, "fetch_run_info", lambda *a, **k: list(infos))
    monkeypatch.setattr(hivemind, "lowcomm_version", lambda: version)


def _published(*argv: str) -> str:
    return load_config(["--backend", "hivemind", *argv]).run_config_text()


def _join(recipe, *argv: str):  # type: ignore[no-untyped-def]
    from lowcomm.config import explicit_keys

    full = ["--backend", "hivemind", "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/Qm", *argv]
    return recipe.join_run_config(load_config(full), explicit_keys(full))


def test_a_peer_without_config_takes_the_runs(monkeypatch, recipe):
    from lowcomm.comm.hivemind import RunInfo

    run = _published("--config", "tiny", "--steps", "77", "--compression", "int8")
    _infos(monkeypatch, recipe, [RunInfo("a", run, "9.9.9"), RunInfo("b", run, "9.9.9")])
    cfg = _join(recipe, "--run-dir", "mine", "--device", "cpu")
    assert cfg.steps == 77 and cfg.compression == "int8" and cfg.n_layer == 2
    assert cfg.run_dir == "mine"  # its own settings stay its own


def test_a_peer_whose_settings_contradict_the_run_is_refused_with_every_difference(
    monkeypatch, recipe
):
    from lowcomm.comm.hivemind import RunInfo

    run = _published("--config", "tiny", "--steps", "77")
    _infos(monkeypatch, recipe, [RunInfo("a", run, "9.9.9")])
    with pytest.raises(ValueError) as e:
        _join(recipe, "--steps", "50", "--n-layer", "3", "--compression", "int8", "--run-dir", "x")
    message = str(e.value)
    assert "n_layer (3 here, 2 in the run)" in message
    assert "compression ('int8' here, 'none' in the run)" in message
    assert "run_dir" not in message and "steps" not in message
    # The same values explicitly are welcome, a whole config file included.
    assert _join(recipe, "--config", "tiny", "--steps", "77").steps == 77
    # How long a volunteer trains is its own to say (a slow machine trains fewer steps).
    assert _join(recipe, "--steps", "60").steps == 60
    assert _join(recipe).steps == 77


def test_another_lowcomm_version_is_refused_naming_both(monkeypatch, recipe):
    from lowcomm.comm.hivemind import RunInfo

    _infos(monkeypatch, recipe, [RunInfo("a", _published(), "0.0.1")], version="0.2.0")
    with pytest.raises(ValueError, match=r"runs lowcomm 0\.0\.1, this peer lowcomm 0\.2\.0"):
        _join(recipe)


def test_peers_that_disagree_without_a_majority_are_refused(monkeypatch, recipe):
    from lowcomm.comm.hivemind import RunInfo

    infos = [RunInfo("a", _published("--steps", "100"), "9.9.9")]
    infos.append(RunInfo("b", _published("--steps", "200"), "9.9.9"))
    _infos(monkeypatch, recipe, infos)
    with pytest.raises(ValueError, match="2 different configs"):
        _join(recipe)
    # A majority wins over one dissenter (a lying peer among honest ones).
    infos.append(RunInfo("c", infos[0].text, "9.9.9"))
    _infos(monkeypatch, recipe, infos)
    assert _join(recipe).steps == 100


def test_nobody_publishing_and_no_config_is_a_clear_error(monkeypatch, recipe):
    _infos(monkeypatch, recipe, [])
    with pytest.raises(ValueError, match="no live peer of run 'lowcomm' publishes its config"):
        _join(recipe)
    # With a config of its own, the peer starts the run.
    assert _join(recipe, "--config", "tiny").n_layer == 2


def test_published_config_is_json_data_not_a_pickle():
    text = _published("--config", "tiny")
    run = json.loads(text)
    assert run["n_layer"] == 2 and "run_dir" not in run and "initial_peers" not in run


# -- two real volunteers ------------------------------------------------------------------------


def _lowcomm(*args: str, cwd: Path) -> subprocess.Popen:  # type: ignore[type-arg]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "lowcomm.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


@pytest.mark.hivemind
@pytest.mark.timeout(240)
def test_two_volunteers_train_together_one_given_no_config(tmp_path):
    pytest.importorskip("hivemind")
    addrs = tmp_path / "addrs"
    dht = _lowcomm("dht", "--host", "127.0.0.1", "--addrs-file", str(addrs), cwd=tmp_path)
    procs = [dht]
    try:
        deadline = time.monotonic() + 60
        while not addrs.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        addr = addrs.read_text().split()[0]
        common = ["--initial-peers", addr, "--run-id", "join-test", "--data-dir", str(tmp_path)]
        first = _lowcomm(
            "join", *common, "--config", "tiny", "--steps", "300", "--round-seconds", "4",
            "--wait-for-peers", "2", "--run-dir", str(tmp_path / "a"), "--ckpt-every", "0",
            cwd=tmp_path,
        )  # fmt: skip
        procs.append(first)
        second = _lowcomm("join", *common, "--run-dir", str(tmp_path / "b"), cwd=tmp_path)
        procs.append(second)
        outs = [p.communicate(timeout=200)[0] for p in (first, second)]
        for p, out in zip((first, second), outs):
            assert p.returncode == 0, out[-3000:]
        # The second peer runs the first one's config, which it never saw on its command line.
        a = json.loads((tmp_path / "a" / "config.json").read_text())
        b = json.loads((tmp_path / "b" / "config.json").read_text())
        for key in ("steps", "n_layer", "n_embd", "sync_every", "round_seconds", "seq_len"):
            assert a[key] == b[key], key
        assert b["steps"] == 300 and b["round_seconds"] == 4.0
        assert "joining run 'join-test' with its config" in outs[1]
        # And they met: both summaries count a swarm of two.
        for out in outs:
            assert "swarm peer (up to 2 per round" in out, out[-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
