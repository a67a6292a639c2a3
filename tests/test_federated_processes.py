"""Household learning over real processes on loopback: `ember federate serve` (Flower's SuperLink with TLS
and SuperNode authentication, and the household's ServerApp) and `ember federate join` on two devices,
each its own data directory with a seeded user. A round completes and is recorded on both; a device whose
key the server did not authorize is refused; a TCP relay between one device and the SuperLink records
every byte the device sends (TLS, none of its text, about the update's size); someone who reaches the
SuperLink's address and starts a run of their own app through its Control API (no account authentication
in Flower 1.42) gets no code run on the server, and even launching its ServerApp themselves (with the
server's Runtime secret) gets nothing run on the devices, which run only the app signed with the
household's key; a server killed mid-round and restarted leaves the device's data, adapters and ledger
intact and the round not done."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="household learning needs the federated extra: pip install -e '.[federated]'")

from benchmarks.federated_wire import Relay  # noqa: E402
from benchmarks.synthetic_user import seed_habit_user  # noqa: E402
from storage import federation, ledger, registry, runs  # noqa: E402
from storage.db import open_db  # noqa: E402

SECRET = "5571-3308"
POOL = 1024              # FedKSeed's K: the update is 1,024 float32 sums, 4,096 bytes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ember(home: Path, *args: str, sigint_ignored: bool = False) -> subprocess.Popen:
    """`ember ARGS` in its own session; `sigint_ignored`: as a script's `ember … &` starts it (a shell
    without job control starts background commands with SIGINT ignored, and children inherit that)."""
    env = dict(os.environ, EMBER_HOME=str(home), EMBER_THREADS="1")
    env.pop("EMBER_DEBUG", None)
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
    return subprocess.Popen([sys.executable, "-m", "assistant", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True, preexec_fn=ignore)


def _finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"timed out: {err.decode(errors='replace')[-2000:]}")
    return process.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def _init(home: Path) -> None:
    made = subprocess.run([sys.executable, "-m", "assistant", "federate", "init"], capture_output=True,
                          env=dict(os.environ, EMBER_HOME=str(home)), timeout=120)
    assert made.returncode == 0, made.stderr


def _device(root: Path, name: str, *, seed: int, canary: str | None = None) -> Path:
    home = root / name
    db = open_db(home)
    seed_habit_user(db, 8, seed=seed, canary=canary, canary_copies=2 if canary else 0)
    db.close()
    _init(home)
    return home


ATTACKER_APP = Path(__file__).parent / "attacker_app"


def _start_attackers_run(port: int, ca: str, out: Path) -> int:
    """What anyone who reaches the SuperLink's address can do in Flower 1.42: start a run of their own app
    through the Control API, as `flwr run` does. The FAB goes with a forged verification (signed with the
    attacker's own key, under the household key's id); the SuperLink drops what StartRun carries."""
    import hashlib

    from cryptography.hazmat.primitives.asymmetric import ed25519
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.serde import fab_to_proto, user_config_to_proto
    from flwr.proto.control_pb2 import StartRunRequest  # pylint: disable=no-name-in-module
    from flwr.supercore.fab import Fab

    from assistant.federation import signing
    from assistant.federation.processes import control_client

    fab = build_fab_from_disk(ATTACKER_APP)
    household_id = signing.key_id(signing.load_public(Path(ca).with_name(signing.PUBLIC)))
    forged = {household_id if k != "valid_license" else k: v
              for k, v in signing.verifications(fab, ed25519.Ed25519PrivateKey.generate()).items()}
    client = control_client(f"127.0.0.1:{port}", Path(ca))
    try:
        response = client.StartRun(StartRunRequest(fab=fab_to_proto(Fab(hashlib.sha256(fab).hexdigest(), fab, forged)),
                                                   override_config=user_config_to_proto({"out": str(out)})))
    finally:
        client.close()
    return int(response.run_id)


def _attack(port: int, ca: str, folder: Path, result: dict) -> None:
    """Someone on the network starts their own run as soon as the SuperLink listens."""
    try:
        _wait_for(lambda: _listening(port), 60, "the SuperLink")
        result["run_id"] = _start_attackers_run(port, ca, folder / "attacker-a.json")
    except BaseException as err:  # the test that reads `result` reports it
        result["error"] = repr(err)


def _attack_as_superexec(server: Path, port: int, ca: str, folder: Path, result: dict) -> None:
    """Someone who holds the server's Runtime secret, i.e. can act as its SuperExec (but not its app-signing
    key): once the household's ServerApp is launched, starts a run of their own app and launches its
    ServerApp themselves (Flower's own AcquireTask and executor, on their machine); the devices must still
    refuse to run it."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=no-name-in-module
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
    from flwr.supercore.superexec.plugin import AutoExecPlugin

    from assistant.federation.launcher import LAUNCHED

    try:
        log = server / "federation" / "serve" / "launcher.log"
        _wait_for(lambda: log.is_file() and LAUNCHED in log.read_text(), 120, "the household's ServerApp")
        (secret,) = (server / "federation" / "serve").glob("superexec-*.secret")
        address = f"127.0.0.1:{port}"
        runtime = RuntimeHttpClient.from_server_address(
            server_address=address, insecure=False, root_certificates=ca,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                          SuperExecAuthHttpInterceptor(master_secret=secret.read_bytes(),
                                                       protected_methods=frozenset({"/flwr.proto.Runtime/AcquireTask"}))])
        run_id = _start_attackers_run(port, ca, folder / "attacker-b.json")
        result["run_id"] = run_id
        os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
        os.environ["FLWR_HOME"] = str(folder / "attacker-flwr")
        plugin = AutoExecPlugin(runtime_api_address=address, insecure=False, root_certificates_path=ca,
                                runtime_dependency_install=False, executor=SubprocessExecutor())
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            got = runtime.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.SERVER_APP]))
            if got.HasField("task") and got.token and got.task.run_id == run_id:
                plugin.launch_task(token=got.token, task=got.task)
                result["launched"] = True
                break
            time.sleep(0.2)                 # (another attacker's pending run is taken and dropped)
        runtime.close()
    except BaseException as err:  # the test that reads `result` reports it
        result["error"] = repr(err)


