"""Ember's storage: the only package that speaks SQL. It imports nothing from `assistant` or `adapters`."""
from storage import driver as _driver  # noqa: F401  (registers the SQLite driver before sqlite-utils loads)
