"""The evaluation gate: an adapter is promoted only if it beats both the base model and the adapter in
use on the held-out examples, and still behaves on a few fixed prompts.

"Still behaves" is measured, not eyeballed: the base model reads the candidate's greedy replies to general
requests and scores them (mean negative log-likelihood per token, in nats). Fluent text stays close to what
the base model itself expects; degenerate text (broken words, runs of unrelated tokens, a sign-off and no
answer) does not. A habit the user taught that opens every reply adds its own tokens' surprise too: the limit
was set on the adapters measured in the README, none of which learned a habit and kept answering well.
The base model's own perplexity as a judge of generated text is the standard automatic fluency measure
(e.g. "generation perplexity" under a reference model, Holtzman et al., arXiv 1904.09751); here the
reference is the very model the adapter was trained on.

Everything is measured on what the chat will actually run: the quantized GGUF in llama.cpp with the
exported adapter file applied, not the float torch model it was trained in.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Sequence

from adapters import runtime
from adapters.dataset import Example
from adapters.errors import AdapterInvalid, AdapterMismatch
from adapters.template import ChatTemplate

# General requests any assistant must keep handling; an adapter that breaks them is rejected.
BEHAVIOUR_PROMPTS = (
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "List three colours.",
    "Say hello.",
    "Name a large animal.",
    "How many days are in a week?",
)
BEHAVIOUR_TOKENS = 32
MIN_DISTINCT = 0.3      # a reply whose tokens are mostly repeats has degenerated
# Nats per token the base model may find the candidate's replies more surprising than its own. Measured
# (README, "The gate's behaviour check"): adapters that should pass reached 0.68 at most on a random tiny
# model, -0.17 to +0.02 on SmolLM2 under DP and 0.98-1.36 on a tiny chat model under DP; over-trained ones
# whose replies stopped being answers, without a repeat, 1.71-2.29 (SmolLM2, no DP: the habit user's
# adapters that reply "Ahoy, matey!" and nothing else) and 6.49 (tiny chat).
MAX_SURPRISE = 1.6


@dataclasses.dataclass
class Verdict:
    """The gate's decision and the figures behind it."""

    promote: bool
    reason: str
    heldout_loss: float
    base_loss: float
    current_loss: float | None
    behaviour: list[dict[str, Any]]
    surprise: float | None = None          # nats/token: the base model reading the candidate's replies ...
    base_surprise: float | None = None     # ... and its own greedy replies to the same prompts

    def as_json(self) -> dict[str, Any]:
        """The figures, as stored in the registry and printed by `ember adapt --json`."""
        return {"heldout_loss": round(self.heldout_loss, 4), "base_loss": round(self.base_loss, 4),
                "current_loss": None if self.current_loss is None else round(self.current_loss, 4),
                "heldout_perplexity": round(math.exp(self.heldout_loss), 3),
                "base_perplexity": round(math.exp(self.base_loss), 3),
                "behaviour": self.behaviour, "promoted": self.promote, "reason": self.reason,
                "surprise": None if self.surprise is None else round(self.surprise, 3),
                "base_surprise": None if self.base_surprise is None else round(self.base_surprise, 3),
                "max_surprise": MAX_SURPRISE}


