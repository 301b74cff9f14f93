"""What every command-line tool of the project shares (issue 26): bad input is one ``error:`` line on stderr and exit
status 2, never a traceback; an output file that cannot be written is such bad input, named."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from utils.errors import UserError


class ToolError(UserError):
    """A tool's bad argument, missing input or unwritable output; the message names it and what to do."""


def run_tool(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> int:
    """``main(argv)``'s exit status; a :class:`UserError` (a config, data, weights or output problem) becomes one
    ``error: <message>`` line on stderr and exit status 2."""
    try:
        return main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def write_output(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (UTF-8), creating its folder.

    Raises:
        ToolError: the folder or file cannot be written (read-only, a file in the way, full disk), naming it.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise ToolError(f"cannot write {path} ({exc.strerror or exc}); is the folder writable and the disk not "
                        "full?") from None
