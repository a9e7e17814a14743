"""The `pathoscope` command.

`pathoscope fit|validate|test ...` is a LightningCLI (`PathoScopeCLI`, app/lightning_cli.py):
experiments/defaults.yaml, then `--config experiments/X.yaml` (repeatable: later files override
earlier ones), any key overridable (`--model.pieg.eta 0.02`, `--data.shots 4`,
`--trainer.max_steps 100`). Every verb is one entry of the table `VERBS`, from which
`pathoscope --help`, the dispatch and the front parser are built: a LightningCLI verb, a verb of
the front parser (its `--help` description here, its arguments and handler in front_verbs.py), or
a verb of its own module (`main(argv) -> int` there, imported only when used).

Every error a user can cause (bad data, missing weights, missing files, bad values) ends with one
line on stderr and exit status 2, never a traceback. Exit statuses, the same for every verb
(pathoscope/exit_codes.py): 0 done (also "nothing left to do"), 2 usage or input error,
3 done with some inputs skipped (a line names them), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pathoscope.app import front_verbs
from pathoscope.exit_codes import EXIT_INTERRUPTED, EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, partial_exit

__all__ = ["EXIT_OK", "EXIT_PARTIAL", "EXIT_USAGE", "main"]
_USAGE = """\
usage: pathoscope <verb> [options]   (pathoscope <verb> --help for each verb)

PathoSCOPE: few-shot unsupervised pathology detection.
"""


def _error_types() -> tuple[type[BaseException], ...]:
    """The exceptions that mean bad input and end as one line (imports kept lazy: torch is slow)."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from data_modules.errors import DataError
    from pathoscope.backbone import BackboneWeightsError

    # MisconfigurationException: Lightning's refusal of a trainer setting (--trainer.max_steps -5)
    return (
        DataError,
        BackboneWeightsError,
        FileNotFoundError,
        ValueError,
        MisconfigurationException,
    )


# ------------------------------------------------------------------------------- LightningCLI
def _run_lightning(argv: list[str]) -> int:
    # lazy: torch and Lightning are slow
    from pathoscope.app.lightning_cli import lightning_cli, our_interrupts

    with our_interrupts():
        cli = lightning_cli(argv, run=True)
    where = "metrics.json and the warnings above" if argv[0] == "test" else "the warnings above"
    return _skipped_exit(argv[0], cli.datamodule, where)


def _skipped_exit(verb: str, datamodule: Any, where: str) -> int:
    """EXIT_PARTIAL, with a line naming them, when the data module left inputs out; else EXIT_OK."""
    skipped = getattr(datamodule, "skipped", None) or {}
    kind = getattr(datamodule, "input_kind", "input")
    return partial_exit(verb, skipped, f"{kind}(s)", where)


# ------------------------------------------------------------------------------- modules
def _load_module(module: str, verb: str) -> Any:
    """Import `module`; a top-level folder of the checkout (benchmarks/) is loaded from its file,
    since the console script does not put the checkout on sys.path."""
    if module in sys.modules:
        return sys.modules[module]
    path = Path(__file__).resolve().parents[2].joinpath(*module.split(".")).with_suffix(".py")
    if not module.startswith("pathoscope.") and path.is_file():
        spec = importlib.util.spec_from_file_location(module, path)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[module] = mod
        spec.loader.exec_module(mod)
        return mod
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is not None and module.startswith(err.name):
            raise FileNotFoundError(
                f"the `{verb}` verb is not available in this installation (module {module})"
            ) from err
        raise


def _dispatch_module(module: str, verb: str) -> Callable[[list[str]], int]:
    """`main(argv) -> int` of a verb living in its own module, imported only when used."""

    def run(argv: list[str]) -> int:
        return int(_load_module(module, verb).main(argv) or 0)

    return run


