"""Command line of LoRA Deck: `python -m webui SUBCOMMAND` (the `loradeck` command once installed). `app.py`
is `serve` and `download-model.py` is `download`. Every subcommand's flags come from an options dataclass (`serve`:
ServerConfig, `eval`: ModelSpec + EvalConfig, the tools: webui/options/commands.py), so flags, defaults and help
texts have one home; `download` keeps text-generation-webui's flags and `loras` its own sub-subcommands.

Each subcommand imports its own modules when it runs: `serve` pulls in torch and gradio, which `--help`,
`download` and `inspect` should not wait for. One wrapper in `main` ends every command a user's input fails with one
`error:` line: exit status 2 for flags that do not make sense, 1 for any other LoraDeckError.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import yaml

from webui.adapters.library_cli import add_arguments as add_library_arguments
from webui.adapters.library_cli import run as run_library_cli
from webui.errors import BadInput, LoraDeckError
from webui.hub.cli import add_arguments as add_download_arguments
from webui.hub.cli import run_cli
from webui.options.commands import (
    BlendOptions,
    ConvertOptions,
    ExportOptions,
    ExtractOptions,
    InspectOptions,
    LlamaServerCommandOptions,
    PublishOptions,
    ResizeOptions,
    TrainOptions,
)
from webui.options.config import EvalConfig, ModelSpec, ServerConfig
from webui.options.flags import add_arguments, from_namespace
from webui.options.lora_options import yaml_hint
from webui.options.training import TrainConfig
from webui.quiet import quiet_libraries
from webui.training import launch

SURGERY = (("extract", ExtractOptions, "a LoRA from a fine-tuned model and its base (truncated SVD of T − B)"),
           ("resize", ResizeOptions, "re-factor an adapter to another rank (SVD of each layer's scaled B·A)"),
           ("convert", ConvertOptions, "rewrite a DoRA adapter as a plain LoRA (reads the base's weights)"))


def _parser() -> argparse.ArgumentParser:
    prog = "loradeck" if Path(sys.argv[0]).name == "loradeck" else "python -m webui"
    parser = argparse.ArgumentParser(prog=prog, description="LoRA Deck: local LLMs and LoRA adapters.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start the web UI (/) and the API (/v1); same as app.py")
    add_arguments(serve, ServerConfig)
    download = sub.add_parser("download", help="download a model or adapter; same as download-model.py",
                              description="Download a model or LoRA from the Hugging Face hub (HF_ENDPOINT, "
                                          "HF_TOKEN), S3 (s3://bucket/prefix; AWS_* variables) or a local path.")
    add_download_arguments(download)

    inspect = sub.add_parser("inspect", help="does an adapter fit a base? the compatibility report")
    add_arguments(inspect, InspectOptions)
    publish = sub.add_parser("publish", help="upload an adapter (or an exported model folder) to the hub or S3",
                             description="Upload loras/NAME (or any folder) to a Hugging Face repo (HF_TOKEN or "
                                         "--token; HF_ENDPOINT) or to s3://bucket/prefix (AWS_* variables). An "
                                         "adapter without a model card (README.md) gets one first.")
    add_arguments(publish, PublishOptions)
    train = sub.add_parser("train", help="train a LoRA from a YAML config (resumes a run of the same output)")
    add_arguments(train, TrainOptions)
    export = sub.add_parser("export", help="merge adapters into a base and write a model")
    add_arguments(export, ExportOptions)
    blend = sub.add_parser("blend", help="combine adapters into a new one (exact for cat; refused where it cannot be)",
                           description="Write loras/NAME, an adapter whose output equals the weighted stack of the "
                                       "--lora adapters ('cat', the default; any ranks, rsLoRA included), or an "
                                       "approximation of it you ask for (linear, svd, ties, dare_*: the deviation is "
                                       "printed). DoRA and lora_bias adapters are refused with the reason.")
    add_arguments(blend, BlendOptions)

    for name, cls, what in SURGERY:  # adapter surgery: webui/adapters/surgery/
        add_arguments(sub.add_parser(name, help=what, description=" ".join(cls.__doc__.split())), cls)

    loras = sub.add_parser("loras", help="the adapter library: list, rename, duplicate, delete, restore, note, tag")
    add_library_arguments(loras)

    evaluate = sub.add_parser("eval", help="loss, perplexity and answers of the base and each adapter, side by side",
                              description="Score the base and each adapter or weighted stack on a dataset (training's "
                                          "formats and loss masking) and write a JSON or HTML report.")
    add_arguments(evaluate, ModelSpec)
    add_arguments(evaluate, EvalConfig)

    llama = sub.add_parser("llama-server-command", help="print the llama-server command that serves a GGUF base "
                           "with our adapters (for --loader remote); converts the adapters to GGUF LoRAs")
    add_arguments(llama, LlamaServerCommandOptions)
    return parser


class _BadFlags(Exception):
    """Options that do not make sense together or fail their checks: exit status 2, as argparse's own errors."""


