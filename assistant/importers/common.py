"""What every importer shares: the items it yields, bad-input reports, times, and streamed JSON."""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime as dt
import hashlib
import io
import zipfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from storage.imports import ImportedConversation

BUFFER = 64 * 1024


@dataclasses.dataclass
class Note:
    """A note for memory: records `{id, text, time?, speaker?, session?}` that replace what `group` held."""

    group: str
    records: list[dict[str, Any]]


@dataclasses.dataclass
class Problem:
    """Bad input at one place of one file: skipped with --skip-bad, otherwise the whole import fails."""

    file: str
    place: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.place}: {self.reason}" if self.place else f"{self.file}: {self.reason}"


Item = ImportedConversation | Note | Problem


@dataclasses.dataclass
class Export:
    """One export opened for reading: which app wrote it, the SHA-256 of its bytes, and its items."""

    app: str
    path: Path
    sha256: str
    read: Callable[["Export"], Iterator[Item]]
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    warnings: list[str] = dataclasses.field(default_factory=list)
    member: str | None = None          # the file inside a zip, or inside a folder, that holds the data
    members: list[str] = dataclasses.field(default_factory=list)

    def items(self) -> Iterator[Item]:
        return self.read(self)

    def skip(self, what: str, n: int = 1) -> None:
        """Count something left out on purpose (an image, another branch, an empty message)."""
        if n:
            self.skipped[what] += n


def sha256_file(path: Path) -> str:
    """SHA-256 of a file's bytes, read in blocks (a 500 MB export is never held in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def sha256_folder(path: Path, files: list[Path]) -> str:
    """SHA-256 over a folder's files: their paths and their contents' hashes."""
    digest = hashlib.sha256()
    for file in sorted(files):
        digest.update(f"{file.relative_to(path).as_posix()}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


def iso(value: Any) -> str | None:
    """A source's time as ISO-8601 UTC with milliseconds (Ember's own form): epoch seconds (or ms, µs, ns),
    or an ISO string; None when there is none or it is not a time."""
    if value is None or isinstance(value, bool):
        return None
    try:
        if isinstance(value, (int, float)):
            seconds = float(value)
            while seconds > 1e11:       # milliseconds, microseconds or nanoseconds since the epoch
                seconds /= 1000
            when = dt.datetime.fromtimestamp(seconds, tz=dt.timezone.utc)
        elif isinstance(value, str) and value.strip():
            text = value.strip().replace("Z", "+00:00").replace(" ", "T", 1)
            when = dt.datetime.fromisoformat(text)
            if when.tzinfo is None:
                when = when.replace(tzinfo=dt.timezone.utc)
        else:
            return None
    except (ValueError, OverflowError, OSError):
        return None
    return when.astimezone(dt.timezone.utc).isoformat(timespec="milliseconds")


class CountingReader(io.RawIOBase):
    """A binary stream that counts the bytes read through it (to say where bad JSON is)."""

    def __init__(self, raw: IO[bytes]):
        self.raw = raw
        self.position = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.position += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


@contextlib.contextmanager
def open_member(export: Export) -> Iterator[IO[bytes]]:
    """The bytes of the export's data file: the file itself, one in a folder, or a member of a zip read
    directly (never unpacked to disk)."""
    if export.path.is_dir():
        with open(export.path / export.member, "rb") as f:
            yield f
    elif zipfile.is_zipfile(export.path):
        with zipfile.ZipFile(export.path) as archive, archive.open(export.member) as f:
            yield f
    else:
        with open(export.path, "rb") as f:
            yield f


def stream_items(export: Export, prefix: str, member: str | None = None) -> Iterator[tuple[int, Any]]:
    """(index, object) for each element of the JSON array at `prefix` ("item" for a top-level list),
    parsed as it is read; truncated or invalid JSON ends the stream with a `Problem` (yielded as
    (-1, problem)) naming the file, the element reached and the byte offset."""
    import ijson

    if member is not None:
        export = dataclasses.replace(export, member=member)
    name = export.path.name + (f"/{export.member}" if export.member and export.member != export.path.name else "")
    with open_member(export) as raw:
        reader = CountingReader(raw)
        index = -1
        try:
            for index, obj in enumerate(ijson.items(io.BufferedReader(reader, BUFFER), prefix, use_float=True)):
                yield index, obj
        except ijson.JSONError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if "premature EOF" in first or "Incomplete" in type(err).__name__ and "EOF" in first:
                first = "the file ends in the middle (truncated)"
            yield -1, Problem(name, f"after element {index + 1} of the list, near byte {reader.position:,}",
                              f"bad JSON: {first}")
        except UnicodeDecodeError as err:
            yield -1, Problem(name, f"near byte {reader.position:,}", f"not UTF-8 ({err.reason})")


def where(export: Export, member: str | None, what: str) -> str:
    """The place of an element: `what` alone for a single-file export, the data file first otherwise."""
    return what if not member or member == export.path.name else f"{member}, {what}"


def text_of(value: Any) -> str:
    """A source's message text: strings kept, anything else becomes ''."""
    return value if isinstance(value, str) else ""
