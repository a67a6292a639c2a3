"""`ember compress` on layouts beyond SmolLM2's: Qwen2's blocks (Q/K/V biases, rotary embedding over the
two halves of a head) and Llama 3's, on the tiny random-weight fixtures of benchmarks/tiny_models.py. The
torch reference must be the model llama.cpp runs, biases included, and the written file must keep them."""
from __future__ import annotations

import gguf
import pytest

from adapters import compress
from adapters.llama_log import quiet_llama
from adapters.reference import Reference
from assistant.compression import BUILTIN_TEXT, logits
from tests.conftest import assert_clean_error


def _with_biases(source, target):
    """`source` (an F32 qwen2 GGUF) with random Q/K/V biases: transformers initialises them to zero, which
    would let a reference that ignores them pass."""
    import shutil

    import numpy as np

    shutil.copyfile(source, target)
    reader = gguf.GGUFReader(str(target), "r+")
    rng = np.random.default_rng(0)
    for t in reader.tensors:
        if t.name.endswith(".bias"):
            t.data[...] = rng.normal(0, 1.0, t.data.shape).astype(np.float32)
    reader.data.flush()
    return target


def _tokens(path, n=48):
    vocab = quiet_llama(model_path=str(path), vocab_only=True)
    try:
        return [vocab.token_bos()] + vocab.tokenize(BUILTIN_TEXT.read_bytes(), add_bos=False)[:n - 1]
    finally:
        vocab.close()


@pytest.mark.parametrize("name", ["qwen2", "llama3"])
def test_the_torch_reference_is_the_model_llama_cpp_runs_for_qwen2_and_llama3(tiny_gguf, name, tmp_path):
    # F32, so that nothing but the graph can differ (on the Q8_0 file llama.cpp's 8-bit activations leave a
    # KL of ~0.02 on these peaked random models; on F32 it measured 3.7e-5 for qwen2, 3.1e-5 for llama3)
    path = tiny_gguf(name, "F32")
    if name == "qwen2":
        path = _with_biases(path, tmp_path / "biased.gguf")
    tokens = _tokens(path)
    ref = Reference(path, threads=2)
    ours, theirs = ref.logits(tokens).numpy(), logits(path, tokens, 2)
    kl, _ = compress.kl_nll(theirs, ours, tokens)
    assert kl < 1e-3 and (ours.argmax(-1) == theirs.argmax(-1)).all()
    if name == "qwen2":
        assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= set(ref.weights)
        # the biases are what makes it qwen2's output: without them the reference is far off
        for i in range(ref.layout.n_layer):
            for m in ("attn_q", "attn_k", "attn_v"):
                ref.weights[f"blk.{i}.{m}.bias"] = ref.weights[f"blk.{i}.{m}.bias"] * 0
        unbiased, _ = compress.kl_nll(theirs, ref.logits(tokens).numpy(), tokens)
        assert unbiased > 100 * max(kl, 1e-4)


def test_a_qwen2_model_is_compressed_registered_and_keeps_its_biases(tiny_gguf, ember, home):
    source = tiny_gguf("qwen2", "Q8_0")
    least = compress.smallest(source, ("Q4_0", "Q8_0"))
    most = compress.smallest(source, ("Q8_0",))
    budget = ((least + most) / 2 + 1000) / compress.MB    # one of the two blocks can take Q8_0
    result = ember("compress", str(source), "--size", f"{budget:.6f}", "--types", "Q4_0,Q8_0", "--tokens", "32",
                   "--heldout-tokens", "32", "--calibration", "builtin", "--name", "tiny-qwen2-luc", "--json",
                   timeout=300)
    assert result.returncode == 0, result.err
    import json

    document = json.loads(result.out)
    counts = document["policy"]["types"]
    assert set(counts.values()) == {"Q4_0", "Q8_0"}       # the budget buys one block more bits, not both
    sens = document["sensitivity"]["blocks"]
    upgraded = next(i for i, t in counts.items() if t == "Q8_0")
    assert sens[int(upgraded)]["Q4_0"]["kl"] == max(b["Q4_0"]["kl"] for b in sens)   # the more sensitive one
    written = gguf.GGUFReader(document["path"])
    types = {t.name: t.tensor_type.name for t in written.tensors}
    assert types["blk.0.attn_q.bias"] == "F32" and types["blk.1.attn_v.bias"] == "F32"
    for i, want in counts.items():
        assert types[f"blk.{i}.ffn_down.weight"] == want
    assert document["measured"]["bytes"] <= budget * compress.MB
    assert document["measured"]["kl"] < 0.5
    assert ember("doctor", "--model", "tiny-qwen2-luc", timeout=120).returncode == 0


