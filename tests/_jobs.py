"""Small distill / fit / merge jobs for test_interrupt.py and test_distributed.py.

``python _jobs.py KIND WORKDIR KILL_AT [MODE]``: with ``KILL_AT > 0`` the job SIGKILLs itself at that optimizer
step (``MODE=step``, the default), or in the middle of its ``KILL_AT``-th ``safetensors.torch.save_file`` call,
after writing half of that file (``MODE=save``: a kill while a checkpoint is written). The kill is injected
from outside the library (a patched ``AdamW.step`` / ``save_file``), so the code under test is exactly what
users run. Under ``accelerate launch`` only the main process writes the result, and ``world.json`` with the
number of processes the job trained on (a 2-process test checks that it really ran 2).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
from transformers import ViTConfig, ViTForImageClassification

kind, workdir, kill_at = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
mode = sys.argv[4] if len(sys.argv) > 4 else "step"
if kill_at > 0 and mode == "save":
    import safetensors.torch as st

    real_save = st.save_file
    saves = {"n": 0}

    def dying_save(tensors, filename, metadata=None):
        saves["n"] += 1
        if saves["n"] == kill_at:
            real_save(tensors, filename, metadata)
            size = os.path.getsize(filename)
            with open(filename, "r+b") as f:  # a torn write: the first half only
                f.truncate(size // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(tensors, filename, metadata)

    st.save_file = dying_save
elif kill_at > 0:
    original_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return original_step(self, *args, **kwargs)

    torch.optim.AdamW.step = step

from wave_hf import TemplateBank, WaveInitializer, WaveTemplateConfig  # noqa: E402

cfg = WaveTemplateConfig(template_width=16, num_templates=3, num_vector_templates=3, head_dim=16, aux_depth=3,
                         aux_width=48)
g = torch.Generator().manual_seed(0)
data = [{"pixel_values": torch.randn(1, 28, 28, generator=g), "labels": i % 4} for i in range(16)]
ckpt = workdir / "checkpoints"


def vit(seed: int) -> ViTForImageClassification:
    torch.manual_seed(seed)
    return ViTForImageClassification(ViTConfig(hidden_size=48, num_hidden_layers=3, num_attention_heads=3,
                                               intermediate_size=192, image_size=28, patch_size=7, num_channels=1,
                                               layer_norm_eps=1e-6, num_labels=4))


if kind == "fit":
    torch.manual_seed(0)
    init = WaveInitializer(TemplateBank(cfg))
    result = init.fit_scalers(1, 32, data, num_heads=2, steps=8, batch_size=4, output_dir=ckpt, checkpoint_every=2,
                              progress=False).state_dict()
elif kind == "distill":
    from wave_hf.distill import distill

    result = distill(vit(0), data, config=cfg, steps=8, batch_size=4, output_dir=ckpt, checkpoint_every=2,
                     progress=False).state_dict()
elif kind == "merge":
    from wave_hf.merge import merge

    merged = merge([vit(0), vit(1)], ["a", "b"], method="fs_merge", train_datasets=[data[:8], data[8:]],
                   images_per_task=8, augment_copies=0, rank=2, steps=8, batch_size=4, output_dir=str(ckpt),
                   save_every=2, progress=False)
    result = merged.for_task("a").state_dict()
else:
    raise SystemExit(f"unknown job {kind}")
from _accelerate_fit_script import trained_world  # noqa: E402
from accelerate import PartialState  # noqa: E402

world = trained_world()
state = PartialState()
if state.is_main_process:
    torch.save(result, workdir / "result.pt")
    (workdir / "world.json").write_text(json.dumps(world))
state.wait_for_everyone()
if torch.distributed.is_available() and torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
