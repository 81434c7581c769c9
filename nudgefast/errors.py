"""User mistakes, told apart from bugs, and the one place that turns them into a one-line error.

A *user error* is something the person running nudgefast can fix by changing what they asked for:
a bad path or file, a value out of range, a device this machine lacks, an optional package that is
not installed. Code that detects one raises `UserError` (or a subclass that also keeps its familiar
built-in type: `ConfigError` is a ValueError, `MissingPackage` a ModuleNotFoundError, `BadPath` a
FileNotFoundError), so library callers can still catch what they caught before.

`run_command(fn, argv)` is the single place every command line entry (generate, convert, bench,
serve) goes through: a UserError becomes `nudgefast: error: <message>` on stderr and exit status 2;
anything else is a bug and keeps its traceback. `NUDGEFAST_TRACEBACK=1` shows the traceback of a
user error too. `ArgumentParser` reports bad options the same way (one line, status 2, instead of
argparse's usage block).

This module imports nothing from nudgefast (and torch only inside check_device), so any module can
use it.
"""
from __future__ import annotations

import argparse
import os
import sys

PROG = "nudgefast"
EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake in what the user asked for; the message says what is wrong and how to fix it."""


class BadValue(UserError, ValueError):
    """An option or argument with a value nudgefast cannot use."""


class BadPath(UserError, FileNotFoundError):
    """A path the user gave that does not exist or is not what it should be."""

    def __str__(self) -> str:  # FileNotFoundError(msg) would print as "[Errno ...]" with more args
        return self.args[0] if self.args else ""


class PathExists(UserError, FileExistsError):
    """An output path the user gave that is already taken."""

    def __str__(self) -> str:
        return self.args[0] if self.args else ""


class MissingPackage(UserError, ModuleNotFoundError):
    """An optional package that a requested feature needs is not installed."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors raised as UserError: one line and status 2 through run_command,
    instead of the usage block argparse prints on its own (and a SystemExit a caller cannot tell
    from a finished command)."""

    def error(self, message):
        raise BadValue(f"{self.prog}: {message} (see {self.prog} --help)")


def check_device(device: str):
    """torch.device(device), refusing names torch does not know and devices this machine lacks
    (the common case: --device cuda with a CPU-only torch build)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise BadValue(f"unknown device {device!r}; use cpu or cuda (cuda:N for one GPU)") from None
    if dev.type == "cuda":
        if torch.version.cuda is None:
            raise BadValue(f"--device {device}: this torch ({torch.__version__}) is a CPU-only build, so no CUDA "
                           "device can be used; install a CUDA build of torch (e.g. TORCH_SPEC='torch --index-url "
                           "https://download.pytorch.org/whl/cu128' bash scripts/install.sh) or use --device cpu")
        if not torch.cuda.is_available():
            raise BadValue(f"--device {device}: torch {torch.__version__} was built with CUDA {torch.version.cuda} "
                           "but sees no CUDA device (no GPU, or its driver is missing); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BadValue(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type != "cpu":
        raise BadValue(f"--device {device}: nudgefast runs on cpu or cuda, not {dev.type}")
    return dev


def format_error(error: BaseException) -> str:
    """The one line a user error prints (no newline inside it: the first line of the message)."""
    text = " ".join(str(error).split("\n")).strip() or type(error).__name__
    return f"{PROG}: error: {text}"


def run_command(fn, *args) -> int:
    """fn(*args) -> exit status, with user errors reported as one line and status 2."""
    try:
        return fn(*args)
    except UserError as e:
        if os.environ.get("NUDGEFAST_TRACEBACK") == "1":
            raise
        print(format_error(e), file=sys.stderr)
        return EXIT_USER_ERROR
