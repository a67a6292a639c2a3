"""`python -m assistant` is `ember`."""
from assistant.cli import main

main(prog_name="ember")
