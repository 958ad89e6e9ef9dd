"""``python -m alltoall.bench``: the alltoall-bench command line (see
alltoall.cli.bench)."""

from alltoall.cli.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
