"""A Hugging Face model directory (config.json, *.safetensors, a BPE tokenizer.json) as an F16 GGUF, so that
`ember compress` can take an unquantised source.

Only the layouts `adapters.reference` runs are converted (transformers' `llama`, `mistral` and `qwen2`),
with llama.cpp's conventions as its `convert_hf_to_gguf.py` writes them: tensor names from the `gguf`
package's `TensorNameMap`, Q/K rows permuted for llama's rotary layout (`LlamaModel.permute`), 2-D weights
F16 and norms and biases F32, the tied output head left out. The tokenizer goes in through the `gguf`
package's `BpeVocab` and `SpecialVocab` (tokens, merges, special ids, chat template). llama.cpp also needs the
name of its pre-tokenizer, which upstream finds by hashing a tokenization of a probe text against a table;
here each candidate name is tried instead and kept only if llama.cpp then tokenizes a probe text exactly as
the directory's own tokenizer does (the `tokenizers` library): a tokenizer no candidate reproduces is
refused rather than approximated.

Errors: `UnsupportedLayout` (one line) for anything else.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from adapters.errors import UnsupportedLayout
from storage.private import private_dirs

ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
# llama.cpp pre-tokenizer names (src/llama-vocab.cpp) for BPE vocabularies of the architectures above.
PRE_TOKENIZERS = ("smollm", "llama-bpe", "qwen2", "gpt-2", "default", "starcoder", "deepseek-llm", "falcon",
                  "stablelm2", "olmo", "refact", "tekken")
PROBE = ("Hello world! It's 2026-11-30, and I've got 1234567 apples costing $3.14 each.\n\n"
         "  Indented  text\twith tabs, CAPS and lower, don't we'll they're.\n"
         "def f(x):\n    return x ** 2  # comment\n")


def is_model_directory(path: Path) -> bool:
    """True for a directory that looks like a Hugging Face model (a config.json inside)."""
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def _rope_theta(config: dict[str, Any]) -> float:
    params = config.get("rope_parameters") or {}
    return float(config.get("rope_theta") or params.get("rope_theta") or 10000.0)


def _permute(w: Any, n_head: int) -> Any:
    # llama.cpp's convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _header(writer: Any, arch: str, config: dict[str, Any], name: str) -> None:
    import gguf

    n_head = int(config["num_attention_heads"])
    writer.add_name(name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or n_head))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_rope_freq_base(_rope_theta(config))
    if arch == "llama":
        writer.add_rope_dimension_count(int(config.get("head_dim") or config["hidden_size"] // n_head))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)


def _vocabulary(writer: Any, directory: Path, pre: str) -> None:
    import gguf

    try:
        vocab = gguf.vocab.BpeVocab(directory)
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise UnsupportedLayout(f"{directory.name}'s tokenizer is not a byte-level BPE tokenizer.json "
                                f"ember compress can convert ({err})") from None
    tokens, types = [], []
    for text, _score, kind in vocab.all_tokens():
        tokens.append(text if isinstance(text, str) else text.decode("utf-8"))
        types.append(kind)
    # Added tokens marked special in tokenizer.json are control tokens to llama.cpp (so that `<|im_end|>`
    # is one token when special text is parsed), others user-defined, as convert_hf_to_gguf.py sets them.
    added = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8")).get("added_tokens") or []
    for item in added:
        if 0 <= int(item["id"]) < len(types):
            types[int(item["id"])] = gguf.TokenType.CONTROL if item.get("special") else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(directory, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def _write(path: Path, directory: Path, arch: str, config: dict[str, Any], pre: str,
           tensors: dict[str, Any] | None) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    _header(writer, arch, config, directory.name)
    _vocabulary(writer, directory, pre)
    for name, data in (tensors or {}).items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _pre_tokenizer(directory: Path, arch: str, config: dict[str, Any], scratch: Path) -> str:
    """The llama.cpp pre-tokenizer name under which llama.cpp tokenizes PROBE as the directory's tokenizer."""
    from tokenizers import Tokenizer

    from adapters.llama_log import quiet_llama

    want = Tokenizer.from_file(str(directory / "tokenizer.json")).encode(PROBE, add_special_tokens=False).ids
    for pre in PRE_TOKENIZERS:
        _write(scratch, directory, arch, config, pre, None)
        try:
            llm = quiet_llama(model_path=str(scratch), vocab_only=True)
        except (ValueError, RuntimeError):
            continue
        try:
            got = llm.tokenize(PROBE.encode("utf-8"), add_bos=False, special=False)
        finally:
            llm.close()
        if got == want:
            return pre
    raise UnsupportedLayout(f"llama.cpp tokenizes differently from {directory.name}'s tokenizer under every "
                            f"pre-tokenizer tried ({', '.join(PRE_TOKENIZERS)}); it cannot be converted here")


def check(directory: Path) -> tuple[dict[str, Any], str, list[Path]]:
    """(config, llama.cpp architecture, safetensors files) of a directory `convert` can take; else
    `UnsupportedLayout`, before anything is read beyond config.json."""
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UnsupportedLayout(f"cannot read {directory / 'config.json'}: {err}") from None
    model_type = config.get("model_type")
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise UnsupportedLayout(f"{directory.name} is a {model_type or 'unknown'} model; ember compress converts "
                                f"Hugging Face {', '.join(ARCHITECTURES)} directories")
    files = sorted(directory.glob("*.safetensors"))
    if not files or not (directory / "tokenizer.json").is_file():
        raise UnsupportedLayout(f"{directory.name} has no *.safetensors or no tokenizer.json; ember compress "
                                "converts directories that have both")
    return config, arch, files


def convert(directory: Path, target: Path) -> Path:
    """Write `directory` (a Hugging Face llama/mistral/qwen2 model) as an F16 GGUF at `target`, atomically;
    returns `target`. Raises `UnsupportedLayout` for another architecture, a missing or non-BPE tokenizer,
    no safetensors, or a tensor without a llama.cpp name."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    directory = Path(directory)
    config, arch, files = check(directory)
    private_dirs(target.parent)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        pre = _pre_tokenizer(directory, arch, config, partial)
        n_layer, n_head = int(config["num_hidden_layers"]), int(config["num_attention_heads"])
        n_kv = int(config.get("num_key_value_heads") or n_head)
        names = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), n_layer)
        tied = bool(config.get("tie_word_embeddings", False))
        tensors: dict[str, Any] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    if key == "lm_head.weight" and tied:
                        continue
                    name = names.get_name(key, try_suffixes=(".weight", ".bias"))
                    if name is None:
                        raise UnsupportedLayout(f"{directory.name} holds {key}, which has no place in llama.cpp's "
                                                f"{arch} layout")
                    data = f.get_tensor(key).float().numpy()
                    if arch == "llama" and key.endswith("q_proj.weight"):
                        data = _permute(data, n_head)
                    elif arch == "llama" and key.endswith("k_proj.weight"):
                        data = _permute(data, n_kv)
                    kind = np.float16 if data.ndim == 2 else np.float32
                    tensors[name] = np.ascontiguousarray(data, dtype=kind)
        _write(partial, directory, arch, config, pre, tensors)
        os.chmod(partial, 0o600)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target
