"""Logging setup: a compact console on the main rank, a full log file on every rank.

Nothing here patches ``print`` or filters warnings: other ranks keep their stdout, and Python warnings
are routed into the same log (console on rank 0, file on every rank) instead of being hidden.
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["setup_logger"]

# Attribute set on the handlers we own, so a second call can find and replace exactly those.
_OWNED = "_dino_research_handler"


class _CompactFormatter(logging.Formatter):
    """``[MM/DD HH:MM:SS name]: msg``; WARNING and above get a level prefix (in colour on a terminal)."""

    _COLOURS = {logging.WARNING: "\x1b[33m", logging.ERROR: "\x1b[31m", logging.CRITICAL: "\x1b[41m"}

    def __init__(self, colour: bool = False):
        super().__init__("[%(asctime)s %(name)s]: %(message)s", datefmt="%m/%d %H:%M:%S")
        self._colour = colour

    def formatMessage(self, record: logging.LogRecord) -> str:
        msg = super().formatMessage(record)
        if record.levelno < logging.WARNING:
            return msg
        prefix = record.levelname
        if self._colour:
            colour = self._COLOURS[max(k for k in self._COLOURS if k <= record.levelno)]
            prefix = f"{colour}{prefix}\x1b[0m"
        head, sep, body = msg.partition("]: ")
        return f"{head}{sep}{prefix} {body}"


def _replace_owned_handlers(logger: logging.Logger, handlers: list[logging.Handler]) -> None:
    for h in [h for h in logger.handlers if getattr(h, _OWNED, False)]:
        logger.removeHandler(h)
        h.close()
    for h in handlers:
        logger.addHandler(h)


def setup_logger(
    output_dir: str | None,
    rank: int = 0,
    name: str = "dino_research",
    capture_warnings: bool = True,
) -> logging.Logger:
    """Configure and return ``logging.getLogger(name)``.

    - rank 0: INFO and above to stdout, in the compact format;
    - every rank: DEBUG and above to ``output_dir/log.txt`` (rank 0) or ``output_dir/log_rank{rank}.txt``
      (appended, so a resumed run continues its log); no file when ``output_dir`` is None.

    Idempotent: calling again replaces the handlers this function added (e.g. to point at another
    ``output_dir``) instead of adding duplicates. The logger does not propagate to the root logger, so a
    root handler installed by some library cannot print every line twice. With ``capture_warnings``,
    ``warnings.warn`` messages go through the ``py.warnings`` logger into the same handlers.
    """
    logger = logging.getLogger(name)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False

    handlers: list[logging.Handler] = []
    if rank == 0:
        console = logging.StreamHandler(sys.stdout)
        console.setLevel(logging.INFO)
        console.setFormatter(_CompactFormatter(colour=sys.stdout.isatty()))
        handlers.append(console)
    if output_dir is not None:
        os.makedirs(output_dir, exist_ok=True)
        filename = "log.txt" if rank == 0 else f"log_rank{rank}.txt"
        file_handler = logging.FileHandler(os.path.join(output_dir, filename), mode="a", encoding="utf-8")
        file_handler.setLevel(logging.DEBUG)
        file_handler.setFormatter(_CompactFormatter(colour=False))
        handlers.append(file_handler)
    for h in handlers:
        setattr(h, _OWNED, True)
    _replace_owned_handlers(logger, handlers)

    if capture_warnings:
        logging.captureWarnings(True)
        # The same handler objects: no second file descriptor on the same file, and closing is shared.
        _replace_owned_handlers(logging.getLogger("py.warnings"), handlers)
    return logger
