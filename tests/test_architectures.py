"""Every architecture Ember trains: tiny random-weight GGUFs of each (benchmarks/tiny_models.py), on which the
exported LoRA in llama.cpp matches torch with the merged LoRA, chat templates give the right loss masks,
control vectors train, and adapters made for one model are refused on another with one line."""
from __future__ import annotations

import numpy as np
import pytest

from adapters import architectures, export, runtime
from adapters.base import file_sha256, load_base
from adapters.errors import AdapterMismatch, TrainingUnavailable
from benchmarks.models import PROMPT
from benchmarks.models import kl as _kl
from benchmarks.models import llama_probs as _llama_probs
from benchmarks.models import random_lora as _random_lora
from benchmarks.models import torch_probs as _torch_probs
from benchmarks.tiny_models import SPECS

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ARCHS = ("qwen2", "llama3", "mistral", "qwen3", "gemma2", "gemma3", "phi3")


def test_every_entry_uses_the_tensor_names_of_the_gguf_package():
    """The table's llama.cpp names are the ones gguf's TensorNameMap (what convert_hf_to_gguf.py uses) gives."""
    import gguf

    for arch in architectures.ARCHITECTURES.values():
        enum = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch.name)
        names = gguf.get_tensor_name_map(enum, 4)
        for module, tensor in arch.tensors.items():
            assert names.get_name(f"model.layers.3.{module}") == f"blk.3.{tensor}", (arch.name, module)
        assert set(arch.modules) == set(ALL)
        assert set(arch.modules.values()) == set(arch.tensors)
        for module, parts in arch.fused.items():      # a fused module carries exactly its parts
            assert [p for p, m in arch.modules.items() if m == module] == list(parts)
    assert architectures.get("llama").permute_qk and not architectures.get("qwen2").permute_qk
    assert architectures.get("phi3").targets(("q_proj", "v_proj", "o_proj")) == ["qkv_proj", "o_proj"]
    assert architectures.for_model_type("mistral").name == "llama"
    with pytest.raises(TrainingUnavailable, match="cannot train adapters for the mamba architecture"):
        architectures.get("mamba")


@pytest.mark.parametrize("name", ["qwen2", "llama3", "gemma3", "phi3"])
def test_loss_falls_on_the_message_and_its_end_of_turn_in_each_template(tiny_gguf, name):
    from adapters.template import ChatTemplate

    template = ChatTemplate.from_gguf(str(tiny_gguf(name)))
    context = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello, how can I help?"}]
    for message in ({"role": "user", "content": "Remind me to water the plants"},
                    {"role": "assistant", "content": "Sure, I will remind you."}):
        prefix, target = template.target(context, message)
        text = template.llm.detokenize(target, special=True).decode()
        assert text == message["content"] + SPECS[name].turn_end, text
        head = template.llm.detokenize(prefix, special=True).decode()
        assert head.rstrip().endswith(_header(name, message["role"])), head
        assert "Hello, how can I help?" in head and message["content"] not in head


def _header(name: str, role: str) -> str:
    """How each template opens a turn (without its trailing whitespace)."""
    if name in ("qwen2", "qwen3"):
        return f"<|im_start|>{role}"
    if name == "llama3":
        return f"<|start_header_id|>{role}<|end_header_id|>"
    if name.startswith("gemma"):
        return "<start_of_turn>" + ("model" if role == "assistant" else role)
    return f"<|{role}|>"


def _llama(path):
    import llama_cpp

    return llama_cpp.Llama(str(path), n_ctx=128, logits_all=True, n_threads=2, verbose=False)


def _with_adapter(llm, path, sha, tokens):
    loaded = runtime.load(llm, path, base_sha256=sha)
    runtime.apply(llm, loaded)
    try:
        return _llama_probs(llm, tokens)
    finally:
        runtime.apply(llm, None)
        runtime.free(loaded)


_BASES: dict = {}     # one torch copy per fixture file for this module (Phi-3's 32k vocabulary is slow to parse)


