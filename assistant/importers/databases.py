"""Chat apps that keep their history in SQLite: simonw/llm (`logs.db`), oterm and elia. Read through
`storage.foreign` (read-only), one conversation at a time."""
from __future__ import annotations

import datetime as dt
from typing import Iterator

from assistant.importers.common import Export, Item, iso
from storage import foreign
from storage.imports import ImportedConversation, ImportedMessage


def read_llm(export: Export) -> Iterator[Item]:
    """llm's conversations: each response is the user's prompt and the model's reply (with its system
    prompt as a system message when it changes)."""
    newer = foreign.llm_newer_migrations(export.path)
    if newer:
        export.warnings.append(f"{export.path.name} was written by a newer llm (migration {newer[0]}"
                               + (f" and {len(newer) - 1} more" if len(newer) > 1 else "")
                               + "); imported the columns Ember knows")
    for conv in foreign.llm_conversations(export.path):
        messages, system = [], None
        for r in conv["responses"]:
            when = iso(r["datetime_utc"])
            if r["system"] and r["system"] != system:
                messages.append(ImportedMessage(f"{r['id']}:system", "system", r["system"], when))
            system = r["system"] or system
            if (r["prompt"] or "").strip():
                messages.append(ImportedMessage(f"{r['id']}:prompt", "user", r["prompt"], when))
            else:
                export.skip("empty prompts")
            if (r["response"] or "").strip():
                messages.append(ImportedMessage(f"{r['id']}:response", "assistant", r["response"], when,
                                                r["resolved_model"] or r["model"]))
            else:
                export.skip("empty responses")
        yield ImportedConversation(external_id=f"llm:{conv['id']}", title=conv["name"], messages=messages)


def _file_time(export: Export) -> str:
    return dt.datetime.fromtimestamp(export.path.stat().st_mtime, tz=dt.timezone.utc).isoformat(timespec="milliseconds")


def read_oterm(export: Export) -> Iterator[Item]:
    """oterm's chats. oterm keeps no message times: the database file's time stands for them."""
    when = _file_time(export)
    for chat in foreign.oterm_chats(export.path):
        messages = []
        if (chat["system"] or "").strip():
            messages.append(ImportedMessage(f"{chat['id']}:system", "system", chat["system"], when))
        for m in chat["messages"]:
            if not (m["text"] or "").strip():
                export.skip("empty messages")
                continue
            role = "user" if m["author"] == "user" else "assistant"
            messages.append(ImportedMessage(str(m["id"]), role, m["text"], when,
                                            chat["model"] if role == "assistant" else None))
        yield ImportedConversation(external_id=f"oterm:{chat['id']}", title=chat["name"], messages=messages,
                                   created=when, updated=when)


def read_elia(export: Export) -> Iterator[Item]:
    """elia's chats, with their messages' roles, times and models."""
    for chat in foreign.elia_chats(export.path):
        messages = []
        for m in chat["messages"]:
            if m["role"] not in ("user", "assistant", "system") or not (m["content"] or "").strip():
                export.skip("empty messages" if m["role"] in ("user", "assistant", "system") else f"{m['role']} messages")
                continue
            messages.append(ImportedMessage(str(m["id"]), m["role"], m["content"], iso(m["timestamp"]),
                                            (m["model"] or chat["model"]) if m["role"] == "assistant" else None))
        yield ImportedConversation(external_id=f"elia:{chat['id']}", title=chat["title"], messages=messages,
                                   created=iso(chat["started_at"]))
