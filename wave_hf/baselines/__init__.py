"""Initialization baselines for the WAVE benchmark, behind one registry and one factory call.

    from wave_hf.baselines import init_model, INIT_METHODS
    vit = init_model("weight_selection", depth=6, width=128, teacher=teacher)

Every method returns a stock ``ViTForImageClassification`` (it saves and loads with plain transformers).
``INIT_METHODS`` lists them in the order the benchmark reports them.
"""

# Registration order is the order of the benchmark's tables: baselines first, WAVE last.
from . import random_init, weight_selection, weight_selection_matched, tleg, learngene, wave  # noqa: F401,I001
from .learngene import Learngene, train_learngene
from .registry import INIT_METHODS, InitMethod, init_model, register_init_method
from .tleg import linear_fit
from .weight_selection import select_tensor, uniform_indices

REPORT_ORDER = tuple(INIT_METHODS)

__all__ = [
    "REPORT_ORDER",
    "INIT_METHODS",
    "InitMethod",
    "Learngene",
    "init_model",
    "linear_fit",
    "register_init_method",
    "select_tensor",
    "train_learngene",
    "uniform_indices",
]
