"""ChatGPT's data export: `conversations.json` (or the several `conversations-NNN.json` newer exports
split it into), a list of conversations, each a `mapping` tree of message nodes with `current_node`.

The conversation is the branch that ends at `current_node` (the one the user last saw); Ember's log is
linear, so the other branches (regenerated replies, edited questions) are skipped and counted. Parts
that are not text (images, files, code-interpreter input and output, reasoning) are skipped and counted.
"""
from __future__ import annotations

import hashlib
from typing import Any, Iterator

from assistant.importers.common import Export, Item, Problem, iso, stream_items, where
from storage.imports import ImportedConversation, ImportedMessage

ROLES = {"user": "user", "assistant": "assistant", "system": "system"}
TEXT_TYPES = ("text", "multimodal_text")


def read(export: Export) -> Iterator[Item]:
    """Every conversation of every data file of the export, streamed."""
    for member in export.members:
        for index, obj in stream_items(export, "item", member):
            if isinstance(obj, Problem):
                yield obj
            else:
                yield conversation(export, obj, where(export, member, f"conversation {index + 1}"))


def _leaf(mapping: dict[str, Any]) -> str | None:
    """Where a conversation without a usable `current_node` ends: the newest leaf with a message."""
    leaves = [key for key, node in mapping.items() if isinstance(node, dict) and not node.get("children")]
    def when(key: str) -> float:
        message = mapping[key].get("message") or {}
        stamp = message.get("create_time")
        return stamp if isinstance(stamp, (int, float)) else 0.0
    return max(leaves, key=when) if leaves else None


def _text(export: Export, message: dict[str, Any]) -> str:
    """A message's text; parts that are not text are counted as skipped."""
    content = message.get("content")
    if not isinstance(content, dict):
        export.skip("messages with no content")
        return ""
    kind = content.get("content_type")
    if kind not in TEXT_TYPES:
        export.skip(f"{kind or 'untyped'} parts")
        return ""
    parts = content.get("parts")
    if not isinstance(parts, list):
        export.skip("messages with null parts")
        return ""
    texts = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
        elif part is None:
            continue
        else:
            kind = part.get("content_type", "non-text") if isinstance(part, dict) else type(part).__name__
            export.skip(f"{kind} parts")
    return "\n".join(t for t in texts if t.strip())


def conversation(export: Export, obj: Any, place: str) -> ImportedConversation | Problem:
    """One conversation: the branch ending at `current_node`, or a `Problem` (a cycle, a dangling parent)."""
    name = export.path.name
    if not isinstance(obj, dict):
        return Problem(name, place, "not a JSON object")
    mapping = obj.get("mapping")
    ident = obj.get("conversation_id") or obj.get("id")
    if not isinstance(mapping, dict) or not mapping:
        return Problem(name, place, "no `mapping` of messages")
    if not ident:
        # Older exports always have an id; a missing one gets a stable one from what is there.
        ident = "sha:" + hashlib.sha256(f"{obj.get('title')}\0{obj.get('create_time')}\0{sorted(mapping)}"
                                        .encode()).hexdigest()[:24]
    where = f"{place} ({ident})"
    current = obj.get("current_node")
    if current not in mapping:
        current = _leaf(mapping)
        if current is None:
            return Problem(name, where, "no `current_node` and no leaf to end the conversation at")
    path, seen, node = [], set(), current
    while node is not None:
        if node in seen:
            return Problem(name, where, f"the `mapping` has a cycle at node {node}")
        seen.add(node)
        entry = mapping.get(node)
        if not isinstance(entry, dict):
            child = path[-1].get("id", "?") if path else current
            return Problem(name, where, f"node {child}'s parent {node} is not in the `mapping`")
        path.append(entry)
        node = entry.get("parent")
    path.reverse()
    others = sum(1 for key, entry in mapping.items() if key not in seen and isinstance(entry, dict)
                 and isinstance(entry.get("message"), dict)
                 and (entry["message"].get("author") or {}).get("role") in ("user", "assistant"))
    export.skip("messages on other branches", others)
    messages = []
    for entry in path:
        message = entry.get("message")
        if not isinstance(message, dict):
            continue      # the root, or a node whose message the export left null
        role = ROLES.get((message.get("author") or {}).get("role"))
        if role is None:
            export.skip("tool messages")
            continue
        metadata = message.get("metadata") or {}
        if role == "system" and (metadata.get("is_visually_hidden_from_conversation") or not message.get("content")):
            continue      # ChatGPT's own hidden scaffolding, never shown to the user
        text = _text(export, message)
        if not text.strip():
            if role != "system":
                export.skip("empty messages")
            continue
        messages.append(ImportedMessage(
            external_id=str(message.get("id") or entry.get("id")), role=role, content=text,
            created=iso(message.get("create_time")), model=metadata.get("model_slug") if role == "assistant" else None))
    return ImportedConversation(external_id=f"chatgpt:{ident}", title=obj.get("title"), messages=messages,
                                created=iso(obj.get("create_time")), updated=iso(obj.get("update_time")))
