"""``python -m epo_cli.bench``."""

from epo_cli.bench.cli import main

if __name__ == "__main__":
    main()
