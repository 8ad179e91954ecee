"""The evaluation protocol every benchmark follows (issue 15), and the one result envelope.

- **Splits fixed by seed.** Each task's test set is the source's own test split (loader seed ``DATA_SEED``,
  the same for every seed, so test never moves and never overlaps training). Train and validation are carved
  from the source's *train* side: a pool of ``pool`` images is drawn once (``DATA_SEED``), then every seed
  permutes the pool and takes ``n_train`` training and ``n_val`` validation images. Validation is never
  taken from test.
- **Choices on validation.** Every hyperparameter a method uses is either fixed in advance or chosen by
  ``choose_on_validation`` from a candidate list whose length (the search budget) is the same for every
  method; the helper records what was chosen, from what, and on which split. Test is scored once per
  reported number, on the chosen candidate only.
- **Seeds and spread.** ``SEEDS`` (>= 3); ``mean_spread`` gives mean, std, min, max; ``win(a, b)`` counts a
  win only when the mean margin exceeds the spread.
- **One envelope.** ``write_results(name, rows, config=..., selected=...)`` writes
  ``benchmarks/results/<name>.json`` and ``.md`` with git revision (+ dirty flag), package versions,
  machine (cores, CPU model, load average at start and end), command line, wall and CPU time, seeds, split
  sizes, budgets and the ``selected_on: validation`` records; each file is written to a temporary file and
  renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cache_dir  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
SEEDS = [0, 1, 2]
DATA_SEED = 0  # fixes each source's own train/test split and the train pool; never varies

_START = {"wall": time.perf_counter(), "loadavg": os.getloadavg(), "utc": datetime.now(timezone.utc).isoformat()}


# ------------------------------------------------------------------------------------------------ data
class TensorImages(torch.utils.data.Dataset):
    """A split held as two tensors (decoding on access costs more than a small ViT's training step)."""

    def __init__(self, pixel_values: torch.Tensor, labels: torch.Tensor, names: list[str]):
        self.pixel_values, self.labels, self.names = pixel_values, labels, list(names)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"pixel_values": self.pixel_values[i], "labels": int(self.labels[i])}

    def select(self, indices) -> TensorImages:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return TensorImages(self.pixel_values[idx], self.labels[idx], self.names)

    @property
    def num_labels(self) -> int:
        return len(self.names)


def raw_pool(source: str, pool: int, n_test: int) -> dict[str, Any]:
    """The stored 28x28 grey pixels (uint8) of ``source``'s train pool and test set, fixed by ``DATA_SEED``.

    Cached once per (source, pool, test) as safetensors + JSON (no pickle): the raw bytes are small and
    exact, so any image size or normalisation is derived from them in-process, and a machine without the
    source (a lent GPU machine) needs only these files (``$WAVE_HF_CACHE/splits``).
    """
    from safetensors.torch import load_file, save_file

    path = cache_dir() / "splits" / f"{source}-pool{pool}-test{n_test}-seed{DATA_SEED}.raw.safetensors"
    names_path = path.with_suffix(".json")
    if path.is_file() and names_path.is_file():
        names = json.loads(names_path.read_text())["names"]
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise ValueError(f"{names_path}: 'names' must be a list of strings")
        return {**load_file(path), "names": names}
    from wave_hf.data import load_image_dataset

    ds = load_image_dataset(source, image_size=28, num_channels=1, train_limit=pool, test_limit=n_test,
                            seed=DATA_SEED)
    out: dict[str, Any] = {}
    for split, key in (("train", "tr"), ("test", "te")):
        stored = ds[split].with_format("numpy")
        out[f"x{key}"] = torch.as_tensor(np.asarray(stored["image"], dtype=np.uint8))
        out[f"y{key}"] = torch.as_tensor(np.asarray(stored["label"], dtype=np.int64))
    names = list(ds["train"].features["label"].names)
    _atomic_write(names_path, json.dumps({"names": names}))
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    save_file({k: v.contiguous() for k, v in out.items()}, tmp)
    os.replace(tmp, path)  # last: the pair is read only when both files are there
    return {**out, "names": names}


def _pixels(images: torch.Tensor, image_size: int, num_channels: int, preprocessing: Any) -> torch.Tensor:
    """uint8 (N, 28, 28) -> model-ready float32 through the library's one preprocessing path."""
    from wave_hf.data import Preprocessing, _make_transform

    transform = _make_transform(image_size, num_channels, (preprocessing or Preprocessing()).for_channels(num_channels))
    out = []
    for start in range(0, len(images), 512):
        chunk = images[start : start + 512].numpy()
        out += transform({"image": list(chunk)})["pixel_values"]
    return torch.stack(out)


