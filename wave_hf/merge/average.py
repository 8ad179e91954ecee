"""Weight averaging of every encoder tensor (patch conv, cls, pos, LNs, all linears); heads kept per task."""

from __future__ import annotations

from dataclasses import dataclass

from . import MergeMethod, register_merge_method
from .common import average_states, encoder_state, head_state, id2label_of
from .merged import MergedViT


def from_encoder(models, tasks, state) -> MergedViT:
    """A ``MergedViT`` from one encoder state and each source model's own head."""
    return MergedViT(config=models[0].config, encoder_state=state,
                     heads={t: head_state(m) for t, m in zip(tasks, models)},
                     id2label={t: id2label_of(m) for t, m in zip(tasks, models)})


@register_merge_method("average")
@dataclass
class Average(MergeMethod):
    needs_data = False

    def run(self, models, tasks, data=None):
        return from_encoder(models, tasks, average_states([encoder_state(m) for m in models]))
