"""`python -m doppel.cli ...`: the same as the `doppel` console script."""

from doppel.cli import main

if __name__ == "__main__":  # not when a module walk (the image import test) merely imports it
    main()
