"""The README's result numbers agree with ``benchmarks/results/*.json`` (no benchmark is run here).

Two checks: every ``<!-- results:NAME -->`` block is exactly what ``benchmarks/render_readme.py`` renders from
the result files, and, independently of the renderer, the specific numbers the README quotes (WAVE vs
budget-matched Weight Selection per size, FS-Merge vs KD per cell) are read back from the README and compared
with the JSON.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"


def _renderer():
    spec = importlib.util.spec_from_file_location("render_readme", ROOT / "benchmarks" / "render_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _json(name: str) -> dict:
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        pytest.skip(f"{path.name} is not there")
    data = json.loads(path.read_text())
    if "envelope" not in data:
        pytest.fail(f"{path.name} has no envelope (benchmarks/protocol.py write_results)")
    return data


def _block(name: str) -> str:
    blocks = _renderer().blocks(README.read_text())
    assert name in blocks, f"README has no <!-- results:{name} --> block"
    return blocks[name]


@pytest.mark.parametrize("name", ["summary", "init_sizes", "merge", "data_efficiency"])
def test_readme_block_is_rendered_from_results(name):
    r = _renderer()
    assert _block(name) == r.RENDERERS[name](), (
        f"README block {name!r} disagrees with benchmarks/results; run python benchmarks/render_readme.py")


def test_wave_vs_matched_ws_numbers():
    data = _json("init_sizes")
    pairs = re.findall(r"^\| (\w+) \| (\d+x\d+) \| ([\d.]+) \+- ([\d.]+) \| ([\d.]+) \+- ([\d.]+) \| "
                       r"([+-][\d.]+) \+- ([\d.]+) \| (win|tie|loss) \|$", _block("init_sizes"), re.M)
    expected = [v for v in data["summary"]["wave_vs"] if v["other"] == "weight_selection_matched"]
    assert len(pairs) == len(expected) > 0
    for (regime, size, wm, ws, bm, bs, margin, spread, verdict), v in zip(pairs, expected):
        assert (regime, size, verdict) == (v["regime"], v["size"], v["verdict"])
        for text, value in ((wm, v["wave"]["mean"]), (ws, v["wave"]["std"]), (bm, v["baseline"]["mean"]),
                            (bs, v["baseline"]["std"]), (margin, v["margin"]), (spread, v["spread"])):
            assert float(text) == pytest.approx(100 * value, abs=0.051), (regime, size, text, value)
    assert data["envelope"]["seeds"] and len(data["envelope"]["seeds"]) >= 3
    assert all(s["selected_on"] == "validation" for s in data["envelope"]["selected"])
    rows = data["rows"]
    assert {r["seed"] for r in rows} >= set(data["envelope"]["seeds"])


def test_fs_merge_vs_kd_numbers():
    data = _json("merge")
    lines = re.findall(r"^\| (\d+) \| (\d+) \| ([\d.]+) \+- ([\d.]+) \(.*?\) \| ([\d.]+) \+- ([\d.]+) \(.*?\) \| "
                       r"([\d.]+) \+- ([\d.]+) \(.*?\) \| ([+-][\d.]+) \+- ([\d.]+) (win|tie|loss) \|",
                       _block("merge"), re.M)
    cells = {(c["n"], c["images_per_task"], c["method"]): c for c in data["summary"]["cells"]}
    vs = {(v["n"], v["images_per_task"], v["other"]): v for v in data["summary"]["fs_merge_vs"]}
    assert len(lines) == len({(c["n"], c["images_per_task"]) for c in data["summary"]["cells"]}) > 0
    for n, k, fm, fs, km, ks, mm, ms, margin, spread, verdict in lines:
        key = (int(n), int(k))
        for (mean, std), method in (((fm, fs), "fs_merge"), ((km, ks), "kd"), ((mm, ms), "kd_maps")):
            acc = cells[key + (method,)]["avg_acc"]
            assert float(mean) == pytest.approx(100 * acc["mean"], abs=0.051)
            assert float(std) == pytest.approx(100 * acc["std"], abs=0.051)
        v = vs[key + ("kd",)]
        assert float(margin) == pytest.approx(100 * v["margin"], abs=0.051)
        assert float(spread) == pytest.approx(100 * v["spread"], abs=0.051)
        assert verdict == v["verdict"]
    assert len(data["envelope"]["seeds"]) >= 3
    assert all(s["selected_on"] == "validation" for s in data["envelope"]["selected"])


def test_result_files_carry_the_envelope():
    for name in ("init_sizes", "merge", "build_speed"):
        env = _json(name)["envelope"]
        for key in ("git", "versions", "machine", "command", "wall_s", "cpu_s", "seeds", "split_sizes", "budgets",
                    "selected"):
            assert key in env, (name, key)
        assert {"revision", "dirty"} <= set(env["git"])
        assert {"loadavg_start", "loadavg_end", "cores", "cpu"} <= set(env["machine"])


def _protocol():
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("protocol", ROOT / "benchmarks" / "protocol.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_protocol_win_rule_and_validation_record(tmp_path):
    p = _protocol()
    assert p.win([0.80, 0.81, 0.79], [0.70, 0.71, 0.69])["verdict"] == "win"
    assert p.win([0.70, 0.75, 0.65], [0.69, 0.70, 0.68])["verdict"] == "tie"  # margin 1 point < spread
    assert p.win([0.60, 0.61, 0.59], [0.70, 0.71, 0.69])["verdict"] == "loss"
    chosen, payload, record = p.choose_on_validation([("a", 1), ("b", 3), ("c", 2)], lambda c: (c / 10, c * 100),
                                                     what="toy")
    assert (chosen, payload, record["selected_on"], record["budget"]) == ("b", 300, "validation", 3)
    with pytest.raises(ValueError):
        p.choose_on_validation([("a", 1)], lambda c: c, what="toy", split="test")
    out = p.write_results("toy", [{"seed": 0}], config={"seeds": [0, 1, 2], "split_sizes": {}, "budgets": {}},
                          selected=[record], out=tmp_path)
    assert json.loads((tmp_path / "toy.json").read_text())["envelope"]["selected_on"] == ["validation"]
    assert out["envelope"]["git"]["revision"] and "## Provenance" in (tmp_path / "toy.md").read_text()
    assert not list(tmp_path.glob(".*tmp"))


def test_protocol_flags_a_search_grid_whose_choices_sit_at_one_end():
    p = _protocol()
    grid = [1e-3, 1e-2]
    choices = [("wave", "lr", 1e-2, grid)] * 7 + [("wave", "lr", 1e-3, grid)] + \
              [("ws", "lr", 3e-4, [3e-4, 1e-3, 3e-3])] * 2 + [("ws", "lr", 1e-3, [3e-4, 1e-3, 3e-3])] * 2 + \
              [("one", "lr", 5.0, [5.0])]
    edges = {e["method"]: e for e in p.grid_edges(choices)}
    assert edges["wave"] == {"method": "wave", "name": "lr", "grid": grid, "n": 8, "low": 1, "high": 7, "flag": "high"}
    assert edges["ws"]["flag"] is None and (edges["ws"]["low"], edges["ws"]["high"]) == (2, 0)
    assert "one" not in edges  # one candidate: no edge to report
    md = "\n".join(p.grid_edges_md(list(edges.values())))
    assert "**high end**" in md and "0.001, 0.01" in md


def test_protocol_pools_are_raw_safetensors_and_match_the_loader(tmp_path, monkeypatch):
    """The benchmarks' data: stored bytes cached as safetensors + JSON (nothing unpickled), and every image
    size derived from them equals what ``wave_hf.data`` makes of the same images."""
    from wave_hf.data import Preprocessing, load_image_dataset

    monkeypatch.setenv("WAVE_HF_CACHE", str(tmp_path))
    p = _protocol()
    raw = p.raw_pool("digits", 300, 100)
    assert raw["xtr"].dtype == torch.uint8 and raw["xtr"].shape == (300, 8, 8) and len(raw["xte"]) == 100
    assert sorted(f.name for f in (tmp_path / "splits").iterdir()) == [
        "digits-pool300-test100-seed0.raw.json", "digits-pool300-test100-seed0.raw.safetensors"]
    pre = Preprocessing((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic")
    train, test = p.load_pool("digits", 300, 100, image_size=16, num_channels=3, preprocessing=pre)
    direct = load_image_dataset("digits", image_size=16, num_channels=3, train_limit=300, test_limit=100,
                                seed=p.DATA_SEED, preprocessing=pre)
    assert torch.equal(train.pixel_values, torch.stack([direct["train"][i]["pixel_values"] for i in range(300)]))
    assert torch.equal(test.labels, torch.tensor([direct["test"][i]["labels"] for i in range(100)]))
    assert train.names == direct["train"].features["label"].names
    split = p.splits("digits", 1, n_train=200, n_val=50, n_test=100, pool=300, image_size=16, num_channels=3,
                     preprocessing=pre)
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (200, 50, 100)
