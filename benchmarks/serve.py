"""`ember serve` measured: `ember ask` through the resident engine against a bare llama-cpp-python
script (whole processes, interleaved, the same 128-token greedy answer), then bounded load from 1, 4 and
16 concurrent streaming clients on 127.0.0.1, then a check that nothing accepted was lost.

The bare side is `benchmarks.everyday`'s script and process timer, the ones `ember bench engine` uses.
Load: every client sends its requests one after another (a fixed count, and none after the duration
cap), streaming, never retrying; a 429/503 is counted as a rejection. Time to first token is from
sending the request to the first content delta; tokens/s is every completion token of the level over
its wall time. Afterwards, with the server stopped, every accepted request must have its user message
and its reply (the text the client received) in the database, and `PRAGMA integrity_check` must be ok.
"""
from __future__ import annotations

import asyncio
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from assistant.config import Settings
from benchmarks import everyday

LEVELS = (1, 4, 16)
QUEUE = 4                        # the server's default: the running reply and 4 waiting


class Server:
    """A real `ember serve` process on a free 127.0.0.1 port, for one data directory."""

    def __init__(self, home: Path, settings: Settings, env: dict[str, str]):
        self.log = home.parent / "serve.log"
        self.process = subprocess.Popen([sys.executable, "-m", "assistant", "serve", "--port", "0",
                                         "--queue", str(QUEUE)], env=env, stdout=subprocess.DEVNULL,
                                        stderr=self.log.open("w"))
        deadline = time.monotonic() + 120
        while "serving on" not in self.log.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ember serve did not start: {self.log.read_text()[-400:]}")
            time.sleep(0.1)
        line = next(line for line in self.log.read_text().splitlines() if "serving on" in line)
        self.url = line.split("serving on ")[1].split()[0]
        import httpx2

        while httpx2.get(self.url.replace("/v1", "/health"), timeout=30).json()["status"] == "loading":
            time.sleep(0.2)

    def health(self) -> dict[str, Any]:
        import httpx2

        return httpx2.get(self.url.replace("/v1", "/health"), timeout=30).json()

    def stop(self) -> None:
        import signal

        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def resident_vs_bare(server: Server, settings: Settings, env: dict[str, str], rounds: int) -> dict[str, Any]:
    """Median whole-process time of `ember ask` answered by the server and of the bare script."""
    sides = {
        "bare": [sys.executable, "-c", everyday.BARE, str(settings.model_path), str(settings.n_ctx),
                 str(settings.threads), everyday.STORY, str(everyday.MAX_TOKENS)],
        "resident": [sys.executable, "-m", "assistant", "ask", "--no-log", "--route", "base", "--max-tokens",
                     str(everyday.MAX_TOKENS), "--temperature", "0", "--seed", "0", everyday.STORY],
    }
    served = server.health()["served"]
    for args in sides.values():          # warm the page cache, the server's prompt cache
        everyday._timed_process(args, env)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    for i in range(rounds):
        for name in (list(sides) if i % 2 == 0 else list(reversed(sides))):
            runs[name].append(everyday._timed_process(sides[name], env))
    out: dict[str, Any] = {name: {"seconds_median": round(statistics.median(r["seconds"] for r in measured), 3),
                                  "peak_rss_mb_median": round(statistics.median(r["peak_rss_mb"] for r in measured), 1),
                                  "seconds": [round(r["seconds"], 3) for r in measured]}
                           for name, measured in runs.items()}
    # The floor: the server's own time for the answer (prompt and 128 tokens of decode), which no client
    # can beat; the ratio cannot go below it over the bare script's whole process.
    answer = json.loads(everyday._timed_process(sides["resident"] + ["--json"], env)["output"])
    out["answered_by_server"] = server.health()["served"] - served == rounds + 2
    out["server_answer_s"] = answer["seconds"]
    out["floor_ratio"] = round(answer["seconds"] / statistics.median(r["seconds"] for r in runs["bare"]), 3)
    out["same_answer"] = runs["resident"][0]["output"].strip() == runs["bare"][0]["output"].strip()
    out["ratio"] = round(out["resident"]["seconds_median"] / out["bare"]["seconds_median"], 3)
    out["target"] = {"resident_vs_bare_at_most": 0.5}
    out["met"] = out["ratio"] <= 0.5
    return out


