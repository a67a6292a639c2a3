"""llama.cpp's own log: kept in memory for `ember doctor` and error messages, shown only when asked.

llama-cpp-python's `verbose=False` does not silence llama.cpp. Its callback (`llama_cpp/_logger.py`)
maps ggml's log levels with an older numbering (INFO=1, WARN=2, ERROR=3, DEBUG=4), while the
llama.cpp it ships numbers them DEBUG=1, INFO=2, WARN=3, ERROR=4. So every WARN line is taken for an
error and printed (e.g. "n_ctx_seq (4096) > n_ctx_train (2048) -- possible training context overflow"
in the middle of `ember ask` output), and real ERROR lines are taken for debug and dropped. Its
`suppress_stdout_stderr` covers only model and context creation. `install()` replaces that callback
for the whole process (llama.cpp has one log callback, shared with ggml).
"""
from __future__ import annotations

import collections
import ctypes
import sys
import threading
from typing import Any

# ggml_log_level in the llama.cpp that llama-cpp-python 0.3.x ships (ggml/include/ggml.h).
LEVELS = {0: "none", 1: "debug", 2: "info", 3: "warn", 4: "error", 5: "cont"}
CONT = 5
KEEP_LINES = 200


class LlamaLog:
    """The last lines llama.cpp logged (level, text), written through to stderr only when verbose."""

    def __init__(self, verbose: bool = False, keep: int = KEEP_LINES):
        self.verbose = verbose
        self.lines: collections.deque[tuple[str, str]] = collections.deque(maxlen=keep)
        self._partial = ""
        self._level = "info"
        self._lock = threading.Lock()
        self._callback: Any = None   # the ctypes thunk: must outlive every call llama.cpp makes into it

    def feed(self, level: int, text: str) -> None:
        """Take one piece of llama.cpp output; pieces join into lines (progress dots come as CONT)."""
        with self._lock:
            if level != CONT:
                self._level = LEVELS.get(level, "info")
            self._partial += text
            *done, self._partial = self._partial.split("\n")
            for line in done:
                if line.strip():
                    self.lines.append((self._level, line.rstrip()))
        if self.verbose:
            sys.stderr.write(text)
            sys.stderr.flush()

    def recent(self, n: int = 50, *, min_level: str = "debug") -> list[str]:
        """The last `n` lines at `min_level` or above, oldest first, as 'level: text'."""
        order = ["debug", "info", "warn", "error"]
        floor = order.index(min_level)
        with self._lock:
            kept = [(lv, t) for lv, t in self.lines if lv not in order or order.index(lv) >= floor]
        return [f"{lv}: {t}" for lv, t in kept[-n:]]

    def last_error(self) -> str | None:
        """llama.cpp's last warning or error line (e.g. why it refused a file), for a one-line message."""
        found = self.recent(1, min_level="warn")
        return found[0].split(": ", 1)[1] if found else None


_installed: LlamaLog | None = None


def install(verbose: bool = False) -> LlamaLog:
    """Route llama.cpp's log into memory for this process (to stderr too when `verbose`); idempotent.

    Call before loading any model; later calls only change `verbose`.
    """
    global _installed
    if _installed is not None:
        _installed.verbose = verbose
        return _installed
    import llama_cpp   # importing it installs llama-cpp-python's own callback, replaced below

    log = LlamaLog(verbose)
    feed = log.feed

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, _user_data: Any) -> None:
        # Called from native code, possibly while the interpreter shuts down: never let an exception
        # escape (ctypes would print it), and use only what the closure holds.
        try:
            feed(level, text.decode("utf-8", "replace") if text else "")
        except BaseException:   # noqa: BLE001 - nothing can be reported from inside a C callback
            pass

    log._callback = callback
    # The thunk is freed when its object is: a log line written during interpreter shutdown (a model
    # freed by a finaliser) would then jump into freed memory. One reference is leaked on purpose.
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(callback))
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    _installed = log
    return log


def current() -> LlamaLog | None:
    """The installed log, if `install()` was called in this process."""
    return _installed
