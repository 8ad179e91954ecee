"""build() vs ViTForImageClassification.from_pretrained of the same model, side by side in one run.

Usage: python benchmarks/build_speed.py [--depth 12 --width 384 --repeats 7]
Writes benchmarks/results/build_speed.{json,md,png}. Target: build / from_pretrained <= 2.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import ViTForImageClassification
from transformers.utils import logging as hf_logging

from wave_hf import TemplateBank, WaveInitializer, WaveTemplateConfig
from wave_hf.initializer import DEFAULT_BANK

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol  # noqa: E402

RESULTS = protocol.RESULTS


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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of 7")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 3
    protocol.setup_process(1)
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
    md = [
        f"{args.depth}x{args.width}, {params / 1e6:.1f}M params, bank: {source}; the two calls interleaved, "
        f"{args.repeats} repeats each (median). No choices: nothing is tuned.", "",
        "| operation | median seconds |", "|---|---|",
        f"| `WaveInitializer.build` | {result['build_s']:.3f} |",
        f"| `ViTForImageClassification.from_pretrained` (same model, local disk) | {result['from_pretrained_s']:.3f} |",
        f"| **ratio build / load** | **{result['ratio']:.2f}** (target <= 2: "
        f"{'met' if result['meets_target'] else 'NOT met'}) |",
    ]
    config = {"seeds": None, "split_sizes": None, "budgets": {"repeats": args.repeats},
              "depth": args.depth, "width": args.width, "bank": source}
    protocol.write_results("build_speed", [result], config=config, selected=[], summary=result, markdown=md,
                           title="build() vs from_pretrained")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.boxplot([b, lo], tick_labels=["build()", "from_pretrained()"])
    ax.set_ylabel("seconds")
    ax.set_title(f"{args.depth}x{args.width}: ratio {result['ratio']:.2f}")
    fig.tight_layout()
    fig.savefig(RESULTS / ".build_speed.tmp.png", dpi=120)
    Path(RESULTS / ".build_speed.tmp.png").replace(RESULTS / "build_speed.png")
    print((RESULTS / "build_speed.md").read_text())


if __name__ == "__main__":
    main()
