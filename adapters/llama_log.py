"""llama.cpp's own log: kept in memory for `ember doctor` and error messages, shown only when asked.

llama-cpp-python's `verbose=False` does not silence llama.cpp. Its callback (`llama_cpp/_logger.py`)
maps ggml's log levels with an older numbering (INFO=1, WARN=2, ERROR=3, DEBUG=4), while the
llama.cpp it ships numbers them DEBUG=1, INFO=2, WARN=3, ERROR=4. So every WARN line is taken for an
error and printed (e.g. "n_ctx_seq (4096) > n_ctx_train (2048) -- possible training context overflow"
in the middle of `ember ask` output), and real ERROR lines are taken for debug and dropped. Its
`suppress_stdout_stderr` hides the model load by pointing file descriptors 1 and 2 at /dev/null for
the whole process, so whatever another thread writes meanwhile (the chat's first paint, while the
model loads in a worker) is lost too. `install()` replaces that callback for the whole process
(llama.cpp has one log callback, shared with ggml); `quiet_llama()` loads a model without touching
any file descriptor.
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import io
import sys
import threading
from typing import Any

# ggml_log_level in the llama.cpp that llama-cpp-python 0.3.x ships (ggml/include/ggml.h).
LEVELS = {0: "none", 1: "debug", 2: "info", 3: "warn", 4: "error", 5: "cont"}
CONT = 5
KEEP_LINES = 200


class LlamaLog:
    """llama.cpp's last lines (level, text), written through to stderr only when verbose.

    Debug lines (graph dumps, hundreds a decode) are dropped; warnings and errors also go to a ring of
    their own, so that the reason for a failure is still there after a long load.
    """

    def __init__(self, verbose: bool = False, keep: int = KEEP_LINES):
        self.verbose = verbose
        self.lines: collections.deque[tuple[str, str]] = collections.deque(maxlen=keep)
        self.problems: collections.deque[tuple[str, str]] = collections.deque(maxlen=keep // 4)
        self._partial = ""
        self._level = "info"
        self._lock = threading.Lock()
        self._callback: Any = None   # the ctypes thunk: must outlive every call llama.cpp makes into it

    def feed(self, level: int, text: str, *, echo: bool = True) -> None:
        """Take one piece of llama.cpp output; pieces join into lines (progress dots come as CONT)."""
        with self._lock:
            if level != CONT:
                self._level = LEVELS.get(level, "info")
            if self._level == "debug":
                return
            self._partial += text
            *done, self._partial = self._partial.split("\n")
            for line in done:
                if line.strip():
                    self.lines.append((self._level, line.rstrip()))
                    if self._level in ("warn", "error"):
                        self.problems.append((self._level, line.rstrip()))
        if self.verbose and echo:
            # The real stderr, even while `quiet_llama` holds sys.stderr: a crash must not lose these.
            out = sys.__stderr__ or sys.stderr
            out.write(text)
            out.flush()

    def recent(self, n: int = 50, *, min_level: str = "info") -> list[str]:
        """The last `n` lines at `min_level` (info, warn or error) or above, oldest first, as 'level: text'."""
        with self._lock:
            source = list(self.lines if min_level == "info" else self.problems)
        if min_level == "error":
            source = [(lv, t) for lv, t in source if lv == "error"]
        return [f"{lv}: {t}" for lv, t in source[-n:]]

    def last_problem(self) -> str | None:
        """llama.cpp's last warning or error line (e.g. why it refused a file), for a one-line message."""
        with self._lock:
            return self.problems[-1][1] if self.problems else None


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


def quiet_llama(**kwargs: Any) -> Any:
    """`llama_cpp.Llama(**kwargs)` with nothing printed and no file descriptor redirected.

    llama.cpp's log goes to the installed `LlamaLog`; llama-cpp-python's own verbose prints (system
    info, metadata, chat format) are kept in it too, as info lines, but never printed.
    """
    log = install(verbose=_installed.verbose if _installed is not None else False)
    import llama_cpp

    chatter = io.StringIO()
    try:
        # verbose=True is what keeps llama-cpp-python from redirecting fds 1 and 2 during the load;
        # its Python-level prints are caught here instead (sys.stderr only: no other thread's output).
        with contextlib.redirect_stderr(chatter):
            llm = llama_cpp.Llama(**{**kwargs, "verbose": True})
    finally:
        for line in chatter.getvalue().splitlines():   # kept, never echoed: it is not llama.cpp's log
            log.feed(2, line + "\n", echo=False)
    llm.verbose = False   # no timing prints after each completion
    return llm
