"""Typed errors for input a user can fix.

Every error here is a mistake in what the user gave (a recipe, a file, a flag), never a bug:
the CLI prints its message on one line and exits with code 2; the Python API raises it.
"""

import signal


class PyrosslError(Exception):
    """Bad input the user can fix. The message is one line that says what to do."""


class ConfigError(PyrosslError):
    """A recipe or override is malformed, names an unknown key, or has an invalid value."""


class DataError(PyrosslError):
    """A dataset file is missing, corrupt, or holds values the model cannot take."""


class DatasetNotFound(DataError):
    """No files for a dataset were found in any of the places searched."""


class CheckpointError(PyrosslError):
    """A checkpoint or run directory is missing, unsafe to load, or does not match the config."""


class TrainingError(PyrosslError):
    """Training cannot go on (for instance a non-finite loss); the message names the last good checkpoint."""


class TrainingInterrupted(PyrosslError):
    """Training stopped on request (Ctrl-C) after writing a checkpoint; the message says how to resume."""

    exit_code = 130

    @classmethod
    def by(cls, signum: int, rest: str) -> "TrainingInterrupted":
        """``interrupted[ by SIGNAME]<rest>``, exiting with 128 + the signal's number (the shell's convention:
        130 for SIGINT, 143 for SIGTERM)."""
        exc = cls(interrupted_by(signum) + rest)
        exc.exit_code = 128 + int(signum)
        return exc


class Interrupted(KeyboardInterrupt):
    """A signal stopped a command at once: Ctrl-C (SIGINT) as Python's own ``KeyboardInterrupt``, or
    SIGTERM (``kill``, a scheduler's time limit), which the CLI turns into this so that both end the
    same way: one line and exit code 128 + the signal's number. Files being written keep their
    previous content (every write is atomic)."""

    def __init__(self, signum: int):
        super().__init__()
        self.signum = int(signum)


def signal_of(exc: KeyboardInterrupt) -> int:
    """The signal that raised ``exc``: its ``signum`` (:class:`Interrupted`), SIGINT for Python's own."""
    return int(getattr(exc, "signum", signal.SIGINT))


def interrupted_by(signum: int) -> str:
    """The words every interruption message starts with: "interrupted", and " by SIGNAME" unless the
    signal is Ctrl-C's SIGINT."""
    return "interrupted" + ("" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}")


class WriteError(CheckpointError):
    """A file could not be written (a full disk, a read-only or vanished folder); ``errno`` keeps the
    operating system's code. The file's previous content is intact (every write is atomic)."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


class ProcessLost(PyrosslError):
    """Another process of a multi-process job ended while this one waited on it; nothing of the input
    was wrong, so the command exits with 1. The message names this process and the resume command."""

    exit_code = 1
