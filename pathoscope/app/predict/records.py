"""predictions.csv: one row per input of `pathoscope predict`, kept across runs into one folder.

Columns: `input`; `score` and `pathological` (empty for a skipped input); `scored_slices`
(volumes); `checkpoint` (the file as given), `checkpoint_sha256` (the first 16 hex digits of its
SHA-256) and `options` (the options that change the outputs, e.g. "--slices 70:71"; empty for the
defaults), which say what made the row; `skipped` (why the input was not processed; empty when it
was); then one column per output file (anomaly_map, pred_mask, scores, montage / overlay).

An input is DONE when its row has a score, was made by the same checkpoint contents and options,
and every output file it names exists: the same command leaves it alone. A skipped input's row
never replaces the row of a processed one (its files are still there).
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pathoscope.app.predict.volumes import Slices

log = logging.getLogger(__name__)

SUMMARY_CSV = "predictions.csv"
RUN_FIELDS = ("checkpoint", "checkpoint_sha256", "options")  # what made a row
# Every column that does not name an output file.
ROW_FIELDS = ("input", "score", "pathological", "scored_slices", *RUN_FIELDS, "skipped")
SHA_DIGITS = 16  # a prefix is enough to tell checkpoints apart; the full hash is noise here


def run_fields(ckpt_path: str | Path, options: str) -> dict[str, str]:
    """The RUN_FIELDS of this run: the checkpoint as given, its contents' hash, the options."""
    digest = hashlib.sha256()
    with open(Path(ckpt_path).expanduser(), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {
        "checkpoint": str(ckpt_path),
        "checkpoint_sha256": digest.hexdigest()[:SHA_DIGITS],
        "options": options,
    }


def output_options(slices: Slices, channel: int | None) -> str:
    """The options that change a volume's outputs, as the command line spells them."""
    parts = []
    if slices is not None:
        parts.append("--slices " + ("all" if slices == "all" else f"{slices[0]}:{slices[1]}"))
    if channel is not None:
        parts.append(f"--channel {channel}")
    return " ".join(parts)


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)


def _outputs(row: dict[str, Any]) -> set[str]:
    return {v for k, v in row.items() if k not in ROW_FIELDS and v}


def done_inputs(out_dir: Path, rows: Iterable[dict[str, str]], made_by: dict[str, str]) -> set[str]:
    """The inputs whose rows say they are done by a run with the fields `made_by` (module
    docstring)."""
    return {
        r["input"]
        for r in rows
        if r.get("score")
        and not r.get("skipped")
        and all(r.get(k) == v for k, v in made_by.items() if k != "checkpoint")
        and all((out_dir / name).is_file() for name in _outputs(r))
    }


def with_row(rows: list[dict[str, str]], row: dict[str, Any], path: Path) -> list[dict[str, Any]]:
    """`rows` with the processed input's `row` added: it replaces the earlier row of its input,
    and an earlier row of another input naming one of its output files is dropped (that file is
    now this input's, e.g. x.png's overlay replacing x.jpg's with --overwrite)."""
    outputs = _outputs(row)
    kept = []
    for r in rows:
        if r.get("input") == row["input"]:
            continue
        taken = outputs & _outputs(r)
        if taken:
            log.warning(
                "%s: row of %s removed: %s now holds the outputs of %s",
                path,
                r.get("input"),
                sorted(taken)[0],
                row["input"],
            )
            continue
        kept.append(r)
    return [*kept, row]


def with_skipped(
    rows: list[dict[str, str]], skipped: list[tuple[str, str]], made_by: dict[str, str]
) -> list[dict[str, Any]]:
    """`rows` with a row for each skipped (input, reason), replacing an earlier skipped row of the
    same input but never the row of a processed one."""
    processed = {r["input"] for r in rows if not r.get("skipped")}
    new = {
        entry: {"input": entry, "score": "", "pathological": "", **made_by, "skipped": reason}
        for entry, reason in skipped
        if entry not in processed
    }
    return [*(r for r in rows if r["input"] not in new), *new.values()]
