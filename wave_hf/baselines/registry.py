"""The registry of initialization methods and the one factory call, ``init_model``.

Every method is one file with one ``@register_init_method(name, needs=...)`` function (the peft/timm
pattern): the benchmark and the tests iterate over ``INIT_METHODS`` instead of naming methods, so a new
baseline is one new file plus one import in ``__init__``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from transformers import ViTForImageClassification

from ..registry import Registry
from ..validation import MAX_IMAGE_SIZE, MAX_SEED, check_int


@dataclass
class InitRequest:
    """Everything a method may use. ``options`` holds its own keywords, already checked against the names it
    registered, so a method never re-validates them."""

    depth: int
    width: int
    num_heads: int | None = None
    num_labels: int = 10
    id2label: dict[int, str] | None = None
    teacher: Any = None
    initializer: Any = None
    train_dataset: Any = None
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    image_size: int | None = None  # None: the bank's (or the teacher's) own input size


InitFn = Callable[[InitRequest], ViTForImageClassification]

#: What a method may need besides the size: checked by ``init_model`` before the method runs, so a missing
#: input fails with one line naming the method and the argument, not deep inside the method.
NEEDS = ("teacher", "initializer", "train_dataset")


@dataclass(frozen=True)
class InitMethod:
    """One registered method: its function, the inputs it needs, and a one-line description."""

    name: str
    fn: InitFn
    needs: tuple[str, ...]
    description: str
    options: tuple[str, ...] = ()


INIT_METHODS: Registry[InitMethod] = Registry("init method", lambda entry: entry.options)


def register_init_method(name: str, *, needs: tuple[str, ...] = (), options: tuple[str, ...] = (),
                         description: str = "") -> Callable[[InitFn], InitFn]:
    """Decorator: register ``fn(request: InitRequest)`` under ``name``; ``options`` are the extra keywords
    it accepts (anything else is rejected by ``init_model``)."""
    bad = [n for n in needs if n not in NEEDS]
    if bad:
        raise ValueError(f"init method {name!r}: unknown needs {bad}; accepted: {list(NEEDS)}")
    add = INIT_METHODS.register(name)

    def deco(fn: InitFn) -> InitFn:
        doc = description or (fn.__doc__ or "").strip().splitlines()[0]
        add(InitMethod(name, fn, tuple(needs), doc, tuple(options)))
        return fn

    return deco


def init_model(
    method: str,
    depth: int,
    width: int,
    *,
    num_heads: int | None = None,
    num_labels: int = 10,
    teacher: Any = None,
    initializer: Any = None,
    train_dataset: Any = None,
    seed: int = 0,
    image_size: int | None = None,
    **kw: Any,
) -> ViTForImageClassification:
    """A stock ``ViTForImageClassification`` of ``depth`` x ``width`` initialized by ``method``.

    Args:
        method: a key of ``INIT_METHODS`` (``random``, ``weight_selection``, ``weight_selection_matched``,
            ``tleg``, ``tleg_learngene``, ``wave_default``, ``wave_fitted``).
        teacher: the ancestry (anything ``wave_hf.teachers.load_teacher`` takes: a ViT, DeiT or Dinov2 model,
            a folder or a repo id); Weight Selection copies from it, and the fitting methods distil from it
            unless ``distill=False``.
        initializer: a ``WaveInitializer`` (the template bank) for ``tleg`` and the WAVE methods;
            ``tleg_learngene`` takes its learngene as the option ``learngene=`` (``train_learngene``).
        train_dataset: images for the methods that fit on data (``wave_fitted``, ``weight_selection_matched``).
        seed: fixes every random choice (head, new scaler entries, data order); same seed, same bits.
        image_size: the target's input size (a multiple of the patch size; default the bank's, else the
            teacher's): position embeddings are resampled as the teacher family does (the teacher's once at
            load, the bank's position templates at build).
        **kw: method options (e.g. ``id2label``, ``steps``, ``max_images``); unknown ones raise in the method.
    """
    entry = INIT_METHODS[method]  # raises with the registered names for an unknown one
    seed = check_int("seed", seed, 0, MAX_SEED)
    given = {"teacher": teacher, "initializer": initializer, "train_dataset": train_dataset}
    missing = [n for n in entry.needs if given[n] is None]
    if missing:
        raise ValueError(f"init method {method!r} needs {', '.join(f'{n}=' for n in missing)} (got None)")
    id2label = kw.pop("id2label", None)
    options = INIT_METHODS.check_options(method, kw)
    if image_size is not None:
        image_size = check_int("image_size", image_size, 1, MAX_IMAGE_SIZE)
    return entry.fn(InitRequest(depth, width, num_heads, num_labels, id2label, teacher, initializer, train_dataset,
                                seed, options, image_size))
