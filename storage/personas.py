"""Personas: named system prompts (with an optional default route and temperature), one of them the default.

A conversation remembers the persona it was held with (`conversations.persona_id`); a new conversation
takes the default. `NONE` is the word for "no persona", so it cannot be a persona's name.
"""
from __future__ import annotations

import unicodedata
from typing import Any

import sqlite_utils

from storage.conversations import get_conversation, now
from storage.db import transaction
from storage.errors import InvalidInput, NotFound

NONE = "none"          # `--persona none`, `ember persona default none`: no persona at all
NAME_CHARS = 40
ROUTES = ("auto", "base", "rag", "adapter", "both")   # as assistant.conversation.ROUTES (checked there)
FIELDS = ("name", "system_prompt", "route", "temperature")


class PersonaNotFound(NotFound):
    """A persona name that does not exist."""


def check_name(name: str) -> str:
    """The name, stripped, or `InvalidInput` when it cannot name a persona."""
    name = name.strip()
    if not name or any(unicodedata.category(ch)[0] == "C" for ch in name):
        raise InvalidInput("a persona's name must be visible text on one line")
    if len(name) > NAME_CHARS:
        raise InvalidInput(f"a persona's name is at most {NAME_CHARS} characters, not {len(name)}")
    if name.lower() == NONE:
        raise InvalidInput(f"{NONE!r} means no persona; pick another name")
    return name


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {"name": row["name"], "system_prompt": row["system_prompt"], "route": row["route"],
            "temperature": row["temperature"], "default": bool(row["is_default"])}


def list_personas(db: sqlite_utils.Database) -> list[dict[str, Any]]:
    """Every persona, by name, with how many conversations use it."""
    rows = db.query("""
        SELECT p.*, (SELECT COUNT(*) FROM conversations c WHERE c.persona_id = p.id) AS conversations
        FROM personas p ORDER BY p.name COLLATE NOCASE""")
    return [_public(row) | {"conversations": row["conversations"]} for row in rows]


def _row(db: sqlite_utils.Database, name: str) -> dict[str, Any]:
    rows = list(db.query("SELECT * FROM personas WHERE name = ?", [name.strip()]))
    if not rows:
        raise PersonaNotFound(f"no persona named {name.strip()!r}; `ember persona list` shows them")
    return rows[0]


def get_persona(db: sqlite_utils.Database, name: str) -> dict[str, Any]:
    """One persona by name (case-insensitive), or `PersonaNotFound`."""
    row = _row(db, name)
    count = db.execute("SELECT COUNT(*) FROM conversations WHERE persona_id = ?", [row["id"]]).fetchone()[0]
    return _public(row) | {"conversations": count}


def add_persona(db: sqlite_utils.Database, name: str, system_prompt: str, *, route: str | None = None,
                temperature: float | None = None, default: bool = False, replace: bool = False) -> dict[str, Any]:
    """Store a persona (with `replace`, overwrite one of the same name); returns it."""
    name = check_name(name)
    if not system_prompt.strip():
        raise InvalidInput("a persona needs a system prompt (visible text)")
    if route is not None and route not in ROUTES:
        raise InvalidInput(f"unknown route {route!r}; choose one of {', '.join(ROUTES)}")
    if temperature is not None and not temperature >= 0:
        raise InvalidInput(f"temperature must be 0 or more, not {temperature}")
    values = {"name": name, "system_prompt": system_prompt, "route": route, "temperature": temperature}
    with transaction(db):
        existing = list(db.query("SELECT id FROM personas WHERE name = ?", [name]))
        if existing and not replace:
            raise InvalidInput(f"a persona named {name!r} exists; pass --replace to overwrite it, "
                               "or pick another name")
        if existing:
            db["personas"].update(existing[0]["id"], values)
        else:
            db["personas"].insert(values | {"created": now(), "is_default": 0})
        if default:
            set_default(db, name)
    return get_persona(db, name)


def default_persona(db: sqlite_utils.Database) -> dict[str, Any] | None:
    """The default persona, or None."""
    rows = list(db.query("SELECT * FROM personas WHERE is_default = 1"))
    return _public(rows[0]) if rows else None


def set_default(db: sqlite_utils.Database, name: str | None) -> dict[str, Any] | None:
    """Make `name` the default persona (None or `NONE`: no default); returns it."""
    with transaction(db):
        row = None if name is None or name.strip().lower() == NONE else _row(db, name)
        db.execute("UPDATE personas SET is_default = 0 WHERE is_default = 1")
        if row is not None:
            db.execute("UPDATE personas SET is_default = 1 WHERE id = ?", [row["id"]])
    return default_persona(db)


