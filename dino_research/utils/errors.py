"""User errors: what a tool reports as one message instead of a traceback.

A :class:`UserError` is a problem the user fixes (a config value, a file, a folder, another run
holding the output folder); its message names the file, key or value and the fix. The command-line
tools catch exactly these (:func:`report_user_errors`), print the message on stderr, copy it to the
run's log files, and exit with :data:`USER_ERROR_EXIT`. Every other exception is a bug and keeps its
traceback (also copied to the log files). ``--debug`` or ``DINO_RESEARCH_DEBUG=1`` shows the
traceback of user errors too.

Spawned workers (``--num-gpus N``) report their own user error and exit with
:data:`USER_ERROR_EXIT`; the launcher recognises that exit code and exits with it quietly, so the
message is printed once, not buried under the launcher's traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
from typing import Iterator

__all__ = ["USER_ERROR_EXIT", "DEBUG_ENV", "UserError", "debug_enabled", "log_to_files", "report_user_errors"]

# Exit status of a tool stopped by a user error (argparse uses 2 for bad arguments: the same family).
USER_ERROR_EXIT = 2
# Environment variable that makes user errors show their traceback (inherited by spawned workers).
DEBUG_ENV = "DINO_RESEARCH_DEBUG"


class UserError(Exception):
    """An error the user fixes; its message names what is wrong and the fix (no traceback needed)."""


def debug_enabled() -> bool:
    """Whether ``--debug`` / ``DINO_RESEARCH_DEBUG`` asks for tracebacks of user errors."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def log_to_files(level: int, message: str, name: str = "dino_research") -> None:
    """Write ``message`` to the log *files* of logger ``name`` only (the console already shows it)."""
    logger = logging.getLogger(name)
    record = logger.makeRecord(name, level, "(tool)", 0, message, None, None)
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


@contextlib.contextmanager
def report_user_errors(rank: int = 0) -> Iterator[None]:
    """Turn a :class:`UserError` into one message and ``SystemExit(USER_ERROR_EXIT)``.

    The message goes to stderr (on ``rank`` 0 only: every rank usually meets the same error) and to
    this process's log files. Any other exception is logged with its traceback to the log files and
    re-raised unchanged. With :func:`debug_enabled`, user errors are re-raised too.
    """
    try:
        yield
    except UserError as e:
        log_to_files(logging.ERROR, f"{type(e).__name__}: {e}")
        if debug_enabled():
            raise
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
            print(f"(set {DEBUG_ENV}=1 or pass --debug for the traceback)", file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR_EXIT) from None
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as e:
        log_to_files(logging.ERROR, "fatal error:\n" + "".join(traceback.format_exception(e)).rstrip())
        raise