# ------------------------------------------------------------------------------- the verbs
@dataclass(frozen=True)
class Verb:
    """One verb of `pathoscope`: how it runs and what `pathoscope --help` says of it."""

    group: str  # its heading in `pathoscope --help` (a key of GROUPS)
    summary: str  # its line there (a second line is indented below the first)
    module: str | None = None  # a verb of its own module: `main(argv) -> int` there
    handler: Callable[[argparse.Namespace, list[str]], int] | None = None  # a front-parser verb
    arguments: Callable[[argparse.ArgumentParser], None] | None = None  # its arguments
    description: str = ""  # its `--help` (a front-parser verb)


GROUPS = {
    "lightning": "LightningCLI verbs (--config experiments/X.yaml, any key overridable):",
    "experiment": "Experiment verbs:",
    "other": "Other verbs:",
    "figures": "Figures:",
}
# Every verb, in the order of `pathoscope --help` within its group.
VERBS: dict[str, Verb] = {
    "fit": Verb("lightning", "train (and validate, which sets the image threshold tau)"),
    "validate": Verb("lightning", "run validation of a checkpoint (--ckpt_path)"),
    "test": Verb(
        "lightning", "test a checkpoint (--ckpt_path): metrics.json in --metrics.output_dir"
    ),
    "train": Verb(
        "experiment",
        "fit + test seeds 0..N-1 into runs/<dataset>/<config>/k<K>/, then summary",
        handler=front_verbs.cmd_train,
        arguments=front_verbs.train_args,
        description="Fit then test seeds 0..N-1 into <runs>/<dataset>/<config>/k<K>/seed<i>/ "
        "(metrics.json, predictions.npz, config.yaml, last.ckpt, panels/, "
        "training_curves.png), then summary.json and summary.md (with each seed's figures) in "
        "<runs>/<dataset>/<config>/k<K>/. Further --model.* / --data.* / "
        "--trainer.* arguments override the experiment YAMLs.",
    ),
    "table": Verb(
        "experiment",
        "one Markdown table + CSV of every config and K under a runs folder",
        handler=front_verbs.cmd_table,
        arguments=front_verbs.table_args,
        description="Gather every <config>/k<K>/summary.json under --runs into one table "
        "shaped like the paper's Table 1 (rows: configs; columns: Image AUROC, Pixel AUROC, "
        "PRO, Dice for each K), with the paper's own rows marked as reference; writes table.md, "
        "table.csv and metrics_vs_k.png (the metrics against K beside the paper's rows) into "
        "--runs and prints the Markdown.",
    ),
    "grid": Verb(
        "experiment",
        "local parameter grid (--param model.pieg.eta=0.01,0.05): table + plots",
        handler=front_verbs.cmd_grid,
        arguments=front_verbs.grid_args,
        description="Run every combination of --param values x --shots x seeds 0..N-1 (fit + "
        "test), then write grid.md, grid.csv and grid_<param>.png into --out. Further "
        "--model.* / --data.* / --trainer.* arguments override the YAMLs.",
    ),
    "sweep-run": Verb(
        "experiment",
        "one fit + test of a W&B sweep configuration (used by experiments/sweeps/)",
        handler=front_verbs.cmd_sweep_run,
        arguments=front_verbs.sweep_run_args,
        description="Fit then test one configuration in-process and log it (W&B by default; "
        "offline unless WANDB_MODE=online). The sweep's ${args} (--model.pieg.eta=0.01 ...) are "
        "LightningCLI overrides. Writes <out>/<group>/<overrides>/seed<i>/.",
    ),
    "predict": Verb(
        "other",
        "anomaly maps for new images from a checkpoint",
        module="pathoscope.app.predict.run",
    ),
    "export": Verb(
        "other",
        "an ONNX file of a checkpoint's folded detector, preprocessing and tau as metadata",
        module="pathoscope.app.export",
    ),
    "bench": Verb("other", "speed and cost benchmarks", module="pathoscope.app.bench.run"),
    "make-demo-data": Verb(
        "other",
        "write a synthetic BraTS / ChestX-ray8 set in the real on-disk format",
        handler=front_verbs.cmd_make_demo_data,
        arguments=front_verbs.make_demo_data_args,
        description="Write a synthetic BraTS2020 (NIfTI) or ChestX-ray8 (PNG + CSV) set, large "
        "enough for the dataset's default protocol (train --dataset D runs on it), and print the "
        "folder to give as --data.root.",
    ),
    "show-data": Verb(
        "other",
        "PNG grid of the training, synthetic-lesion and test images of a config",
        handler=front_verbs.cmd_show_data,
        arguments=front_verbs.show_data_args,
        description="Build the data module of the YAMLs' data sections (plus --data.* "
        "overrides, e.g. --data.root DIR) and write a grid: augmented training images, the "
        "same with synthetic lesions (outlined), test images with their gt_mask outlined.",
    ),
    "embeddings": Verb(
        "figures",
        "t-SNE of normal, pathological, PiEG and Gaussian embeddings of a trained run,\n"
        "and how close PiEG's lie to real pathology",
        module="pathoscope.app.embeddings",
    ),
    "maps": Verb(
        "figures",
        "anomaly maps of a few fixed test slices across the configs and K of a runs folder",
        module="pathoscope.app.maps",
    ),
}


