"""Weight averaging of every encoder tensor (patch conv, cls, pos, LNs, all linears); heads kept per task."""

from __future__ import annotations

from dataclasses import dataclass

from .common import average_states, encoder_state
from .merged import from_encoder
from .registry import MergeMethod, register_merge_method


@register_merge_method("average")
@dataclass
class Average(MergeMethod):
    needs_data = False

    def run(self, models, tasks, data=None):
        return from_encoder(models, tasks, average_states([encoder_state(m) for m in models]))
