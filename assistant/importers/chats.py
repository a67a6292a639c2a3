"""JSON chat exports other than ChatGPT's: Claude's `conversations.json`, Open WebUI's chat export, and
Ember's own `ember export` (read back losslessly)."""
from __future__ import annotations

from typing import Any, Iterator

from assistant.importers.common import Export, Item, Problem, iso, stream_items, text_of, where
from storage.imports import ImportedConversation, ImportedMessage

CLAUDE_ROLES = {"human": "user", "user": "user", "assistant": "assistant"}


def read_claude(export: Export) -> Iterator[Item]:
    """Claude's conversations: `chat_messages` with `sender`, `text` or `content` blocks, and times."""
    for member in export.members:
        for index, obj in stream_items(export, "item", member):
            yield obj if isinstance(obj, Problem) else claude(export, obj, where(export, member, f"conversation {index + 1}"))


def claude(export: Export, obj: Any, place: str) -> ImportedConversation | Problem:
    name = export.path.name
    if not isinstance(obj, dict) or not obj.get("uuid"):
        return Problem(name, place, "a conversation needs a `uuid`")
    chat = obj.get("chat_messages")
    if not isinstance(chat, list):
        return Problem(name, f"{place} ({obj['uuid']})", "`chat_messages` is not a list")
    messages = []
    for number, m in enumerate(chat, start=1):
        if not isinstance(m, dict):
            return Problem(name, f"{place} ({obj['uuid']}), message {number}", "not a JSON object")
        role = CLAUDE_ROLES.get(m.get("sender"))
        if role is None:
            export.skip(f"{m.get('sender') or 'unknown'} messages")
            continue
        blocks = m.get("content")
        if isinstance(blocks, list) and blocks:
            texts = []
            for block in blocks:
                if isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str):
                    texts.append(block["text"])
                else:
                    export.skip(f"{block.get('type', 'non-text') if isinstance(block, dict) else 'non-text'} parts")
            text = "\n".join(t for t in texts if t.strip())
        else:
            text = text_of(m.get("text"))
        export.skip("attachments and files", len(m.get("attachments") or []) + len(m.get("files") or []))
        if not text.strip():
            export.skip("empty messages")
            continue
        messages.append(ImportedMessage(external_id=str(m.get("uuid") or f"{number}"), role=role, content=text,
                                        created=iso(m.get("created_at")), model=obj.get("model") if role == "assistant" else None))
    return ImportedConversation(external_id=f"claude:{obj['uuid']}", title=obj.get("name"), messages=messages,
                                created=iso(obj.get("created_at")), updated=iso(obj.get("updated_at")))


def read_openwebui(export: Export) -> Iterator[Item]:
    """Open WebUI's chat export: a list of `{id, title, chat: {history: {messages, currentId}, messages}}`."""
    for member in export.members:
        for index, obj in stream_items(export, "item", member):
            yield obj if isinstance(obj, Problem) else openwebui(export, obj, where(export, member, f"chat {index + 1}"))


