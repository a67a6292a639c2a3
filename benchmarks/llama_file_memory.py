"""How llama.cpp's resident memory follows the GGUF file's size: the figure the daemon's memory check moves
zeroth-order training in llama.cpp and the router's refit by (assistant/daemon.py `MB_PER_FILE_MB`).

One tiny Llama-3-shaped model (benchmarks/tiny_models.py, width 1024, 4 layers) written as F32, F16 and Q8_0
(the same weights, files 4x apart), and the bundled SmolLM2; each loaded in a fresh process by llama.cpp
(n_ctx 512, 2 threads) which then evaluates 64 tokens; the process's RSS after that. A one-off measurement
script, not an `ember bench`: `PYTHONPATH=. python benchmarks/llama_file_memory.py` (~20 s on 2 cores).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r'''
import json, sys
import psutil
from adapters.llama_log import quiet_llama
llm = quiet_llama(model_path=sys.argv[1], n_ctx=512, n_threads=2, n_threads_batch=2, seed=0)
llm.eval(llm.tokenize(b"The quick brown fox jumps over the lazy dog. " * 6)[:64])
print(json.dumps({"rss_mb": psutil.Process().memory_info().rss / 2 ** 20}))
'''


def main() -> None:
    from assistant.config import bundled_model
    from benchmarks import tiny_models

    root = Path(__file__).resolve().parent.parent
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        files = tiny_models.build("llama3", Path(folder), bundled_model(), quants=("Q8_0", "F16"), width=1024, layers=4)
        for name, path in [*files.items(), ("SmolLM2 Q4_1", bundled_model())]:
            out = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, check=True,
                                 env=dict(os.environ, PYTHONPATH=str(root)))
            rows.append({"file": name, "file_mb": round(path.stat().st_size / 2 ** 20, 1),
                         "rss_mb": round(json.loads(out.stdout)["rss_mb"], 1)})
    tiny = [r for r in rows if r["file"] != "SmolLM2 Q4_1"]
    lo, hi = min(tiny, key=lambda r: r["file_mb"]), max(tiny, key=lambda r: r["file_mb"])
    slope = (hi["rss_mb"] - lo["rss_mb"]) / (hi["file_mb"] - lo["file_mb"])
    print(json.dumps({"rows": rows, "mb_rss_per_mb_of_file": round(slope, 3)}, indent=1))


if __name__ == "__main__":
    main()
