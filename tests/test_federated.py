"""Household learning on Flower, on the real model and real SQLite files: devices train through the one
learning path and send only their update; FedKSeed's per-seed sums replay to what the step logs replay
to; a device refuses another base model and malformed updates, skips a round its budget cannot pay, and
the server drops malformed replies and devices that vanish; every outcome is recorded locally."""
from __future__ import annotations

import dataclasses
import json
import stat
from pathlib import Path

import numpy as np
import pytest

flwr = pytest.importorskip("flwr", reason="household learning needs the federated extra: pip install -e '.[federated]'")

from flwr.app import ConfigRecord, Message, RecordDict  # noqa: E402
from flwr.common.serde import message_from_proto  # noqa: E402
from flwr.proto.message_pb2 import Message as ProtoMessage  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from adapters import dataset, export, federated, zo  # noqa: E402
from adapters.base import file_sha256  # noqa: E402
from assistant.config import Settings  # noqa: E402
from assistant.federation.client import Device, client_app, record_of, train_round  # noqa: E402
from assistant.federation.grid import run_household  # noqa: E402
from assistant.federation.plan import Household  # noqa: E402
from assistant.federation.server import CheckedFedAvg, Outcome, server_app  # noqa: E402
from benchmarks.synthetic_user import seed_habit_user  # noqa: E402
from storage import federation, ledger, registry  # noqa: E402
from storage.db import open_db  # noqa: E402

SECRET = "4417-9023"


def _device(root, name, training_cache, *, conversations=12, seed=0, budget=32.0, canary=None):
    settings = Settings(home=root / name, cache=training_cache, n_threads=2, privacy_budget=budget)
    db = open_db(settings.home)
    seed_habit_user(db, conversations, seed=seed, canary=canary, canary_copies=2 if canary else 0)
    return Device(settings, db, server="test")


def _plan(model_path, training_cache, **overrides):
    values = {"kind": "fedavg", "base_sha256": file_sha256(model_path, training_cache),
              "base_name": model_path.name, "rounds": 1, "steps": 2, **overrides}
    return Household(**values)


def _message(plan, arrays, round_no=1, node=10):
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    config = ConfigRecord({**plan.config(), "server-round": round_no})
    return Message(RecordDict({"arrays": record_of(arrays), "config": config}), node, "train")


@pytest.fixture(scope="module")
def household(tmp_path_factory, model_path, training_cache):
    """Two devices, one FedAvg-LoRA round with user-level DP (σ=1, C=1); one device holds a secret."""
    root = tmp_path_factory.mktemp("household")
    devices = {10: _device(root, "laptop", training_cache, seed=0, canary=SECRET),
               11: _device(root, "jetson", training_cache, seed=1)}
    plan = _plan(model_path, training_cache, sigma=1.0, clip=1.0)
    outcome = Outcome()
    grid = run_household(server_app(plan, model_path, 2, outcome), {n: client_app(d) for n, d in devices.items()})
    return devices, plan, outcome, grid


def test_a_fedavg_round_trains_through_the_one_learning_path_and_gates_the_global_adapter(household):
    devices, plan, outcome, _ = household
    assert outcome.refused == [] and outcome.arrays is not None
    for device in devices.values():
        train, evaluate = federation.rounds(device.db)
        assert train["phase"] == "train" and train["status"] == "contributed" and train["examples"] > 0
        # the local run is in this device's ledger (ε, σ, C of its DP-SGD) and its run table
        entry = [e for e in ledger.entries(device.db) if e["run_id"] == train["run_id"]]
        assert entry and entry[0]["dp"] == 1 and entry[0]["epsilon"] > 0
        assert train["sigma"] == 1.0 and train["clip"] == 1.0
        # the household's global adapter was judged on this device's own held-out split
        assert evaluate["phase"] == "evaluate" and evaluate["status"] in ("promoted", "kept")
        shared = registry.get(device.db, evaluate["adapter_id"])
        assert shared["method"] == "fedavg" and shared["eval"]["base_loss"] > 0
        assert (shared["status"] == "active") == (evaluate["status"] == "promoted")
    # user-level ε from Flower's RDP accountant: one release at σ=1 without amplification
    assert outcome.epsilon is not None and 1.0 < outcome.epsilon < 20.0


