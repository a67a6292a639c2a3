"""What Ember needs to know about each model architecture it can train, in one place.

One entry per llama.cpp architecture (`general.architecture` of the GGUF). Everything that trains, exports
or applies an adapter reads it: `adapters.base` (which models may train), `adapters.lora` (which modules
carry LoRA), `adapters.export` (tensor names and the Q/K row permutation), `adapters.runtime` and
`adapters.gate` (architecture checks). Adding an architecture is one entry here plus its parity test
(`tests/test_architectures.py`).

Sources, read rather than guessed (llama.cpp as vendored by llama-cpp-python 0.3.36):
- tensor names: the `gguf` package's `TensorNameMap` (gguf-py/gguf/tensor_mapping.py), which
  `convert_hf_to_gguf.py` uses; `tests/test_architectures.py` checks every name below against it;
- Q/K permutation: `conversion/llama.py` `LlamaModel.permute`, applied when `undo_permute` (LlamaModel,
  registered for LlamaForCausalLM and MistralForCausalLM); Qwen2/Qwen3/Gemma/Phi-3 converters do not
  permute, and transformers' GGUF loader un-permutes only `llama` (`TENSOR_PROCESSORS`);
- fused tensors: Phi-3 keeps `qkv_proj` as `attn_qkv` and `gate_up_proj` (gate rows first, then up) as
  `ffn_up` (`conversion/phi.py`, `src/models/phi3.cpp`: `build_qkv` views Q, K, V out of one product,
  `LLM_FFN_SWIGLU` splits gate and up). transformers' Phi3 keeps the same fused Linear modules, so
  LoRA on the fused module exports whole, unsplit, as `convert_lora_to_gguf.py` does;
- control vectors: every model graph here calls `build_cvec(cur, il)` after a layer's FFN residual,
  so layer il ≥ 1 reads floats [(il−1)·n_embd, il·n_embd) (`llama_adapter_cvec::apply_to`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from adapters.errors import TrainingUnavailable

# Logical projection → module path inside a decoder layer (transformers' naming) for the unfused layout.
STANDARD = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
            "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
            "down_proj": "mlp.down_proj"}
STANDARD_TENSORS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                    "mlp.down_proj": "ffn_down"}


@dataclasses.dataclass(frozen=True)
class Architecture:
    """How one architecture looks to transformers and to llama.cpp.

    `modules`: logical projection (q_proj … down_proj) → the module that carries it in a decoder layer
    (several logical names map to one fused module). `tensors`: that module → llama.cpp's tensor base
    name (`blk.N.<name>.weight`). `permute_qk`: llama.cpp stores Q/K rows in rotary-pair order and
    transformers un-permutes them on load, so a LoRA B on q/k must be permuted back on export.
    `fused`: fused module → the logical projections it stacks, in row order. Embeddings may be tied to
    the output in every architecture here; LoRA never targets either (`token_embd`, `output`).
    """

    name: str                          # general.architecture
    model_types: tuple[str, ...]       # transformers' config.model_type for GGUFs of this architecture
    modules: dict[str, str]
    tensors: dict[str, str]
    permute_qk: bool = False
    fused: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    control_vector: bool = True        # build_cvec after each layer's FFN (layers 1 … n_layer − 1)

    def targets(self, logical: tuple[str, ...] | list[str]) -> list[str]:
        """peft `target_modules` (leaf names) for these logical projections: `("q_proj", "v_proj")` →
        `["q_proj", "v_proj"]`, or `["qkv_proj"]` where Q, K and V live in one fused module. Raises
        ValueError for a name this architecture does not have."""
        out: list[str] = []
        for name in logical:
            if name not in self.modules:
                raise ValueError(f"{self.name} has no {name} projection (it has {', '.join(self.modules)})")
            leaf = self.modules[name].rsplit(".", 1)[1]
            if leaf not in out:
                out.append(leaf)
        return out

    def tensor(self, module: str) -> str:
        """Module path in a layer (`self_attn.q_proj`) → llama.cpp tensor base name (`attn_q`).
        Raises ValueError when LoRA on it cannot be exported."""
        if module not in self.tensors:
            raise ValueError(f"cannot export LoRA on {module} for {self.name}: only "
                             f"{', '.join(sorted(self.tensors))}")
        return self.tensors[module]

    def permuted_heads(self, module: str, n_head: int, n_head_kv: int) -> int | None:
        """The head count to permute a LoRA B's rows by on export (n_head for Q, n_head_kv for K), or
        None when llama.cpp keeps transformers' row order."""
        if not self.permute_qk:
            return None
        if module.endswith("q_proj"):
            return n_head
        if module.endswith("k_proj"):
            return n_head_kv
        return None


_PHI3_MODULES = {"q_proj": "self_attn.qkv_proj", "k_proj": "self_attn.qkv_proj", "v_proj": "self_attn.qkv_proj",
                 "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_up_proj", "up_proj": "mlp.gate_up_proj",
                 "down_proj": "mlp.down_proj"}

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    # Llama 1-3.x, SmolLM, and Mistral 7B (llama.cpp writes Mistral as `llama`; transformers reads it as
    # llama, or as mistral when general.name is exactly "mistral").
    Architecture("llama", ("llama", "mistral"), STANDARD, STANDARD_TENSORS, permute_qk=True),
    Architecture("qwen2", ("qwen2",), STANDARD, STANDARD_TENSORS),
    Architecture("qwen3", ("qwen3",), STANDARD, STANDARD_TENSORS),
    Architecture("gemma2", ("gemma2",), STANDARD, STANDARD_TENSORS),
    Architecture("gemma3", ("gemma3", "gemma3_text"), STANDARD, STANDARD_TENSORS),
    Architecture("phi3", ("phi3",), _PHI3_MODULES,
                 {"self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output",
                  "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"},
                 fused={"self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"),
                        "mlp.gate_up_proj": ("gate_proj", "up_proj")}),
)}


def supported() -> str:
    """The architectures Ember trains, for messages: `gemma2, gemma3, llama (and mistral), …`."""
    return ", ".join(sorted(ARCHITECTURES))


def get(name: str) -> Architecture:
    """The entry for a GGUF `general.architecture`; TrainingUnavailable (one line) when there is none."""
    if name not in ARCHITECTURES:
        raise TrainingUnavailable(f"Ember cannot train adapters for the {name or 'unknown'} architecture yet "
                                  f"(it trains {supported()}); chat works, `ember adapt` does not")
    return ARCHITECTURES[name]


def for_model_type(model_type: str) -> Architecture:
    """The entry for a transformers `config.model_type`; TrainingUnavailable when there is none."""
    for arch in ARCHITECTURES.values():
        if model_type in arch.model_types:
            return arch
    raise TrainingUnavailable(f"Ember cannot train adapters for {model_type or 'unknown'} models yet "
                              f"(it trains {supported()}); chat works, `ember adapt` does not")


def of_gguf(path: Path) -> Architecture:
    """The entry for a GGUF model file, read from its header (no weights loaded)."""
    from adapters.export import model_architecture

    return get(model_architecture(Path(path)))


def of_model(model: Any) -> Architecture:
    """The entry for a loaded transformers model."""
    return for_model_type(model.config.model_type)
