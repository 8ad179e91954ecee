"""``wave_default`` and ``wave_fitted``: WAVE itself, through ``WaveInitializer``, for the same table.

``wave_default`` builds with the default (unfitted) scalers, always: ``WaveInitializer.build`` would use
scalers fitted earlier for the same size, and a benchmark that fits first must not turn the "default" row
into a fitted one. ``wave_fitted`` calls ``wave_hf.fit`` directly, not ``WaveInitializer.fit_scalers``, so the
initializer's own store of fitted scalers is left alone: two calls with the same seed start from the same
scalers and give the same bits.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from transformers import ViTForImageClassification

from ..fit import FitConfig, fit_model
from ..scalers import DEFAULT_DEPTH_RULE, Scalers
from .registry import InitRequest, register_init_method

#: ``FitConfig``'s fields, the fit's run arguments that the request does not hold, and ``distill``.
FIT_OPTIONS = tuple(f.name for f in fields(FitConfig)) + ("output_dir", "max_steps", "progress", "distill")


def default_scalers(initializer: Any, depth: int, width: int, num_heads: int | None, seed: int,
                    depth_rule: str = DEFAULT_DEPTH_RULE) -> Scalers:
    """The unfitted scalers of a size: the auxiliary ones resampled to ``depth`` by ``depth_rule``
    (``scalers.depth_indices``) and cropped/padded by width."""
    return Scalers.from_source(initializer.config, initializer.bank.aux, depth, width, num_heads, seed=seed,
                               depth_rule=depth_rule)


@register_init_method("wave_default", needs=("initializer",), options=("depth_rule",),
                      description="WAVE with default (unfitted) scalers: WaveInitializer.build")
def wave_default(req: InitRequest) -> ViTForImageClassification:
    """Templates x default scalers, folded; new head. ``depth_rule`` (option) picks the auxiliary layers a
    target of another depth starts from (``"relative"``, ``"first"``, ``"even"``)."""
    scalers = default_scalers(req.initializer, req.depth, req.width, req.num_heads, req.seed,
                              req.options.get("depth_rule", DEFAULT_DEPTH_RULE))
    return req.initializer.build(req.depth, req.width, req.num_heads, num_labels=req.num_labels,
                                 id2label=req.id2label, scalers=scalers, seed=req.seed, image_size=req.image_size)


@register_init_method("wave_fitted", needs=("initializer", "train_dataset"), options=FIT_OPTIONS,
                      description="WAVE with scalers fitted on little data (templates frozen), folded with the fitted head")
def wave_fitted(req: InitRequest) -> ViTForImageClassification:
    """``wave_hf.fit.fit_model``: the same encoder as ``build(..., scalers=fit_scalers(...))`` (build is
    parametrize + fold, bit for bit) but it keeps the head trained with the scalers, as
    ``weight_selection_matched`` keeps its head; otherwise the fitted start would be judged with a random
    head. ``distill=False`` fits with CE only (transfer to a task the teacher does not know); every other
    option goes to the fit (``steps``, ``max_images``, ``train_vectors``, ``depth_rule``, ``head_probe_steps``,
    ...)."""
    opts = {"progress": False, **req.options}
    distill = opts.pop("distill", True)
    return fit_model(req.initializer, req.depth, req.width, req.train_dataset, num_heads=req.num_heads,
                     num_labels=req.num_labels, id2label=req.id2label, teacher=req.teacher if distill else None,
                     seed=req.seed, image_size=req.image_size, **opts)
