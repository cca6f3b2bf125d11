"""The `s2f` command.

`s2f fit|validate|test|predict` are LightningCLI's, with `Speech2Face` by default or any other
LightningModule (`--model CLASS`, e.g. the face decoder's `s2f.decoder_training.FaceDecoderModule`)
and `ShardDataModule` by default or any other DataModule (`--data CLASS`, e.g.
`datamodules.dali.DaliShardDataModule`); every argument can be set in YAML (`--config`) or on the
command line. On top of LightningCLI:

- `--trainer.default_root_dir` is the run directory (`s2f.run`): checkpoints, W&B id, config
  fingerprint. `s2f fit` into a run directory that holds checkpoints resumes from the newest one
  (an explicit `--ckpt_path` wins) and refuses a directory made by a different model/data config.
- W&B logs by default (project "s2f"), offline when no API key is configured; `--trainer.logger
  CSVLogger` (or TensorBoardLogger, when tensorboard is installed) replaces it.
- `--checkpoint.*` (`CheckpointPolicy`): checkpoints every N steps, at epoch ends, last and best.
- A YAML value `???` marks a value the user must give; it fails before any work, naming the key.

Other subcommands are separate tools, imported only when called: see `TOOLS`.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import yaml
from jsonargparse import Namespace
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.plugins import CheckpointIO
from pytorch_lightning.plugins.environments import ClusterEnvironment, SLURMEnvironment
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from callbacks.requeue import SlurmRequeue
from callbacks.throughput import KeyLog, Throughput
from datamodules.shards import SPLIT_PLACEHOLDER
from s2f import run

REQUIRED = "???"  # a YAML value the user has to replace
TRAINING = {
    "fit": "train a model (resumes automatically in a run directory that holds checkpoints)",
    "validate": "validation metrics of a checkpoint (--ckpt_path)",
    "test": "test-split metrics of a checkpoint (--ckpt_path)",
    "predict": "predictions of a checkpoint (--ckpt_path); `s2f predict AUDIO ...` is the tool below",
}
TOOLS = {  # subcommand: ("module:function", help); the function takes the remaining argv
    "shards": ("shards.cli:main", "build WebDataset shards from a source (AVSpeech, VoxCeleb, videos, demo)"),
    "demo": ("s2f.demo.cli:main", "the built-in synthetic world, end to end on a laptop"),
    "evaluate": ("s2f.evaluate:main", "run a checkpoint over a test split -> metrics.json + report"),
    "bench": ("s2f.bench:main", "measure data loading and training throughput"),
    "predict": ("s2f.predict:main", "AUDIO --ckpt CKPT [--decoder DEC] --out DIR: a voice -> feature (+ face)"),
}
DEFAULT_CLASSES = {"model": "s2f.module.Speech2Face", "data": "datamodules.shards.ShardDataModule"}
DEFAULT_RUN_DIR = "runs/s2f"
TRAINER_DEFAULTS = {
    "default_root_dir": DEFAULT_RUN_DIR,
    "logger": {"class_path": "pytorch_lightning.loggers.WandbLogger", "init_args": {"project": "s2f"}},
}


class ConfigError(ValueError):
    """A configuration value is missing or wrong; raised before any work starts."""


# --- pure helpers ----------------------------------------------------------------------------


def required_unset(tree: Any, prefix: str = "") -> list[str]:
    """Dotted names (without `init_args`) of every value still equal to `???`."""
    if isinstance(tree, Namespace):
        tree = vars(tree)
    if isinstance(tree, dict):
        return [name for key, value in tree.items()
                for name in required_unset(value, prefix if key == "init_args" else f"{prefix}.{key}".lstrip("."))]
    return [prefix] if tree == REQUIRED else []


def init_args(section: Any) -> Namespace:
    """The constructor arguments of a model/data/logger section (subclass mode nests them)."""
    return section.init_args if isinstance(section, Namespace) and "init_args" in section else section


def import_target(path: str) -> Any:
    """The object named by "package.module:attribute" or "package.module.attribute"."""
    module, _, attribute = path.partition(":") if ":" in path else path.rpartition(".")
    return getattr(importlib.import_module(module), attribute)


def module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def is_lightning_predict(argv: list[str]) -> bool:
    """`s2f predict --config ...` is LightningCLI's; `s2f predict AUDIO ...` is the audio tool."""
    return argv[0] == "predict" and (len(argv) == 1 or argv[1].startswith("-"))


def run_tool(name: str, argv: list[str]) -> int:
    target, _ = TOOLS[name]
    if not module_exists(target.partition(":")[0]):
        print(f"s2f {name}: not available in this version of s2f (no module {target.partition(':')[0]})",
              file=sys.stderr)
        return 2
    return import_target(target)(argv) or 0


def usage() -> str:
    lines = ["usage: s2f COMMAND [ARGS]   (s2f COMMAND --help for its options)", "",
             "training (LightningCLI; --config YAML, any option also on the command line):"]
    lines += [f"  {name:<10}{text}" for name, text in TRAINING.items()]
    lines += ["", "tools:"] + [f"  {name:<10}{text}" for name, (_, text) in TOOLS.items()]
    lines += ["", "configs: configs/paper.yaml (the paper's setup on GPUs), configs/paper-deepspeed.yaml, "
              "configs/demo.yaml (CPU)",
              "face decoder: configs/decoder-paper.yaml (GPU), configs/decoder-demo.yaml (CPU, 64 px; "
              "add --config configs/decoder-demo-large.yaml for 224 px)"]
    return "\n".join(lines)


# --- checks before any work ------------------------------------------------------------------


