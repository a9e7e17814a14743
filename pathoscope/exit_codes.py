"""The exit statuses of every `pathoscope` verb (README.md, "Exit codes"): one convention that
scripts can test, whichever verb they run.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

EXIT_OK = 0  # everything asked for is done, "already complete, nothing left to do" included
EXIT_FAILURE = 1  # an unexpected failure (a bug, a full disk): not the input's fault
EXIT_USAGE = 2  # a usage or input error: one line on stderr, nothing done (argparse's code)
EXIT_PARTIAL = 3  # done, but some inputs were skipped: the summary line names them
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, what shells report)

NAMES_SHOWN = 5  # inputs named on a summary line; the files the line points to hold them all


def name_list(names: list[str]) -> str:
    """'a, b, c' with at most NAMES_SHOWN names, then '... (N in all)'."""
    shown = ", ".join(names[:NAMES_SHOWN])
    return shown if len(names) <= NAMES_SHOWN else f"{shown}, ... ({len(names)} in all)"


def partial_exit(verb: str, skipped: Mapping[str, str], what: str, where: str) -> int:
    """EXIT_PARTIAL with one stderr line naming the `skipped` inputs ({name: reason}, `what` they
    are: "subject(s)") and `where` their reasons are recorded; EXIT_OK when none were skipped."""
    if not skipped:
        return EXIT_OK
    print(
        f"pathoscope {verb}: done, but {len(skipped)} {what} skipped: "
        f"{name_list(sorted(skipped))} (the reasons are in {where}; exit status {EXIT_PARTIAL})",
        file=sys.stderr,
    )
    return EXIT_PARTIAL