def test_a_device_sends_only_its_lora_b_tensors_and_their_weight(household, model_path):
    devices, plan, _, grid = household
    expected = plan.expected(model_path)
    for node in devices:
        wire = grid.traffic.sent[node][0]                      # the train reply (then evaluate's metrics)
        reply = message_from_proto(ProtoMessage.FromString(wire))
        assert set(reply.content.array_records) == {"arrays"} and not reply.content.config_records
        assert {k: tuple(v.shape) for k, v in reply.content["arrays"].items()} == expected
        assert set(reply.content["metrics"]) == {"weight", "num-examples", "train-loss", "skipped"}
        assert SECRET.encode() not in wire and b"locker" not in wire and b"How should I" not in wire
        # B only, float32: the bytes on the wire are the update's and a little framing
        payload = federated.update_bytes({k: v.numpy() for k, v in reply.content["arrays"].items()})
        assert payload <= len(wire) < payload + 4096


def test_replaying_fedkseed_per_seed_sums_equals_replaying_the_step_logs(model_path, template, tmp_path):
    db = open_db(tmp_path / "user")
    seed_habit_user(db, 12)
    data = dataset.build(db, template)
    small = dataclasses.replace(data, train=data.train[:4], heldout=data.heldout[:1])
    config = zo.ZoConfig(epsilon=None, steps=6, batch_size=2, mu=0.3, lr=1e-2, eval_every=0,
                         seed_pool=4, pool_seed=7, seed=3)
    backend = zo.LlamaControlVector(model_path, small.train, config, base_sha256=None)
    try:
        trained = zo.train(backend, small, config)
        pool = federated.seed_pool(config.pool_seed, config.seed_pool)
        assert {seed for _, seed, _ in trained.log} <= set(pool) and len(trained.log) == 6
        by_steps = zo.replay([np.zeros_like(backend.vector)], trained.log, config)[0]
        sums = federated.pool_sums(trained.log, pool)
        by_sums = federated.replay_sums([np.zeros_like(backend.vector)], sums, pool, lr=1e-2)[0]
        assert np.abs(by_steps).max() > 0
        np.testing.assert_allclose(by_sums, by_steps, rtol=0, atol=1e-6 * np.abs(by_steps).max())
        assert by_steps.tobytes() == backend.vector.tobytes()
    finally:
        backend.close()
    with pytest.raises(zo.InvalidInput):
        zo.ZoConfig(seed_pool=4, lr_schedule="cosine")


def test_lora_b_survives_the_round_trip_through_llama_cpps_row_order(model_path, tmp_path):
    plan = _plan(model_path, None)
    targets = plan.targets(model_path)
    a = federated.shared_a(targets, rank=plan.rank, seed=plan.a_seed)
    rng = np.random.default_rng(0)
    b = {f"{n}{federated.LORA_B}": rng.standard_normal((out, plan.rank)).astype(np.float32)
         for n, (out, _) in targets.items()}
    weights = federated.init_weights(a, b, n_head=9, n_head_kv=3)
    path = export.write_lora_gguf(tmp_path / "x.gguf", weights, alpha=16.0, n_head=9, n_head_kv=3,
                                  base_sha256="0" * 64, base_name="m")
    back = federated.read_lora_b(path)
    assert set(back) == set(b) and all(np.array_equal(back[k], b[k]) for k in b)
    assert federated.shared_a(targets, rank=plan.rank, seed=plan.a_seed).keys() == a.keys()


def test_a_device_refuses_another_base_model_and_keeps_everything(tmp_path, model_path, training_cache):
    device = _device(tmp_path, "other", training_cache)
    plan = dataclasses.replace(_plan(model_path, training_cache), base_sha256="ab" * 32, base_name="other.gguf")
    reply = train_round(device, _message(plan, plan.initial(model_path)))
    assert reply.has_error() and "another base model" in reply.error.reason and "\n" not in reply.error.reason
    (row,) = federation.rounds(device.db)
    assert row["status"] == "refused" and ledger.entries(device.db) == []


