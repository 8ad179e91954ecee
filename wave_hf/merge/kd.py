"""Knowledge distillation baseline: a student initialised from model 1, ALL weights trained with the same
task-routed feature MSE, images, steps and schedule as FS-Merge; each task keeps its original head."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .. import vit_layout as L
from .common import MergeData, encoder_state, routed_targets, vit_site_features
from .merged import from_encoder
from .registry import MergeMethod, register_merge_method
from .train import TrainingOptions, reconstruction_loss, run_online, train_reconstruction


class Student(nn.Module):
    """One ViT encoder; its feature (CLS after the final LN) serves every task."""

    def __init__(self, model):
        super().__init__()
        self.model = copy.deepcopy(model).float()
        self.model.requires_grad_(True)
        self.model.classifier.requires_grad_(False)

    def forward(self, pixel_values: torch.Tensor, task_ids: torch.Tensor | None = None,
                sites: Sequence[str] | None = None, tokens: str = "cls"):
        """The shared feature (B, d); with ``sites``, each site as (B, K, 1, d): one stream for every task."""
        if sites is not None:
            return {s: v.unsqueeze(2) for s, v in vit_site_features(self.model, pixel_values, sites, tokens).items()}
        return L.encoder(self.model)(pixel_values=pixel_values).last_hidden_state[:, 0]


@register_merge_method("kd")
@dataclass
class KD(TrainingOptions, MergeMethod):
    """Same options, data and loss as FS-Merge (for a fair comparison), except ``targets="all"``: one student
    feature cannot match every model's at once (it would regress to their mean)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.targets != "routed":
            raise ValueError(f"kd supports targets='routed' only (one feature serves every task), got {self.targets!r}")

    def run(self, models, tasks, data: MergeData):
        student = Student(models[0])
        cfg = self.train_config()
        if cfg.online:
            res, before, after = run_online(student, models, data, cfg, {"method": "kd"})
        else:
            x, ids, y = routed_targets(models, data.all_images())
            before = reconstruction_loss(student, x, ids, y)
            res = train_reconstruction(student, x, ids, y, cfg, fingerprint={"method": "kd"})
            after = reconstruction_loss(student, x, ids, y)
        merged = from_encoder(models, tasks, encoder_state(student.model))
        merged.metadata.update({
            "trainable_parameters": sum(p.numel() for p in student.parameters() if p.requires_grad),
            "loss_before": before, "loss_after": after,
            "steps": res.steps_done, "total_steps": res.total_steps,
        })
        return merged
