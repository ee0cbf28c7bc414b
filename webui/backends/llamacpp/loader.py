"""The llama.cpp loader: a `.gguf` model through llama-cpp-python (context length, threads, and GPU layers
when llama.cpp was built with GPU offload), chat prompts rendered with the template stored in the GGUF,
and the samplers llama.cpp has (greedy at temperature 0; top-k, top-p, min-p, typical-p, repetition /
presence / frequency penalties, seed).

LoRA adapters run unmerged on the loaded model through llama.cpp's adapter API: each adapter is loaded
once (`llama_adapter_lora_init`; PEFT adapters are converted to GGUF LoRA first and the conversion is
cached beside them) and any weighted set of them is made active with `llama_set_adapters_lora` — switching,
mixing and clearing never reload the base. A prompt prefix already in the KV cache is reused (as
llama-cpp-python does) only while the adapter stack is unchanged; a new stack resets the cache.

Concurrent requests (the scheduler) run in a continuous batch of their own, `decoder()`
(webui/backends/llamacpp/batch.py): one more llama.cpp context over the same model, a sequence per request,
giving each request the tokens this single-request path gives it.
"""
from __future__ import annotations

import codecs
import ctypes
import os
import random
import threading
from pathlib import Path
from typing import Iterator

import numpy as np

from webui.adapters.gguf_lora import cached_conversion, field_value, gguf_module, read_base
from webui.backends import embedded, machine
from webui.backends.base import SAMPLERS, Backend, Capabilities, LoadedInfo, TokenScores, plain_transcript
from webui.errors import BadInput, LoadFailed, NotFound, Unsupported, first_line
from webui.options.config import GenerationParams, ModelSpec
from webui.progress import Progress, no_progress


def _llama_cpp():
    """llama-cpp-python, imported on first use: it is an optional, compiled dependency, and without it this
    module still imports (the registry then lists the loader as unavailable)."""
    import llama_cpp
    return llama_cpp


def _diagnose(path: Path) -> str:
    """Why llama.cpp refused a GGUF, when the header tells (read only on failure: parsing is slow)."""
    try:
        reader = gguf_module().GGUFReader(str(path))
    except Exception as e:
        return f"the GGUF file is corrupt or truncated ({first_line(e)})"
    if field_value(reader, "general.type") == "adapter":
        return "it is a LoRA adapter, not a model: put it in the loras folder"
    if not field_value(reader, "general.architecture"):
        return "general.architecture is missing from its metadata"
    return ""


