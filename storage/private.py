"""Private places on disk: every directory Ember creates is 0700, whatever the umask gives its parents."""
from __future__ import annotations

from pathlib import Path


def private_dirs(path: Path) -> Path:
    """Create `path` and each missing parent as a 0700 directory, one level at a time; returns `path`.

    `Path.mkdir(parents=True, mode=0o700)` gives only the last directory that mode: the parents it makes
    get the umask's (0755 under the usual 022), which left `<home>/cache` and `<home>/cache/base` 0755.
    Directories that exist are left as they are. Raises OSError as `mkdir` does (`exist_ok`: another process
    may make a level between the check and the call)."""
    for directory in [*reversed(path.parents), path]:
        if not directory.exists():
            directory.mkdir(mode=0o700, exist_ok=True)
    return path
