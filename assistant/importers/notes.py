"""Notes for memory: a folder of Markdown files (each a note, chunked by heading), and Ember's own
JSONL of memory records (`ember memory import`'s format)."""
from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Iterator

from assistant.importers.common import Export, Item, Note, Problem, iso
from assistant.memory_import import read_records

FRONT_MATTER = re.compile(r"\A---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", re.DOTALL)
DATE_KEYS = ("date", "created", "updated", "modified")
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$", re.MULTILINE)


def markdown_files(folder: Path) -> list[Path]:
    """The folder's Markdown files, recursively, hidden folders (.obsidian, .git) left out."""
    return sorted(p for p in folder.rglob("*.md") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def decode(data: bytes, name: str) -> str | Problem:
    """UTF-8 (a BOM allowed) or UTF-16 with its BOM; anything else is a Problem naming the line and byte."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as err:
            return Problem(name, f"byte {err.start:,}", "not valid UTF-16")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        return Problem(name, f"line {line}, byte {err.start:,} (0x{data[err.start]:02x})",
                       "not UTF-8 (another encoding?); convert it with iconv -t UTF-8 first")


def sections(text: str) -> list[tuple[str, str]]:
    """(heading, body) pairs: the text before the first heading, then each heading with what follows."""
    marks = list(HEADING.finditer(text))
    out = []
    if not marks or text[: marks[0].start()].strip():
        out.append(("", text[: marks[0].start()] if marks else text))
    for i, mark in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        out.append((mark.group(2).strip(), text[mark.start(): end]))
    return [(h, body.strip()) for h, body in out if body.strip()]


def note(folder: Path, path: Path) -> Note | Problem:
    """One Markdown file as a note: a record per heading section, dated by front matter or the file's time."""
    relative = path.relative_to(folder).as_posix()
    text = decode(path.read_bytes(), relative)
    if isinstance(text, Problem):
        return text
    when = dt.datetime.fromtimestamp(path.stat().st_mtime, tz=dt.timezone.utc).isoformat(timespec="seconds")
    if match := FRONT_MATTER.match(text):
        fields = dict(re.findall(r"^([A-Za-z_]+)[ \t]*:[ \t]*['\"]?(.*?)['\"]?[ \t]*$", match.group(1), re.MULTILINE))
        for key in DATE_KEYS:
            if fields.get(key.lower()) and (stamp := iso(fields[key.lower()])):
                when = stamp if "T" in fields[key.lower()] or " " in fields[key.lower()] else fields[key.lower()][:10]
                break
        text = text[match.end():]
    group = f"markdown:{relative}"
    records = [{"id": f"{group}#{i}", "text": body, "time": when, "session": relative}
               for i, (_heading, body) in enumerate(sections(text))]
    return Note(group, records)


def read_markdown(export: Export) -> Iterator[Item]:
    """Every Markdown file of the folder (or the one file given)."""
    if export.path.is_dir():
        for path in markdown_files(export.path):
            yield note(export.path, path)
    else:
        yield note(export.path.parent, export.path)


def read_jsonl(export: Export) -> Iterator[Item]:
    """Ember's memory JSONL, one record a line; each record is a note of its own (ids as given)."""
    from assistant.errors import InvalidInput

    try:
        records, problems = read_records(export.path, skip_bad=True)
    except InvalidInput as err:
        yield Problem(export.path.name, "", str(err).split(": ", 1)[-1].split("; nothing was imported")[0])
        return
    for problem in problems:
        place, _, reason = problem.partition(": ")
        yield Problem(export.path.name, place, reason)
    for record in records:
        yield Note(record["id"], [record])
