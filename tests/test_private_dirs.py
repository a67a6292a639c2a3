"""Every directory Ember makes is 0700 and every file 0600, whatever the umask gives mkdir's parents: the
helper itself, the helpers built on it, and a real `ember adapt` whose cache lives in a fresh data
directory (it made `<home>/cache` and `<home>/cache/base` 0755 before)."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

from adapters.base import write_private
from benchmarks.synthetic_user import seed_habit_user
from storage.db import ensure_private_dir, open_db
from storage.private import private_dirs


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_every_missing_level_is_made_0700_and_an_existing_one_is_left_alone(tmp_path):
    (tmp_path / "shared").mkdir(mode=0o755)
    old = os.umask(0o022)
    try:
        made = private_dirs(tmp_path / "shared" / "a" / "b" / "c")
        write_private(tmp_path / "x" / "y" / "file.bin", b"secret")
        ensure_private_dir(tmp_path / "p" / "q")
    finally:
        os.umask(old)
    assert made == tmp_path / "shared" / "a" / "b" / "c"
    assert [_mode(tmp_path / "shared" / p) for p in ("a", "a/b", "a/b/c")] == [0o700] * 3
    assert _mode(tmp_path / "shared") == 0o755                          # not Ember's to change
    assert [_mode(tmp_path / p) for p in ("x", "x/y", "p", "p/q")] == [0o700] * 4
    assert _mode(tmp_path / "x" / "y" / "file.bin") == 0o600


def test_a_real_adapt_run_leaves_only_private_directories_and_files_in_the_data_directory(tmp_path, tiny_gguf):
    home = tmp_path / "home"
    seed_habit_user(open_db(home), 12)
    env = {k: v for k, v in os.environ.items() if k != "EMBER_CACHE"}    # the cache in <home>/cache, made here
    env.update(EMBER_HOME=str(home), EMBER_THREADS="2")
    result = subprocess.run([sys.executable, "-m", "assistant", "adapt", "--model", str(tiny_gguf("llama3")),
                             "--steps", "2", "--no-dp", "--json"], capture_output=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr.decode()
    assert json.loads(result.stdout)["adapter_id"]
    assert (home / "cache" / "base").is_dir()
    wrong = [f"{oct(_mode(p))} {p.relative_to(home)}" for p in home.rglob("*")
             if _mode(p) != (0o700 if p.is_dir() else 0o600)]
    assert wrong == []
