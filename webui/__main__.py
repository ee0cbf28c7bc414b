"""Entry point of `python -m webui SUBCOMMAND`; see webui/cli.py."""
import sys

from webui.cli import main

sys.exit(main())