def _options(cls, args):
    """The options dataclass of a subcommand from its parsed flags; a value its checks refuse is a usage error."""
    try:
        return from_namespace(cls, args)
    except BadInput as e:
        raise _BadFlags(str(e)) from None


# the commands that load a model or adapters into torch (and so, through PEFT, GPTQModel)
MODEL_COMMANDS = {"serve", "train", "export", "blend", "eval", "extract", "resize", "convert"}


def main(argv: list[str] | None = None) -> int:
    args, extra = _parser().parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command in MODEL_COMMANDS:  # the light commands never import the noisy libraries (see webui/quiet.py)
        quiet_libraries()
    if extra:
        print(f"error: unrecognized arguments: {' '.join(extra)}", file=sys.stderr)
        return 2
    commands = {"serve": _serve, "inspect": _inspect, "export": _export, "blend": _blend, "train": _train,
                "eval": _eval, "download": run_cli, "publish": _publish, "loras": run_library_cli,
                "llama-server-command": _llama_server_command, **dict.fromkeys(("extract", "resize", "convert"),
                                                                                _surgery)}
    # one error wrapper: every command's failure a user can cause is one `error:` line
    try:
        return commands[args.command](args)
    except _BadFlags as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except LoraDeckError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _serve(args) -> int:
    cfg = _options(ServerConfig, args)
    from webui.web.server import serve  # torch, gradio: see the module docstring

    return serve(cfg)


def _llama_server_command(args) -> int:
    from webui.adapters.files import locate_adapter  # torch: see the docstring
    from webui.backends.llamacpp.server_cmd import command, convert_for_llama_server, printable
    from webui.backends.models import resolve_model_path

    o = _options(LlamaServerCommandOptions, args)
    base = resolve_model_path(o.model, Path(o.models_dir))
    folders = [locate_adapter(a, Path(o.loras_dir), anywhere=True) for a in o.lora]
    loras = convert_for_llama_server(base, folders)
    print(printable(command(o.binary, base, loras, o.port)))
    return 0


def _inspect(args) -> int:
    from webui.adapters.files import load_weights, locate_adapter, read_adapter  # torch: see the docstring
    from webui.adapters.inspect import inspect_adapter
    from webui.adapters.surgery.runtimes import check_runtime

    o = _options(InspectOptions, args)
    path = locate_adapter(o.adapter, Path(o.loras_dir), anywhere=True)
    files = read_adapter(path, path.name)
    state = load_weights(files)
    base = _describe_model(o.model, Path(o.models_dir)) if o.model else None
    report = inspect_adapter(files, state, base)
    target = check_runtime(files, state, o.target, o.max_lora_rank) if o.target else None
    if o.json:
        print(json.dumps({**report.to_dict(), **({"target": target.to_dict()} if target else {})}, indent=2))
    else:
        print(report.text() + (f"\n{target.text()}" if target else ""))
    return 0 if report.compatible and (target is None or target.runs) else 3


def _surgery(args) -> int:
    from webui.adapters.surgery.cli import run  # torch: see the docstring

    return run(args.command, _options(next(cls for name, cls, _ in SURGERY if name == args.command), args))


def _describe_model(model: str, models_dir):
    """The base's adaptable layers from its config alone (built on the meta device: no weights read)."""
    from transformers import AutoConfig  # torch: see the docstring

    from webui.adapters.targets import describe_config
    from webui.backends.models import resolve_model_path

    path = resolve_model_path(model, models_dir)
    if not (path.is_dir() and (path / "config.json").is_file()):
        raise BadInput(f"{path.name}: inspect --model needs a transformers model folder (with config.json)")
    try:
        return describe_config(AutoConfig.from_pretrained(str(path), local_files_only=True), path.name)
    except Exception as e:
        raise BadInput(f"{path.name}: config.json is broken: {e}") from None


