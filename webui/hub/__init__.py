"""Getting models and adapters onto disk: `download` (the Hugging Face hub through huggingface_hub, with
resume, retries and sha256 checks; also `s3://` and local paths) and `fetch_adapter` (LoRAX-style
`adapter_id` + `adapter_source` = hub | local | s3, for the engine and the API). No UI code here.
"""
from webui.hub.download import DownloadError, check, download
from webui.hub.sources import fetch_adapter

__all__ = ["DownloadError", "check", "download", "fetch_adapter"]
