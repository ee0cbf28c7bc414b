"""OpenAI's dialect under /v1: models, chat completions, text completions (streamed as SSE or not) and
adapters with their compatibility reports. Beyond the basics: `n` choices, a list of prompts in one
completions call (all batched together), `logprobs` / `top_logprobs` on chat and the legacy `logprobs: K`
on completions, `echo` with the prompt's own token logprobs (`max_tokens: 0` scores the prompt alone, as
lm-eval's loglikelihood requests do), and `stream_options.include_usage`. A request names its adapters
in any of the forms webui/api/service.py understands; vLLM-style model cards list each adapter with its
`parent` and `root`.
"""
from __future__ import annotations

import json
import time
import uuid

from fastapi.responses import StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from webui.api import schemas as s
from webui.api.service import Output, Scored, Service
from webui.errors import BadInput, LoraDeckError

# One request's choices (prompts × n), each a job in the scheduler: a bound, so that one small body cannot
# queue thousands of generations (lm-eval's batches are far below it).
MAX_CHOICES = 128


def _top(entry) -> dict[str, float] | None:
    return None if entry is None else {text: lp for _, text, lp in entry}


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


class OpenAI:
    def __init__(self, service: Service):
        self.service = service
        self.engine = service.engine

    # -- listings ----------------------------------------------------------------------------------------
    def models(self) -> s.ModelList:
        base = self.service.base_name()
        now = int(time.time())
        cards = [s.ModelCard(id=base, created=now, root=base)]
        cards += [s.ModelCard(id=n, created=now, parent=base, kind="adapter", root=self.service.adapter_root(n))
                  for n in self.service.adapter_names()]
        return s.ModelList(data=cards)

    def adapters(self) -> dict:
        out = []
        for name in self.engine.list_adapters():
            try:
                out.append(self.engine.adapter_report(name).to_dict())
            except LoraDeckError as e:
                out.append({"adapter": name, "verdict": "incompatible", "reasons": [str(e)]})
        return {"object": "list", "data": out}

    # -- completions -------------------------------------------------------------------------------------
    async def chat(self, req: s.ChatCompletionRequest):
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        top_k = (req.top_logprobs or 0) if req.logprobs else None
        return await self._complete(req, None, chat=True, top_k=top_k, echo=False, messages=messages)

    async def completions(self, req: s.CompletionRequest):
        if req.max_tokens == 0 and not req.echo:
            raise BadInput("max_tokens: 0 asks for nothing unless echo is true", param="max_tokens")
        return await self._complete(req, req.prompts(), chat=False, top_k=req.logprobs, echo=req.echo)

    async def _complete(self, req, prompts: list[str] | None, chat: bool, top_k: int | None, echo: bool,
                        messages: list[dict] | None = None):
        """`top_k`: None = no logprobs; 0 = the chosen tokens' only; k = also the k most likely. A chat request
        gives `messages`; the extensions' input hooks and the chat template make its prompt."""
        service = self.service
        if prompts is not None and len(prompts) * req.n > MAX_CHOICES:
            raise BadInput(f"{len(prompts)} prompts × n={req.n} asks for more than {MAX_CHOICES} choices in one "
                           "request; split it", param="prompt")
        if req.compare is not None:
            if req.n > 1:
                raise BadInput("compare answers with one choice per target: n must be 1", param="n")
            if req.stream:
                raise BadInput("compare answers with one choice per target and cannot be streamed", param="stream")
            if prompts is not None and len(prompts) > 1:
                raise BadInput("compare answers one prompt: send the prompts in separate requests", param="prompt")
            targets = await run_in_threadpool(service.compare_targets, req.compare, req.adapter_fields())
        else:
            targets = [(None, await run_in_threadpool(lambda: service.stack(**req.adapter_fields())))]
        sampling = req.sampling()
        generate = sampling.get("max_new_tokens") != 0
        if not generate:
            sampling.pop("max_new_tokens")
        params = service.params(sampling)
        prompts, params, state = await run_in_threadpool(
            lambda: service.apply_input(params, messages=messages, prompts=prompts))
        targets = [(label, await run_in_threadpool(service.extension_stack, stack, state)) for label, stack in targets]
        stack = targets[0][1]
        if not generate:
            state = None  # nothing generated: no reply for output_modifier
        new_tokens = params.max_new_tokens if generate else 0
        counts = [await run_in_threadpool(service.check_context, p, new_tokens) for p in prompts]
        model = req.model or service.base_name()
        rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            if top_k is not None or echo or len(prompts) * req.n > 1:
                raise BadInput("stream: only one choice without logprobs or echo can be streamed", param="stream")
            handle = service.submit(prompts, params, stack)[0]
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._sse(handle, rid, created, model, chat, counts[0] if usage else None),
                                     media_type="text/event-stream")
        if req.compare is not None:  # one choice per target, all queued before any is awaited: one batch
            handles = service.engine.fan_out(prompts[0], params, [t[1] for t in targets]) if generate else []
        else:
            handles = service.submit(prompts, params, stack, req.n) if generate else []
        if generate:
            outputs = [await service.finish(h, state) for h in handles]
        else:
            outputs = [Output("", "length", 0) for _ in range(max(len(prompts) * req.n, len(targets)))]
        choices = []
        for index, out in enumerate(outputs):
            prompt = prompts[index // req.n] if req.compare is None else prompts[0]
            label, target = targets[index] if req.compare is not None else (None, stack)
            if top_k is not None or echo:
                out.prompt, out.reply = await run_in_threadpool(service.scores, prompt, out.text, target, top_k or 0,
                                                                out.ids)
            choice = self._chat_choice(index, out) if chat else self._text_choice(index, out, prompt if echo else None,
                                                                                  top_k)
            if label is not None:
                choice = (s.ComparedChatChoice if chat else s.ComparedCompletionChoice)(**choice.model_dump(),
                                                                                         model=label)
            choices.append(choice)
        completion_tokens = sum(o.completion_tokens for o in outputs)
        prompt_tokens = sum(counts) * (len(targets) if req.compare is not None else req.n)
        usage = s.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                        total_tokens=prompt_tokens + completion_tokens)
        body = s.ChatCompletion if chat else s.Completion
        return body(id=rid, created=created, model=model, usage=usage, choices=choices)

    def _chat_choice(self, index: int, out: Output) -> s.ChatChoice:
        logprobs = None
        if out.reply is not None:
            content = [s.TokenLogprob(token=t, logprob=lp, bytes=_bytes(t), top_logprobs=[
                s.TopLogprob(token=a, logprob=alp, bytes=_bytes(a)) for _, a, alp in (top or [])])
                for t, lp, top in zip(out.reply.texts, out.reply.logprobs,
                                      out.reply.top or [None] * len(out.reply.ids))]
            logprobs = s.ChoiceLogprobs(content=content)
        return s.ChatChoice(index=index, message=s.ChatChoiceMessage(content=out.text), finish_reason=out.finish_reason,
                            logprobs=logprobs)

    def _text_choice(self, index: int, out: Output, echoed: str | None, top_k: int | None) -> s.CompletionChoice:
        text = (echoed or "") + out.text
        logprobs = None
        if top_k is not None:
            parts: list[Scored] = ([out.prompt] if echoed is not None else []) + [out.reply]
            tokens = [t for p in parts for t in p.texts]
            offsets, at = [], 0
            for t in tokens:  # where each token's text starts in the returned text
                found = text.find(t, at) if t else -1
                offsets.append(found if found >= 0 else at)
                at = offsets[-1] + len(t) if found >= 0 else at
            logprobs = s.CompletionLogprobs(
                tokens=tokens, token_logprobs=[lp for p in parts for lp in p.logprobs],
                top_logprobs=[_top(t) for p in parts for t in (p.top or [None] * len(p.ids))], text_offset=offsets)
        return s.CompletionChoice(index=index, text=text, finish_reason=out.finish_reason, logprobs=logprobs)

    async def _sse(self, handle, rid: str, created: int, model: str, chat: bool, prompt_tokens: int | None):
        def chunk(text=None, reason=None, first=False) -> str:
            if chat:
                body = s.ChatCompletionChunk(id=rid, created=created, model=model, choices=[s.ChunkChoice(
                    delta=s.ChunkDelta(role="assistant" if first else None, content=text), finish_reason=reason)])
            else:
                body = s.Completion(id=rid, created=created, model=model,
                                    choices=[s.CompletionChoice(text=text or "", finish_reason=reason)])
            return f"data: {body.model_dump_json(exclude_none=True)}\n\n"

        try:
            if chat:
                yield chunk(first=True)
            async for delta in iterate_in_threadpool(iter(handle)):
                yield chunk(delta)
            yield chunk(reason=handle.finish_reason)
            if prompt_tokens is not None:  # stream_options.include_usage: one last chunk, no choices
                done = handle.completion_tokens or 0
                usage = s.Usage(prompt_tokens=prompt_tokens, completion_tokens=done, total_tokens=prompt_tokens + done)
                body = (s.ChatCompletionChunk if chat else s.Completion)(id=rid, created=created, model=model,
                                                                          choices=[], usage=usage)
                yield f"data: {body.model_dump_json(exclude_none=True)}\n\n"
        except Exception as e:  # the status line is sent already: report in the stream, as OpenAI does
            yield f"data: {json.dumps({'error': {'message': f'generation failed: {e}', 'type': 'server_error'}})}\n\n"
        finally:
            handle.close()  # a client that went away frees its slot
        yield "data: [DONE]\n\n"
