"""One device in a household: Flower's ClientApp over this device's Ember data directory.

`train` (one round): check the household's base model and the global update it sent, train locally through
`assistant.adaptation.run` (the same dataset, consent, fact-splitting, privacy budget and ledger as
`ember adapt`) starting from the global update, and reply with the update alone: LoRA B tensors, or
FedKSeed's K per-seed scalar sums. Flower's `fixedclipping_mod` clips the update to the household's C
before it leaves (user-level DP). A round this device's privacy budget cannot pay for is skipped: the
reply is the global update unchanged, so nothing about this user's data is in it.

`evaluate`: the household's new global update is gated on this device's own held-out split, and goes
live only if it beats the base model and the adapter in use. Every outcome is a row of
`federation_rounds`; every failure is one line in the reply's error, and nothing local is lost.
"""
from __future__ import annotations

import dataclasses
import secrets
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.common.constant import ErrorCode
from flwr.common.serde import recorddict_to_proto

from adapters import federated
from adapters.errors import BudgetExhausted, NotEnoughData
from assistant import adaptation
from assistant.config import Settings
from assistant.federation.plan import Household
from storage import federation as rounds
from storage.errors import EmberError
from storage.private import private_dirs

KEY_CLIPPING_NORM = "clipping_norm"   # flwr.common.constant.KEY_CLIPPING_NORM, what the DP wrapper sends


@dataclasses.dataclass
class Device:
    """This device: its settings and its one database connection (the process's only one for this file)."""

    settings: Settings
    db: Any
    server: str = "local"
    # Test hook for fault injection only where a real fault cannot be produced in one process: None.
    corrupt: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None

    @property
    def base_sha256(self) -> str:
        from adapters.base import file_sha256

        return file_sha256(self.settings.model_path, self.settings.cache_dir)


def arrays_of(record: ArrayRecord) -> dict[str, np.ndarray]:
    """An ArrayRecord's tensors as numpy, by name."""
    return {name: record[name].numpy() for name in record.keys()}


def record_of(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """Numpy tensors by name as an ArrayRecord (names kept in order)."""
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})


def _only_when_clipping_asked(msg: Message, ctxt: Context, call_next: Any) -> Message:
    """Flower's fixedclipping_mod when the server runs user-level DP (it sends C), else pass through."""
    config = next(iter(msg.content.config_records.values()), None)
    if config is not None and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def client_app(device: Device | Callable[[Context], Device]) -> ClientApp:
    """The ClientApp of `device` (one per data directory), or of the device a SuperNode's context names
    (`device` a function of Flower's Context: `ember federate join` runs each message in its own process)."""
    app = ClientApp()

    def this(context: Context) -> Device:
        return device if isinstance(device, Device) else device(context)

    @app.train(mods=[_only_when_clipping_asked])
    def train(msg: Message, context: Context) -> Message:
        return train_round(this(context), msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return evaluate_round(this(context), msg)

    return app


def _refuse(device: Device, msg: Message, plan: Household | None, phase: str, err: Exception) -> Message:
    round_no = int(msg.content["config"].get("server-round", 0)) if "config" in msg.content else 0
    if plan is not None:
        rounds.record(device.db, server=device.server, round=round_no, kind=plan.kind, rounds=plan.rounds, phase=phase,
                      status="refused", message=str(err)[:300])
    return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, str(err)), reply_to=msg)


def _received(device: Device, plan: Household, msg: Message) -> dict[str, np.ndarray]:
    """The household's global update, checked: same base model, right names and shapes, finite."""
    federated.check_base(device.base_sha256, plan.base_sha256, plan.base_name)
    arrays = arrays_of(msg.content["arrays"])
    return federated.check_update(arrays, plan.expected(device.settings.model_path))


