"""Ember's storage: the only package that speaks SQL. It imports nothing from `assistant` or `adapters`."""
