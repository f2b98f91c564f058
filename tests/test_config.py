"""TrainConfig: TOML + command-line overrides, type conversion, validation, fingerprint."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from lowcomm.config import RESUMABLE_KEYS, TrainConfig, config_help, load_config, shipped_configs

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return str(path)


def test_defaults_are_valid() -> None:
    cfg = load_config([])
    assert cfg == TrainConfig()
    assert cfg.mode == "diloco"


def test_toml_then_overrides_in_order(tmp_path: Path) -> None:
    path = write(tmp_path, 'steps = 40\nsync-every = 8\nmode = "ddp"\ninner_lr = 1\n')
    cfg = load_config(
        ["--config", path, "--sync_every=4", "--batch-size", "3", "--steps", "50", "--steps=60"]
    )
    assert cfg.config == path
    assert cfg.mode == "ddp"  # from TOML
    assert cfg.sync_every == 4  # CLI beats TOML
    assert cfg.steps == 60  # the last override wins
    assert cfg.batch_size == 3
    assert cfg.inner_lr == 1.0 and isinstance(cfg.inner_lr, float)  # TOML int -> float


def test_option_forms() -> None:
    cfg = load_config(["--wandb", "--no-progress", "--steps", "1e3", "--mix", "-0"])
    assert cfg.wandb is True and cfg.progress is False and cfg.steps == 1000
    assert load_config(["--wandb", "false"]).wandb is False
    assert load_config(["--wandb=no", "--steps=50"]).wandb is False
    assert load_config(["--wandb", "--steps", "60"]).steps == 60
    assert load_config(["--resume", "auto"]).resume == "auto"
    assert load_config(["--resume=none"]).resume is None
    assert load_config(["--compression", "int8", "--error-feedback"]).error_feedback is True


def test_shipped_configs_load() -> None:
    tiny = load_config(["--config", str(REPO / "recipes/configs/tiny.toml")])
    demo = load_config(["--config", str(REPO / "recipes/configs/demo.toml")])
    assert tiny.steps < demo.steps


def test_shipped_configs_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = sorted((REPO / "recipes" / "configs").glob("*.toml"))
    assert {n: p.resolve() for n, p in shipped_configs().items()} == {p.stem: p for p in files}
    monkeypatch.chdir(tmp_path)  # names work from any directory
    for name, path in shipped_configs().items():
        by_name = load_config(["--config", name])
        assert by_name == load_config(["--config", str(path)])
        assert by_name == load_config(["--config", f"{name}.toml"])
        assert Path(by_name.config).resolve() == (REPO / "recipes/configs" / f"{name}.toml")
    # A file of that name in the working directory is what the user meant.
    (tmp_path / "tiny").write_text("steps = 3\nwarmup_steps = 0\n")
    assert load_config(["--config", "tiny"]).steps == 3


def test_uneven_fragments_are_valid() -> None:
    # fragments need not divide sync_every: offsets 0, 12, 25, 37, smallest gap 12.
    cfg = load_config(["--sync-every", "50", "--fragments", "4", "--overlap-steps", "11"])
    assert (cfg.sync_every, cfg.fragments, cfg.overlap_steps) == (50, 4, 11)
    assert load_config(["--sync-every", "7", "--fragments", "7"]).fragments == 7


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--stpes", "3"], "unknown config key 'stpes'.*did you mean steps"),
        (["--steps", "three"], "--steps expects int"),
        (["--steps", "2.5"], "--steps expects int"),
        (["--wandb", "maybe"], "unexpected argument 'maybe'"),
        (["--no-steps"], "only exists for boolean keys"),
        (["--steps"], "--steps needs a value"),
        (["steps=3"], "unexpected argument"),
        (["--steps", "0"], r"steps \(0\) must be >= 1"),
        (["--mode", "sync"], r"mode \('sync'\) must be one of diloco, ddp, local"),
        (["--device", "tpu"], "device"),
        (["--dtype", "fp8"], "dtype"),
        (["--n-embd", "30", "--n-head", "4"], r"n_embd \(30\) must be divisible by n_head \(4\)"),
        (["--warmup-steps", "20", "--steps", "10"], "warmup_steps"),
        (["--mix", "1.5"], r"mix \(1.5\) must be in \[0, 1\]"),
        (["--inner-lr", "0"], "inner_lr"),
        (["--heldout-fraction", "1"], "heldout_fraction"),
        (["--overlap-steps", "5", "--sync-every", "5"], "overlap_steps"),
        (["--sync-every", "10", "--fragments", "11"], r"fragments \(11\) must be <= sync_ev"),
        (
            ["--sync-every", "50", "--fragments", "4", "--overlap-steps", "12"],
            r"overlap_steps \(12\) must be < the fragment spacing \(12:",
        ),
        (["--overlap-mode", "eager", "--overlap-steps", "1"], "overlap_mode 'mix'"),
        (["--config", "tinyy"], "not the name of a shipped config; .* one of: demo, tiny"),
        (["--streaming"], "max_bytes"),
        (["--compression", "zip"], "unknown compression 'zip'"),
        (["--error-feedback"], "error_feedback needs a compression"),
        (["--config", "/nonexistent/x.toml"], "does not exist"),
        (["--wait-for-peers", "2"], r"wait_for_peers \(2\) applies to backend 'hivemind' only"),
        (["--backend", "hivemind", "--wait-for-peers", "0"], r"wait_for_peers \(0\) must be >= 1"),
        (["--backend", "hivemind", "--wait-for-peers-timeout", "0"], "wait_for_peers_timeout"),
        (["--aggregation", "median"], r"aggregation \('median'\) must be one of mean, trimmed"),
        (["--norm-ratio", "0.5"], r"norm_ratio \(0.5\) must be 0 or >= 1"),
        (["--max-norm", "-1"], r"max_norm \(-1.0\) and norm_ratio"),
        (["--replicas", "2", "--mode", "ddp"], "replicas .* needs mode 'diloco'"),
        (["--shard", "zero3"], r"shard \('zero3'\) must be one of ddp, fsdp"),
    ],
)
def test_bad_values_raise(argv: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_config(argv)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("stepz = 3\n", "unknown config key 'stepz'"),
        ('steps = "3"\n', "steps in .* must be int, got str"),
        ("wandb = 1\n", "wandb in .* must be bool"),
        ("steps = true\n", "steps in .* must be int, got bool"),
        ("[model]\nn_layer = 2\n", "tables"),
        ("steps = \n", "not valid TOML"),
    ],
)
def test_bad_toml_raises(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_config(["--config", write(tmp_path, text)])


def test_direct_construction_validates() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)


def test_fingerprint_ignores_only_resumable_keys() -> None:
    base = TrainConfig()
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert names >= RESUMABLE_KEYS
    harmless = dataclasses.replace(
        base, steps=5000, eval_every=7, log_every=3, wandb=True, run_dir="elsewhere", keep=9
    )
    assert harmless.fingerprint() == base.fingerprint()
    # Swarm peers that wait for different numbers of others at start still train together.
    swarm = dataclasses.replace(base, backend="hivemind")
    waits = dataclasses.replace(swarm, wait_for_peers=4, wait_for_peers_timeout=30.0)
    assert waits.fingerprint() == swarm.fingerprint()
    for change in ({"seed": 1}, {"batch_size": 8}, {"n_layer": 2}, {"sync_every": 10}):
        assert dataclasses.replace(base, **change).fingerprint() != base.fingerprint(), change


def test_help_lists_every_key() -> None:
    text = config_help()
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name.replace('_', '-')}" in text
