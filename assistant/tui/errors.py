"""Errors the user can cause, inside the app: a notification, never a crash."""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

from assistant.errors import EmberError


def shows_errors(fn: Callable) -> Callable:
    """Catch `EmberError` from a handler of a widget or screen and show it as a notification."""
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def async_wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return await fn(self, *args, **kwargs)
            except EmberError as err:
                self.notify(str(err), severity="error", timeout=8)
                return None
        return async_wrapper

    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except EmberError as err:
            self.notify(str(err), severity="error", timeout=8)
            return None
    return wrapper
