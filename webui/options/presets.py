"""Generation presets: YAML files in the presets folder, each a mapping of GenerationParams fields
(missing keys keep their defaults; unknown keys or bad values are refused with the field named)."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from webui.errors import BadInput, NotFound
from webui.options.config import GenerationParams
from webui.paths import inside

_NAME = re.compile(r"^[\w][\w .+-]{0,63}$")


def list_presets(presets_dir: Path) -> list[str]:
    presets_dir = Path(presets_dir)
    return sorted(p.stem for p in presets_dir.glob("*.yaml")) if presets_dir.is_dir() else []


def _path(presets_dir: Path, name: str) -> Path:
    if not _NAME.match(name or ""):
        raise BadInput(f"preset name {name!r}: use letters, digits, spaces, '.', '+', '-' (at most 64)")
    path = Path(presets_dir) / f"{name}.yaml"
    if not inside(presets_dir, path):  # a symlink in the folder pointing elsewhere: neither read nor written
        raise BadInput(f"preset {name!r} leads outside the presets folder {presets_dir}")
    return path


def load_preset(presets_dir: Path, name: str) -> GenerationParams:
    path = _path(presets_dir, name)
    if not path.is_file():
        raise NotFound(f"preset {name!r} not found in {presets_dir}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise BadInput(f"preset {name!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise BadInput(f"preset {name!r} must be a mapping of setting: value")
    try:
        return GenerationParams.from_dict(data)
    except TypeError as e:
        raise BadInput(f"preset {name!r}: {e}") from None


def save_preset(presets_dir: Path, name: str, params: GenerationParams) -> Path:
    path = _path(presets_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(params.to_dict(), sort_keys=False), encoding="utf-8")
    tmp.replace(path)
    return path
