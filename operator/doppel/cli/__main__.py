"""`python -m doppel.cli ...`: the same as the `doppel` console script."""

from doppel.cli import main

main()
