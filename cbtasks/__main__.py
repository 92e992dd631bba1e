"""``python -m cbtasks``: the operator's command line, as the ``cbtasks`` script."""

from cbtasks.ops.cli import main

if __name__ == "__main__":
    main(prog_name="cbtasks")
