"""`ember serve`'s HTTP API: OpenAI's chat completions, models and embeddings, on Ember's one request path.

Each chat request is checked, given a place in the engine's queue (429 beyond it), its user message
committed (log first, recording that it came from the API and which client sent it), then answered by
the worker through `conversation.respond`, the same path as `ember ask` and the chat. A client that
disconnects cancels its reply; what was written is kept, marked cancelled.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hmac
import json
import logging
import threading
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from assistant import resident
from assistant.config import ROUTES, Settings
from assistant.conversation import Exchange, ask_question, log_question
from assistant.errors import DatabaseLocked, EmberError, InvalidInput, NotFound, PromptTooLong, RouteUnavailable
from assistant.server import protocol
from assistant.server.protocol import ApiError
from assistant.server.worker import Busy, Job, Worker
from storage import feedback
from storage.db import connections

log = logging.getLogger("ember.serve")
EMBEDDER_ID = "all-MiniLM-L6-v2"
POLL_SECONDS = 0.2        # how often a waiting handler checks that its client is still there


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """How the server runs; `token` None means no authentication (loopback only, checked by the CLI)."""

    token: str | None = None
    queue: int = 4                      # requests that may wait behind the running one
    max_body: int = 1_000_000           # bytes
    cors_origins: tuple[str, ...] = ()
    learn: bool = True                  # False: every API conversation is excluded from learning


def status_of(err: Exception) -> ApiError:
    """The HTTP refusal for an error raised while answering."""
    if isinstance(err, ApiError):
        return err
    if isinstance(err, PromptTooLong):
        return ApiError(413, str(err), code="context_length_exceeded", param="messages")
    if isinstance(err, NotFound):
        return ApiError(404, str(err), code="not_found")
    if isinstance(err, (InvalidInput, RouteUnavailable)):
        return ApiError(400, str(err))
    if isinstance(err, DatabaseLocked):
        return ApiError(503, str(err), type="server_error", code="database_locked", headers={"Retry-After": "5"})
    if isinstance(err, EmberError):
        return ApiError(503 if "load" in str(err) else 500, str(err), type="server_error")
    return ApiError(500, f"internal error: {type(err).__name__}: {err}", type="server_error")


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def create_app(settings: Settings, options: ServeOptions) -> FastAPI:
    """The API over one worker; the worker (and the model) start with the app and stop with it."""
    worker = Worker(settings, queue_size=options.queue)
    log_lock = threading.Lock()     # the "api" connection is the handlers'; one thread uses it at a time
    embed_lock = threading.Lock()

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        from storage import conversations as convs

        db = connections(settings.home, busy_timeout_ms=settings.busy_timeout_ms).get("api")
        convs.recover_interrupted(db)    # replies orphaned by a killed server are marked interrupted
        worker.start()
        try:
            yield
        finally:
            await run_in_threadpool(worker.stop)

    app = FastAPI(title="Ember", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker
    if options.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(options.cors_origins),
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, err: ApiError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {404: "unknown_url", 405: "method_not_allowed"}.get(err.status_code)
        return error_response(ApiError(err.status_code, str(err.detail), code=code))

    @app.exception_handler(EmberError)
    async def ember_error(_request: Request, err: EmberError) -> JSONResponse:
        return error_response(status_of(err))

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, err: Exception) -> JSONResponse:
        log.error("internal error: %s: %s", type(err).__name__, err)
        return error_response(status_of(err))

    def authorize(request: Request) -> None:
        if options.token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), options.token.encode()):
            raise ApiError(401, "missing or wrong API key: send Authorization: Bearer <token> (the token "
                                "file given to `ember serve`)", type="authentication_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    async def read_json(request: Request) -> dict[str, Any]:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > options.max_body:
            raise ApiError(413, f"the request body is {declared} bytes; the limit is {options.max_body}",
                           code="request_too_large")
        raw = bytearray()
        async for part in request.stream():
            raw += part
            if len(raw) > options.max_body:
                raise ApiError(413, f"the request body is over the limit of {options.max_body} bytes",
                               code="request_too_large")
        return protocol.parse_json(bytes(raw))

    def engine_state() -> tuple[str, str | None]:
        if worker.error:
            return "error", worker.error
        return ("ready", None) if worker.ready.is_set() else ("loading", None)

    def base_id() -> str:
        return settings.model_path.stem

    def personal() -> bool:
        return worker.engine is not None and worker.engine.loaded_adapter is not None

    @app.get("/health")
    async def health() -> JSONResponse:
        state, error = engine_state()
        body = {"status": state, "model": base_id(), "adapter": worker.engine.loaded_adapter if personal() else None,
                "queue": {"waiting": worker.waiting, "limit": options.queue + 1}, "served": worker.served}
        if error:
            body["error"] = error
        return JSONResponse(body, status_code=503 if state == "error" else 200)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        authorize(request)
        return JSONResponse(protocol.model_list(base_id(), personal(), EMBEDDER_ID, protocol.now()))

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> JSONResponse:
        authorize(request)
        body = await read_json(request)
        if body.get("model") != EMBEDDER_ID:
            raise ApiError(404, f"unknown embedding model {str(body.get('model'))[:80]!r}; use {EMBEDDER_ID!r}",
                           param="model", code="model_not_found")
        texts = protocol.embedding_inputs(body)
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):   # the SDK asks for base64: float32 little-endian bytes
            raise protocol.bad("encoding_format must be float or base64", "encoding_format")
        if not worker.ready.is_set() or worker.retriever is None:
            raise ApiError(503, worker.error or "the model is still loading; retry shortly", type="server_error",
                           code="loading", headers={"Retry-After": "2"})

        def embed():
            with embed_lock:
                embedder = worker.retriever.embedder      # memory's own: the vectors `ember memory` uses
                return embedder.encode(texts), sum(len(embedder.tokenizer.encode(t).ids) for t in texts)

        vectors, tokens = await run_in_threadpool(embed)
        return JSONResponse({"object": "list", "model": EMBEDDER_ID,
                             "data": [{"object": "embedding", "index": i,
                                       "embedding": v.tolist() if encoding == "float"
                                       else base64.b64encode(v.astype("<f4").tobytes()).decode()}
                                      for i, v in enumerate(vectors)],
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        asked = protocol.chat_request(await read_json(request))
        if asked.model not in (base_id(), base_id() + protocol.PERSONAL):
            raise ApiError(404, f"the model {asked.model[:80]!r} does not exist; GET /v1/models lists them",
                           param="model", code="model_not_found")
        if asked.model.endswith(protocol.PERSONAL) and not personal():
            raise ApiError(404, f"{asked.model!r} needs an active adapter and none is in use; "
                                "run `ember adapt`, or ask for the base model", param="model", code="model_not_found")
        if worker.error:
            raise ApiError(503, worker.error, type="server_error", code="engine_unavailable")
        try:
            worker.reserve()
        except Busy as busy:
            raise ApiError(429, f"Ember is answering {worker.waiting} requests (one at a time); "
                                f"retry in {busy.retry_after} s", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(busy.retry_after)}) from None
        client = request.headers.get("user-agent") or None

        def commit():   # log first: the question is stored before it waits for the engine
            with log_lock:
                db = connections(settings.home, busy_timeout_ms=settings.busy_timeout_ms).get("api")
                question = log_question(db, asked.question, conversation_id=asked.conversation_id,
                                        log=asked.log, history=asked.history if asked.history else None,
                                        origin="api", client=client)
                if asked.log and (not asked.learn or not options.learn):
                    feedback.set_excluded(db, question.conversation_id)
                return question

        try:
            question = await run_in_threadpool(commit)
        except BaseException:
            worker.release()
            raise
        job = Job(question, asyncio.get_running_loop(), log=asked.log, route=asked.route,
                  base_only=asked.model == base_id() and personal(), max_tokens=asked.max_tokens,
                  temperature=asked.temperature, top_p=asked.top_p, seed=asked.seed)
        worker.submit(job)
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = protocol.now()
        first = await _first_event(request, job)
        if first[0] == "error":
            raise status_of(first[1])
        if asked.stream:
            return EventSourceResponse(_stream(job, first, completion_id, asked.model, created),
                                       headers={"Cache-Control": "no-cache"})
        pieces = []
        event = first
        while event[0] == "piece":
            pieces.append(event[1])
            event = await _next_event(request, job)
        if event[0] == "error":
            raise status_of(event[1])
        exchange: Exchange = event[1]
        return JSONResponse({
            "id": completion_id, "object": "chat.completion", "created": created, "model": asked.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": exchange.text},
                         "finish_reason": protocol.finish_reason(exchange.status), "logprobs": None}],
            "usage": protocol.usage(exchange.prompt_tokens, exchange.tokens),
            "ember": ember_fields(exchange)})

    @app.post(resident.ASK_PATH)
    async def resident_ask(request: Request):
        """`ember ask` through this server's engine (Unix socket only): the question is committed
        before the response starts, so any refusal before it lets the CLI answer in-process instead."""
        if request.scope.get("server", (None, 0))[1] is not None:     # a TCP port: not for the network
            raise ApiError(404, "Not Found", code="unknown_url")
        body = await read_json(request)
        check_ask(body)
        if body.get("settings") != resident.settings_key(settings):
            raise ApiError(409, "this server runs with other settings (model, context, sampling)",
                           code="settings_differ")
        if worker.error or not worker.ready.is_set():
            raise ApiError(503, worker.error or "the model is still loading", type="server_error", code="loading")
        try:
            worker.reserve()
        except Busy:
            raise ApiError(429, "the queue is full", type="rate_limit_error", code="queue_full") from None

        def commit():   # log first, as `ember ask` in-process: from the CLI, not the API
            with log_lock:
                db = connections(settings.home, busy_timeout_ms=settings.busy_timeout_ms).get("api")
                return ask_question(db, body["prompt"], conversation_id=body.get("conversation_id"),
                                    log=body.get("log", True), persona=body.get("persona"),
                                    regenerate=body.get("regenerate"), instead_of=body.get("instead_of"))

        if await request.is_disconnected():
            # The CLI gave up waiting (a stopped or stalled server) and answered in-process: storing
            # the question now would log it twice.
            worker.release()
            return JSONResponse({"error": {"message": "the client left"}}, status_code=499)
        try:
            question = await run_in_threadpool(commit)
        except EmberError as err:
            worker.release()
            return JSONResponse({"error": {"message": str(err), "exit_code": err.exit_code}}, status_code=400)
        except BaseException:
            worker.release()
            raise
        job = Job(question, asyncio.get_running_loop(), log=body.get("log", True), route=body.get("route"),
                  max_tokens=body.get("max_tokens"), temperature=body.get("temperature"), seed=body.get("seed"),
                  warn=True, cancelled_as="interrupted")
        worker.submit(job)
        return StreamingResponse(_ask_lines(job), media_type="application/x-ndjson")

    return app


def check_ask(body: dict[str, Any]) -> None:
    """The fields of an `/ember/ask` body and their types (the CLI sends them right; anything else is a 400)."""
    kinds = {"prompt": (str,), "max_tokens": (int, type(None)), "seed": (int, type(None)),
             "temperature": (int, float, type(None)), "log": (bool,), "conversation_id": (int, type(None)),
             "route": (str, type(None)), "persona": (str, type(None)), "settings": (dict,)}
    for name, kind in kinds.items():
        value = body.get(name)
        if name not in body or not isinstance(value, kind) or (isinstance(value, bool) and bool not in kind):
            raise protocol.bad(f"{name} is missing or of the wrong type", name)
    for name in ("regenerate", "instead_of"):   # optional: a branch's message id
        if not isinstance(body.get(name), (int, type(None))) or isinstance(body.get(name), bool):
            raise protocol.bad(f"{name} is of the wrong type", name)
    if body["route"] is not None and body["route"] not in ROUTES:
        raise protocol.bad(f"route must be one of {', '.join(ROUTES)}", "route")


async def _ask_lines(job: Job) -> AsyncIterator[str]:
    """`ember ask`'s answer as JSON lines: a warning, pieces, then `done` (Exchange.report) or `error`
    (the line and exit code the CLI prints). A client that goes away cancels the reply (kept, marked)."""
    finished = False
    try:
        while True:
            kind, value = await job.events.get()
            if kind == "piece":
                yield json.dumps({"piece": value}) + "\n"
            elif kind == "warning":
                yield json.dumps({"warning": value}) + "\n"
            else:
                finished = True
                if kind == "done":
                    yield json.dumps({"done": value.report()}, ensure_ascii=False) + "\n"
                elif isinstance(value, EmberError):
                    yield json.dumps({"error": {"message": str(value), "exit_code": value.exit_code}}) + "\n"
                else:    # a bug: the line `ember ask` prints for one in-process
                    yield json.dumps({"error": {"message": f"internal error: {type(value).__name__}: {value} "
                                                           "(run with EMBER_DEBUG=1 for the traceback)",
                                                "exit_code": 70}}) + "\n"
                return
    finally:
        if not finished:
            job.cancel.set()


def ember_fields(exchange: Exchange) -> dict[str, Any]:
    """What Ember adds to a completion: where it is stored and how it was answered."""
    return {"conversation_id": exchange.conversation_id, "message_id": exchange.message_id,
            "user_message_id": exchange.user_message_id, "route": exchange.route, "adapter": exchange.adapter,
            "status": exchange.status, "warnings": exchange.warnings}


async def _next_event(request: Request, job: Job) -> tuple[str, Any]:
    """The job's next event; a client that went away meanwhile cancels the reply (kept, marked)."""
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), POLL_SECONDS)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel.set()
        except asyncio.CancelledError:
            job.cancel.set()
            raise


async def _first_event(request: Request, job: Job) -> tuple[str, Any]:
    """Wait for the first piece (or the end, or an error): until then the status code can still say 4xx."""
    return await _next_event(request, job)


async def _stream(job: Job, first: tuple[str, Any], completion_id: str, model: str,
                  created: int) -> AsyncIterator[str]:
    """SSE: a role delta, content deltas, a final chunk with finish_reason and usage, then [DONE]."""
    finished = False
    try:
        yield protocol.chunk(completion_id, model, created, {"role": "assistant", "content": ""})
        event = first
        while event[0] == "piece":
            yield protocol.chunk(completion_id, model, created, {"content": event[1]})
            event = await job.events.get()
        finished = True
        if event[0] == "error":
            err = status_of(event[1])
            yield f"data: {json.dumps(err.body())}\n\n"
            return
        exchange: Exchange = event[1]
        yield protocol.chunk(completion_id, model, created, {}, protocol.finish_reason(exchange.status),
                             {"usage": protocol.usage(exchange.prompt_tokens, exchange.tokens),
                              "ember": ember_fields(exchange)})
        yield protocol.DONE
    finally:
        if not finished:     # the client went away (the stream was cancelled) or sending failed
            job.cancel.set()