def _reply(msg: Message, arrays: dict[str, np.ndarray], metrics: dict[str, float]) -> tuple[Message, int]:
    content = RecordDict({"arrays": record_of(arrays), "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=msg), recorddict_to_proto(content).ByteSize()


def train_round(device: Device, msg: Message) -> Message:
    """One round of local training on this device; the reply carries the update and its weight only."""
    plan = None
    try:
        plan = Household.from_config(msg.content["config"])
        global_update = _received(device, plan, msg)
    except EmberError as err:
        return _refuse(device, msg, plan, "train", err)
    round_no = int(msg.content["config"]["server-round"])
    dp = KEY_CLIPPING_NORM in msg.content["config"]
    settings = device.settings
    with tempfile.TemporaryDirectory(dir=settings.cache_dir if settings.cache_dir.is_dir() else None) as folder:
        start = Path(folder) / "start.npz"
        seed_pool = None
        if plan.kind == "fedavg":
            a = federated.shared_a(plan.targets(settings.model_path), rank=plan.rank, seed=plan.a_seed)
            n_head, n_head_kv = _heads(settings.model_path)
            federated.save_start(start, lora=federated.init_weights(a, global_update, n_head=n_head,
                                                                   n_head_kv=n_head_kv))
        else:
            federated.save_start(start, sums=global_update[federated.POOL_KEY])
            seed_pool = (plan.pool_size, plan.pool_seed, secrets.randbits(32))
        try:
            result = adaptation.run(settings, device.db, method="lora" if plan.kind == "fedavg" else "zo",
                                    backend=None if plan.kind == "fedavg" else "llama", steps=plan.steps,
                                    epsilon=plan.local_epsilon, start=start, seed_pool=seed_pool)
        except (BudgetExhausted, NotEnoughData) as err:
            # Skipped: the reply is the global update itself, so it carries nothing of this user.
            reply, size = _reply(msg, global_update, {"weight": 1.0, "num-examples": 0, "skipped": 1})
            rounds.record(device.db, server=device.server, round=round_no, kind=plan.kind, rounds=plan.rounds, phase="train",
                          status="skipped", bytes_sent=size, message=str(err)[:300])
            return reply
        except EmberError as err:
            return _refuse(device, msg, plan, "train", err)
    update = _local_update(plan, result, global_update)
    if device.corrupt is not None:
        update = device.corrupt(update)
    weight = 1.0 if dp else float(result["examples"])
    reply, size = _reply(msg, update, {"weight": weight, "num-examples": int(result["examples"]),
                                       "train-loss": float((result["eval"] or {}).get("train_loss_last") or 0.0),
                                       "skipped": 0})
    rounds.record(device.db, server=device.server, round=round_no, kind=plan.kind, rounds=plan.rounds, phase="train",
                  status="contributed", run_id=result["run_id"], adapter_id=result["adapter_id"],
                  examples=result["examples"], epsilon=result["epsilon"],
                  sigma=plan.sigma if dp else None, clip=plan.clip if dp else None, bytes_sent=size,
                  bytes_received=recorddict_to_proto(msg.content).ByteSize())
    return reply


def _local_update(plan: Household, result: dict[str, Any], global_update: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What the local run made, as the household exchanges it: its LoRA B tensors, or the global pool sums
    plus this run's own per-seed sums (read from the ZO update log in the adapter file)."""
    path = Path(result["path"])
    if plan.kind == "fedavg":
        found = federated.read_lora_b(path)
        return {name: found[name] for name in global_update}
    import json

    import gguf

    from adapters.export import _field

    log = json.loads(_field(gguf.GGUFReader(str(path)), "ember.zo_log"))["log"]
    sums = federated.pool_sums(log, federated.seed_pool(plan.pool_seed, plan.pool_size))
    return {federated.POOL_KEY: global_update[federated.POOL_KEY] + sums}


def _heads(model_path: Path) -> tuple[int, int]:
    shape = federated.model_shape(model_path)
    return shape["n_head"], shape["n_head_kv"]


def _model_dims(model_path: Path) -> tuple[int, int]:
    shape = federated.model_shape(model_path)
    return shape["n_embd"], shape["n_layer"]


def global_adapter(device: Device, plan: Household, update: dict[str, np.ndarray], path: Path, round_no: int) -> Path:
    """The household's global update as an adapter file this device's llama.cpp applies."""
    from adapters import export, lora, zo

    settings = device.settings
    extra = {"federated_round": float(round_no), "federated_kind": plan.kind}
    if plan.kind == "fedavg":
        a = federated.shared_a(plan.targets(settings.model_path), rank=plan.rank, seed=plan.a_seed)
        n_head, n_head_kv = _heads(settings.model_path)
        weights = federated.init_weights(a, update, n_head=n_head, n_head_kv=n_head_kv)
        return export.write_lora_gguf(path, weights, alpha=lora.LoraConfig.alpha, n_head=n_head, n_head_kv=n_head_kv,
                                      base_sha256=device.base_sha256, base_name=settings.model_path.name,
                                      extra=extra)
    n_embd, n_layer = _model_dims(settings.model_path)
    vector = np.zeros((n_layer - 1) * n_embd, dtype=np.float32)
    config = zo.ZoConfig(backend="llama")
    federated.replay_sums([vector], update[federated.POOL_KEY], federated.seed_pool(plan.pool_seed, plan.pool_size),
                          lr=config.learning_rate(0), perturbations=config.perturbations)
    return export.write_control_vector_gguf(path, vector.reshape(n_layer - 1, n_embd), base_sha256=device.base_sha256,
                                            base_name=settings.model_path.name, extra=extra)


def evaluate_round(device: Device, msg: Message) -> Message:
    """Gate the household's new global update on this device's held-out split; promote it if it is better."""
    from adapters import dataset as datasets
    from adapters import gate
    from adapters.pipeline import new_id
    from adapters.template import ChatTemplate
    from storage import registry

    plan = None
    try:
        plan = Household.from_config(msg.content["config"])
        update = _received(device, plan, msg)
    except EmberError as err:
        return _refuse(device, msg, plan, "evaluate", err)
    settings, db = device.settings, device.db
    round_no = int(msg.content["config"]["server-round"])
    template = ChatTemplate.from_gguf(str(settings.model_path))
    try:
        data = datasets.build(db, template, learn_from_api=settings.learn_from_api)
    except NotEnoughData as err:
        return _refuse(device, msg, plan, "evaluate", err)
    adapter_id = new_id(plan.kind)
    folder = settings.home / "adapters"
    private_dirs(folder)
    path = global_adapter(device, plan, update, folder / f"{adapter_id}.gguf", round_no)
    current = registry.active(db)
    current_path = Path(current["path"]) if current and Path(current["path"]).is_file() else None
    evaluator = gate.Evaluator(settings.model_path, n_ctx=512, threads=settings.threads,
                               base_sha256=device.base_sha256)
    try:
        verdict = gate.judge(evaluator, data.heldout, path, current_path)
    finally:
        evaluator.close()
    registry.register(db, {
        "id": adapter_id, "path": str(path), "kind": "lora" if plan.kind == "fedavg" else "control_vector",
        "method": plan.kind, "base_sha256": device.base_sha256, "base_name": settings.model_path.name,
        "params": {"federated_round": round_no, "server": device.server, **plan.config()},
        "eval": verdict.as_json(), "status": "inactive" if verdict.promote else "rejected",
        "reason": None if verdict.promote else verdict.reason, "epsilon": None, "delta": None,
        "examples": len(data.train)}, data.sources, activate=verdict.promote)
    rounds.record(db, server=device.server, round=round_no, kind=plan.kind, rounds=plan.rounds, phase="evaluate",
                  status="promoted" if verdict.promote else "kept", adapter_id=adapter_id,
                  bytes_received=recorddict_to_proto(msg.content).ByteSize(), message=verdict.reason[:300])
    content = RecordDict({"metrics": MetricRecord({
        "weight": 1.0, "num-examples": len(data.heldout), "heldout-loss": float(verdict.heldout_loss),
        "base-loss": float(verdict.base_loss), "promoted": int(verdict.promote)})})
    return Message(content, reply_to=msg)
