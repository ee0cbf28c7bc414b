"""Getting models and adapters onto disk: `download` (the Hugging Face hub through huggingface_hub, with
resume, retries and sha256 checks; also `s3://` and local paths) and `fetch_adapter` (LoRAX-style
`adapter_id` + `adapter_source` = hub | local | s3, for the engine and the API). fetch.py chooses the
source; download.py (hub), sources.py (S3, local) and files.py (what to fetch, where) sit below it. No UI
code here."""
from webui.hub.download import check
from webui.hub.fetch import download, fetch_adapter

__all__ = ["check", "download", "fetch_adapter"]
