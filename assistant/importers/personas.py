"""Personas from Ember's own files: `ember persona export`'s (`"format": "ember-personas"`) or the
`personas` of an `ember export` (`"format": "ember-export"`), read as a stream and checked whole
before anything is written."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from assistant.errors import InvalidInput
from assistant.importers.chats import conversation_key
from assistant.importers.common import Export, Problem, stream_items
from storage import personas

FORMAT = "ember-personas"
VERSION = 1
READ_FORMATS = (FORMAT, "ember-export")


def document(items: list[dict[str, Any]], exported: str) -> dict[str, Any]:
    """What `ember persona export` writes."""
    return {"format": FORMAT, "version": VERSION, "exported": exported, "personas": items}


def _export(path: Path) -> Export:
    return Export("ember", path, "", lambda _e: iter(()), member=path.name)


def read(path: Path) -> list[dict[str, Any]]:
    """The personas in `path`, each checked (`storage.personas.check_persona`). One `InvalidInput` naming
    the file and the persona for anything wrong: a missing or unreadable file, bad JSON, another format,
    a bad persona, a name twice."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InvalidInput(f"{path}: no such file; give the file `ember persona export -o FILE` or "
                           "`ember export -o FILE` wrote")
    export = _export(path)
    found = [obj for _, obj in stream_items(export, "format")]
    fmt = found[0] if found else None
    if isinstance(fmt, Problem):
        raise InvalidInput(f"{fmt}; nothing was imported")
    if fmt not in READ_FORMATS:
        raise InvalidInput(f"{path.name}: not an Ember persona file or export (its `format` is {fmt!r}, not "
                           f"{' or '.join(repr(f) for f in READ_FORMATS)}); nothing was imported")
    items, seen = [], set()
    for index, obj in stream_items(export, "personas.item"):
        if isinstance(obj, Problem):
            raise InvalidInput(f"{obj}; nothing was imported")
        name = obj.get("name") if isinstance(obj, dict) else None
        try:
            item = personas.check_persona(obj)
        except InvalidInput as err:
            raise InvalidInput(f"{path.name}: persona {index + 1}" + (f" ({name!r})" if isinstance(name, str) else "")
                               + f": {err}; nothing was imported") from None
        if item["name"].lower() in seen:
            raise InvalidInput(f"{path.name}: persona {index + 1}: the name {item['name']!r} comes twice; "
                               "nothing was imported")
        seen.add(item["name"].lower())
        items.append(item)
    if sum(item["default"] for item in items) > 1:
        raise InvalidInput(f"{path.name}: more than one persona is marked the default; nothing was imported")
    return items


def conversation_links(path: Path) -> dict[str, str]:
    """`{conversation key: persona name}` of an `ember export`, keyed as `ember import` keys its
    conversations (`chats.conversation_key`)."""
    links = {}
    for _, obj in stream_items(_export(Path(path)), "conversations.item"):
        if isinstance(obj, dict) and isinstance(obj.get("persona"), str) and "id" in obj:
            links[conversation_key(obj)] = obj["persona"]
    return links