@functools.lru_cache(maxsize=4)
def load_pool(source: str, pool: int, n_test: int, *, image_size: int = 28, num_channels: int = 1,
              preprocessing: Any = None) -> tuple[TensorImages, TensorImages]:
    """(train pool, test set) of ``source``, fixed by ``DATA_SEED``, preprocessed for the model that reads it
    (default 28x28 grey in [-1, 1]; e.g. 112 px RGB with a teacher's ``Preprocessing``). Kept in memory:
    every seed's split is an index selection of the same pool."""
    raw = raw_pool(source, pool, n_test)
    return tuple(TensorImages(_pixels(raw[f"x{k}"], image_size, num_channels, preprocessing), raw[f"y{k}"],
                              raw["names"]) for k in ("tr", "te"))  # type: ignore[return-value]


def splits(source: str, seed: int, *, n_train: int, n_val: int, n_test: int, pool: int | None = None,
           **pixels: Any) -> dict[str, TensorImages]:
    """``{"train", "val", "test"}`` for one task and seed: train and val from the train pool, test fixed.
    ``pixels``: ``image_size``, ``num_channels``, ``preprocessing`` of ``load_pool``."""
    pool = pool or n_train + n_val
    train_pool, test = load_pool(source, pool, n_test, **pixels)
    if n_train + n_val > len(train_pool):
        raise ValueError(f"{source}: {n_train} train + {n_val} validation images asked, the pool has "
                         f"{len(train_pool)}")
    order = torch.randperm(len(train_pool), generator=torch.Generator().manual_seed(1000 + seed)).tolist()
    return {"train": train_pool.select(order[:n_train]),
            "val": train_pool.select(order[n_train : n_train + n_val]), "test": test}


# ------------------------------------------------------------------------------------------ selection
def choose_on_validation(candidates: Sequence[tuple[str, Any]], score_fn: Callable[[Any], Any], *,
                         what: str, split: str = "validation") -> tuple[str, Any, dict[str, Any]]:
    """Score every ``(label, config)`` with ``score_fn(config)`` on the validation split; keep the best.

    ``score_fn`` returns a score (higher is better) or ``(score, payload)`` (e.g. the trained model, so the
    chosen one is not trained again). Returns ``(label, payload, record)``; ``record`` says what was chosen,
    from which candidates, with which scores, and ``selected_on`` (always ``"validation"`` here: the split
    is named by the caller only so a record can never claim a split it did not use).
    """
    if split != "validation":
        raise ValueError("choices are made on the validation split only")
    scores: dict[str, float] = {}
    best: tuple[float, str, Any] | None = None
    for label, config in candidates:
        out = score_fn(config)
        score, payload = out if isinstance(out, tuple) else (out, None)
        scores[label] = float(score)
        if best is None or score > best[0]:
            best = (float(score), label, payload)
    assert best is not None, "no candidates"
    record = {"what": what, "candidates": [label for label, _ in candidates], "budget": len(candidates),
              "scores": scores, "chosen": best[1], "selected_on": split}
    return best[1], best[2], record


#: A hyperparameter whose choices sit on one end of its candidate grid this often is reported as "at the edge":
#: the best value likely lies beyond the grid, and the grid (of every method alike) should move.
EDGE_SHARE = 0.75


def grid_edges(choices: Iterable[tuple[str, str, float, Sequence[float]]], share: float = EDGE_SHARE
               ) -> list[dict[str, Any]]:
    """How often each (method, hyperparameter) was chosen at the low or high end of its candidate values.

    ``choices``: ``(method, name, chosen value, candidate values)``, one per choice made on validation. Returns
    one record per (method, name) with ``n``, ``low``, ``high`` (counts), the grid and ``flag``: ``"low"`` or
    ``"high"`` when that end took more than ``share`` of the choices, else None. A grid of one value has no
    edge to report. Why: validation picks within the grid only, so a grid that is too narrow hides a better
    setting from every choice and says nothing; the count is what shows it.
    """
    counts: dict[tuple[str, str], dict[str, Any]] = {}
    for method, name, chosen, values in choices:
        grid = sorted(set(values))
        if len(grid) < 2:
            continue
        rec = counts.setdefault((method, name), {"method": method, "name": name, "grid": grid, "n": 0, "low": 0,
                                                 "high": 0})
        rec["n"] += 1
        rec["low"] += chosen == grid[0]
        rec["high"] += chosen == grid[-1]
    out = []
    for rec in counts.values():
        flag = next((end for end in ("low", "high") if rec[end] > share * rec["n"]), None)
        out.append({**rec, "flag": flag})
    return out


