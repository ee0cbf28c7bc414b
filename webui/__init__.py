"""LoRA Deck: a local web app to run LLMs and manage, train and serve LoRA adapters.

`python -m webui SUBCOMMAND` is the command line (see webui/cli.py); `app.py` is `serve`.
"""
__version__ = "0.1.0"
