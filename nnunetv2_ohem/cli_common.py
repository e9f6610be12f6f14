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

import argparse
import os
import signal
import sys
import textwrap
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


_HANDLER_PID: Optional[int] = None


def _raise_terminated(signum, frame):  # pragma: no cover - exercised through subprocess tests
    if os.getpid() != _HANDLER_PID:
        # a forked child inherited the handler (nnU-Net's fork Pools stop their workers with SIGTERM):
        # die as by default, or the pool's shutdown waits forever for a worker that raised instead
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    raise Terminated()


def _block_sigterm() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})


def _unblock_sigterm() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def _default_sigterm_in_child() -> None:
    try:
        if signal.getsignal(signal.SIGTERM) is _raise_terminated:  # a handler restored by run_cli is kept
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    except ValueError:  # pragma: no cover - forked from another thread: _raise_terminated's pid check applies
        pass
    _unblock_sigterm()


def install_sigterm_handler() -> None:
    """Make SIGTERM raise :class:`Terminated` in the main thread (no-op outside it).

    Forked children (multiprocessing's fork Pools, which stop their workers with SIGTERM) must die of it as by
    default. SIGTERM is blocked across ``fork()`` and the child restores the default action before unblocking:
    a SIGTERM that reached a worker while it was being forked would otherwise be lost (Python clears pending
    signal flags in a new child) and the pool's shutdown would wait for that worker forever.
    """
    global _HANDLER_PID
    try:
        if _HANDLER_PID is None:
            os.register_at_fork(before=_block_sigterm, after_in_parent=_unblock_sigterm,
                                after_in_child=_default_sigterm_in_child)
        _HANDLER_PID = os.getpid()
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


# ------------------------------------------------------------------------------------------ shared options

def positive_int(text: str) -> int:
    """argparse type for counts such as ``-np``: an integer >= 1 (0 and negatives are usage errors)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def show_progress(no_progress: bool, stream=None) -> bool:
    """Progress bars are drawn on a terminal only (stderr a TTY) and never with ``--no_progress``."""
    stream = sys.stderr if stream is None else stream
    return not no_progress and bool(getattr(stream, "isatty", lambda: False)())


def add_deprecated_alias(parser, old: str, new: str) -> None:
    """Keep a former spelling ``old`` of the option ``new`` working, hidden from ``--help``.

    Using it prints one note on stderr and then acts exactly like ``new`` (same type, choices, nargs).
    Not for required options: argparse would still ask for ``new``.
    """
    target = next((a for a in parser._actions if new in a.option_strings), None)
    if target is None or target.required:
        raise ValueError(f"{new}: no such optional option to alias as {old}")

    class _Alias(argparse.Action):
        def __call__(self, p, namespace, values, option_string=None):
            print(f"{p.prog}: note: {option_string} is deprecated, use {new}", file=sys.stderr)
            target(p, namespace, values, new)

    parser.add_argument(old, action=_Alias, dest=target.dest, nargs=target.nargs, type=target.type,
                        choices=target.choices, metavar=target.metavar, default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """The ``formatter_class`` of every ``nnunetv2_ohem_*`` parser: each option's default after its help
    (unless the text states it, or there is none: a required option, an off switch, an empty list);
    descriptions wrapped per paragraph, paragraphs of indented lines (examples) kept as written."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if "default" in text or action.required or d is None or d is False or d == argparse.SUPPRESS or d == []:
            return text
        return super()._get_help_string(action)

    def _fill_text(self, text, width, indent):
        out = []
        for par in textwrap.dedent(text).strip("\n").split("\n\n"):
            if all(line.startswith(" ") for line in par.splitlines() if line.strip()):
                out.append("\n".join(indent + line for line in par.splitlines()))
            else:
                out.append(textwrap.fill(" ".join(par.split()), width, initial_indent=indent,
                                         subsequent_indent=indent))
        return "\n\n".join(out)
