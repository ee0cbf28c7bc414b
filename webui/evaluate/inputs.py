"""What an evaluation reads: the dataset, turned into samples by training's own code (webui.training.data:
the same formats, chat rendering, raw-text chunking and loss masking) with the loaded Engine as its
tokenizer, so that every loader — llama.cpp too, which has no Hugging Face tokenizer — is measured on exactly
the tokens training would use; and the prompt list for side-by-side answers. Every problem is a BadInput or
NotFound naming the file and the record, line or item, raised before anything runs.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from webui.engine import Engine
from webui.errors import BadInput, NotFound
from webui.options.config import EvalConfig
from webui.training import preference
from webui.training.data import IGNORE, Sample, TextCodec, load_samples

RAW_CHUNK_FALLBACK = 2048  # raw chunk length with cutoff_len 0 when the model does not state its context


class EngineCodec(TextCodec):
    """The loaded model's chat template and tokenizer, through the Engine (whatever the loader)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._eos = engine.eos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self._eos

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.engine.chat_prompt(messages, add_generation_prompt)

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        return self.engine.tokenize(text, add_special)


def _context(engine: Engine) -> int:
    return engine.loaded.context_length if engine.loaded else 0


def _cutoff(engine: Engine, cfg: EvalConfig) -> int:
    if cfg.cutoff_len:
        return cfg.cutoff_len
    # no cut: records whole, raw text in chunks as long as the context
    return (_context(engine) or RAW_CHUNK_FALLBACK) if cfg.format == "raw" else sys.maxsize


def load_dataset(engine: Engine, cfg: EvalConfig) -> list[Sample]:
    """The samples to score (the first `max_samples`), each fitting the model's context."""
    path = Path(cfg.dataset)
    samples = load_samples(path, cfg.format, EngineCodec(engine), _cutoff(engine, cfg), cfg.overlap)
    # a trained token needs a token before it to be predicted from (training's causal shift drops the first)
    samples = [s for s in samples if any(label != IGNORE for label in s.labels[1:])]
    if not samples:
        raise BadInput(f"{path.name}: no sample has a token to score")
    if cfg.max_samples:
        samples = samples[:cfg.max_samples]
    _check_context(engine, path, samples, "chunk" if cfg.format == "raw" else "record")
    return samples


def load_pairs(engine: Engine, cfg: EvalConfig) -> tuple[list[Sample], list[Sample]]:
    """A preference dataset's pairs as two lists of samples, the chosen and the rejected replies (the loss on the
    reply only, the prompt as context); the first `max_samples` pairs. Ratings without a pair are not used."""
    path = Path(cfg.dataset)
    pairs, _ = preference.read(path)
    if not pairs:
        raise BadInput(f"{path.name}: a preference evaluation compares chosen with rejected replies, and the file "
                       "holds no pair (prompt, chosen, rejected)")
    if cfg.max_samples:
        pairs = pairs[:cfg.max_samples]
    codec, cutoff = EngineCodec(engine), _cutoff(engine, cfg)
    sides = [[preference.encode_reply(codec, p["prompt"], p[side], cutoff, n) for n, p in enumerate(pairs, 1)]
             for side in ("chosen", "rejected")]
    for side in sides:
        for s in side:
            if not any(label != IGNORE for label in s.labels[1:]):
                raise BadInput(f"{path.name} record {s.record}: the reply has no token to score within cutoff_len "
                               f"{cfg.cutoff_len}; raise it")
        _check_context(engine, path, side, "record")
    return sides[0], sides[1]


def _check_context(engine: Engine, path: Path, samples: list[Sample], unit: str) -> None:
    limit = _context(engine)
    for s in samples:
        if limit and len(s.input_ids) > limit:
            raise BadInput(f"{path.name} {unit} {s.record}: {len(s.input_ids)} tokens do not fit the context of "
                           f"{engine.loaded.name} ({limit} tokens); lower cutoff_len or use a longer context")


def read_prompts(path: Path) -> list[tuple[str, str]]:
    """(where, prompt) for each prompt of a .txt file (one per line; blank lines skipped) or a .json list /
    .jsonl lines of strings (or of {"prompt": ...} objects)."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"prompts file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        found = [(f"line {n}", line.rstrip("\r")) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    elif path.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as e:
            raise BadInput(f"{path.name} is not valid JSON: {e}") from None
        if not isinstance(data, list):
            raise BadInput(f"{path.name}: expected a JSON list of prompt strings")
        found = [(f"item {n}", _prompt(item, path, f"item {n}")) for n, item in enumerate(data, 1)]
    elif path.suffix == ".jsonl":
        found = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError as e:
                raise BadInput(f"{path.name} line {n} is not valid JSON: {e}") from None
            found.append((f"line {n}", _prompt(item, path, f"line {n}")))
    else:
        raise BadInput(f"{path.name}: prompts must be a .txt, .json or .jsonl file")
    if not found:
        raise BadInput(f"{path.name} has no prompts")
    return found


def _prompt(item, path: Path, where: str) -> str:
    if isinstance(item, dict) and isinstance(item.get("prompt"), str):
        item = item["prompt"]
    if not isinstance(item, str) or not item.strip():
        raise BadInput(f"{path.name} {where}: a prompt must be a non-empty string")
    return item


def render_prompts(engine: Engine, cfg: EvalConfig) -> list[tuple[str, str]]:
    """(prompt as written, text sent to the model) for each prompt, each checked to leave room for the answer."""
    if not cfg.prompts:
        return []
    path, limit = Path(cfg.prompts), _context(engine)
    chat = cfg.prompt_format == "chat" or cfg.prompt_format == "auto" and cfg.format != "raw"
    out = []
    for where, prompt in read_prompts(path):
        text = engine.chat_prompt([{"role": "user", "content": prompt}]) if chat else prompt
        n = engine.count_tokens(text)
        if limit and n + cfg.max_new_tokens > limit:
            raise BadInput(f"{path.name} {where}: the prompt has {n} tokens; with {cfg.max_new_tokens} new tokens it "
                           f"needs {n + cfg.max_new_tokens}, more than the context of {engine.loaded.name} "
                           f"({limit} tokens); shorten it or lower max_new_tokens")
        out.append((prompt, text))
    return out
