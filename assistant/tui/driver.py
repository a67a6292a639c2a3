"""The terminal driver: Textual's own, writing the screen through a descriptor of its own.

Textual writes to file descriptor 2. llama-cpp-python points descriptors 1 and 2 at /dev/null while it
loads a model quietly (`suppress_stdout_stderr`), and the chat loads its model right after the first
paint: every frame written meanwhile was lost. Textual then sends only what changes, so a reopened
conversation stayed blank until a resize repainted the whole screen (`ember chat --conversation N`, 14
tries in 16). The engine now loads without touching descriptors (adapters/llama_log.py); a duplicate
of the terminal's descriptor, taken at start, keeps the screen safe from any other code in the process
that redirects them (a vocabulary-only load, a second llama.cpp model, a native library).
"""
from __future__ import annotations

import os
import sys

from textual.drivers.linux_driver import LinuxDriver


class PrivateOutputDriver(LinuxDriver):
    """`LinuxDriver` whose output goes to a private duplicate of the terminal's descriptor."""

    def __init__(self, app, **kwargs) -> None:
        super().__init__(app, **kwargs)
        terminal = sys.__stderr__
        self._file = os.fdopen(os.dup(terminal.fileno()), "w", encoding=terminal.encoding,
                               errors=terminal.errors or "strict")

    def _get_terminal_size(self) -> tuple[int, int]:
        # shutil asks descriptor 1, which may point at /dev/null during a model load.
        try:
            return tuple(os.get_terminal_size(self._file.fileno()))
        except OSError:
            return super()._get_terminal_size()

    def close(self) -> None:
        super().close()   # stops the writer thread first: nothing writes to the file after this
        self._file.close()
