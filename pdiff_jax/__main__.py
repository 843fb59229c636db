"""`python -m pdiff_jax` is the `pdiff` command."""
from pdiff_jax.cli import run

run()