def grid_edges_md(edges: Sequence[dict[str, Any]], share: float = EDGE_SHARE) -> list[str]:
    """The ``grid_edges`` table for a result file (empty when nothing was chosen from a grid)."""
    if not edges:
        return []
    lines = ["## Search grids: where validation chose", "",
             f"Per method and hyperparameter: choices at the low / high end of its candidates; flagged when one end "
             f"took more than {share:.0%} of them (the best value may lie beyond the grid).", "",
             "| method | hyperparameter | candidates | choices | at low end | at high end | flag |",
             "|---|---|---|---|---|---|---|"]
    for e in edges:
        flag = f"**{e['flag']} end**" if e["flag"] else ""
        grid = ", ".join(f"{v:g}" for v in e["grid"])
        lines.append(f"| {e['method']} | {e['name']} | {grid} | {e['n']} | {e['low']} | {e['high']} | {flag} |")
    return [*lines, ""]


# ------------------------------------------------------------------------------------------- spreads
def mean_spread(values: Iterable[float]) -> dict[str, float]:
    v = [float(x) for x in values]
    return {"n": len(v), "mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
            "min": min(v), "max": max(v)}


def fmt_ms(values: Iterable[float], scale: float = 100.0, digits: int = 1) -> str:
    """``mean +- std [min, max]`` (percent by default)."""
    s = mean_spread(values)
    return (f"{scale * s['mean']:.{digits}f} +- {scale * s['std']:.{digits}f} "
            f"[{scale * s['min']:.{digits}f}, {scale * s['max']:.{digits}f}]")


def win(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """``a`` against ``b`` over seeds: ``"win"`` / ``"loss"`` only when ``|mean(a) - mean(b)|`` exceeds the
    spread, else ``"tie"``. The spread is the larger of the two per-method standard deviations and, when the
    seeds are paired (same length), the standard deviation of the per-seed differences."""
    sa, sb = mean_spread(a), mean_spread(b)
    margin = sa["mean"] - sb["mean"]
    spreads = [sa["std"], sb["std"]]
    if len(a) == len(b) and len(a) > 1:
        spreads.append(statistics.stdev([x - y for x, y in zip(a, b)]))
    spread = max(spreads)
    verdict = "tie" if abs(margin) <= spread else ("win" if margin > 0 else "loss")
    return {"margin": margin, "spread": spread, "verdict": verdict, "n_seeds": min(len(a), len(b))}


# ------------------------------------------------------------------------------------------ envelope
def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def envelope(*, config: dict[str, Any], selected: list[dict[str, Any]]) -> dict[str, Any]:
    """Provenance of one result file (see the module docstring)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        # A lent GPU machine gets the working tree without .git: the sender names the commit it sent.
        "git": {"revision": _git("rev-parse", "HEAD") or os.environ.get("WAVE_HF_BENCH_REVISION") or None,
                "dirty": bool(status),
                "dirty_files": [line[3:] for line in status.splitlines()]},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": _version("transformers"), "wave_hf": _version("wave-hf") or _version("wave_hf")},
        "machine": {"cores": os.cpu_count(), "cpu": _cpu_model(), "platform": platform.platform(),
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "torch_threads": torch.get_num_threads(),
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                    "loadavg_start": list(_START["loadavg"]), "loadavg_end": list(os.getloadavg())},
        "command": [Path(sys.executable).name, *sys.argv],
        "started_utc": _START["utc"], "finished_utc": datetime.now(timezone.utc).isoformat(),
        "wall_s": time.perf_counter() - _START["wall"],
        "cpu_s": own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime,
        "seeds": config.get("seeds"), "split_sizes": config.get("split_sizes"), "budgets": config.get("budgets"),
        "config": config, "selected": selected,
        "selected_on": sorted({s.get("selected_on", "?") for s in selected}) or ["nothing chosen: all fixed"],
    }


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def pool_map(fn: Callable[[Any], Any], jobs: Sequence[Any], workers: int, *,
             initializer: Callable[..., None] | None = None, initargs: tuple = (), log: Path | None = None,
             order: Sequence[int] | None = None, fresh: bool = False) -> list[Any]:
    """``fn`` over ``jobs`` in ``workers`` spawned processes (each set up by ``initializer(*initargs)``), in
    ``order`` (default: as given), results in job order; each result is appended to ``log`` (JSON lines) as it
    lands. ``fresh``: a new process per job (its own peak memory). One worker and not ``fresh``: in process."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    order = list(range(len(jobs))) if order is None else list(order)
    out: list[Any] = [None] * len(jobs)

    def done(i: int, result: Any) -> None:
        out[i] = result
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "a") as f:
                f.write(json.dumps(result, default=str) + "\n")

    if workers <= 1 and not fresh:
        if initializer is not None:
            initializer(*initargs)
        for i in order:
            done(i, fn(jobs[i]))
        return out
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=initializer,
                             initargs=initargs, max_tasks_per_child=1 if fresh else None) as pool:
        futures = {pool.submit(fn, jobs[i]): i for i in order}
        for f in as_completed(futures):
            done(futures[f], f.result())
    return out