def openwebui(export: Export, obj: Any, place: str) -> ImportedConversation | Problem:
    name = export.path.name
    if not isinstance(obj, dict):
        return Problem(name, place, "not a JSON object")
    chat = obj.get("chat") if isinstance(obj.get("chat"), dict) else obj
    ident = obj.get("id") or chat.get("id")
    if not ident:
        return Problem(name, place, "a chat needs an `id`")
    where = f"{place} ({ident})"
    history = chat.get("history") if isinstance(chat.get("history"), dict) else {}
    nodes, current = history.get("messages"), history.get("currentId")
    if isinstance(nodes, dict) and current in nodes:
        # The branch the user last saw, as for ChatGPT: walk `parentId` up from `currentId`.
        path, seen, node = [], set(), current
        while node is not None:
            if node in seen:
                return Problem(name, where, f"the message history has a cycle at {node}")
            seen.add(node)
            if not isinstance(nodes.get(node), dict):
                return Problem(name, where, f"message {path[-1].get('id') if path else current}'s parent {node} is missing")
            path.append(nodes[node])
            node = nodes[node].get("parentId")
        path.reverse()
        export.skip("messages on other branches", len(nodes) - len(seen))
    elif isinstance(chat.get("messages"), list):
        path = chat["messages"]
    else:
        return Problem(name, where, "no `history` or `messages`")
    messages = []
    for number, m in enumerate(path, start=1):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant", "system"):
            export.skip("messages of no known role")
            continue
        text = text_of(m.get("content"))
        export.skip("files and images", len(m.get("files") or []) + len(m.get("images") or []))
        if not text.strip():
            export.skip("empty messages")
            continue
        model = m.get("model") or (m.get("models") or [None])[0] if m["role"] == "assistant" else None
        messages.append(ImportedMessage(external_id=str(m.get("id") or number), role=m["role"], content=text,
                                        created=iso(m.get("timestamp")), model=model))
    return ImportedConversation(external_id=f"openwebui:{ident}", title=obj.get("title") or chat.get("title"),
                                messages=messages, created=iso(obj.get("created_at") or chat.get("timestamp")),
                                updated=iso(obj.get("updated_at")))


MESSAGE_FIELDS = ("status", "route", "adapter_id", "tokens", "seconds")


def conversation_key(obj: dict) -> str:
    """The id `ember import` keys a conversation of Ember's own export by: a conversation first imported
    from another app keeps that app's id; Ember's own are keyed by their id and start time."""
    return obj.get("external_id") or f"ember:{obj['id']}:{obj.get('created')}"


def read_ember(export: Export) -> Iterator[Item]:
    """`ember export --format json`: every field of every message comes back as it was."""
    for index, obj in stream_items(export, "conversations.item", export.member):
        yield obj if isinstance(obj, Problem) else ember(export, obj, f"conversation {index + 1}")


def ember(export: Export, obj: Any, place: str) -> ImportedConversation | Problem:
    name = export.path.name
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list) or "id" not in obj:
        return Problem(name, place, "needs `id` and a list of `messages`")
    messages = []
    # Every branch comes back: each message names the one it follows by its id in the export.
    tree = any(isinstance(m, dict) and "parent_id" in m for m in obj["messages"])
    external: dict = {}
    for number, m in enumerate(obj["messages"], start=1):
        if (not isinstance(m, dict) or m.get("role") not in ("user", "assistant", "system")
                or not isinstance(m.get("content"), str)):
            return Problem(name, f"{place} (id {obj['id']}), message {number}", "needs a `role` and a `content` string")
        extra = {k: m[k] for k in MESSAGE_FIELDS if m.get(k) is not None}
        if m.get("rating") not in (None, "up", "down") or not isinstance(m.get("edit"), (str, type(None))) or (
                (m.get("rating") or m.get("edit") is not None) and m["role"] != "assistant"):
            return Problem(name, f"{place} (id {obj['id']}), message {number}",
                           "a `rating` (up or down) or an `edit` belongs to an assistant reply")
        extra.update({k: m[k] for k in ("rating", "edit") if m.get(k) is not None})
        ident = str(m.get("external_id") or f"ember:{m.get('id', number)}")
        parent = m.get("parent_id")
        if tree and parent is not None and parent not in external:
            return Problem(name, f"{place} (id {obj['id']}), message {number}",
                           f"`parent_id` {parent} is not an earlier message of this conversation")
        external[m.get("id", number)] = ident
        messages.append(ImportedMessage(external_id=ident, role=m["role"], content=m["content"],
                                        created=m.get("created"), model=m.get("model"),
                                        parent_external_id=external.get(parent), **extra))
    # Keyed so that re-importing the app's own export later still finds it.
    ident = conversation_key(obj)
    excluded = obj.get("excluded")
    return ImportedConversation(external_id=ident, title=obj.get("title"), messages=messages,
                                created=obj.get("created"), updated=obj.get("updated"),
                                excluded=excluded if isinstance(excluded, bool) else None,
                                tree=tree, current_external_id=external.get(obj.get("current_id")))
