"""``python -m wsld``: the same command line as the ``wsld`` script."""

from wsld.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
