"""llama-server's adapter dialect: `GET /lora-adapters` lists the adapters folder as `[{id, path, scale}]`
(ids stable while the folder is unchanged; scale = the weight in the app's active stack), and
`POST /lora-adapters [{id, scale}]` makes that the app's active stack — the same stack the web UI shows and
sets. A request's own `lora: [{id, scale}]` field on /v1 completions is read by webui/api/service.py.
Beyond llama-server (which cannot merge): `POST /lora-adapters/merge` and `/lora-adapters/unmerge` merge the
active stack into the base weights and back, as the Model tab's buttons do, for scripts and the soak test.
"""
from __future__ import annotations

from starlette.concurrency import run_in_threadpool

from webui.api.schemas import LoraScale
from webui.api.service import Service


class LlamaServer:
    def __init__(self, service: Service):
        self.service = service

    def list(self) -> list[dict]:
        return self.service.lora_table()

    async def set(self, req: list[LoraScale]) -> dict:
        stack = self.service.lora_stack(req)
        await run_in_threadpool(self.service.engine.set_adapters, stack)
        return {"success": True}

    async def merge(self) -> dict:
        await run_in_threadpool(self.service.engine.merge_adapters)
        return self._state()

    async def unmerge(self) -> dict:
        await run_in_threadpool(self.service.engine.unmerge_adapters)
        return self._state()

    def _state(self) -> dict:
        engine = self.service.engine
        return {"success": True, "merged": engine.merged, "adapters": engine.active_adapters}