def _percentile(values: list[float], share: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


async def _one(client: Any, url: str, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    started = time.perf_counter()
    first, text, final = None, [], None
    async with client.stream("POST", url + "/chat/completions", json=body) as response:
        if response.status_code in (429, 503):
            await response.aread()
            return {"rejected": True, "status": response.status_code, "prompt": prompt}
        if response.status_code != 200:
            return {"error": response.status_code, "prompt": prompt}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            content = chunk["choices"][0]["delta"].get("content")
            if content:
                first = first if first is not None else time.perf_counter() - started
                text.append(content)
            if chunk["choices"][0].get("finish_reason"):
                final = chunk
    return {"prompt": prompt, "text": "".join(text), "ttft_s": first, "seconds": time.perf_counter() - started,
            "tokens": final["usage"]["completion_tokens"] if final else 0,
            "ember": final.get("ember") if final else None}


async def _level(url: str, model: str, clients: int, per_client: int, max_tokens: int,
                 duration: float) -> dict[str, Any]:
    import httpx2

    deadline = time.perf_counter() + duration
    results: list[dict[str, Any]] = []

    async def client_loop(c: int, http: Any) -> None:
        for i in range(per_client):
            if time.perf_counter() > deadline:
                return
            prompt = f"Client {c}, question {i}: name a colour and a fruit."
            results.append(await _one(http, url, model, prompt, max_tokens))

    started = time.perf_counter()
    async with httpx2.AsyncClient(timeout=300, limits=httpx2.Limits(max_connections=clients)) as http:
        await asyncio.gather(*(client_loop(c, http) for c in range(clients)))
    wall = time.perf_counter() - started
    accepted = [r for r in results if "text" in r]
    ttft = [r["ttft_s"] for r in accepted if r["ttft_s"] is not None]
    tokens = sum(r["tokens"] for r in accepted)
    return {"clients": clients, "requests": len(results), "accepted": len(accepted),
            "rejected": sum(1 for r in results if r.get("rejected")),
            "errors": sum(1 for r in results if "error" in r),
            "ttft_p50_s": round(_percentile(ttft, 0.5), 3) if ttft else None,
            "ttft_p95_s": round(_percentile(ttft, 0.95), 3) if ttft else None,
            "tokens": tokens, "wall_s": round(wall, 2), "tokens_per_second": round(tokens / wall, 1),
            "_accepted": accepted}


def nothing_lost(home: Path, accepted: list[dict[str, Any]]) -> dict[str, Any]:
    """Every accepted request's user message and reply are in the database; the file is whole."""
    from storage import conversations as convs
    from storage.db import integrity_ok, open_db
    from storage.errors import NotFound

    def message(db: Any, message_id: int | None, role: str) -> dict[str, Any] | None:
        try:
            row = convs.get_message(db, message_id) if message_id is not None else None
        except NotFound:
            return None
        return row if row is not None and row["role"] == role else None


    db = open_db(home)
    try:
        missing = 0
        for r in accepted:
            ids = r.get("ember") or {}
            user, reply = (message(db, ids.get("user_message_id"), "user"),
                           message(db, ids.get("message_id"), "assistant"))
            if not (user and user["content"] == r["prompt"] and reply and reply["content"] == r["text"]
                    and reply["status"] in ("complete", "length")):
                missing += 1
        return {"accepted": len(accepted), "missing": missing, "integrity_ok": integrity_ok(db),
                "ok": missing == 0 and integrity_ok(db)}
    finally:
        db.close()


def run(settings: Settings, rounds: int = 5, quick: bool = False) -> dict[str, Any]:
    """The whole benchmark in a fresh data directory."""
    per_client, max_tokens, duration = (1, 16, 30.0) if quick else (4, 64, 60.0)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        env = everyday.shell_env(home, settings)
        server = Server(home, settings, env)
        try:
            model = server.health()["model"]
            result: dict[str, Any] = {"model": settings.model_path.name, "threads": settings.threads,
                                      "max_tokens": everyday.MAX_TOKENS, "rounds": rounds, "quick": quick}
            result["resident_ask"] = resident_vs_bare(server, settings, env, rounds)
            levels = [asyncio.run(_level(server.url, model, n, per_client, max_tokens, duration)) for n in LEVELS]
        finally:
            server.stop()
        accepted = [r for level in levels for r in level.pop("_accepted")]
        result["load"] = {"queue": QUEUE, "requests_per_client": per_client, "max_tokens": max_tokens,
                          "duration_cap_s": duration, "levels": levels}
        result["nothing_lost"] = nothing_lost(home, accepted)
    return result


def report(result: dict[str, Any]) -> str:
    """A few readable lines."""
    r = result["resident_ask"]
    lines = [f"ember ask, resident engine: {r['resident']['seconds_median']:.2f} s vs bare llama-cpp-python "
             f"{r['bare']['seconds_median']:.2f} s = {r['ratio']:.2f}x "
             f"(target ≤ 0.5x: {'met' if r['met'] else 'NOT met'}; "
             f"the server's own answer took {r['server_answer_s']:.2f} s = {r['floor_ratio']:.2f}x of bare)"]
    for level in result["load"]["levels"]:
        lines.append(f"{level['clients']:2} clients: {level['accepted']}/{level['requests']} accepted, "
                     f"{level['rejected']} rejected, ttft p50 {level['ttft_p50_s']} s p95 {level['ttft_p95_s']} s, "
                     f"{level['tokens_per_second']} tok/s")
    lost = result["nothing_lost"]
    lines.append(f"nothing lost: {lost['accepted'] - lost['missing']}/{lost['accepted']} accepted requests stored "
                 f"whole, integrity {'ok' if lost['integrity_ok'] else 'FAILED'}")
    return "\n".join(lines)
