"""The user-error family: mistakes in what a user gave us (a config, a data file, a model name, a path).

`bmr` catches `UserError` once and prints it as one line (`bmr CMD: error: MESSAGE`, exit code 2); every other
exception is a bug and keeps its traceback. Messages start with where the mistake is: `path:line:` for files,
the parameter path (`train.lr`) for configs, and say what would be accepted.

Each class also derives from the builtin it replaces (ValueError, FileNotFoundError) so code written against
those keeps working.
"""
from __future__ import annotations


class UserError(Exception):
    """Base class: bad input a user can fix. Printed as one line by `bmr`."""


class ConfigError(UserError, ValueError):
    """A config value or command-line option is invalid; the message names the parameter path."""


class DataFormatError(UserError, ValueError):
    """A data file is malformed; the message starts with `path:line:`."""


class ModelSourceError(UserError, ValueError):
    """A model name, folder or file cannot be used (unknown name, missing config.json, pickle weights)."""


class InputPathError(UserError, FileNotFoundError):
    """A path given on the command line or in a config does not exist or is not what is needed."""


class OutputPathError(UserError, OSError):
    """An output path cannot be written (exists, read-only, not a folder)."""


class OutputExistsError(OutputPathError, FileExistsError):
    """An output folder already holds results (merges and exports never overwrite)."""


class MissingEntryError(UserError, KeyError):
    """A tensor, leaf or subtree a model or checkpoint should have is not there; the message names it."""

    def __str__(self):  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


class ModelFileNotFound(ModelSourceError, FileNotFoundError):
    """A model, checkpoint or run folder lacks a file it needs (config.json, weights, a checkpoint)."""
