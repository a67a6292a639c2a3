"""Start-up and request paths stay light: lazy command loading, and no torch, transformers or pandas
when answering a question or importing memories (their imports cost seconds and hundreds of MB).
Timings live in benchmarks; these tests check which modules a real `ember` process loaded."""
from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys

import click

from assistant import cli
from assistant.cli import COMMANDS, main

HEAVY = ("torch", "transformers", "sentence_transformers", "pandas")
WEB = ("fastapi", "uvicorn", "starlette")   # `ember serve`'s stack: no other command may load it
COMMAND_MODULES = sorted({target.split(":")[0] for target, _ in COMMANDS.values()})

# Runs `ember ARGS…` in this process and, at exit, writes the names of the loaded modules to the file
# named by EMBER_TEST_MODULES_OUT (stdout stays the command's own).
WRAPPER = """
import atexit, json, os, runpy, sys
def _dump():
    with open(os.environ["EMBER_TEST_MODULES_OUT"], "w") as out:
        json.dump(sorted(sys.modules), out)
atexit.register(_dump)
sys.argv = ["ember", *sys.argv[1:]]
runpy.run_module("assistant", run_name="__main__", alter_sys=True)
"""


def run_ember(home, tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """The real `ember` in a subprocess, and the set of modules it had loaded when it exited."""
    out = tmp_path / f"modules-{len(list(tmp_path.glob('modules-*')))}.json"
    env = dict(os.environ, EMBER_HOME=str(home), EMBER_TEST_MODULES_OUT=str(out))
    env.pop("EMBER_DEBUG", None)
    result = subprocess.run([sys.executable, "-c", WRAPPER, *args], capture_output=True, text=True,
                            env=env, timeout=600)
    return result, set(json.loads(out.read_text())) if out.exists() else set()


def heavy(modules: set[str]) -> list[str]:
    return sorted(name for name in modules if name.split(".")[0] in HEAVY)


def test_help_lists_every_command_as_loading_them_all_would(ember, monkeypatch):
    commands = []
    for name, (target, help_line) in COMMANDS.items():
        module_name, attribute = target.split(":")
        command = getattr(importlib.import_module(module_name), attribute)
        assert isinstance(command, click.Command) and command.name == name
        # the table's line is the command's own: a docstring edited in one place only fails here
        assert command.help.strip().splitlines()[0] == help_line, name
        commands.append(command)
    # every module of assistant/cli that exports COMMANDS is in the table, whole
    modules = [importlib.import_module(f"assistant.cli.{info.name}") for info in pkgutil.iter_modules(cli.__path__)]
    every = {cmd.name for module in modules for cmd in getattr(module, "COMMANDS", [])}
    assert every == set(COMMANDS), "a command module's COMMANDS and the CLI's table disagree"

    monkeypatch.setenv("COLUMNS", "80")     # the width both this process and the child format for
    eager = click.Group("ember", commands=commands)
    ctx = click.Context(eager, info_name="ember")
    formatter = ctx.make_formatter()
    eager.format_commands(ctx, formatter)
    result = ember("--help", env={"COLUMNS": "80"})
    assert result.returncode == 0, result.err
    assert result.out.endswith(formatter.getvalue())


def test_version_and_help_load_no_command_module(home, tmp_path):
    for args in (["--version"], ["--help"]):
        result, modules = run_ember(home, tmp_path, *args)
        assert result.returncode == 0, result.stderr
        assert not [m for m in COMMAND_MODULES if m in modules], args
        assert "sqlite_utils" not in modules and not heavy(modules), args
        assert not [m for m in modules if m.split(".")[0] in WEB], args


def test_an_unknown_command_is_one_clear_error(ember):
    result = ember("no-such-command")
    assert result.returncode == 2 and "No such command" in result.err and "Traceback" not in result.err


def test_asking_never_loads_torch_transformers_or_pandas(home, tmp_path):
    notes = tmp_path / "notes.jsonl"
    notes.write_text("".join(json.dumps({"id": f"n{i}", "text": text}) + "\n" for i, text in enumerate([
        "My sister Ana was born on 3 May.", "I parked the car on level four of the station garage.",
        "The wifi password at the cabin is hunter2.", "Dr. Okafor's appointment is on Tuesday at 9."])))
    imported, modules = run_ember(home, tmp_path, "memory", "import", str(notes))
    assert imported.returncode == 0, imported.stderr
    assert not heavy(modules) and "onnxruntime" in modules   # imports embed, without torch

    for args in (["ask", "--route", "base", "Say hello.", "--max-tokens", "4", "--seed", "1"],
                 ["ask", "When is Ana's birthday?", "--max-tokens", "4", "--seed", "1", "--json"],
                 ["memory", "search", "Where did I park?", "--json"]):
        result, modules = run_ember(home, tmp_path, *args)
        assert result.returncode == 0, (args, result.stderr)
        assert not heavy(modules), (args, heavy(modules))
        assert not [m for m in modules if m.split(".")[0] in WEB], args
        assert "sqlite_utils" in modules   # the check ran on a real request
        if "base" in args:
            # sqlite-utils plugins are never looked for: that reads every installed package's entry
            # points (~40-75 ms), and no third-party code runs on the user's log
            assert "importlib.metadata" not in modules, args


def test_ask_ends_without_teardown_and_with_everything_written(ember, home):
    """`ember ask` ends the process the moment its answer is written (freeing the model and tearing
    down every module took 75 ms of a 1.4 s answer): the reply is committed, the database closed
    (SQLite removes the -wal file when the last connection closes cleanly) and stdout complete."""
    result = ember("ask", "--route", "base", "Say hello.", "--max-tokens", "6", "--seed", "1", "--json")
    assert result.returncode == 0, result.err
    answer = json.loads(result.out)   # the whole document reached the pipe
    assert answer["text"]
    assert not (home / "ember.db-wal").exists()
    shown = ember("history", "--conversation", str(answer["conversation_id"]), "--json")
    assert shown.returncode == 0, shown.err
    replies = [m for m in json.loads(shown.out)[0]["messages"] if m["role"] == "assistant"]
    assert [(m["content"], m["status"]) for m in replies] == [(answer["text"], "length")]   # ended at --max-tokens, not cut off


def test_ember_run_inside_another_program_returns_to_it(home):
    """Only the `ember` program leaves early: a program that runs the command group itself (args
    given) gets control back, or a test runner calling it would end with the command."""
    code = ("from assistant.cli import main\n"
            "try:\n"
            "    main(['ask', '--route', 'base', '--no-log', '--max-tokens', '2', 'hi'])\n"
            "except SystemExit as done:\n"
            "    print('returned', done.code)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, EMBER_HOME=str(home)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("returned 0")


def test_any_module_of_the_request_path_can_be_imported_first():
    """`import assistant.conversation` (or the chat, or the importers) as a program's first import:
    storage must register Ember's SQLite driver before sqlite_utils loads, whoever imports it."""
    for module in ("assistant.conversation", "assistant.context_view", "assistant.importing"):
        result = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, (module, result.stderr[-300:])


def test_threads_default_to_physical_cores_as_psutil_counts_them():
    import psutil

    from assistant.config import default_threads, physical_cores

    assert physical_cores() == psutil.cpu_count(logical=False)
    assert default_threads() == max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)