def _parity(tiny_gguf, tmp_path, training_cache, name, quant="Q8_0", mangle=None):
    """(KL torch‖llama.cpp of the base, of base + adapter, adapter's own effect) on one fixture."""
    path = tiny_gguf(name, quant)
    if path not in _BASES:
        _BASES[path] = load_base(path, training_cache)
    base = _BASES[path]
    arch = architectures.of_gguf(path)
    assert base.config.model_type in arch.model_types
    weights = _random_lora(base, arch)
    exported = dict(weights) if mangle is None else mangle(dict(weights))
    sha = file_sha256(path)
    adapter = export.write_lora_gguf(tmp_path / f"{name}.gguf", exported, alpha=8, n_head=base.config.num_attention_heads,
                                     n_head_kv=base.config.num_key_value_heads, base_sha256=sha,
                                     base_name=path.name, architecture=arch.name)
    llm = _llama(path)
    try:
        tokens = llm.tokenize(PROMPT.encode())
        base_probs = _torch_probs(base, tokens, {}, 8, 4)
        base_gap = _kl(base_probs, _llama_probs(llm, tokens))
        adapted = _with_adapter(llm, adapter, sha, tokens)
    finally:
        llm.close()
    merged = _torch_probs(base, tokens, weights, 8, 4)
    return base_gap, _kl(merged, adapted), _kl(base_probs, adapted)


@pytest.mark.parametrize("name", ARCHS)
def test_llama_cpp_with_the_exported_adapter_matches_torch_with_merged_lora(tiny_gguf, tmp_path, training_cache, name):
    """On the unquantized GGUF both runtimes see the same weights: the exported adapter must agree with
    the merged one to float precision, so any wrong name, permutation or fused split shows."""
    base_gap, gap, moved = _parity(tiny_gguf, tmp_path, training_cache, name, quant="F32")
    print(f"{name}: KL base {base_gap:.6f}, with adapter {gap:.6f}, adapter effect {moved:.3f}")
    assert base_gap < 1e-4 and gap < 1e-3
    assert moved > 100 * gap                 # and the adapter really changed the distribution


@pytest.mark.parametrize("name,quant", [("qwen2", "Q4_K_M"), ("llama3", "Q8_0"), ("gemma3", "Q8_0"),
                                        ("llama3", "Q5_K_M"), ("qwen2", "Q6_K"), ("phi3", "F16"), ("mistral", "BF16")])
def test_on_a_quantized_base_the_adapter_stays_within_the_quantization_gap(tiny_gguf, tmp_path, training_cache,
                                                                           name, quant):
    """transformers dequantizes the same Q8_0/K-quant file llama.cpp runs; what remains is llama.cpp's
    quantized arithmetic, which an adapter that moves the output a lot amplifies (up to ~10x the base
    model's own gap here), still far below the adapter's effect."""
    base_gap, gap, moved = _parity(tiny_gguf, tmp_path, training_cache, name, quant=quant)
    print(f"{name} {quant}: KL base {base_gap:.5f}, with adapter {gap:.5f}, adapter effect {moved:.3f}")
    assert gap < max(3 * base_gap, 0.05)
    assert moved > 10 * gap


def test_llama_q_and_k_rows_must_be_permuted(tiny_gguf, tmp_path, training_cache, monkeypatch):
    """Without the rotary row permutation the llama parity breaks: the test above can fail."""
    monkeypatch.setattr(export, "permute_rows", lambda b, n_head: b)
    base_gap, gap, _ = _parity(tiny_gguf, tmp_path, training_cache, "llama3", quant="F32")
    assert gap > 0.05


def test_phi3_fused_gate_up_keeps_gate_rows_first(tiny_gguf, tmp_path, training_cache):
    """Exporting the fused ffn_up with its halves swapped (a wrong split) breaks parity."""
    def swap(weights):
        for module, (a, b) in list(weights.items()):
            if module.endswith("gate_up_proj"):
                half = b.shape[0] // 2
                weights[module] = (a, np.concatenate([b[half:], b[:half]]) if isinstance(b, np.ndarray)
                                   else b.roll(half, 0))
        return weights

    base_gap, gap, _ = _parity(tiny_gguf, tmp_path, training_cache, "phi3", quant="F32", mangle=swap)
    assert gap > 0.05


def _export_random(tiny_gguf, training_cache, tmp_path, name, quant="F32"):
    path = tiny_gguf(name, quant)
    if path not in _BASES:
        _BASES[path] = load_base(path, training_cache)
    base = _BASES[path]
    arch = architectures.of_gguf(path)
    return export.write_lora_gguf(tmp_path / f"{name}-{quant}.gguf", _random_lora(base, arch), alpha=8,
                                  n_head=base.config.num_attention_heads,
                                  n_head_kv=base.config.num_key_value_heads, base_sha256=file_sha256(path),
                                  base_name=path.name, architecture=arch.name)


