"""build() vs ViTForImageClassification.from_pretrained of the same model, side by side in one run.

Usage: python benchmarks/build_speed.py [--depth 12 --width 384 --repeats 7]
Writes benchmarks/results/build_speed.{json,md,png}. Target: build / from_pretrained <= 2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import ViTForImageClassification
from transformers.utils import logging as hf_logging

from wave_hf import TemplateBank, WaveInitializer, WaveTemplateConfig
from wave_hf.initializer import DEFAULT_BANK

RESULTS = Path(__file__).resolve().parent / "results"


def bank() -> tuple[WaveInitializer, str]:
    if (DEFAULT_BANK / "model.safetensors").is_file():
        return WaveInitializer.from_pretrained("default"), "default (embedded)"
    torch.manual_seed(0)
    return WaveInitializer(TemplateBank(WaveTemplateConfig())), "random, default config"


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    init, source = bank()
    build = lambda: init.build(args.depth, args.width, num_labels=10)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        build().save_pretrained(tmp)
        load = lambda: ViTForImageClassification.from_pretrained(tmp)  # noqa: E731
        build(), load()  # warm-up both (imports, allocator)
        # Interleave the two so machine noise hits both alike.
        b, lo = [], []
        for _ in range(args.repeats):
            b += timed(build, 1)
            lo += timed(load, 1)
    model = build()
    params = sum(p.numel() for p in model.parameters())
    result = {
        "bank": source, "depth": args.depth, "width": args.width, "parameters": params,
        "repeats": args.repeats, "build_s": statistics.median(b), "from_pretrained_s": statistics.median(lo),
        "build_all_s": b, "from_pretrained_all_s": lo, "torch_threads": torch.get_num_threads(),
    }
    result["ratio"] = result["build_s"] / result["from_pretrained_s"]
    result["target_ratio"] = 2.0
    result["meets_target"] = result["ratio"] <= 2.0
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "build_speed.json").write_text(json.dumps(result, indent=2))
    md = (
        f"# build() vs from_pretrained ({args.depth}x{args.width}, {params / 1e6:.1f}M params, bank: {source})\n\n"
        "| operation | median seconds |\n|---|---|\n"
        f"| `WaveInitializer.build` | {result['build_s']:.3f} |\n"
        f"| `ViTForImageClassification.from_pretrained` (same model, local disk) | {result['from_pretrained_s']:.3f} |\n"
        f"| **ratio build / load** | **{result['ratio']:.2f}** (target <= 2: {'met' if result['meets_target'] else 'NOT met'}) |\n"
    )
    (RESULTS / "build_speed.md").write_text(md)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.boxplot([b, lo], tick_labels=["build()", "from_pretrained()"])
    ax.set_ylabel("seconds")
    ax.set_title(f"{args.depth}x{args.width}: ratio {result['ratio']:.2f}")
    fig.tight_layout()
    fig.savefig(RESULTS / "build_speed.png", dpi=120)
    print(md)


if __name__ == "__main__":
    main()
