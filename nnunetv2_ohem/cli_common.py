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
            known_errors: tuple = (), interrupted: str = "interrupted, nothing written") -> int:
    """Run ``main(argv)`` under the convention above and return the exit code.

    ``known_errors`` are library exception types that mean bad data (exit 1), e.g. ``ConversionError``.
    ``interrupted`` is the line's text after Ctrl-C/SIGTERM, for tools that keep finished work (a resumable demo).
    Anything else propagates with its traceback: that is a bug, not a user error.
    """
    previous = signal.getsignal(signal.SIGTERM)
    install_sigterm_handler()
    try:
        return int(main(argv) or 0)
    except Terminated:
        print(f"{prog}: terminated (SIGTERM), {interrupted}", file=sys.stderr)
        return EXIT_SIGTERM
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return EXIT_SIGINT
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    except known_errors as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_BAD_DATA
    finally:
        # in-process callers (tests, notebooks) get their SIGTERM handling back; processes forked later (e.g.
        # nnU-Net's fork pools, stopped by SIGTERM) must not inherit a handler that raises
        try:
            signal.signal(signal.SIGTERM, previous)
        except (ValueError, TypeError):  # not the main thread, or a handler not set from Python
            pass


def ignore_sigint() -> None:
    """Initializer for worker processes: ignore Ctrl-C, which a terminal sends to the whole process group.

    The main process handles it (and SIGTERM): it terminates its pool and then cleans up, so workers neither
    print tracebacks nor keep writing into a folder that is being removed.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def positive_int(text: str) -> int:
    """argparse type for counts such as ``-np``: an integer >= 1 (0 and negatives are usage errors)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value
