"""The studio's exceptions. Every message names the file or field and the problem."""


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
