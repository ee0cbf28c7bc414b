"""Preference sets: the judgements a user makes in the Chat tab, kept as training data. Users shape a model's
voice by regenerating until a reply feels right; choosing the better of two replies, or rating one 👍/👎, says
what they want, and DPO, ORPO or KTO (the Training tab's `method`) can learn it.

A set NAME is two files under the user folder's `preferences/`, each one of TRL's conversational formats as is:
- `NAME.jsonl`: pairs, `{"prompt": [...], "chosen": [{"role": "assistant", ...}], "rejected": [...]}` (DPO, ORPO);
- `NAME.ratings.jsonl`: single ratings, `{"prompt": [...], "completion": [...], "label": true|false}` (KTO).
Two files, not one: a file mixing both kinds loads (`datasets.load_dataset("json")`) with every column and None
in half of them, which TRL's trainers refuse; each file alone is a dataset plain TRL reads.

The prompt is the chat up to the reply: the system prompt first when there is one, every earlier turn, and the
user's turn the reply answers. Each judgement appends one line in one write to a file opened for appending, so
nothing already written is lost (a crash loses at most that line) and two browser sessions writing at once do
not interleave their lines.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from webui.conversations import NAME
from webui.errors import BadInput
from webui.paths import inside

RATINGS = ".ratings"  # NAME.ratings.jsonl beside NAME.jsonl; so a set's own name may not end with it
ROLES = ("system", "user", "assistant")


def _checked(folder: Path, name: str) -> str:
    name = (name or "").strip()
    if not NAME.match(name) or name.endswith(RATINGS):
        raise BadInput(f"preference set name {name!r}: use letters, digits, spaces, '.', '+', '-' (at most 80), "
                       f"not ending in {RATINGS!r}")
    for path in (Path(folder) / f"{name}.jsonl", Path(folder) / f"{name}{RATINGS}.jsonl"):
        if not inside(folder, path):  # a symlink in the folder pointing elsewhere: neither read nor written
            raise BadInput(f"preference set {name!r} leads outside the preferences folder {folder}")
    return name


def set_path(folder: Path, name: str) -> Path:
    """The set's pairs file, `folder/NAME.jsonl`: the dataset for DPO and ORPO."""
    return Path(folder) / f"{_checked(folder, name)}.jsonl"


def ratings_path(folder: Path, name: str) -> Path:
    """The set's single ratings, `folder/NAME.ratings.jsonl`: the dataset for KTO."""
    return Path(folder) / f"{_checked(folder, name)}{RATINGS}.jsonl"


def _prompt(messages: list[dict]) -> list[dict]:
    """The prompt as TRL's rows hold it: role and content only, ending with the user's turn."""
    prompt = []
    for m in messages or []:
        role, content = m.get("role"), m.get("content")
        if role not in ROLES or not isinstance(content, str):
            raise BadInput(f"prompt message {m!r}: give a role ({', '.join(ROLES)}) and a text")
        if role == "system" and not content.strip():
            continue  # an empty system prompt is no system prompt
        prompt.append({"role": role, "content": content})
    if not prompt or prompt[-1]["role"] != "user":
        raise BadInput("the prompt must end with the user's turn the reply answers")
    return prompt


def _reply(text: str, what: str) -> list[dict]:
    if not isinstance(text, str) or not text.strip():
        raise BadInput(f"the {what} reply is empty")
    return [{"role": "assistant", "content": text}]


def _append(path: Path, row: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        while data:  # one write for a line in practice; the loop covers a short write
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def append_pair(folder: Path, name: str, prompt_messages: list[dict], chosen_text: str, rejected_text: str) -> Path:
    """Add one pair (the better reply `chosen_text`, the worse `rejected_text`, both answering `prompt_messages`)
    to set `name`; returns its file."""
    path = set_path(folder, name)
    prompt = _prompt(prompt_messages)
    chosen, rejected = _reply(chosen_text, "chosen"), _reply(rejected_text, "rejected")
    if chosen_text.strip() == rejected_text.strip():
        raise BadInput("the two replies are the same: there is nothing to prefer (regenerate for a different one)")
    return _append(path, {"prompt": prompt, "chosen": chosen, "rejected": rejected})


def append_rating(folder: Path, name: str, prompt_messages: list[dict], completion_text: str, liked: bool) -> Path:
    """Add one rating (👍 `liked` or 👎) of the reply `completion_text` to `prompt_messages` to set `name`'s
    ratings file; returns that file."""
    path = ratings_path(folder, name)
    row = {"prompt": _prompt(prompt_messages), "completion": _reply(completion_text, "rated"), "label": bool(liked)}
    return _append(path, row)


def _lines(path: Path) -> int:
    if not path.is_file():
        return 0
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def counts(folder: Path, name: str) -> tuple[int, int]:
    """(pairs, ratings) in set `name`; (0, 0) for a set not written yet."""
    return _lines(set_path(folder, name)), _lines(ratings_path(folder, name))


def list_sets(folder: Path) -> list[str]:
    """The sets in `folder` (either file there), the most recently written first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    names: dict[str, float] = {}
    for p in folder.glob("*.jsonl"):
        name = p.name.removesuffix(".jsonl").removesuffix(RATINGS)
        names[name] = max(names.get(name, 0.0), p.stat().st_mtime)
    return sorted(names, key=lambda n: (-names[n], n))
