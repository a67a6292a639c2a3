"""`ember compress`: layer-wise unified compression (EDGE-LLM's LUC) through llama.cpp's own quantiser."""
from __future__ import annotations

from pathlib import Path

import click

from assistant.cli.common import json_option, open_store, print_json, settings_from

TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16")


@click.command(epilog="Unstructured and N:M sparsity buy nothing in llama.cpp: ggml has no sparse kernels, so "
                      "zeroed weights are stored and multiplied like any other. Only whole blocks are pruned "
                      "(--prune-layers), the one pruning llama.cpp executes.")
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("--size", "size_mb", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Budget: the compressed file's size in MB (10^6 bytes).")
@click.option("--max-kl", type=click.FloatRange(min=0), default=None,
              help="Budget: the summed per-block KL to the source on the calibration text (nats/token).")
@click.option("--prune-layers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Drop this many whole blocks, those whose removal changes the output least.")
@click.option("--calibration", default="auto", show_default=True,
              help="auto (your own messages when they are enough, else a shipped public-domain text), log, "
                   "builtin, or a text file.")
@click.option("--tokens", type=click.IntRange(min=8), default=256, show_default=True,
              help="Calibration tokens the sensitivity is measured on.")
@click.option("--heldout-tokens", type=click.IntRange(min=8), default=256, show_default=True,
              help="Later tokens the written model is checked on in llama.cpp.")
@click.option("--types", default=",".join(TYPES), show_default=True,
              help="Candidate types per block, comma-separated.")
@click.option("--name", default=None, help="Name to register the model under (default: from the source and size).")
@click.option("--dry-run", is_flag=True, help="Measure and show the policy; write nothing.")
@click.option("--list", "list_", is_flag=True, help="List the compressed models registered.")
@click.option("--model", "model_flag", type=click.Path(path_type=Path), default=None,
              help="Same as MODEL (the source GGUF; default: the bundled SmolLM2-135M-Instruct).")
@json_option
def compress(model, size_mb, max_kl, prune_layers, calibration, tokens, heldout_tokens, types, name, dry_run,
             list_, model_flag, as_json):
    """Compress MODEL layer by layer (LUC): a quantisation type per block from its measured sensitivity.

    MODEL is a GGUF file, a registered name, or a Hugging Face llama/mistral/qwen2 directory (converted to
    an F16 GGUF once, then compressed from it). The budget is --size MB or --max-kl X; the result is
    registered for `--model NAME`."""
    from assistant import compression
    from assistant.errors import InvalidInput

    settings = settings_from(model=model or model_flag)
    if list_:
        models = compression.registered(settings)
        if as_json:
            print_json(models)
        elif not models:
            click.echo("No compressed models yet; `ember compress --size MB` makes one.")
        for m in [] if as_json else models:
            measured = m.get("measured") or {}
            click.echo(f"{m['name']}  {m['bytes'] / 1e6:.1f} MB  KL {measured.get('kl', '?')}  "
                       f"ppl {measured.get('perplexity', '?')}  from {Path(m['source'] or '?').name}")
        return
    chosen = tuple(t.strip().upper() for t in types.split(",") if t.strip())
    unknown = [t for t in chosen if t not in TYPES]
    if unknown or not chosen:
        raise InvalidInput(f"unknown type {', '.join(unknown) or '(none)'}; choose from {', '.join(TYPES)}")
    request = compression.Request(size_mb=size_mb, max_kl=max_kl, prune_layers=prune_layers,
                                  calibration=calibration, tokens=tokens, heldout_tokens=heldout_tokens,
                                  types=chosen, name=name, dry_run=dry_run)
    db = open_store(settings) if calibration in ("auto", "log") else None

    def progress(text: str) -> None:
        if not as_json:
            click.echo(text, err=True)

    document = compression.run(settings, request, db=db, progress=progress)
    if as_json:
        print_json(document)
        return
    policy = document["policy"]
    click.echo(f"Policy: {document['summary']}; predicted {policy['bytes'] / 1e6:.2f} MB, "
               f"summed KL {policy['predicted_kl']:.4g} nats/token on the calibration text.")
    click.echo(f"Reference: {document['reference']}.")
    if dry_run:
        click.echo("Dry run: nothing was written.")
        return
    m = document["measured"]
    click.echo(f"Wrote {document['path']} ({m['bytes'] / 1e6:.2f} MB): KL {m['kl']:.4g} nats/token to the source, "
               f"perplexity {m['perplexity']} (source {m['reference_perplexity']}) on {m['heldout_tokens']} "
               f"held-out tokens.")
    click.echo(f"Use it: ember chat --model {document['name']}")


COMMANDS = [compress]