@pytest.mark.parametrize("damage", ["nan", "shape", "unknown"])
def test_a_device_refuses_a_malformed_global_update(tmp_path, model_path, training_cache, damage):
    device = _device(tmp_path, "d", training_cache)
    plan = _plan(model_path, training_cache)
    arrays = plan.initial(model_path)
    name = sorted(arrays)[0]
    if damage == "nan":
        arrays[name] = np.full_like(arrays[name], np.nan)
    elif damage == "shape":
        arrays[name] = np.zeros((3, 3), dtype=np.float32)
    else:
        arrays["blk.0.token_embd.weight.lora_b"] = np.zeros((2, 2), dtype=np.float32)
    reply = train_round(device, _message(plan, arrays))
    assert reply.has_error() and "refused" in reply.error.reason
    assert federation.rounds(device.db)[0]["status"] == "refused" and ledger.entries(device.db) == []


def test_the_server_drops_malformed_and_oversized_replies_before_averaging(model_path, training_cache):
    plan = _plan(model_path, training_cache)
    expected = plan.expected(model_path)
    good = plan.initial(model_path)
    bad_nan = {k: np.full_like(v, np.nan) for k, v in good.items()}
    outcome = Outcome()
    strategy = CheckedFedAvg(expected, outcome)
    replies = []
    for node, arrays in ((1, good), (2, bad_nan)):
        request = _message(plan, good, node=node)
        replies.append(Message(RecordDict({"arrays": record_of(arrays)}), reply_to=request))
    kept = strategy.checked(1, replies)
    assert len(kept) == 1 and [r[1] for r in outcome.refused] == [2] and "NaN" in outcome.refused[0][2]
    with pytest.raises(federated.MalformedUpdate, match="more than"):
        federated.check_update(good, expected, max_bytes=1000)


def test_a_round_over_the_privacy_budget_is_skipped_and_recorded(tmp_path, model_path, training_cache):
    device = _device(tmp_path, "spent", training_cache, budget=0.5)       # a run needs ε=8
    plan = _plan(model_path, training_cache)
    start = plan.initial(model_path)
    reply = train_round(device, _message(plan, start))
    assert not reply.has_error() and reply.content["metrics"]["skipped"] == 1
    sent = {k: v.numpy() for k, v in reply.content["arrays"].items()}
    assert all(np.array_equal(sent[k], start[k]) for k in start)          # the global, unchanged
    (row,) = federation.rounds(device.db)
    assert row["status"] == "skipped" and "privacy budget" in row["message"]
    assert ledger.entries(device.db) == []


def test_a_fedkseed_household_goes_on_without_a_device_that_drops_mid_round(tmp_path, model_path, training_cache):
    devices = {n: _device(tmp_path, f"d{n}", training_cache, seed=n) for n in (10, 11)}
    plan = _plan(model_path, training_cache, kind="fedkseed", pool_size=64, steps=3)
    outcome = Outcome()
    grid = run_household(server_app(plan, model_path, 2, outcome), {n: client_app(d) for n, d in devices.items()},
                         drop=lambda node, msg: node == 11)       # gone for the whole round
    sums = outcome.arrays[federated.POOL_KEY]
    assert sums.shape == (64,) and 0 < np.count_nonzero(sums) <= 3      # 3 steps, one pool seed each
    assert federation.rounds(devices[11].db) == [] and ledger.entries(devices[11].db) == []
    train, evaluate = federation.rounds(devices[10].db)
    assert train["status"] == "contributed" and train["bytes_sent"] < 1024    # 64 scalars and framing
    assert evaluate["status"] in ("promoted", "kept")
    assert registry.get(devices[10].db, evaluate["adapter_id"])["kind"] == "control_vector"
    assert 11 not in grid.traffic.sent and grid.traffic.down[11] > 0      # asked, never answered


def test_federate_init_makes_private_tls_and_supernode_keys_flower_can_read_and_never_overwrites(ember, home):
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    made = ember("federate", "init", "--address", "192.168.1.5", "--json")
    assert made.returncode == 0, made.err
    paths = {name: Path(p) for name, p in json.loads(made.out).items()}
    assert stat.S_IMODE(paths["ca.pem"].parent.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in paths.values())
    load_ssh_private_key(paths["supernode.key"].read_bytes(), password=None)   # as flower-supernode does
    load_ssh_public_key(paths["supernode.pub"].read_bytes())
    cert = x509.load_pem_x509_certificate(paths["superlink.pem"].read_bytes())
    alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in alt.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "192.168.1.5"}
    before = paths["supernode.key"].read_bytes()
    again = ember("federate", "init")
    assert again.returncode != 0 and "already exists" in again.err and len(again.err.strip().splitlines()) == 1
    assert paths["supernode.key"].read_bytes() == before
    listed = ember("federate", "status", "--json")
    assert listed.returncode == 0 and json.loads(listed.out) == []


