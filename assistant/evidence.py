"""What memory may put in front of the model, and what an answer rests on.

Three rules, applied to every search (`Retriever.search`) and every answer (`conversation.respond`):

- **Whose words count.** The user's own messages and notes are evidence about the user. A reply an
  assistant wrote (Ember's, or another assistant's in an import) is not: it comes back only for a
  question about what was said ("what did you tell me about…"), labelled as the assistant's. A reply
  the user approved counts; a reply the user edited counts as the edit, the user's own words.
- **The newest statement wins.** Two statements about the same subject that differ only in its value
  ("my sister's birthday is 4 May" and, later, "… is 9 May") are one fact told twice: the later one
  ranks first, the earlier one is marked replaced and left out of the prompt. Same subject means one
  differing span of content words, with the rest (at least one or two words) equal, and either the
  span is a value (numbers, dates, names), or it ends the sentence, or the later statement says it
  corrects ("correction", "actually", "no longer", "now"…). Two spans differ ("my sister's birthday
  is 4 May" vs "my brother's … 9 May"): two facts, both kept.
- **Nothing of the memory block comes back as memory.** Replies are cleaned of anything that looks like
  the block's markup before they are shown or stored (`HeaderFilter`).

An answer's evidence is the sentence of a memory that best matches the question (`evidence_sentence`);
for a direct recall question whose answer does not carry it, that sentence is put first.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from storage.memory import STOPWORDS

if TYPE_CHECKING:
    from assistant.retrieval import Hit

# Speakers whose words are an assistant's, not the user's (chat roles, and what imports call them).
ASSISTANT_SPEAKERS = frozenset({"assistant", "ai", "ember", "bot", "model", "chatgpt", "claude", "gpt",
                                "llm", "system", "tool"})
# Words a later statement uses to say it replaces an earlier one; not part of what either says.
CORRECTION_MARKERS = frozenset({"correction", "corrected", "actually", "update", "updated", "now", "no",
                                "longer", "anymore", "instead", "changed", "change", "new", "fix", "sorry",
                                "wrong", "not", "rather"})
_MONTHS = ("january february march april may june july august september october november december "
           "jan feb mar apr jun jul aug sep sept oct nov dec").split()
_DAYS = "monday tuesday wednesday thursday friday saturday sunday".split()
_NEGATIONS = frozenset({"longer", "anymore", "not", "never", "don't", "doesn't", "didn't", "stopped",
                        "quit", "isn't", "aren't", "wasn't"})
_VALUE_WORDS = frozenset(_MONTHS + _DAYS + ["am", "pm", "noon", "midnight"])

_ABOUT_ASSISTANT = re.compile(
    r"\b(you|ember) (once |ever |just |earlier |already |last time )?(said|told|recommended|suggested|"
    r"mentioned|answered|replied|wrote|advised|gave|taught|explained|promised|thought)\b|"
    r"\b(did|have|had) (you|ember) (ever |once |already )?(say|said|tell|told|recommend|suggest|mention|"
    r"answer|reply|write|advise|give|teach|explain|promise)\b|"
    r"\bwhat did you\b|\byour (answer|reply|replies|advice|suggestion|recommendation|words)\b",
    re.IGNORECASE)
_DIRECT_RECALL = re.compile(
    r"^\W*(when|what|which|where|who|whom|how (old|many|much|long))\b.*\b(my|mine|i|i'm|i've|me)\b",
    re.IGNORECASE)
_SENTENCES = re.compile(r"(?<=[.!?])\s+|\n+")
_WORD = re.compile(r"[\w']+")


def asks_about_assistant(question: str) -> bool:
    """Whether `question` asks what the assistant said (then its replies are what is asked for)."""
    return bool(_ABOUT_ASSISTANT.search(question))


def is_direct_recall(question: str) -> bool:
    """A question asking for one fact about the user ("when is my…", "what is my…", "which … did I…")."""
    return bool(_DIRECT_RECALL.search(question.strip())) and not asks_about_assistant(question)


def is_assistant(speaker: str | None) -> bool:
    """Whether a memory's speaker is an assistant (Ember, or another app's in an import)."""
    return (speaker or "").strip().lower() in ASSISTANT_SPEAKERS


def admit(hits: Sequence[Hit], question: str, reviews: dict[int, dict[str, Any]]) -> list[Hit]:
    """The hits that may answer `question`, each with its `origin` set (the module's first rule).

    `reviews`: the user's feedback on the assistant messages among the hits (storage.feedback.of_messages):
    {message_id: {"rating": "up"|"down"|None, "edit": str|None}}.
    """
    about_assistant = asks_about_assistant(question)
    out = []
    for hit in hits:
        if not is_assistant(hit.speaker):
            out.append(dataclasses.replace(hit, origin="user"))
            continue
        review = reviews.get(hit.message_id) if hit.message_id is not None else None
        if not admissible(hit.speaker, review, about_assistant):
            continue
        if review and review.get("edit"):
            out.append(dataclasses.replace(hit, text=review["edit"], origin="edited"))
        else:
            out.append(dataclasses.replace(hit, origin="approved" if review and review.get("rating") == "up"
                                           else "assistant"))
    return out


def admissible(speaker: str | None, review: dict[str, Any] | None, about_assistant: bool) -> bool:
    """Whether a memory may be found at all for a question (`admit`'s rule, before a Hit exists)."""
    if not is_assistant(speaker):
        return True
    if review and (review.get("edit") or review.get("rating") == "up"):
        return True
    return about_assistant and not (review and review.get("rating") == "down")


def sentences(text: str) -> list[str]:
    """`text` split into sentences (and lines)."""
    return [s.strip() for s in _SENTENCES.split(text) if s.strip()]


def content_words(text: str) -> list[str]:
    """Lower-case words of `text` without stop words (numbers kept), in order."""
    return [w for w in (w.lower().strip("'") for w in _WORD.findall(text))
            if w and w not in STOPWORDS and not (w.endswith("'s") and w[:-2] in STOPWORDS)]


def _stem(word: str) -> str:
    return word[:-2] if word.endswith("'s") else word


def best_sentence(text: str, question: str) -> tuple[str, int]:
    """The sentence of `text` sharing the most content words with `question`, and how many it shares."""
    asked = {_stem(w) for w in content_words(question)}
    best, shared = "", -1
    for sentence in sentences(text) or [text]:
        n = len(asked & {_stem(w) for w in content_words(sentence)})
        if n > shared:
            best, shared = sentence, n
    return best, max(shared, 0)


def _is_value(words: Sequence[str], original: str) -> bool:
    """Whether a differing span is a value: numbers, dates, times, or names (capitalised mid-sentence)."""
    names = {w.lower() for w in re.findall(r"(?<![.!?]\s)(?<!^)\b[A-Z][a-z]+", original)}
    return bool(words) and all(any(c.isdigit() for c in w) or w in _VALUE_WORDS or w in names for w in words)


_EVENT = re.compile(r"\b(was|were|went|did|had|got|made|took|saw|met|ate|ran|bought|came|left|\w{3,}ed)\b",
                    re.IGNORECASE)
_STATE_ED = frozenset({"need", "needed", "used", "called", "named", "married", "based", "interested", "allowed"})


def _is_event(sentence: str) -> bool:
    """Whether a sentence tells something that happened (past tense) rather than how things are."""
    return any(m.group(0).lower() not in _STATE_ED for m in _EVENT.finditer(sentence))


@dataclasses.dataclass(frozen=True)
class Statement:
    """A sentence as `replaces` compares it, its words read once."""

    text: str
    said: frozenset[str]         # every word, lower-case
    words: tuple[str, ...]       # content words without correction markers, in order
    event: bool                  # tells something that happened (past tense)
    vocabulary: frozenset[str] = frozenset()   # `words` as a set

    @classmethod
    def of(cls, sentence: str) -> Statement:
        words = tuple(_stem(w) for w in content_words(sentence) if w not in CORRECTION_MARKERS)
        return cls(sentence, frozenset(w.lower() for w in _WORD.findall(sentence)), words, _is_event(sentence),
                   frozenset(words))


def replaces(newer: str | Statement, older: str | Statement) -> bool:
    """Whether statement `newer` restates statement `older` with another value (the module docstring's
    second rule). Both are single sentences."""
    new = newer if isinstance(newer, Statement) else Statement.of(newer)
    old = older if isinstance(older, Statement) else Statement.of(older)
    a, b = old.words, new.words
    if not a or not b or not old.vocabulary & new.vocabulary:
        return False
    corrects = bool(CORRECTION_MARKERS & new.said)
    if not corrects and old.event and new.event:
        return False   # two things that happened ("ran for an hour", later "for twenty minutes"), not one fact
    if a == b:   # the same words: a replacement only when the later one negates ("… no longer …")
        return bool(_NEGATIONS & new.said) and not _NEGATIONS & old.said
    blocks = [op for op in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes() if op[0] != "equal"]
    if len(blocks) != 1:
        return False
    _, i1, i2, j1, j2 = blocks[0]
    equal = len(a) - (i2 - i1)
    changed = a[i1:i2] + b[j1:j2]
    if _is_value(changed, old.text + " " + new.text) and equal >= 1:
        return True
    at_end = i2 == len(a) and j2 == len(b)
    return equal >= 2 and (at_end or (corrects and max(i2 - i1, j2 - j1) <= 3))


def supersede(hits: Sequence[Hit], question: str) -> list[Hit]:
    """`hits` with every statement a later one replaces marked (`replaced_by`) and moved just after the
    one replacing it, which takes its rank. Only the user's words are compared (an assistant's reply
    never replaces what the user said)."""
    if time_window_named(question):
        return list(hits)   # a question about a period asks for what was said then, replaced or not
    key = [Statement.of(best_sentence(h.text, question)[0]) if h.origin in ("user", "edited") else None
           for h in hits]
    replaced: dict[int, Hit] = {}
    for i, old in enumerate(hits):
        if key[i] is None:
            continue
        newer = [j for j, new in enumerate(hits) if j != i and key[j] is not None
                 and (new.time or "", new.id) > (old.time or "", old.id) and replaces(key[j], key[i])]
        if newer:
            latest = max(newer, key=lambda j: (hits[j].time or "", hits[j].id))
            replaced[i] = hits[latest]
    if not replaced:
        return list(hits)
    out: list[Hit] = []
    placed: set[int] = set()
    for i, hit in enumerate(hits):
        if hit.id in placed:
            continue
        if i in replaced:
            current = replaced[i]
            while True:   # a chain: the newest statement of all
                j = next((n for n, h in enumerate(hits) if h.id == current.id), None)
                if j is None or j not in replaced:
                    break
                current = replaced[j]
            if current.id not in placed:
                out.append(current)
                placed.add(current.id)
            out.append(dataclasses.replace(hit, replaced_by=current.id))
        else:
            out.append(hit)
        placed.add(hit.id)
    return out


def time_window_named(question: str) -> bool:
    """Whether `question` names a period ("in January", "last week", "on 4 May")."""
    import datetime as dt

    from assistant.retrieval import time_window

    return time_window(question, dt.date.today()) is not None


@dataclasses.dataclass
class Evidence:
    """The sentence of a memory an answer rests on."""

    memory_id: str          # the id `ember memory show` opens
    text: str               # the sentence, as stored
    time: str | None
    conversation_id: int | None
    origin: str             # user | edited | approved | assistant

    def as_json(self) -> dict[str, Any]:
        return {"memory_id": self.memory_id, "text": self.text, "time": self.time,
                "conversation_id": self.conversation_id, "origin": self.origin}

    def line(self) -> str:
        """One line for the terminal: the quoted sentence, its date and where it is."""
        where = f"conversation {self.conversation_id}" if self.conversation_id is not None else "imported note"
        whose = {"assistant": "Ember said", "approved": "Ember said, you approved",
                 "edited": "your correction"}.get(self.origin, "you said")
        return f"“{self.text}” — {whose}, {(self.time or 'undated')[:10]}, {where} [{self.memory_id}]"


def evidence_for(hits: Iterable[Hit], question: str, answer: str) -> list[Evidence]:
    """The sentences of `hits` an answer to `question` rests on: each memory's sentence that shares a
    content word with the question or the answer, best memories first (replaced ones never)."""
    out = []
    for hit in hits:
        if hit.replaced_by is not None:
            continue
        sentence, shared = best_sentence(hit.text, question + " " + answer)
        if shared:
            out.append(Evidence(hit.public_id, sentence, hit.time, hit.conversation_id, hit.origin))
    return out


def answer_carries(answer: str, sentence: str, question: str) -> bool:
    """Whether `answer` already says what `sentence` adds to the question (its content words not in the
    question, correction markers aside)."""
    asked = {_stem(w) for w in content_words(question)}
    new = {_stem(w) for w in content_words(sentence)} - asked - CORRECTION_MARKERS
    said = {_stem(w) for w in content_words(answer)}
    return not new or len(new & said) >= max(1, (len(new) + 1) // 2)


def recall_first(answer: str, evidence: Sequence[Evidence], question: str) -> str | None:
    """For a direct recall question: the quoted evidence sentence to put before `answer` when the
    answer does not carry it (None when it does, or there is none)."""
    if not evidence or not is_direct_recall(question):
        return None
    first = evidence[0]
    return None if answer_carries(answer, first.text, question) else quote(first)


def quote(first: Evidence) -> str:
    """The line that puts a memory's sentence before an answer."""
    return f"From your notes ({(first.time or 'undated')[:10]}): “{first.text}”"


# What the memory block looks like, and what a reply copying it looks like: bracketed or parenthesised
# dates with a speaker, note numbers, the block's own labels.
_HEADER = re.compile(
    r"[\[(]\s*\d{4}-\d{2}-\d{2}[^\])\n]{0,40}[\])]|"          # [2026-11-29, user]  (2026-11-29, user)
    r"[\[(](?:note )?\d{1,2}[\])](?=\s|[.,;:]|$)|"              # [1]  (2)
    r"^\s*(?:note \d+|memory \d+|notes?|memories)\s*:\s*",      # Note 1:  Memories:
    re.IGNORECASE | re.MULTILINE)


def strip_headers(text: str) -> str:
    """`text` without anything that looks like the memory block's markup."""
    cleaned = _HEADER.sub("", text)
    return re.sub(r"[ \t]{2,}", " ", cleaned).replace(" .", ".").replace(" ,", ",") if cleaned != text else text


class HeaderFilter:
    """Streams a reply with memory-block markup left out: text from an opening bracket is held until
    the bracket closes (or cannot be markup), then passed on or dropped."""

    HOLD = 48   # markup is short: a bracket open longer than this is prose

    def __init__(self) -> None:
        self._held = ""
        self.text = ""      # everything passed on so far

    def feed(self, piece: str) -> str:
        """What of `piece` (with anything held before) can be shown now."""
        self._held += piece
        out = ""
        while self._held:
            start = min((i for i in (self._held.find("["), self._held.find("(")) if i >= 0), default=-1)
            if start < 0:
                out, self._held = out + self._held, ""
                break
            # The space before a bracket waits with it: markup goes with the space that set it apart.
            lead = len(self._held[:start]) - len(self._held[:start].rstrip())
            out, self._held = out + self._held[:start - lead], self._held[start - lead:]
            close = min((i for i in (self._held.find("]"), self._held.find(")")) if i >= 0), default=-1)
            if close < 0 and len(self._held) < self.HOLD:
                break   # wait for the bracket to close
            end = close + 1 if close >= 0 else lead + 1
            span = self._held[:end]
            cleaned = strip_headers(span.lstrip())
            out += span if cleaned == span.lstrip() else cleaned
            self._held = self._held[end:]
        self.text += out
        return out

    def flush(self) -> str:
        """The rest, at the end of the reply."""
        out, self._held = strip_headers(self._held), ""
        self.text += out
        return out


class Shown:
    """What a reply shows and stores, built from the model's pieces as they stream: memory-block markup
    left out (`HeaderFilter`), and for a direct recall question the quoted evidence put first when the
    answer's opening does not carry it (the opening is held back until it does, or until HOLD
    characters show it does not)."""

    HOLD = 120

    def __init__(self, question: str, first: Evidence | None, *, markup: bool):
        self._filter = HeaderFilter() if markup else None
        self._question = question
        self._first = first if first is not None and is_direct_recall(question) else None
        self._held: str | None = "" if self._first is not None else None
        self.prefix: str | None = None
        self.text = ""

    def feed(self, piece: str) -> str:
        """What of `piece` to show now."""
        piece = self._filter.feed(piece) if self._filter else piece
        return self._release(piece, end=False)

    def flush(self) -> str:
        """The rest, when the reply has ended."""
        return self._release(self._filter.flush() if self._filter else "", end=True)

    def _release(self, piece: str, *, end: bool) -> str:
        if self._held is None:
            self.text += piece
            return piece
        self._held += piece
        first = self._first
        assert first is not None
        if answer_carries(self._held, first.text, self._question):
            out, self._held = self._held, None
        elif end or len(self._held) >= self.HOLD:
            self.prefix = quote(first)
            out, self._held = f"{self.prefix}\n\n{self._held.lstrip()}", None
        else:
            return ""
        self.text += out
        return out