def save_figure(fig: Any, path: Path, dpi: int = 110) -> None:
    """Write a matplotlib figure atomically (readers never see half a png), then close it."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    os.replace(tmp, path)
    plt.close(fig)


def envelope_md(env: dict[str, Any]) -> list[str]:
    m, g, v = env["machine"], env["git"], env["versions"]
    load = (f"load average {m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end "
            f"(1-min, {m['cores']} cores)")
    sel = env["selected"]
    return [
        "## Provenance", "",
        f"- git {str(g['revision'])[:12]}{' + uncommitted changes' if g['dirty'] else ''}; python {v['python']}, "
        f"torch {v['torch']}, transformers {v['transformers']}, wave_hf {v['wave_hf']}",
        f"- machine: {m['cores']} cores, {m['cpu']}, GPU {m['gpu'] or 'none'}; {m['torch_threads']} torch thread(s) "
        f"per process, OMP_WAIT_POLICY={m['omp_wait_policy']}; {load}",
        f"- command: `{' '.join(env['command'])}`",
        f"- wall {env['wall_s'] / 60:.1f} min, CPU {env['cpu_s'] / 60:.1f} min (this process and its workers)",
        f"- seeds {env['seeds']}; split sizes {json.dumps(env['split_sizes'])}",
        f"- budgets: {json.dumps(env['budgets'])}",
        f"- choices: {len(sel)} made on the validation split (`selected_on: validation`; the JSON lists each "
        "with its candidates and scores); test scored once per reported number" if sel else
        "- choices: none; every hyperparameter fixed in advance", "",
    ]


def write_results(name: str, rows: list[dict[str, Any]], *, config: dict[str, Any],
                  selected: list[dict[str, Any]], summary: Any = None, markdown: Sequence[str] = (),
                  title: str | None = None, out: Path = RESULTS) -> dict[str, Any]:
    """Write ``<out>/<name>.json`` (envelope + rows + summary) and ``<out>/<name>.md``, each atomically."""
    env = envelope(config=config, selected=selected)
    payload = {"name": name, "envelope": env, "summary": summary, "rows": rows}
    _atomic_write(Path(out) / f"{name}.json", json.dumps(payload, indent=1, default=str) + "\n")
    md = [f"# {title or name}", "", *markdown, "", *envelope_md(env)]
    _atomic_write(Path(out) / f"{name}.md", "\n".join(md) + "\n")
    return payload


def resummarize(name: str, summarize_fn, markdown_fn, *, title: str, out: Path = RESULTS) -> dict[str, Any]:
    """Recompute the summary and the markdown of ``<name>.json`` from its stored rows, keeping the stored
    envelope (the run's provenance) and recording the re-rendering in it; no benchmark is rerun."""
    payload = json.loads((Path(out) / f"{name}.json").read_text())
    env = payload["envelope"]
    env.setdefault("resummarized", []).append({"command": [Path(sys.executable).name, *sys.argv],
                                               "utc": datetime.now(timezone.utc).isoformat(),
                                               "git": _git("rev-parse", "HEAD") or None})
    payload["summary"] = summarize_fn(payload["rows"])
    _atomic_write(Path(out) / f"{name}.json", json.dumps(payload, indent=1, default=str) + "\n")
    md = [f"# {title}", "", *markdown_fn(payload["summary"], env["config"]), "", *envelope_md(env)]
    if env.get("resummarized"):
        md += [f"- summary re-rendered from the stored rows: {', '.join(r['utc'] for r in env['resummarized'])}", ""]
    _atomic_write(Path(out) / f"{name}.md", "\n".join(md) + "\n")
    return payload


def setup_process(threads: int = 1) -> None:
    """One torch thread, quiet transformers: what every benchmark process does first."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch.set_num_threads(threads)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
