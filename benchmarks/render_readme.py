"""Render the README's result numbers from ``benchmarks/results/*.json``.

    python benchmarks/render_readme.py           # rewrite every <!-- results:NAME --> ... <!-- /results --> block
    python benchmarks/render_readme.py --check   # exit 1 (and name the blocks) when README and results disagree

Every number between the markers comes from a result file; ``tests/test_readme_results.py`` fails when the
README's blocks differ from what the result files render to. Text outside the markers is not touched.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
BANK_CONFIG = ROOT / "wave_hf" / "default_bank" / "config.json"
BLOCK = re.compile(r"(<!-- results:(?P<name>[a-z_]+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _ms(s: dict[str, float]) -> str:
    return f"{100 * s['mean']:.1f} +- {100 * s['std']:.1f}"


def _run_line(env: dict[str, Any]) -> str:
    m = env["machine"]
    rows_from = (env.get("config") or {}).get("rows_from")
    if rows_from:  # rendered from the row logs of other processes: the envelope timed only the rendering
        return (f"rows computed by {rows_from.split(':')[0]} (each row records its own seconds), rendered at git "
                f"{str(env['git']['revision'])[:8]}")
    return (f"wall {env['wall_s'] / 60:.1f} min, CPU {env['cpu_s'] / 60:.1f} min on {m['cores']} cores "
            f"({m['cpu']}; load {m['loadavg_start'][0]:.1f} at start, {m['loadavg_end'][0]:.1f} at end), "
            f"git {str(env['git']['revision'])[:8]}{' + local changes' if env['git']['dirty'] else ''}")


def render_summary() -> str:
    lines = ["| what | result |", "|---|---|"]
    b = _load("build_speed")
    if b and "envelope" not in b:
        lines.append("| `build()` vs `from_pretrained` (`build_speed.json` predates the envelope: rerun) | - |")
    elif b:
        s = b["summary"]
        lines.append(f"| `build()` vs `from_pretrained` of the same saved {s['depth']}x{s['width']} ViT "
                     f"(`build_speed.md`, median of {s['repeats']}) | **{s['ratio']:.2f}x** (issue 16's target "
                     "<= 1.0: not met) |" if s["ratio"] > 1.0 else f"| `build()` vs `from_pretrained` of the same "
                     f"saved {s['depth']}x{s['width']} ViT (`build_speed.md`, median of {s['repeats']}) | "
                     f"**{s['ratio']:.2f}x** (target <= 1.0) |")
        if "ratio_to_first_run" in s:
            lines.append(f"| the same, each followed by one forward pass (`from_pretrained` reads its weights "
                         f"then) | **{s['ratio_to_first_run']:.2f}x** |")
    a = _load("ancestry")
    if a:
        lines.append(f"| ancestry: stock ViT 12x192, patch 7, {a['epochs']:g} epochs on Fashion-MNIST "
                     f"(`ancestry.json`, 1 run, no envelope) | {100 * a['test_accuracy']:.1f}% test |")
    if BANK_CONFIG.is_file():
        c = json.loads(BANK_CONFIG.read_text())
        m = c.get("metrics", {})
        if "aux_accuracy" in m:
            lines.append(f"| shipped bank: D_T {c['template_width']}, N {c['num_templates']}; stage 1 "
                         f"{m['distill_steps']} steps x {m['distill_batch_size']} (the bank's own record) | auxiliary "
                         f"model {100 * m['aux_accuracy']:.1f}% vs teacher {100 * m['teacher_accuracy']:.1f}% |")
    p = _load("pipeline")
    if p:
        accs = " / ".join(f"{100 * s['fitted']:.1f}" for s in p["sizes"] if "fitted" in s)
        sizes = " / ".join(str(s.get("size")) for s in p["sizes"] if "fitted" in s)
        lines.append(f"| right after the scaler fit, no fine-tuning, {sizes} (`pipeline.md`: 1 seed, older "
                     f"protocol, no envelope) | {accs}% |")
    return "\n".join(lines) + "\n"


def render_init_sizes(name: str = "init_sizes") -> str:
    r = _load(name)
    if r is None or "envelope" not in r:
        return f"(no `{name}.json` yet: run `python benchmarks/run_all.py`)\n"
    env, cfg, s = r["envelope"], r["envelope"]["config"], r["summary"]
    budget = "quick budget (`--quick`), not the full grid" if cfg["quick"] else "full budget"
    sp = cfg["split_sizes"]
    lines = [
        f"`{name}.md`: {budget}; {len(env['seeds'])} seeds; per seed {sp['train']} training / "
        f"{sp['validation']} validation / {sp['test']} test images; every method gets "
        f"{cfg['budgets']['search_budget_per_method']} candidates chosen on validation. Teacher: {cfg['teacher']}. "
        f"{_run_line(env)}.", "",
        "WAVE fitted against budget-matched Weight Selection and the others, test accuracy %, mean +- std over "
        "seeds (a win or loss only when the margin exceeds the spread):", "",
        "| task | size | WAVE fitted | WS budget-matched | margin | verdict |", "|---|---|---|---|---|---|",
    ]
    for v in s["wave_vs"]:
        if v["other"] == "weight_selection_matched":
            lines.append(f"| {v['regime']} | {v['size']} | {_ms(v['wave'])} | {_ms(v['baseline'])} | "
                         f"{100 * v['margin']:+.1f} +- {100 * v['spread']:.1f} | {v['verdict']} |")
    lines += ["", "| task | WAVE fitted vs | sizes | wins / ties / losses | mean margin |", "|---|---|---|---|---|"]
    for t in s["tally"]:
        lines.append(f"| {t['regime']} | {t['label']} | {t['sizes']} | {t['wins']} / {t['ties']} / {t['losses']} | "
                     f"{100 * t['mean_margin']:+.1f} |")
    return "\n".join(lines) + "\n"


def render_merge() -> str:
    r = _load("merge")
    if r is None or "envelope" not in r:
        return "(no `merge.json` yet: run `python benchmarks/run_all.py`)\n"
    env, cfg, s = r["envelope"], r["envelope"]["config"], r["summary"]
    budget = cfg.get("budget", "quick" if cfg["quick"] else "paper")
    paper = "as the paper" if budget == "paper" else "not the paper's 100"
    what = f"`{budget}` budget ({cfg['epochs']} epochs, {paper})"
    defaults = s.get("defaults") or {}
    chosen = (" Defaults chosen on validation first: " + "; ".join(f"{m} `{v}`" for m, v in defaults.items()) + "."
              if defaults else "")
    lines = [
        f"`merge.md`: {what}; {len(env['seeds'])} seeds; tasks {', '.join(cfg['tasks'])}; every trained method's "
        f"learning rate chosen on validation from {cfg['budgets']['search_budget_per_method']} candidates per cell."
        f"{chosen} {_run_line(env)}.", "",
        "Average task accuracy %, mean +- std over seeds, and trainable parameters:", "",
        "| N | images/task | FS-Merge | KD | KD + per-task maps | FS-Merge - KD | FS-Merge - KD + maps |",
        "|---|---|---|---|---|---|---|",
    ]
    cells = {(c["n"], c["images_per_task"], c["method"]): c for c in s["cells"]}
    vs = {(v["n"], v["images_per_task"], v["other"]): v for v in s["fs_merge_vs"]}
    for n, k in sorted({(c["n"], c["images_per_task"]) for c in s["cells"]}):
        row = []
        for m in ("fs_merge", "kd", "kd_maps"):
            c = cells.get((n, k, m))
            row.append("n/a" if c is None else
                       f"{_ms(c['avg_acc'])} ({'/'.join(f'{p / 1e3:.0f}k' for p in c['trainable_params'])} params)")
        for m in ("kd", "kd_maps"):
            v = vs.get((n, k, m))
            row.append("n/a" if v is None else
                       f"{100 * v['margin']:+.1f} +- {100 * v['spread']:.1f} {v['verdict']}")
        lines.append(f"| {n} | {k} | " + " | ".join(row) + " |")
    ens = [c for c in s["cells"] if c["method"] == "ensemble"]
    if ens:
        lines += ["", "Ensemble of the N originals (N models, not one): " + "; ".join(
            f"N={c['n']} k={c['images_per_task']} {_ms(c['avg_acc'])}" for c in ens) + "."]
    cost = s.get("cost") or []
    if cost:
        per = {(c["n"], c["method"]): c["s_per_step"] for c in cost}
        lines += ["", "Training cost, FS-Merge / KD seconds per step (batch 64, 1 thread): " + "; ".join(
            f"N={n} {per[(n, 'fs_merge')] / per[(n, 'kd')]:.2f}x" for n in sorted({c['n'] for c in cost})) + "."]
    return "\n".join(lines) + "\n"


def render_data_efficiency() -> str:
    r = _load("data_efficiency")
    if r is None or "envelope" not in r:
        return "(no `data_efficiency.json` yet: run `python benchmarks/run_all.py`)\n"
    env, s = r["envelope"], r["summary"]
    cfg = env["config"]
    curve = cfg.get("curve", {})
    methods = [m for m in ("random", "weight_selection_matched", "wave_fitted")
               if any(c["method"] == m for c in s["cells"])]
    labels = {c["method"]: c["label"] for c in s["cells"]}
    lines = [f"`data_efficiency.md`: `{cfg.get('budget', '?')}` budget, {curve.get('ft_steps', '?')} fine-tune steps "
             f"whatever the number of images; {len(env['seeds'])} seeds; fine-tune lr chosen on validation. "
             f"{_run_line(env)}.", "",
             "Fashion-MNIST test accuracy %, mean +- std over seeds, after the fine-tune:", "",
             "| size | training images | " + " | ".join(labels[m] for m in methods) + " |",
             "|---|---|" + "---|" * len(methods)]
    cells = {(c["size"], c["n_train"], c["method"]): c for c in s["cells"]}
    for size, n in sorted({(c["size"], c["n_train"]) for c in s["cells"]}, key=lambda t: (t[0], t[1])):
        lines.append(f"| {size} | {n} | " + " | ".join(
            _ms(cells[(size, n, m)]["acc"]) if (size, n, m) in cells else "n/a" for m in methods) + " |")
    for reach in s["reach"]:
        if reach["method"] == "wave_fitted":
            got = (f"from {reach['n']} images ({reach['n'] / reach['target_n']:.3g} of them)" if reach["n"] is not None
                   else "not within the curve")
            lines += ["", f"{reach['size']}: random init's mean at {reach['target_n']} images is "
                      f"{100 * reach['target']:.1f}%; WAVE fitted reaches it {got} (issue 17's goal: <= "
                      f"{s['goal_ratio']:g} of the images: {'met' if reach['meets_goal'] else 'not met'} at this "
                      "budget)."]
    return "\n".join(lines) + "\n"


RENDERERS = {"summary": render_summary, "init_sizes": render_init_sizes, "merge": render_merge,
             "data_efficiency": render_data_efficiency,
             "init_sizes_transfer": lambda: render_init_sizes("init_sizes_transfer")}


def blocks(text: str) -> dict[str, str]:
    return {m.group("name"): m.group("body") for m in BLOCK.finditer(text)}


def render(text: str) -> str:
    def sub(m: re.Match) -> str:
        name = m.group("name")
        if name not in RENDERERS:
            raise SystemExit(f"README block {name!r} has no renderer; known: {sorted(RENDERERS)}")
        return m.group(1) + RENDERERS[name]() + m.group(4)

    return BLOCK.sub(sub, text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only compare; exit 1 when they disagree")
    args = p.parse_args(argv)
    text = README.read_text()
    new = render(text)
    if args.check:
        old, fresh = blocks(text), blocks(new)
        stale = [n for n in fresh if old.get(n) != fresh[n]]
        if stale:
            print(f"README blocks out of date with benchmarks/results: {stale}; run benchmarks/render_readme.py")
            return 1
        return 0
    if new != text:
        tmp = README.with_name(".README.md.tmp")
        tmp.write_text(new)
        tmp.replace(README)
    return 0


if __name__ == "__main__":
    sys.exit(main())