def _help() -> str:
    """`pathoscope --help`: the usage line, then the verbs of VERBS by group."""
    lines = [_USAGE]
    for group, heading in GROUPS.items():
        lines.append(heading)
        for name, verb in VERBS.items():
            if verb.group == group:
                first, *more = verb.summary.splitlines()
                lines.append(f"  {name:<16}{first}")
                lines += [" " * 18 + line for line in more]
        lines.append("")
    return "\n".join(lines[:-1]) + "\n"


def _front_parser() -> argparse.ArgumentParser:
    """The parser of the verbs with a handler here."""
    parser = argparse.ArgumentParser(prog="pathoscope", add_help=False)
    sub = parser.add_subparsers(dest="verb")
    for name, verb in VERBS.items():
        if verb.handler is not None and verb.arguments is not None:
            p = sub.add_parser(name, help=verb.summary, description=verb.description)
            verb.arguments(p)
            p.set_defaults(handler=verb.handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `pathoscope` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_help(), end="")
        return 0 if argv else EXIT_USAGE
    verb = argv[0]
    from pathoscope.app.cpu import keep_freed_memory

    keep_freed_memory()  # speed only (pathoscope.app.cpu)
    if "WANDB_SWEEP_ID" not in os.environ:  # W&B never blocks: offline unless asked (or an agent)
        os.environ.setdefault("WANDB_MODE", "offline")
    try:
        entry = VERBS.get(verb)
        if entry is None:
            print(
                f"pathoscope: error: unknown verb {verb!r} (see pathoscope --help)", file=sys.stderr
            )
            return EXIT_USAGE
        if entry.group == "lightning":
            return _run_lightning(argv)
        if entry.module is not None:
            return _dispatch_module(entry.module, verb)(argv[1:])
        args, extra = _front_parser().parse_known_args(argv)
        return int(args.handler(args, extra))
    except SystemExit as exc:  # argparse / jsonargparse --help and usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE)
    except KeyboardInterrupt as exc:
        why = f": {exc}" if str(exc) else ""
        print(f"pathoscope {verb}: interrupted{why}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        err = _reason(err)
        if not isinstance(err, _error_types()) and not _is_argument_error(err):
            raise
        print(f"pathoscope {verb}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE


def _reason(err: Exception) -> Exception:
    """The user error behind `err`: jsonargparse reports a class that refused its arguments as
    "Does not validate against any of the Union subtypes ...", raised from the class's own error
    (e.g. "shots must be >= 1, got 0"), which is the one to show."""
    cause = err.__cause__
    while isinstance(cause, _error_types()):
        err, cause = cause, cause.__cause__
    return err


def _is_argument_error(err: BaseException) -> bool:
    return isinstance(err, argparse.ArgumentError) or type(err).__name__ == "ArgumentError"


def _one_line(err: BaseException) -> str:
    """The message of `err` on one line (jsonargparse nests reasons over several lines)."""
    text = str(err)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " | ".join(lines[:3]) if lines else type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
