"""``python -m kvcompile``: the same command line as the ``kvcompile`` script."""

from kvcompile.cli import main

if __name__ == "__main__":
    main(prog_name="kvcompile")
