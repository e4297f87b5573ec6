"""The studio's exceptions. Every message names the file or field and the problem.

The one error contract: every failure a user can cause is a `StudioError`; the CLI prints it as
one line (`error: ...`, exit code 2) and the app shows the same text. Anything else is a bug.
"""


class StudioError(Exception):
    """Base class of every error the studio raises on purpose."""


class FormatError(StudioError):
    """A file is not a valid adapter file (bad bytes, bad header, bad shapes)."""


class UnsafeFileError(FormatError):
    """A file type that could execute code when loaded (pickle) was refused."""


class UnsupportedVariantError(FormatError):
    """A recognised adapter variant the studio does not convert (e.g. DoRA)."""


class KeyMismatchError(StudioError):
    """An adapter's keys do not fit the base model's module tree."""


class BaseNotFoundError(StudioError):
    """A BASE argument could not be resolved to a model."""


class ConfigError(StudioError):
    """A config or recipe file is invalid."""


class DatasetError(StudioError):
    """A training data folder has no usable image/caption pair."""


class PathError(StudioError):
    """A named file or folder is missing or of the wrong kind, or an output would replace an input."""


class LimitError(ConfigError):
    """A request is larger than a configured cap (pixels, steps, batch, memory estimate)."""


class DeviceError(ConfigError):
    """A device string is malformed, or names a device this machine does not have."""


class UsageError(StudioError):
    """A command line that cannot be parsed (unknown flag, missing argument, a word where a number goes)."""


class Interrupted(StudioError):
    """A job the user stopped on purpose (the app's Interrupt button); nothing it made is kept."""
