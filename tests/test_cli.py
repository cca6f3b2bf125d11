"""The `s2f` command: dispatch, configs, fail-fast checks, run directory, W&B, checkpoints."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from s2f import cli, run
from s2f.teacher import TeacherHead

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
FEATURE_DIM, CLASSES = 16, 6


def s2f(*argv: str) -> int:
    """`s2f ARGV` in this process; the exit status, also when the CLI exits through SystemExit."""
    try:
        return cli.main(list(argv))
    except SystemExit as exit_:
        return int(exit_.code or 0)


def teacher(path: Path) -> Path:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(4 * CLASSES, FEATURE_DIM, generator=generator).relu()
    TeacherHead.fit(features, torch.arange(4 * CLASSES) % CLASSES).save(path)
    return path


def tiny_config(folder: Path, shards: Path, teacher_path: Path, **trainer: object) -> Path:
    """A tiny CPU run: encoder "tiny" on 32 frequency bins, batch 4, a checkpoint every step."""
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 2, "deterministic": True,
                    "enable_progress_bar": False, "enable_model_summary": False,
                    "log_every_n_steps": 1, "num_sanity_val_steps": 0, **trainer},
        "model": {"class_path": "s2f.module.Speech2Face",
                  "init_args": {"encoder": "tiny", "feature_dim": FEATURE_DIM, "num_classes": CLASSES,
                                "freq_bins": 32, "teacher": str(teacher_path)}},
        "data": {"class_path": "datamodules.shards.ShardDataModule",
                 "init_args": {"root": str(shards), "batch_size": 4, "num_workers": 1,
                               "shuffle_buffer": 8}},
        "checkpoint": {"every_n_train_steps": 1, "keep_steps": 2},
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fake_shards(root: Path) -> Path:
    """A shard folder the fail-fast checks accept (they run before anything reads shards)."""
    (root / "train").mkdir(parents=True)
    return root


# --- dispatch ----------------------------------------------------------------------------------


def test_help_lists_training_commands_and_tools(capsys):
    assert s2f("--help") == 0
    out = capsys.readouterr().out
    for command in [*cli.TRAINING, *cli.TOOLS]:
        assert f"  {command} " in out
    named = set(re.findall(r"configs/[\w-]+\.yaml", out))
    assert named == {f"configs/{path.name}" for path in CONFIGS.glob("*.yaml")}  # every config, no stale one


def test_tool_gets_the_remaining_arguments(tmp_path, monkeypatch):
    (tmp_path / "fake_tool.py").write_text(
        "import json, sys\ndef main(argv):\n    print(json.dumps(argv))\n    return 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.TOOLS, "bench", ("fake_tool:main", "a stand-in"))
    assert s2f("bench", "--x", "1") == 3


def test_missing_tool_is_reported_not_raised(monkeypatch, capsys):
    monkeypatch.setitem(cli.TOOLS, "bench", ("s2f.no_such_module:main", "missing"))
    assert s2f("bench") == 2
    assert "not available in this version" in capsys.readouterr().err


@pytest.mark.slow
def test_python_dash_m_is_the_same_command():
    done = subprocess.run([sys.executable, "-m", "s2f", "--help"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert done.returncode == 0 and "  evaluate " in done.stdout


# --- configs -----------------------------------------------------------------------------------


def printed_config(capsys, *argv: str) -> dict:
    assert s2f("fit", *argv, "--print_config") == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_paper_config_has_the_papers_hyperparameters(capsys):
    config = printed_config(capsys, "--config", str(CONFIGS / "paper.yaml"))
    model = config["model"]["init_args"]
    assert (model["encoder"], model["feature_dim"], model["num_classes"]) == ("paper", 4096, 2622)
    assert (model["lr"], model["betas"], model["eps"]) == (1e-3, [0.5, 0.999], 1e-4)
    assert (model["lr_decay"], model["lr_decay_steps"]) == (0.95, 10_000)
    assert (model["lambda1"], model["lambda2"], model["temperature"]) == (0.025, 200.0, 2.0)
    assert model["teacher"] == cli.REQUIRED
    assert config["data"]["init_args"]["batch_size"] == 8
    trainer = config["trainer"]
    assert (trainer["max_epochs"], trainer["precision"], trainer["accelerator"]) == (3, "bf16-mixed", "gpu")
    assert (trainer["devices"], trainer["strategy"]) == ("auto", "ddp")
    assert trainer["logger"]["class_path"].endswith("WandbLogger")


def test_deepspeed_config_is_the_paper_config_with_zero2(capsys):
    paper = printed_config(capsys, "--config", str(CONFIGS / "paper.yaml"))
    deepspeed = printed_config(capsys, "--config", str(CONFIGS / "paper-deepspeed.yaml"))
    assert deepspeed["trainer"].pop("strategy") == "deepspeed_stage_2"
    assert paper["trainer"].pop("strategy") == "ddp"
    for config in (paper, deepspeed):
        config["trainer"].pop("default_root_dir")
    assert deepspeed == paper


def test_deepspeed_strategy_resolves():
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")
    from pytorch_lightning.strategies import DeepSpeedStrategy, StrategyRegistry

    strategy = StrategyRegistry.get("deepspeed_stage_2")
    assert isinstance(strategy, DeepSpeedStrategy) and strategy.config["zero_optimization"]["stage"] == 2


def test_demo_config_parses_and_decays_the_rate_to_near_zero(capsys):
    config = printed_config(capsys, "--config", str(CONFIGS / "demo.yaml"), "--model.num_classes", "40")
    model, trainer = config["model"]["init_args"], config["trainer"]
    assert (model["encoder"], model["feature_dim"], trainer["accelerator"], str(trainer["precision"])) == (
        "tiny", 128, "cpu", "32")
    assert model["schedule"] == "linear"  # decays to 0 at max_steps (tests/test_module.py)
    assert model["train_seconds"] == 3.0 and model["channels_last"] is True
    assert Path(model["teacher"]).parent == Path(config["data"]["init_args"]["root"])


def decoder_sizes(config: dict) -> tuple[str, int, int, int]:
    """(preset, in_dim, data.image_size, the preset's own output side) of a decoder config."""
    from s2f.decoder import PRESETS

    model, data = config["model"]["init_args"], config["data"]["init_args"]
    return model["preset"], model["in_dim"], data["image_size"], PRESETS[model["preset"]].image_size


def test_decoder_configs_draw_their_presets_size(capsys):
    demo = printed_config(capsys, "--config", str(CONFIGS / "decoder-demo.yaml"))
    paper = printed_config(capsys, "--config", str(CONFIGS / "decoder-paper.yaml"))
    assert decoder_sizes(demo) == ("small", 128, 64, 64)  # the dlib descriptor, 64-px faces
    assert decoder_sizes(paper) == ("paper", 4096, 224, 224)  # VGG-Face fc7, SPEC section 6
    assert demo["model"]["init_args"]["identity_teacher"] == "dlib"
    assert demo["trainer"]["accelerator"] == "cpu" and paper["trainer"]["accelerator"] == "gpu"


def test_large_decoder_overlay_changes_only_the_preset_size_and_run_dir(capsys):
    demo = printed_config(capsys, "--config", str(CONFIGS / "decoder-demo.yaml"))
    large = printed_config(capsys, "--config", str(CONFIGS / "decoder-demo.yaml"),
                           "--config", str(CONFIGS / "decoder-demo-large.yaml"))  # fmt: skip
    assert decoder_sizes(large) == ("large", 128, 224, 224)
    assert large["trainer"]["default_root_dir"] != demo["trainer"]["default_root_dir"]
    for config in (demo, large):
        del config["model"]["init_args"]["preset"], config["data"]["init_args"]["image_size"]
        del config["trainer"]["default_root_dir"]
    assert large == demo


# --- fail before any work ----------------------------------------------------------------------


def test_unset_required_value_fails_naming_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    started = time.perf_counter()
    assert s2f("fit", "--config", str(CONFIGS / "paper.yaml"), "--data.root", str(fake_shards(tmp_path / "s"))) == 2
    assert "model.teacher" in capsys.readouterr().err
    assert time.perf_counter() - started < 30
    assert not (tmp_path / "runs").exists()  # nothing was started


def test_missing_teacher_file_fails_naming_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = s2f("fit", "--config", str(CONFIGS / "paper.yaml"), "--data.root", str(fake_shards(tmp_path / "s")),
               "--model.teacher", str(tmp_path / "nope.pth"))
    assert code == 2 and "model.teacher" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_missing_shard_folder_fails_naming_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = s2f("fit", "--config", str(CONFIGS / "paper.yaml"), "--data.root", str(tmp_path / "nope"),
               "--model.teacher", str(teacher(tmp_path / "t.pt")))
    assert code == 2 and "data.root" in capsys.readouterr().err


def test_wrong_type_fails_naming_the_key(capsys):
    assert s2f("fit", "--config", str(CONFIGS / "paper.yaml"), "--model.feature_dim", "many") != 0
    assert "feature_dim" in capsys.readouterr().err


def test_run_directory_of_another_config_is_refused(tmp_path, capsys):
    config = tiny_config(tmp_path, fake_shards(tmp_path / "s"), teacher(tmp_path / "t.pt"))
    run_dir = tmp_path / "run"
    argv = ("fit", "--config", str(config), "--trainer.default_root_dir", str(run_dir),
            "--trainer.logger", "false")
    with pytest.raises(FileNotFoundError, match="index.json"):  # a first start stops at the empty shards ...
        s2f(*argv, "--model.lr", "0.5")
    assert (run_dir / run.FINGERPRINT).is_file()  # ... having claimed the run directory
    capsys.readouterr()
    assert s2f(*argv) == 2
    err = capsys.readouterr().err
    assert "model.lr: 0.5 in the run, 0.001 now" in err and "model.encoder" not in err
    assert s2f(*argv, "--model.lr", "0.5", "--data.num_workers", "3") == 2
    assert "data.num_workers: 1 in the run, 3 now" in capsys.readouterr().err


# --- pure pieces -------------------------------------------------------------------------------


def test_required_unset_names_keys_without_init_args():
    config = {"model": {"class_path": "x", "init_args": {"teacher": "???", "lr": 1}}, "data": {"root": "???"}}
    assert cli.required_unset(config) == ["model.teacher", "data.root"]


def test_flatten_and_diff():
    flat = run.flatten({"model": {"class_path": "M", "init_args": {"betas": (0.5, 0.9), "lr": 1}}})
    assert flat == {"model.class_path": "M", "model.betas": [0.5, 0.9], "model.lr": 1}
    assert run.fingerprint_diff(flat, {**flat, "model.lr": 2, "data.seed": 0}) == {
        "data.seed": ("<unset>", 0), "model.lr": (1, 2)}


def test_wandb_goes_offline_without_an_api_key(tmp_path):
    netrc = tmp_path / "netrc"
    assert run.wandb_offline({"NETRC": str(netrc)})  # no netrc file
    netrc.write_text("machine example.org login a password b\n")
    assert run.wandb_offline({"NETRC": str(netrc)})
    netrc.write_text("machine api.wandb.ai login user password k3y\n")
    assert not run.wandb_offline({"NETRC": str(netrc)})
    assert run.wandb_offline({"NETRC": str(netrc), "WANDB_MODE": "offline"})
    assert not run.wandb_offline({"NETRC": str(tmp_path / "none"), "WANDB_API_KEY": "k3y"})


def test_wandb_id_is_made_once_and_only_by_rank_zero(tmp_path):
    assert run.wandb_id(tmp_path, create=False) is None
    made = run.wandb_id(tmp_path, create=True)
    assert len(made) == 8 and run.wandb_id(tmp_path, create=False) == made == run.wandb_id(tmp_path, True)


def test_newest_checkpoint_is_the_highest_step_including_hpc(tmp_path):
    folder = tmp_path / run.CHECKPOINTS
    folder.mkdir()
    assert run.newest_checkpoint(tmp_path) is None
    for name, step in [("last.ckpt", 30), ("step0000030.ckpt", 30), ("epoch000-step0000020.ckpt", 20)]:
        torch.save({"global_step": step}, folder / name)
    (folder / "step0000099.ckpt").write_bytes(b"PK\x03\x04 truncated")  # a damaged file is skipped
    os.utime(folder / "last.ckpt", ns=(0, 0))  # older file, same step
    assert run.newest_checkpoint(tmp_path) == folder / "step0000030.ckpt"
    torch.save({"global_step": 31}, tmp_path / "hpc_ckpt_1.ckpt")
    assert run.newest_checkpoint(tmp_path) == tmp_path / "hpc_ckpt_1.ckpt"


# --- atomic checkpoints ------------------------------------------------------------------------

SAVER = textwrap.dedent("""
    import sys, torch
    from s2f.run import AtomicCheckpointIO
    io, path = AtomicCheckpointIO(), sys.argv[1]
    for i in range(10_000):
        print(i, flush=True)
        io.save_checkpoint({"i": i, "w": torch.full((4_000_000,), float(i))}, path)  # 16 MB
""")


@pytest.mark.slow
def test_a_kill_mid_save_never_leaves_a_truncated_checkpoint(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    rng = random.Random(0)
    for _ in range(3):
        saver = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], stdout=subprocess.PIPE,
                                 text=True, cwd=REPO)
        for _ in range(rng.randint(2, 4)):  # a few saves in, then at a random moment of one
            saver.stdout.readline()
        time.sleep(rng.uniform(0.0, 0.05))
        saver.send_signal(signal.SIGKILL)
        saver.wait()
        state = torch.load(path, weights_only=True)  # complete: it loads, and it is one save's
        assert torch.equal(state["w"], torch.full((4_000_000,), float(state["i"])))
    assert [p.name for p in path.parent.glob("*.ckpt")] == ["last.ckpt"]
