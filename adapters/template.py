"""A model's chat template and tokenizer, from its GGUF, shared by the chat engine and the trainers.

Training must see exactly the token sequences the chat produces, so both go through this one class:
the template comes from the GGUF's `tokenizer.chat_template` (ChatML when it has none) and the tokens
from llama.cpp's own tokenizer (a vocab-only load takes ~0.1 s; no transformers tokenizer needed).
"""
from __future__ import annotations

from typing import Any, Sequence

# Used only when a GGUF carries no `tokenizer.chat_template` (llama.cpp's server does the same).
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
          " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")

Message = dict[str, str]


class ChatTemplate:
    """Render and tokenize messages the way a given llama.cpp model expects them."""

    def __init__(self, llm: Any):
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.llm = llm
        model = llm._model
        eos, bos = llm.token_eos(), llm.token_bos()
        options = dict(template=llm.metadata.get("tokenizer.chat_template") or CHATML,
                       eos_token=model.token_get_text(eos) if eos != -1 else "",
                       bos_token=model.token_get_text(bos) if bos != -1 else "",
                       stop_token_ids=[eos])
        self._prompt = Jinja2ChatFormatter(**options)
        self._closed = Jinja2ChatFormatter(**options, add_generation_prompt=False)

    @classmethod
    def from_gguf(cls, path: str) -> "ChatTemplate":
        """Load only the vocabulary and template of a GGUF (no weights)."""
        import llama_cpp
        from llama_cpp._utils import suppress_stdout_stderr

        # A vocab-only load still builds a context, and llama.cpp logs a spurious warning about it.
        with suppress_stdout_stderr(disable=False):
            return cls(llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False))

    def tokenize(self, text: str, *, bos: bool = False) -> list[int]:
        """Tokens of `text`, template markers (e.g. `<|im_end|>`) read as special tokens."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=bos, special=True)

    def prompt(self, messages: Sequence[Message]) -> tuple[list[int], list[str]]:
        """Prompt tokens asking the model for the next assistant turn, and the template's stop strings."""
        result = self._prompt(messages=list(messages))
        tokens = self.tokenize(result.prompt, bos=not result.added_special)
        stop = result.stop if isinstance(result.stop, list) else [result.stop] if result.stop else []
        return tokens, stop

    def target(self, context: Sequence[Message], message: Message) -> tuple[list[int], list[int]]:
        """(context tokens, message tokens) for training on `message` after `context`.

        The message's tokens are its content plus the template's end-of-turn marker, so the model also
        learns where the turn stops; the context ends with the message's own header (e.g.
        `<|im_start|>user\\n`). Tokenizing the two parts apart matches how the model generates them.
        """
        result = self._closed(messages=[*context, message])
        text = result.prompt
        start = text.rfind(message["content"]) if message["content"] else len(text.rstrip())
        if start < 0:
            raise ValueError("the chat template changed the message text; cannot locate it")
        end = start + len(message["content"])
        closing = text[end:].rstrip()   # e.g. "<|im_end|>"; the newline after it carries no signal
        return (self.tokenize(text[:start], bos=not result.added_special),
                self.tokenize(text[start:end] + closing))
