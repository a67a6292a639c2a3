"""A thin layer over llama-cpp-python: load a GGUF, apply its chat template, fit the context, stream.

Adapters attach here later (llama.cpp's adapter API on the loaded model): `Engine.adapter` is what the
status line and the log report, and `Engine.llm` is the one loaded model everything shares.
"""
from __future__ import annotations

import dataclasses
import random
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from assistant.errors import InvalidInput, ModelInvalid, ModelNotFound, PromptTooLong

GGUF_MAGIC = b"GGUF"
# Used only when a GGUF carries no `tokenizer.chat_template` (llama.cpp's server does the same).
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
          " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")

Message = dict[str, str]


def check_gguf(path: Path) -> Path:
    """Fail early, with a clear line, on a path that cannot be a GGUF model."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelNotFound(f"model file {path} does not exist; pass --model with a .gguf file")
    if path.is_dir():
        raise ModelInvalid(f"model path {path} is a directory; pass --model with a .gguf file inside it")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise ModelInvalid(f"cannot read model file {path}: {err.strerror}") from err
    if magic != GGUF_MAGIC:
        raise ModelInvalid(f"{path} is not a GGUF model (bad header); pass a .gguf file")
    return path


@dataclasses.dataclass
class Generation:
    """One reply being generated: iterate for text pieces; totals are set when it ends."""

    pieces: Iterator[str]
    prompt_tokens: int
    dropped_messages: int
    text: str = ""
    tokens: int = 0
    seconds: float = 0.0
    first_token_seconds: float | None = None
    finish_reason: str | None = None   # stop | length | cancelled

    def __iter__(self) -> Iterator[str]:
        return self.pieces

    @property
    def tokens_per_second(self) -> float | None:
        """Decode speed, from the first token to the last."""
        if self.first_token_seconds is None or self.tokens < 2:
            return None
        decode = self.seconds - self.first_token_seconds
        return (self.tokens - 1) / decode if decode > 0 else None


class Engine:
    """The loaded chat model. Not thread-safe: one generation at a time."""

    def __init__(self, model_path: Path, *, n_ctx: int = 4096, n_threads: int = 2, seed: int = 0):
        path = check_gguf(model_path)
        import llama_cpp  # lazy: keeps `ember --help` and the TUI's first paint fast

        try:
            self.llm = llama_cpp.Llama(
                model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads,
                seed=seed, verbose=False)
        except (ValueError, RuntimeError) as err:
            raise ModelInvalid(f"llama.cpp could not load {path} (truncated, corrupt or unsupported "
                               "GGUF); pass another --model") from err
        self.path = path
        self.adapter: str | None = None
        self.name = self.llm.metadata.get("general.name") or path.stem
        self._formatter = self._chat_formatter()

    def _chat_formatter(self) -> Any:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        model = self.llm._model
        eos, bos = self.llm.token_eos(), self.llm.token_bos()
        return Jinja2ChatFormatter(
            template=self.llm.metadata.get("tokenizer.chat_template") or CHATML,
            eos_token=model.token_get_text(eos) if eos != -1 else "",
            bos_token=model.token_get_text(bos) if bos != -1 else "",
            stop_token_ids=[eos])

    @property
    def n_ctx(self) -> int:
        """The context window in tokens."""
        return self.llm.n_ctx()

    def count_tokens(self, text: str) -> int:
        """How many tokens `text` takes in this model."""
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def tokenize_chat(self, messages: Sequence[Message]) -> tuple[list[int], list[str]]:
        """The prompt tokens for `messages` in the model's own chat template, and its stop strings."""
        result = self._formatter(messages=list(messages))
        tokens = self.llm.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special,
                                   special=True)
        stop = result.stop if isinstance(result.stop, list) else [result.stop] if result.stop else []
        return tokens, stop

    def fit(self, messages: Sequence[Message], max_tokens: int) -> tuple[list[int], list[str], int]:
        """Drop the oldest turns until the prompt plus `max_tokens` fits the context.

        System messages and the newest message are always kept; returns (tokens, stop, dropped).
        """
        if max_tokens < 1 or max_tokens >= self.n_ctx:
            raise InvalidInput(f"--max-tokens must be between 1 and {self.n_ctx - 1} "
                               f"(the context holds {self.n_ctx} tokens), not {max_tokens}")
        budget = self.n_ctx - max_tokens
        system = [m for m in messages if m["role"] == "system"]
        turns = [m for m in messages if m["role"] != "system"]
        if not turns:
            raise InvalidInput("nothing to answer: the conversation has no message")

        def prompt(start: int) -> tuple[list[int], list[str]]:
            return self.tokenize_chat(system + turns[start:])

        tokens, stop = prompt(0)
        if len(tokens) <= budget:
            return tokens, stop, 0
        # Keep whole exchanges: the kept history starts at a user turn (or is the newest turn alone).
        starts = [i for i, m in enumerate(turns) if m["role"] == "user" and i > 0]
        if not starts or starts[-1] != len(turns) - 1:
            starts.append(len(turns) - 1)
        newest, newest_stop = prompt(starts[-1])
        if len(newest) > budget:
            raise PromptTooLong(
                f"the prompt is {len(newest)} tokens but the model's context holds {self.n_ctx}, "
                f"with {max_tokens} kept for the reply; shorten it or lower --max-tokens")
        # Prompt length only shrinks as the start moves on: binary-search the earliest start that fits.
        best = (starts[-1], newest, newest_stop)
        lo, hi = 0, len(starts) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            tokens, stop = prompt(starts[mid])
            if len(tokens) <= budget:
                best, hi = (starts[mid], tokens, stop), mid
            else:
                lo = mid + 1
        start, tokens, stop = best
        return tokens, stop, start

    def generate(self, messages: Sequence[Message], *, max_tokens: int = 512, temperature: float = 0.3,
                 top_p: float = 0.9, seed: int | None = None,
                 cancel: threading.Event | None = None) -> Generation:
        """Start a reply to `messages`; iterate the result for text as it is produced.

        Setting `cancel` stops generation after the current token; the text so far is kept.
        `seed=None` draws a fresh seed, so that unseeded sampling varies from reply to reply.
        """
        tokens, stop, dropped = self.fit(messages, max_tokens)
        if seed is None:
            seed = random.randrange(2 ** 31)
        gen = Generation(pieces=iter(()), prompt_tokens=len(tokens), dropped_messages=dropped)
        gen.pieces = self._stream(gen, tokens, stop, max_tokens, temperature, top_p, seed, cancel)
        return gen

    def _stream(self, gen: Generation, tokens: list[int], stop: list[str], max_tokens: int,
                temperature: float, top_p: float, seed: int | None,
                cancel: threading.Event | None) -> Iterator[str]:
        from llama_cpp import StoppingCriteriaList

        sampled = 0

        def count_and_cancel(_ids: Any, _logits: Any) -> bool:
            # llama-cpp-python calls this once per sampled token and once more at the end.
            nonlocal sampled
            sampled += 1
            return cancel is not None and cancel.is_set()

        started = time.perf_counter()
        parts: list[str] = []
        stream = self.llm.create_completion(
            prompt=tokens, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
            seed=seed, stop=stop, stream=True,
            stopping_criteria=StoppingCriteriaList([count_and_cancel]))
        try:
            for chunk in stream:
                choice = chunk["choices"][0]
                piece = choice["text"]
                if piece:
                    if gen.first_token_seconds is None:
                        gen.first_token_seconds = time.perf_counter() - started
                    parts.append(piece)
                    gen.text = "".join(parts)
                    yield piece
                if choice.get("finish_reason"):
                    gen.finish_reason = choice["finish_reason"]
        finally:
            stream.close()
            gen.seconds = time.perf_counter() - started
            gen.tokens = max(0, sampled - 1)
            gen.text = "".join(parts)
            if cancel is not None and cancel.is_set():
                gen.finish_reason = "cancelled"
            elif gen.finish_reason is None:
                gen.finish_reason = "cancelled"  # the consumer stopped iterating early

    def close(self) -> None:
        """Free the model and its context."""
        self.llm.close()
