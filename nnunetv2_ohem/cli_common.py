"""One exit-code and interruption convention for every ``nnunetv2_ohem_*`` command.

Exit codes (documented in ``docs/cli.md``):

- ``0``   success;
- ``1``   bad data: a file or folder the user pointed at cannot be used (one line naming it and the reason);
- ``2``   usage: an unknown option, value or configuration (argparse's own convention);
- ``130`` interrupted by Ctrl-C (SIGINT), ``143`` terminated by SIGTERM (e.g. SLURM's time limit): cleanup ran,
  one line ``interrupted, nothing written`` on stderr.

SIGTERM is turned into :class:`Terminated`, a ``KeyboardInterrupt`` subclass, so the same ``with``/``finally``
blocks that clean up after Ctrl-C (temporary output folders, partial files) also run when a scheduler kills the
job. Torch-free and import-light so that ``--help`` stays fast.
"""
from __future__ import annotations

import signal
import sys
from typing import Callable, Optional, Sequence

EXIT_OK = 0
EXIT_BAD_DATA = 1
EXIT_USAGE = 2
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class UserError(Exception):
    """An error caused by the user's input, reported as one line; ``exit_code`` is 1 (data) or 2 (usage)."""

    exit_code = EXIT_BAD_DATA


class UsageError(UserError):
    """An unknown or invalid option value (exit code 2)."""

    exit_code = EXIT_USAGE


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM."""


def _raise_terminated(signum, frame):  # pragma: no cover - exercised through subprocess tests
    raise Terminated()


def install_sigterm_handler() -> None:
    """Make SIGTERM raise :class:`Terminated` in the main thread (no-op outside it)."""
    try:
        signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread (e.g. called from a test runner thread)
        pass


def run_cli(prog: str, main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None,
            known_errors: tuple = ()) -> int:
    """Run ``main(argv)`` under the convention above and return the exit code.

    ``known_errors`` are library exception types that mean bad data (exit 1), e.g. ``ConversionError``.
    Anything else propagates with its traceback: that is a bug, not a user error.
    """
    install_sigterm_handler()
    try:
        return int(main(argv) or 0)
    except Terminated:
        print(f"{prog}: terminated (SIGTERM), interrupted, nothing written", file=sys.stderr)
        return EXIT_SIGTERM
    except KeyboardInterrupt:
        print(f"{prog}: interrupted, nothing written", file=sys.stderr)
        return EXIT_SIGINT
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    except known_errors as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_BAD_DATA
