"""Ember: an on-device personal assistant. This package is what the user touches."""
# OpenMP's wait (a 300-round spin, then sleep) must be set before llama.cpp loads: adapters/__init__.py
# sets it, for every process that imports either package.
import adapters  # noqa: F401
# Ember's SQLite driver must be registered before anything imports sqlite_utils (storage/driver.py):
# importing `assistant.conversation` first used to fail with "import storage before sqlite_utils".
import storage  # noqa: F401

__version__ = "0.1.0"
