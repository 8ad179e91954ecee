"""Train TLEG's learngenes (one per width) from the grid's teacher, for the ``tleg_learngene`` rows of init_sizes.

    python benchmarks/tleg_learngenes.py                 # widths 64 128 192 256, 2000 steps x 64, 2 processes
    python benchmarks/tleg_learngenes.py --quick         # smoke run: 20 steps, small data

TLEG (Xia et al., AAAI 2024) trains one learngene per width under the linear-expansion constraint, by
distillation from the ancestry (``wave_hf.baselines.learngene``). Each is a one-off cost, as WAVE's bank is;
neither is charged to any size. Budget, fixed in advance: 2,000 steps (the number of steps of the shipped bank's
stage 1) of batch 64 (half its batch of 128: the CPU time this machine has) on Fashion-MNIST training images,
lr 5e-4, wd 0.05, cosine with 5% warm-up; TLEG's soft KD (alpha 1, tau 1); start: the line through the
Weight-Selected teacher where the width allows (<= 192), else TLEG's random start. Nothing is chosen.

Learngenes are cached in ``$WAVE_HF_CACHE/learngene/<teacher>-s<steps>x<batch>/w<width>`` (checkpoints beside
them, so a killed run resumes); ``init_sizes.py --methods ... tleg_learngene`` reads them from there. Writes
``benchmarks/results/tleg_learngene.{json,md}``: per width, the auxiliary model's and the teacher's accuracy on
1,000 Fashion-MNIST test images, the loss and the seconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol  # noqa: E402
from _common import learngene_dir  # noqa: E402
from init_sizes import LEARNGENE_BUDGET, bank_path, teacher_path  # noqa: E402

WIDTHS = [64, 128, 192, 256]
STEPS, BATCH = LEARNGENE_BUDGET  # the budget whose learngenes the grid reads
EVAL_IMAGES = 1000


def _train(job: tuple[str, str, int, int, int, bool]) -> dict[str, Any]:
    teacher_dir, tag, width, steps, batch, quick = job
    from wave_hf.baselines import Learngene, train_learngene
    from wave_hf.data import load_image_dataset

    out = learngene_dir(tag, width, steps, batch)
    if (out / "model.safetensors").is_file():
        gene = Learngene.from_pretrained(out)
        return {"width": width, "cached": True, **gene.metrics, "path": str(out)}
    data = load_image_dataset("fashion_mnist", test_limit=200 if quick else EVAL_IMAGES,
                              train_limit=2000 if quick else None)
    t0 = time.perf_counter()
    gene = train_learngene(teacher_dir, data["train"], width, steps=steps, batch_size=batch,
                           eval_dataset=data["test"], output_dir=out.with_name(f"{out.name}-checkpoints"),
                           progress=False)
    gene.metrics["seconds"] = round(time.perf_counter() - t0, 1)
    gene.save_pretrained(out)
    print(f"learngene w{width}: aux {gene.metrics['aux_accuracy']:.4f} vs teacher "
          f"{gene.metrics['teacher_accuracy']:.4f} ({gene.metrics['seconds']:.0f}s)", flush=True)
    return {"width": width, "cached": False, **gene.metrics, "path": str(out)}


def markdown(rows: list[dict[str, Any]], steps: int, batch: int) -> list[str]:
    lines = [f"Budget per learngene: {steps} steps x batch {batch} on Fashion-MNIST training images (the shipped "
             "WAVE bank: 2,000 x 128); TLEG's soft KD (alpha 1, tau 1) from the teacher's logits; lr 5e-4, wd 0.05, "
             "cosine. One seed; nothing chosen. Accuracy on "
             f"{EVAL_IMAGES} Fashion-MNIST test images, the learngene's 12-layer auxiliary model with its trained head.",
             "", "| width | start | parameters | teacher | auxiliary model (A + l/12 B) | loss start -> end | seconds |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["width"]):
        lines.append(f"| {r['width']} | {r['init']} | {r.get('parameters', '?'):,} | {100 * r['teacher_accuracy']:.1f}% | "
                     f"{100 * r['aux_accuracy']:.1f}% | {r['loss_start']:.3f} -> {r['loss_end']:.3f} | "
                     f"{r.get('seconds', 0):.0f} |")
    lines += ["", "Start `teacher`: the least-squares line through the teacher's 12 layers after Weight Selection to "
              "the width; `scratch`: TLEG's random start (the teacher is 192 wide, so 256 cannot be selected)."]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 steps on 2,000 images")
    parser.add_argument("--widths", type=int, nargs="+", default=WIDTHS)
    parser.add_argument("--teacher", default="aux-probe", help="as init_sizes.py --teacher (default aux-probe)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    protocol.setup_process(1)
    steps = 20 if args.quick else STEPS
    teacher_dir, desc = teacher_path(args.teacher, bank_path(None))
    tag = Path(teacher_dir).name
    jobs = [(str(teacher_dir), tag, w, steps, BATCH, args.quick) for w in args.widths]
    rows = protocol.pool_map(_train, jobs, args.workers, initializer=protocol.setup_process, initargs=(1,),
                             order=sorted(range(len(jobs)), key=lambda i: -jobs[i][2]))
    from wave_hf.baselines import Learngene

    for r in rows:
        r["parameters"] = sum(p.numel() for p in Learngene.from_pretrained(r["path"]).parameters())
    if args.quick:
        return
    config = {"teacher": desc, "teacher_dir": str(teacher_dir), "seeds": [0], "budgets": {"steps": steps, "batch": BATCH},
              "split_sizes": {"train": "Fashion-MNIST train (60,000)", "eval": EVAL_IMAGES}}
    protocol.write_results("tleg_learngene", rows, config=config, selected=[], summary=None,
                           markdown=markdown(rows, steps, BATCH), title="TLEG learngenes (one per width)")
    print((protocol.RESULTS / "tleg_learngene.md").read_text(), flush=True)


if __name__ == "__main__":
    main()
