"""What every API dialect shares (OpenAI, LoRAX, vLLM, llama-server, SGLang): the API key, which adapters a
request asks for, its sampling settings and context check, running it through Engine.submit (so
requests of every dialect batch together, each with its own adapters), and the token log-probabilities
some requests want. A dialect module only maps its request and response shapes onto these.

Log-probabilities come from scoring after generation (`Engine.score` on the prompt and the reply's
generated token ids, under the same adapters): one extra forward pass, and the streaming, batched
generation path stays as it is. Where the ids are not known (a reply cut at a stop string) the reply's text
is tokenized again, which gives the same tokens for ordinary text.
"""
from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from webui.adapters.files import locate_adapter
from webui.adapters.peft_stack import COMBINATIONS
from webui.engine import UI_STACK, AdapterStack, Engine, JobHandle, Stack, check_weights
from webui.errors import BadInput, LoraDeckError, NoModelLoaded, NotFound, Unauthorized, first_line
from webui.extensions import Extensions
from webui.hub.fetch import fetch_adapter
from webui.options.config import GenerationParams
from webui.training.live import is_live

MERGE_CACHE = ".merged"  # blends made for LoRAX `merged_adapters` requests live in loras/.merged/ (hidden)


@dataclass
class Scored:
    """Tokens with their log-probabilities: `logprobs[i]` is None for a first prompt token (no context)."""

    ids: list[int]
    texts: list[str]
    logprobs: list[float | None]
    top: list[list[tuple[int, str, float]] | None] = field(default_factory=list)  # (id, text, logprob) each


@dataclass
class Output:
    """One finished choice: the reply, why it ended, its token count; `prompt`/`reply` scores when asked."""

    text: str
    finish_reason: str
    completion_tokens: int
    ids: list[int] | None = None  # the generated token ids (ending with the EOS token it stopped on), when known
    prompt: Scored | None = None
    reply: Scored | None = None


