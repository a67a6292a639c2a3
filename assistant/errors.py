"""User-facing errors of the assistant layer (the base type lives in `storage.errors`)."""
from storage.errors import DatabaseCorrupt, DatabaseLocked, DataDirError, EmberError, InvalidInput, NotFound

__all__ = ["EmberError", "DataDirError", "DatabaseLocked", "DatabaseCorrupt", "NotFound", "InvalidInput",
           "ModelNotFound", "ModelInvalid", "EngineCrashed", "PromptTooLong", "RouteUnavailable", "ConfigError"]


class ModelNotFound(EmberError):
    """The GGUF model file does not exist."""


class ModelInvalid(EmberError):
    """The path exists but is not a GGUF model llama.cpp can load."""


class EngineCrashed(EmberError):
    """llama.cpp crashed or failed in the self-check's test decode (a bad build, a CPU feature, a bad GGUF)."""


class PromptTooLong(EmberError):
    """The newest message alone does not fit in the model's context with room for a reply."""

    exit_code = 2


class RouteUnavailable(EmberError):
    """A route was asked for whose parts (memory, adapter) do not exist yet."""

    exit_code = 2


class ConfigError(EmberError):
    """The config file or an environment variable holds a value Ember cannot use."""

    exit_code = 2
