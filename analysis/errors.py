"""The one base class for bad user input.

Every error that a user's mistake causes (a missing file, a bad field, a policy for another
model) derives from ``InputError``; the command line turns exactly these into one line and
exit code 2. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class InputError(ValueError):
    """Bad input; the message names the file or field."""


class ModelError(InputError):
    """A model that cannot be loaded or analysed; the message names the file or field."""
