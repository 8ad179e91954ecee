"""Knowledge distillation baseline: a student initialised from model 1, ALL weights trained with the same
task-routed feature MSE, images, steps and schedule as FS-Merge; each task keeps its original head."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

from .. import vit_layout as L
from .common import MergeData, encoder_state, routed_targets
from .merged import from_encoder
from .registry import MergeMethod, register_merge_method
from .train import TrainingOptions, reconstruction_loss, train_reconstruction


class Student(nn.Module):
    """One ViT encoder; its feature (CLS after the final LN) serves every task."""

    def __init__(self, model):
        super().__init__()
        self.model = copy.deepcopy(model).float()
        self.model.requires_grad_(True)
        self.model.classifier.requires_grad_(False)

    def forward(self, pixel_values, task_ids=None):
        return L.encoder(self.model)(pixel_values=pixel_values).last_hidden_state[:, 0]


@register_merge_method("kd")
@dataclass
class KD(TrainingOptions, MergeMethod):

    def run(self, models, tasks, data: MergeData):
        student = Student(models[0])
        x, ids, y = routed_targets(models, data.all_images())
        before = reconstruction_loss(student, x, ids, y)
        res = train_reconstruction(student, x, ids, y, self.train_config(), fingerprint={"method": "kd"})
        merged = from_encoder(models, tasks, encoder_state(student.model))
        merged.metadata.update({
            "trainable_parameters": sum(p.numel() for p in student.parameters() if p.requires_grad),
            "loss_before": before, "loss_after": reconstruction_loss(student, x, ids, y),
            "steps": res.steps_done, "total_steps": res.total_steps,
        })
        return merged
