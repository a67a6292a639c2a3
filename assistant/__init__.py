"""Ember: an on-device personal assistant. This package is what the user touches."""
__version__ = "0.1.0"
