import os

# llama.cpp's CPU backend runs on OpenMP, whose threads spin while they wait for work. When anything
# else wants the cores (the chat repainting, a second Ember process, the daemon beside the chat), two
# spinning threads on two cores starve everyone: measured here, a decode fell from 5 tok/s to 0.1 tok/s
# with one other busy process. PASSIVE makes them sleep; it must be set before llama.cpp is loaded.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
