"""Per request: answer from memory (RAG), with the personal adapter, both, or neither.

Retrieval wins at recalling specific facts; the adapter at the user's style, habits and recurring tasks.
The router measures, per request, where the answer is likely to live and how hard the request is for the
model, then applies a few explainable rules:

- features: the best note's cosine similarity and its margin over the second (dense retrieval, which
  RAG needs anyway: its hits are reused when memory is used), the BM25 match, the query's type (fact
  recall, temporal, task, open), the model's uncertainty on a short probe (mean entropy of the first
  PROBE_TOKENS greedy tokens) with and without the adapter, and the adapter's age and gate score;
- cheap first: no memory, no search; BM25 runs before the question is embedded, and a task or open
  question that shares no word with any note is not embedded at all (`needs_dense`); the probe runs only
  when an adapter is loaded (without one its answer is never used), beside the chat's context, never in
  it (assistant/probe.py), so the conversation's KV cache survives every decision;
- rules, per query type: use memory when the best note is at least `min_similarity`; use the adapter
  when the probe says it makes the model surer by at least `min_adapter_gain` nats;
- thresholds start from DEFAULTS and are fitted (`fit`) on the user's own log during idle time: replies
  the user approved or edited are the reference answers, each route is scored by how likely it makes
  that answer, and each type's thresholds are set to those that pick the best routes.

Every decision is logged with its features (storage/routing.py) so the policy can be checked and refitted.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import math
import re
import time
import weakref
from typing import TYPE_CHECKING, Any, Callable, Collection, Sequence

import numpy as np

from assistant.probe import PROBE_MAX_TOKENS, PROBE_TOKENS, prober_for
from assistant.retrieval import Hit, time_window
from storage import memory, registry
from storage import routing as log

if TYPE_CHECKING:
    import sqlite_utils

    from assistant.engine import Engine
    from assistant.retrieval import Retriever

TYPES = ("recall", "temporal", "task", "open")
NEVER = math.inf
# Before any fitting: memory for questions about the user's past when a note is a fair match, and for
# anything else only on a near-duplicate; the adapter when it makes the model clearly surer.
DEFAULTS: dict[str, dict[str, float]] = {
    "recall": {"min_similarity": 0.35, "min_adapter_gain": 1.0},
    "temporal": {"min_similarity": 0.30, "min_adapter_gain": 1.0},
    "task": {"min_similarity": 0.75, "min_adapter_gain": 0.3},
    "open": {"min_similarity": 0.60, "min_adapter_gain": 0.5},
}
MIN_ITEMS_PER_TYPE = 4     # fewer labelled items of a type than this: its defaults stay
# A task or open question that shares no content word with any note is not embedded when its type's
# threshold asks for at least this similarity. Measured on MemoryBank (benchmarks/dense_skip.py: 1,340
# task and open questions against 15 users' earlier days, alone and pooled): the 554 that shared no word
# had no note above 0.42 cosine, and skipping them changed no route. Recall and temporal questions are
# always embedded: their thresholds are low (0.30-0.35), and one temporal question sharing no word
# did reach 0.34.
DENSE_SKIP_MIN_SIMILARITY = 0.5

_RECALL = re.compile(
    r"\b(remember|recall|remind me|forgot|forget|mention(ed)?|told you|i told|i said|you said|you told|once|"
    r"last time|earlier|before)\b|\byou (once |ever )?(recommended|suggested|mentioned|told|taught|gave|shared|said)\b|"
    r"\b(did|have|had) you (ever )?(recommend|suggest|mention|tell|teach|give|given|share|say|told|recommended)\b|"
    r"\bi (once |recently )?(recommended|suggested|shared|told|mentioned)\b|\bwe (talked|discussed|spoke)\b",
    re.IGNORECASE)
_TASK = re.compile(
    r"^\W*(please\s+)?(write|draft|rewrite|compose|reply|respond|summari[sz]e|translate|plan|make|create|"
    r"give me|list|suggest|help me|explain|fix|edit|improve|outline)\b|\bhow (should|do|can|could|would) (i|we)\b|"
    r"\b(should|could|can) (i|we)\b|\bin my (style|voice|words)\b|\b(any|some) (tips|advice|ideas|suggestions)\b|"
    r"\b(tips|advice|ideas) (to|for|on)\b|\bbest way to\b", re.IGNORECASE)
_ABOUT_ME = re.compile(r"\b(i|i'm|i've|my|me|mine|we|our|us)\b", re.IGNORECASE)
_WHEN = re.compile(r"\b(when (did|was|were|do|will)|how long ago|what (day|date|time))\b", re.IGNORECASE)
_PAST = re.compile(r"\b(did|was|were|had|ago|yesterday|last|earlier|before|went|said|told)\b", re.IGNORECASE)


def query_type(question: str, now: dt.date | None = None) -> str:
    """recall (about the user's past or stated facts), temporal (about when), task (a request), or open.

    A request about the present or future that names a time ("what should I cook tonight?") is a task:
    the time says when to do it, not what to look up."""
    if _WHEN.search(question):
        return "temporal"
    if time_window(question, now or dt.date.today()) and not (_TASK.search(question) and not _PAST.search(question)):
        return "temporal"
    if _RECALL.search(question):
        return "recall"
    if _TASK.search(question):
        return "task"
    if "?" in question and _ABOUT_ME.search(question):   # a question about the user: their own facts
        return "recall"
    return "open"


@dataclasses.dataclass
class Features:
    """What the router knew about one request."""

    query_type: str
    similarity: float | None = None        # cosine of the best note (None: no memory to search)
    margin: float | None = None            # best minus second best
    bm25: float | None = None              # best BM25 score (None: no word matched)
    entropy_base: float | None = None      # mean entropy (nats) of the first probe tokens, base model
    entropy_adapter: float | None = None   # ... with the adapter (both None: no adapter, so no probe)
    adapter_age_hours: float | None = None
    adapter_eval_gain: float | None = None  # the gate's base loss minus the adapter's held-out loss
    memory_chunks: int = 0
    dense_skipped: bool = False            # not embedded: no note shares a word with it (`needs_dense`)
    decided_ahead: bool = False            # measured while the message was typed (`decide(ahead=True)`)

    @property
    def adapter_gain(self) -> float | None:
        """How much surer the adapter makes the model on this request (nats; None: no adapter)."""
        if self.entropy_base is None or self.entropy_adapter is None:
            return None
        return self.entropy_base - self.entropy_adapter

    def as_json(self) -> dict[str, Any]:
        out = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in dataclasses.asdict(self).items()}
        gain = self.adapter_gain
        out["adapter_gain"] = None if gain is None else round(gain, 4)
        return out


@dataclasses.dataclass
class Decision:
    """The route for one request, why, and what it was decided on."""

    route: str
    reason: str
    features: Features
    hits: list[Hit]                  # the memories found (used when the route includes memory)
    seconds: float
    policy_id: int | None

    def as_json(self) -> dict[str, Any]:
        return {"route": self.route, "reason": self.reason, "features": self.features.as_json(),
                "seconds": round(self.seconds, 4), "policy_id": self.policy_id}


def choose(features: Features, thresholds: dict[str, dict[str, float]], *, adapter: bool) -> tuple[str, str]:
    """(route, reason) for `features` under `thresholds`; the rules of the module docstring."""
    rule = thresholds.get(features.query_type, DEFAULTS[features.query_type])
    why = [f"{features.query_type} question"]
    memory = False
    if features.similarity is None:
        why.append("no note shares a word with it (not embedded)" if features.dense_skipped
                   else "no memory to search" if not features.memory_chunks else "no note found")
    else:
        memory = features.similarity >= rule["min_similarity"]
        why.append(f"best note {features.similarity:.2f} {'≥' if memory else '<'} {_show(rule['min_similarity'])}")
    use_adapter = False
    gain = features.adapter_gain
    if not adapter:
        why.append("no adapter")
    elif not math.isfinite(rule["min_adapter_gain"]):   # fitted to always or never: no probe needed
        use_adapter = rule["min_adapter_gain"] < 0
        why.append(f"adapter {'always' if use_adapter else 'never'} for {features.query_type} questions")
    elif gain is not None:
        use_adapter = gain >= rule["min_adapter_gain"]
        why.append(f"adapter gain {gain:+.2f} nats {'≥' if use_adapter else '<'} {_show(rule['min_adapter_gain'])}")
    route = "both" if memory and use_adapter else "rag" if memory else "adapter" if use_adapter else "base"
    return route, "; ".join(why)


def _show(threshold: float) -> str:
    return "never" if threshold == NEVER else "any" if threshold == -NEVER else f"{threshold:.2f}"


def thresholds_in_use(db: sqlite_utils.Database) -> tuple[dict[str, dict[str, float]], int | None]:
    """The fitted thresholds (DEFAULTS for any type not fitted) and the policy id, None when unfitted."""
    policy = log.current_policy(db)
    fitted = policy["thresholds"] if policy else {}
    merged = {t: {k: _decode(v) for k, v in fitted.get(t, DEFAULTS[t]).items()} for t in TYPES}
    return merged, policy["id"] if policy else None


def _encode(value: float) -> float | str:
    return "never" if value == NEVER else "any" if value == -NEVER else value


def _decode(value: float | str) -> float:
    return NEVER if value == "never" else -NEVER if value == "any" else float(value)


def _probe_prompt(engine: Engine, system: str | None, question: str) -> list[int]:
    """The question alone in the chat template, its text cut to fit PROBE_MAX_TOKENS (a pasted document
    need not be read twice more to know how the answer starts; the reply itself sees all of it)."""
    def prompt(text: str) -> list[int]:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        return engine.tokenize_chat(messages)[0]

    tokens = prompt(question)
    while len(tokens) > PROBE_MAX_TOKENS and len(question) > 1:
        question = question[: max(1, int(len(question) * PROBE_MAX_TOKENS / len(tokens) * 0.9))]
        tokens = prompt(question)
    return tokens


def read_ahead(draft: str, *, engine: Engine, db: sqlite_utils.Database, system: str | None) -> int:
    """Feed the words of `draft`, a message the user is still typing, to the adapter probe, so that the
    decision when it is sent evaluates only its last word and the chat template's tail. Stores nothing.

    Only when the probe will run: an adapter is loaded and the thresholds in use weigh it for the
    draft's query type. The draft is cut after its last complete word (the word being typed would
    change its tokens). Returns the tokens evaluated per lane (0: nothing to do or all held already).
    The chat decides for the whole draft instead (`decide(ahead=True)`), whose probe leaves the lanes
    the same words; `ember bench engine` uses this to measure a decision made as Enter comes with the
    last word.
    """
    loaded = engine._loaded if engine.loaded_adapter else None
    cut = len(draft.rstrip()) - len(draft.rstrip().split()[-1]) if draft.strip() else 0
    words = draft[:cut].rstrip()
    if loaded is None or not words:
        return 0
    thresholds, _ = thresholds_in_use(db)
    rule = thresholds.get(query_type(draft), DEFAULTS[query_type(draft)])
    if not math.isfinite(rule["min_adapter_gain"]):
        return 0
    tokens = _probe_prompt(engine, system, words)
    tail = engine.template_tail()
    return prober_for(engine).read_ahead(tokens[:len(tokens) - tail], loaded) if len(tokens) > tail else 0


def needs_dense(kind: str, rule: dict[str, float]) -> Callable[[dict[str, Any]], bool]:
    """Whether a question of type `kind` must be embedded, given its BM25 signals: always for recall and
    temporal questions; for task and open ones only when a note shares a word with the question or the
    threshold in use is low enough for a paraphrase to reach it (DENSE_SKIP_MIN_SIMILARITY)."""
    def decide_dense(signals: dict[str, Any]) -> bool:
        return (kind in ("recall", "temporal") or signals["bm25"] is not None
                or rule["min_similarity"] < DENSE_SKIP_MIN_SIMILARITY)
    return decide_dense


def features_for(question: str, *, engine: Engine, retriever: Retriever | None, db: sqlite_utils.Database,
                 system: str | None, k: int, now: dt.date | None = None,
                 before_message: int | None = None, exclude_message_ids: Collection[int] = (),
                 thresholds: dict[str, dict[str, float]] | None = None) -> tuple[Features, list[Hit]]:
    """Measure the features of one request; also returns the memories found (best first).

    `before_message` searches memory as it was before that message (fitting on past questions);
    `exclude_message_ids` leaves out notes made from messages already in the prompt. With `thresholds`
    (deciding), a question they cannot route to memory without a shared word is not embedded; without
    (fitting), every feature is measured.
    """
    f = Features(query_type=query_type(question, now))
    hits: list[Hit] = []
    if retriever is not None:
        retriever.sync()             # the log's newest messages become memory (vectors when searched)
        # A count, not memory.stats: stats scans every chunk (~20 ms at 10,000), this walks an index.
        f.memory_chunks = db["memory_chunks"].count
    if retriever is not None and f.memory_chunks:
        dense_if = None if thresholds is None else needs_dense(
            f.query_type, thresholds.get(f.query_type, DEFAULTS[f.query_type]))
        hits, signals = retriever.search_with_signals(question, k, now=now, before_message=before_message,
                                                      exclude_message_ids=exclude_message_ids,
                                                      dense_if=dense_if)
        f.similarity, f.margin, f.bm25 = signals["similarity"], signals["margin"], signals["bm25"]
        f.dense_skipped = not signals["dense"]
    loaded = engine._loaded if engine.loaded_adapter else None
    rule = (thresholds or DEFAULTS).get(f.query_type, DEFAULTS[f.query_type])
    if loaded is not None and (thresholds is None or math.isfinite(rule["min_adapter_gain"])):
        # Beside the chat's context, never in it: the conversation's KV cache stays for the reply.
        tokens = _probe_prompt(engine, system, question)
        f.entropy_base, f.entropy_adapter = prober_for(engine).entropies(tokens, loaded)
    row = registry.active(db) if loaded is not None else None
    if row and engine.loaded_adapter == row["id"]:
        created = dt.datetime.fromisoformat(row["created"])
        f.adapter_age_hours = (dt.datetime.now(created.tzinfo) - created).total_seconds() / 3600
        ev = row.get("eval") or {}
        if ev.get("base_loss") is not None and ev.get("heldout_loss") is not None:
            f.adapter_eval_gain = ev["base_loss"] - ev["heldout_loss"]
    return f, hits


# The last decision made ahead per engine, while its message was typed: (what it depends on, Decision).
_AHEAD: weakref.WeakKeyDictionary[Engine, tuple[tuple[Any, ...], Decision]] = weakref.WeakKeyDictionary()


def _depends_on(question: str, *, engine: Engine, retriever: Retriever | None, db: sqlite_utils.Database,
                system: str | None, k: int, now: dt.date | None, in_prompt: Collection[int],
                asked_id: int | None, policy_id: int | None) -> tuple[Any, ...]:
    """Everything a decision on `question` depends on: the question, system prompt and k, the day (time
    windows), the messages in the prompt (the question's own, `asked_id`, aside: a draft has none), the
    memory a search sees and the feedback that filters it (`memory.search_state`), the loaded adapter,
    and the thresholds in use."""
    state = memory.search_state(db, in_prompt) if retriever is not None else None
    return (question, system, k, now or dt.date.today(), frozenset(in_prompt) - {asked_id},
            engine.loaded_adapter, policy_id, state)


def decide(question: str, *, engine: Engine, retriever: Retriever | None, db: sqlite_utils.Database,
           system: str | None, k: int, now: dt.date | None = None,
           exclude_message_ids: Collection[int] = (), asked_id: int | None = None,
           ahead: bool = False) -> Decision:
    """Features, then the route under the thresholds in use.

    `exclude_message_ids`: the messages the prompt will hold (this conversation's turns that fit, and
    the question): notes made from them are neither counted as matches nor returned as memories.

    `ahead=True` decides for a message still being typed, and keeps the decision: when the message is
    sent (`asked_id`, the id it was logged with) and nothing the decision depends on has changed since
    (`_depends_on`: the same words, memory, feedback, adapter and thresholds; the message's own notes
    aside), that decision is returned without measuring again, its features marked `decided_ahead` and
    its `seconds` the time the check took. Otherwise it is measured as it is sent.
    """
    started = time.perf_counter()
    thresholds, policy_id = thresholds_in_use(db)
    if retriever is not None and ahead:
        # Every note a search may use gets its vector now, so that searching changes nothing it depends on.
        retriever.refresh(skip_messages=exclude_message_ids)
    elif retriever is not None:
        retriever.sync()   # the log's newest messages are part of what the decision depends on

    def depends() -> tuple[Any, ...]:
        return _depends_on(question, engine=engine, retriever=retriever, db=db, system=system, k=k, now=now,
                           in_prompt=exclude_message_ids, asked_id=asked_id, policy_id=policy_id)

    before = depends()
    kept = _AHEAD.pop(engine, None)
    if not ahead and kept is not None and kept[0] == before:
        decision = kept[1]
        return dataclasses.replace(decision, seconds=time.perf_counter() - started,
                                   features=dataclasses.replace(decision.features, decided_ahead=True))
    features, hits = features_for(question, engine=engine, retriever=retriever, db=db, system=system, k=k,
                                  now=now, exclude_message_ids=exclude_message_ids, thresholds=thresholds)
    route, reason = choose(features, thresholds, adapter=engine.loaded_adapter is not None)
    decision = Decision(route, reason, features, hits, time.perf_counter() - started, policy_id)
    if ahead and depends() == before:   # kept only if nothing changed while it was measured
        _AHEAD[engine] = (before, decision)
    return decision


def record(db: sqlite_utils.Database, decision: Decision, message_id: int | None) -> None:
    """Log `decision` for the reply `message_id`."""
    log.record_decision(db, message_id, decision.route, decision.reason, decision.features.as_json(),
                        decision.policy_id, decision.seconds)


# ---- fitting the thresholds on the user's own log ----------------------------------------------

ROUTES = ("base", "rag", "adapter", "both")


@dataclasses.dataclass
class Item:
    """One labelled request: its features and how well each route would have answered it."""

    features: Features
    quality: dict[str, float]        # route -> mean log-probability of the reference answer
    category: str = ""


def fit_thresholds(items: Sequence[Item], *, adapter: bool,
                   start: dict[str, dict[str, float]] | None = None) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """Per query type, the thresholds whose routes score best on `items` (a grid over observed values).

    A type with fewer than MIN_ITEMS_PER_TYPE items keeps its `start` (DEFAULTS) thresholds; ties go to the
    start values, then to using memory and the adapter less (cheaper, and less to explain).
    """
    start = start or DEFAULTS
    fitted: dict[str, dict[str, float]] = {}
    report: dict[str, Any] = {}
    for t in TYPES:
        mine = [i for i in items if i.features.query_type == t]
        base_rule = dict(start.get(t, DEFAULTS[t]))
        if len(mine) < MIN_ITEMS_PER_TYPE:
            fitted[t] = base_rule
            report[t] = {"items": len(mine), "fitted": False}
            continue
        sims = sorted({i.features.similarity for i in mine if i.features.similarity is not None})
        gains = sorted({i.features.adapter_gain for i in mine if i.features.adapter_gain is not None})
        sim_grid = [base_rule["min_similarity"], NEVER, -NEVER, *sims]
        gain_grid = [base_rule["min_adapter_gain"], NEVER, -NEVER, *gains] if adapter else [base_rule["min_adapter_gain"]]

        def score(rule: dict[str, float]) -> float:
            return float(np.mean([i.quality[choose(i.features, {t: rule}, adapter=adapter)[0]] for i in mine]))

        def cost(rule: dict[str, float]) -> float:
            routes = [choose(i.features, {t: rule}, adapter=adapter)[0] for i in mine]
            return sum(r in ("rag", "both") for r in routes) + sum(r in ("adapter", "both") for r in routes)

        start_score = score(base_rule)
        best, best_key = base_rule, (start_score, 1, 0.0)
        for s in sim_grid:
            for g in gain_grid:
                rule = {"min_similarity": s, "min_adapter_gain": g}
                key = (score(rule), 0, -cost(rule))
                if key > best_key:
                    best, best_key = rule, key
        fitted[t] = best
        report[t] = {"items": len(mine), "fitted": True, "score_before": round(start_score, 4),
                     "score_after": round(best_key[0], 4),
                     "routes": {r: sum(choose(i.features, {t: best}, adapter=adapter)[0] == r for i in mine)
                                for r in ROUTES}}
    return fitted, report


def encode_thresholds(thresholds: dict[str, dict[str, float]]) -> dict[str, dict[str, float | str]]:
    """JSON-safe thresholds (never/any for ±infinity)."""
    return {t: {k: _encode(v) for k, v in rule.items()} for t, rule in thresholds.items()}


def route_quality(evaluator: Any, question: str, answer: str, hits: list[Hit], *, system: str | None,
                  adapter_path: Any, memory_prompt: Callable[[list[Hit]], str]) -> dict[str, float]:
    """Mean log-probability per token of `answer` to `question` under each route (higher is better).

    Scored in llama.cpp on the quantized model, with the adapter file applied for adapter and both.
    """
    out: dict[str, float] = {}
    for use_adapter in (False, True):
        if use_adapter and adapter_path is None:
            continue
        evaluator.use(adapter_path if use_adapter else None)
        for with_memory in (False, True):
            parts = [system, memory_prompt(hits) if with_memory and hits else None]
            content = "\n\n".join(p for p in parts if p)
            context = ([{"role": "system", "content": content}] if content else []) + [
                {"role": "user", "content": question}]
            prefix, target = evaluator.template.target(context, {"role": "assistant", "content": answer})
            route = {(False, False): "base", (False, True): "rag", (True, False): "adapter",
                     (True, True): "both"}[(use_adapter, with_memory)]
            out[route] = -evaluator.sequence_loss(prefix + target, len(prefix))
    evaluator.use(None)
    if adapter_path is None:
        out["adapter"], out["both"] = out["base"], out["rag"]
    return out


def labelled(db: sqlite_utils.Database, limit: int = 200) -> list[tuple[int, str, str]]:
    """(question's message id, question, the answer the user wanted) for the newest `limit` replies the
    user approved or edited, in conversations not kept out of learning."""
    from storage import conversations as convs
    from storage import feedback
    from storage.errors import NotFound

    said = feedback.state(db)
    wanted = sorted((mid for mid, s in said.items() if s["edit"] or s["rating"] == "up"), reverse=True)
    excluded = feedback.excluded_conversations(db)
    out: list[tuple[int, str, str]] = []
    for mid in wanted:
        try:
            reply = convs.get_message(db, mid)
        except NotFound:
            continue
        if reply["role"] != "assistant" or reply["conversation_id"] in excluded:
            continue
        path = [m["id"] for m in convs.branch(db, reply["conversation_id"], through=mid)]
        before = [m for m in convs.messages(db, reply["conversation_id"]) if m["id"] in path[:path.index(mid)]]
        question = next((m for m in reversed(before) if m["role"] == "user"), None)   # the one it answered
        answer = said[mid]["edit"] or reply["content"]
        if question and question["content"].strip() and answer and answer.strip():
            out.append((question["id"], question["content"], answer))
        if len(out) == limit:
            break
    return out


def fit_from_log(db: sqlite_utils.Database, settings: Any, *,
                 should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Fit the thresholds on the user's approved and edited replies; store and return the policy.

    Each question is replayed as it was asked (memory as it was before it, the current adapter) and each
    route is scored by the log-probability of the answer the user wanted.
    """
    from adapters.gate import Evaluator
    from assistant.conversation import sync_adapter
    from assistant.engine import Engine
    from adapters.errors import NotEnoughData
    from assistant.retrieval import memory_message, retriever_for

    rows = labelled(db)
    if len(rows) < MIN_ITEMS_PER_TYPE:
        raise NotEnoughData(f"the router learns from replies you rated up or edited: {len(rows)} so far, "
                            f"it needs at least {MIN_ITEMS_PER_TYPE}")
    engine = Engine(settings.model_path, n_ctx=settings.n_ctx, n_threads=settings.threads, seed=0,
                    cache_dir=settings.cache_dir)
    evaluator = Evaluator(settings.model_path, n_ctx=2048, threads=settings.threads, base_sha256=engine.sha256)
    try:
        sync_adapter(db, engine)
        active = registry.active(db) if engine.loaded_adapter else None
        adapter_path = active["path"] if active else None
        retriever = retriever_for(settings, db)
        items = []
        for message_id, question, answer in rows:
            if should_stop is not None and should_stop():
                return {"stopped": True, "items": len(items)}
            features, hits = features_for(question, engine=engine, retriever=retriever, db=db,
                                          system=settings.system_prompt, k=settings.memory_k,
                                          before_message=message_id)
            quality = route_quality(evaluator, question, answer, hits, system=settings.system_prompt,
                                    adapter_path=adapter_path,
                                    memory_prompt=lambda h: memory_message(h)["content"])
            items.append(Item(features, quality))
    finally:
        evaluator.close()
        engine.close()
    current, _ = thresholds_in_use(db)
    thresholds, report = fit_thresholds(items, adapter=adapter_path is not None, start=current)
    report["mean_quality"] = {r: round(float(np.mean([i.quality[r] for i in items])), 4) for r in ROUTES}
    report["router_quality"] = round(float(np.mean(
        [i.quality[choose(i.features, thresholds, adapter=adapter_path is not None)[0]] for i in items])), 4)
    policy_id = log.save_policy(db, encode_thresholds(thresholds), len(items),
                                active["id"] if active else None, report)
    return {"policy_id": policy_id, "items": len(items), "adapter_id": active["id"] if active else None,
            "thresholds": encode_thresholds(thresholds), "report": report}


def fit_due(db: sqlite_utils.Database, min_new: int) -> str | None:
    """Why the router should be refitted now (None: it need not be)."""
    policy = log.current_policy(db)
    new = log.labelled_since(db, policy["created"] if policy else None)
    active = registry.active(db)
    if policy is None:
        return f"{new} rated or edited replies to fit on" if new >= max(min_new, MIN_ITEMS_PER_TYPE) else None
    if new >= min_new:
        return f"{new} rated or edited replies since the last fit"
    if (active["id"] if active else None) != policy["adapter_id"] and policy["items"] + new >= MIN_ITEMS_PER_TYPE:
        return "the adapter changed since the last fit"
    return None
