"""`python -m csn ...` (and `torchrun -m csn ...`) runs the CLI."""

from csn.cli import main

main()
