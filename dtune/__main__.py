"""`python -m dtune [overrides]` trains (dtune/app.py, the Hydra app over conf/config.yaml);
`python -m dtune TOOL ...` runs a tool as the `dtune` command does (dtune/cli.py)."""
import sys

from dtune import app, cli


def main() -> None:
    if sys.argv[1:2] and sys.argv[1] in cli.TOOLS:
        cli.main(sys.argv[1:])
    else:
        app.main(cli.TOOLS)


if __name__ == "__main__":
    main()
