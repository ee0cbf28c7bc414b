"""Options and presets: bad values are refused with the field named; the shipped presets load; a saved
preset reads back the same; the CLI flags come from the same dataclasses."""
import argparse

import pytest

from tests.helpers import ROOT
from webui.errors import BadInput
from webui.options.config import GenerationParams, ModelSpec, ServerConfig
from webui.options.flags import add_arguments, from_namespace
from webui.options.presets import list_presets, load_preset, save_preset


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"top_k": 2.5}, "top_k"),
])
def test_bad_generation_values_name_the_field(kwargs, field):
    with pytest.raises(BadInput, match=field):
        GenerationParams(**kwargs)


def test_bad_choice_lists_allowed_values():
    with pytest.raises(BadInput, match="dtype: 'int8' is not one of: auto, float32, bfloat16, float16"):
        ModelSpec(dtype="int8")


def test_unknown_setting_is_named():
    with pytest.raises(BadInput, match="temprature"):
        GenerationParams.from_dict({"temprature": 0.5})


def test_shipped_presets_all_load():
    names = list_presets(ROOT / "presets")
    assert {"Default", "Greedy", "Creative", "Precise"} <= set(names)
    for name in names:
        assert isinstance(load_preset(ROOT / "presets", name), GenerationParams)
    assert load_preset(ROOT / "presets", "Greedy").greedy


def test_preset_round_trip_and_bad_names(tmp_path):
    p = GenerationParams(temperature=0.42, top_k=7, stop=["###", "\nUser:"], seed=9)
    save_preset(tmp_path, "mine", p)
    assert load_preset(tmp_path, "mine") == p
    with pytest.raises(BadInput, match="preset name"):
        save_preset(tmp_path, "../escape", p)
    (tmp_path / "bad.yaml").write_text("top_p: 7\n")
    with pytest.raises(BadInput, match="top_p"):
        load_preset(tmp_path, "bad")


def test_cli_flags_come_from_server_config():
    parser = argparse.ArgumentParser()
    add_arguments(parser, ServerConfig)
    cfg = from_namespace(ServerConfig, parser.parse_args(
        ["--model", "m", "--loader", "transformers", "--dtype", "bfloat16", "--listen-host", "0.0.0.0",
         "--port", "7861", "--auth", "u:p", "--models-dir", "/x"]))
    assert (cfg.spec.model, cfg.spec.loader, cfg.spec.dtype, cfg.listen_host, cfg.port, cfg.auth, cfg.models_dir) == \
        ("m", "transformers", "bfloat16", "0.0.0.0", 7861, "u:p", "/x")
    assert from_namespace(ServerConfig, parser.parse_args([])).listen_host == "127.0.0.1"
    with pytest.raises(SystemExit):
        parser.parse_args(["--loader", "exllama"])
