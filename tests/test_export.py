"""GGUF LoRA export: llama.cpp with the adapter agrees with torch with the merged LoRA, and wrong files
are refused with one clear line."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from adapters import export, runtime
from adapters.base import file_sha256, load_base
from adapters.errors import AdapterInvalid, AdapterMismatch

PROMPT = "The capital of France is Paris. The capital of Italy is"


@pytest.fixture(scope="module")
def base(model_path, training_cache):
    return load_base(model_path, training_cache)


def _random_lora(base, modules, rank=4, layers=(26, 27, 28, 29), seed=0):
    """LoRA weights large enough to change the output clearly (peft's B=0 start would prove nothing)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in layers:
        block = base.model.layers[layer]
        for name in modules:
            linear = block.self_attn.get_submodule(name) if "proj" in name and hasattr(block.self_attn, name) \
                else block.mlp.get_submodule(name)
            out_f, in_f = linear.weight.shape
            a = torch.randn(rank, in_f, generator=gen) / in_f ** 0.5
            b = torch.randn(out_f, rank, generator=gen) * 0.5
            part = "self_attn" if hasattr(block.self_attn, name) else "mlp"
            weights[f"model.layers.{layer}.{part}.{name}"] = (a, b)
    return weights


def _torch_probs(base, tokens, weights, alpha, rank):
    """Next-token distribution of torch with ΔW = (α/r)·B·A merged into the base weights."""
    import torch

    saved = {}
    with torch.no_grad():
        for module, (a, b) in weights.items():
            linear = base.get_submodule(module)
            saved[module] = linear.weight.clone()
            linear.weight += (alpha / rank) * b @ a
        logits = base(torch.tensor([tokens])).logits[0, -1].double()
        for module, weight in saved.items():
            base.get_submodule(module).weight.copy_(weight)
    return torch.softmax(logits, -1).numpy()


def _llama_probs(llm, tokens):
    llm.reset()
    llm.eval(tokens)
    logits = np.asarray(llm.scores[len(tokens) - 1], dtype=np.float64)
    p = np.exp(logits - logits.max())
    return p / p.sum()


def _kl(p, q):
    return float(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12))))


@pytest.fixture(scope="module")
def llm(model_path):
    import llama_cpp

    model = llama_cpp.Llama(str(model_path), n_ctx=256, logits_all=True, n_threads=2, verbose=False)
    yield model
    model.close()


@pytest.mark.parametrize("modules", [("q_proj", "k_proj", "v_proj", "o_proj"),
                                     ("q_proj", "gate_proj", "up_proj", "down_proj")])
def test_llama_cpp_with_the_adapter_matches_torch_with_merged_lora(base, llm, model_path, tmp_path, modules):
    sha = file_sha256(model_path)
    weights = _random_lora(base, modules)
    path = export.write_lora_gguf(tmp_path / "a.gguf", weights, alpha=8, n_head=9, n_head_kv=3,
                                  base_sha256=sha, base_name=model_path.name)
    tokens = llm.tokenize(PROMPT.encode())
    base_gap = _kl(_torch_probs(base, tokens, {}, 8, 4), _llama_probs(llm, tokens))
    loaded = runtime.load(llm, path, base_sha256=sha)
    runtime.apply(llm, loaded)
    try:
        adapted = _llama_probs(llm, tokens)
    finally:
        runtime.apply(llm, None)
        runtime.free(loaded)
    gap = _kl(_torch_probs(base, tokens, weights, 8, 4), adapted)
    moved = _kl(_torch_probs(base, tokens, {}, 8, 4), adapted)
    print(f"KL base {base_gap:.4f}, with adapter {gap:.4f}, adapter effect {moved:.3f}")
    assert gap < max(3 * base_gap, 0.02)     # quantization tolerance: the base alone differs this much
    assert moved > 10 * gap                  # and the adapter really changed the distribution


def test_q_and_k_rows_must_be_permuted_for_llama_cpp(base, llm, model_path, tmp_path, monkeypatch):
    """Without the rotary row permutation, parity breaks: the permutation is what makes it hold."""
    sha = file_sha256(model_path)
    weights = _random_lora(base, ("q_proj", "k_proj"))
    monkeypatch.setattr(export, "permute_rows", lambda b, n_head: b)
    path = export.write_lora_gguf(tmp_path / "wrong.gguf", weights, alpha=8, n_head=9, n_head_kv=3,
                                  base_sha256=sha, base_name=model_path.name)
    tokens = llm.tokenize(PROMPT.encode())
    loaded = runtime.load(llm, path, base_sha256=sha)
    runtime.apply(llm, loaded)
    try:
        wrong = _llama_probs(llm, tokens)
    finally:
        runtime.apply(llm, None)
        runtime.free(loaded)
    assert _kl(_torch_probs(base, tokens, weights, 8, 4), wrong) > 0.02


@pytest.fixture
def adapter_file(base, model_path, tmp_path):
    weights = _random_lora(base, ("q_proj",), layers=(29,))
    return export.write_lora_gguf(tmp_path / "ok.gguf", weights, alpha=8, n_head=9, n_head_kv=3,
                                  base_sha256=file_sha256(model_path), base_name=model_path.name,
                                  extra={"adapter_id": "lora-x"})


def test_written_adapter_is_private_complete_and_describes_itself(adapter_file, model_path):
    assert adapter_file.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in adapter_file.parent.iterdir() if p.name.startswith(".")] == []
    info = export.read_adapter(adapter_file)
    assert (info.kind, info.architecture, info.alpha, info.layers) == ("lora", "llama", 8.0, (29,))
    assert info.base_sha256 == file_sha256(model_path) and info.n_tensors == 2


def test_wrong_files_are_refused_with_one_clear_line(adapter_file, model_path, tmp_path):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(adapter_file.read_bytes()[:200])
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(os.urandom(4096))
    for path, words in ((truncated, "corrupt or truncated"), (junk, "corrupt or truncated"),
                        (model_path, "not an adapter"), (tmp_path / "missing.gguf", "does not exist")):
        with pytest.raises(AdapterInvalid, match=words) as err:
            export.read_adapter(path)
        assert "\n" not in str(err.value)
    info = export.read_adapter(adapter_file)
    with pytest.raises(AdapterMismatch, match="another base model"):
        export.check_compatible(info, architecture="llama", base_sha256="0" * 64)
    with pytest.raises(AdapterMismatch, match="architecture"):
        export.check_compatible(info, architecture="qwen2", base_sha256=None)


def test_a_refused_adapter_leaves_the_model_on_its_previous_adapter(adapter_file, llm, model_path, tmp_path):
    sha = file_sha256(model_path)
    tokens = llm.tokenize(PROMPT.encode())
    good = runtime.load(llm, adapter_file, base_sha256=sha)
    runtime.apply(llm, good)
    before = _llama_probs(llm, tokens)
    bad = tmp_path / "bad.gguf"
    shutil.copy(adapter_file, bad)
    with pytest.raises(AdapterMismatch):
        runtime.load(llm, bad, base_sha256="f" * 64)
    assert np.allclose(_llama_probs(llm, tokens), before)
    runtime.apply(llm, None)
    runtime.free(good)
