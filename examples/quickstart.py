"""The smallest use of wave-hf: one call builds a stock transformers ViT of any size from a template bank.

    python examples/quickstart.py
"""

from __future__ import annotations

import torch
from transformers import ViTForImageClassification

from wave_hf import WaveInitializer

init = WaveInitializer.from_pretrained("default")
print(init)
for depth, width in [(2, 64), (6, 128), (12, 256)]:
    model = init.build(depth=depth, width=width, num_labels=10)
    assert type(model) is ViTForImageClassification
    logits = model(torch.zeros(1, init.config.num_channels, init.config.image_size, init.config.image_size)).logits
    print(f"{depth:>2} layers x {width:>3} wide: {sum(p.numel() for p in model.parameters()):>10,} parameters, "
          f"logits {tuple(logits.shape)}")
