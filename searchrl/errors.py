"""Errors that users see. Each names where the problem is (file, row, field) and what to do.

Stages catch `SearchRLError` at their entry point and print `str(err)` (one clear paragraph) instead
of a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class SearchRLError(Exception):
    """Base class for errors caused by the user's input or environment, not by a bug."""


class ConfigError(SearchRLError):
    """params.yaml / preset problem: unknown key, wrong type, missing file."""


class InputError(SearchRLError):
    """A bad input file: names the file, the row (1-based line number) and the field."""

    def __init__(self, path, message: str, row: int | None = None, field: str | None = None,
                 fix: str | None = None):
        self.path, self.row, self.field, self.fix = str(path), row, field, fix
        where = self.path
        if row is not None:
            where += f", line {row}"
        if field is not None:
            where += f", field '{field}'"
        text = f"{where}: {message}"
        if fix:
            text += f" ({fix})"
        super().__init__(text)


class ModelNotFoundError(SearchRLError):
    """A model name that is neither an embedded alias, an existing local dir, nor loadable from a hub."""


class IndexCorruptedError(SearchRLError):
    """An index directory whose files do not match its manifest."""


class DataValidationError(SearchRLError):
    """A Great Expectations suite failed; the message summarises which expectations and examples."""


class TrackingError(SearchRLError):
    """The MLflow tracking server is unreachable or refuses us; the message names the URI."""
