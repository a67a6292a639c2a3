"""A thin layer over llama-cpp-python: load a GGUF, apply its chat template, fit the context, stream.

Adapters are hot-swapped on the loaded model (llama.cpp's adapter API, `adapters.runtime`): one is
loaded at a time (the registry's active adapter) and applied or not per request; `Engine.adapter` is
the id applied to the next reply, which the status line and the log report.
"""
from __future__ import annotations

import contextlib
import dataclasses
import random
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from adapters.template import ChatTemplate, Message, TemplateError, describe
from adapters import llama_log
from assistant import selfcheck
from assistant.errors import EmberError, InvalidInput, ModelInvalid, ModelNotFound, PromptTooLong

GGUF_MAGIC = b"GGUF"
# Tokens read ahead between two asks whether to stop (`Engine.read_ahead`): ~0.2-0.4 s of prompt
# evaluation on a 2-core CPU with the bundled model, the longest a sent message waits for a stale draft.
READ_AHEAD_SLICE = 64


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

    def __init__(self, model_path: Path, *, n_ctx: int = 4096, n_threads: int = 2, seed: int = 0,
                 cache_dir: Path | None = None):
        path = check_gguf(model_path)
        import llama_cpp  # lazy: keeps `ember --help` and the TUI's first paint fast

        self.warnings: list[str] = []    # one line each, for the CLI, the chat's status line and doctor
        if cache_dir is not None:
            # A tiny decode in a child process, once per model file and llama.cpp build: a native crash
            # (an unsafe CPU path, a GGUF that kills llama.cpp) becomes one line, not a core dump.
            selfcheck.ensure(path, cache_dir, n_threads)
        self.llm = self._load(llama_cpp, path, n_ctx, n_threads, seed)
        n_ctx_train = self.llm._model.n_ctx_train()
        if 0 < n_ctx_train < self.llm.n_ctx():
            # Past its training context a model degrades (llama.cpp warns "possible training context
            # overflow"): run at the context it was trained for. Only such models pay a second load.
            self.llm.close()
            self.llm = self._load(llama_cpp, path, n_ctx_train, n_threads, seed)
        self.path = path
        self.cache_dir = cache_dir
        self.adapter: str | None = None          # applied to the next generation
        self.loaded_adapter: str | None = None   # loaded, ready to apply
        self.refused_adapter: str | None = None  # an active adapter whose file was refused
        self._loaded: Any = None
        self._sha256: str | None = None
        self._tail: int | None = None            # the chat template's tokens after a user message
        self.name = self.llm.metadata.get("general.name") or path.stem
        try:
            self.template = ChatTemplate(self.llm, name=path.name)
        except EmberError:
            self.llm.close()
            raise
        self.template_fallback = self.template.fallback
        if self.template_fallback:
            self.warnings.append(f"{path.name} has no chat template; using ChatML, which may not be "
                                 "the format it was trained on")

    @staticmethod
    def _load(llama_cpp: Any, path: Path, n_ctx: int, n_threads: int, seed: int) -> Any:
        try:
            # llama.cpp's own log goes to memory (`ember doctor`, --verbose), never onto the user's terminal.
            return llama_log.quiet_llama(
                model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads, seed=seed)
        except (ValueError, RuntimeError) as err:
            raise ModelInvalid(f"llama.cpp could not load {path} (truncated, corrupt or unsupported "
                               "GGUF); pass another --model") from err
        except Exception as err:
            # llama-cpp-python compiles the GGUF's chat template while loading: its errors are the model's.
            if type(err).__module__.startswith("jinja2"):
                raise TemplateError(f"the chat template of {path.name} cannot be used ({describe(err)}); "
                                    "pass another --model") from err
            raise

    @property
    def sha256(self) -> str:
        """The model file's SHA-256 (adapters record which base they were trained on)."""
        if self._sha256 is None:
            from adapters.base import file_sha256

            self._sha256 = file_sha256(self.path, self.cache_dir)
        return self._sha256

    def load_adapter(self, path: Path | None, adapter_id: str | None) -> None:
        """Hot-swap the loaded adapter (None: none) and apply it; on error the previous one stays."""
        from adapters import runtime

        if path is None:
            runtime.apply(self.llm, None)
            runtime.free(self._loaded)
            self._loaded, self.loaded_adapter, self.adapter = None, None, None
            return
        new = runtime.load(self.llm, Path(path), base_sha256=self.sha256)
        try:
            runtime.apply(self.llm, new)
        except Exception:
            runtime.free(new)
            runtime.apply(self.llm, self._loaded if self.adapter else None)
            raise
        runtime.free(self._loaded)
        self._loaded, self.loaded_adapter, self.adapter = new, adapter_id, adapter_id

    def use_adapter(self, on: bool) -> None:
        """Generate the next replies with the loaded adapter, or with the base model alone."""
        from adapters import runtime

        want = self.loaded_adapter if on else None
        if want != self.adapter:
            runtime.apply(self.llm, self._loaded if want else None)
            self.adapter = want

    @contextlib.contextmanager
    def adapter_withheld(self) -> Iterator[None]:
        """Answer as the base model alone inside this block (routes and the router see no adapter);
        the loaded adapter stays loaded and is offered again after it."""
        kept = self.loaded_adapter
        self.use_adapter(False)
        self.loaded_adapter = None
        try:
            yield
        finally:
            self.loaded_adapter = kept

    @property
    def n_ctx(self) -> int:
        """The context window in tokens."""
        return self.llm.n_ctx()

    def count_tokens(self, text: str) -> int:
        """How many tokens `text` takes in this model."""
        return len(self.template.tokenize_plain(text))

    def tokenize_chat(self, messages: Sequence[Message]) -> tuple[list[int], list[str]]:
        """The prompt tokens for `messages` in the model's own chat template, and its stop strings."""
        return self.template.prompt(messages)

    def fit(self, messages: Sequence[Message], max_tokens: int) -> tuple[list[int], list[str], int]:
        """Drop the oldest turns until the prompt plus `max_tokens` fits the context.

        The leading system messages and the newest message (with any system message just before it,
        e.g. memories) are always kept, in place; returns (tokens, stop, dropped), `dropped` counting the
        messages left out after the leading system ones.
        """
        if max_tokens < 1 or max_tokens >= self.n_ctx:
            raise InvalidInput(f"--max-tokens must be between 1 and {self.n_ctx - 1} "
                               f"(the context holds {self.n_ctx} tokens), not {max_tokens}")
        budget = self.n_ctx - max_tokens
        lead = 0
        while lead < len(messages) and messages[lead]["role"] == "system":
            lead += 1
        head, turns = list(messages[:lead]), list(messages[lead:])
        if not turns:
            raise InvalidInput("nothing to answer: the conversation has no message")

        def prompt(start: int) -> tuple[list[int], list[str]]:
            return self.tokenize_chat(head + turns[start:])

        tokens, stop = prompt(0)
        if len(tokens) <= budget:
            return tokens, stop, 0
        # Keep whole exchanges: the kept history starts at a user turn (with the system message that may
        # introduce it), or is the newest turn alone.
        def opening(i: int) -> int:
            while i > 0 and turns[i - 1]["role"] == "system":
                i -= 1
            return i

        last = opening(len(turns) - 1)
        starts = sorted({opening(i) for i, m in enumerate(turns) if m["role"] == "user" and 0 < i < len(turns) - 1}
                        | {last})
        starts = [i for i in starts if 0 < i <= last] or [last]
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

    def read_ahead(self, messages: Sequence[Message], max_tokens: int, *,
                   stop: Callable[[], bool] | None = None) -> int:
        """Evaluate the prompt `messages` will make into the KV cache ahead of `generate`, all but the chat
        template's tail (the question's end-of-turn and the assistant's header), so that a later
        `generate` of the same messages, or of messages whose last text goes on from this one's,
        evaluates only what follows. What the cache holds beyond the shared start is replaced.

        For a message still being typed: its last message is the draft cut after its last complete
        word. Never leaves one token alone to evaluate (see `assistant.probe._whole_batches`: llama.cpp's
        one-token kernels differ from those of larger batches). Returns the tokens evaluated.
        Raises what `fit` raises.

        `stop` is asked after every READ_AHEAD_SLICE tokens: when it answers True (the user sent the
        message, or typed on) the rest is left, and what was read stays in the cache for the next call.
        """
        from assistant.probe import _whole_batches

        tokens = self.fit(messages, max_tokens)[0]
        head = tokens[:len(tokens) - self.template_tail()]
        held = self.llm.input_ids[:self.llm.n_tokens]
        keep = 0
        for a, b in zip(held, head):
            if a != b:
                break
            keep += 1
        if keep >= len(head):
            return 0
        keep = _whole_batches(keep, len(head))
        self.llm.n_tokens = keep   # llm.eval clears the KV cache from n_tokens on before evaluating
        done = keep
        while done < len(head):
            end = done + READ_AHEAD_SLICE
            end = len(head) if len(head) - end < 2 else end   # never a single token alone
            self.llm.eval(head[done:end])
            done = end
            if stop is not None and done < len(head) and stop():
                break
        return done - keep

    def template_tail(self) -> int:
        """How many tokens the chat template puts after a user message's text: the tokens two prompts of
        different texts share at their end."""
        if self._tail is None:
            a = self.tokenize_chat([{"role": "user", "content": "north"}])[0]
            b = self.tokenize_chat([{"role": "user", "content": "south?"}])[0]
            n = 0
            while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
                n += 1
            self._tail = n
        return self._tail

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
        self._loaded = None
