"""Preference data (`dataset.format: preference`) for the preference methods (`method: dpo | orpo | kto`).

A preference file is JSONL (or a JSON list) in TRL's formats, which is also what the Chat tab's ratings write
(`user_data/preferences/NAME.jsonl`), so the two may be mixed in one file:
- a pair: `{"prompt", "chosen", "rejected"}` — DPO and ORPO learn from these;
- a rating: `{"prompt", "completion", "label": true|false}` — KTO learns from these, and from each pair taken as
  one good and one bad reply (TRL's `unpair_preference_dataset` does the same).
Each field is a plain string (text continued as it is) or a list of `{role, content}` messages (rendered with
the base's chat template); one kind per dataset, because TRL tokenizes a whole dataset one way.

Every problem is found before training starts and names the file and the record: a missing field, an empty
reply, a pair whose chosen and rejected are the same, a record longer than `training.cutoff_len` (which the
trainers would otherwise cut silently), text mixed with message lists.
"""
from __future__ import annotations

from pathlib import Path

from webui.errors import BadInput, NotFound
from webui.training.data import IGNORE, Sample, _records, codec_of

PAIR, RATING = ("prompt", "chosen", "rejected"), ("prompt", "completion", "label")


def _text(value) -> str:
    """The words of a field: a string, or the contents of its messages."""
    if isinstance(value, str):
        return value
    return "".join(str(m.get("content") or "") for m in value)


def _field(rec: dict, name: str, where: str, messages_role: str | None):
    value = rec.get(name)
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in value):
        if messages_role and value[-1]["role"] != messages_role:
            raise BadInput(f"{where}: field {name!r} must end with a {messages_role} message")
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in value]
    raise BadInput(f"{where}: field {name!r} must be a string or a non-empty list of {{role, content}} messages")