def _export(args) -> int:
    from webui.export.run import export_model  # torch, gguf, llama.cpp: see the docstring

    o = _options(ExportOptions, args)
    out = export_model(o.model, o.lora, o.weights, o.format, Path(o.out), Path(o.models_dir), Path(o.loras_dir),
                       progress=lambda f, msg: print(f"[export] {msg}", file=sys.stderr), quant=o.quant,
                       bits=o.bits, group_size=o.group_size,
                       calibration=Path(o.calibration) if o.calibration else None, outtype=o.outtype)
    print(out)
    return 0


def _blend(args) -> int:
    from webui.adapters.exact_blend import RECORD  # torch: see the docstring
    from webui.adapters.files import locate_adapter
    from webui.engine import Engine

    o = _options(BlendOptions, args)
    weights = o.weights or [1.0] * len(o.lora)
    if len(weights) != len(o.lora):
        raise _BadFlags(f"{len(weights)} weight(s) given for {len(o.lora)} adapter(s)")
    engine = Engine(Path(o.models_dir), Path(o.loras_dir))
    try:
        paths = {Path(n).name: locate_adapter(n, Path(o.loras_dir), anywhere=True) for n in o.lora}
        engine.load(ModelSpec(model=o.model, loader="transformers"))
        out = engine.blend_adapters(dict(zip(paths, weights)), o.out, o.combination, o.density, paths=paths)
    finally:
        engine.unload()
    record = json.loads((out / RECORD).read_text()) if (out / RECORD).is_file() else {}
    if record.get("note"):
        print(f"[blend] {o.out} {record['note']}", file=sys.stderr)
    print(out)
    return 0


def _train(args) -> int:
    from webui.training.trainer import train  # torch: see the docstring

    o = _options(TrainOptions, args)
    path = Path(o.config)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        cfg = TrainConfig.from_dict(data)
    except OSError as e:
        raise _BadFlags(f"cannot read {path}: {e}") from None
    except (yaml.YAMLError, BadInput) as e:
        raise _BadFlags(f"{path.name}: {e}{yaml_hint(e)}") from None
    files = [_beside(Path(p), path.parent) for p in cfg.dataset.paths]
    cfg.dataset.path = files if isinstance(cfg.dataset.path, list) else files[0]
    num_processes = o.num_processes or cfg.training.num_processes
    if num_processes < 1:
        raise _BadFlags("--num-processes must be at least 1")
    if launch.wanted(num_processes, o.accelerate_config):
        return _launch(o, cfg, num_processes)
    launch.die_with_launcher()
    train(cfg, Path(o.models_dir), Path(o.loras_dir), Path(o.runs_dir), log=lambda msg: print(msg, flush=True))
    return 0


def _launch(o: TrainOptions, cfg: TrainConfig, num_processes: int) -> int:
    """Check the run here (fast errors, one copy of the embedded model), then run the same command in
    `num_processes` processes under accelerate launch."""
    from webui.training.trainer import launched  # torch: see the docstring

    dirs = [Path(o.models_dir), Path(o.loras_dir), Path(o.runs_dir)]
    train_args = ["--config", o.config, "--models-dir", o.models_dir, "--loras-dir", o.loras_dir,
                  "--runs-dir", o.runs_dir]
    return launched(cfg, *dirs, lambda: launch.run(train_args, num_processes, o.accelerate_config),
                    num_processes, log=lambda msg: print(msg, flush=True))


def _publish(args) -> int:
    from webui.hub.publish import publish  # huggingface_hub, boto3: see the docstring

    o = _options(PublishOptions, args)
    url = publish(o.source, o.to, loras_dir=Path(o.loras_dir), runs_dir=Path(o.runs_dir), token=o.token,
                  private=o.private, anywhere=True,
                  progress=lambda f, msg: print(f"[publish] {msg}", file=sys.stderr, flush=True))
    print(url)
    return 0


def _eval(args) -> int:
    from webui.evaluate.run import run_cli  # torch: see the docstring

    spec, cfg = _options(ModelSpec, args), _options(EvalConfig, args)
    for path in run_cli(spec, cfg, log=lambda msg: print(msg, file=sys.stderr, flush=True)):
        print(path)
    return 0


def _beside(dataset: Path, config_dir: Path) -> str:
    """A dataset path as given, or relative to the config file's folder when only that one exists."""
    if not dataset.is_absolute() and not dataset.exists() and (config_dir / dataset).exists():
        return str(config_dir / dataset)
    return str(dataset)


def serve_main() -> int:
    """`python app.py [flags]`."""
    return main(["serve", *sys.argv[1:]])


def download_main() -> int:
    """`python download-model.py REPO [flags]`."""
    return main(["download", *sys.argv[1:]])