class Evaluator:
    """A llama.cpp instance with all logits kept, to score sequences with and without an adapter."""

    def __init__(self, model_path: Path, *, n_ctx: int, threads: int, base_sha256: str | None):
        from adapters.llama_log import quiet_llama

        self.llm = quiet_llama(model_path=str(model_path), n_ctx=n_ctx, n_batch=min(n_ctx, 512),
                               logits_all=True, n_threads=threads, n_threads_batch=threads, seed=0)
        self.template = ChatTemplate(self.llm, name=Path(model_path).name)
        self.base_sha256 = base_sha256
        self.loaded: runtime.Loaded | None = None
        self._base_replies: list[dict[str, Any]] | None = None

    def use(self, adapter: Path | None) -> None:
        """Score with this adapter from now on (None: the base model)."""
        new = runtime.load(self.llm, adapter, base_sha256=self.base_sha256) if adapter else None
        runtime.apply(self.llm, new)
        runtime.free(self.loaded)
        self.loaded = new

    def token_nll(self, prefix: Sequence[int], tokens: Sequence[int]) -> list[float]:
        """Negative log-likelihood (nats) of each of `tokens` after `prefix`, with the loaded adapter."""
        import numpy as np

        self.llm.reset()
        self.llm.eval([*prefix, *tokens])
        logits = np.asarray(self.llm.scores[len(prefix) - 1:len(prefix) + len(tokens) - 1], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        return [float(v) for v in -log_probs[np.arange(len(tokens)), np.asarray(tokens)]]

    def sequence_loss(self, tokens: Sequence[int], loss_from: int) -> float:
        """Mean negative log-likelihood of `tokens[loss_from:]` given what comes before."""
        import numpy as np

        self.llm.reset()
        self.llm.eval(list(tokens))
        logits = np.asarray(self.llm.scores[loss_from - 1:len(tokens) - 1], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        targets = np.asarray(tokens[loss_from:])
        return float(-log_probs[np.arange(len(targets)), targets].mean())

    def continuation_logprobs(self, prefix: Sequence[int], continuations: Sequence[Sequence[int]]) -> list[float]:
        """Total log-probability of each continuation after `prefix` (the prefix is evaluated once)."""
        import numpy as np

        self.llm.reset()
        self.llm.eval(list(prefix))
        out = []
        for tokens in continuations:
            self.llm.n_tokens = len(prefix)       # drop the previous continuation, keep the prefix
            self.llm.eval(list(tokens))
            logits = np.asarray(self.llm.scores[len(prefix) - 1:len(prefix) + len(tokens) - 1],
                                dtype=np.float64)
            logits -= logits.max(axis=1, keepdims=True)
            log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
            out.append(float(log_probs[np.arange(len(tokens)), np.asarray(tokens)].sum()))
        return out

    def loss(self, examples: Sequence[Example]) -> float:
        """Mean per-example loss, as in training."""
        return sum(self.sequence_loss(e.tokens, e.loss_from) for e in examples) / len(examples)

    def reply(self, prompt: str, max_tokens: int = BEHAVIOUR_TOKENS) -> tuple[str, list[int]]:
        """Greedy reply to a one-message conversation."""
        tokens, stop = self.template.prompt([{"role": "user", "content": prompt}])
        self.llm.reset()
        out = self.llm.create_completion(prompt=tokens, max_tokens=max_tokens, temperature=0.0,
                                         stop=stop, seed=0)
        text = out["choices"][0]["text"]
        return text, self.llm.tokenize(text.encode(), add_bos=False) if text else []

    def behaviour(self) -> list[dict[str, Any]]:
        """The fixed prompts' greedy replies with the loaded adapter: [{prompt, reply, tokens, repetitive}]."""
        results = []
        for prompt in BEHAVIOUR_PROMPTS:
            text, tokens = self.reply(prompt)
            distinct = len(set(tokens)) / len(tokens) if tokens else 0.0
            results.append({"prompt": prompt, "reply": text.strip(), "tokens": tokens,
                            "repetitive": not text.strip() or (len(tokens) >= 8 and distinct < MIN_DISTINCT)})
        return results

    def surprise(self, replies: Sequence[dict[str, Any]]) -> list[float | None]:
        """Mean NLL per token (nats) of each reply as the answer to its prompt, under the loaded model
        (None for an empty reply)."""
        out: list[float | None] = []
        for r in replies:
            prefix, _ = self.template.prompt([{"role": "user", "content": r["prompt"]}])
            out.append(sum(nll := self.token_nll(prefix, r["tokens"])) / len(nll) if r["tokens"] else None)
        return out

    def base_replies(self) -> list[dict[str, Any]]:
        """The base model's own replies to the behaviour prompts, with their surprise (computed once: the
        base model does not change during an evaluator's life). Leaves the base model loaded."""
        self.use(None)
        if self._base_replies is None:
            replies = self.behaviour()
            for r, value in zip(replies, self.surprise(replies)):
                r["surprise"] = value
            self._base_replies = replies
        return self._base_replies

    def close(self) -> None:
        """Free the model."""
        self.llm.close()


def judge(evaluator: Evaluator, heldout: Sequence[Example], candidate: Path,
          current: Path | None) -> Verdict:
    """Score base, current and candidate on the held-out examples, read the candidate's replies to the
    behaviour prompts with the base model, and decide."""
    reference = evaluator.base_replies()
    base_loss = evaluator.loss(heldout)
    current_loss = None
    if current is not None:
        try:
            evaluator.use(current)
            current_loss = evaluator.loss(heldout)
        except (AdapterInvalid, AdapterMismatch):
            current_loss = None   # the chat refuses it too: compare with the base model alone
    evaluator.use(candidate)
    loss = evaluator.loss(heldout)
    replies = evaluator.behaviour()
    evaluator.use(None)
    behaviour = [{"prompt": r["prompt"], "reply": r["reply"], "ok": not r["repetitive"], "repetitive": r["repetitive"],
                  "surprise": None if value is None else round(value, 3),
                  "base_reply": b["reply"], "base_surprise": None if b["surprise"] is None else round(b["surprise"], 3)}
                 for r, b, value in zip(replies, reference, evaluator.surprise(replies))]
    surprise, base_surprise = mean_surprise(behaviour)
    broken = [b["prompt"] for b in behaviour if b["repetitive"]]
    if loss >= base_loss:
        promote, reason = False, (f"held-out loss {loss:.3f} is not below the base model's "
                                  f"{base_loss:.3f}")
    elif current_loss is not None and loss >= current_loss:
        promote, reason = False, (f"held-out loss {loss:.3f} is not below the current adapter's "
                                  f"{current_loss:.3f}")
    elif broken:
        promote, reason = False, f"replies degenerate on behaviour prompts: {'; '.join(broken)}"
    elif surprise is not None and base_surprise is not None and surprise > base_surprise + MAX_SURPRISE:
        promote, reason = False, (f"replies to general requests degraded: the base model reads them at "
                                  f"{surprise:.2f} nats/token, its own at {base_surprise:.2f} (at most "
                                  f"{MAX_SURPRISE:g} more allowed)")
    else:
        promote, reason = True, (f"held-out loss {loss:.3f} < base {base_loss:.3f}"
                                 + (f", current {current_loss:.3f}" if current_loss is not None else "")
                                 + (f"; general requests {surprise - base_surprise:+.2f} nats/token over the base's "
                                    f"own replies (at most {MAX_SURPRISE:g})"
                                    if surprise is not None and base_surprise is not None else ""))
    return Verdict(promote, reason, loss, base_loss, current_loss, behaviour, surprise, base_surprise)


def mean_surprise(behaviour: Sequence[dict[str, Any]]) -> tuple[float | None, float | None]:
    """The candidate's and the base model's surprise, each averaged over the prompts both replied to."""
    pairs = [(b["surprise"], b["base_surprise"]) for b in behaviour
             if b["surprise"] is not None and b["base_surprise"] is not None]
    if not pairs:
        return None, None
    return sum(p[0] for p in pairs) / len(pairs), sum(p[1] for p in pairs) / len(pairs)