@pytest.fixture(scope="module")
def household(tmp_path_factory):
    """One FedKSeed round over real processes: serve + two devices (one through the relay) + an intruder
    device + an attacker's run started through the Control API + another launched by someone holding the
    server's Runtime secret."""
    root = tmp_path_factory.mktemp("household-net")
    server = root / "server"
    _init(server)
    laptop = _device(root, "laptop", seed=0, canary=SECRET)
    jetson = _device(root, "jetson", seed=1)
    intruder = _device(root, "intruder", seed=2)
    port = _free_port()
    relay = Relay(port)
    ca = str(server / "federation" / "ca.pem")
    signer = str(server / "federation" / "app-signing.pub")
    attack: dict = {}
    attacker = threading.Thread(target=_attack, args=(port, ca, root, attack), daemon=True)
    attack_b: dict = {}
    attacker_b = threading.Thread(target=_attack_as_superexec, args=(server, port, ca, root, attack_b), daemon=True)
    serving = _ember(server, "federate", "serve", "--address", f"127.0.0.1:{port}", "--kind", "fedkseed",
                     "--devices", "2", "--rounds", "1", "--steps", "1", "--pool-size", str(POOL),
                     "--authorized-key", str(laptop / "federation" / "supernode.pub"),
                     "--authorized-key", str(jetson / "federation" / "supernode.pub"), "--json")
    deadline = time.monotonic() + 60
    while True:                       # the SuperLink listens once serve has started it
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            assert time.monotonic() < deadline and serving.poll() is None, serving.stderr.read()
            time.sleep(0.3)
    attacker.start()
    attacker_b.start()
    joins = {"laptop": _ember(laptop, "federate", "join", f"127.0.0.1:{relay.port}", "--ca", ca,
                              "--app-signer", signer, "--json"),
             "jetson": _ember(jetson, "federate", "join", f"127.0.0.1:{port}", "--ca", ca, "--app-signer", signer,
                              "--json")}
    refused = _ember(intruder, "federate", "join", f"127.0.0.1:{port}", "--ca", ca, "--app-signer", signer,
                     "--max-wait", "20")
    results = {"serve": _finish(serving), **{name: _finish(p) for name, p in joins.items()},
               "intruder": _finish(refused, timeout=120)}
    relay.close()
    attacker.join(timeout=10)
    attacker_b.join(timeout=10)
    yield {"homes": {"laptop": laptop, "jetson": jetson, "intruder": intruder}, "results": results,
           "sent": bytes(relay.sent), "attack": attack, "attack_b": attack_b, "root": root}


