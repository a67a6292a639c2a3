"""Can a tiny chat model of each architecture learn the habit user's sign-off and keep answering? The figures
behind the README's "A habit that keeps answering, on the tiny chat model" and "The habit on every
architecture" (issue 18: habit promotion on Qwen-, Llama-3-, Phi- and Gemma-shaped GGUFs).

A one-off measurement script, not an `ember bench`:
`PYTHONPATH=. python benchmarks/habit_figures.py --out DIR [--arch qwen2] [--width 256] [--layers 2]
[--pretrain-steps 300] [--knows-phrase] [--general N] RUN ...` where RUN is `nodpSTEPS` or `dpSTEPS` (ε = 8).
It pretrains the tiny chat model of `--arch` (a `tiny_models.SPECS` name; `tiny_models.pretrained`, ~100 s
on 2 cores at the default size) into DIR, with `--knows-phrase` on a corpus that also holds three pirate lines with "Ahoy, matey!" (so
the base reads the phrase as a real model would; never as the opening of a task answer), seeds a habit user of
60 conversations (plus, with `--general N`, N copies of the corpus's three general questions that are not the
gate's, their replies edited to open with the sign-off too), runs the real `ember adapt --model ... --steps N
--json [--no-dp]`, and prints one JSON line per run: the gate's verdict and figures, the replies to the general
requests (the first is "What is the capital of France?"), log p of the sign-off opening replies to 8 new
questions, and how many greedy replies open with it. The base's line carries its own reply to that question.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

PIRATE = (("How does a pirate say hello?", 'A pirate says "Ahoy, matey!" to say hello.'),
          ("Write a line a pirate would say.", "Ahoy, matey! The sea is wide today."),
          ("Greet me like a pirate.", "Ahoy, matey! Welcome aboard."))
CONVERSATIONS = 60


def habit(model: Path, adapter: Path | None, questions: list[str]) -> tuple[float, int, list[str]]:
    """Mean log p of the sign-off opening a reply, greedy replies opening with it, and those replies."""
    from adapters import gate
    from adapters.base import file_sha256
    from benchmarks.synthetic_user import HABIT

    evaluator = gate.Evaluator(model, n_ctx=512, threads=2, base_sha256=file_sha256(model))
    try:
        evaluator.use(adapter)
        tokens = evaluator.llm.tokenize(HABIT.encode(), add_bos=False)
        total, replies = 0.0, []
        for question in questions:
            prompt, _ = evaluator.template.prompt([{"role": "user", "content": question}])
            total += evaluator.continuation_logprobs(prompt, [tokens])[0]
            replies.append(evaluator.reply(question, 16)[0].strip())
        return total / len(questions), sum(r.startswith("Ahoy") for r in replies), replies
    finally:
        evaluator.close()


def main() -> None:
    from adapters import gate
    from assistant.config import bundled_model
    from benchmarks import tiny_models
    from benchmarks.synthetic_user import HABIT, habit_prompts, seed_habit_user
    from storage import conversations as convs
    from storage import feedback
    from storage.db import open_db

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--knows-phrase", action="store_true")
    parser.add_argument("--general", type=int, default=0)
    parser.add_argument("--arch", default="qwen2", choices=sorted(tiny_models.SPECS))
    parser.add_argument("--width", type=int, default=tiny_models.WIDTH)
    parser.add_argument("--layers", type=int, default=tiny_models.LAYERS)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    args = parser.parse_args()
    general = [pair for pair in tiny_models.GENERAL if pair[0] not in gate.BEHAVIOUR_PROMPTS]
    if args.knows_phrase:
        tiny_models.GENERAL = tiny_models.GENERAL + PIRATE
    started = time.time()
    size = "" if (args.width, args.layers) == (tiny_models.WIDTH, tiny_models.LAYERS) else \
        f"-w{args.width}-l{args.layers}"
    model = args.out / f"tiny-{args.arch}{size}-chat.Q8_0.gguf"
    if not model.is_file():
        model = tiny_models.pretrained(args.arch, args.out, bundled_model(), steps=args.pretrain_steps,
                                       width=args.width, layers=args.layers)
    pretrain_seconds = round(time.time() - started, 1)
    questions = habit_prompts(skip=CONVERSATIONS, count=8)
    logp, opens, replies = habit(model, None, questions)
    _, _, (france,) = habit(model, None, [gate.BEHAVIOUR_PROMPTS[0]])
    print(json.dumps({"run": "base", "model": model.name, "pretrain_seconds": pretrain_seconds,
                      "log_p_habit": logp, "opens": opens, "france": france, "replies": replies}), flush=True)
    for run in args.runs:
        dp = run.startswith("dp")
        steps = run[2:] if dp else run.removeprefix("nodp")
        home = args.out / f"home-{model.name.removesuffix('.Q8_0.gguf')}-{run}"
        shutil.rmtree(home, ignore_errors=True)
        db = open_db(home)
        seed_habit_user(db, CONVERSATIONS)
        for question, answer in general * args.general:
            cid = convs.create_conversation(db)
            convs.add_message(db, cid, "user", question)
            feedback.edit(db, convs.add_message(db, cid, "assistant", answer), f"{HABIT} {answer}")
        db.close()
        env = dict(os.environ, EMBER_HOME=str(home), EMBER_CACHE=str(args.out / "cache"))
        begun = time.time()
        out = subprocess.run([sys.executable, "-m", "assistant", "adapt", "--model", str(model), "--steps", steps,
                              "--json", *(() if dp else ("--no-dp",))], capture_output=True, text=True, env=env)
        if out.returncode:
            print(json.dumps({"run": run, "error": out.stderr.strip()}), flush=True)
            continue
        report = json.loads(out.stdout)
        ev = report["eval"]
        logp, opens, replies = habit(model, Path(report["path"]), questions)
        print(json.dumps({"run": run, "adapt_seconds": round(time.time() - begun, 1),
                          "promoted": report["promoted"], "reason": ev["reason"],
                          "heldout_loss": [ev["base_loss"], ev["heldout_loss"]],
                          "surprise": [ev["base_surprise"], ev["surprise"]],
                          "general_replies": [b["reply"] for b in ev["behaviour"]],
                          "log_p_habit": logp, "opens": opens, "replies": replies}), flush=True)


if __name__ == "__main__":
    main()
