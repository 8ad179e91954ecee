"""The ensemble of the N originals: the upper bound. Not a single model (cannot be folded): the result
is an ``EnsembleViT`` whose ``for_task`` returns the original expert and ``is_single_model`` is False."""

from __future__ import annotations

from dataclasses import dataclass

from .merged import EnsembleViT
from .registry import MergeMethod, register_merge_method


@register_merge_method("ensemble")
@dataclass
class Ensemble(MergeMethod):
    needs_data = False
    single_model = False

    def run(self, models, tasks, data=None):
        return EnsembleViT(models, tasks)
