"""Errors that reach the user as one clear message (main.py prints them without a traceback)."""


class UserError(Exception):
    """Base class: bad input or a missing file the user must provide; the message says what to do."""


class ConfigError(UserError, ValueError):
    """An experiment config has an unknown key, a wrong type, or a value out of range."""


class DataNotFoundError(UserError, FileNotFoundError):
    """A data set is missing: the message names the data set, the path searched, the layout and the source."""


class WeightsNotFoundError(UserError, FileNotFoundError):
    """Pretrained weights cannot be obtained: the message says what to download and where to put it."""


class CheckpointError(UserError):
    """A checkpoint is truncated, foreign, or does not fit the run being resumed; the message names the file."""


class NonFiniteError(RuntimeError):
    """A loss or a solved head became NaN or infinite; the message names the task, epoch and step."""


class RunStopped(Exception):
    """The run stopped on purpose before its last task (``stop_after_task``); it can be resumed."""
