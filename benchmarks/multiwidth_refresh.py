"""A probe of the next stage-1 lever: refresh the shipped bank's templates while auxiliary models at several widths
read them, then rerun WAVE fitted's part of the grid with the refreshed bank.

    python benchmarks/multiwidth_refresh.py                    # widths 64 128 192 (multi-width)
    python benchmarks/multiwidth_refresh.py --widths 192       # the control: the same steps, one width

Why: in ``init_sizes.md`` TLEG's per-width learngene beats WAVE fitted at 4x64, 12x64 and 6x128. At r = 1 a 64-wide
WAVE layer mixes templates that were only ever trained as blocks of the 192-wide auxiliary model. Here every
width's auxiliary model (12 layers; its scalers start from the bank's default crop and train, and so does its
head) reads the *same* templates, and the loss sums each width's stage-1 loss (0.5 KD + 0.5 CE, the shipped bank's).
The templates, the auxiliary scalers and the heads train; the 192-wide auxiliary scalers are the bank's afterwards.
The budget is fixed in advance: 400 steps x 64 images of 20,000 Fashion-MNIST training images, lr 5e-4, cosine
with 20 warm-up steps, through the library's one training loop. A one-seed validation probe chose nothing: it
decided only that the grid below was worth running.

The bank goes to ``$WAVE_HF_CACHE/multiwidth/w<widths>``; run the grid with
``init_sizes.py --quick --teacher $WAVE_HF_CACHE/ancestry/aux-probe-12x192-default --regimes fashion_mnist
--bank <that folder> --methods wave_fitted
--sizes 12x64 6x128 2x192 4x64 2x64 --name init_sizes_refresh_<widths>`` (the widths the refresh covers; the
rows compare with ``init_sizes.md``'s: the same teacher, seeds and splits; ``--teacher aux-probe`` would make a new
teacher from the refreshed bank).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol  # noqa: E402
from _common import cache_dir  # noqa: E402
from init_sizes import bank_path, teacher_path  # noqa: E402

from wave_hf import WaveInitializer  # noqa: E402
from wave_hf.data import load_image_dataset  # noqa: E402
from wave_hf.distill import aux_model, kl_loss  # noqa: E402
from wave_hf.fold import parametrize_vit  # noqa: E402
from wave_hf.loop import Cosine, LoopSettings, run_loop  # noqa: E402
from wave_hf.scalers import Scalers  # noqa: E402
from wave_hf.teachers import load_teacher  # noqa: E402
from wave_hf.training import dataset_batches  # noqa: E402

STEPS, BATCH, LR, WARMUP, IMAGES = 400, 64, 5e-4, 20, 20000


class SharedTemplates(nn.Module):
    """Auxiliary models of several widths whose parametrizations read one set of templates: ``x -> logits`` per
    width, in one forward (one call per step for the loop)."""

    def __init__(self, models: dict[int, nn.Module]):
        super().__init__()
        self.models = nn.ModuleDict({str(w): m for w, m in models.items()})

    def forward(self, pixel_values: Tensor) -> dict[str, Tensor]:
        return {w: m(pixel_values=pixel_values).logits for w, m in self.models.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 192])
    args = parser.parse_args(argv)
    protocol.setup_process(1)
    bank_name = bank_path(None)
    teacher_dir, _ = teacher_path("aux-probe", bank_name)
    init = WaveInitializer.from_pretrained(bank_name)
    bank = copy.deepcopy(init.bank)
    config = bank.config
    if config.aux_width not in args.widths:
        raise SystemExit(f"--widths must include the auxiliary width {config.aux_width}: its scalers stay the bank's")
    teacher = load_teacher(teacher_dir)
    data = load_image_dataset("fashion_mnist", train_limit=IMAGES)["train"]
    main_model = aux_model(bank, 10, teacher=teacher, train_templates=True)
    models: dict[int, nn.Module] = {config.aux_width: main_model}
    for w in sorted(set(args.widths) - {config.aux_width}):
        scalers = Scalers.from_source(config, bank.aux, config.aux_depth, w)
        model = parametrize_vit(config, bank.templates, scalers, init.vit_config(config.aux_depth, w, num_labels=10),
                                train_templates=True)
        model.wave_source.templates = main_model.wave_source.templates  # one set of templates for every width
        models[w] = model
    wrapper = SharedTemplates(models)
    templates = list(main_model.wave_source.templates.values())
    ids = {id(p) for p in templates}
    rest = [p for p in wrapper.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": templates, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}]
    settings = LoopSettings(steps=STEPS, lr=LR, batch_size=BATCH, schedule=Cosine(WARMUP), seed=0,
                            desc=f"refresh w{'-'.join(map(str, args.widths))}")

    def loss_fn(student: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        x, y = batch["pixel_values"], batch["labels"]
        with torch.no_grad():
            target = teacher.to(x.device).logits(x)
        return torch.stack([0.5 * kl_loss(z, target) + 0.5 * nn.functional.cross_entropy(z, y)
                            for z in student(x).values()]).sum()

    wrapper, log = run_loop(wrapper, groups, dataset_batches(data, settings), loss_fn, settings)
    trained = wrapper.models[str(config.aux_width)].wave_source
    with torch.no_grad():
        for kind in bank.templates:
            bank.templates[kind].copy_(trained.templates[kind])
        bank.aux.load_state_dict(trained.scalers.state_dict())
    bank.config.metrics = {**(bank.config.metrics or {}), "refresh_widths": ",".join(map(str, args.widths)), "refresh_steps": STEPS,
                           "refresh_batch_size": BATCH, "refresh_lr": LR,
                           "refresh_loss_start": round(sum(log.losses[:10]) / 10, 5),
                           "refresh_loss_end": round(sum(log.losses[-10:]) / 10, 5)}
    out = cache_dir() / "multiwidth" / f"w{'-'.join(map(str, args.widths))}"
    bank.save_pretrained(out)
    print(f"refreshed bank: {out} (loss {bank.config.metrics['refresh_loss_start']} -> "
          f"{bank.config.metrics['refresh_loss_end']})", flush=True)


if __name__ == "__main__":
    main()
