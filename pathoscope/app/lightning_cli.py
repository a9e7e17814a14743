"""PathoScopeCLI (LightningCLI for `pathoscope fit|validate|test`) and the callbacks it adds.

Configs: experiments/defaults.yaml (the model, trainer and metrics defaults) is read first, then
every `--config` file in order, then the command-line overrides; docs/configs.md has the layout.
"""

from __future__ import annotations

import logging
import signal
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from callbacks.metrics import AnomalyMetrics
from callbacks.panels import AnomalyPanels
from data_modules.common import FewShotDataModule, TrainSampler
from pathoscope.app.configs import defaults_file, read_yaml
from pathoscope.app.cpu import skip_nan_fill
from pathoscope.checkpoint import CheckpointError, read_checkpoint
from pathoscope.files import write_text
from pathoscope.lightning_model import PathoScope

LAST_CHECKPOINT = "last"  # the only checkpoint a run keeps: <checkpoint.dirpath>/last.ckpt
CKPT_KEYWORDS = ("last", "best", "hpc")  # --ckpt_path values Lightning resolves (and registry:*)
# Arguments set from another (link_arguments): given on their own they would be overwritten.
LINKED = {"data.lesion_min_fraction": "model.losses.lesion_min_fraction"}


class SaveConfigAtomically(SaveConfigCallback):
    """Lightning's SaveConfigCallback (config.yaml in the log folder, replaced if there), written
    aside and renamed when complete (pathoscope.files)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        log_dir = trainer.log_dir  # on every rank: it broadcasts
        if trainer.is_global_zero and log_dir is not None:
            path = Path(log_dir) / self.config_filename
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text(path, self.parser.dump(self.config, skip_none=False))
        self.already_saved = True


class FinalValidation(Callback):
    """Remembers the global step of the last validation (see finish_fit)."""

    def __init__(self) -> None:
        self.validated_at: int | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.validated_at = trainer.global_step


class TrainSamplerEpoch(Callback):
    """Gives the training sampler the epoch actually trained.

    The training data are seeded by (epoch * length + i) through `TrainSampler.set_epoch`.
    Lightning 2.6 passes its `processed` epoch counter, which is one ahead after resuming from a
    checkpoint written at an epoch end, and under DDP it calls set_epoch only on its
    DistributedSamplerWrapper, not on the TrainSampler inside. Either would make a resumed or
    distributed run see other training data than an uninterrupted single-process run.
    """

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sampler = getattr(trainer.train_dataloader, "sampler", None)
        inner = getattr(getattr(sampler, "dataset", None), "_sampler", None)  # DDP wrapper
        for candidate in (sampler, inner):
            if isinstance(candidate, TrainSampler):
                candidate.set_epoch(trainer.current_epoch)


def finish_fit(
    trainer: L.Trainer, model: L.LightningModule, datamodule: Any, tracker: FinalValidation
) -> None:
    """Validate the final model if no validation ran after the last step, and rewrite last.ckpt,
    so that tau (set on validation) always belongs to the final model."""
    if tracker.validated_at == trainer.global_step or trainer.interrupted:
        return
    trainer.validate(model, datamodule=datamodule, verbose=False)
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath and cb.filename == LAST_CHECKPOINT:
            path = Path(cb.dirpath) / f"{LAST_CHECKPOINT}{cb.FILE_EXTENSION}"
            trainer.save_checkpoint(path)
            cb.best_model_path = cb.last_model_path = str(path)


class PathoScopeCLI(LightningCLI):
    """LightningCLI for PathoScope and the few-shot data modules.

    * `--data` is any FewShotDataModule (`data_modules.brats.BraTSDataModule`,
      `data_modules.chestxray8.ChestXray8DataModule`) given by `class_path`.
    * `--model.losses.lesion_min_fraction` is also the data's lesion synthesis threshold
      (linked: one value for both; setting the data's own is refused, see LINKED).
    * `--metrics.*`: the AnomalyMetrics callback, always present (validation sets tau; test
      writes metrics.json into `--metrics.output_dir`, default the trainer's log_dir).
    * `--panels.*`: the AnomalyPanels callback, always present: after a test, panels of the
      false alarms, misses and a random sample into `panels/` beside metrics.json (or under
      `--panels.output_dir`), and to W&B with a WandbLogger; `--panels.enabled false` turns it off.
    * `--checkpoint.*`: a ModelCheckpoint, always present, keeping `last.ckpt` only (no
      selection on any score), rewritten after every validation (every epoch end by default,
      every 100 steps for BraTS). Resuming after an interruption:
      the same command with `--checkpoint.dirpath DIR --ckpt_path last`.
    * After `fit`, validation runs once more if the last one was before the final step (e.g.
      max_steps not a multiple of steps_per_epoch, or max_steps 0 for anchor_knn), so that tau
      always belongs to the final model, and last.ckpt is rewritten with it.
    * `validate` / `test` with a checkpoint file check its version first, and build the model
      without loading backbone weights from anywhere: the checkpoint holds them.
    * Bad input stops before anything is written (config.yaml, logs, checkpoints): a `--ckpt_path`
      file is read and checked while the arguments are parsed (missing, unreadable, foreign, of
      another version: one line naming it), and before the trainer starts the data's split is
      built and the checkpoint's tensors are loaded into the model. config.yaml is written aside
      and renamed (SaveConfigAtomically).
    """

    def __init__(self, args: Sequence[str] | None = None, run: bool = True, **kwargs: Any):
        self.final_validation = FinalValidation()
        callbacks = [self.final_validation, TrainSamplerEpoch()]
        kwargs.setdefault("save_config_callback", SaveConfigAtomically)
        defaults = {"default_config_files": [str(defaults_file())]}
        super().__init__(
            PathoScope,
            FewShotDataModule,
            subclass_mode_data=True,
            args=list(args) if args is not None else None,
            run=run,
            trainer_defaults={"callbacks": callbacks},
            parser_kwargs={
                "exit_on_error": False,
                **({} if run else defaults),
                **{verb: {"exit_on_error": False, **defaults} for verb in self.subcommands()},
            },
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(AnomalyMetrics, "metrics")
        parser.add_lightning_class_args(AnomalyPanels, "panels")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.link_arguments(
            "model.losses.lesion_min_fraction", "data.init_args.lesion_min_fraction"
        )
        # One file, last.ckpt, rewritten after every validation (each epoch end): Lightning
        # 2.6 writes `save_last` files only when a top-k file is written, so the newest
        # checkpoint itself is named "last" (what --ckpt_path last finds).
        parser.set_defaults(
            {
                "checkpoint.filename": LAST_CHECKPOINT,
                "checkpoint.save_top_k": 1,
                "checkpoint.save_last": False,
                "checkpoint.enable_version_counter": False,
            }
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        refuse_link_targets(list(args or ()))
        super().parse_arguments(parser, args)
        config = self.config.get(str(self.config.get("subcommand")), self.config)
        ckpt_path = config.get("ckpt_path")
        self._checkpoint: tuple[str, dict[str, Any]] | None = None
        if ckpt_path and not (ckpt_path in CKPT_KEYWORDS or str(ckpt_path).startswith("registry")):
            # Missing, unreadable, foreign or of another version: one line naming the file,
            # before Lightning reads its hyperparameters and before anything is written.
            self._checkpoint = (str(ckpt_path), read_checkpoint(ckpt_path))

    def before_instantiate_classes(self) -> None:
        config = self.config.get(str(self.subcommand), self.config)
        ckpt_path = config.get("ckpt_path")
        if self.subcommand in ("validate", "test") and ckpt_path and Path(ckpt_path).is_file():
            # The checkpoint carries the backbone weights: never fetch or read them again.
            config["model"]["network"]["pretrained"] = False
            config["model"]["network"]["weights"] = None
            self._checkpoint_backbone = True

    def instantiate_classes(self) -> None:
        with warnings.catch_warnings():
            if getattr(self, "_checkpoint_backbone", False):
                warnings.filterwarnings("ignore", message="Backbone: pretrained=False")
            super().instantiate_classes()
        skip_nan_fill()  # after the Trainer set trainer.deterministic (pathoscope.app.cpu)

    def _load_before_writing(self, stage: str) -> None:
        """What bad input can break, before the trainer writes anything (config.yaml, logs,
        checkpoints): the data module's split, and the checkpoint's tensors in the model (the
        trainer loads them again, the same)."""
        self.datamodule.setup(stage)
        config = self.config[str(self.subcommand)]
        if stage != "fit" and config.get("ckpt_path") in ("last", "best"):
            # Lightning would test the untrained model, with a notice only, when there is none.
            dirpath = config["checkpoint"]["dirpath"]
            path = Path(dirpath) / f"{LAST_CHECKPOINT}.ckpt" if dirpath else None
            if path is None or not path.is_file():
                where = f"no {path}" if path else "no --checkpoint.dirpath to look in"
                raise CheckpointError(
                    f"--ckpt_path {config['ckpt_path']}: {where} (give the folder fit wrote "
                    "last.ckpt into as --checkpoint.dirpath, or the file as --ckpt_path)"
                )
            self._checkpoint = (str(path), read_checkpoint(path))
        if self._checkpoint is not None:
            path, checkpoint = self._checkpoint
            try:
                self.model.load_state_dict(checkpoint["state_dict"])
            except (KeyError, RuntimeError) as exc:
                reason = " ".join(str(exc).split())[:300] or type(exc).__name__
                raise CheckpointError(f"{path}: does not fit this model ({reason})") from exc
            self._checkpoint = None

    def before_fit(self) -> None:
        self._load_before_writing("fit")

    def before_validate(self) -> None:
        self._load_before_writing("validate")

    def before_test(self) -> None:
        self._load_before_writing("test")

    def after_fit(self) -> None:
        finish_fit(self.trainer, self.model, self.datamodule, self.final_validation)


def refuse_link_targets(args: Sequence[str]) -> None:
    """ValueError when the command line or a --config file sets a linked argument itself (the
    link would silently replace its value)."""
    for i, arg in enumerate(args):
        key = arg.removeprefix("--").split("=", 1)[0].replace(".init_args.", ".")
        if key in LINKED:
            raise ValueError(f"--{key} is set by --{LINKED[key]}: give that instead")
        if key == "config":
            path = (
                arg.split("=", 1)[1] if "=" in arg else (args[i + 1] if i + 1 < len(args) else "")
            )
            if Path(path).is_file():
                config = read_yaml(path) or {}
                data = config.get("data") or {}
                init = {**data, **(data.get("init_args") or {})} if isinstance(data, dict) else {}
                for target, source in LINKED.items():
                    if target.removeprefix("data.") in init:
                        raise ValueError(f"{path}: {target} is set by {source}: give that instead")


class _NoInterruptNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Detected KeyboardInterrupt" not in record.getMessage()


@contextmanager
def our_interrupts() -> Iterator[None]:
    """Ctrl-C inside a Trainer's fit / validate / test raises KeyboardInterrupt, as everywhere
    else, so that the command ends with its own one line (exit status 130).

    Lightning 2.6 answers it by logging "Detected KeyboardInterrupt, attempting graceful shutdown"
    (dropped here), ignoring SIGINT from then on (the handler is restored here) and calling
    sys.exit(1), which is turned back into the KeyboardInterrupt it came from.
    """
    notices = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    quiet = _NoInterruptNotice()
    notices.addFilter(quiet)
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if main else None
    try:
        yield
    except SystemExit as exc:
        if isinstance(exc.__context__, KeyboardInterrupt):
            raise KeyboardInterrupt(str(exc.__context__)) from None
        raise
    finally:
        notices.removeFilter(quiet)
        if handler is not None:
            signal.signal(signal.SIGINT, handler)


def lightning_cli(args: Sequence[str] | None, run: bool = True, **kwargs: Any) -> PathoScopeCLI:
    """Build (and with run=True, run) PathoScopeCLI on `args` (the verb first when run=True)."""
    with warnings.catch_warnings():
        # `args` is always given (main's argv, or the run's own): the mix-up this warns about
        # cannot happen here.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return PathoScopeCLI(args=args, run=run, **kwargs)