def preview_remove(db: sqlite_utils.Database, name: str) -> dict[str, Any]:
    """What removing `name` would change: the persona, and the conversations that would lose it."""
    found = get_persona(db, name)
    return {"personas": 1, "conversations": found["conversations"], "default": found["default"],
            "name": found["name"]}


def remove_persona(db: sqlite_utils.Database, name: str) -> dict[str, Any]:
    """Delete a persona; its conversations keep their messages and go on without one."""
    with transaction(db):
        counts = preview_remove(db, name)
        db.execute("DELETE FROM personas WHERE name = ?", [counts["name"]])
    return counts


def of_conversation(db: sqlite_utils.Database, conversation_id: int) -> dict[str, Any] | None:
    """The persona a conversation is held with, or None."""
    persona_id = get_conversation(db, conversation_id).get("persona_id")
    if persona_id is None:
        return None
    rows = list(db.query("SELECT * FROM personas WHERE id = ?", [persona_id]))
    return _public(rows[0]) if rows else None


def set_for_conversation(db: sqlite_utils.Database, conversation_id: int, name: str | None) -> dict[str, Any] | None:
    """Hold a conversation with persona `name` from now on (None or `NONE`: with none); returns it."""
    get_conversation(db, conversation_id)
    with transaction(db):
        row = None if name is None or name.strip().lower() == NONE else _row(db, name)
        db["conversations"].update(conversation_id, {"persona_id": row["id"] if row else None})
    return _public(row) if row else None


def export_personas(db: sqlite_utils.Database) -> list[dict[str, Any]]:
    """Every persona as `ember persona export` and `ember export` write it: name, system prompt, route,
    temperature, and whether it is the default."""
    return [_public(row) for row in db.query("SELECT * FROM personas ORDER BY name COLLATE NOCASE")]


def check_persona(item: Any) -> dict[str, Any]:
    """An exported persona, checked as `add_persona` would check it; `InvalidInput` says what is wrong."""
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise InvalidInput("needs a `name` string")
    if not isinstance(item.get("system_prompt"), str) or not item["system_prompt"].strip():
        raise InvalidInput("needs a `system_prompt` of visible text")
    route, temperature = item.get("route"), item.get("temperature")
    if route is not None and route not in ROUTES:
        raise InvalidInput(f"unknown route {route!r}; one of {', '.join(ROUTES)}")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                    or not temperature >= 0):
        raise InvalidInput(f"temperature must be a number, 0 or more, not {temperature!r}")
    return {"name": check_name(item["name"]), "system_prompt": item["system_prompt"], "route": route,
            "temperature": None if temperature is None else float(temperature),
            "default": item.get("default") is True}


def merge_personas(db: sqlite_utils.Database, items: list[dict[str, Any]], *, replace: bool = False,
                   dry_run: bool = False) -> dict[str, Any]:
    """Add exported personas (checked by `check_persona`) in one transaction: a new name is added, an
    identical one left alone, one that differs kept as it is unless `replace`. The export's default
    becomes the default when there is none (or with `replace`). Returns the names under `added`,
    `replaced`, `unchanged`, `conflicts` (differ, kept) and `default` (the default set, or None)."""
    result: dict[str, Any] = {"added": [], "replaced": [], "unchanged": [], "conflicts": [], "default": None}
    with transaction(db):
        for item in items:
            rows = list(db.query("SELECT * FROM personas WHERE name = ?", [item["name"]]))
            fields = {k: item[k] for k in FIELDS}
            if not rows:
                result["added"].append(item["name"])
                if not dry_run:
                    db["personas"].insert(fields | {"created": now(), "is_default": 0})
            elif all(rows[0][k] == item[k] for k in FIELDS[1:]):
                result["unchanged"].append(rows[0]["name"])
            elif replace:
                result["replaced"].append(rows[0]["name"])
                if not dry_run:
                    db["personas"].update(rows[0]["id"], fields)
            else:
                result["conflicts"].append(rows[0]["name"])
        wanted = next((item["name"] for item in items if item["default"]), None)
        current = default_persona(db)
        if wanted is not None and (current is None or replace) and (
                current is None or current["name"].lower() != wanted.lower()):
            result["default"] = wanted
            if not dry_run:
                set_default(db, wanted)
    return result


def link_conversations(db: sqlite_utils.Database, links: dict[str, str]) -> int:
    """Hold imported conversations with personas by name (`{conversation external_id: persona name}`);
    a conversation not in the log, or a name with no persona here, is left as it is. Returns how many
    were linked."""
    linked = 0
    with transaction(db):
        for external_id, name in links.items():
            persona = list(db.query("SELECT id FROM personas WHERE name = ?", [name]))
            if persona:
                linked += db.execute("UPDATE conversations SET persona_id = ? WHERE external_id = ?",
                                     [persona[0]["id"], external_id]).rowcount
    return linked