def check_paths(subcommand: str, config: Namespace) -> None:
    """Files the run will need, checked now rather than after the loggers and workers start."""
    model, data = init_args(config.model), init_args(config.data)
    teacher = getattr(model, "teacher", None)
    if subcommand == "fit" and teacher is not None and not Path(teacher).is_file():
        raise ConfigError(f"model.teacher: no such file {teacher!r}; give the path of vgg_face_dag.pth "
                          "or of the shards' teacher_head.pt")
    decoder = getattr(model, "decoder_ckpt", None)
    if subcommand == "fit" and decoder is not None and not Path(decoder).is_file():
        raise ConfigError(f"model.decoder_ckpt: no such file {decoder!r}; train a decoder with "
                          "`s2f fit --config configs/decoder-demo.yaml` and pass its checkpoint")
    root = getattr(data, "root", None)
    is_local = root is not None and SPLIT_PLACEHOLDER not in root and ":" not in root
    if is_local and not Path(root).is_dir():
        raise ConfigError(f"data.root: no such folder {root!r}; build shards with `s2f shards` "
                          f"or give a URL pattern containing {SPLIT_PLACEHOLDER}")


def check_required(config: Namespace) -> None:
    unset = required_unset(config)
    if unset:
        raise ConfigError(f"{', '.join(unset)}: required but unset ({REQUIRED} in the config); "
                          "set in YAML or on the command line, e.g. --" + unset[0] + " VALUE")


# --- the CLI ---------------------------------------------------------------------------------


class LogConfig(SaveConfigCallback):
    """Writes `config.yaml` into the run directory and hands the resolved config to every logger."""

    def save_config(self, trainer: Any, pl_module: Any, stage: str) -> None:
        resolved = yaml.safe_load(self.parser.dump(self.config))  # a nested plain dict
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": resolved})


class S2FCLI(LightningCLI):
    """LightningCLI plus the run directory: auto-resume, fingerprint, W&B id, checkpoints."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(run.CheckpointPolicy, "checkpoint")
        parser.set_defaults({key: {"class_path": path} for key, path in DEFAULT_CLASSES.items()})

    @property
    def run_dir(self) -> Path:
        return Path(self._get(self.config, "trainer").default_root_dir or DEFAULT_RUN_DIR)

    def before_instantiate_classes(self) -> None:
        config = self.config.get(str(self.subcommand), self.config)  # run=False: no subcommand
        check_required(config)
        check_paths(self.subcommand, config)
        if self.subcommand == "fit":
            current = run.flatten({"model": config.model.as_dict(), "data": config.data.as_dict()})
            run.check_fingerprint(self.run_dir, current, write=rank_zero_only.rank == 0)
            if config.ckpt_path is None:
                newest = run.newest_checkpoint(self.run_dir)
                config.ckpt_path = str(newest) if newest is not None else None
            if config.ckpt_path is not None and rank_zero_only.rank == 0:
                step = run.checkpoint_step(Path(config.ckpt_path))
                print(f"s2f fit: resumed from {config.ckpt_path} at step {step}", flush=True)
        self._prepare_loggers(config.trainer)

    def _prepare_loggers(self, trainer: Namespace) -> None:
        loggers = trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]
        for logger in loggers:
            if not isinstance(logger, Namespace) or "class_path" not in logger:
                continue  # False / None / True: no logger, or Lightning's default
            args = logger.init_args
            if "save_dir" in args and args.save_dir in (None, "."):
                args.save_dir = str(self.run_dir)
            if issubclass(import_target(logger.class_path), WandbLogger):
                args.offline = bool(args.offline) or run.wandb_offline()
                args.resume = args.resume or "allow"  # a restart continues the stored run id
                if args.id is None and args.version is None:
                    # Only global rank 0 creates the W&B run, so only it may mint the id.
                    args.id = run.wandb_id(self.run_dir, create=rank_zero_only.rank == 0)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        trainer = self._get(self.config_init, "trainer")
        plugins = as_list(trainer.get("plugins"))
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(run.AtomicCheckpointIO())
        if self.subcommand == "fit":
            extra = [Throughput(), *filter(None, [KeyLog.from_env()])]
            if trainer.get("enable_checkpointing", True) is not False:
                extra += self._get(self.config_init, "checkpoint").callbacks(self.run_dir)
            if SLURMEnvironment.detect():
                # SlurmRequeue replaces Lightning's requeue, which can deadlock DDP ranks.
                extra.append(SlurmRequeue(self.run_dir / run.CHECKPOINTS))
                if not any(isinstance(p, ClusterEnvironment) for p in plugins):
                    plugins.append(SLURMEnvironment(auto_requeue=False))
            trainer["callbacks"] = [*as_list(trainer.get("callbacks")), *extra]
        trainer["plugins"] = plugins
        return super().instantiate_trainer(**kwargs)


def as_list(value: Any) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def main(argv: Sequence[str] | None = None) -> int:
    """`s2f ARGS`; `argv` None reads the process's arguments."""
    from_process = argv is None
    argv = list(sys.argv[1:] if from_process else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in TOOLS and not is_lightning_predict(argv):
        return run_tool(argv[0], argv[1:])
    try:
        S2FCLI(
            pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
            save_config_callback=LogConfig, save_config_kwargs={"overwrite": True},
            # args=None lets LightningCLI read sys.argv itself (it warns when given both).
            trainer_defaults=TRAINER_DEFAULTS, args=None if from_process else argv,
        )
    except (ConfigError, run.RunDirError) as error:
        print(f"s2f {argv[0]}: error: {error}", file=sys.stderr)
        return 2
    return 0
