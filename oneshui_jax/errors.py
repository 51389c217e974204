"""Errors that users see: one clear message naming the file or setting and what was expected."""


class DataError(ValueError):
    """A data directory, annotation file, image or record is missing or malformed.

    The message names the path (and line, where there is one) and the layout that was expected.
    """


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the setting and what was expected."""


class CheckpointError(ValueError):
    """A checkpoint is missing, foreign, corrupt or does not match the request.

    The message names the path and what was expected there; an underlying orbax / tensorstore
    error, if any, is kept as ``__cause__``.
    """
