"""Training data: read a dataset file and turn it into tokenized samples (input_ids + labels) the way the
model will see them.

- raw: a text file, tokenized once and cut into chunks of `cutoff_len` tokens that overlap by `overlap`;
  every token is trained.
- instruction: JSON (a list) or JSONL records with `instruction`, optional `input`, `output`; rendered
  as a user turn and an assistant turn with the base's chat template; loss on the output only (on every
  token with `dataset.train_on_prompt`, as for chat).
- chat: JSONL records with OpenAI `messages` ([{role, content}]) or ShareGPT `conversations`
  ([{from: human|gpt|system, value}]); loss on the assistant turns only.
- preference: pairs and ratings for the preference methods, read by webui/training/preference.py.

Every problem (empty file, bad JSON, a record missing a field) raises BadInput naming the file, the
line or record, and the field — before any training starts.

The tokenizer is reached through a `TextCodec` (render a conversation, tokenize text, the end-of-sequence
token): training wraps a Hugging Face tokenizer in one, and evaluation (webui/evaluate) wraps the loaded
Engine, so every loader, llama.cpp included, gets the same formats, chunking and loss masking.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from webui.backends.base import plain_transcript
from webui.errors import BadInput, NotFound

IGNORE = -100  # label of tokens that carry no loss (transformers' convention)
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "bot": "assistant"}


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]
    record: int = 0  # where it came from (1-based record, or chunk of raw text), for messages that name it

    @property
    def trained_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def _records(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise BadInput(f"{path.name} is empty")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as e:
            raise BadInput(f"{path.name} is not valid JSON: {e}") from None
        if not isinstance(data, list):
            raise BadInput(f"{path.name}: expected a JSON list of records")
        return data
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as e:
            raise BadInput(f"{path.name} line {n} is not valid JSON: {e}") from None
    return records


def _require(record, n: int, path: Path, field: str, kind=str):
    if not isinstance(record, dict) or field not in record:
        raise BadInput(f"{path.name} record {n}: missing field {field!r}")
    value = record[field]
    if not isinstance(value, kind):
        raise BadInput(f"{path.name} record {n}: field {field!r} must be a {kind.__name__}")
    return value


def conversations(path: Path, fmt: str) -> list[list[dict]]:
    """instruction/chat files → lists of {role, content} messages."""
    out = []
    for n, rec in enumerate(_records(path), 1):
        if fmt == "instruction":
            instruction = _require(rec, n, path, "instruction")
            output = _require(rec, n, path, "output")
            extra = rec.get("input") or ""
            user = f"{instruction}\n\n{extra}" if extra else instruction
            out.append([{"role": "user", "content": user}, {"role": "assistant", "content": output}])
        elif isinstance(rec, dict) and "messages" in rec:
            msgs = _require(rec, n, path, "messages", list)
            for m in msgs:
                if not isinstance(m, dict) or "role" not in m or "content" not in m:
                    raise BadInput(f"{path.name} record {n}: every message needs 'role' and 'content'")
            out.append([{"role": m["role"], "content": str(m["content"])} for m in msgs])
        else:
            turns = _require(rec, n, path, "conversations", list)
            msgs = []
            for t in turns:
                if not isinstance(t, dict) or t.get("from") not in SHAREGPT_ROLES or "value" not in t:
                    raise BadInput(f"{path.name} record {n}: ShareGPT turns need 'from' "
                                       f"({'/'.join(SHAREGPT_ROLES)}) and 'value'")
                msgs.append({"role": SHAREGPT_ROLES[t["from"]], "content": str(t["value"])})
            out.append(msgs)
        if not any(m["role"] == "assistant" for m in out[-1]):
            raise BadInput(f"{path.name} record {n}: no assistant turn to learn from")
    return out


class TextCodec:
    """What turning records into samples needs from a tokenizer, here over a Hugging Face tokenizer. Other
    sources (the Engine) subclass it and override the three members."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        return plain_transcript(messages, add_generation_prompt)

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids; BOS is added as generation adds it (not twice when a rendered chat starts with it)."""
        bos = self.tokenizer.bos_token
        return list(self.tokenizer(text, add_special_tokens=add_special and not (bos and text.startswith(bos)))
                    ["input_ids"])


def codec_of(tokenizer) -> TextCodec:
    return tokenizer if isinstance(tokenizer, TextCodec) else TextCodec(tokenizer)


def encode_chat(tokenizer, messages: list[dict], cutoff_len: int, train_on_prompt: bool = False) -> Sample:
    """Tokens of the whole conversation; labels only on assistant turns (every token with `train_on_prompt`).
    Each assistant turn's tokens are found by rendering the conversation up to the turn's start and up to its
    end (chat templates put special tokens at turn boundaries, so these renders tokenize as prefixes of the whole)."""
    codec = codec_of(tokenizer)
    full = codec.encode(codec.render(messages, False))
    if train_on_prompt:
        return Sample(full[:cutoff_len], full[:cutoff_len])
    labels = [IGNORE] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(codec.encode(codec.render(messages[:i], True)))
        end = len(codec.encode(codec.render(messages[:i + 1], False)))
        for j in range(start, min(end, len(full))):
            labels[j] = full[j]
    return Sample(full[:cutoff_len], labels[:cutoff_len])


def encode_raw(tokenizer, text: str, cutoff_len: int, overlap: int) -> list[Sample]:
    codec = codec_of(tokenizer)
    ids = codec.encode(text, add_special=False)
    if codec.eos_token_id is not None:
        ids = ids + [codec.eos_token_id]
    step = max(1, cutoff_len - overlap)
    chunks = [ids[i:i + cutoff_len] for i in range(0, max(1, len(ids) - overlap), step)]
    return [Sample(c, list(c), n) for n, c in enumerate(chunks, 1) if len(c) > 1]


def load_samples(path: Path, fmt: str, tokenizer, cutoff_len: int, overlap: int = 32,
                 train_on_prompt: bool = False) -> list[Sample]:
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"dataset not found: {path}")
    if fmt == "raw":
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise BadInput(f"{path.name} is empty")
        samples = encode_raw(tokenizer, text, cutoff_len, min(overlap, cutoff_len // 2))
    else:
        if path.suffix not in (".json", ".jsonl"):
            raise BadInput(f"{path.name}: {fmt} data must be a .json or .jsonl file")
        samples = [encode_chat(tokenizer, c, cutoff_len, train_on_prompt) for c in conversations(path, fmt)]
        for n, s in enumerate(samples, 1):
            s.record = n
    samples = [s for s in samples if s.trained_tokens > 0]
    if not samples:
        raise BadInput(f"{path.name}: no sample has any token to train on (is cutoff_len {cutoff_len} too short?)")
    return samples


def load_files(paths: list, fmt: str, tokenizer, cutoff_len: int, overlap: int = 32,
               train_on_prompt: bool = False) -> list[Sample]:
    """The samples of several files of one format as one list (`dataset.path` may list files to mix; the split
    shuffles them together)."""
    return [s for path in paths
            for s in load_samples(Path(path), fmt, tokenizer, cutoff_len, overlap, train_on_prompt)]


def detect_format(path: Path) -> str | None:
    """The dataset format a file's name and first record show: raw for text files; chat for records with
    `messages` or `conversations`; instruction for records with `instruction`; None when it cannot tell (a missing
    or unreadable file, an unknown record)."""
    path = Path(path)
    if path.suffix in (".txt", ".md"):
        return "raw"
    if path.suffix not in (".json", ".jsonl") or not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8") as f:
            if path.suffix == ".jsonl":
                first = next((json.loads(line) for line in f if line.strip()), None)
            else:
                data = json.load(f)
                first = data[0] if isinstance(data, list) and data else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(first, dict):
        return None
    if "messages" in first or "conversations" in first:
        return "chat"
    if "chosen" in first or "rejected" in first or "completion" in first and "label" in first:
        return "preference"
    return "instruction" if "instruction" in first else None


def check_files(paths: list, fmt: str) -> int:
    """The records (or, for raw text, files) `paths` hold, read without a tokenizer, so that a run is refused
    before its process starts: a missing or empty file, or a record without the format's fields, names the file,
    the record and `dataset.path`. Returns how many records there are."""
    if not paths:
        raise BadInput("dataset.path: give the training data file")
    count = 0
    for path in map(Path, paths):
        if not path.is_file():
            raise NotFound(f"dataset.path: {path} not found")
        try:
            if fmt == "raw":
                if not path.read_text(encoding="utf-8").strip():
                    raise BadInput(f"{path.name} is empty")
                count += 1
                continue
            if path.suffix not in (".json", ".jsonl"):
                raise BadInput(f"{path.name}: {fmt} data must be a .json or .jsonl file")
            count += len(conversations(path, fmt))
        except BadInput as e:
            raise BadInput(f"dataset.path: {e}") from None
        except UnicodeDecodeError:
            raise BadInput(f"dataset.path: {path.name} is not UTF-8 text") from None
    if not count:
        raise BadInput(f"dataset.path: {', '.join(Path(p).name for p in paths)} holds no record to train on")
    return count


def split(samples: list[Sample], eval_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """A reproducible train/eval split; no eval split when there are too few samples to spare one."""
    n_eval = int(len(samples) * eval_fraction)
    if n_eval == 0 or len(samples) - n_eval < 1:
        return samples, []
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held]


def warnings_for(samples: list[Sample], cutoff_len: int) -> list[str]:
    notes = []
    if len(samples) < 8:
        notes.append(f"the dataset is tiny ({len(samples)} samples): the adapter will mostly memorize it")
    cut = sum(1 for s in samples if len(s.input_ids) >= cutoff_len)
    if cut:
        notes.append(f"{cut} sample(s) reach cutoff_len={cutoff_len} and are cut short")
    return notes


def preview(tokenizer, samples: list[Sample], n: int = 3) -> str:
    """The first samples as the model sees them, with the trained part in ⟦ ⟧."""
    parts = []
    for s in samples[:n]:
        text, run, trained = "", [], False
        for tok, lab in zip(s.input_ids, s.labels):
            is_trained = lab != IGNORE
            if is_trained != trained and run:
                piece = tokenizer.decode(run)
                text += f"⟦{piece}⟧" if trained else piece
                run = []
            trained = is_trained
            run.append(tok)
        if run:
            piece = tokenizer.decode(run)
            text += f"⟦{piece}⟧" if trained else piece
        parts.append(f"[{len(s.input_ids)} tokens, {s.trained_tokens} trained]\n{text}")
    return "\n\n---\n\n".join(parts)
