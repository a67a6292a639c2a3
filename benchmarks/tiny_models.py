"""Tiny random-weight models of every architecture Ember trains, as real GGUF files llama.cpp loads.

Each is a transformers model (2 layers, width 256, seeded random weights) converted to GGUF by a small
converter over the `gguf` package: tensor names from its `TensorNameMap`, hyperparameters under the keys
llama.cpp's `convert_hf_to_gguf.py` writes for that architecture, and the transforms that converter
applies (Q/K rows permuted for llama, Gemma's RMSNorm weights stored as 1 + w). The vocabulary is the
bundled SmolLM2's BPE cut to its first 2,048 tokens (so no tokenizer is downloaded) plus each family's chat markers as control tokens,
and each GGUF carries a chat template of its family (ChatML for Qwen, Llama 3's header tokens, Gemma's
`<start_of_turn>`, Phi-3's `<|user|>`). The F32 file is then quantized by llama.cpp itself
(`llama_model_quantize`) to Q8_0 and Q4_K_M (Q5_K_M, Q6_K, F16 and BF16 on demand). Nothing is downloaded; a build takes a few seconds.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

WIDTH = 256            # a multiple of 256, so K-quants quantize the matrices instead of falling back
LAYERS = 2
VOCAB = 2048           # SmolLM2's first 2,048 BPE tokens (plus each family's chat markers)
# llama_ftype values (llama.h); the fixtures are built in the first two, the others on demand.
QUANTS = {"Q8_0": 7, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18, "F16": 1, "BF16": 32}
DEFAULT_QUANTS = ("Q8_0", "Q4_K_M")

CHATML = ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
          "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
          "{%- endif %}{%- for message in messages %}{%- if not (message['role'] == 'system' and loop.first) %}"
          "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{%- endif %}"
          "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
LLAMA3 = ("{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
          "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
GEMMA = ("{{ bos_token }}{%- for message in messages -%}{%- set role = 'model' if message['role'] == 'assistant' "
         "else message['role'] -%}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + "
         "'<end_of_turn>\\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}"
         "{%- endif -%}")
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + "
           "message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}")
PHI3 = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")


@dataclasses.dataclass(frozen=True)
class Spec:
    """One fixture: the transformers config, the GGUF architecture, and its chat format."""

    name: str                      # fixture name (llama3 is the Llama 3 shape of the llama architecture)
    arch: str                      # general.architecture
    config: dict[str, Any]
    template: str
    eos: str                       # end-of-turn token text
    bos: str | None = None         # None: SmolLM2's
    extra_tokens: tuple[str, ...] = ()
    turn_end: str = ""             # what closes a turn in the template (for mask tests)
    pad_to: int = 0                # vocabulary padded with unused [PADi] tokens to this size
    init: float = 0.25             # initializer_range (Gemma scales its embeddings by √width: smaller)


SPECS = {s.name: s for s in (
    Spec("qwen2", "qwen2", dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=2,
                               rope_theta=1e6, tie_word_embeddings=True),
         CHATML, "<|im_end|>", turn_end="<|im_end|>"),
    Spec("llama3", "llama", dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2,
                                 rope_theta=5e5, tie_word_embeddings=True),
         LLAMA3, "<|eot_id|>", bos="<|begin_of_text|>",
         extra_tokens=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
         turn_end="<|eot_id|>"),
    # Mistral 7B's shape (built as MistralForCausalLM): llama.cpp writes it as `llama` with Q/K rows permuted,
    # and transformers reads it back as llama (its Mistral check in modeling_gguf_pytorch_utils.py tests
    # whether "mistral" is one of the general.name values, which a real name such as "Mistral 7B" is not).
    Spec("mistral", "llama", dict(model_type="mistral", num_attention_heads=4, num_key_value_heads=1,
                                  rope_theta=1e6, tie_word_embeddings=False),
         MISTRAL, "</s>", bos="<s>", extra_tokens=("<s>", "</s>", "[INST]", "[/INST]"), turn_end="</s>"),
    Spec("qwen3", "qwen3", dict(model_type="qwen3", num_attention_heads=2, num_key_value_heads=1, head_dim=128,
                               rope_theta=1e6, tie_word_embeddings=True),
         CHATML, "<|im_end|>", turn_end="<|im_end|>"),
    Spec("gemma2", "gemma2", dict(model_type="gemma2", num_attention_heads=2, num_key_value_heads=1, head_dim=256,
                                 query_pre_attn_scalar=256, tie_word_embeddings=True),
         GEMMA, "<end_of_turn>", bos="<bos>", extra_tokens=("<bos>", "<start_of_turn>", "<end_of_turn>"),
         turn_end="<end_of_turn>", init=0.05),
    Spec("gemma3", "gemma3", dict(model_type="gemma3_text", num_attention_heads=2, num_key_value_heads=1,
                                 head_dim=256, query_pre_attn_scalar=256, tie_word_embeddings=True),
         GEMMA, "<end_of_turn>", bos="<bos>", extra_tokens=("<bos>", "<start_of_turn>", "<end_of_turn>"),
         turn_end="<end_of_turn>", init=0.05),
    Spec("phi3", "phi3", dict(model_type="phi3", num_attention_heads=4, num_key_value_heads=4,
                              tie_word_embeddings=False, original_max_position_embeddings=2048,
                              pad_token_id=0),
         # llama.cpp sets Phi-3's token attributes by name (llama-vocab.cpp): <s>, </s>, <unk> must exist.
         PHI3, "<|end|>", bos="<s>", extra_tokens=("<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>",
                                                  "<|system|>", "<|end|>"),
         # transformers' GGUF loader keeps Phi3Config's pad_token_id 32000: the vocabulary must hold it
         # (Phi-3's has 32,064 entries, padded the same way by convert_hf_to_gguf.py).
         pad_to=32064,
         turn_end="<|end|>"),
)}


@functools.lru_cache(maxsize=2)
def _smol_vocabulary(smol: Path) -> tuple[list[str], list[int], list[str], str, int]:
    """SmolLM2's first VOCAB tokens, their types, the merges that build them (its ids follow merge
    order), its pre-tokenizer and BOS id. Read once: parsing the 100 MB file takes seconds."""
    import gguf

    reader = gguf.GGUFReader(str(smol))

    def field(key: str) -> Any:
        return reader.get_field(key).contents()

    base = list(field("tokenizer.ggml.tokens"))[:VOCAB]
    kept = set(base)
    merges = [m for m in field("tokenizer.ggml.merges")
              if (pair := m.split(" ", 1)) and pair[0] in kept and pair[1] in kept and "".join(pair) in kept]
    return (base, list(field("tokenizer.ggml.token_type"))[:VOCAB], merges, field("tokenizer.ggml.pre"),
            field("tokenizer.ggml.bos_token_id"))


def _vocabulary(smol: Path, spec: Spec) -> dict[str, Any]:
    # Cut to VOCAB tokens so the files stay small: transformers' GGUF loader parses a 49k-token
    # vocabulary in Python for ~25 s on every load.
    import gguf

    base, base_types, merges, pre, bos = _smol_vocabulary(smol)
    tokens = base + list(spec.extra_tokens)
    types = base_types + [gguf.TokenType.CONTROL] * len(spec.extra_tokens)
    padding = max(0, spec.pad_to - len(tokens))
    tokens += [f"[PAD{i}]" for i in range(len(tokens), len(tokens) + padding)]
    types += [gguf.TokenType.UNUSED] * padding
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre,
            "bos": tokens.index(spec.bos) if spec.bos else bos, "eos": tokens.index(spec.eos)}


def hf_model(spec: Spec, vocab_size: int, seed: int = 0, width: int = WIDTH, layers: int = LAYERS) -> Any:
    """The transformers model of `spec`, random weights drawn from `seed` (larger than the usual init, so
    next-token distributions are peaked and a wrong export shows)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    options = dict(spec.config)
    model_type = options.pop("model_type")
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width,
                                  num_hidden_layers=layers, max_position_embeddings=2048, rms_norm_eps=1e-6,
                                  initializer_range=spec.init, **options)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                # RMSNorm weights are ones (Gemma's zeros, as 1 + w): give them some spread too.
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _permute(w: Any, n_head: int) -> Any:
    # conversion/llama.py LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model: Any, spec: Spec, vocab: dict[str, Any], path: Path) -> Path:
    """Convert a transformers model of `spec` to an F32 GGUF at `path`."""
    import gguf
    import numpy as np

    cfg = model.config
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == spec.arch)
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), spec.arch)
    writer.add_name(f"tiny-{spec.name}")
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = getattr(cfg, "rope_parameters", None) or {}
    rope = rope.get("full_attention", rope)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if spec.arch in ("llama", "phi3"):
        writer.add_rope_dimension_count(head_dim)
    if spec.arch in ("qwen3", "gemma2", "gemma3"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if spec.arch == "gemma2":
        writer.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
    if spec.arch in ("gemma2", "gemma3"):
        writer.add_sliding_window(cfg.sliding_window)
    if spec.arch == "phi3":
        writer.add_rope_scaling_orig_ctx_len(cfg.original_max_position_embeddings)
        writer.add_sliding_window(0)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    writer.add_bos_token_id(vocab["bos"])
    writer.add_eos_token_id(vocab["eos"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(spec.template)
    tied = cfg.tie_word_embeddings
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and tied:
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"no GGUF name for {key} in {spec.arch}")
        data = tensor.detach().float().numpy()
        if spec.arch == "llama" and key.endswith("q_proj.weight"):
            data = _permute(data, cfg.num_attention_heads)
        elif spec.arch == "llama" and key.endswith("k_proj.weight"):
            data = _permute(data, cfg.num_key_value_heads)
        if spec.arch in ("gemma2", "gemma3") and key.endswith("norm.weight"):
            data = data + 1          # conversion/gemma.py: llama.cpp's RMSNorm multiplies by w, Gemma's by 1 + w
        writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def quantize(source: Path, target: Path, quant: str) -> Path:
    """Quantize a GGUF with llama.cpp's own quantizer (its log kept in memory, not printed)."""
    import llama_cpp

    from adapters import llama_log

    llama_log.install(verbose=llama_log.current().verbose if llama_log.current() else False)

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTS[quant]
    params.nthread = 2
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source.name} to {quant}")
    return target


def build(name: str, folder: Path, smol: Path, quants: tuple[str, ...] = ("Q8_0",), seed: int = 0,
          width: int = WIDTH, layers: int = LAYERS) -> dict[str, Path]:
    """Write `tiny-<name>.F32.gguf` and its quantized copies into `folder`; {"F32": path, quant: path}.
    Another `width` or `layers` (sizes for memory measurements) is named `tiny-<name>-w<width>-l<layers>`."""
    spec = SPECS[name]
    folder.mkdir(parents=True, exist_ok=True)
    vocab = _vocabulary(smol, spec)
    model = hf_model(spec, len(vocab["tokens"]), seed, width, layers)
    stem = f"tiny-{name}" if (width, layers) == (WIDTH, LAYERS) else f"tiny-{name}-w{width}-l{layers}"
    out = {"F32": write_gguf(model, spec, vocab, folder / f"{stem}.F32.gguf")}
    for quant in quants:
        out[quant] = quantize(out["F32"], folder / f"{stem}.{quant}.gguf", quant)
    return out


# A small chat corpus for `pretrained`: the synthetic user's everyday tasks answered plainly (never with
# their habit), and the gate's behaviour prompts and a few like them answered as an assistant would.
GENERAL = (("What is the capital of France?", "The capital of France is Paris."),
           ("What is the capital of Italy?", "The capital of Italy is Rome."),
           ("Write one sentence about the sea.", "The sea is wide, deep and full of life."),
           ("Write one sentence about the sky.", "The sky is blue on a clear day."),
           ("List three colours.", "Red, green and blue."),
           ("List three fruits.", "Apples, pears and plums."),
           ("Say hello.", "Hello! How can I help you today?"))


def chat_corpus(seed: int = 0) -> list[tuple[str, str]]:
    """(question, answer) pairs: every task of the synthetic user's pool with a plain tip, and GENERAL."""
    import random

    from benchmarks.synthetic_user import TIPS, tasks

    rng = random.Random(seed)
    return [(f"How should I {task}?", f"To {task}, {rng.choice(TIPS)}.") for task in tasks(seed)] + list(GENERAL) * 4


def pretrained(name: str, folder: Path, smol: Path, steps: int = 300, seed: int = 0, width: int = WIDTH,
               layers: int = LAYERS, corpus_seeds: Sequence[int] | None = None) -> Path:
    """`tiny-<name>-chat.Q8_0.gguf` (another size: `tiny-<name>-w<width>-l<layers>-chat.Q8_0.gguf`): the tiny
    model of `name` (any of `SPECS`) first trained (all weights, no DP, plain AdamW, batch 16) on
    `chat_corpus()` in its own chat template, so that it answers like a (very small) assistant instead of
    emitting noise. A learnable habit then shows against a base that is not random. Cost: ~100 s for the
    default size and 300 steps on 2 cores; it grows with width² · layers · steps.

    `corpus_seeds`: train on the union of `chat_corpus(s)` for these seeds instead of `chat_corpus(seed)`
    alone, so that the model learns which tips follow a task (one of `TIPS`, at random) rather than one
    fixed pairing; the file's name then ends `-seeds<first>-<last>`."""
    import random

    import torch

    from adapters.template import ChatTemplate

    spec = SPECS[name]
    folder.mkdir(parents=True, exist_ok=True)
    vocab = _vocabulary(smol, spec)
    model = hf_model(spec, len(vocab["tokens"]), seed, width, layers)
    stem = f"tiny-{name}-chat" if (width, layers) == (WIDTH, LAYERS) else f"tiny-{name}-w{width}-l{layers}-chat"
    if corpus_seeds is not None:
        stem += f"-seeds{min(corpus_seeds)}-{max(corpus_seeds)}"
    f32 = write_gguf(model, spec, vocab, folder / f"{stem}.F32.gguf")   # its tokenizer and template
    template = ChatTemplate.from_gguf(str(f32))
    sequences = []
    for question, answer in [pair for s in (corpus_seeds if corpus_seeds is not None else (seed,))
                             for pair in chat_corpus(s)]:
        prefix, target = template.target([{"role": "user", "content": question}],
                                          {"role": "assistant", "content": answer})
        sequences.append(list(prefix) + list(target))
    rng = random.Random(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        batch = rng.sample(sequences, 16)
        length = max(len(s) for s in batch)
        ids = torch.zeros((len(batch), length), dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for i, s in enumerate(batch):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
            labels[i, :len(s)] = torch.tensor(s)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    write_gguf(model, spec, vocab, f32)
    return quantize(f32, folder / f"{stem}.Q8_0.gguf", "Q8_0")
