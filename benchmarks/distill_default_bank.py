"""Distil the shipped default bank from the ancestry, then measure the whole WAVE pipeline before fine-tuning.

    python benchmarks/distill_default_bank.py                 # scan, distil, save wave_hf/default_bank, pipeline
    python benchmarks/distill_default_bank.py --skip-distill  # pipeline table only, from the saved bank
    python benchmarks/distill_default_bank.py --quick         # smoke test on the quick ancestry and small data

Stage 1: ``wave_hf.distill.distill`` from the nearest-Kronecker start (``init="teacher"``) on Fashion-MNIST
train; checkpoints go to ``$WAVE_HF_CACHE/distill/<tag>`` so a killed run resumes. ``--scan`` first measures
the auxiliary model's test accuracy at step 0 for several template counts (no training: an SVD each), which is
how the shipped ``num_templates`` was chosen.

Stage 2, per target size: test accuracy right after the fit and before any fine-tuning, for
- ``fitted``: ``wave_hf.fit.fit_model`` (1,000 images, 300 steps, CE + KD from the ancestry; scalers, vector
  templates and head train, templates frozen), the fitted head kept;
- ``default``: ``build`` with the default (unfitted) scalers, plus a linear probe: the head alone trained on
  the same 1,000 images and 300 steps (a new head is random, so without it every start is at chance);
- ``random``: transformers' random init, plus the same linear probe.

Writes ``benchmarks/results/pipeline.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cache_dir  # noqa: E402
from train_ancestry import ancestry_path  # noqa: E402

from wave_hf import WaveInitializer, vit_layout  # noqa: E402
from wave_hf.data import load_image_dataset  # noqa: E402
from wave_hf.distill import (  # noqa: E402
    aux_model,
    config_from_teacher,
    distill,
    init_from_teacher,
    load_teacher,
)
from wave_hf.fit import fit_model  # noqa: E402
from wave_hf.training import StreamBatchSampler, accuracy, collate, seeded_subset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_OUT = ROOT / "wave_hf" / "default_bank"


def parse_size(text: str) -> tuple[int, int]:
    depth, width = text.lower().split("x")
    return int(depth), int(width)


@torch.no_grad()
def cls_features(model: nn.Module, dataset: Any, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    feats, labels = [], []
    enc = vit_layout.encoder(model)
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        feats.append(enc(batch["pixel_values"]).last_hidden_state[:, 0])
        labels.append(batch["labels"])
    return torch.cat(feats), torch.cat(labels)


def linear_probe(model: nn.Module, subset: Any, *, steps: int, batch_size: int, lr: float, seed: int) -> None:
    """Train only ``model.classifier`` (in place) on frozen CLS features: the same images, steps and batch
    stream as the scaler fit, AdamW + cosine, CE."""
    x, y = cls_features(model, subset)
    head = model.classifier
    head.requires_grad_(True)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for idx in StreamBatchSampler(len(x), batch_size, steps, seed):
        loss = nn.functional.cross_entropy(head(x[idx]), y[idx])
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    head.requires_grad_(False)


def scan_templates(teacher: nn.Module, test: Any, counts: list[int], base: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for n in counts:
        bank = init_from_teacher(config_from_teacher(teacher, **{**base, "num_templates": n}), teacher)
        acc = accuracy(aux_model(bank, teacher.config.num_labels, teacher=teacher), test)
        share = bank.num_template_parameters / sum(
            p.numel() for k, p in teacher.named_parameters() if k.endswith("weight") and p.dim() == 2
            and not k.startswith(vit_layout.CLASSIFIER))
        rows.append({"num_templates": n, "aux_accuracy_step0": round(acc, 5), "template_share": round(share, 4)})
        print(f"scan: N={n:3d}  step-0 auxiliary accuracy {acc:.4f}  templates {100 * share:.1f}% of the "
              "teacher's matrices", flush=True)
    return rows


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def write_markdown(res: dict[str, Any], path: Path) -> None:
    b = res["bank"]
    lines = [
        "# WAVE pipeline on Fashion-MNIST (before any fine-tuning)",
        "",
        f"Produced by `benchmarks/distill_default_bank.py` on {res['machine']}; seed {res['seed']}; test accuracy "
        f"on {res['test_images']} Fashion-MNIST test images.",
        "",
        "## Stage 1: the shipped default bank",
        "",
        "| | value |",
        "|---|---|",
        f"| ancestry (teacher, 12 x 192, patch 7) test accuracy | **{res['teacher_accuracy']:.4f}** |",
        f"| auxiliary model at step 0 (nearest-Kronecker init) | {b['aux_accuracy_step0']:.4f} |",
        f"| auxiliary model after distillation | **{b['aux_accuracy']:.4f}** "
        f"({100 * b['aux_accuracy'] / res['teacher_accuracy']:.1f}% of the teacher, "
        f"{100 * (b['aux_accuracy'] - res['teacher_accuracy']):+.2f} points) |",
        f"| templates | D_T = {b['template_width']}, N = {b['num_templates']} per matrix type, "
        f"{b['num_vector_templates']} vector templates; {b['template_params']:,} template parameters "
        f"({100 * b['template_share']:.1f}% of the teacher's matrices) |",
        f"| distillation | {b['steps']} steps x batch {b['batch_size']}, lr {b['lr']}, alpha {b['alpha']}, "
        f"{b['wall_min']:.1f} min |",
        f"| bank folder | {b['folder_mb']:.2f} MB |",
        "",
    ]
    if res.get("scan"):
        lines += [f"Step-0 auxiliary accuracy by template count (teacher init, no training; first "
                  f"{res['scan_images']} test images):", "",
                  "| N | step-0 accuracy | templates / teacher matrices |", "|---|---|---|"]
        lines += [f"| {r['num_templates']} | {r['aux_accuracy_step0']:.4f} | {100 * r['template_share']:.1f}% |"
                  for r in res["scan"]]
        lines.append("")
    f = res["fit"]
    lines += [
        "## Stage 2: per target size, right after the fit",
        "",
        f"Fit: {f['max_images']} training images, {f['steps']} steps x batch {f['batch_size']}, lr {f['lr']} "
        f"(vector templates {f.get('vectors_lr', f['lr'])}), "
        "CE + KD from the ancestry; scalers, vector templates and head train, templates frozen. `default` and "
        "`random` get a linear probe (head only) on the same images and steps.",
        "",
        "| size | random init + probe | WAVE default scalers + probe | WAVE fitted scalers | fitted parameters |"
        " fit time |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["sizes"]:
        lines.append(f"| {r['size']} | {r['random_probe']:.4f} | {r['default_probe']:.4f} | **{r['fitted']:.4f}** | "
                     f"{r['fitted_parameters']:,} | {r['fit_s']:.0f} s |")
    lines.append("")
    path.write_text("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=None, help="ancestry folder (default: the cached ancestry)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--results", default=str(RESULTS / "pipeline"))
    p.add_argument("--template-width", type=int, default=64)
    p.add_argument("--num-templates", type=int, default=8)
    p.add_argument("--num-vector-templates", type=int, default=3)
    p.add_argument("--scan", default="", help="comma list of template counts to scan at step 0 (e.g. 4,6,8,12)")
    p.add_argument("--scan-limit", type=int, default=1000, help="test images used by --scan")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--skip-distill", action="store_true", help="reuse the bank in --out")
    p.add_argument("--sizes", default="4x64,6x128,6x256")
    p.add_argument("--fit-steps", type=int, default=300)
    p.add_argument("--fit-images", type=int, default=1000)
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.steps, args.fit_steps, args.test_limit = 20, 20, 1000
        args.sizes = "2x64"
        args.out = str(cache_dir() / "quick_bank")
        args.results = str(cache_dir() / "quick_pipeline")
    teacher_path = args.teacher or str(ancestry_path(args.quick))
    data = load_image_dataset("fashion_mnist", seed=args.seed, test_limit=args.test_limit,
                              train_limit=5000 if args.quick else None)
    train, test = data["train"], data["test"]
    teacher = load_teacher(teacher_path)
    t0 = time.time()
    teacher_acc = accuracy(teacher, test)
    print(f"teacher {teacher_path}: test accuracy {teacher_acc:.4f} ({time.time() - t0:.0f} s)", flush=True)
    base = dict(template_width=args.template_width, num_vector_templates=args.num_vector_templates)
    res: dict[str, Any] = {"teacher": teacher_path, "teacher_accuracy": round(teacher_acc, 5), "seed": args.seed,
                           "test_images": len(test), "machine": f"{platform.machine()}, "
                           f"{torch.get_num_threads()} torch threads, torch {torch.__version__}"}
    if args.scan:
        scan_set = test.select(range(min(args.scan_limit, len(test))))
        res["scan"] = scan_templates(teacher, scan_set, [int(n) for n in args.scan.split(",")], base)
        res["scan_images"] = len(scan_set)

    out = Path(args.out)
    if not args.skip_distill:
        config = config_from_teacher(teacher, num_templates=args.num_templates, **base)
        tag = f"{Path(teacher_path).name}-D{args.template_width}-N{args.num_templates}-J{args.num_vector_templates}-" \
              f"s{args.steps}-b{args.batch_size}-lr{args.lr}-a{args.alpha}-seed{args.seed}"
        t0 = time.time()
        bank = distill(teacher, train, config=config, init="teacher", steps=args.steps, batch_size=args.batch_size,
                       lr=args.lr, alpha=args.alpha, eval_dataset=test, dataset_name="fashion_mnist",
                       output_dir=cache_dir() / "distill" / tag, checkpoint_every=100, seed=args.seed)
        wall = time.time() - t0
        bank.config.teacher_name_or_path = "wave-hf ancestry fmnist-vit-12x192-p7 (benchmarks/train_ancestry.py)"
        bank.config.metrics = {**bank.config.metrics, "distill_wall_min": round(wall / 60, 1)}
        bank.save_pretrained(out)
        print(f"saved {out} ({folder_mb(out):.2f} MB): {bank.config.metrics}", flush=True)
    init = WaveInitializer.from_pretrained(out)
    m, c = init.config.metrics or {}, init.config
    aux_matrices = c.aux_depth * (4 + 2 * c.mlp_ratio) * c.aux_width**2
    res["bank"] = {
        "path": str(out.relative_to(ROOT)) if out.is_relative_to(ROOT) else str(out),
        "template_width": c.template_width, "num_templates": c.num_templates,
        "num_vector_templates": c.num_vector_templates, "template_params": init.bank.num_template_parameters,
        "template_share": round(init.bank.num_template_parameters / aux_matrices, 4),
        "aux_accuracy_step0": m.get("aux_accuracy_step0"), "aux_accuracy": m.get("aux_accuracy"),
        "steps": m.get("distill_steps"), "batch_size": m.get("distill_batch_size"), "lr": m.get("distill_lr"),
        "alpha": m.get("distill_alpha"), "wall_min": m.get("distill_wall_min", float("nan")),
        "folder_mb": round(folder_mb(out), 3),
    }

    subset = seeded_subset(train, args.fit_images, args.seed)
    fit_kw = dict(max_images=args.fit_images, steps=args.fit_steps, batch_size=64, seed=args.seed)  # lrs: fit's defaults
    from wave_hf.fit import FitConfig

    lrs = {k: getattr(FitConfig(), k) for k in ("lr", "vectors_lr")}
    res["fit"] = {**fit_kw, "lr": lrs["lr"], "vectors_lr": lrs["vectors_lr"] or lrs["lr"] / 10,
                  "kd": "ancestry, kd_weight 1.0"}
    res["sizes"] = []
    id2label = dict(enumerate(train.features["label"].names))
    for text in filter(None, args.sizes.split(",")):  # --sizes "": distil only
        depth, width = parse_size(text)
        t0 = time.time()
        fitted = fit_model(init, depth, width, train, teacher=teacher, id2label=id2label, **fit_kw)
        fit_s = time.time() - t0
        fitted_params = sum(p.numel() for p in init.scalers_for(depth, width).parameters()) + \
            sum(p.numel() for p in fitted.classifier.parameters())
        row = {"size": f"{depth}x{width}", "fitted": round(accuracy(fitted, test), 5), "fit_s": round(fit_s, 1),
               "fitted_parameters": fitted_params}
        default = init.build(depth, width, id2label=id2label, seed=args.seed)
        linear_probe(default, subset, steps=args.fit_steps, batch_size=64, lr=1e-3, seed=args.seed)
        row["default_probe"] = round(accuracy(default, test), 5)
        torch.manual_seed(args.seed)
        from transformers import ViTForImageClassification

        rand = ViTForImageClassification(init.vit_config(depth, width, id2label=id2label)).eval()
        linear_probe(rand, subset, steps=args.fit_steps, batch_size=64, lr=1e-3, seed=args.seed)
        row["random_probe"] = round(accuracy(rand, test), 5)
        res["sizes"].append(row)
        print(f"{text}: {row}", flush=True)

    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    write_markdown(res, results.with_suffix(".md"))
    print(results.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
