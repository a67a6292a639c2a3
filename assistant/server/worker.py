"""The server's one engine worker: llama.cpp writes one reply at a time, requests wait their turn.

Every request first takes a place (`reserve`): the running reply plus at most `queue` waiting ones;
beyond that it is refused (429) before anything is stored. The handler then commits the user's message
(log first, on the "api" connection), and `submit`s the job. The worker thread answers jobs in order
through `conversation.respond` on its own "reply" connection, swapping in a newly promoted adapter
between jobs, never during one. A job's pieces reach its handler's event loop through an asyncio queue;
its `cancel` event (set when the client goes away) stops generation, and the partial reply is kept,
marked cancelled.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import queue
import threading
import time
from typing import Any

from assistant import ownership
from assistant.config import Settings
from assistant.conversation import Exchange, Question, respond, sync_adapter
from assistant.errors import EmberError
from storage.db import connections


@dataclasses.dataclass
class Job:
    """One accepted chat request, from the queue to its last piece."""

    question: Question
    loop: asyncio.AbstractEventLoop
    log: bool = True
    route: str | None = "auto"     # None: the persona's route, else auto
    base_only: bool = False          # the client asked for the base model: the adapter is withheld
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None       # None: the settings' top_p
    seed: int | None = None
    warn: bool = False               # `ember ask`: send a refused adapter's warning first, as in-process
    cancelled_as: str = "cancelled"  # `ember ask`: its process was interrupted, the reply is "interrupted"
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    events: asyncio.Queue = dataclasses.field(default_factory=asyncio.Queue)

    def send(self, kind: str, value: Any) -> None:
        """Hand an event to the handler's loop ("piece", "done" with the Exchange, "error")."""
        with contextlib.suppress(RuntimeError):    # the loop is closed: the server is going down
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class Busy(Exception):
    """Every place in the queue is taken; `retry_after` is a guess in seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"busy; retry after {retry_after} s")
        self.retry_after = retry_after


class Worker:
    """Loads the engine, then answers jobs one at a time, in order."""

    def __init__(self, settings: Settings, *, queue_size: int = 4):
        self.settings = settings
        self.queue_size = queue_size
        self._places = threading.BoundedSemaphore(queue_size + 1)   # the running job and the waiting ones
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._main, name="ember-engine", daemon=True)
        self.ready = threading.Event()
        self.engine: Any = None
        self.retriever: Any = None
        self.error: str | None = None          # why the engine could not load
        self.warnings: list[str] = []
        self.adapter_warning: str | None = None   # why the active adapter was refused, while it still is
        self.current: Job | None = None
        self.served = 0
        self._seconds = 1.0                     # moving average of a job's time, for Retry-After
        self._waiting = 0
        self._lock = threading.Lock()
        self._serving: ownership.Serving | None = None    # the daemon does not train while requests are in flight

    def start(self) -> None:
        self._serving = ownership.Serving(self.settings.home)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Jobs accepted and not yet finished (the running one included)."""
        return self._waiting

    def reserve(self) -> None:
        """Take a place for a request, or raise `Busy` (→ 429 with Retry-After)."""
        if not self._places.acquire(blocking=False):
            raise Busy(max(1, round(self._seconds * (self.queue_size + 1))))
        with self._lock:
            self._waiting += 1
        if self._serving is not None:
            self._serving.enter()

    def release(self) -> None:
        """Give a place back (a request refused after `reserve`, or a finished job)."""
        with self._lock:
            self._waiting -= 1
        if self._serving is not None:
            self._serving.leave()
        self._places.release()

    def submit(self, job: Job) -> None:
        """Queue an accepted job (its place was reserved, its question committed)."""
        if self.error:
            job.send("error", EmberError(self.error))
            self.release()
            return
        self._jobs.put(job)

    def stop(self) -> None:
        """Cancel the running reply (its text so far is kept) and end the thread after it."""
        job = self.current
        if job is not None:
            job.cancel.set()
        self._jobs.put(None)
        self._thread.join(timeout=30)

    def _load(self) -> None:
        from assistant.engine import Engine
        from assistant.retrieval import retriever_for

        s = self.settings
        db = connections(s.home, busy_timeout_ms=s.busy_timeout_ms).get("reply")
        self.engine = Engine(s.model_path, n_ctx=s.n_ctx, n_threads=s.threads, seed=s.seed or 0,
                             cache_dir=s.cache_dir)
        self.warnings = list(self.engine.warnings)
        warning = sync_adapter(db, self.engine)
        if warning:
            self.warnings.append(warning)
            self.adapter_warning = warning
        self.retriever = retriever_for(s, db)

    def _main(self) -> None:
        try:
            self._load()
        except EmberError as err:
            self.error = str(err)
        except Exception as err:   # a bug: still one line, for /health and every request
            self.error = f"internal error: {type(err).__name__}: {err}"
        finally:
            self.ready.set()
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if self.error:
                job.send("error", EmberError(self.error))
                self.release()
                continue
            self.current = job
            started = time.monotonic()
            try:
                with ownership.replying(self.settings.home, job.cancel):   # a training step ends first
                    job.send("done", self._answer(job))
            except Exception as err:   # EmberError for the client; anything else is reported as a 500
                job.send("error", err)
            finally:
                self.current = None
                self.served += 1
                self._seconds = 0.7 * self._seconds + 0.3 * (time.monotonic() - started)
                self.release()

    def refusing_adapter(self, db: Any) -> bool:
        """Whether the registry's active adapter is the one the engine refused (an in-process `ember
        ask` would warn about it on every run)."""
        from storage import registry

        active = registry.active(db)
        wanted = active["id"] if active else None
        return (self.adapter_warning is not None and wanted is not None
                and wanted == self.engine.refused_adapter and wanted != self.engine.loaded_adapter)

    def _answer(self, job: Job) -> Exchange:
        s = self.settings
        db = connections(s.home, busy_timeout_ms=s.busy_timeout_ms).get("reply")
        warning = sync_adapter(db, self.engine)    # between requests: never mid-stream
        if warning:
            self.adapter_warning = warning
            if warning not in self.warnings:
                self.warnings.append(warning)
        if job.warn and self.refusing_adapter(db):
            job.send("warning", self.adapter_warning)
        withheld = self.engine.adapter_withheld() if job.base_only else contextlib.nullcontext()
        with withheld:
            return respond(db, self.engine, s, job.question, log=job.log, route=job.route,
                           max_tokens=job.max_tokens, temperature=job.temperature, top_p=job.top_p,
                           seed=None if job.seed is None else job.seed % 2 ** 31, cancel=job.cancel,
                           retriever=self.retriever, on_piece=lambda piece: job.send("piece", piece),
                           cancelled_as=job.cancelled_as)