def test_an_adapter_for_one_architecture_or_base_is_refused_on_another_with_one_line(tiny_gguf, training_cache,
                                                                                    tmp_path):
    qwen = _export_random(tiny_gguf, training_cache, tmp_path, "qwen2")
    assert export.read_adapter(qwen).architecture == "qwen2"
    for other, words in (("llama3", "adapter is for the qwen2 architecture, the model is llama"),
                         ("gemma3", "adapter is for the qwen2 architecture, the model is gemma3")):
        path = tiny_gguf(other, "Q8_0")
        llm = _llama(path)
        try:
            with pytest.raises(AdapterMismatch, match=words) as err:
                runtime.load(llm, qwen, base_sha256=file_sha256(path))
            assert "\n" not in str(err.value)
        finally:
            llm.close()
    quantized = tiny_gguf("qwen2", "Q8_0")      # same architecture, another base file
    llm = _llama(quantized)
    try:
        with pytest.raises(AdapterMismatch, match="trained on another base model"):
            runtime.load(llm, qwen, base_sha256=file_sha256(quantized))
    finally:
        llm.close()


@pytest.fixture(scope="module")
def habit_log(tmp_path_factory):
    from benchmarks.synthetic_user import seed_habit_user
    from storage.db import open_db

    db = open_db(tmp_path_factory.mktemp("habit-log"))
    seed_habit_user(db, 24)
    yield db
    db.close()


@pytest.mark.parametrize("name", ARCHS)
def test_zeroth_order_control_vector_training_in_llama_cpp_changes_the_output(tiny_gguf, habit_log, tmp_path, name):
    """ZO in llama.cpp on the quantized model (no torch), then the vector applied as the chat applies it.
    (A large step: the tiny random models sit at a loss of ~14 nats, where 8 steps move little.)"""
    from adapters import dataset, methods, zo
    from adapters.template import ChatTemplate

    path = tiny_gguf(name, "Q8_0")
    data = dataset.build(habit_log, ChatTemplate.from_gguf(str(path)), max_len=96)
    config = zo.ZoConfig(backend="llama", steps=8, batch_size=4, epsilon=None, eval_every=0, lr=10.0, threads=2)
    sha = file_sha256(path)
    made = methods.train_zo(path, tmp_path, data, config, tmp_path / "cv.gguf", base_sha256=sha,
                            checkpoint=tmp_path / "ckpt", extra={}, on_step=lambda _p: None, should_stop=None)
    assert made is not None and made.kind == "control_vector"
    llm = _llama(path)
    try:
        tokens = list(data.heldout[0].tokens)
        before = _llama_probs(llm, tokens)
        after = _with_adapter(llm, tmp_path / "cv.gguf", sha, tokens)
    finally:
        llm.close()
    assert _kl(before, after) > 1e-4


@pytest.mark.parametrize("name", ["gemma3"])
def test_adapt_trains_exports_gates_and_registers_an_adapter_for_another_architecture(tiny_gguf, home,
                                                                                     training_cache, name):
    """The one learning path (what `ember adapt` and the daemon call), end to end on a non-llama GGUF:
    LoRA without DP on the habit user's log, exported for its architecture and scored in llama.cpp.
    (`ember bench models` runs the real command on every architecture.)"""
    from adapters import lora, pipeline
    from benchmarks.synthetic_user import seed_habit_user
    from storage import registry
    from storage.db import open_db

    db = open_db(home)
    try:
        seed_habit_user(db, 24)
        config = pipeline.AdaptConfig(model_path=tiny_gguf(name, "Q8_0"), home=home, cache=training_cache,
                                      lora=lora.LoraConfig(epsilon=None, steps=12, threads=2))
        report = pipeline.adapt(db, config)
        assert report["adapter_id"] and export.read_adapter(report["path"]).architecture == "gemma3"
        assert report["eval"]["heldout_loss"] < report["eval"]["base_loss"], report["eval"]
        assert [a["id"] for a in registry.list_adapters(db)] == [report["adapter_id"]]
    finally:
        db.close()
