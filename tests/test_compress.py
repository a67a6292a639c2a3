"""ember compress (LUC): the reference forward, the policy, llama.cpp's writer, registration, bad input.

Sensitivity runs on a handful of calibration tokens and two candidate types here; the full measurement
(every type, 256 tokens) lives in `ember bench compress`.
"""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from adapters import compress
from adapters.errors import AdapterMismatch, BudgetUnmet, UnsupportedLayout
from tests.conftest import assert_clean_error
from tests.gguf_variants import variant

SMALL = ["--types", "Q4_0,Q4_1", "--tokens", "12", "--heldout-tokens", "12", "--calibration", "builtin"]


@pytest.fixture(scope="session")
def reference(model_path):
    from adapters.reference import Reference

    return Reference(model_path, threads=os.cpu_count() or 2)


@pytest.fixture(scope="session")
def tokens(model_path):
    from adapters.llama_log import quiet_llama
    from assistant.compression import BUILTIN_TEXT

    vocab = quiet_llama(model_path=str(model_path), vocab_only=True)
    out = [vocab.token_bos()] + vocab.tokenize(BUILTIN_TEXT.read_bytes(), add_bos=False)[:15]
    vocab.close()
    return out


@pytest.fixture(scope="session")
def sensitivity(model_path, reference, tokens):
    return compress.measure(model_path, tokens, types=("Q4_0", "Q4_1"), reference=reference)


def test_the_torch_reference_is_the_model_llama_cpp_runs(model_path, reference, tokens):
    from assistant.compression import logits

    ours = reference.logits(tokens).numpy()
    theirs = logits(model_path, tokens, os.cpu_count() or 2)
    kl, _ = compress.kl_nll(theirs, ours, tokens)
    # llama.cpp multiplies with 8-bit activations; transformers' dequantised model measured 0.0036 here
    assert kl < 0.02
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.75


def test_packed_sequences_read_as_if_each_were_alone(model_path, reference, tokens):
    # Calibrating on chats: each packed sequence starts its positions at 0 and sees only itself.
    first, second = tokens[:9], [tokens[0]] + tokens[9:]
    alone = np.concatenate([reference.logits(first).numpy(), reference.logits(second).numpy()])
    packed = reference.logits(first + second, lengths=[len(first), len(second)]).numpy()
    assert np.abs(packed - alone).max() < 1e-3
    # ... and the block inputs kept for replay are the packed pass's
    replayed = reference.replay(3).numpy()
    assert np.abs(replayed - alone).max() < 1e-3
    with pytest.raises(ValueError, match="do not pack"):
        reference.logits(first + second, lengths=[len(first), len(second) + 1])
    sens = compress.measure(model_path, first + second, types=("Q4_0",), reference=reference,
                            lengths=[len(first), len(second)])
    assert all(b["Q4_0"]["kl"] > 0 for b in sens.blocks)
    reference.logits(tokens)     # the session's fixture pass back, for the tests that follow


def test_sensitivity_is_zero_for_the_stored_type_and_positive_below_it(sensitivity):
    # the bundled file is Q4_1: Q4_1 holds every block exactly, Q4_0 changes every one
    assert sensitivity.source_types == ["Q4_1"] * sensitivity.n_layer
    assert all(b["Q4_1"]["kl"] == 0.0 for b in sensitivity.blocks)
    assert all(b["Q4_0"]["kl"] > 0.0 for b in sensitivity.blocks)
    assert all(b["Q4_0"]["bytes"] < b["Q4_1"]["bytes"] for b in sensitivity.blocks)
    kls = [b["Q4_0"]["kl"] for b in sensitivity.blocks]
    assert max(kls) > 2 * min(kls)      # blocks differ: there is something for a policy to use


