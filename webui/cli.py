"""Command line of LoRA Deck: `python -m webui SUBCOMMAND` (the `loradeck` command once installed). `app.py`
is `serve` and `download-model.py` is `download`. The flags of `serve` come from `webui.options.config.ServerConfig`,
so they, the defaults and the help texts have one home; the loader choices come from the registry.

Each subcommand imports its own modules when it runs: `serve` pulls in torch and gradio, which `--help`,
`download` and `inspect` should not wait for. Every LoraDeckError ends a command with one `error:` line.
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
from webui.adapters.types import COMBINATIONS
from webui.errors import BadInput, LoraDeckError
from webui.export import FORMATS
from webui.hub.cli import add_arguments as add_download_arguments
from webui.hub.cli import run_cli
from webui.options.config import EvalConfig, ModelSpec, ServerConfig, TrainConfig
from webui.options.flags import add_arguments, from_namespace
from webui.options.lora_options import yaml_hint
from webui.training import launch


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
    inspect.add_argument("adapter", help="a name in the loras dir, or a path to an adapter folder")
    inspect.add_argument("--model", help="base to check against (a models-dir name or a path; "
                                         "only its config is read, no weights)")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.add_argument("--models-dir", default="models")
    inspect.add_argument("--loras-dir", default="loras")

    publish = sub.add_parser("publish", help="upload an adapter (or an exported model folder) to the hub or S3",
                             description="Upload loras/NAME (or any folder) to a Hugging Face repo (HF_TOKEN or "
                                         "--token; HF_ENDPOINT) or to s3://bucket/prefix (AWS_* variables). An "
                                         "adapter without a model card (README.md) gets one first.")
    publish.add_argument("source", metavar="NAME_OR_PATH", help="an adapter name in the loras dir, or a folder path")
    publish.add_argument("--to", required=True, metavar="DEST", help="hf:ORG/NAME or s3://bucket/prefix")
    publish.add_argument("--private", action="store_true", help="create the hub repo private (an existing repo "
                         "keeps its visibility)")
    publish.add_argument("--token", default=None, help="a hub token with write access (default: HF_TOKEN, or the "
                         "login saved by `hf auth login`)")
    publish.add_argument("--loras-dir", default="loras")
    publish.add_argument("--runs-dir", default="runs", help="training runs (the model card's losses come from here)")

    train = sub.add_parser("train", help="train a LoRA from a YAML config (resumes a run of the same output)")
    train.add_argument("--config", required=True, help="YAML with base_model, dataset, lora, training, output")
    train.add_argument("--models-dir", default="models")
    train.add_argument("--loras-dir", default="loras")
    train.add_argument("--runs-dir", default="runs")
    train.add_argument("--num-processes", type=int, default=0,
                       help="train in N processes (one per GPU; on CPU, N processes sharing the cores) through "
                            "`accelerate launch` (DDP); default: training.num_processes in the YAML, else 1")
    train.add_argument("--accelerate-config", default=None,
                       help="an Accelerate config file (accelerate config), passed to `accelerate launch` unchanged: "
                            "FSDP, DeepSpeed, several machines")

    export = sub.add_parser("export", help="merge adapters into a base and write a model")
    export.add_argument("--model", default="", help="base (default: the embedded SmolLM2)")
    export.add_argument("--lora", action="extend", nargs="+", default=[], help="adapter name(s) or path(s)")
    export.add_argument("--weights", action="extend", nargs="+", type=float, default=[],
                        help="a weight per adapter (default 1.0 each)")
    export.add_argument("--format", required=True, choices=FORMATS)
    export.add_argument("--out", required=True)
    export.add_argument("--quant", default=None, help="GGUF type: F32, F16, BF16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, "
                        "Q4_0, Q4_1, ... (default Q8_0 for models under 3B parameters, else Q4_K_M)")
    export.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8), help="GPTQ: bits per weight (default 4)")
    export.add_argument("--group-size", type=int, default=None,
                        help="GPTQ: weights sharing one scale (default 128, or the largest of 64/32/16 that divides "
                             "the model's layer sizes; -1 = one per column)")
    export.add_argument("--calibration", default=None,
                        help="GPTQ: a text file to calibrate on (default: webui/data/calibration.txt)")
    export.add_argument("--outtype", default=None, choices=("f32", "f16", "q8_0"),
                        help="gguf-lora / ollama: how the LoRA's tensors are stored (default f32, exact)")
    export.add_argument("--models-dir", default="models")
    export.add_argument("--loras-dir", default="loras")

    blend = sub.add_parser("blend", help="combine adapters into a new one (exact for cat; refused where it cannot be)",
                           description="Write loras/NAME, an adapter whose output equals the weighted stack of the "
                                       "--lora adapters ('cat', the default; any ranks, rsLoRA included), or an "
                                       "approximation of it you ask for (linear, svd, ties, dare_*: the deviation is "
                                       "printed). DoRA and lora_bias adapters are refused with the reason.")
    blend.add_argument("--lora", action="extend", nargs="+", default=[], required=True,
                       help="adapter name(s) in the loras dir, or path(s)")
    blend.add_argument("--weights", action="extend", nargs="+", type=float, default=[],
                       help="a weight per adapter (default 1.0 each)")
    blend.add_argument("--combination", default="cat", choices=COMBINATIONS)
    blend.add_argument("--density", type=float, default=None, help="ties / dare: the fraction of values kept "
                       "(default 0.5)")
    blend.add_argument("--model", default="", help="the base the adapters were trained for (default: the embedded "
                       "SmolLM2); blending runs on the transformers loader")
    blend.add_argument("--models-dir", default="models")
    blend.add_argument("--loras-dir", default="loras")
    blend.add_argument("--out", required=True, help="the new adapter's name (written to the loras dir)")

    loras = sub.add_parser("loras", help="the adapter library: list, rename, duplicate, delete, restore, note, tag")
    add_library_arguments(loras)

    evaluate = sub.add_parser("eval", help="loss, perplexity and answers of the base and each adapter, side by side",
                              description="Score the base and each adapter or weighted stack on a dataset (training's "
                                          "formats and loss masking) and write a JSON or HTML report.")
    add_arguments(evaluate, ModelSpec)
    add_arguments(evaluate, EvalConfig)

    llama = sub.add_parser("llama-server-command", help="print the llama-server command that serves a GGUF base "
                           "with our adapters (for --loader remote); converts the adapters to GGUF LoRAs")
    llama.add_argument("--model", required=True, help="the GGUF base (a models-dir name or a path)")
    llama.add_argument("--lora", action="extend", nargs="*", default=[], help="adapter names in the loras dir, or paths")
    llama.add_argument("--binary", default="llama-server", help="the llama-server executable")
    llama.add_argument("--port", type=int, default=8080)
    llama.add_argument("--models-dir", default="models")
    llama.add_argument("--loras-dir", default="loras")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, extra = _parser().parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if extra:
        print(f"error: unrecognized arguments: {' '.join(extra)}", file=sys.stderr)
        return 2
    if args.command == "serve":
        try:
            cfg = from_namespace(ServerConfig, args)
        except BadInput as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        from webui.web.server import serve  # torch, gradio: see the module docstring
        return serve(cfg)
    if args.command == "inspect":
        return _inspect(args)
    if args.command == "export":
        return _export(args)
    if args.command == "blend":
        return _blend(args)
    if args.command == "train":
        return _train(args)
    if args.command == "eval":
        return _eval(args)
    if args.command == "download":
        return run_cli(args)
    if args.command == "publish":
        return _publish(args)
    if args.command == "loras":
        return run_library_cli(args)
    if args.command == "llama-server-command":
        return _llama_server_command(args)
    return 2


def _llama_server_command(args) -> int:
    from webui.adapters.files import locate_adapter  # torch: see the docstring
    from webui.backends.llamacpp.server_cmd import command, convert_for_llama_server, printable
    from webui.backends.models import resolve_model_path

    try:
        base = resolve_model_path(args.model, Path(args.models_dir))
        folders = [locate_adapter(a, Path(args.loras_dir), anywhere=True) for a in args.lora]
        loras = convert_for_llama_server(base, folders)
    except LoraDeckError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(printable(command(args.binary, base, loras, args.port)))
    return 0


def _inspect(args) -> int:
    from webui.adapters.files import load_weights, locate_adapter, read_adapter  # torch: see the docstring
    from webui.adapters.inspect import inspect_adapter

    try:
        path = locate_adapter(args.adapter, Path(args.loras_dir), anywhere=True)
        files = read_adapter(path, path.name)
        state = load_weights(files)
        base = _describe_model(args.model, Path(args.models_dir)) if args.model else None
    except LoraDeckError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    report = inspect_adapter(files, state, base)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.text())
    return 0 if report.compatible else 3


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

    try:
        out = export_model(args.model, args.lora, args.weights, args.format, Path(args.out),
                           Path(args.models_dir), Path(args.loras_dir),
                           progress=lambda f, msg: print(f"[export] {msg}", file=sys.stderr), quant=args.quant,
                           bits=args.bits, group_size=args.group_size,
                           calibration=Path(args.calibration) if args.calibration else None, outtype=args.outtype)
    except LoraDeckError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


def _blend(args) -> int:
    from webui.adapters.exact_blend import RECORD  # torch: see the docstring
    from webui.adapters.files import locate_adapter
    from webui.engine import Engine

    weights = args.weights or [1.0] * len(args.lora)
    if len(weights) != len(args.lora):
        print(f"error: {len(weights)} weight(s) given for {len(args.lora)} adapter(s)", file=sys.stderr)
        return 2
    engine = Engine(Path(args.models_dir), Path(args.loras_dir))
    try:
        paths = {Path(n).name: locate_adapter(n, Path(args.loras_dir), anywhere=True) for n in args.lora}
        engine.load(ModelSpec(model=args.model, loader="transformers"))
        out = engine.blend_adapters(dict(zip(paths, weights)), args.out, args.combination, args.density, paths=paths)
    except LoraDeckError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        engine.unload()
    record = json.loads((out / RECORD).read_text()) if (out / RECORD).is_file() else {}
    if record.get("note"):
        print(f"[blend] {args.out} {record['note']}", file=sys.stderr)
    print(out)
    return 0


def _train(args) -> int:
    from webui.training.trainer import train  # torch: see the docstring

    path = Path(args.config)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        cfg = TrainConfig.from_dict(data)
    except OSError as e:
        print(f"error: cannot read {path}: {e}", file=sys.stderr)
        return 2
    except (yaml.YAMLError, BadInput) as e:
        print(f"error: {path.name}: {e}{yaml_hint(e)}", file=sys.stderr)
        return 2
    files = [_beside(Path(p), path.parent) for p in cfg.dataset.paths]
    cfg.dataset.path = files if isinstance(cfg.dataset.path, list) else files[0]
    num_processes = args.num_processes or cfg.training.num_processes
    if num_processes < 1:
        print("error: --num-processes must be at least 1", file=sys.stderr)
        return 2
    if launch.wanted(num_processes, args.accelerate_config):
        return _launch(args, cfg, num_processes)
    launch.die_with_launcher()
    try:
        train(cfg, Path(args.models_dir), Path(args.loras_dir), Path(args.runs_dir),
              log=lambda msg: print(msg, flush=True))
    except LoraDeckError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _launch(args, cfg: TrainConfig, num_processes: int) -> int:
    """Check the run here (fast errors, one copy of the embedded model), then run the same command in
    `num_processes` processes under accelerate launch."""
    from webui.training.trainer import launched  # torch: see the docstring

    dirs = [Path(args.models_dir), Path(args.loras_dir), Path(args.runs_dir)]
    train_args = ["--config", args.config, "--models-dir", args.models_dir, "--loras-dir", args.loras_dir,
                  "--runs-dir", args.runs_dir]
    try:
        return launched(cfg, *dirs, lambda: launch.run(train_args, num_processes, args.accelerate_config),
                        num_processes, log=lambda msg: print(msg, flush=True))
    except LoraDeckError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _publish(args) -> int:
    from webui.hub.publish import publish  # huggingface_hub, boto3: see the docstring

    try:
        url = publish(args.source, args.to, loras_dir=Path(args.loras_dir), runs_dir=Path(args.runs_dir),
                      token=args.token, private=args.private, anywhere=True,
                      progress=lambda f, msg: print(f"[publish] {msg}", file=sys.stderr, flush=True))
    except LoraDeckError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(url)
    return 0


def _eval(args) -> int:
    from webui.evaluate.run import run_cli  # torch: see the docstring

    try:
        spec, cfg = from_namespace(ModelSpec, args), from_namespace(EvalConfig, args)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        paths = run_cli(spec, cfg, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except LoraDeckError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for path in paths:
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
