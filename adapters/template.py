"""A model's chat template and tokenizer, from its GGUF, shared by the chat engine and the trainers.

Training must see exactly the token sequences the chat produces, so both go through this one class:
the template comes from the GGUF's `tokenizer.chat_template` (ChatML when it has none) and the tokens
from llama.cpp's own tokenizer (a vocab-only load takes ~0.1 s; no transformers tokenizer needed).
"""
from __future__ import annotations

import threading
from array import array
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

from adapters.errors import EmberError

# Text whose tokens are remembered, per template, in characters: a conversation's messages are
# tokenized again for every prompt built from it (each turn, each word read ahead, each fit), and
# llama.cpp's BPE takes ~8 µs a token (12 ms for a 1,000-token conversation on SmolLM2; the template's
# render takes 0.2 ms). 1M characters hold a 32k-token context several times over, in ~2 MB.
TOKEN_CACHE_CHARS = 1_000_000

# Used only when a GGUF carries no `tokenizer.chat_template` (llama.cpp's server does the same).
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
          " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")

Message = dict[str, str]


class TemplateError(EmberError):
    """A model's chat template cannot be used (a syntax error, or it raised while rendering)."""


class ChatTemplate:
    """Render and tokenize messages the way a given llama.cpp model expects them.

    Only the template's own markers are special tokens: message content is tokenized as plain text,
    so a user who writes `<|im_end|>` gets those characters, never the control token (in the chat and
    in training examples alike).
    """

    def __init__(self, llm: Any, *, name: str = "the model"):
        import jinja2
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.llm = llm
        self.name = name
        self._tokens = TokenCache(llm)
        model = llm._model
        eos, bos = llm.token_eos(), llm.token_bos()
        source = llm.metadata.get("tokenizer.chat_template")
        self.fallback = not source      # no template in the GGUF: ChatML, as llama.cpp's server does
        options = dict(template=source or CHATML,
                       eos_token=model.token_get_text(eos) if eos != -1 else "",
                       bos_token=model.token_get_text(bos) if bos != -1 else "",
                       stop_token_ids=[eos])
        try:
            self._prompt = Jinja2ChatFormatter(**options)
            self._closed = Jinja2ChatFormatter(**options, add_generation_prompt=False)
        except jinja2.TemplateError as err:
            raise TemplateError(f"the chat template of {name} cannot be used ({describe(err)}); "
                                "pass another --model") from err

    @classmethod
    def from_gguf(cls, path: str) -> "ChatTemplate":
        """Load only the vocabulary and template of a GGUF (no weights)."""
        from adapters.llama_log import quiet_llama

        # A vocab-only load still builds a context, and llama.cpp logs a spurious warning about it: the
        # log goes to memory, and no file descriptor is redirected (another thread may be printing).
        return cls(quiet_llama(model_path=str(path), vocab_only=True), name=Path(path).name)

    def tokenize(self, text: str, *, bos: bool = False) -> list[int]:
        """Tokens of `text`, template markers (e.g. `<|im_end|>`) read as special tokens."""
        return list(self._tokens(text, bos, True))

    def tokenize_plain(self, text: str) -> list[int]:
        """Tokens of text a person wrote: marker-like strings stay characters."""
        return list(self._tokens(text, False, False))

    def _render(self, formatter: Any, messages: Sequence[Message]) -> Any:
        try:
            return formatter(messages=list(messages))
        except Exception as err:   # the template is the model's code: any failure of it is the model's
            raise TemplateError(f"the chat template of {self.name} failed on this conversation "
                                f"({describe(err)}); pass another --model") from err

    def _tokenize_rendered(self, text: str, contents: Sequence[str], *, bos: bool) -> list[int]:
        """Tokens of a rendered prompt: the template's text with special markers, each message's
        content (found in order) as plain text."""
        tokens = [self.llm.token_bos()] if bos else []
        cursor = 0
        for content in contents:
            start = text.find(content, cursor) if content else -1
            if start < 0 and content.strip():
                content = content.strip()      # templates often trim what they are given
                start = text.find(content, cursor)
            if start < 0:
                continue
            tokens += self.tokenize(text[cursor:start]) + self.tokenize_plain(content)
            cursor = start + len(content)
        return tokens + self.tokenize(text[cursor:])

    def prompt(self, messages: Sequence[Message]) -> tuple[list[int], list[str]]:
        """Prompt tokens asking the model for the next assistant turn, and the template's stop strings."""
        result = self._render(self._prompt, messages)
        tokens = self._tokenize_rendered(result.prompt, [m["content"] for m in messages],
                                         bos=not result.added_special)
        stop = result.stop if isinstance(result.stop, list) else [result.stop] if result.stop else []
        return tokens, stop

    def target(self, context: Sequence[Message], message: Message) -> tuple[list[int], list[int]]:
        """(context tokens, message tokens) for training on `message` after `context`.

        The message's tokens are its content plus the template's end-of-turn marker, so the model also
        learns where the turn stops; the context ends with the message's own header (e.g.
        `<|im_start|>user\\n`). Tokenizing the two parts apart matches how the model generates them.
        """
        result = self._render(self._closed, [*context, message])
        text = result.prompt
        start = text.rfind(message["content"]) if message["content"] else len(text.rstrip())
        if start < 0:
            raise ValueError("the chat template changed the message text; cannot locate it")
        end = start + len(message["content"])
        closing = text[end:].rstrip()   # e.g. "<|im_end|>"; the newline after it carries no signal
        return (self._tokenize_rendered(text[:start], [m["content"] for m in context],
                                        bos=not result.added_special),
                self.tokenize_plain(text[start:end]) + self.tokenize(closing))


class TokenCache:
    """`llm.tokenize` of the texts last asked for, up to `chars` characters of them (least recently used
    first out); thread-safe. Holds `llm`, never the template, so no reference cycle keeps a closed
    model alive until the garbage collector runs."""

    def __init__(self, llm: Any, chars: int = TOKEN_CACHE_CHARS):
        self._llm = llm
        self._budget = chars
        self._held = 0
        self._entries: OrderedDict[tuple[str, bool, bool], array] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, text: str, bos: bool, special: bool) -> array:
        """The tokens of `text` (an int32 array: do not change it)."""
        key = (text, bos, special)
        with self._lock:
            tokens = self._entries.get(key)
            if tokens is not None:
                self._entries.move_to_end(key)
                return tokens
        tokens = array("i", self._llm.tokenize(text.encode("utf-8"), add_bos=bos, special=special))
        with self._lock:
            if key not in self._entries:
                self._entries[key] = tokens
                self._held += len(text)
                while self._held > self._budget and len(self._entries) > 1:
                    (old, _, _), _ = self._entries.popitem(last=False)
                    self._held -= len(old)
        return tokens


def describe(err: Exception) -> str:
    """One line naming a template error and where it is."""
    line = getattr(err, "lineno", None)
    message = " ".join(str(getattr(err, "message", None) or err).split())
    return f"{type(err).__name__}{f' at line {line}' if line else ''}: {message}"[:200]
