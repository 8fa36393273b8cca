"""Where log records go: library code logs through `logging.getLogger(__name__)`; entry points
(the CLI, `python -m asyncps.ps.server`) call `configure` once."""
from __future__ import annotations

import logging
import sys


def configure(role_process: bool) -> None:
    """A role process (ps, worker, chief) logs INFO and up to stdout (its log file under
    `launch` or compose) with the time; a user's command shows only warnings, on stderr, next to
    its own output."""
    if role_process:
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname).1s %(message)s",
                            datefmt="%H:%M:%S", force=True)
    else:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s", force=True)
