"""What leaves a device over a real socket in household learning: `ember federate serve` and two
`ember federate join` devices as real processes on loopback (TLS and SuperNode authentication on), one
device behind a TCP relay that counts every byte it sends toward the SuperLink. For FedAvg-LoRA and
FedKSeed-ZO: bytes up per round on the wire (TLS, Flower's HTTPS protocol: activation, heartbeats,
polling, the app request, the replies) against the baseline measured in the same run, the device's reply
messages themselves (what the in-process Grid carries; the update is most of it); whether the device's
planted secret or any of its text appears in the stream; wall time.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from assistant.config import Settings

SECRET = "5571-3308"
TEXTS = (SECRET, "locker code", "How should I")


class Relay:
    """A TCP relay on loopback that records every byte a device sends toward the SuperLink at `target`."""

    def __init__(self, target: int):
        self.target, self.sent, self.lock = target, bytearray(), threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                device, _ = self.server.accept()
            except OSError:
                return
            try:
                link = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                device.close()
                continue
            threading.Thread(target=self._pipe, args=(device, link, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(link, device, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while data := src.recv(65536):
                if upstream:
                    with self.lock:
                        self.sent += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.server.close()


def _ember(home: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, EMBER_HOME=str(home))
    return subprocess.Popen([sys.executable, "-m", "assistant", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)


def _device(root: Path, name: str, seed: int, conversations: int, canary: str | None = None) -> Path:
    from benchmarks.synthetic_user import seed_habit_user
    from storage.db import open_db

    home = root / name
    db = open_db(home)
    seed_habit_user(db, conversations, seed=seed, canary=canary, canary_copies=2 if canary else 0)
    db.close()
    made = subprocess.run([sys.executable, "-m", "assistant", "federate", "init"], capture_output=True,
                          env=dict(os.environ, EMBER_HOME=str(home)), timeout=300)
    if made.returncode != 0:
        raise RuntimeError(made.stderr.decode())
    return home


def household(kind: str, root: Path, *, conversations: int, rounds: int, steps: int) -> dict[str, Any]:
    """One run of `rounds` rounds over two devices; device 0 (holding the secret) behind the relay."""
    server = _device(root, "server", 9, 1)
    devices = [_device(root, "d0", 0, conversations, SECRET), _device(root, "d1", 1, conversations)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    relay = Relay(port)
    began = time.monotonic()
    serving = _ember(server, "federate", "serve", "--address", f"127.0.0.1:{port}", "--kind", kind, "--devices", "2",
                     "--rounds", str(rounds), "--steps", str(steps), "--pool-size", "1024", "--json",
                     *[arg for d in devices for arg in ("--authorized-key", str(d / "federation" / "supernode.pub"))])
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if serving.poll() is not None:
                raise RuntimeError(serving.stderr.read().decode())
            time.sleep(0.3)
    ca = str(server / "federation" / "ca.pem")
    signer = str(server / "federation" / "app-signing.pub")
    joins = [_ember(devices[0], "federate", "join", f"127.0.0.1:{relay.port}", "--ca", ca, "--app-signer", signer,
                    "--json"),
             _ember(devices[1], "federate", "join", f"127.0.0.1:{port}", "--ca", ca, "--app-signer", signer, "--json")]
    outputs = [p.communicate() for p in (serving, *joins)]
    seconds = time.monotonic() - began
    relay.close()
    for p, (_, err) in zip((serving, *joins), outputs):
        if p.returncode != 0:
            raise RuntimeError(err.decode(errors="replace").strip())
    rows = json.loads(outputs[1][0])["rounds"]
    replies = sum(r["bytes_sent"] or 0 for r in rows)
    update = json.loads(outputs[0][0])["outcome"]["update_bytes"]
    sent = bytes(relay.sent)
    return {"update_bytes": update, "reply_message_bytes_per_round": round(replies / rounds),
            "wire_bytes_up_per_round": round(len(sent) / rounds), "wire_bytes_up_total": len(sent),
            "wire_over_update": round(len(sent) / rounds / update, 2), "seconds": round(seconds, 1),
            "tls": sent[:1] == b"\x16", "device_text_in_stream": any(t.encode() in sent for t in TEXTS),
            "rounds": rounds, "steps": steps, "statuses": [(r["phase"], r["status"]) for r in rows]}


def run(settings: Settings, rounds: int = 1, quick: bool = False) -> dict[str, Any]:
    """Both kinds of round (`rounds` of the CLI is unused: quick runs 1 round of 1 step, else 2 of 3)."""
    from assistant.federation import require_flower

    require_flower()
    fed_rounds, steps, conversations = (1, 1, 8) if quick else (2, 3, 24)
    arms = {}
    for kind in ("fedkseed", "fedavg"):
        with tempfile.TemporaryDirectory(prefix=f"ember-bench-wire-{kind}-") as tmp:
            arms[kind] = household(kind, Path(tmp), conversations=conversations, rounds=fed_rounds, steps=steps)
    return {"quick": quick, "devices": 2, "conversations_per_device": conversations, "arms": arms}


def report(result: dict[str, Any]) -> str:
    """A few readable lines."""
    lines = []
    for kind, a in result["arms"].items():
        lines.append(f"{kind}: update {a['update_bytes']:,} B, reply messages {a['reply_message_bytes_per_round']:,} "
                     f"B/round, on the wire (TLS) {a['wire_bytes_up_per_round']:,} B/round "
                     f"({a['wire_over_update']}× the update), device text in stream: {a['device_text_in_stream']}, "
                     f"{a['seconds']} s")
    return "\n".join(lines)
