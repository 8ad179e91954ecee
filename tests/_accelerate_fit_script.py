"""Run ``wave_hf.fit.fit_scalers`` on a tiny bank; launched by tests/test_fit.py under ``accelerate launch``.

Usage: ``python _accelerate_fit_script.py OUT.safetensors`` (1 process) or
``accelerate launch --cpu --num_processes 2 _accelerate_fit_script.py OUT.safetensors``. Everything is seeded,
so both launches fit on the same global batches; the main process writes the scalers to OUT.
"""

from __future__ import annotations

import sys

import datasets
import torch
from accelerate import PartialState

from wave_hf import TemplateBank, WaveInitializer, WaveTemplateConfig
from wave_hf.fit import fit_scalers

FIT = dict(steps=4, batch_size=8, max_images=24, lr=1e-3, seed=0, progress=False)


def tiny_setup() -> tuple[WaveInitializer, datasets.Dataset]:
    torch.manual_seed(0)
    config = WaveTemplateConfig(template_width=16, num_templates=3, num_vector_templates=3, head_dim=16,
                                aux_depth=3, aux_width=48)
    bank = TemplateBank(config)
    bank.reset_random(torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 1, 28, 28, generator=g), torch.randint(0, 4, (32,), generator=g)
    data = datasets.Dataset.from_dict({"pixel_values": x.numpy(), "labels": y.tolist()}).with_format("torch")
    return WaveInitializer(bank), data


def main(out: str) -> None:
    torch.set_num_threads(1)
    init, data = tiny_setup()
    scalers = fit_scalers(init, 2, 32, data, num_labels=4, **FIT)
    state = PartialState()
    if state.is_main_process:
        scalers.save(out)
    state.wait_for_everyone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
