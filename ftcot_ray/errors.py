"""The project's own error types: what the CLI turns into a one-line message and exit code 2.

Everything else (a KeyError in our code, a bug in a library) keeps its traceback. Each type also
subclasses the builtin it replaces, so callers that caught ValueError / FileNotFoundError still do.
"""

from __future__ import annotations


class FtcotError(Exception):
    """A problem the user can fix; the message names what is wrong and where (file:line, key, folder)."""


class ConfigError(FtcotError, ValueError):
    """A config problem, with the offending key path or file in the message."""


class InputFileError(FtcotError, ValueError):
    """A malformed input file; the message names the file, the line or record, and the reason."""


class InputMissing(FtcotError, FileNotFoundError):
    """A file or folder the user named (or the config implies) does not exist."""


class StageInputMissing(FtcotError, RuntimeError):
    """A stage's input folder is absent, unfinished, or no longer what its manifest vouches for."""


class DataError(FtcotError, ValueError):
    """The data cannot be used as asked (nothing to train on, a D above what was sampled, ...)."""


class TeacherSetupError(FtcotError, ValueError):
    """The teacher cannot be used at all (bad key, unreachable endpoint, missing variable): fail fast."""


class RunDirError(FtcotError, PermissionError):
    """The run folder cannot be written."""
