"""`ember import`: other apps' chat history and notes, each format in a module of its own.

`open_export` finds out what a file or folder is (`--format auto`) and returns an `Export` whose items
are conversations, notes and problems, read as a stream: a 500 MB export is never held in memory.
"""
from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Callable, Iterator

from assistant.errors import InvalidInput
from assistant.importers import chatgpt, chats, databases, notes
from assistant.importers.common import Export, Item, Note, Problem, open_member, sha256_file, sha256_folder

READERS: dict[str, Callable[[Export], Iterator[Item]]] = {
    "chatgpt": chatgpt.read, "claude": chats.read_claude, "openwebui": chats.read_openwebui,
    "ember": chats.read_ember, "llm": databases.read_llm, "oterm": databases.read_oterm,
    "elia": databases.read_elia, "markdown": notes.read_markdown, "jsonl": notes.read_jsonl,
}
FORMATS = ("auto", "chatgpt", "claude", "llm", "openwebui", "oterm", "elia", "markdown", "jsonl", "ember")
JSON_APPS = ("chatgpt", "claude", "openwebui", "ember")
# ChatGPT and Claude name it conversations.json; newer ChatGPT exports split it (conversations-000.json …).
DATA_FILE = re.compile(r"(^|/)conversations(-\d+)?\.json$")
SQLITE_MAGIC = b"SQLite format 3\x00"
__all__ = ["open_export", "Export", "Note", "Problem", "FORMATS"]


def _fail(path: Path, place: str, reason: str) -> InvalidInput:
    return InvalidInput(f"{Problem(path.name, place, reason)}; nothing was imported")


def sniff_json(export: Export, member: str | None) -> str:
    """Which app wrote a JSON export, from the keys of its first conversation (read as a stream)."""
    import ijson

    with open_member(Export(export.app, export.path, export.sha256, export.read, member=member)) as raw:
        try:
            for count, (prefix, event, value) in enumerate(ijson.parse(raw)):
                if prefix == "" and event == "start_map":
                    continue
                if prefix == "format" and value == "ember-export":
                    return "ember"
                if prefix == "item" and event == "map_key":
                    if value == "mapping":
                        return "chatgpt"
                    if value == "chat_messages":
                        return "claude"
                    if value in ("chat", "history"):
                        return "openwebui"
                if (prefix, event) in (("item", "end_map"), ("", "end_array")) or count > 100_000:
                    break
        except ijson.JSONError as err:
            raise _fail(export.path, member or "", f"bad JSON ({str(err).strip().splitlines()[0]})") from None
    raise _fail(export.path, member or "", "not a ChatGPT, Claude, Open WebUI or Ember export (or holds no "
                "conversations); name the format with --format")


def open_export(path: Path, fmt: str = "auto") -> Export:
    """The export at `path`: detected (`auto`) or as `fmt` says, hashed, ready to read."""
    path = Path(path)
    if not path.exists():
        raise InvalidInput(f"{path}: no such file or folder; nothing was imported")
    if fmt not in FORMATS:
        raise InvalidInput(f"--format is one of {', '.join(FORMATS)}, not {fmt!r}")
    export = Export(fmt, path, "", READERS.get(fmt, notes.read_markdown))
    if path.is_dir():
        members = sorted(p.relative_to(path).as_posix() for p in path.rglob("*.json")
                         if DATA_FILE.search(p.relative_to(path).as_posix()))
        if members and fmt in ("auto", *JSON_APPS):
            app = fmt if fmt != "auto" else sniff_json(export, members[0])
            return Export(app, path, sha256_folder(path, [path / m for m in members]), READERS[app],
                          member=members[0], members=members)
        files = notes.markdown_files(path)
        if fmt in ("auto", "markdown") and files:
            return Export("markdown", path, sha256_folder(path, files), READERS["markdown"])
        raise InvalidInput(f"{path}: a folder with no conversations.json and no Markdown files "
                           "Ember can import; nothing was imported")
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                members = sorted(n for n in archive.namelist() if DATA_FILE.search(n))
        except zipfile.BadZipFile as err:
            raise _fail(path, "", f"a damaged zip ({err})") from None
        if not members:
            raise _fail(path, "", "a zip with no conversations.json inside")
        export.member = members[0]
        app = fmt if fmt != "auto" else sniff_json(export, members[0])
        return Export(app, path, sha256_file(path), READERS[app], member=members[0], members=members)
    with open(path, "rb") as f:
        head = f.read(len(SQLITE_MAGIC))
    if head == SQLITE_MAGIC:
        from storage import foreign

        app = fmt if fmt != "auto" else foreign.kind(path)
        if app not in ("llm", "oterm", "elia"):
            raise _fail(path, "", "an SQLite database, but not llm's logs.db, oterm's or elia's")
        return Export(app, path, sha256_file(path), READERS[app])
    suffix = path.suffix.lower()
    if fmt == "markdown" or (fmt == "auto" and suffix in (".md", ".markdown")):
        return Export("markdown", path, sha256_file(path), READERS["markdown"])
    if fmt == "jsonl" or (fmt == "auto" and suffix == ".jsonl"):
        return Export("jsonl", path, sha256_file(path), READERS["jsonl"])
    export.member = path.name
    app = fmt if fmt != "auto" else sniff_json(export, None)
    if app not in JSON_APPS:
        raise _fail(path, "", f"a JSON file, not a {app} export")
    return Export(app, path, sha256_file(path), READERS[app], member=path.name, members=[path.name])
