"""The ``lowcomm`` command in-process: help for every command, one-line errors, exit codes."""

from __future__ import annotations

import pytest

from lowcomm import cli
from lowcomm.recipes import train_lm


@pytest.fixture(autouse=True)
def no_root_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    # The command configures the root logger for its process; here that process is pytest's.
    monkeypatch.setattr(cli, "_logging", lambda: None)


def test_top_level_help_lists_only_options_the_commands_accept(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["--help"]) == 0
    top = capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["dht", "--help"])
    assert exit_info.value.code == 0
    dht_help = capsys.readouterr().out
    dht_line = next(line for line in top.splitlines() if "lowcomm dht" in line)
    options = [w.strip("[]") for w in dht_line.split("#")[0].split() if w.startswith("[--")]
    assert options and all(o in dht_help for o in options), (dht_line, dht_help)
    assert "--run-key-file" not in dht_line


@pytest.mark.parametrize(
    ("command", "expect"), [("train", "--sync-every"), ("join", "--initial-peers")]
)
def test_train_and_join_help(command: str, expect: str, capsys) -> None:
    assert cli.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert expect in out and "--config" in out


def test_join_without_an_address_is_a_usage_error(capsys) -> None:
    assert cli.main(["join", "--config", "tiny"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowcomm: error: ") and "--initial-peers" in err


@pytest.mark.parametrize(
    ("argv", "why"),
    [
        (["--config", "tinyy"], "one of: demo, tiny"),
        (["--sync-every", "4", "--fragments", "5"], r"fragments (5) must be <= sync_every (4)"),
        (["--sync-every", "10", "--fragments", "4", "--overlap-steps", "2"], "fragment spacing (2"),
        (["--stpes", "3"], "did you mean steps"),
    ],
)
def test_config_errors_exit_2_with_one_line(argv: list[str], why: str, capsys) -> None:
    for run in (lambda: cli.main(["train", *argv]), lambda: train_lm.main(argv)):
        with pytest.raises(SystemExit) as exit_info:
            run()
        assert exit_info.value.code == 2
        captured = capsys.readouterr()
        assert captured.err.startswith("lowcomm: error: ") and why in captured.err
        assert captured.err.count("\n") == 1 and captured.out == ""
