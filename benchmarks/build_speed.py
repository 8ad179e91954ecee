"""build() vs ViTForImageClassification.from_pretrained of the same model, side by side in one run.

Usage: python benchmarks/build_speed.py [--depth 12 --width 384 --repeats 7]
Writes benchmarks/results/build_speed.{json,md,png}. Target (issue 16): build / from_pretrained <= 1.0.

Two ratios, because ``from_pretrained`` memory-maps the safetensors file and reads no weight until the model
first runs, while ``build`` computes and writes every weight: the calls alone, and each call followed by
one forward pass of one image (which touches every weight), i.e. the time until the model has run.
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
    model = build()
    pixels = torch.zeros(1, model.config.num_channels, model.config.image_size, model.config.image_size)

    def run(make) -> None:
        with torch.no_grad():
            make()(pixel_values=pixels)

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        load = lambda: ViTForImageClassification.from_pretrained(tmp)  # noqa: E731
        build(), load()  # warm-up both (imports, allocator)
        # Interleave the four so machine noise hits all alike.
        b, lo, b_run, lo_run = [], [], [], []
        for _ in range(args.repeats):
            b += timed(build, 1)
            lo += timed(load, 1)
            b_run += timed(lambda: run(build), 1)
            lo_run += timed(lambda: run(load), 1)
    params = sum(p.numel() for p in model.parameters())
    result = {
        "bank": source, "depth": args.depth, "width": args.width, "parameters": params,
        "repeats": args.repeats, "build_s": statistics.median(b), "from_pretrained_s": statistics.median(lo),
        "build_all_s": b, "from_pretrained_all_s": lo, "torch_threads": torch.get_num_threads(),
        "build_and_run_s": statistics.median(b_run), "from_pretrained_and_run_s": statistics.median(lo_run),
        "build_and_run_all_s": b_run, "from_pretrained_and_run_all_s": lo_run,
    }
    result["ratio"] = result["build_s"] / result["from_pretrained_s"]
    result["ratio_to_first_run"] = result["build_and_run_s"] / result["from_pretrained_and_run_s"]
    result["target_ratio"] = 1.0
    result["meets_target"] = result["ratio"] <= 1.0
    md = [
        f"{args.depth}x{args.width}, {params / 1e6:.1f}M params, bank: {source}; the four timings interleaved, "
        f"{args.repeats} repeats each (median). No choices: nothing is tuned.", "",
        "| operation | median seconds |", "|---|---|",
        f"| `WaveInitializer.build` | {result['build_s']:.3f} |",
        f"| `ViTForImageClassification.from_pretrained` (same model, local disk) | {result['from_pretrained_s']:.3f} |",
        f"| **ratio build / load** | **{result['ratio']:.2f}** (issue 16's target <= 1.0: "
        f"{'met' if result['meets_target'] else 'NOT met'}) |",
        f"| `build` + one forward pass of one image | {result['build_and_run_s']:.3f} |",
        f"| `from_pretrained` + one forward pass of one image | {result['from_pretrained_and_run_s']:.3f} |",
        f"| **ratio until the model has run** | **{result['ratio_to_first_run']:.2f}** |",
        "", "`from_pretrained` memory-maps the file and reads the weights during the first forward pass; `build` "
        "writes every weight (computing them and filling fresh memory) before it returns, so the first ratio "
        "compares unequal work and the second compares the time until the model has run.",
    ]
    config = {"seeds": None, "split_sizes": None, "budgets": {"repeats": args.repeats},
              "depth": args.depth, "width": args.width, "bank": source}
    protocol.write_results("build_speed", [result], config=config, selected=[], summary=result, markdown=md,
                           title="build() vs from_pretrained")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.boxplot([b, lo, b_run, lo_run], tick_labels=["build", "from_pretrained", "build\n+ forward",
                                                    "from_pretrained\n+ forward"])
    ax.set_ylabel("seconds")
    ax.set_title(f"{args.depth}x{args.width}: ratio {result['ratio']:.2f}")
    fig.tight_layout()
    fig.savefig(RESULTS / ".build_speed.tmp.png", dpi=120)
    Path(RESULTS / ".build_speed.tmp.png").replace(RESULTS / "build_speed.png")
    print((RESULTS / "build_speed.md").read_text())


if __name__ == "__main__":
    main()