def test_a_round_over_real_processes_completes_and_is_recorded_on_both_devices(household):
    code, out, err = household["results"]["serve"]
    assert code == 0, err
    report = json.loads(out)
    assert report["status"] == "completed" and report["outcome"]["refused"] == []
    assert report["outcome"]["update_bytes"] == POOL * 4 and report["outcome"]["tensors"] == 1
    for name in ("laptop", "jetson"):
        code, out, err = household["results"][name]
        assert code == 0, err
        rows = json.loads(out)["rounds"]
        assert [(r["phase"], r["rounds"]) for r in rows] == [("train", 1), ("evaluate", 1)]
        db = open_db(household["homes"][name])
        train, evaluate = federation.rounds(db)
        assert train["status"] == "contributed" and train["kind"] == "fedkseed" and train["examples"] > 0
        assert any(e["run_id"] == train["run_id"] for e in ledger.entries(db))       # its own ledger
        assert evaluate["status"] in ("promoted", "kept")
        assert registry.get(db, evaluate["adapter_id"])["kind"] == "control_vector"
        db.close()


def test_a_run_someone_else_starts_on_the_superlink_runs_nothing_on_the_server(household):
    attack = household["attack"]
    assert "run_id" in attack, attack.get("error")                  # the Control API took the attacker's run
    assert not (household["root"] / "attacker-a.json.started").exists()     # its ServerApp never started
    report = json.loads(household["results"]["serve"][1])
    assert report["run_id"] != attack["run_id"]
    assert all(r["run"] == attack["run_id"] for r in report["refused_runs"])   # refused, if it came first


def test_an_app_the_household_did_not_sign_runs_nothing_on_the_devices(household):
    attack = household["attack_b"]
    assert attack.get("launched"), attack.get("error")              # its ServerApp ran (on the attacker's side)
    run_id = attack["run_id"]
    for name in ("laptop", "jetson"):
        home = household["homes"][name]
        assert not (home / "attacker-ran-here").exists()             # its ClientApp never ran here
        code, out, err = household["results"][name]
        assert code == 0, err
        assert {"run": run_id, "reason": "its app carries no signature"} in json.loads(out)["refused"]
        log = (home / "federation" / "join" / "supernode.log").read_text()
        assert "The FAB could not be verified. App verification is not supported" in log   # Flower's own line
        db = open_db(home)                          # only the household's round, in its rounds and ledger
        rows = federation.rounds(db)
        assert [r["kind"] for r in rows] == ["fedkseed", "fedkseed"]
        assert {e["run_id"] for e in ledger.entries(db)} == {r["run_id"] for r in rows if r["phase"] == "train"}
        db.close()
    # what the attacker's ServerApp got back: Flower's INVALID_FAB (7) error from each device
    replies = json.loads((household["root"] / "attacker-b.json").read_text())
    assert replies and set(replies) == {7}, replies


def test_a_device_whose_key_the_server_did_not_authorize_is_refused(household):
    code, out, err = household["results"]["intruder"]
    assert code != 0 and len(err.strip().splitlines()) == 1, err
    assert "refused this device's key" in err and "Traceback" not in err
    db = open_db(household["homes"]["intruder"])
    assert federation.rounds(db) == [] and ledger.entries(db) == []
    db.close()


