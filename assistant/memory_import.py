"""Reading memories to import: JSONL, one `{"id", "text", "time"?, "speaker"?, "session"?}` a line."""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from assistant.errors import InvalidInput

OPTIONAL = ("time", "speaker", "session")


def _record(line: str) -> dict[str, Any]:
    """One validated record, or ValueError saying what is wrong with it."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON ({err.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    if not isinstance(obj.get("id"), str) or not obj["id"].strip():
        raise ValueError('needs "id", a non-empty string')
    if not isinstance(obj.get("text"), str) or not obj["text"].strip():
        raise ValueError('needs "text", a non-empty string')
    record = {"id": obj["id"], "text": obj["text"]}
    for key in OPTIONAL:
        value = obj.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise ValueError(f'"{key}" must be a string')
        record[key] = value
    if "time" in record:
        try:
            parsed = dt.datetime.fromisoformat(record["time"].replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f'"time" is not ISO-8601: {record["time"]!r}') from None
        record["time"] = parsed.isoformat() if len(record["time"]) > 10 else parsed.date().isoformat()
    return record


def read_records(path: Path, *, skip_bad: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    """All records of a JSONL file; a bad line fails the whole file unless `skip_bad`, and so does a file
    with no good line at all (`InvalidInput`).

    Returns (records, problems); a later line with the same id replaces an earlier one.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise InvalidInput(f"cannot read {path}: {err.strerror}") from err
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise InvalidInput(f"{path} is not UTF-8 (line {line}, byte 0x{data[err.start]:02x}); "
                           "convert it with iconv first; nothing was imported") from err
    records: dict[str, dict[str, Any]] = {}
    problems = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = _record(line)
        except ValueError as err:
            problems.append(f"line {number}: {err}")
            continue
        records.pop(record["id"], None)
        records[record["id"]] = record
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    if problems and not skip_bad:
        raise InvalidInput(f"{path}: {problems[0]}{more}; nothing was imported "
                           "(fix it, or pass --skip-bad to import the good lines)")
    if not records:
        # An import that imports nothing is a failure a script must see, not a success of zero.
        raise InvalidInput(f"{path}: no line could be imported ({problems[0]}{more}); nothing was imported"
                           if problems else f"{path} holds no records; nothing was imported")
    return list(records.values()), problems
