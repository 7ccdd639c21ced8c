"""`UserError`: a problem the user can fix (bad input, config, path or run directory), and `cli`, the one place
that turns it into a CLI's exit.

Raise a UserError (or a subclass: DataError, ConfigError, RunError, WeightsError, ConvertError) with one line that names the
problem and the fix; each command's `main` is wrapped in `cli(prog)`, which ends it with that line on stderr and
a non-zero exit status, without a traceback. So does a full disk, which the user fixes too. Everything else still
raises: it is a bug, and the traceback helps.
"""
from __future__ import annotations

import errno
import functools
from typing import Callable


class UserError(Exception):
    """A problem the user can fix; the message names it and the fix."""


class WeightsError(UserError, ValueError):
    """A weights file or model directory that cannot be loaded into the configured model."""


def disk_full(e: BaseException) -> bool:
    """An OSError ENOSPC, or a library's wrapped form of it (safetensors: "No space left on device (os error 28)")."""
    return (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e)


def cli(prog: str) -> Callable:
    """Decorator for a command's `main`: a UserError becomes SystemExit("<prog>: error: <message>") (status 1)."""

    def wrap(main: Callable) -> Callable:
        @functools.wraps(main)
        def run(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except UserError as e:
                raise SystemExit(f"{prog}: error: {e}") from None
            except Exception as e:
                if not disk_full(e):
                    raise
                raise SystemExit(
                    f"{prog}: error: no space left on the device ({e}). Free space or write elsewhere (--out), then "
                    "run again; files written before are intact (megl replaces files through temporary copies), and "
                    "a training run continues with --resume RUN_DIR") from None

        return run

    return wrap


__all__ = ["UserError", "WeightsError", "cli", "disk_full"]
