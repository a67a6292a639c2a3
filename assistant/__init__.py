"""Ember: an on-device personal assistant. This package is what the user touches."""
import os

# llama.cpp's CPU backend runs on OpenMP, whose threads meet at a barrier after every operation of the
# graph, hundreds of times a token. How long a waiting thread spins before it sleeps decides both the
# speed when Ember has the cores and what happens when something else wants them. Measured on 2 cores
# (whole bare decodes of 128 tokens, 2026-11-30; README, "Every CPU"):
#   GNU OpenMP's default (spin ~300,000 rounds): 155-171 tok/s alone, ~1 tok/s with two decodes at once;
#   sleeping at once (OMP_WAIT_POLICY=PASSIVE, Ember's policy until then): 44 tok/s alone (every wait
#   pays a wake-up), 90 tok/s each with two at once;
#   GOMP_SPINCOUNT=300: 150-158 tok/s alone, 57 tok/s each with two at once, 61 beside a busy process.
# So GNU OpenMP (GCC's builds: Linux, the Jetson) spins 300 rounds and then sleeps; another OpenMP
# runtime (LLVM's libomp ignores GOMP_SPINCOUNT) sleeps at once as before. A user's own setting of
# either wins. Both must be set before llama.cpp is loaded.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ["GOMP_SPINCOUNT"] = "300"
__version__ = "0.1.0"