def test_policy_spends_the_budget_on_the_most_sensitive_blocks(sensitivity):
    q4_0, q4_1 = compress.uniform(sensitivity, "Q4_0"), compress.uniform(sensitivity, "Q4_1")
    per_block = q4_1.bytes - q4_0.bytes
    assert per_block % sensitivity.n_layer == 0
    upgrades = 5
    policy = compress.assign(sensitivity, size_bytes=q4_0.bytes + upgrades * per_block // sensitivity.n_layer)
    chosen = sorted(i for i, t in policy.types.items() if t == "Q4_1")
    by_kl = sorted(range(sensitivity.n_layer), key=lambda i: -sensitivity.blocks[i]["Q4_0"]["kl"])
    assert chosen == sorted(by_kl[:upgrades])
    random = compress.random_policy(sensitivity, policy.bytes, seed=0)
    assert random.bytes <= policy.bytes and policy.kl < random.kl
    assert compress.assign(sensitivity, size_bytes=q4_1.bytes).kl == 0.0


def test_budgets_that_cannot_be_met_say_so(sensitivity):
    smallest = compress.uniform(sensitivity, "Q4_0").bytes
    with pytest.raises(BudgetUnmet, match="cannot be met"):
        compress.assign(sensitivity, size_bytes=smallest - 1)
    assert compress.assign(sensitivity, size_bytes=smallest).bytes == smallest
    with pytest.raises(BudgetUnmet, match="--max-kl"):
        compress.assign(sensitivity.__class__(**{**sensitivity.__dict__, "types": ["Q4_0"],
                                                 "blocks": [{"Q4_0": b["Q4_0"]} for b in sensitivity.blocks]}),
                        max_kl=1e-9)
    assert compress.assign(sensitivity, max_kl=0.0).kl == 0.0


def test_llama_cpp_writes_the_policy_and_prunes_whole_blocks(model_path, sensitivity, tmp_path):
    import gguf

    types = {i: ("Q4_0" if i % 2 else "Q4_1") for i in range(sensitivity.n_layer) if i not in (3, 7)}
    policy = compress.Policy(types, [3, 7], 0, 0.0)
    out = tmp_path / "mixed.gguf"
    compress.write(model_path, out, policy, source_types=compress.source_types(model_path), threads=2)
    reader = gguf.GGUFReader(str(out))
    assert int(reader.fields["llama.block_count"].contents()) == sensitivity.n_layer - 2
    kept = sorted(types)
    for t in reader.tensors:
        parts = t.name.split(".")
        if parts[0] == "blk" and parts[2] == "ffn_down":
            assert t.tensor_type.name == types[kept[int(parts[1])]]
    assert {t.name: t.tensor_type.name for t in reader.tensors}["token_embd.weight"] == "Q8_0"


def test_bad_budgets_and_layouts_are_one_line_and_write_nothing(ember, home, model_path, tmp_path):
    small = ember("compress", "--size", "10", *SMALL, timeout=300)
    assert_clean_error(small, contains="cannot be met")
    assert small.returncode == 2
    both = ember("compress", "--size", "95", "--max-kl", "1", *SMALL, timeout=300)
    assert_clean_error(both, contains="one budget")
    other = variant(model_path, tmp_path / "other.gguf", set_strings={"general.architecture": "gemma2"})
    layout = ember("compress", str(other), "--size", "95", *SMALL, timeout=300)
    assert_clean_error(layout, contains="gemma2")
    assert not (home / "models").exists() or not list((home / "models").iterdir())


def test_a_killed_compression_registers_nothing_and_a_finished_one_is_used_and_refuses_other_adapters(
        ember, home, model_path):
    # killed while llama.cpp writes or the result is checked: nothing registered, nothing `--model` opens
    env = {**os.environ, "EMBER_HOME": str(home)}
    proc = subprocess.Popen([sys.executable, "-m", "assistant", "compress", "--size", "95", *SMALL,
                             "--name", "killed"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    models, deadline = home / "models", time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if models.is_dir() and any(p.name.endswith(".partial.gguf") for p in models.iterdir()):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the compression ended before it was caught writing"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert [p.name for p in models.iterdir() if p.suffix == ".gguf" and not p.name.startswith(".")] == []
    assert len(list(models.glob(".*.partial.gguf"))) == 1
    assert_clean_error(ember("ask", "--model", "killed", "--no-log", "Hi"), contains="does not exist")
    assert json.loads(ember("compress", "--list", "--json").stdout) == []

    # a run to the end registers its model (and deletes the dead run's leftovers)
    done = ember("compress", "--size", "95", *SMALL, "--name", "small", "--json", timeout=600)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    path = Path(doc["path"])
    assert path == home / "models" / "small.gguf" and path.stat().st_size == doc["measured"]["bytes"] <= 95e6
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert not list(models.glob(".*.partial.gguf"))
    assert "Q4_1" in doc["reference"] and doc["measured"]["kl"] > 0
    assert [m["name"] for m in json.loads(ember("compress", "--list", "--json").stdout)] == ["small"]
    doctor = ember("doctor", "--model", "small", "--json", timeout=300)   # its self-check decodes with it
    assert doctor.returncode == 0, doctor.stderr
    report = json.loads(doctor.stdout)
    assert report["model"]["path"] == str(path) and report["self_check"]["ok"] is True

    # an adapter made for the bundled model is refused on the compressed one
    from adapters import runtime
    from adapters.base import file_sha256
    from adapters.export import write_lora_gguf
    from adapters.llama_log import quiet_llama

    rng = np.random.default_rng(0)
    adapter = write_lora_gguf(home / "a.gguf", {"model.layers.0.self_attn.v_proj": (
        rng.normal(size=(2, 576)).astype(np.float32), rng.normal(size=(192, 2)).astype(np.float32))},
        alpha=4, n_head=9, n_head_kv=3, base_sha256=file_sha256(model_path), base_name=model_path.name)
    llm = quiet_llama(model_path=str(path), n_ctx=64)
    try:
        with pytest.raises(AdapterMismatch, match="another base model"):
            runtime.load(llm, adapter, base_sha256=file_sha256(path))
    finally:
        llm.close()


def test_calibration_uses_the_users_own_words_when_enough_and_skips_excluded_conversations(settings, db, model_path):
    from adapters.llama_log import quiet_llama
    from assistant.compression import BUILTIN_NAME, Request, calibration
    from storage import conversations as convs
    from storage import feedback

    vocab = quiet_llama(model_path=str(model_path), vocab_only=True)
    try:
        request = Request(size_mb=95, tokens=16, heldout_tokens=16)
        assert calibration(settings, request, vocab, db)[2] == BUILTIN_NAME        # an empty log is too small
        kept, hidden = convs.create_conversation(db), convs.create_conversation(db)
        convs.add_message(db, kept, "user", "My allotment has twelve rows of runner beans and a shed. " * 4)
        convs.add_message(db, hidden, "user", "zebra quartz " * 40)
        feedback.set_excluded(db, hidden)
        calib, held, source = calibration(settings, request, vocab, db)
        assert source.startswith("log:") and len(calib) == len(held) == 16
        text = vocab.detokenize(calib + held).decode()
        assert "runner beans" in text and "zebra" not in text
    finally:
        vocab.close()
