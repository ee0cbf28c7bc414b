"""Download benchmark: our `download()` (webui/hub) vs huggingface_hub's own `snapshot_download`, both
fetching the same repo (a 64 MB weights file plus small files) from the same local fake hub
(webui/testing/fake_hub.py) into fresh folders, alternated.

- download_vs_hf_hub: throughput in MB/s (higher is better).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from bench.common import Row, side_by_side

ROWS = ("download_vs_hf_hub",)


def run(models_dir: Path, quick: bool = False, only: set | None = None) -> list[Row]:
    from webui.testing.fake_hub import FakeHub

    size = (16 if quick else 64) * 1024 * 1024
    # One download takes well under a second, so a single slow one (another process on the cores, the OS
    # flushing the written files) moves the median of two by 20% or more (measured): take more, still cheap.
    reps = 5 if quick else 6
    hub = FakeHub()
    payload = os.urandom(size)
    hub.add("bench/model", {"config.json": b'{"model_type": "llama"}', "tokenizer.json": b"{}",
                            "model.safetensors": payload})
    previous = {k: os.environ.get(k) for k in ("HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS")}
    os.environ.update(HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_PROGRESS_BARS="1")
    import huggingface_hub.constants as hc

    hc.HF_HUB_OFFLINE, hc.ENDPOINT = False, hub.url  # read at import time; this process imported it already
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            counter = iter(range(1000))
            total_mb = (size + 40) / 1e6

            def ours():
                from webui.hub.fetch import download

                out = tmp / f"ours{next(counter)}"
                start = time.perf_counter()
                download("bench/model", output=out, model_dir=tmp, lora_dir=tmp)
                seconds = time.perf_counter() - start
                shutil.rmtree(out)
                return total_mb / seconds

            def reference():
                from huggingface_hub import snapshot_download

                out = tmp / f"ref{next(counter)}"
                start = time.perf_counter()
                snapshot_download("bench/model", local_dir=str(out), endpoint=hub.url,
                                  cache_dir=str(tmp / f"cache{next(counter)}"))
                seconds = time.perf_counter() - start
                shutil.rmtree(out)
                return total_mb / seconds

            # One untimed download each first: what a process pays once (huggingface_hub's first request also
            # fetches its agent registry from the endpoint; imports, the HTTP session) is not throughput, and
            # would otherwise land on whichever side happens to go first.
            ours()
            reference()
            ours_mbs, ref_mbs = side_by_side(ours, reference, reps)
    finally:
        hub.stop()
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return [Row(ROWS[0], ours_mbs, ref_mbs, "MB/s", True,
                f"{size // 2**20} MB safetensors + 2 small files, local fake hub, sha256 verified by ours")]
