"""Saved conversations: one JSON file per conversation under the user folder
(`user_data/conversations/NAME.json`), holding the messages, the system prompt and which model and
adapters answered. Names are plain file names; nothing is written outside that folder."""
from __future__ import annotations

import datetime
import json
import re
from pathlib import Path

from webui.errors import BadInput, NotFound
from webui.paths import inside

NAME = re.compile(r"^[\w][\w .+-]{0,79}$")  # a plain file name; the preference sets (webui.preferences) take the same


def _path(folder: Path, name: str) -> Path:
    name = (name or "").strip()
    if not NAME.match(name):
        raise BadInput(f"conversation name {name!r}: use letters, digits, spaces, '.', '+', '-' (at most 80)")
    path = Path(folder) / f"{name}.json"
    if not inside(folder, path):  # a symlink in the folder pointing elsewhere: neither read nor written
        raise BadInput(f"conversation {name!r} leads outside the conversations folder {folder}")
    return path


def list_conversations(folder: Path) -> list[str]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    files = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    return [p.stem for p in files]


def save_conversation(folder: Path, name: str, messages: list[dict], system: str = "", model: str = "",
                      adapters: dict | None = None) -> Path:
    path = _path(folder, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"name": path.stem, "saved": datetime.datetime.now().isoformat(timespec="seconds"), "model": model,
            "adapters": adapters or {}, "system": system,
            "messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)
    return path


def load_conversation(folder: Path, name: str) -> dict:
    path = _path(folder, name)
    if not path.is_file():
        raise NotFound(f"conversation {name!r} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in data["messages"]]
    except (ValueError, KeyError, TypeError) as e:
        raise BadInput(f"conversation {name!r} is damaged: {e}") from None
    return {**data, "messages": messages}