def test_federate_init_adds_an_app_signing_pair_to_a_device_made_before_app_signing(ember, home):
    from flwr.supercore.primitives.asymmetric_ed25519 import load_private_key

    assert ember("federate", "init").returncode == 0
    where = home / "federation"
    (where / "app-signing.key").unlink()
    (where / "app-signing.pub").unlink()
    tls = {p.name: p.read_bytes() for p in where.iterdir()}
    again = ember("federate", "init", "--json")
    assert again.returncode == 0, again.err
    assert {p.name: p.read_bytes() for p in where.iterdir() if p.name in tls} == tls      # TLS kept as it was
    key = where / "app-signing.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and stat.S_IMODE((where / "app-signing.pub").stat().st_mode) == 0o600
    load_private_key(key)                                                     # as Flower reads a signing key
    (where / "app-signing.pub").unlink()                                      # half a pair: refused, one line
    broken = ember("federate", "init")
    assert broken.returncode != 0 and "app-signing.pub is missing" in broken.err
    assert len(broken.err.strip().splitlines()) == 1 and key.is_file()


def test_flowers_supernode_verifies_the_households_signature_and_nothing_else(tmp_path):
    """Flower's own verifier (flwr/supernode/start_client_internal.py `_verify_fab`, with the trusted
    entities read as `flower-supernode --trusted-entities` reads them) accepts the FAB `serve` signs, and
    refuses it under another trusted key, and refuses any other FAB with that signature."""
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from flwr.supercore.fab import Fab
    from flwr.supernode.cli.flower_supernode import _try_obtain_trusted_entities, _validate_public_keys_ed25519
    from flwr.supernode.start_client_internal import _verify_fab

    from assistant.federation import signing
    from assistant.federation.serving import flower_app

    household = tmp_path / "household"
    signing.create(household)
    key = signing.load_private(household / signing.PRIVATE)
    fab, fab_hash = flower_app(tmp_path / "app")
    signed = Fab(fab_hash, fab, signing.verifications(fab, key))

    def trusts(public: str) -> dict[str, str]:
        path = signing.write_trusted_entities(tmp_path / "trusted.yaml", public)
        entities = _try_obtain_trusted_entities(path)
        _validate_public_keys_ed25519(entities)
        return entities

    ours = trusts(signing.load_public(household / signing.PUBLIC))
    assert _verify_fab(signed, ours)
    assert not _verify_fab(Fab(fab_hash, fab + b"\0", signed.verifications), ours)          # another FAB
    other = ed25519.Ed25519PrivateKey.generate()
    assert not _verify_fab(signed, trusts(signing.public_line(other)))                       # another signer
    forged = {signing.key_id(signing.public_line(key)): signing.verifications(fab, other)[
        signing.key_id(signing.public_line(other))], "valid_license": "Valid"}
    assert not _verify_fab(Fab(fab_hash, fab, forged), ours)                   # another key under our key's id


def test_the_households_serverapp_addresses_only_the_supernodes_serve_registered():
    """Flower 1.42's Control API registers anyone's SuperNode key; the household's ServerApp samples (with
    Flower's own `sample_nodes`, as its strategies do) and sends only to the nodes `serve` registered."""
    from flwr.app import Context
    from flwr.clientapp import ClientApp
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.serverapp.strategy.strategy_utils import sample_nodes

    from assistant.federation.deployed import HouseholdGrid, household_nodes
    from assistant.federation.grid import LocalGrid

    local = LocalGrid({node: (ClientApp(), Context(run_id=1, node_id=node, node_config={}, state=RecordDict(),
                                                   run_config={})) for node in (11, 12, 13)})
    grid = HouseholdGrid(local, household_nodes({"nodes": "11,12"}))
    for _ in range(5):
        sampled, available = sample_nodes(grid, 2, 2)
        assert sorted(sampled) == [11, 12] and sorted(available) == [11, 12]
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID   # as a ServerApp
    stranger = Message(RecordDict({"c": ConfigRecord({"x": 1})}), dst_node_id=13, message_type="train")
    with pytest.raises(ValueError, match="not the household's"):
        grid.send_and_receive([stranger])
    assert local.traffic.down.get(13) is None                                 # nothing reached node 13
