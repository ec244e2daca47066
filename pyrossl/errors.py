"""Typed errors for input a user can fix.

Every error here is a mistake in what the user gave (a recipe, a file, a flag), never a bug:
the CLI prints its message on one line and exits with code 2; the Python API raises it.
"""


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


class Interrupted(KeyboardInterrupt):
    """A signal stopped a command at once: Ctrl-C (SIGINT) as Python's own ``KeyboardInterrupt``, or
    SIGTERM (``kill``, a scheduler's time limit), which the CLI turns into this so that both end the
    same way: one line and exit code 128 + the signal's number. Files being written keep their
    previous content (every write is atomic)."""

    def __init__(self, signum: int):
        super().__init__()
        self.signum = int(signum)


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
