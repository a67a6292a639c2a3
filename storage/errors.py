"""Failures a user can cause or fix. Each message is one line that says what to do next.

`EmberError` lives here, in the lowest package, so that every layer can raise a user-facing error
without importing upwards; the CLI and the TUI catch it once, at their edge.
"""


class EmberError(Exception):
    """A failure the user can act on; `str(err)` is the one line shown to them."""

    exit_code = 1


class DataDirError(EmberError):
    """The data directory cannot be created, read or written."""


class DatabaseLocked(EmberError):
    """Another process holds a lock on the database for longer than we wait."""


class DatabaseCorrupt(EmberError):
    """The database file exists but is not a usable SQLite database."""


class NotFound(EmberError):
    """A conversation or message id that does not exist."""


class InvalidInput(EmberError):
    """Input from the user that Ember cannot use (empty, not UTF-8, out of range)."""

    exit_code = 2
