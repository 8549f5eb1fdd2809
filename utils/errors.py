"""The project's user errors: what was given (a flag, a file, the data) cannot be used.

A stage prints such an error as one ``error: ...`` line and exits with status 2
(``utils.runtime.fail_cleanly``); every other exception is a defect and keeps its traceback.
"""


class BasqError(Exception):
    """Something the user gave cannot be used; the message names it and says why."""


class UsageError(BasqError):
    """A flag, or a file named by one, that cannot be used."""


class CheckpointError(BasqError):
    """A checkpoint file that cannot be used."""


class DataError(BasqError):
    """Data that cannot be used: a missing or malformed dataset folder."""
