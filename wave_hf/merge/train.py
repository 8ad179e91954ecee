"""What FS-Merge and KD add to the one loop (``wave_hf.loop``): their options, the reconstruction loss and
the batch order.

Loss: MSE (mean over elements) between the trained module's feature for each image's own task and the
frozen original model's final pre-head feature on that image (targets precomputed once, held in memory).
AdamW (the diagonals of every M/U at ``lr_diag``, the rest at ``lr``) + ``OneCycle`` (pct_start 0.3,
linear anneal, div_factor 25, final_div_factor 1e4), as in the FS-Merge paper's code. The batch order is
by epoch: one seeded permutation per ``(seed, epoch)``, cut into batches of ``batch_size`` with a shorter
last one (``EpochBatchSampler``), so batch ``k`` depends only on ``(seed, k)`` and a resumed run ends
bit-identical to an uninterrupted one. Checkpoints, resume, the finite checks and the process split are the
loop's; a checkpoint's fingerprint adds the method, its options, the trainable layout and a hash of every
training tensor (the targets carry the source models).

Online path (``train_online``): when the views are drawn afresh every epoch (``augmentation="online"``, the
FS-Merge code's crop / flip / colour op / mixup-cutmix) or the loss asks for more than the final CLS feature
(all tokens, inner attention / MLP outputs, every model's targets, per-target standardisation), targets can
no longer be precomputed: each step runs the frozen originals (``Teachers``: eval, no grad) on that step's
images. A view is a function of ``(seed, epoch, index)`` and a batch's mixing of ``(seed, its first index)``,
so batch ``k`` still depends only on ``(seed, k)`` and a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..checkpoint import tensors_fingerprint
from ..loop import Batches, LoopResult, LoopSettings, LossFn, OneCycle, run_loop
from ..validation import MAX_AUGMENT_COPIES, check_float, check_int
from .common import (
    SITE_KINDS,
    AugmentConfig,
    as_augment_config,
    augment_view,
    check_choice,
    mix_batch,
    site_features,
)

AUGMENTATIONS = ("shift", "online")  # offline +-2 px copies made once by merge() / the official online views
TOKENS = ("cls", "all")
INNER = ("none", "att", "mlp", "both")
TARGETS = ("routed", "all")  # model i on task i's images only / every model on every image
NORMALIZE = ("none", "standardize")


@dataclass
class LossOptions:
    """What the reconstruction loss compares (the FS-Merge code's ``loss_type`` family, generalised); the
    defaults are the precomputable final-CLS, task-routed loss (``rec_with_ids``).

    tokens: ``"cls"`` (the final pre-head feature, as ``rec_with_ids``) or ``"all"`` (every output token).
    inner: also reconstruct, per model, block outputs before the residual add: ``"att"`` (attention,
        ``rec_with_inner_att``), ``"mlp"`` (``rec_with_inner_mlp``), ``"both"``, or ``"none"``; every token.
    inner_layers: the blocks for ``inner`` (None: every block). inner_weight: the weight of the mean inner
        term (the final term has weight 1).
    targets: ``"routed"`` (model i's features on task i's images only, as the paper) or ``"all"`` (every
        model's features on every task's images: N times the targets, no labels needed either way).
    normalize: ``"standardize"`` divides each target's residual by that target's per-dimension std (per
        model and site, measured once on the original merge images), so that every site and model weighs
        alike whatever its scale (the official code divides inner terms by their mean |value|); ``"none"``.
    """

    tokens: str = "cls"
    inner: str = "none"
    inner_layers: tuple[int, ...] | None = None
    inner_weight: float = 1.0
    targets: str = "routed"
    normalize: str = "none"


@dataclass
class TrainingOptions(LossOptions):
    """The options FS-Merge and KD share: how long and how the reconstruction loop trains, and the loss
    (``LossOptions``) (a mixin)."""

    epochs: int = 20
    steps: int | None = None  # overrides epochs when set
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 1e-3
    seed: int = 0
    output_dir: str | None = None  # checkpoints go to output_dir/checkpoints; None: no checkpoints
    save_every: int = 0  # 0: only at the end (and when stopped early)
    resume: bool = True  # resume from the newest checkpoint in output_dir
    stop_after: int | None = None  # stop (with a checkpoint) after this global step; for interruption tests
    progress: bool = True
    # data: "shift" = today's offline copies (merge(augment_copies=...)); "online" = ``online_views`` fresh
    # official views of each original per epoch (``augment_config``: an AugmentConfig, a dict or None = defaults)
    augmentation: str = "shift"
    online_views: int = 8
    augment_config: AugmentConfig | dict | None = None

    def __post_init__(self) -> None:
        self.train_config()  # validate at construction: a bad option fails with its name before any work

    @property
    def uses_augmented(self) -> bool:
        """Whether ``merge()`` should make the offline shifted copies (not when views are drawn online)."""
        return self.augmentation == "shift"

    def train_config(self, lr_diag: float | None = None) -> TrainConfig:
        """These options as a validated ``TrainConfig`` (``lr_diag`` defaults to ``lr``)."""
        shared = {f.name: getattr(self, f.name) for f in fields(TrainingOptions)}  # LossOptions' too
        return TrainConfig(**shared, lr_diag=self.lr if lr_diag is None else lr_diag)


@dataclass
class ReconstructionSpec(LossOptions):
    """``LossOptions`` validated, with the sites they name (see ``LossOptions`` for each field)."""

    def __post_init__(self) -> None:
        check_choice("tokens", self.tokens, TOKENS)
        check_choice("inner", self.inner, INNER)
        check_choice("targets", self.targets, TARGETS)
        check_choice("normalize", self.normalize, NORMALIZE)
        check_float("inner_weight", self.inner_weight, 0.0)
        if self.inner_layers is not None:
            if isinstance(self.inner_layers, (str, bytes)) or not isinstance(self.inner_layers, (tuple, list)):
                raise TypeError(f"inner_layers must be a list of block indices or None, got {self.inner_layers!r}")
            layers = tuple(check_int(f"inner_layers[{i}]", v, 0) for i, v in enumerate(self.inner_layers))
            if not layers:
                raise ValueError("inner_layers must name at least one block (or be None for every block)")
            self.inner_layers = layers

    @property
    def is_default(self) -> bool:
        """Exactly the precomputed final-CLS, task-routed, unnormalised loss."""
        return self == ReconstructionSpec()

    def sites(self, depth: int) -> list[str]:
        """``"final"`` plus the inner sites (``"att{l}"``, ``"mlp{l}"``) of a ``depth``-block ViT."""
        layers = range(depth) if self.inner_layers is None else self.inner_layers
        for layer in layers:
            if layer >= depth:
                raise ValueError(f"inner_layers must be in [0, {depth - 1}] (the models have {depth} blocks), "
                                 f"got {layer}")
        kinds = () if self.inner == "none" else SITE_KINDS if self.inner == "both" else (self.inner,)
        return ["final"] + [f"{k}{layer}" for layer in sorted(set(layers)) for k in kinds]


@dataclass
class TrainConfig(TrainingOptions):
    """``TrainingOptions`` plus what a method or a test may set beyond them (defaults from the FS-Merge
    paper/code); validated here so that a bad merge option fails with its own name before any work."""

    lr_diag: float = 1e-3  # parameters whose name ends in "diag" (the diagonal of every M/U)
    pct_start: float = 0.3
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        for name, low in (("epochs", 1), ("batch_size", 1), ("save_every", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        for name in ("steps", "stop_after"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be an integer >= 1 or None, got {v!r}")
        for name in ("lr", "lr_diag"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        OneCycle(self.pct_start).check(steps=1)  # the loop checks the schedule again with the run's steps
        check_choice("augmentation", self.augmentation, AUGMENTATIONS)
        self.online_views = check_int("online_views", self.online_views, 0, MAX_AUGMENT_COPIES,
                                      hint=" (validation.MAX_AUGMENT_COPIES)")
        self.augment_config = as_augment_config(self.augment_config)
        self.loss_spec()

    def loss_spec(self) -> ReconstructionSpec:
        return ReconstructionSpec(**{f.name: getattr(self, f.name) for f in fields(LossOptions)})

    @property
    def online(self) -> bool:
        """Targets computed at every step (fresh views or a loss beyond the precomputable final CLS)."""
        return self.augmentation == "online" or not self.loss_spec().is_default

    def total_steps(self, n: int) -> int:
        """``steps``, else ``epochs`` passes over ``n`` images (the last batch of each may be short)."""
        return self.steps if self.steps is not None else self.epochs * math.ceil(n / self.batch_size)


class EpochBatchSampler:
    """``num_batches`` batches over seeded permutations of ``range(n)``: one permutation per epoch (seed
    ``seed * 100003 + epoch``), cut into batches of ``batch_size`` whose last one holds the rest of the epoch.

    Batch ``k`` is a function of ``(seed, k)`` alone, so the loop can resume at any batch. (Unlike the
    ``training.StreamBatchSampler`` of the dataset jobs, an epoch's images are never split across two
    permutations: this is the FS-Merge paper's per-epoch shuffling.)
    """

    def __init__(self, n: int, batch_size: int, num_batches: int, seed: int, *, global_index: bool = False):
        if n < 1:
            raise ValueError(f"cannot sample batches from an empty set (n={n})")
        self.n, self.batch_size, self.num_batches, self.seed = n, batch_size, num_batches, seed
        self.per_epoch = math.ceil(n / batch_size)
        self.offset = n if global_index else 0  # global_index: yield epoch * n + i (online views know the epoch)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, perm = -1, torch.empty(0, dtype=torch.long)
        for step in range(self.num_batches):
            e, k = divmod(step, self.per_epoch)
            if e != epoch:
                epoch = e
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + e))
            yield (perm[k * self.batch_size : (k + 1) * self.batch_size] + e * self.offset).tolist()

    def __len__(self) -> int:
        return self.num_batches


class RoutedTensors:
    """The in-memory training set (images, their task ids, their targets), fetched a whole batch at a time
    (``__getitems__``, which ``DataLoader`` prefers): one gather per tensor instead of one per image."""

    def __init__(self, images: Tensor, task_ids: Tensor, targets: Tensor):
        if not len(images) == len(task_ids) == len(targets):
            raise ValueError(f"{len(images)} images, {len(task_ids)} task ids and {len(targets)} targets: "
                             "one of each per image")
        self.tensors = {"pixel_values": images, "task_ids": task_ids, "targets": targets}

    def __len__(self) -> int:
        return len(self.tensors["pixel_values"])

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {key: t[idx] for key, t in self.tensors.items()}

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {key: t[index] for key, t in self.tensors.items()}

    def fingerprint(self) -> str:
        """A hash of every tensor (the names as ``train_reconstruction`` has always recorded them)."""
        t = self.tensors
        return tensors_fingerprint({"images": t["pixel_values"], "task_ids": t["task_ids"], "targets": t["targets"]})


def _whole_batch(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """``RoutedTensors.__getitems__`` already returns the collated batch."""
    return batch


def _routed_mse(module: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return nn.functional.mse_loss(module(batch["pixel_values"], batch["task_ids"]), batch["targets"])


def reconstruction_loss(module: nn.Module, images: Tensor, task_ids: Tensor, targets: Tensor,
                        batch_size: int = 256) -> float:
    """Mean task-routed MSE over a whole set (no grad)."""
    total, n = 0.0, 0
    device = next(module.parameters()).device  # after training the module may sit on a GPU
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            sl = slice(i, i + batch_size)
            out = module(images[sl].to(device), task_ids[sl].to(device))
            total += nn.functional.mse_loss(out, targets[sl].to(device), reduction="sum").item()
            n += out.numel()
    return total / max(n, 1)


def run_fingerprint(module: nn.Module, cfg: TrainConfig, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What identifies a reconstruction run in its checkpoints beyond the loop's own fields (steps, batch
    size, seed, lr, schedule, data hash): the caller's fields (method, its options), the trainable layout
    and the settings only this loop has."""
    params = [(k, p) for k, p in module.named_parameters() if p.requires_grad]
    layout = json.dumps([[k, list(p.shape), str(p.dtype)] for k, p in params])
    return {
        "method": "reconstruction", **(extra or {}),
        "trainable_parameters": sum(p.numel() for _, p in params),
        "trainable_layout": "sha256:" + hashlib.sha256(layout.encode()).hexdigest()[:16],
        "lr_diag": cfg.lr_diag, "weight_decay": cfg.weight_decay,
    }


def train_reconstruction(module: nn.Module, images: Tensor, task_ids: Tensor, targets: Tensor, cfg: TrainConfig,
                         *, fingerprint: dict[str, Any] | None = None) -> LoopResult:
    """Train ``module(pixel_values, task_ids) -> (B, d)`` to match ``targets`` (in place) with the one loop.

    ``fingerprint``: the caller's fields identifying the run in its checkpoints (e.g. ``{"method": "fs_merge",
    "rank": 8}``), added to ``run_fingerprint``'s. Raises ``CheckpointMismatchError`` on a checkpoint of
    another run and ``NonFiniteError`` on a NaN/Inf input, target, loss or trained parameter.
    """
    data = RoutedTensors(images, task_ids, targets)
    total = cfg.total_steps(len(data))
    sampler = EpochBatchSampler(len(data), cfg.batch_size, total, cfg.seed)
    return _train(module, data, sampler, data.fingerprint, _routed_mse, cfg, fingerprint)


def _train(module: nn.Module, data: Any, sampler: EpochBatchSampler, data_fingerprint, loss_fn: LossFn,
           cfg: TrainConfig, fingerprint: dict[str, Any] | None) -> LoopResult:
    """The parameter groups (diagonals at ``lr_diag``), settings and batches both reconstruction paths share."""
    total = sampler.num_batches
    trainable = [(k, p) for k, p in module.named_parameters() if p.requires_grad]
    groups = [{"params": [p for k, p in trainable if not k.endswith("diag")], "lr": cfg.lr},
              {"params": [p for k, p in trainable if k.endswith("diag")], "lr": cfg.lr_diag}]
    settings = LoopSettings(
        steps=total, lr=cfg.lr, batch_size=cfg.batch_size, weight_decay=cfg.weight_decay,
        schedule=OneCycle(cfg.pct_start, cfg.div_factor, cfg.final_div_factor), seed=cfg.seed,
        output_dir=cfg.output_dir or None, checkpoint_every=cfg.save_every, max_steps=cfg.stop_after,
        keep_checkpoints=cfg.keep_checkpoints, resume=cfg.resume, progress=cfg.progress, desc="merge")
    batches = Batches(dataset=data, sampler=sampler, collate_fn=_whole_batch, fingerprint=data_fingerprint,
                      checks={"pixel_values": "check the merge images", "targets": "check the source models"})
    _, result = run_loop(module, groups, batches, loss_fn, settings,
                         fingerprint=run_fingerprint(module, cfg, fingerprint))
    return result


# ------------------------------------------------------------------------------------------ online path
class Teachers(nn.Module):
    """Frozen float32 copies of the N originals (eval mode, no grad) that compute the targets of each step.

    Kept outside the trained module (so the loop neither trains nor checkpoints them). ``routed`` targets
    run model i only on task i's rows (one forward pass per image, N times cheaper than every model on every
    image); ``all`` runs every model on the whole batch.
    """

    def __init__(self, models: Sequence[nn.Module]):
        super().__init__()
        self.models = nn.ModuleList(copy.deepcopy(m).float().eval().requires_grad_(False) for m in models)

    def train(self, mode: bool = True) -> Teachers:  # always eval (no dropout): targets are fixed functions
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixel_values: Tensor, task_ids: Tensor, sites: Sequence[str], tokens: str = "cls",
                routed: bool = True) -> dict[str, Tensor]:
        """Each site as (B, K, 1, d) (``routed``: row b from model ``task_ids[b]``) or (B, K, N, d)."""
        if not routed:
            per_model = [site_features(m, pixel_values, sites, tokens) for m in self.models]
            return {s: torch.stack([f[s] for f in per_model], 2) for s in sites}
        out: dict[str, Tensor] = {}
        for i, model in enumerate(self.models):
            rows = (task_ids == i).nonzero().flatten()
            if len(rows) == 0:
                continue
            for s, v in site_features(model, pixel_values[rows], sites, tokens).items():
                if s not in out:
                    out[s] = v.new_zeros((len(pixel_values), *v.shape[1:]))
                out[s][rows] = v
        return {s: out[s].unsqueeze(2) for s in sites}

    def fingerprint(self) -> str:
        return tensors_fingerprint({f"{i}.{k}": v for i, m in enumerate(self.models) for k, v in m.state_dict().items()})


@torch.no_grad()
def target_scales(teachers: Teachers, images: Sequence[Tensor], sites: Sequence[str], spec: ReconstructionSpec,
                  batch_size: int = 64) -> dict[str, Tensor]:
    """Per site, (N, d): each model's per-dimension std of its targets over the original merge images
    (``routed``: model i on task i's; ``all``: on every task's), clamped away from 0. Float64 sums, one pass."""
    pools = list(images) if spec.targets == "routed" else [torch.cat(list(images))] * len(teachers.models)
    scales: dict[str, list[Tensor]] = {s: [] for s in sites}
    for model, x in zip(teachers.models, pools):
        acc = {s: Moments() for s in sites}
        device = next(model.parameters()).device
        for i in range(0, len(x), batch_size):
            for s, v in site_features(model, x[i : i + batch_size].to(device), sites, spec.tokens).items():
                acc[s].add(v)
        for s, m in acc.items():
            scales[s].append(m.std())
    return {s: torch.stack(v) for s, v in scales.items()}


class Moments:
    """Running float64 first and second moments of features (..., d) over every leading index, one pass."""

    def __init__(self) -> None:
        self.n, self.s1, self.s2 = 0, 0.0, 0.0

    def add(self, v: Tensor) -> None:
        v = v.reshape(-1, v.shape[-1]).double()
        self.n += len(v)
        self.s1 = self.s1 + v.sum(0)
        self.s2 = self.s2 + (v * v).sum(0)

    def std(self) -> Tensor:
        """The per-dimension std (d,), clamped away from 0 (a dead dimension would divide by zero)."""
        var = (self.s2 / self.n - (self.s1 / self.n) ** 2).clamp_min(0.0)
        std = var.sqrt()
        return std.clamp_min(1e-3 * float(std.mean()) + 1e-8).float()


def reconstruction_terms(pred: dict[str, Tensor], target: dict[str, Tensor], task_ids: Tensor,
                         spec: ReconstructionSpec, scales: dict[str, Tensor] | None = None) -> Tensor:
    """The loss: MSE of the final site + ``inner_weight`` x the mean MSE of the inner sites.

    ``pred``: (B, K, N, d) per-model streams (SuperNet) or (B, K, 1, d) one stream (KD student); ``target``:
    (B, K, 1, d) routed or (B, K, N, d) every model. Routed: row b compares stream ``task_ids[b]``.
    """
    inner = [s for s in pred if s != "final"]
    total = pred[next(iter(pred))].new_zeros(())
    rows = torch.arange(len(task_ids), device=task_ids.device)
    for site, p in pred.items():
        t, sc = target[site], None if scales is None else scales[site]
        if t.shape[2] == 1:
            p = p[:, :, 0] if p.shape[2] == 1 else p[rows, :, task_ids]  # (B, K, d)
            t = t[:, :, 0]
            sc = None if sc is None else sc[task_ids].unsqueeze(1)
        diff = p - t
        if sc is not None:
            diff = diff / sc
        term = diff.pow(2).mean()
        total = total + (term if site == "final" else spec.inner_weight / len(inner) * term)
    return total


class OnlineViews:
    """The merge images of every task as an epoch of ``n * (1 + views)`` items: the originals (unaugmented,
    as the official code's val-transformed originals) and ``views`` random views of each, drawn afresh each
    epoch. Indices are global (``epoch * len + i``, ``EpochBatchSampler(global_index=True)``): view ``i`` of
    epoch ``e`` is seeded by ``(seed, e, i)``; a batch's mixup / cutmix (augmented views only, partners of the
    same task) by ``(seed, its smallest index)``. With ``aug=None`` the items are the fixed images."""

    def __init__(self, images: Sequence[Tensor], views: int, aug: AugmentConfig | None, seed: int):
        self.images = torch.cat(list(images))
        self.task_ids = torch.cat([torch.full((len(x),), i, dtype=torch.long) for i, x in enumerate(images)])
        self.n, self.views, self.aug, self.seed = len(self.images), views if aug is not None else 0, aug, seed

    def __len__(self) -> int:
        return self.n * (1 + self.views)

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Tensor]:
        size = len(self)
        pixels, src, augmented = [], [], []
        for g in indices:
            epoch, i = divmod(int(g), size)
            copy_index, j = divmod(i, self.n)
            src.append(j)
            augmented.append(copy_index > 0)
            if copy_index == 0 or self.aug is None:
                pixels.append(self.images[j])
            else:
                pixels.append(augment_view(self.images[j], np.random.default_rng([self.seed, 1, epoch, i]), self.aug))
        x = torch.stack(pixels)
        ids = self.task_ids[torch.as_tensor(src, dtype=torch.long)]
        if self.aug is not None and self.aug.mixes and any(augmented):
            groups = torch.where(torch.as_tensor(augmented), ids, torch.full_like(ids, -1))
            x = mix_batch(x, groups, np.random.default_rng([self.seed, 2, min(int(g) for g in indices)]), self.aug)
        return {"pixel_values": x, "task_ids": ids}

    def fingerprint(self) -> str:
        aug = json.dumps(vars(self.aug) if self.aug is not None else None, sort_keys=True, default=list)
        return tensors_fingerprint({"images": self.images, "task_ids": self.task_ids}) + f"|views={self.views}|" + \
            "sha256:" + hashlib.sha256(aug.encode()).hexdigest()[:16]


