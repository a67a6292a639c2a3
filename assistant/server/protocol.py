"""The OpenAI wire format `ember serve` speaks: request checking, response shapes and error objects.

Requests are checked here by hand rather than by pydantic models, so that every refusal is OpenAI's
error object (`{"error": {"message", "type", "param", "code"}}`) with the status OpenAI would use, and
names the field at fault; FastAPI's own 422 shape never reaches a client.
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

from assistant.conversation import ROUTES
from assistant.engine import Message

PERSONAL = "+personal"           # the model id of Ember with the user's adapter: "<base>+personal"
EMBER_KEYS = ("route", "log", "learn", "conversation")
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    """A refusal, sent as OpenAI's error object with `status` (never a traceback)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """OpenAI's error object."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400: the request is malformed or a field has the wrong type or value."""
    return ApiError(400, message, param=param, code=code)


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object; invalid UTF-8, malformed JSON and a non-object are 400s."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise bad(f"the request body is not valid UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start})",
                  code="invalid_encoding") from err
    if not text.strip():
        raise bad("the request body is empty; send a JSON object", code="invalid_json")
    try:
        body = json.loads(text)
    except json.JSONDecodeError as err:
        raise bad(f"the request body is not valid JSON ({err.msg} at line {err.lineno} column {err.colno})",
                  code="invalid_json") from err
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, not {type(body).__name__}", code="invalid_json")
    return body


def _text(content: Any, param: str) -> str:
    """A message's text: a string, or a list of text parts (images and audio are not understood)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad("only text content parts ({\"type\": \"text\", \"text\": ...}) are understood",
                          f"{param}[{i}]")
            parts.append(part["text"])
        return "".join(parts)
    raise bad("a message's content must be a string or a list of text parts", param)


def _number(body: dict, name: str, kind: type, low: float, high: float | None = None) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise bad(f"{name} must be {'a number' if kind is float else 'an integer'}, not {json.dumps(value)[:40]}",
                  name)
    if value < low or (high is not None and value > high):
        raise bad(f"{name} must be between {low:g} and {high:g}, not {value}" if high is not None
                  else f"{name} must be at least {low:g}, not {value}", name)
    return kind(value)


@dataclasses.dataclass
class ChatRequest:
    """One `POST /v1/chat/completions`, checked."""

    model: str
    question: str                  # the last user message: what is logged and answered
    history: list[Message]         # the turns before it, as the client sent them
    stream: bool
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    seed: int | None
    route: str = "auto"
    log: bool = True
    learn: bool = True
    conversation_id: int | None = None


def chat_request(body: dict[str, Any]) -> ChatRequest:
    """Check a chat-completions body; every problem is a 400 naming the field."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model is required: a model id from GET /v1/models", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list of {role, content} objects", "messages")
    turns: list[Message] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad("each message must be an object with role and content", f"messages[{i}]")
        role = message.get("role")
        if role not in ROLES:
            raise bad(f"role must be one of {', '.join(ROLES)}, not {json.dumps(role)[:40]}", f"messages[{i}].role")
        turns.append({"role": ROLES[role], "content": _text(message.get("content"), f"messages[{i}].content")})
    if turns[-1]["role"] != "user":
        raise bad("the last message must be the user's: it is the question to answer", "messages")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream must be true or false", "stream")
    max_tokens = _number(body, "max_completion_tokens", int, 1) or _number(body, "max_tokens", int, 1)
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise bad("n must be 1: Ember writes one reply at a time", "n")
    request = ChatRequest(model=model, question=turns[-1]["content"], history=turns[:-1], stream=stream,
                          max_tokens=max_tokens, temperature=_number(body, "temperature", float, 0, 2),
                          top_p=_number(body, "top_p", float, 0, 1), seed=_number(body, "seed", int, -2 ** 63))
    ember = body.get("ember")
    if ember is None:
        return request
    if not isinstance(ember, dict):
        raise bad("ember must be an object: {\"route\", \"log\", \"learn\", \"conversation\"}", "ember")
    unknown = sorted(set(ember) - set(EMBER_KEYS))
    if unknown:
        raise bad(f"unknown ember option {unknown[0]!r}; known: {', '.join(EMBER_KEYS)}", f"ember.{unknown[0]}")
    if "route" in ember:
        if ember["route"] not in ROUTES:
            raise bad(f"ember.route must be one of {', '.join(ROUTES)}", "ember.route")
        request.route = ember["route"]
    for flag in ("log", "learn"):
        if flag in ember:
            if not isinstance(ember[flag], bool):
                raise bad(f"ember.{flag} must be true or false", f"ember.{flag}")
            setattr(request, flag, ember[flag])
    if ember.get("conversation") is not None:
        if isinstance(ember["conversation"], bool) or not isinstance(ember["conversation"], int):
            raise bad("ember.conversation must be a conversation id (an integer)", "ember.conversation")
        request.conversation_id = ember["conversation"]
    return request


def embedding_inputs(body: dict[str, Any]) -> list[str]:
    """The texts of a `POST /v1/embeddings` body (a string or a list of strings)."""
    value = body.get("input")
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise bad("input must be a string or a non-empty list of strings (token arrays are not understood)",
                  "input")
    return texts


def model_list(base: str, personal: bool, embedder: str, created: int) -> dict[str, Any]:
    """`GET /v1/models`: the base model, `<base>+personal` when an adapter is active, and the embedder."""
    ids = [base] + ([base + PERSONAL] if personal else []) + [embedder]
    return {"object": "list",
            "data": [{"id": i, "object": "model", "created": created, "owned_by": "ember"} for i in ids]}


def finish_reason(status: str) -> str:
    """OpenAI's finish_reason for how a reply ended."""
    return "length" if status == "length" else "stop"


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chunk(completion_id: str, model: str, created: int, delta: dict[str, Any], finish: str | None = None,
          extra: dict[str, Any] | None = None) -> str:
    """One `chat.completion.chunk` as an SSE event."""
    body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **(extra or {})}
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


DONE = "data: [DONE]\n\n"


def now() -> int:
    return int(time.time())