def test_what_a_device_sends_over_the_socket_is_tls_and_about_the_size_of_its_update(household):
    sent = household["sent"]
    assert sent[:1] == b"\x16" and sent[1:2] == b"\x03"          # a TLS handshake record opens the stream
    texts = [SECRET, "locker code", "How should I", "ember-home", "federate", "pool_sums", "POST /v1"]
    for text in texts:
        assert text.encode() not in sent, text
    # the update (4,096 bytes of FedKSeed sums) went through this socket, with Flower's HTTPS protocol
    # (activation, heartbeats, polling, the FAB request) around it; print the figure for the README
    print(f"\nbytes the device sent in one FedKSeed round (K={POOL}): {len(sent):,}")
    assert POOL * 4 < len(sent) < 400_000


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def _running(text: str) -> list[int]:
    """The live processes whose command line mentions `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _serve(server: Path, port: int, phone: Path, *, sigint_ignored: bool = False) -> subprocess.Popen:
    return _ember(server, "federate", "serve", "--address", f"127.0.0.1:{port}", "--kind", "fedkseed",
                  "--devices", "1", "--rounds", "1", "--steps", "1", "--pool-size", "64",
                  "--authorized-key", str(phone / "federation" / "supernode.pub"), "--json",
                  sigint_ignored=sigint_ignored)


def test_a_server_killed_mid_round_and_restarted_leaves_the_device_whole_and_the_round_not_done(tmp_path):
    server = tmp_path / "server"
    _init(server)
    phone = _device(tmp_path, "phone", seed=3)
    port = _free_port()
    # started as `ember federate serve &` from a script starts it: its launcher and ServerApp must still
    # follow it when it dies (they used to ignore their parent monitors' SIGINT, and ran on forever)
    first = _serve(server, port, phone, sigint_ignored=True)
    _wait_for(lambda: _listening(port), 60, "the SuperLink")
    joining = _ember(phone, "federate", "join", f"127.0.0.1:{port}", "--ca", str(server / "federation" / "ca.pem"),
                     "--app-signer", str(server / "federation" / "app-signing.pub"), "--max-wait", "150", "--json")
    try:
        _restart_mid_round(server, port, phone, first, joining)
    finally:
        for process in (first, joining):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                process.communicate(timeout=60)


def _restart_mid_round(server: Path, port: int, phone: Path, first: subprocess.Popen,
                       joining: subprocess.Popen) -> None:
    db = open_db(phone)
    _wait_for(lambda: runs.latest(db) is not None, 180, "the device to start training")
    # the server's machine dies: ember, its SuperLink and the ServerApp, at once, mid-round
    link = int((server / "federation" / "serve" / "superlink.pid").read_text())
    os.killpg(link, signal.SIGKILL)
    os.killpg(first.pid, signal.SIGKILL)
    first.communicate()
    # nothing of the dead server lingers: its launcher and ServerApp follow `serve` (their parent monitors)
    _wait_for(lambda: not _running(str(server / "federation" / "serve")), 15, "the dead server's processes to end")
    _wait_for(lambda: federation.rounds(db), 300, "the device to finish its local training")
    (train,) = federation.rounds(db)                      # trained and recorded; the round is not done
    assert train["phase"] == "train" and train["status"] == "contributed"
    entries = ledger.entries(db)
    assert [e["run_id"] for e in entries] == [train["run_id"]]
    adapters = {a["id"]: Path(a["path"]) for a in registry.list_adapters(db)}
    active = registry.active(db)
    assert all(path.is_file() for path in adapters.values())
    assert joining.poll() is None                         # still waiting for the household to come back
    second = _serve(server, port, phone)                  # the server restarts on the same address
    code, out, err = _finish(joining, timeout=400)
    if code != 0 and second.poll() is None:               # nobody will join this run
        os.killpg(second.pid, signal.SIGTERM)
    serve_code, serve_out, serve_err = _finish(second, timeout=120)
    print(f"\nafter the restart: join exit {code}: {err.strip() or out[-300:]}")
    assert len(err.strip().splitlines()) <= 1 and "Traceback" not in err, err
    rows = federation.rounds(db)
    assert rows[0] == train and ledger.entries(db)[:1] == entries      # nothing recorded before was lost
    assert all(path.is_file() for path in adapters.values())
    assert {a["id"] for a in registry.list_adapters(db)} >= set(adapters)
    # it reconnected (Flower's SuperNode exits when a restarted SuperLink does not know it; join starts it
    # again) and the new run's round is done; the killed run's reply was never counted
    assert code == 0 and serve_code == 0, err + serve_err
    assert [(r["phase"], r["status"] in ("promoted", "kept")) for r in rows[1:]] == [("train", False), ("evaluate", True)]
    assert json.loads(serve_out)["status"] == "completed"
    db.close()