class Service:
    def __init__(self, engine: Engine, api_key: str = "", extensions: Extensions | None = None):
        self.engine = engine
        self.api_key = api_key
        self.extensions = extensions  # the same loaded extensions as the web UI's Chat tab (None: none)
        # adapters loaded at run time under a name of the client's choosing (vLLM's load_lora_adapter)
        self.runtime: dict[str, Path] = {}

    # -- access ------------------------------------------------------------------------------------------
    def check_key(self, request: Request) -> None:
        if not self.api_key:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise Unauthorized("invalid or missing API key (send Authorization: Bearer KEY)", code="invalid_api_key")

    def base_name(self) -> str:
        info = self.engine.loaded
        if info is None:
            raise NoModelLoaded("no model is loaded")
        return info.name

    def adapter_names(self) -> list[str]:
        """The adapters a request may name: the adapters folder, the live checkpoints of running training runs,
        then those loaded at run time (a copy of the runtime names: another request may load or unload one
        meanwhile)."""
        folder = self.engine.adapter_choices()
        return [*folder, *(n for n in list(self.runtime) if n not in folder)]

    def adapter_root(self, name: str) -> str:
        """The folder an adapter name stands for (GET /v1/models' `root`)."""
        if name in self.runtime:
            return str(self.runtime[name])
        try:
            return str(self.engine.adapter_path(name))
        except LoraDeckError:  # a checkpoint the run has just rotated away
            return name

    def _known(self, name: str) -> bool:
        """A name a request may use: listed, or a live checkpoint name (`RUN@latest` also names a finished run's
        adapter, which is no longer listed as live; resolving it says what is wrong with a bad one)."""
        return is_live(name) or name in self.adapter_names()

    # -- which adapters ------------------------------------------------------------------------------------
    def stack(self, *, model: str | None = None, adapters: dict | None = None, adapter_id: str | None = None,
              adapter_source: str | None = None, lora: list | None = None, merged: dict | None = None) -> Stack:
        """The adapter stack a request asks for, in any dialect's words; UI_STACK = the app's active stack.

        `adapters` {name: weight} (ours); `lora` [{id, scale}] (llama-server: ids index GET /lora-adapters);
        `adapter_id` + `adapter_source` (LoRAX); `merged` (LoRAX merged_adapters); `model`: "" or the base's
        name = the plain base, an adapter name (vLLM, OpenAI), or "BASE:ADAPTER" (SGLang)."""
        base = self.base_name()
        given = [k for k, v in (("adapters", adapters), ("lora", lora), ("adapter_id", adapter_id),
                                ("merged_adapters", merged)) if v is not None]
        if len(given) > 1:
            raise BadInput(f"give one of {', '.join(given)}, not several", param=given[1])
        if given and model not in (None, "", base):
            raise BadInput(f"with `{given[0]}`, `model` must be \"\" or the base model's name", param="model")
        if adapters is not None:
            stack = dict(adapters)
        elif lora is not None:
            stack = self.lora_stack(lora)
        elif adapter_id:
            stack = {Path(fetch_adapter(adapter_id, adapter_source or "hub", self.engine.loras_dir)).name: 1.0}
        elif merged is not None:
            stack = self._merged(merged)
        elif model is None:
            return UI_STACK  # no model named: what the app is using (the adapters active in the UI / --lora)
        elif model in ("", base):
            return AdapterStack()
        elif self._known(model):
            stack = {model: 1.0}
        elif model.startswith(base + ":") and self._known(model[len(base) + 1:]):
            stack = {model[len(base) + 1:]: 1.0}  # SGLang's BASE:ADAPTER
        else:
            raise NotFound(f"model {model!r} not found: use {base!r}, an adapter of GET /v1/models or "
                           f"{base}:ADAPTER", code="model_not_found", param="model")
        stack = AdapterStack(stack)  # its weights checked
        self.engine.prepare_adapters(list(stack), self.runtime)
        return stack

    def compare_targets(self, targets: list, fields: dict) -> list[tuple[str, Stack]]:
        """(label, stack) for each target of a fan-out (`compare`): "" or the base's name = the plain base, an
        adapter name (or BASE:ADAPTER), or {"adapters": [{name, weight}]}. The request's own adapter fields
        cannot also be given: the targets name every stack."""
        given = [k for k in ("adapters", "lora", "adapter_id") if fields.get(k) is not None]
        if given or fields.get("model") not in (None, "", self.base_name()):
            raise BadInput(f"compare names each target's adapters; give `model` as \"\" or the base's name and no "
                           f"{given[0] if given else 'adapter in model'}", param=given[0] if given else "model")
        out = []
        for target in targets:
            if isinstance(target, str):
                out.append((target or self.base_name(), self.stack(model=target)))
            else:
                weights = {a.name: a.weight for a in target.adapters}
                label = "+".join(f"{n}*{w:g}" for n, w in weights.items()) or self.base_name()
                out.append((label, self.stack(adapters=weights)))
        return out

    def lora_table(self) -> list[dict]:
        """llama-server's adapter list: [{id, path, scale}] over the adapters folder (ids stable while the folder
        is unchanged), scale = the adapter's weight in the app's active stack (0 when inactive)."""
        active = self.engine.active_adapters
        return [{"id": i, "path": str(self.engine.loras_dir / name), "scale": active.get(name, 0.0)}
                for i, name in enumerate(self.engine.list_adapters())]

    def lora_stack(self, lora: list) -> dict:
        names = self.engine.list_adapters()
        stack = {}
        for entry in lora:
            if not 0 <= entry.id < len(names):
                raise NotFound(f"lora id {entry.id} does not exist: GET /lora-adapters lists ids 0..{len(names) - 1}",
                               param="lora")
            if entry.scale:
                stack[names[entry.id]] = float(entry.scale)
        return stack

    def _merged(self, merged) -> dict:
        """LoRAX's merged_adapters: `linear` is the weighted stack itself (the same sum of the adapters'
        updates, computed unmerged); ties / dare_* are PEFT's add_weighted_adapter, saved once per set of
        parameters under loras/.merged/ and reused after."""
        if len(merged.ids) != len(merged.weights) or not merged.ids:
            raise BadInput("merged_adapters: ids and weights must be non-empty and of the same length",
                           param="merged_adapters")
        names = [Path(locate_adapter(i, self.engine.loras_dir)).name for i in merged.ids]
        weights = dict(zip(names, merged.weights))
        strategy = merged.merge_strategy or "linear"
        if strategy == "linear":
            return weights
        if strategy not in COMBINATIONS:
            raise BadInput(f"merge_strategy {strategy!r} is not one of: linear, ties, dare_linear, dare_ties",
                           param="merge_strategy")
        key = "-".join([strategy, f"density{merged.density:g}", merged.majority_sign_method or "total",
                        *(f"{n}x{w:g}" for n, w in sorted(weights.items()))])
        name = re.sub(r"[^A-Za-z0-9_-]", "_", key)[:120]  # PEFT refuses '.' in adapter names
        folder = self.engine.loras_dir / MERGE_CACHE
        if not (folder / name).is_dir():
            check_weights(weights)
            self.engine.blend_adapters(weights, name, strategy, merged.density, out_dir=folder)
        self.runtime[name] = folder / name
        return {name: 1.0}

    # -- settings ----------------------------------------------------------------------------------------
    def params(self, sampling: dict) -> GenerationParams:
        try:
            params = GenerationParams.from_dict(sampling)
        except (TypeError, ValueError) as e:  # BadInput is a ValueError; others: a value of the wrong type
            raise BadInput(first_line(e), param=getattr(e, "param", None)) from None
        self.engine.prepare_response_format(params.response_format)  # a schema it cannot enforce: 400 now
        return params

    def check_context(self, prompt: str, new_tokens: int) -> int:
        """The prompt's token count; a prompt plus `new_tokens` longer than the model's context is refused."""
        prompt_tokens = self.engine.count_tokens(prompt)
        limit = self.engine.loaded.context_length
        if limit and prompt_tokens + new_tokens > limit:
            raise BadInput(f"this request needs {prompt_tokens} prompt + {new_tokens} new tokens, "
                           f"more than the model's context of {limit}; shorten the prompt or lower max_tokens",
                           code="context_length_exceeded", param="max_tokens")
        return prompt_tokens

    # -- extensions --------------------------------------------------------------------------------------
    def apply_input(self, params: GenerationParams, *, messages: list[dict] | None = None,
                    prompts: list[str] | None = None) -> tuple[list[str], GenerationParams, dict | None]:
        """Extensions' input hooks on an API request, as the Chat tab runs them, then the prompts to generate
        from: a chat request's earlier messages go through history_modifier and its last user message through
        chat_input_modifier + input_modifier (is_chat=True), and the state's `system` (the request's own system
        message) may be changed by state_modifier, before the chat template is applied; a raw prompt goes
        through input_modifier (is_chat=False); the sampling settings through state_modifier. Returns (prompts,
        params, state for output_modifier and `extension_stack`; None when no extension is active)."""
        active = self.extensions is not None and bool(self.extensions.active())
        state = None
        if active:
            system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
            state = {**params.to_dict(), "adapters": None, "system": system}
        if active and messages and messages[-1]["role"] == "user":
            text, _ = self.extensions.chat_input(messages[-1]["content"], messages[-1]["content"], state)
            messages = [*self.extensions.history(messages[:-1]), {**messages[-1], "content": text}]
        elif active and prompts is not None:
            prompts = [self.extensions.text_input(p, state) for p in prompts]
        if active:
            state = self.extensions.state(state)
            state["is_chat"] = messages is not None
            params = self.params({k: v for k, v in state.items() if k in GenerationParams.__dataclass_fields__})
            if messages is not None and (state.get("system") or "") != system:
                rest = messages[1:] if messages and messages[0]["role"] == "system" else messages
                messages = ([{"role": "system", "content": state["system"]}] if state.get("system") else []) + rest
        if messages is not None:
            prompts = [self.engine.chat_prompt(messages)]
        return prompts, params, state

    def extension_stack(self, stack: Stack, state: dict | None) -> Stack:
        """The adapters for a request: those it names; when it names none (the app's active stack), those an
        extension picked for it (state["adapters"], as lora_router does in the Chat tab)."""
        if stack is UI_STACK and state and state.get("adapters") is not None:
            return self.stack(adapters=dict(state["adapters"]))
        return stack

    def apply_output(self, text: str, state: dict | None) -> str:
        """Extensions' output_modifier on a finished (non-streamed) reply; the token ids and logprobs still
        describe what the model generated."""
        if state is None or self.extensions is None:
            return text
        return self.extensions.output(text, state, is_chat=bool(state.get("is_chat")))

    # -- running -----------------------------------------------------------------------------------------
    def submit(self, prompts: list[str], params: GenerationParams, stack: Stack, n: int = 1) -> list[JobHandle]:
        """One scheduler job per prompt and choice (prompt-major), all queued at once so they batch. With a
        seed, choice i samples with seed + i (the same seed would give n copies)."""
        handles = []
        for prompt in prompts:
            for i in range(n):
                p = params if i == 0 or params.seed < 0 else GenerationParams.from_dict(
                    {**params.to_dict(), "seed": params.seed + i})
                handles.append(self.engine.submit(prompt, p, stack))
        return handles

    async def finish(self, handle: JobHandle, state: dict | None = None) -> Output:
        """Wait for a job; a failure becomes one error line, and the job is freed either way. `state`: the
        request's extension state (see apply_input), for output_modifier."""
        try:
            text = await run_in_threadpool(handle.text)
        except LoraDeckError:
            raise
        except Exception as e:
            raise LoraDeckError(f"generation failed: {first_line(e)}") from e
        finally:
            handle.close()
        tokens = handle.completion_tokens
        if tokens is None:
            tokens = await run_in_threadpool(self.engine.count_tokens, text)
        if state is not None:
            text = await run_in_threadpool(self.apply_output, text, state)
        return Output(text, handle.finish_reason, tokens, ids=handle.token_ids)

    def scores(self, prompt: str, reply: str, stack: Stack, top_k: int = 0,
               reply_ids: list[int] | None = None) -> tuple[Scored, Scored]:
        """(prompt tokens, reply tokens) with their log-probabilities under `stack`. The prompt's tokens are
        its own (no BOS, as clients such as lm-eval count them), the first has none; BOS, when the model adds
        one, is still the context the model scores the prompt in. `reply_ids` are the generated ids (ending
        with the end-of-sequence token the reply stopped on: clients count one entry per generated token, and
        lm-eval drops the last entry of an echoed one-token reply); without them (a reply cut at a stop
        string) the reply's text is tokenized again."""
        engine = self.engine
        own = engine.tokenize(prompt, add_special=False)
        full = engine.tokenize(prompt)
        lead = full[:len(full) - len(own)] if own and full[len(full) - len(own):] == own else []
        if reply_ids is not None:
            answer = list(reply_ids)
        else:
            answer = engine.tokenize(reply, add_special=False) if reply else []
        ids = lead + own + answer
        if len(ids) < 2:
            values, top = [], []
        else:
            scored = engine.score([ids], adapters=stack, top_k=top_k, paths=self.runtime)[0]
            values, top = scored.logprobs, scored.top or []
        skip = len(lead) - 1  # scores[i] is for ids[i + 1]
        texts = engine.token_texts(own + answer)
        top_texts = [self._top_texts(t) for t in top] if top_k else []

        def part(start: int, stop: int, first_none: bool) -> Scored:
            lps = [values[skip + i] if skip + i >= 0 else None for i in range(start, stop)]
            tops = [top_texts[skip + i] if top_k and skip + i >= 0 else None for i in range(start, stop)]
            if first_none and lps:
                lps[0], tops[0] = None, None
            return Scored((own + answer)[start:stop], texts[start:stop], lps, tops if top_k else [])

        return part(0, len(own), True), part(len(own), len(own) + len(answer), False)

    def _top_texts(self, alternatives: list[tuple[int, float]]) -> list[tuple[int, str, float]]:
        texts = self.engine.token_texts([i for i, _ in alternatives])
        return [(i, t, lp) for t, (i, lp) in zip(texts, alternatives)]
