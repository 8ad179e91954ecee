"""Shared pieces of the merge methods: input validation, merge images, feature extraction, weight stacks.

Everything here is method-agnostic; every key name and module path comes from ``wave_hf.vit_layout``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from transformers import ViTConfig, ViTForImageClassification

from .. import vit_layout as L
from ..validation import check_float, check_int, check_unique_names

# Config fields that must agree for models to be merged into one architecture.
ARCH_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "image_size",
    "patch_size",
    "num_channels",
    "hidden_act",
    "layer_norm_eps",
    "qkv_bias",
)


def validate_models(models: Sequence[nn.Module], tasks: Sequence[str]) -> ViTConfig:
    """Check the N source models and task names; return the shared config. Raises with a clear message."""
    if isinstance(models, nn.Module) or not isinstance(models, Sequence):
        raise TypeError(f"models must be a list of ViTForImageClassification, got {type(models).__name__}")
    if len(models) < 2:
        raise ValueError(f"merging needs at least 2 models (N >= 2), got N={len(models)}")
    for i, m in enumerate(models):
        if not isinstance(m, ViTForImageClassification):
            raise TypeError(f"models[{i}] must be a ViTForImageClassification, got {type(m).__name__}")
    tasks = check_unique_names(tasks, "task name")  # they become folder names when the merge is saved
    if len(tasks) != len(models):
        raise ValueError(f"got {len(models)} models but {len(tasks)} task names; give one task name per model")
    ref = models[0].config
    for i, m in enumerate(models[1:], start=1):
        for field in ARCH_FIELDS:
            a, b = getattr(ref, field, None), getattr(m.config, field, None)
            if a != b:
                raise ValueError(
                    f"models have different architectures: config.{field} is {a!r} in models[0] "
                    f"({tasks[0]!r}) but {b!r} in models[{i}] ({tasks[i]!r})"
                )
    if ref.hidden_size % ref.num_attention_heads:
        raise ValueError(
            f"hidden_size={ref.hidden_size} is not divisible by num_attention_heads={ref.num_attention_heads}"
        )
    L.shape_of(ref)  # integer MLP ratio
    return ref


def model_source(model: nn.Module) -> str:
    """A human-readable id or path of a source model (for ``base_model`` in the card)."""
    return str(getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "") or "")


def images_of(dataset, limit: int | None = None, *, seed: int = 0, task: str = "?") -> torch.Tensor:
    """First ``limit`` images (after a seeded shuffle) of a dataset as one float tensor (n, C, H, W).

    Accepts a tensor (n, C, H, W), a ``datasets.Dataset`` / list of ``{"pixel_values": ...}`` items,
    or a list of (C, H, W) tensors.
    """
    if dataset is None:
        raise ValueError(f"task {task!r} has no images: pass one dataset per task")
    if isinstance(dataset, torch.Tensor):
        n = dataset.shape[0]
        getter = lambda i: dataset[i]  # noqa: E731
    else:
        n = len(dataset)

        def getter(i):
            item = dataset[int(i)]
            px = item["pixel_values"] if isinstance(item, dict) else item
            return torch.as_tensor(px, dtype=torch.float32)

    if n == 0 or (limit is not None and limit <= 0):
        raise ValueError(f"task {task!r} has no images (got {n} images, images_per_task={limit})")
    k = n if limit is None else min(limit, n)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values
    out = torch.stack([getter(i) for i in idx.tolist()]).float()
    if out.ndim != 4:
        raise ValueError(f"task {task!r}: images must be (C, H, W), got a batch of shape {tuple(out.shape)}")
    return out


def check_images(images: Sequence[torch.Tensor], tasks: Sequence[str], config: ViTConfig) -> None:
    if len(images) != len(tasks):
        raise ValueError(f"got {len(tasks)} tasks but {len(images)} datasets; give one dataset per task")
    want = (config.num_channels, config.image_size, config.image_size)
    for t, x in zip(tasks, images):
        if x.shape[0] == 0:
            raise ValueError(f"task {t!r} has no images")
        if tuple(x.shape[1:]) != want:
            raise ValueError(f"task {t!r}: images have shape {tuple(x.shape[1:])}, the models expect {want}")
        if not torch.isfinite(x).all():
            raise ValueError(f"task {t!r}: images contain NaN or Inf")


def augment(images: torch.Tensor, copies: int, *, max_shift: int = 2, seed: int = 0) -> torch.Tensor:
    """``copies`` shifted copies of each image: zero-pad by ``max_shift`` and crop at a random offset.

    Deterministic (own generator), no flips (digits are not flip-invariant). Returns (copies*n, C, H, W).
    """
    if copies <= 0:
        return images[:0]
    g = torch.Generator().manual_seed(seed)
    n, _, h, w = images.shape
    p = max_shift
    padded = nn.functional.pad(images, (p, p, p, p))
    out = []
    for _ in range(copies):
        offs = torch.randint(0, 2 * p + 1, (n, 2), generator=g)
        out.append(torch.stack([padded[i, :, a : a + h, b : b + w] for i, (a, b) in enumerate(offs.tolist())]))
    return torch.cat(out)


CROPS = ("pad", "resized")
COLOR_OPS = ("grayscale", "solarize", "blur")


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices`` (a str); a typed error naming the value and the choices."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {list(choices)}, got {value!r} ({type(value).__name__})")
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def _check_pair(name: str, value: object, low: float, high: float | None = None) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be a pair (low, high), got {value!r}")
    a, b = (check_float(f"{name}[{i}]", v, low, high) for i, v in enumerate(value))
    if a > b:
        raise ValueError(f"{name} must have low <= high, got {value!r}")
    return a, b


def _check_numbers(name: str, value: object, positive: bool = False) -> float | tuple[float, ...]:
    """One finite number or a non-empty tuple of them (``positive``: each > 0)."""
    low = 0.0 if positive else None
    if isinstance(value, (tuple, list)):
        if not value:
            raise ValueError(f"{name} must be a number or a non-empty list of numbers, got {value!r}")
        return tuple(check_float(f"{name}[{i}]", v, low, low_open=positive) for i, v in enumerate(value))
    return check_float(name, value, low, low_open=positive)


def _per_channel(value: float | tuple[float, ...], x: torch.Tensor) -> torch.Tensor | float:
    if isinstance(value, float):
        return value
    if len(value) != x.shape[0]:
        raise ValueError(f"augment mean/std has {len(value)} values but the images have {x.shape[0]} channels")
    return torch.tensor(value, dtype=x.dtype).view(-1, 1, 1)


@dataclass
class AugmentConfig:
    """The FS-Merge code's online augmentation (DeiT-style; ``src/vision_datasets/augmentations.py`` and
    timm ``Mixup`` in ``src/extract.py``), in pure torch on normalised tensors. Defaults are the official ones.

    Why these: the official code gets its data efficiency from ~8 augmented views per original, and mixup /
    cutmix make views no original image has (targets are features, so they are recomputed on the mixed image).

    crop: ``"pad"`` (official: reflect-pad by ``padding`` px, random crop back to size) or ``"resized"``
        (random resized crop: area in ``scale``, aspect ratio in ``ratio``, bilinear resize back).
    flip_prob: horizontal flip probability (0.5 as ``RandomHorizontalFlip``; 0 for digits if wanted).
    color_prob: probability of applying ONE of grayscale / solarize / Gaussian blur (chosen uniformly; 1.0
        as the official ``RandomChoice`` of p=1 ops). ``blur_sigma``: the blur's sigma range, in pixels.
    mixup_alpha, cutmix_alpha, mix_prob, switch_prob: timm ``Mixup`` (batch mode: one lambda per batch;
        cutmix with probability ``switch_prob``, else mixup). Mixing partners are other augmented views of
        the same task in the batch (the official code mixes within one task's batch); 0 alphas disable it.
    mean, std: the normalisation of the input tensors (pixel = x * std + mean), needed because grayscale
        and solarize act on pixels in [0, 1]; the default is wave-hf's ([-1, 1] pixels).
    """

    # geometry (the official RandomCrop(size, padding=4, padding_mode="reflect") + RandomHorizontalFlip)
    crop: str = "pad"
    padding: int = 4
    scale: tuple[float, float] = (0.35, 1.0)  # "resized" only
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # "resized" only
    flip_prob: float = 0.5
    # colour: RandomChoice([Grayscale, Solarization, GaussianBlur(radius 0.1..2)]), each with p=1
    color_prob: float = 1.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    # timm Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode="batch")
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    # input normalisation (pixel = x * std + mean): one number, or one per channel (data.Preprocessing's)
    mean: float | tuple[float, ...] = 0.5
    std: float | tuple[float, ...] = 0.5

    def __post_init__(self) -> None:
        check_choice("augment.crop", self.crop, CROPS)
        self.padding = check_int("augment.padding", self.padding, 0, 1024)
        self.scale = _check_pair("augment.scale", self.scale, 0.0, 1.0)
        if self.scale[0] <= 0:
            raise ValueError(f"augment.scale must be within (0, 1], got {self.scale!r}")
        self.ratio = _check_pair("augment.ratio", self.ratio, 1e-3, 1e3)
        self.blur_sigma = _check_pair("augment.blur_sigma", self.blur_sigma, 1e-3, 100.0)
        for name in ("flip_prob", "color_prob", "mix_prob", "switch_prob"):
            setattr(self, name, check_float(f"augment.{name}", getattr(self, name), 0.0, 1.0))
        for name in ("mixup_alpha", "cutmix_alpha"):
            setattr(self, name, check_float(f"augment.{name}", getattr(self, name), 0.0, 100.0))
        self.mean = _check_numbers("augment.mean", self.mean)
        self.std = _check_numbers("augment.std", self.std, positive=True)

    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised (C, H, W) -> pixels in [0, 1]."""
        return x * _per_channel(self.std, x) + _per_channel(self.mean, x)

    def normalised(self, pix: torch.Tensor) -> torch.Tensor:
        return (pix - _per_channel(self.mean, pix)) / _per_channel(self.std, pix)

    @property
    def mixes(self) -> bool:
        return self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


def as_augment_config(value: AugmentConfig | dict | None) -> AugmentConfig:
    """``None`` -> the official defaults; a dict (e.g. from JSON) -> validated ``AugmentConfig``."""
    if value is None:
        return AugmentConfig()
    if isinstance(value, AugmentConfig):
        return AugmentConfig(**vars(value))  # re-validated copy (fields may have been set after init)
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(AugmentConfig.__dataclass_fields__))
        if unknown:
            raise TypeError(f"augment got unknown options {unknown}; accepted: {list(AugmentConfig.__dataclass_fields__)}")
        return AugmentConfig(**value)
    raise TypeError(f"augment must be an AugmentConfig, a dict or None, got {type(value).__name__}")


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of one (C, H, W) image, reflect-padded (PIL's GaussianBlur, radius ~ sigma)."""
    c, h, w = x.shape
    radius = max(1, min(math.ceil(3 * sigma), h - 1, w - 1))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    y = F.pad(x.unsqueeze(0), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    y = F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return y[0]


def _crop(x: torch.Tensor, rng: np.random.Generator, cfg: AugmentConfig) -> torch.Tensor:
    c, h, w = x.shape
    if cfg.crop == "pad":
        p = min(cfg.padding, h - 1, w - 1)  # reflect padding must be smaller than the image
        if p == 0:
            return x
        y = F.pad(x.unsqueeze(0), (p, p, p, p), mode="reflect")[0]
        a, b = int(rng.integers(0, 2 * p + 1)), int(rng.integers(0, 2 * p + 1))
        return y[:, a : a + h, b : b + w]
    area = h * w
    for _ in range(10):  # torchvision's RandomResizedCrop.get_params
        target = area * rng.uniform(*cfg.scale)
        aspect = math.exp(rng.uniform(math.log(cfg.ratio[0]), math.log(cfg.ratio[1])))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            break
    else:  # fall back to the whole image
        top, left, ch, cw = 0, 0, h, w
    patch = x[:, top : top + ch, left : left + cw].unsqueeze(0)
    return F.interpolate(patch, size=(h, w), mode="bilinear", align_corners=False)[0]


def augment_view(image: torch.Tensor, rng: np.random.Generator, cfg: AugmentConfig) -> torch.Tensor:
    """One random view of a normalised (C, H, W) image: crop, flip, then one of grayscale / solarize / blur.

    All randomness comes from ``rng``, so a view is a function of the generator's seed alone (the caller seeds
    it from (seed, epoch, index): online views that a resumed run redraws identically).
    """
    x = _crop(image, rng, cfg)
    if rng.random() < cfg.flip_prob:
        x = x.flip(-1)
    if rng.random() < cfg.color_prob:
        op = COLOR_OPS[int(rng.integers(0, len(COLOR_OPS)))]
        if op == "blur":
            x = _gaussian_blur(x, float(rng.uniform(*cfg.blur_sigma)))
        else:
            pix = cfg.pixels(x)
            if op == "grayscale":
                if pix.shape[0] == 3:  # ITU-R 601 luma, as PIL's convert("L"); one channel is already grey
                    pix = (0.299 * pix[0] + 0.587 * pix[1] + 0.114 * pix[2]).expand(3, -1, -1)
            else:  # PIL ImageOps.solarize(threshold=128): invert the pixels at or above the middle
                pix = torch.where(pix >= 0.5, 1.0 - pix, pix)
            x = cfg.normalised(pix)
    return x.contiguous()


def mix_batch(x: torch.Tensor, groups: torch.Tensor, rng: np.random.Generator, cfg: AugmentConfig) -> torch.Tensor:
    """timm ``Mixup`` in batch mode: one lambda for the batch, mixup or cutmix; each image is mixed with its
    mirror inside its group (``groups[b] < 0``: left alone). Returns a new tensor (the labels are not needed:
    FS-Merge's targets are the originals' features on the mixed image)."""
    if not cfg.mixes or rng.random() >= cfg.mix_prob:
        return x
    partner = torch.arange(len(x))
    for g in groups.unique().tolist():
        if g < 0:
            continue
        idx = (groups == g).nonzero().flatten()
        partner[idx] = idx.flip(0)  # timm pairs a batch with its flip
    use_cutmix = cfg.cutmix_alpha > 0 and (cfg.mixup_alpha <= 0 or rng.random() < cfg.switch_prob)
    out = x.clone()
    mixed = groups >= 0
    if use_cutmix:
        lam = float(rng.beta(cfg.cutmix_alpha, cfg.cutmix_alpha))
        h, w = x.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        rows = mixed.nonzero().flatten()
        out[rows, :, y0:y1, x0:x1] = x[partner[rows], :, y0:y1, x0:x1]
    else:
        lam = float(rng.beta(cfg.mixup_alpha, cfg.mixup_alpha))
        out[mixed] = lam * x[mixed] + (1.0 - lam) * x[partner[mixed]]
    return out


@dataclass
class MergeData:
    """Merge images per task: originals and the offline augmented copies."""

    originals: list[torch.Tensor]
    augmented: list[torch.Tensor]

    def all_images(self) -> list[torch.Tensor]:
        return [torch.cat([o, a]) for o, a in zip(self.originals, self.augmented)]


@torch.no_grad()
def features(model: ViTForImageClassification, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Final pre-head feature: the CLS token after the final LayerNorm, (n, d)."""
    model.eval()
    enc = L.encoder(model)
    out = [enc(pixel_values=images[i : i + batch_size]).last_hidden_state[:, 0] for i in
           range(0, len(images), batch_size)]
    return torch.cat(out)


def encoder_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Encoder tensors of a ViT by full key (classifier excluded), detached copies."""
    sd = model.state_dict()
    return {k: sd[k].detach().clone() for k in L.encoder_keys(model.config.num_hidden_layers)}


def head_state(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    sd = model.state_dict()
    w, b = (sd[k].detach().clone() for k in L.classifier_keys())
    return w, b


def id2label_of(model: nn.Module) -> dict[int, str]:
    n = model.config.num_labels
    raw = getattr(model.config, "id2label", None) or {}
    return {int(k): str(v) for k, v in raw.items()} if len(raw) == n else {i: str(i) for i in range(n)}


def average_states(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([s[k] for s in states]).mean(0) for k in states[0]}


SITE_KINDS = ("att", "mlp")  # attention output (o_proj) and MLP output (fc2) of a block, before the residual add


@torch.no_grad()
def site_features(model: ViTForImageClassification, pixel_values: torch.Tensor, sites: Sequence[str],
                  tokens: str = "cls") -> dict[str, torch.Tensor]:
    """What a stock ViT computes at each reconstruction site, each (B, K, d) with K = 1 (``tokens="cls"``)
    or every token (``"all"``): ``"final"`` is the output after the final LayerNorm (the pre-head feature
    at the CLS token); ``"att{l}"`` / ``"mlp{l}"`` the output of block l's attention / MLP before its residual
    add (the official ``rec_with_inner_att|mlp`` features; always every token, as there). No grad: targets."""
    return vit_site_features(model, pixel_values, sites, tokens)


def vit_site_features(model: nn.Module, pixel_values: torch.Tensor, sites: Sequence[str],
                      tokens: str = "cls") -> dict[str, torch.Tensor]:
    """``site_features`` with autograd (the KD student trains through it)."""
    kept: dict[str, torch.Tensor] = {}
    hooks = []
    layers = L.encoder_layers(model)
    for site in sites:
        if site == "final":
            continue
        kind, layer = site[:3], int(site[3:])
        lin = L.submodule(layers[layer], L.LAYER_LINEARS["o" if kind == "att" else "fc2"])
        hooks.append(lin.register_forward_hook(lambda m, a, out, site=site: kept.__setitem__(site, out)))
    try:
        hidden = L.encoder(model)(pixel_values=pixel_values).last_hidden_state
    finally:
        for h in hooks:
            h.remove()
    if "final" in sites:
        kept["final"] = hidden[:, :1] if tokens == "cls" else hidden
    return {s: kept[s] for s in sites}


def routed_targets(models, images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate every task's images, their task ids, and model i's features on task i's images (once)."""
    x = torch.cat(images)
    ids = torch.cat([torch.full((len(im),), i, dtype=torch.long) for i, im in enumerate(images)])
    y = torch.cat([features(m, im) for m, im in zip(models, images)])
    return x, ids, y