def online_loss_fn(teachers: Teachers, spec: ReconstructionSpec, sites: Sequence[str],
                   scales: dict[str, Tensor] | None) -> LossFn:
    """The loop's loss: the frozen originals' targets on this step's images (no grad), then the trained
    module's sites through its ``forward`` (so DDP sees the call). The final targets go back into the batch
    as ``targets``, which the loop checks for NaN/Inf like precomputed ones."""
    state: dict[str, Any] = {"device": None, "scales": scales}

    def loss_fn(module: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        x, ids = batch["pixel_values"], batch["task_ids"]
        if state["device"] != x.device:
            teachers.to(x.device)
            state["device"] = x.device
            if scales is not None:
                state["scales"] = {k: v.to(x.device) for k, v in scales.items()}
        target = teachers(x, ids, sites, spec.tokens, spec.targets == "routed")
        batch["targets"] = target["final"]
        pred = module(x, ids, sites=sites, tokens=spec.tokens)
        return reconstruction_terms(pred, target, ids, spec, state["scales"])

    return loss_fn


def online_loss(module: nn.Module, teachers: Teachers, images: Sequence[Tensor], spec: ReconstructionSpec,
                sites: Sequence[str], scales: dict[str, Tensor] | None = None, batch_size: int = 64) -> float:
    """The online loss over fixed images (every task's, no augmentation), no grad: loss_before / loss_after."""
    return mean_loss(module, online_loss_fn(teachers, spec, sites, scales), images, batch_size)


def mean_loss(module: nn.Module, loss_fn: LossFn, images: Sequence[Tensor], batch_size: int = 64) -> float:
    """``loss_fn`` averaged over fixed images (every task's, no augmentation), no grad."""
    data = OnlineViews(images, 0, None, 0)
    device = next(module.parameters()).device
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            batch = data.__getitems__(range(i, min(i + batch_size, len(data))))
            batch = {k: v.to(device) for k, v in batch.items()}
            total += loss_fn(module, batch).item() * len(batch["task_ids"])
    return total / max(len(data), 1)


def train_online(module: nn.Module, teachers: Teachers, images: Sequence[Tensor], cfg: TrainConfig, depth: int,
                 *, fingerprint: dict[str, Any] | None = None, scales: dict[str, Tensor] | None = None
                 ) -> LoopResult:
    """Train ``module(pixel_values, task_ids, sites=..., tokens=...)`` against targets computed at every step
    by ``teachers`` on ``images`` (one tensor per task), with ``cfg.online_views`` fresh views per image and
    epoch when ``cfg.augmentation == "online"``. ``scales``: ``target_scales`` when normalising."""
    spec = cfg.loss_spec()
    sites = spec.sites(depth)
    data, sampler = online_batches(images, cfg)
    extra = {**(fingerprint or {}), "loss": dataclass_json(spec)}
    # the teachers' hash reads every frozen weight: only when checkpointing (the loop calls it only then)
    hashes = lambda: f"{data.fingerprint()}|teachers={teachers.fingerprint()}"  # noqa: E731
    return _train(module, data, sampler, hashes, online_loss_fn(teachers, spec, sites, scales), cfg, extra)


def online_batches(images: Sequence[Tensor], cfg: TrainConfig) -> tuple[OnlineViews, EpochBatchSampler]:
    """The items (with ``cfg.online_views`` fresh views per image and epoch when ``augmentation="online"``)
    and the batch order of one online run of ``cfg``'s length."""
    aug = as_augment_config(cfg.augment_config) if cfg.augmentation == "online" else None
    data = OnlineViews(images, cfg.online_views, aug, cfg.seed)
    return data, EpochBatchSampler(len(data), cfg.batch_size, cfg.total_steps(len(data)), cfg.seed, global_index=True)


def dataclass_json(obj: Any) -> str:
    """A dataclass as canonical JSON (for checkpoint fingerprints)."""
    return json.dumps(asdict(obj), sort_keys=True, default=list)


def run_online(module: nn.Module, models: Sequence[nn.Module], data: Any, cfg: TrainConfig,
               fingerprint: dict[str, Any]) -> tuple[LoopResult, float, float]:
    """``train_online`` with the before/after losses on the fixed images (shared by FS-Merge and KD)."""
    teachers = Teachers(models)
    spec = cfg.loss_spec()
    depth = models[0].config.num_hidden_layers
    sites = spec.sites(depth)
    images = data.all_images()
    scales = target_scales(teachers, data.originals, sites, spec) if spec.normalize == "standardize" else None
    before = online_loss(module, teachers, images, spec, sites, scales)
    res = train_online(module, teachers, images, cfg, depth, fingerprint=fingerprint, scales=scales)
    return res, before, online_loss(module, teachers, images, spec, sites, scales)
