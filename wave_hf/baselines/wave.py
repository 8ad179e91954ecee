"""``wave_default`` and ``wave_fitted``: WAVE itself, through ``WaveInitializer``, for the same table.

``wave_default`` builds with the default (unfitted) scalers, always: ``WaveInitializer.build`` would use
scalers fitted earlier for the same size, and a benchmark that fits first must not turn the "default" row
into a fitted one. ``wave_fitted`` calls ``wave_hf.fit`` directly, not ``WaveInitializer.fit_scalers``, so the
initializer's own store of fitted scalers is left alone: two calls with the same seed start from the same
scalers and give the same bits.
"""

from __future__ import annotations

from typing import Any

from transformers import ViTForImageClassification

from ..scalers import Scalers
from .common import reject_unknown
from .registry import register_init_method


def default_scalers(initializer: Any, depth: int, width: int, num_heads: int | None, seed: int) -> Scalers:
    """The unfitted scalers of a size: the auxiliary ones resampled by depth and cropped/padded by width."""
    return Scalers.from_source(initializer.config, initializer.bank.aux, depth, width, num_heads, seed=seed)


@register_init_method("wave_default", needs=("initializer",),
                      description="WAVE with default (unfitted) scalers: WaveInitializer.build")
def wave_default(
    depth: int,
    width: int,
    *,
    num_heads: int | None = None,
    num_labels: int = 10,
    teacher: Any = None,
    initializer: Any = None,
    train_dataset: Any = None,
    seed: int = 0,
    **kw: Any,
) -> ViTForImageClassification:
    """Templates x default scalers, folded; new head."""
    id2label = kw.pop("id2label", None)
    reject_unknown("wave_default", kw, ("id2label",))
    scalers = default_scalers(initializer, depth, width, num_heads, seed)
    return initializer.build(depth, width, num_heads, num_labels=num_labels, id2label=id2label, scalers=scalers,
                             seed=seed)


@register_init_method("wave_fitted", needs=("initializer", "train_dataset"),
                      description="WAVE with scalers fitted on little data (templates frozen), folded with the fitted head")
def wave_fitted(
    depth: int,
    width: int,
    *,
    num_heads: int | None = None,
    num_labels: int = 10,
    teacher: Any = None,
    initializer: Any = None,
    train_dataset: Any = None,
    seed: int = 0,
    **kw: Any,
) -> ViTForImageClassification:
    """``wave_hf.fit.fit_model``: the same encoder as ``build(..., scalers=fit_scalers(...))`` (build is
    parametrize + fold, bit for bit) but it keeps the head trained with the scalers, as
    ``weight_selection_matched`` keeps its head; otherwise the fitted start would be judged with a random
    head. ``distill=False`` fits with CE only (transfer to a task the teacher does not know); every other
    option goes to the fit (``steps``, ``max_images``, ``train_vectors``, ...)."""
    from ..fit import fit_model

    distill = kw.pop("distill", True)
    kw.setdefault("progress", False)
    return fit_model(initializer, depth, width, train_dataset, num_heads=num_heads, num_labels=num_labels,
                     teacher=teacher if distill else None, seed=seed, **kw)
