"""Which of the user's words are personal facts (memory's job) and which are asks and style (the adapter's).

Retrieval recalls a fact exactly, cites it and forgets it on request; weights recall it vaguely, cannot
cite it, and keep it until retrained. So at adaptation time a sentence in which the user states something
about themselves ("my locker code is 4417", "I moved to Lyon in May") stays in memory only and is cut
from the training target, while requests, recurring tasks and the way the user writes are learned.

The rules are plain and explainable: a sentence is a personal fact when it is a statement (not a question
or a request) with the user as its subject, and either defines something of theirs ("my X is …") or
tells what they did or are ("I moved", "I was born", "we met" …) with something specific: a number, a
name, a quoted title.
"""
from __future__ import annotations

import re

_SENTENCE = re.compile(r"[^.!?\n]+[.!?]*")
_FIRST_PERSON = re.compile(r"\b(i|i'm|i've|i'd|my|mine|we|we're|our|ours)\b", re.IGNORECASE)
_REQUEST = re.compile(r"^\s*(please\s+)?(can|could|would|will|should|shall|do|does|did|is|are|how|what|why|"
                      r"when|where|which|who|write|draft|make|give|tell|help|list|explain|suggest|"
                      r"summari[sz]e|translate|rewrite|plan|show|find|remind)\b", re.IGNORECASE)
_DEFINITION = re.compile(r"\b(my|our)\s+[\w' -]{1,40}?\s+(is|are|was|were|'s)\b", re.IGNORECASE)
_PERSONAL_VERB = re.compile(r"\b(i|we)\s+(am|was|were|live|lived|work|worked|moved|was born|have|had|own|"
                            r"met|visited|went|saw|bought|started|finished|read|watched|like|love|hate|"
                            r"prefer|am allergic)\b", re.IGNORECASE)
_SPECIFIC = re.compile(r"\d|[\"“”«»]")


def sentences(text: str) -> list[str]:
    """`text` cut into sentences (each with its end mark), whitespace kept out."""
    return [s.strip() for s in _SENTENCE.findall(text) if s.strip()]


def _names(sentence: str) -> bool:
    """A capitalised word past the first that is not "I": a name, a place, a title."""
    words = re.findall(r"[A-Za-z][\w'-]*", sentence)[1:]
    return any(w[0].isupper() and w not in ("I", "I'm", "I've", "I'd", "I'll") for w in words)


def is_fact(sentence: str) -> bool:
    """Whether `sentence` states a personal fact (see the module docstring)."""
    s = sentence.strip()
    if not s or s.endswith("?") or _REQUEST.match(s) or not _FIRST_PERSON.search(s):
        return False
    # "By the way, my code is …": drop a leading aside before looking at the shape.
    core = re.sub(r"^(by the way|btw|also|oh|and|so|fyi)[,:]?\s+", "", s, flags=re.IGNORECASE)
    return bool(_DEFINITION.search(core)
                or (_PERSONAL_VERB.search(core) and (_SPECIFIC.search(core) or _names(core))))


def split(text: str) -> tuple[str, list[str]]:
    """(`text` without its personal-fact sentences, the fact sentences taken out); the rest of the text,
    line breaks included, is left as the user wrote it."""
    facts = [s for s in sentences(text) if is_fact(s)]
    for fact in facts:
        text = text.replace(fact, "", 1)
    return (re.sub(r"(?m)^[ \t]+", "", re.sub(r"[ \t]{2,}", " ", text)).strip() if facts else text), facts
