"""The one error every data module raises for input it cannot use (the bottom of data/)."""

from __future__ import annotations


class DataError(ValueError):
    """A dataset that cannot be used, with the file and row that are wrong."""
