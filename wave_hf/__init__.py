"""wave-hf: a ViT model factory on the Hugging Face stack (WAVE weight templates, FS-Merge).

``import wave_hf`` registers the template bank with ``AutoConfig``/``AutoModel``, so
``AutoModel.from_pretrained(bank_dir)`` works without ``trust_remote_code``.
"""

import os
import sys

if "torch" not in sys.modules and os.path.basename(sys.argv[0] if sys.argv else "") in ("wave-hf", "-m"):
    # The command line only (``wave-hf``, ``python -m wave_hf.cli``), before torch loads OpenMP: idle torch
    # threads sleep instead of spinning, which made jobs 5-10x faster on a shared machine (measured).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from transformers import AutoConfig, AutoModel  # noqa: E402

from .configuration_wave import WaveTemplateConfig
from .fold import fold
from .initializer import WaveInitializer
from .kronecker import kron_matrix, kron_vector, nearest_kronecker
from .scalers import Scalers
from .templates import TemplateBank

__version__ = "0.1.0"

AutoConfig.register(WaveTemplateConfig.model_type, WaveTemplateConfig, exist_ok=True)
AutoModel.register(WaveTemplateConfig, TemplateBank, exist_ok=True)

__all__ = [
    "Scalers",
    "TemplateBank",
    "WaveInitializer",
    "WaveTemplateConfig",
    "fold",
    "kron_matrix",
    "kron_vector",
    "nearest_kronecker",
]
