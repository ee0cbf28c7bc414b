"""LoRA Deck: a local web app to run LLMs and manage, train and serve LoRA adapters.

`python -m webui SUBCOMMAND` is the command line (see webui/cli.py); `app.py` is `serve`.
"""
import logging

__version__ = "0.1.0"


class _LibraryNoise(logging.Filter):
    """Drops torch's deprecation notice for torchao registering its Enums with pytree (two lines at every start
    of the app and of every training run, about code that is neither ours nor the user's); every other torch
    warning still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "register_constant() on Enum subclasses is deprecated" not in record.getMessage()


logging.getLogger("torch.utils._pytree").addFilter(_LibraryNoise())
