"""Data efficiency (issue 17): test accuracy against the number of training images, per initialization.

    python benchmarks/data_efficiency.py --quick --workers 2   # 6x128, n_train 50 .. 2000, 3 seeds: 38 min measured (1 worker, shared cores)
    python benchmarks/data_efficiency.py                       # the full budget: larger splits, 300 steps (~1.5 h)
    python benchmarks/data_efficiency.py --smoke               # every code path at a tiny budget (1 seed: not a result)

Protocol (issue 15, ``protocol.py``), on Fashion-MNIST, the teacher's own task (the in-domain regime):

- **Splits.** Per seed, ``protocol.splits`` draws ``max(n_train)`` training and ``n_val`` validation images from
  the train side; the training set at ``n`` is the first ``n`` of them, so the sets are nested (the set at 100
  holds the set at 50) and validation and test are the same for every ``n``. Test is the fixed test split.
- **Methods.** Random init, Weight Selection + the same fitting pass (``weight_selection_matched``) and WAVE
  fitted (``wave_fitted``), built by ``init_sizes.build_start``. The two fitting methods fit on the ``n``
  training images only (at most ``fit_images`` of them), with the same steps and batch; their fit lr is fixed
  in advance (``FIT_LR``).
- **Fine-tune: a fixed number of optimizer steps for every ``n``** (``ft_steps``, batch 64, the whole set per
  step below 64 images), chosen in advance: a fixed number of epochs would give the smallest sets one or two
  steps. Stock ``Trainer`` through ``init_sizes.finetune`` (AdamW wd 0.05, cosine, no warm-up).
- **Choices.** The fine-tune lr is chosen on validation from the same ``ft_lrs`` for every method (with
  ``--layer-decay-candidates``, crossed with those layer-wise lr decays); test is scored once, for the chosen
  candidate. 3 seeds; mean +- std over seeds; ``protocol.win`` for WAVE against each other method at each ``n``.

Reported: the table (``n_train`` x method), the smallest ``n`` at which WAVE's mean reaches random init's mean at
the largest ``n`` and its ratio to that ``n`` (issue 17's goal: <= 1/10), and ``data_efficiency.png``.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import init_sizes  # noqa: E402
import protocol  # noqa: E402
from init_sizes import Budget, accuracy, build_start, cross_layer_decays, finetune  # noqa: E402
from protocol import RESULTS, SEEDS, choose_on_validation, mean_spread, win  # noqa: E402

REGIME = "fashion_mnist"
METHODS = ["random", "weight_selection_matched", "wave_fitted"]
LABELS = {"random": "random init", "weight_selection_matched": "Weight Selection + fitting (budget-matched)",
          "wave_fitted": "WAVE fitted"}
#: Fit lr of each fitting method, fixed in advance: what ``init_sizes --quick`` chose on validation at 6x128 for
#: every seed (WAVE 1e-2, its library default; matched Weight Selection 3e-4, below its library default 1e-3).
FIT_LR = {"wave_fitted": 1e-2, "weight_selection_matched": 3e-4}
GOAL_RATIO = 0.1  # issue 17: WAVE matches random init's accuracy with <= 1/10 of the data


@dataclass
class Curve:
    """Everything that sets the cost of one run; the same for every method, fixed in advance."""

    sizes: list[tuple[int, int]]
    n_trains: list[int]
    n_val: int
    n_test: int
    pool: int  # train-side pool the seeds draw max(n_trains) + n_val images from
    ft_steps: int  # optimizer steps of every fine-tune, whatever n
    ft_lrs: list[float]
    fit_steps: int
    fit_images: int
    fit_batch: int
    seeds: list[int] = field(default_factory=lambda: list(SEEDS))
    layer_decays: list[float] = field(default_factory=lambda: [1.0])
    batch_size: int = 64

    def budget(self) -> Budget:
        """The ``init_sizes.Budget`` that ``build_start`` and the split cache read (split sizes, fit budget)."""
        return Budget(sizes=self.sizes, n_train=max(self.n_trains), n_val=self.n_val, n_test=self.n_test,
                      pool=self.pool, ft_epochs=1.0, fit_steps=self.fit_steps, fit_images=self.fit_images,
                      fit_batch=self.fit_batch, seeds=self.seeds, regimes=[REGIME])

    @property
    def search_budget(self) -> int:
        return len(self.ft_lrs) * len(self.layer_decays)


N_TRAINS = [50, 100, 200, 500, 1000, 2000]
#: ``full``: init_sizes' FULL splits, lrs and fit budget, 300 steps (~1.5 h on 2 cores). ``quick``: init_sizes'
#: QUICK splits and fit budget, 64 steps (2 epochs at n = 2000), two lrs around what validation chose at 6x128
#: before (5e-4 for every method in ``init_sizes --quick``; 2.5e-4 for random init on 2 of 3 seeds): 54 points,
#: ~12 min on 2 idle cores with ``--workers 2``.
BUDGETS = {
    "full": Curve(sizes=[(6, 128)], n_trains=N_TRAINS, n_val=1000, n_test=5000, pool=6000, ft_steps=300,
                  ft_lrs=list(init_sizes.FT_LRS), fit_steps=100, fit_images=1000, fit_batch=64),
    "quick": Curve(sizes=[(6, 128)], n_trains=N_TRAINS, n_val=500, n_test=1000, pool=3500, ft_steps=128,
                   ft_lrs=[5e-4, 2e-3], fit_steps=100, fit_images=1000, fit_batch=32),
    "smoke": Curve(sizes=[(2, 64)], n_trains=[50, 200], n_val=100, n_test=1000, pool=3500, ft_steps=4,
                   ft_lrs=[5e-4, 1e-3], fit_steps=3, fit_images=64, fit_batch=16, seeds=[0]),
}
NOTES = {
    "quick": "Quick budget (`--quick`): smaller validation/test splits, a short fine-tune and fit; random init at "
             "the largest n is far from converged, so the reach ratio is a statement about this budget only.",
    "smoke": "Smoke budget (`--smoke`): a check that every code path runs, 1 seed and tiny steps; not a result.",
}


def candidates(curve: Curve) -> list[tuple[str, dict[str, float]]]:
    """The same fine-tune candidates for every method (the search budget)."""
    return cross_layer_decays([(f"ft lr {lr:g}", {"ft_lr": lr}) for lr in curve.ft_lrs], curve.layer_decays)


def image_passes(n: int, steps: int, batch: int) -> int:
    """Images the fine-tune's ``steps`` batches hold: full batches of ``batch``, each epoch's last one smaller."""
    per_epoch = [min(batch, n - s) for s in range(0, n, batch)]
    epochs, rest = divmod(steps, len(per_epoch))
    return epochs * n + sum(per_epoch[:rest])


# ---------------------------------------------------------------------------------------- one point
def run_point(job: tuple[str, int, int, Curve, str, int, int]) -> dict[str, Any]:
    """One method at one (size, n_train, seed): every candidate scored on validation, the chosen one on test.
    The job's first fields are ``init_sizes.run_cell``'s, so ``run_parallel`` orders it by the same cost."""
    regime, depth, width, curve, method, seed, n = job
    budget = curve.budget()
    full = init_sizes._data(regime, budget, seed)
    d = {"train": full["train"].select(range(n)), "val": full["val"], "test": full["test"]}
    row: dict[str, Any] = {"method": method, "label": LABELS[method], "regime": regime, "size": f"{depth}x{width}",
                           "depth": depth, "width": width, "seed": seed, "n_train": n}
    t0 = time.perf_counter()
    try:
        start = build_start(method, regime, depth, width, budget, seed, FIT_LR.get(method), data=d)
    except ValueError as err:
        if "cannot build a model" not in str(err):
            raise
        return {**row, "na": True, "reason": str(err)}

    def score(cfg):
        model = copy.deepcopy(start)
        finetune(model, d["train"], epochs=1.0, max_steps=curve.ft_steps, learning_rate=cfg["ft_lr"], seed=seed,
                 batch_size=curve.batch_size, layer_decay=cfg.get("layer_decay", 1.0))
        return accuracy(model, d["val"]), model

    cands = candidates(curve)
    chosen, model, record = choose_on_validation(
        cands, score, what=f"data_efficiency {regime} {depth}x{width} n={n} seed {seed} {method}")
    fit_images = curve.fit_steps * curve.fit_batch if method in init_sizes.FITTING else 0
    ft_images = image_passes(n, curve.ft_steps, curve.batch_size)
    row.update(na=False, chosen=chosen, **dict(cands)[chosen], fit_lr=FIT_LR.get(method), selection=record,
               acc_val=record["scores"][chosen], acc=accuracy(model, d["test"]), acc_init=accuracy(start, d["test"]),
               params=sum(p.numel() for p in model.parameters()), seconds=time.perf_counter() - t0,
               fit_image_passes=fit_images, ft_image_passes=ft_images, images_seen=fit_images + ft_images,
               n_val=len(d["val"]), n_test=len(d["test"]))
    print(f"[{depth}x{width} n={n} s{seed}] {method}: {chosen}: start {100 * row['acc_init']:.1f} -> "
          f"{100 * row['acc']:.1f} (val {100 * row['acc_val']:.1f}, {row['seconds']:.0f}s)", flush=True)
    return row


# ------------------------------------------------------------------------------------------ summary
def _log_crossing(points: list[tuple[int, float]], target: float) -> float | None:
    """``n`` where the curve first reaches ``target``, linear in log n between the two points around it."""
    for (n0, a0), (n1, a1) in zip(points, points[1:]):
        if a0 < target <= a1:
            t = (target - a0) / (a1 - a0)
            return math.exp(math.log(n0) + t * (math.log(n1) - math.log(n0)))
    return float(points[0][0]) if points and points[0][1] >= target else None


def summarize(rows: list[dict[str, Any]], curve: Curve, methods: Sequence[str] = tuple(METHODS)) -> dict[str, Any]:
    """Per (size, n, method): mean/std/min/max over seeds; per size, the n at which each method reaches random
    init's mean at the largest n; WAVE fitted (the last method) against each other one at each n."""
    ref, largest = methods[-1], max(curve.n_trains)
    cells, versus, reach = [], [], []
    for d, w in curve.sizes:
        size = f"{d}x{w}"
        per = {(n, m): sorted((r for r in rows if r["size"] == size and r["n_train"] == n and r["method"] == m
                               and not r["na"]), key=lambda r: r["seed"]) for n in curve.n_trains for m in methods}
        for (n, m), rr in per.items():
            if rr:
                cells.append({"size": size, "n_train": n, "method": m, "label": LABELS[m], "params": rr[0]["params"],
                              "seeds": [r["seed"] for r in rr], "acc": mean_spread(r["acc"] for r in rr),
                              "acc_init": mean_spread(r["acc_init"] for r in rr),
                              "images_seen": rr[0]["images_seen"], "chosen": [r["chosen"] for r in rr]})
            ours = per[(n, ref)]
            seeds = sorted({r["seed"] for r in ours} & {r["seed"] for r in rr})
            if m != ref and len(seeds) >= 3:  # no verdict without the protocol's seeds
                a = [r["acc"] for r in ours if r["seed"] in seeds]
                b = [r["acc"] for r in rr if r["seed"] in seeds]
                versus.append({"size": size, "n_train": n, "other": m, "label": LABELS[m], "seeds": seeds,
                               "wave": mean_spread(a), "baseline": mean_spread(b), **win(a, b)})
        target_rows = per.get((largest, "random"))
        if not target_rows:
            continue
        target = mean_spread(r["acc"] for r in target_rows)["mean"]
        for m in methods:
            points = [(n, mean_spread(r["acc"] for r in per[(n, m)])["mean"]) for n in sorted(curve.n_trains)
                      if per[(n, m)]]
            first = next((n for n, a in points if a >= target), None)
            reach.append({"size": size, "method": m, "label": LABELS[m], "target": target, "target_n": largest,
                          "n": first, "ratio": None if first is None else first / largest,
                          "meets_goal": first is not None and first / largest <= GOAL_RATIO,
                          "n_log_interpolated": _log_crossing(points, target)})
    return {"cells": cells, "wave_vs": versus, "reach": reach, "goal_ratio": GOAL_RATIO}