class LlamaCppBackend(Backend):
    name = "llamacpp"
    settings = ("n_ctx", "n_threads", "n_gpu_layers")
    requires = ("llama_cpp",)

    def __init__(self):
        self.llm = None
        self.info: LoadedInfo | None = None
        self.path: Path | None = None
        self._base = None                  # webui.adapters.gguf_lora.GgufBase, read on first use
        self._adapters: dict[str, tuple] = {}  # name -> (llama_adapter_lora pointer, file signature, gguf path)
        self._active: dict[str, float] = {}
        self._formatters: dict[bool, object] = {}
        self._stack_changed = False
        self._grammars: dict[str, object] = {}  # response_format -> LlamaGrammar (GBNF made once per schema)
        self._decoder = None  # the continuous batch (webui/backends/llamacpp/batch.py), made on first use

    # -- what the registry asks ------------------------------------------------------------------
    @classmethod
    def claims(cls, path: Path) -> bool:
        return path.is_file() and path.suffix == ".gguf"

    @classmethod
    def embedded(cls, models_dir: Path, progress: Progress | None = None) -> Path:
        return embedded.gguf_path()  # the shipped GGUF itself

    # -- lifecycle -------------------------------------------------------------------------------
    @classmethod
    def preflight(cls, path: Path, spec: ModelSpec) -> None:
        if not path.exists():
            raise NotFound(f"model not found: {path}")
        if not path.is_file():
            raise LoadFailed(f"{path.name}: the llama.cpp loader needs a .gguf file, not a folder")
        with open(path, "rb") as f:
            head = f.read(8)
        if head[:4] != b"GGUF":
            raise LoadFailed(f"{path.name} is not a GGUF file (bad magic bytes)")
        if len(head) < 8 or int.from_bytes(head[4:8], "little") not in (2, 3):
            raise LoadFailed(f"{path.name}: GGUF version {int.from_bytes(head[4:8], 'little')} is not supported "
                                 "(llama.cpp reads versions 2 and 3)")

    @classmethod
    def memory_need(cls, path: Path, spec: ModelSpec) -> int:
        """The GGUF's weights, memory-mapped but all read at each token (a model larger than RAM pages from disk
        on every token), plus margins for the compute buffers and the continuous batch's KV cache (at most
        batch.KV_BUDGET)."""
        if spec.n_gpu_layers and spec.device != "cpu" and _llama_cpp().llama_supports_gpu_offload():
            return 0  # offloaded layers live in GPU memory, which is not estimated here
        from webui.backends.llamacpp.batch import KV_BUDGET  # the decoder's module, loaded with the model

        return machine.load_need_file(path) + KV_BUDGET

    def memory_held(self) -> int:
        return self.path.stat().st_size if self.llm is not None and self.path and self.path.is_file() else 0

    def load(self, path: Path, spec: ModelSpec, progress: Progress = no_progress) -> LoadedInfo:
        llama_cpp = _llama_cpp()
        gpu = llama_cpp.llama_supports_gpu_offload() and spec.device != "cpu"
        progress(0.1, f"loading {path.name} with llama.cpp" + (" (GPU offload)" if gpu else ""))
        try:
            threads = spec.n_threads or os.cpu_count()
            # Flash attention as llama-server uses it (its `-fa auto` turns it on wherever the device has it;
            # llama-cpp-python's default is off): faster decoding on CPU, and the same greedy text as
            # llama-server on the same GGUF (without it the attention sums round differently and the greedy
            # text parts from llama-server's after a few dozen tokens). The prompt threads follow n_threads too
            # (llama-cpp-python would take every core for them).
            self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=spec.n_ctx, n_threads=threads,
                                       n_threads_batch=threads, flash_attn=True,
                                       n_gpu_layers=spec.n_gpu_layers if gpu else 0, verbose=False)
        except Exception as e:
            self.unload()
            reason = _diagnose(path) or first_line(e)
            raise LoadFailed(f"could not load {path.name} with llama.cpp: {reason}") from e
        self.path = Path(path)
        meta = self.llm.metadata
        arch = meta.get("general.architecture", "")
        self.info = LoadedInfo(
            name=path.name, path=str(path), loader=self.name, device="cuda" if gpu and spec.n_gpu_layers else "cpu",
            dtype=self.llm._model.desc().split()[-1] if self.llm._model.desc() else "",
            architecture=arch, parameters=int(self.llm._model.n_params()), context_length=int(self.llm.n_ctx()))
        progress(1.0, f"loaded {path.name}")
        return self.info

    def unload(self) -> None:
        if self._decoder is not None:  # its context goes before the model it was made from
            self._decoder.free()
            self._decoder = None
        if self.llm is not None:
            self.llm.close()  # frees the context, then the model and the adapters llama.cpp keeps with it
        self.llm = None
        self.info = None
        self._base = None
        self._adapters.clear()
        self._active = {}
        self._formatters.clear()
        self._grammars.clear()

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(loader=self.name, samplers=SAMPLERS, settings=self.settings,
                            adapters=True, adapter_stack=True, merge=False,
                            extra={"merge_hint": "bake adapters into a GGUF: python -m webui export --format gguf"})

    # -- adapters (llama.cpp runtime LoRA) ------------------------------------------------------------
    def gguf_base(self):
        if self._base is None:
            self._base = read_base(self.path, self.info.name)
        return self._base

    def describe_base(self):
        return self.gguf_base().description

    @property
    def adapters_loaded(self) -> dict:
        return {n: sig for n, (_, sig, _) in self._adapters.items()}

    @property
    def active_adapters(self) -> dict:
        return dict(self._active)

    def load_adapter(self, name: str, files, state: dict, report) -> None:
        llama_cpp = _llama_cpp()
        if files.format == "gguf":
            gguf_file = Path(files.weights)  # a GGUF LoRA from the loras folder, used as it is
        else:
            gguf_file = cached_conversion(files, state, self.gguf_base(), ignored=report.ignored_targets)
        pointer = llama_cpp.llama_adapter_lora_init(self.llm.model, str(gguf_file).encode("utf-8"))
        if not pointer:
            raise BadInput(f"{name}: llama.cpp refused {gguf_file.name} (architecture or tensor shapes do not "
                               f"match {self.info.name})")
        if name in self._adapters:
            self.delete_adapter(name)
        self._adapters[name] = (pointer, files.signature(), gguf_file)
        self._apply(self._active)

    def set_adapters(self, weights: dict[str, float]) -> None:

        missing = [n for n in weights if n not in self._adapters]
        if missing:
            raise BadInput(f"adapter(s) not loaded: {', '.join(missing)}")
        self._apply(dict(weights))

    def _apply(self, weights: dict[str, float]) -> None:
        llama_cpp = _llama_cpp()
        if weights == self._active and list(weights) == list(self._active):
            return  # the same stack: keep the KV cache
        n = len(weights)
        pointers = (llama_cpp.llama_adapter_lora_p_ctypes * n)(*(self._adapters[k][0] for k in weights)) if n else None
        scales = (ctypes.c_float * n)(*(float(w) for w in weights.values())) if n else None
        if llama_cpp.llama_set_adapters_lora(self.llm.ctx, pointers, n, scales) != 0:
            raise BadInput(f"llama.cpp could not activate {', '.join(weights)}")
        self._active = dict(weights)
        self._stack_changed = True  # the KV cache holds a prompt computed with the previous stack

    def delete_adapter(self, name: str) -> None:
        llama_cpp = _llama_cpp()
        entry = self._adapters.get(name)
        if entry is None:
            return
        self._apply({n: w for n, w in self._active.items() if n != name})
        if self._decoder is not None:
            self._decoder.forget_adapter(name)
        del self._adapters[name]
        llama_cpp.llama_adapter_lora_free(entry[0])

    def merge_adapters(self) -> None:
        raise Unsupported("llama.cpp applies adapters at run time and cannot merge them in memory. To bake the "
                          "active adapters in, export a merged GGUF (the LoRA panel's Export with format gguf, or "
                          "python -m webui export --format gguf), or load this model on the transformers loader "
                          "(the active adapters are kept) and merge there")

    # -- text --------------------------------------------------------------------------------------
    def _formatter(self, add_generation_prompt: bool):
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter  # optional dependency (see _llama_cpp)

        if add_generation_prompt not in self._formatters:
            template = self.llm.metadata.get("tokenizer.chat_template")
            if not template:
                return None
            vocab = self.llm._model
            bos = self.llm.detokenize([vocab.token_bos()], special=True).decode("utf-8", "replace") \
                if vocab.token_bos() >= 0 else ""
            eos = self.llm.detokenize([vocab.token_eos()], special=True).decode("utf-8", "replace") \
                if vocab.token_eos() >= 0 else ""
            self._formatters[add_generation_prompt] = Jinja2ChatFormatter(
                template, eos_token=eos, bos_token=bos, add_generation_prompt=add_generation_prompt)
        return self._formatters[add_generation_prompt]

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        formatter = self._formatter(add_generation_prompt)
        if formatter is None:
            return plain_transcript(messages, add_generation_prompt)
        return formatter(messages=messages).prompt

    def prepare_response_format(self, response_format: str):
        """llama.cpp's own grammars: llama-cpp-python turns a JSON schema into GBNF (and ships a grammar for
        any JSON), and the sampler enforces it token by token."""
        if not response_format:
            return None
        if response_format not in self._grammars:
            from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar  # optional dependency (see _llama_cpp)

            try:
                self._grammars[response_format] = LlamaGrammar.from_string(JSON_GBNF) if response_format == "json" \
                    else LlamaGrammar.from_json_schema(response_format, verbose=False)
            except Exception as e:  # the converter raises plain exceptions for schemas it cannot express
                raise BadInput(f"response_format: the schema cannot be enforced: {first_line(e)}") from None
        return self._grammars[response_format]

    def decoder(self):
        """Continuous batching over this model (llama.cpp's batch API, one sequence per row, a context of its own
        made once and kept until unload: see webui/backends/llamacpp/batch.py); None where fewer than two rows of
        the whole context fit in its KV budget (requests then run one after another on the model's own context)."""
        if self._decoder is None and self.llm is not None:
            from webui.backends.llamacpp.batch import LlamaCppDecoder, rows_that_fit

            if rows_that_fit(self.llm) < 2:
                return None
            self._decoder = LlamaCppDecoder(self)
        return self._decoder

    def is_end_of_sequence(self, token: int) -> bool:
        return bool(_llama_cpp().llama_vocab_is_eog(self.llm._model.vocab, token))

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        model = self.llm._model
        bos = model.token_bos()
        bos_text = self.llm.detokenize([bos], special=True).decode("utf-8", "replace") if bos >= 0 else ""
        # A chat-template prompt may already start with BOS; adding another would change the output.
        add_bos = add_special and model.add_bos_token() and not (bos_text and text.startswith(bos_text))
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def token_texts(self, ids: list[int]) -> list[str]:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span tokens
        pieces = [decoder.decode(self.llm.detokenize([i], special=True)) for i in ids]
        if pieces:
            pieces[-1] += decoder.decode(b"", final=True)
        return pieces

    def detokenize(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids, special=True).decode("utf-8", "replace")

    @property
    def eos_token_id(self) -> int | None:
        eos = self.llm._model.token_eos()
        return eos if eos >= 0 else None

    def score(self, sequences: list[list[int]], top_k: int = 0) -> list[TokenScores]:
        """Each sequence decoded from an empty KV cache in n_batch chunks with logits for every position
        (llama-cpp-python's `Llama.eval` keeps all of them only when the model was opened with logits_all,
        which costs n_ctx x vocabulary floats for good; its batch and context objects are used directly)."""
        llm, vocab = self.llm, self.llm.n_vocab()
        out: list[TokenScores] = []
        try:
            for s in sequences:
                if len(s) > llm.n_ctx():
                    raise BadInput(f"{len(s)} tokens do not fit the context of {llm.n_ctx()}")
                llm.reset()
                llm._ctx.kv_cache_clear()
                rows = []
                for start in range(0, len(s), llm.n_batch):
                    chunk = s[start:start + llm.n_batch]
                    llm._batch.set_batch(batch=chunk, n_past=start, logits_all=True)
                    llm._ctx.decode(llm._batch)
                    rows.append(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(chunk) * vocab,))
                                .reshape(len(chunk), vocab).copy())
                logits = np.concatenate(rows)[:-1].astype(np.float64)
                peak = logits.max(axis=1, keepdims=True)
                logp = logits - peak - np.log(np.exp(logits - peak).sum(axis=1, keepdims=True))
                picked = logp[np.arange(len(s) - 1), s[1:]].tolist()
                top = None
                if top_k:
                    best = np.argsort(-logp, axis=1)[:, :top_k]
                    top = [[(int(j), float(row[j])) for j in ix] for ix, row in zip(best, logp)]
                out.append(TokenScores(list(s), picked, top))
        finally:  # the next generation starts from an empty cache, not from the last scored sequence
            llm.reset()
            llm._ctx.kv_cache_clear()
        return out

    def stream_tokens(self, prompt: str, params: GenerationParams,
                      cancel: threading.Event | None = None) -> Iterator[tuple[str, list[int]]]:
        llama_cpp = _llama_cpp()
        tokens = self.tokenize(prompt)
        budget = min(params.max_new_tokens, self.llm.n_ctx() - len(tokens))
        if budget <= 0:
            raise ValueError(f"the prompt has {len(tokens)} tokens; the context holds {self.llm.n_ctx()}")
        if not params.greedy:
            self.llm.set_seed(params.seed if params.seed >= 0 else random.randrange(2**31))
        sampling = dict(temp=0.0) if params.greedy else dict(
            temp=params.temperature, top_p=params.top_p, top_k=params.top_k, min_p=params.min_p,
            typical_p=params.typical_p)
        # Bytes are decoded incrementally with errors="replace", as transformers decodes a whole reply: a
        # character split over two tokens comes out whole, broken bytes as U+FFFD.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        vocab = self.llm._model.vocab
        if self._stack_changed:
            self.llm.reset()  # else llama-cpp-python reuses the KV cache of a shared prompt prefix
            self._stack_changed = False
        steps = self.llm.generate(tokens, reset=True, repeat_penalty=params.repetition_penalty,
                                  presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
                                  grammar=self.prepare_response_format(params.response_format), **sampling)
        try:
            for i, token in enumerate(steps):
                if cancel is not None and cancel.is_set():
                    break
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    yield "", [token]  # the end-of-sequence token the reply stopped on: no text
                    break
                yield decoder.decode(self.llm.detokenize([token])), [token]
                if i + 1 >= budget:
                    break
            tail = decoder.decode(b"", final=True)
            if tail:
                yield tail, []
        finally:
            steps.close()