def read(path: Path) -> tuple[list[dict], list[dict]]:
    """(pairs, ratings) of one file, each row holding exactly TRL's fields; BadInput names the record."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"dataset not found: {path}")
    if path.suffix not in (".json", ".jsonl"):
        raise BadInput(f"{path.name}: preference data must be a .json or .jsonl file")
    pairs, ratings, kind = [], [], None
    for n, rec in enumerate(_records(path), 1):
        where = f"{path.name} record {n}"
        if not isinstance(rec, dict):
            raise BadInput(f"{where}: expected an object with {', '.join(PAIR)} (a pair) or {', '.join(RATING)} "
                           "(a rating)")
        fields = PAIR if "chosen" in rec or "rejected" in rec else RATING
        missing = [f for f in fields if f not in rec]
        if missing:
            raise BadInput(f"{where}: missing field(s) {', '.join(missing)} (a pair has {', '.join(PAIR)}; a "
                           f"rating has {', '.join(RATING)})")
        row = {"prompt": _field(rec, "prompt", where, None)}
        for name in fields[1:]:
            if name == "label":
                if not isinstance(rec["label"], bool):
                    raise BadInput(f"{where}: field 'label' must be true or false")
                row["label"] = rec["label"]
                continue
            row[name] = _field(rec, name, where, "assistant")
            if not _text(row[name]).strip():
                raise BadInput(f"{where}: field {name!r} is empty")
        if fields == PAIR and _text(row["chosen"]).strip() == _text(row["rejected"]).strip():
            raise BadInput(f"{where}: chosen and rejected are the same reply, which teaches nothing")
        shape = {isinstance(v, str) for k, v in row.items() if k != "label"}
        if len(shape) > 1:
            raise BadInput(f"{where}: mixes plain text with message lists; use one kind in a record")
        this = "text" if shape == {True} else "messages"
        if kind and this != kind:
            raise BadInput(f"{where}: {this}, but the records before it are {kind}; use one kind in a dataset")
        kind = this
        (pairs if fields == PAIR else ratings).append({**row, "record": f"{where}"})
    if not pairs and not ratings:
        raise BadInput(f"{path.name} holds no pair or rating")
    return pairs, ratings


def rows_for(method: str, pairs: list[dict], ratings: list[dict]) -> list[dict]:
    """The rows `method` learns from: pairs for dpo/orpo; for kto the ratings and every pair as one good and one
    bad reply."""
    if method in ("dpo", "orpo"):
        if not pairs:
            raise BadInput(f"method {method} learns from pairs (prompt, chosen, rejected), and the data has only "
                           f"{len(ratings)} single rating(s); choose the better of two replies in the Chat tab, or "
                           "use method kto")
        return pairs
    unpaired = [{"prompt": p["prompt"], "completion": p[side], "label": side == "chosen", "record": p["record"]}
                for p in pairs for side in ("chosen", "rejected")]
    rows = ratings + unpaired
    if not any(r["label"] for r in rows) or all(r["label"] for r in rows):
        raise BadInput("method kto needs replies rated good and replies rated bad; the data has only "
                       + ("good" if rows[0]["label"] else "bad") + " ones")
    return rows


def load(paths: list, method: str) -> tuple[list[dict], str]:
    """The rows of every file for `method`, and a note on what was left out (ratings, for dpo/orpo)."""
    pairs, ratings, kinds = [], [], {}
    for path in paths:
        p, r = read(Path(path))
        pairs += p
        ratings += r
        kinds.setdefault("plain text" if isinstance((p + r)[0]["prompt"], str) else "message lists", Path(path).name)
    if len(kinds) > 1:
        raise BadInput(f"{kinds['message lists']} holds message lists and {kinds['plain text']} plain text; TRL "
                       "tokenizes a dataset one way, so train on files of one kind")
    rows = rows_for(method, pairs, ratings)
    note = (f"{len(ratings)} single rating(s) are for method kto and are not used by {method}"
            if method in ("dpo", "orpo") and ratings else "")
    return rows, note


def check_lengths(rows: list[dict], tokenizer, cutoff_len: int) -> None:
    """Refuse a record whose prompt and reply together are longer than cutoff_len tokens, naming it: the
    trainers would cut it, and a cut pair may no longer differ where it mattered."""
    codec = codec_of(tokenizer)
    for row in rows:
        for side in ("chosen", "rejected", "completion"):
            if side not in row:
                continue
            if isinstance(row["prompt"], str):
                ids = codec.encode(row["prompt"] + row[side])
            else:
                ids = codec.encode(codec.render(row["prompt"] + row[side], False))
            if len(ids) > cutoff_len:
                raise BadInput(f"{row['record']}: prompt and {side} are {len(ids)} tokens, over training.cutoff_len "
                               f"{cutoff_len}; raise cutoff_len or shorten the record")


def encode_reply(tokenizer, prompt, reply, cutoff_len: int, record: int = 0) -> Sample:
    """The tokens of prompt + reply with the loss on the reply only, as TRL's trainers tokenize a pair: message
    lists through the chat template (the prompt rendered up to the generation prompt), plain text as it is."""
    codec = codec_of(tokenizer)
    if isinstance(prompt, str):
        start, full = len(codec.encode(prompt)), codec.encode(prompt + reply)
    else:
        start = len(codec.encode(codec.render(prompt, True)))
        full = codec.encode(codec.render(prompt + reply, False))
    labels = [IGNORE] * min(start, len(full)) + full[start:]
    return Sample(full[:cutoff_len], labels[:cutoff_len], record)


def preview_samples(tokenizer, rows: list[dict], cutoff_len: int, n: int = 2) -> list[Sample]:
    """The first `n` rows as the model sees them, each reply (chosen, rejected, or a rated completion) after its
    prompt, for the Training tab's preview (which marks the trained part)."""
    return [encode_reply(tokenizer, r["prompt"], r[side], cutoff_len) for r in rows[:n]
            for side in ("chosen", "rejected", "completion") if side in r]


def trl_rows(rows: list[dict]) -> list[dict]:
    """The rows as TRL reads them (without our record names)."""
    return [{k: v for k, v in r.items() if k != "record"} for r in rows]


def check_files(paths: list) -> int:
    """How many pairs and ratings the files hold, every record checked without a tokenizer (the runner's check
    before a run's process starts; data.check_files for the other formats). BadInput names `dataset.path`."""
    if not paths:
        raise BadInput("dataset.path: give the training data file")
    try:
        return sum(len(p) + len(r) for p, r in (read(Path(path)) for path in paths))
    except (BadInput, NotFound) as e:
        raise type(e)(f"dataset.path: {e}") from None
    except UnicodeDecodeError:
        raise BadInput("dataset.path: a preference file is not UTF-8 text") from None
