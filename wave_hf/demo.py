"""The README's main job: three ViT sizes from the embedded bank, fitted and fine-tuned, against random init.

Every model gets the same fine-tune (same images, steps, seed); WAVE models additionally get a scaler fit
on at most 1,000 images with the templates frozen. Models are written as plain transformers folders.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from transformers import ViTForImageClassification

from .data import Preprocessing, load_image_dataset
from .export import save_for_pipeline
from .fit import fit_model
from .initializer import WaveInitializer
from .train import evaluate, finetune

SIZES = [(4, 64), (6, 128), (6, 256)]


def _save(model: ViTForImageClassification, folder: Path, origin: str, accuracy: float, init: WaveInitializer
          ) -> None:
    save_for_pipeline(model, folder, origin=origin, accuracy=accuracy, dataset="fashion_mnist",
                      preprocessing=Preprocessing.from_config(init.config))


def run_demo(out: str = "outputs/demo", quick: bool = False, seed: int = 0, bank: str = "default",
             progress: bool = True) -> dict:
    """Run the comparison and return (and write) the results table.

    ``progress`` shows one bar (with an ETA) per stage: the scaler fit, then each fine-tune; transformers'
    own loading and saving bars are silenced (they are instant and would bury the stage bars).
    """
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return _run(out, quick, seed, bank, progress)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _run(out: str, quick: bool, seed: int, bank: str, progress: bool) -> dict:
    init = WaveInitializer.from_pretrained(bank)
    c = init.config
    sizes = [(2, c.template_width)] if quick else SIZES
    fit_steps, ft_images, test_images = (10, 256, 500) if quick else (150, 6000, 2000)
    data = load_image_dataset("fashion_mnist", image_size=c.image_size, num_channels=c.num_channels,
                              train_limit=ft_images, test_limit=test_images, seed=seed,
                              preprocessing=Preprocessing.from_config(c))
    id2label = dict(enumerate(data["train"].features["label"].names))
    out_dir = Path(out)
    rows = []
    for depth, width in sizes:
        t0 = time.perf_counter()
        # Stage 2 keeps its fitted head: the fine-tune starts from a working classifier.
        wave = fit_model(init, depth, width, data["train"], id2label=id2label, steps=fit_steps, seed=seed,
                         progress=progress)
        wave_start = evaluate(wave, data["test"])
        finetune(wave, data["train"], seed=seed, progress=progress)
        wave_acc = evaluate(wave, data["test"])
        wave_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        torch.manual_seed(seed)
        random = ViTForImageClassification(init.vit_config(depth, width, id2label=id2label))
        finetune(random, data["train"], seed=seed, progress=progress)
        random_acc = evaluate(random, data["test"])
        random_s = time.perf_counter() - t0

        _save(wave, out_dir / f"wave-{depth}x{width}", f"WAVE bank {bank}, fitted and fine-tuned", wave_acc, init)
        _save(random, out_dir / f"random-{depth}x{width}", "random init, fine-tuned", random_acc, init)
        rows.append({"size": f"{depth}x{width}", "params": sum(p.numel() for p in wave.parameters()),
                     "wave_after_fit": wave_start, "wave": wave_acc, "random": random_acc,
                     "wave_seconds": wave_s, "random_seconds": random_s})
        print(f"{depth}x{width}: WAVE {100 * wave_acc:.1f}% (after fit, before fine-tune {100 * wave_start:.1f}%)"
              f" vs random {100 * random_acc:.1f}%", flush=True)
    result = {"bank": bank, "fine_tune_images": len(data["train"]), "test_images": len(data["test"]),
              "fit_steps": fit_steps, "rows": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(result, indent=2))
    lines = ["| size | params | WAVE after fit | WAVE fine-tuned | random fine-tuned | gain |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['params']:,} | {100 * r['wave_after_fit']:.1f} | {100 * r['wave']:.1f} | "
                     f"{100 * r['random']:.1f} | {100 * (r['wave'] - r['random']):+.1f} |")
    table = "\n".join(lines)
    (out_dir / "results.md").write_text(table + "\n")
    print(table)
    return result