def _ms(s: dict[str, float]) -> str:
    return f"{100 * s['mean']:.1f} +- {100 * s['std']:.1f}"


def _ratio(r: dict[str, Any]) -> str:
    if r["n"] is None:
        return f"not reached up to n = {r['target_n']}"
    frac = f"1/{r['target_n'] / r['n']:.3g}" if r["n"] < r["target_n"] else "1"
    interp = r["n_log_interpolated"]
    return (f"n = {r['n']} ({frac} of {r['target_n']}; log-interpolated crossing n ~ {interp:.0f}) "
            f"{'meets' if r['meets_goal'] else 'misses'} the goal <= 1/{1 / GOAL_RATIO:g}")


def markdown(summary: dict[str, Any], config: dict[str, Any]) -> list[str]:
    c = config["curve"]
    methods = list(config["methods"])
    lines = [f"**Budget: `{config['budget']}`; {len(c['seeds'])} seed(s) {c['seeds']}.** "
             f"Teacher: {config['teacher']}. Bank: `{config['bank']}`.", "",
             f"Fashion-MNIST (the teacher's task). Per seed: {max(c['n_trains'])} training images drawn once from the "
             f"train side, the set at n being the first n of them (nested); {c['n_val']} validation images (train "
             f"side, the same for every n) and {c['n_test']} test images (fixed). **Fine-tune: a fixed "
             f"{c['ft_steps']} optimizer steps for every n** (chosen in advance; batch {c['batch_size']}, the whole "
             f"set per step below {c['batch_size']} images), stock `Trainer`, AdamW wd 0.05, cosine, no warm-up. "
             f"Search budget: {config['search_budget']} candidates per method and point, chosen on validation: "
             f"fine-tune lr from {c['ft_lrs']}, the same for every method"
             + (f", crossed with the layer-wise lr decay from {c['layer_decays']}" if c["layer_decays"] != [1.0]
                else "") + ". "
             f"Fitting methods: {c['fit_steps']} steps x batch {c['fit_batch']} on at most {c['fit_images']} of the "
             f"n training images (never more than n), fit lr fixed in advance ({config['fit_lr']}).", "",
             "Test accuracy %, mean +- std over seeds, after fine-tuning:", ""]
    for d, w in c["sizes"]:
        size = f"{d}x{w}"
        cells = {(x["n_train"], x["method"]): x for x in summary["cells"] if x["size"] == size}
        if not cells:
            continue
        lines += [f"## {size}", "", "| n_train | " + " | ".join(LABELS[m] for m in methods) + " |",
                  "|---|" + "---|" * len(methods)]
        for n in c["n_trains"]:
            lines.append(f"| {n} | " + " | ".join(_ms(cells[(n, m)]["acc"]) if (n, m) in cells else "n/a"
                                                  for m in methods) + " |")
        lines += ["", "Start (before fine-tuning), test accuracy %:", "",
                  "| n_train | " + " | ".join(LABELS[m] for m in methods) + " |", "|---|" + "---|" * len(methods)]
        for n in c["n_trains"]:
            lines.append(f"| {n} | " + " | ".join(_ms(cells[(n, m)]["acc_init"]) if (n, m) in cells else "n/a"
                                                  for m in methods) + " |")
        reach = [r for r in summary["reach"] if r["size"] == size]
        if reach:
            t = reach[0]
            lines += ["", f"**Target: random init's mean at n = {t['target_n']}: {100 * t['target']:.1f}%.** "
                      "Smallest n whose mean reaches it:", ""]
            lines += [f"- {r['label']}: {_ratio(r)}" for r in reach if r["method"] != "random"]
        vs = [v for v in summary["wave_vs"] if v["size"] == size]
        if vs:
            others = [m for m in methods[:-1] if any(v["other"] == m for v in vs)]
            lines += ["", f"{LABELS[methods[-1]]} against each other method: margin in points, spread, verdict "
                      "(a win or loss only when |margin| > spread):", "",
                      "| n_train | " + " | ".join(LABELS[m] for m in others) + " |", "|---|" + "---|" * len(others)]
            for n in c["n_trains"]:
                row = {v["other"]: v for v in vs if v["n_train"] == n}
                lines.append(f"| {n} | " + " | ".join(
                    f"{100 * row[m]['margin']:+.1f} +- {100 * row[m]['spread']:.1f} {row[m]['verdict']}" if m in row
                    else "n/a" for m in others) + " |")
        lines.append("")
    lines += ["## Notes", "",
              "- Fixed steps: the small sets are seen for many epochs (at n = 50, every step is the whole set); the "
              "fine-tune's compute is the same for every n and every method.",
              "- The fitting methods also see their fitting pass (steps x batch, from the same n images); the JSON "
              "counts it per row (`images_seen`). Random init has no fitting pass.",
              "- The reach ratio compares means; the target is random init trained for the same fixed steps at the "
              "largest n, not random init at convergence.",
              "- One-off costs are not charged (the teacher, the bank)."]
    if config["budget"] in NOTES:
        lines.append(f"- {NOTES[config['budget']]}")
    return lines