def test_an_architecture_outside_the_supported_layouts_is_one_line(tiny_gguf, ember, home):
    result = ember("compress", str(tiny_gguf("qwen3", "Q8_0")), "--size", "5", "--calibration", "builtin",
                   timeout=120)
    assert_clean_error(result, contains="qwen3 model; ember compress supports llama and qwen2 blocks")
    assert not (home / "models").exists() or not list((home / "models").iterdir())


def test_a_directory_that_is_not_a_model_is_refused_in_one_line(ember, home, tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    result = ember("compress", str(folder), "--size", "50", timeout=120)
    assert_clean_error(result, contains="is a directory without a config.json")
    assert not (home / "models").exists()


@pytest.fixture(scope="module")
def hf_qwen2(model_path, tmp_path_factory):
    """A tiny Qwen2 as a Hugging Face directory (safetensors, tokenizer.json with SmolLM2's first 2,048
    tokens and its pre-tokenizer, tokenizer_config.json with the chat template), random Q/K/V biases;
    and the same weights as an F32 GGUF written by benchmarks/tiny_models.py, to compare against."""
    import json

    import torch
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from benchmarks import tiny_models

    folder = tmp_path_factory.mktemp("hf") / "tiny-qwen2-hf"
    spec = tiny_models.SPECS["qwen2"]
    vocab = tiny_models._vocabulary(model_path, spec)
    model = tiny_models.hf_model(spec, len(vocab["tokens"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.bias"):
                p.copy_(torch.randn_like(p))
    model.save_pretrained(folder)
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(vocab["tokens"])},
                               merges=[tuple(m.split(" ", 1)) for m in vocab["merges"]]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": spec.template, "eos_token": "<|im_end|>", "bos_token": None, "add_bos_token": False}))
    reference = tiny_models.write_gguf(model, spec, vocab, folder.parent / "tiny-qwen2-biased.F32.gguf")
    return folder, reference


def test_a_hugging_face_directory_converts_to_the_gguf_llama_cpp_runs(hf_qwen2, tmp_path):
    from adapters import convert

    folder, reference = hf_qwen2
    out = convert.convert(folder, tmp_path / "converted.gguf")
    reader = gguf.GGUFReader(str(out))
    assert reader.get_field("tokenizer.ggml.pre").contents() == "smollm"   # the one that tokenizes as tokenizer.json
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.attn_q.bias"] == "F32"
    tokens = _tokens(reference)
    assert _tokens(out)[1:] == tokens[1:]      # the same text, the same ids (the BOS each file names aside)
    theirs, ours = logits(reference, tokens, 2), logits(out, tokens, 2)
    kl, _ = compress.kl_nll(theirs, ours, tokens)
    assert kl < 1e-3 and (theirs.argmax(-1) == ours.argmax(-1)).all()       # F16 weights, the same model
    vocab = quiet_llama(model_path=str(out), vocab_only=True)
    try:
        assert len(vocab.tokenize(b"<|im_end|>", add_bos=False, special=True)) == 1   # a control token
    finally:
        vocab.close()


def test_ember_compress_takes_a_hugging_face_directory(hf_qwen2, ember, home):
    import json

    folder, _ = hf_qwen2
    result = ember("compress", str(folder), "--max-kl", "1000", "--types", "Q4_0,Q8_0", "--tokens", "32",
                   "--heldout-tokens", "32", "--calibration", "builtin", "--json", timeout=300)
    assert result.returncode == 0, result.err
    document = json.loads(result.out)
    assert document["source"] == str(folder) and document["converted"].endswith(".F16.gguf")
    assert document["name"].startswith("tiny-qwen2-hf.luc-")
    assert (home / "models" / f"{document['name']}.gguf").is_file()
    other = folder.parent / "gemma"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "gemma2"}')
    assert_clean_error(ember("compress", str(other), "--size", "5", timeout=120),
                       contains="is a gemma2 model; ember compress converts Hugging Face llama, mistral, qwen2")
