"""Run ``wave_hf.fit.fit_scalers`` on a tiny bank; launched by tests/test_fit.py under ``accelerate launch``.
Also the one way the 2-process tests (test_fit.py, test_distributed.py) launch a script: ``accelerate_launch``.

Usage: ``python _accelerate_fit_script.py OUT.safetensors`` (1 process) or
``python -m accelerate.commands.launch --multi_gpu --num_processes 2 _accelerate_fit_script.py OUT.safetensors``
(with ``ACCELERATE_USE_CPU=true``). Everything is seeded, so both launches fit on the same global batches; the
main process writes the scalers to OUT and the world it trained in to OUT with the suffix ``.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import torch
from accelerate import PartialState

from wave_hf import TemplateBank, WaveInitializer, WaveTemplateConfig
from wave_hf.fit import fit_scalers

FIT = dict(steps=4, batch_size=8, max_images=24, lr=1e-3, seed=0, progress=False)
HERE = Path(__file__).resolve().parent


def accelerate_launch(script: Path, *args: str, num_processes: int = 2, timeout: int = 300
                      ) -> subprocess.CompletedProcess:
    """``script args`` under ``accelerate launch`` on ``num_processes`` CPU processes (gloo).

    Through the running interpreter (``python -m accelerate.commands.launch``), not the ``accelerate`` script:
    that one is missing from PATH in a virtual environment used without activating it, and the tests then
    skipped silently. accelerate's ``--cpu`` launcher starts a single process unless MPI is installed, so the
    torchrun-based ``--multi_gpu`` launcher runs with ``ACCELERATE_USE_CPU`` (``DistributedType.MULTI_CPU``).
    """
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(script), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def trained_world() -> dict[str, int]:
    """The world the job trained in, read after its loop: created after the loop's ``Accelerator``,
    ``PartialState`` shares that Accelerator's state, and torch.distributed's group is the one DDP used."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return {"num_processes": PartialState().num_processes,
            "torch_world_size": torch.distributed.get_world_size() if distributed else 1}


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
    world = trained_world()
    state = PartialState()
    if state.is_main_process:
        scalers.save(out)
        Path(out).with_suffix(".json").write_text(json.dumps(world))
    state.wait_for_everyone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
