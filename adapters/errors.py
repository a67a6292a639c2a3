"""Failures of adaptation a user can cause or act on; each message is one line saying what to do next."""
from storage.errors import EmberError, InvalidInput

__all__ = ["AdapterInvalid", "AdapterMismatch", "BudgetExhausted", "NotEnoughData", "TrainingUnavailable",
           "InvalidInput", "UnsupportedLayout", "BudgetUnmet"]


class AdapterInvalid(EmberError):
    """A file that is not an adapter llama.cpp can apply (missing, corrupt, wrong kind)."""


class AdapterMismatch(EmberError):
    """An adapter trained for another architecture or another base model."""


class BudgetExhausted(EmberError):
    """A run would spend more privacy budget (ε) than the user allows."""


class NotEnoughData(EmberError):
    """The log holds too little the user wrote or approved to learn from."""


class TrainingUnavailable(EmberError):
    """A training method or its libraries are not available on this machine."""


class UnsupportedLayout(EmberError):
    """A model whose blocks `ember compress` cannot measure or rewrite (another architecture, biases...)."""


class BudgetUnmet(EmberError):
    """A compression budget (`--size`, `--max-kl`) no assignment of the candidate types can meet."""

    exit_code = 2
