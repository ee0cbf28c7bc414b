"""Library start-up noise, turned down once for the commands that load models (the app, training runs, exports),
so the first lines a user reads are ours. Each line names what it silences and why it is noise here; anything else
a library warns about still shows. Not for the light commands (`loras list`, `download`): importing GPTQModel's
logger prints an empty line to stdout, which their output must not start with.
"""
from __future__ import annotations

import logging
import warnings


def quiet_libraries() -> None:
    # GPTQModel (imported by PEFT's layer dispatch as soon as an adapter is applied, on any loader) prints a banner,
    # a free-threading advice and the environment variables it sets, through its own LogBar logger; its errors stay.
    try:
        from logbar import LogBar

        LogBar.shared().setLevel("ERROR")
    except Exception:  # noqa: BLE001 (not installed, or another version: its noise is all that is lost)
        pass
    # torch: "No CUDA runtime is found" on every CPU machine, and "<enum ...> is an Enum subclass and is now
    # natively supported by torch.compile" for the enums libraries register with its pytree at import
    for name in ("torch.utils.cpp_extension", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # transformers 5 deprecates the name PEFT still calls when it wraps a model (every adapter load)
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # ... and the names TRL's preference trainers call around their reference pass (every step of a DPO/KTO run)
    warnings.filterwarnings("ignore", message=r"`gradient_checkpointing_(enable|disable)` is deprecated",
                            category=FutureWarning)