def plot(summary: dict[str, Any], config: dict[str, Any], path: Path) -> None:
    """Test accuracy against n_train (log x), mean line and a +- std band per method; one panel per size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [f"{d}x{w}" for d, w in config["curve"]["sizes"]]
    sizes = [s for s in sizes if any(c["size"] == s for c in summary["cells"])]
    if not sizes:
        return
    fig, axes = plt.subplots(1, len(sizes), figsize=(6.5 * len(sizes), 4.8), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for m in config["methods"]:
            pts = sorted((c["n_train"], c["acc"]) for c in summary["cells"] if c["size"] == size and c["method"] == m)
            if not pts:
                continue
            n = [p for p, _ in pts]
            mean = [100 * a["mean"] for _, a in pts]
            std = [100 * a["std"] for _, a in pts]
            line, = ax.plot(n, mean, "-o" if m.startswith("wave") else "--s", ms=4, label=LABELS[m])
            ax.fill_between(n, [x - s for x, s in zip(mean, std)], [x + s for x, s in zip(mean, std)],
                            color=line.get_color(), alpha=0.18, lw=0)
        for r in (r for r in summary["reach"] if r["size"] == size and r["method"] == "random"):
            ax.axhline(100 * r["target"], color="grey", ls=":", lw=1,
                       label=f"random init at n = {r['target_n']}")
        ax.set_xscale("log")
        ticks = sorted(config["curve"]["n_trains"])
        ax.set_xticks(ticks, [str(n) for n in ticks])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("training images (n_train, log scale)")
        ax.set_ylabel("test accuracy after fine-tune (%), mean +- std")
        ax.set_title(f"Fashion-MNIST, ViT {size}, {config['curve']['ft_steps']} fine-tune steps")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    protocol.save_figure(fig, path)


# ---------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> None:
    from wave_hf.cli_options import float_arg, int_arg

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small splits, short fine-tune (38 min measured with 1 worker on 2 shared cores)")
    mode.add_argument("--smoke", action="store_true", help="tiny budget, 1 seed: checks the code path, not a result")
    parser.add_argument("--workers", type=int_arg(1), default=2, help="processes (1 torch thread each)")
    parser.add_argument("--teacher", default="aux-probe",
                        help="ancestry folder, or 'aux-probe' (the ancestry when cached, else the bank's auxiliary "
                             "model with a probed head)")
    parser.add_argument("--bank", default=None, help="template bank folder (default: the embedded default bank)")
    parser.add_argument("--sizes", nargs="+", default=None, help="override the sizes, e.g. 6x128 4x64")
    parser.add_argument("--n-train", type=int_arg(1), nargs="+", default=None, help="override the n_train values")
    parser.add_argument("--seeds", type=int_arg(0), nargs="+", default=None)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                        help="rows (the last is compared with each other one)")
    parser.add_argument("--layer-decay-candidates", type=float_arg(0, high=1), nargs="+", default=None,
                        metavar="DECAY", help="layer-wise lr decays in (0, 1] crossed with every method's fine-tune "
                        "candidates, chosen on validation (default: off)")
    parser.add_argument("--name", default=None, help="results file stem (default data_efficiency; smoke: "
                                                     "_smoke.data_efficiency)")
    args = parser.parse_args(argv)

    budget_name = "smoke" if args.smoke else "quick" if args.quick else "full"
    curve = copy.deepcopy(BUDGETS[budget_name])
    if args.seeds:
        curve.seeds = list(args.seeds)
    if len(curve.seeds) < 3 and not args.smoke:
        parser.error("the protocol needs >= 3 seeds (--smoke runs 1, and is not a result)")
    if args.sizes:
        curve.sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes]
    if args.n_train:
        curve.n_trains = sorted(set(args.n_train))
    if "random" not in args.methods:
        parser.error("--methods must include random (its accuracy at the largest n is the target)")
    if args.layer_decay_candidates:
        if len(set(args.layer_decay_candidates)) != len(args.layer_decay_candidates):
            parser.error(f"--layer-decay-candidates must be distinct, got {args.layer_decay_candidates}")
        curve.layer_decays = list(args.layer_decay_candidates)
    name = args.name or ("_smoke.data_efficiency" if args.smoke else "data_efficiency")
    if max(curve.n_trains) + curve.n_val > curve.pool:
        parser.error(f"n_train up to {max(curve.n_trains)} + {curve.n_val} validation images exceed the pool of "
                     f"{curve.pool}")

    protocol.setup_process(1)
    bank = init_sizes.bank_path(args.bank)
    teacher_dir, teacher_desc = init_sizes.teacher_path(args.teacher, bank)
    jobs = [(REGIME, d, w, curve, m, seed, n) for d, w in curve.sizes for seed in curve.seeds
            for n in sorted(curve.n_trains, reverse=True) for m in args.methods]
    print(f"data_efficiency ({budget_name}): {len(jobs)} points on {args.workers} worker(s)", flush=True)
    rows = init_sizes.run_parallel(run_point, jobs, args.workers, str(teacher_dir), bank)
    init_sizes._setup_worker(str(teacher_dir), bank, 1)
    teacher_acc = accuracy(init_sizes._teacher(), init_sizes._data(REGIME, curve.budget(), curve.seeds[0])["test"])
    selected = [r.pop("selection") for r in rows if not r["na"]]
    config = {"budget": budget_name, "bank": bank, "regime": REGIME,
              "teacher": f"{teacher_desc}, test accuracy {100 * teacher_acc:.1f}%", "teacher_test_acc": teacher_acc,
              "seeds": curve.seeds, "workers": args.workers, "methods": {m: LABELS[m] for m in args.methods},
              "curve": asdict(curve), "search_budget": curve.search_budget, "fit_lr": FIT_LR,
              "split_sizes": {"train": curve.n_trains, "validation": curve.n_val, "test": curve.n_test,
                              "train_pool": curve.pool},
              "budgets": {"fine_tune": f"{curve.ft_steps} optimizer steps for every n (fixed in advance)",
                          "search_budget_per_method": curve.search_budget, "ft_lrs": curve.ft_lrs,
                          "layer_decays": curve.layer_decays, "fit_steps": curve.fit_steps,
                          "fit_batch": curve.fit_batch, "fit_images": curve.fit_images, "fit_lr": FIT_LR}}
    summary = summarize(rows, curve, args.methods)
    protocol.write_results(name, rows, config=config, selected=selected, summary=summary,
                           markdown=markdown(summary, config),
                           title="Data efficiency: accuracy against training images, per initialization")
    plot(summary, config, RESULTS / f"{name}.png")
    print((RESULTS / f"{name}.md").read_text(), flush=True)


if __name__ == "__main__":
    main()
