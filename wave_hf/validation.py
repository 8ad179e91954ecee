"""One place for the checks every public entry point makes on values it did not compute itself.

Why one module: a size, a rank or a name arrives from many doors (Python calls, ``config.json``, a scalers
file's metadata, ``merge_config.json``, the CLI). Each door used to carry its own hand-written check, and the
doors disagreed (a numpy integer accepted here, refused there; a ``../`` task name refused by ``merge()`` but
not by ``MergedViT``). Every check here raises a ``TypeError`` or ``ValueError`` whose message names the
parameter, the bad value (its ``repr``) and what is accepted, and runs before anything is allocated or
written.

The limits below are documented bounds, not hardware facts: they keep a typo (``width=1_000_000``) from
turning into a 40 GB allocation or an hour-long hang. Within them, :func:`check_memory` compares an
estimate of what a call will allocate with the memory this machine has available.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

#: Transformer layers of a target, a teacher or an auxiliary model.
MAX_DEPTH = 1024
#: Hidden size (and template width, head size) of any ViT built here. ViT-H is 1280, ViT-22B is 6144.
MAX_WIDTH = 8192
#: Side of the square input image, in pixels.
MAX_IMAGE_SIZE = 4096
#: Patches per image (``(image_size // patch_size) ** 2``); attention is quadratic in it.
MAX_NUM_PATCHES = 65536
#: Input channels.
MAX_CHANNELS = 64
#: Matrix and vector templates per type in a bank.
MAX_TEMPLATES = 1024
#: MLP hidden size over width.
MAX_MLP_RATIO = 64
#: Classes of one classification head (ImageNet-21k has 21,841).
MAX_NUM_LABELS = 100_000
#: Rank of FS-Merge's low-rank maps (it is also bounded by the models' width).
MAX_RANK = 1024
#: Offline augmented copies of each merge image (the paper uses a handful).
MAX_AUGMENT_COPIES = 256
#: Seeds go to numpy too, which takes ``[0, 2**32 - 1]``.
MAX_SEED = 2**32 - 1
#: Length of a name used as a file or folder name (task names, scalers file names).
MAX_NAME_LENGTH = 100
#: Share of the available memory one call may plan to allocate; the rest is the process's working room.
MEMORY_FRACTION = 0.8

#: File names a merge or bank folder writes itself: a task folder of that name would overwrite one of them.
RESERVED_FILE_NAMES = ("config.json", "readme.md", "merge_config.json", "model.safetensors")
#: Device names Windows refuses as file names, with or without an extension.
WINDOWS_RESERVED_NAMES = ("con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)),
                          *(f"lpt{i}" for i in range(1, 10)))
#: Path separators and the other characters Windows refuses in a file name.
FORBIDDEN_NAME_CHARS = '/\\:*?"<>|'


class ResourceLimitError(ValueError, MemoryError):
    """A call would allocate more memory than this machine has available; raised before allocating.

    A ``ValueError`` because the cause is an input (a size, a rank, a count) and the CLI reports it like any
    other bad value; a ``MemoryError`` so that code that already handles running out of memory catches it.
    """


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _range_text(low: float | None, high: float | None, *, low_open: bool = False, high_open: bool = False) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high}"
    return ""


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None, *, hint: str = "") -> int:
    """``value`` as a Python ``int`` in ``[low, high]`` (either bound may be None).

    Accepted: Python ints and integer scalars of numpy or torch (through ``operator.index``, as numpy itself
    does), so ``depth=np.int64(4)`` works and the result is a plain ``int`` that serializes to JSON.
    Refused with a ``TypeError``: bools (``True`` is an ``int`` to Python, never a size to us), floats (even
    ``2.0``: a computed float size usually hides a rounding bug), strings, arrays with more than a scalar.
    Out of range: ``ValueError``. ``hint`` is appended to the range message (e.g. the limit's constant).
    """
    dtype = str(getattr(value, "dtype", ""))
    if isinstance(value, bool) or dtype in ("bool", "torch.bool") or getattr(value, "ndim", 0) != 0:
        raise TypeError(f"{name} must be an int, got {_describe(value)}")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {_describe(value)}") from None
    if (low is not None and number < low) or (high is not None and number > high):
        raise ValueError(f"{name} must be {_range_text(low, high)}, got {value!r}{hint}")
    return number


def check_optional_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int | None:
    """``None`` (meaning "the default" or "all") or :func:`check_int`."""
    return None if value is None else check_int(name, value, low, high)


def check_float(name: str, value: Any, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a finite Python ``float`` within the bounds (``low_open``: ``low`` itself is refused).

    Ints and numpy/torch real scalars are accepted (``lr=1`` is a learning rate); bools, strings, NaN and
    infinities are refused: a NaN passes every ``<``/``>`` comparison and would reach the weights.
    """
    dtype = str(getattr(value, "dtype", ""))
    if isinstance(value, (bool, str, bytes)) or dtype in ("bool", "torch.bool") or getattr(value, "ndim", 0) != 0:
        raise TypeError(f"{name} must be a number, got {_describe(value)}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {_describe(value)}") from None
    bounds = _range_text(low, high, low_open=low_open, high_open=high_open)
    too_low = low is not None and (number <= low if low_open else number < low)
    too_high = high is not None and (number >= high if high_open else number > high)
    if not math.isfinite(number) or too_low or too_high:
        raise ValueError(f"{name} must be a finite number{' ' + bounds if bounds else ''}, got {value!r}")
    return number


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices`` (strings, compared exactly), else ``ValueError`` naming both.

    Exact: ``"First"`` or ``" first"`` is refused rather than normalised, so a stored option (a fit's
    ``fit_config``) always reads back as one of the accepted spellings.
    """
    accepted = list(choices)
    if not isinstance(value, str) or value not in accepted:
        raise ValueError(f"{name} must be one of {accepted}, got {value!r}")
    return value


def check_name(name: Any, what: str) -> str:
    """``name`` if it is safe as one file or folder name inside an output folder, else ``ValueError``.

    Every name read from a file (``merge_config.json``'s task names, scalers file names) or used as a path
    part is untrusted: ``../x`` or ``/etc`` would read or write outside the folder, ``config.json`` would
    overwrite a file the folder owns, ``CON`` cannot be created on Windows, a leading ``.`` would hide the
    folder (and collide with our ``.tmp-*`` folders). Accepted: a printable string of 1 to
    ``MAX_NAME_LENGTH`` characters without ``/ \\ : * ? " < > |``, not starting with ``.``, not ending with
    a space or a dot, and not a reserved name (case-insensitively).
    """
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a string, got {_describe(name)}")
    reason = None
    stem = name.split(".", 1)[0].strip().lower()
    if not name:
        reason = "it is empty"
    elif len(name) > MAX_NAME_LENGTH:
        reason = f"it has {len(name)} characters (at most {MAX_NAME_LENGTH})"
    elif not name.isprintable():
        reason = "it contains a control character (newline, tab, NUL, ...)"
    elif any(c in FORBIDDEN_NAME_CHARS for c in name):
        reason = f"it contains one of {' '.join(FORBIDDEN_NAME_CHARS)} (a path separator or a character Windows refuses)"
    elif name.startswith("."):
        reason = "it starts with '.' ('.', '..' and hidden names are refused)"
    elif name != name.strip() or name.endswith("."):
        reason = "it starts or ends with a space, or ends with '.'"
    elif name.lower() in RESERVED_FILE_NAMES:
        reason = f"it is a file the folder writes itself ({', '.join(RESERVED_FILE_NAMES)}, any case)"
    elif stem in WINDOWS_RESERVED_NAMES:
        reason = "it is a device name Windows reserves (CON, PRN, AUX, NUL, COM1-9, LPT1-9)"
    if reason:
        raise ValueError(f"{what} {name!r} cannot be used as a file or folder name: {reason}")
    return name


def check_unique_names(names: Iterable[str], what: str) -> list[str]:
    """``names`` as a list, each :func:`check_name`-valid, unique case-insensitively.

    Case-insensitively because the folders they become collide on macOS and Windows file systems:
    ``Digits/`` and ``digits/`` would silently share one folder there.
    """
    if isinstance(names, (str, bytes)) or not isinstance(names, Iterable):
        raise TypeError(f"{what}s must be a list of strings, got {_describe(names)}")
    out = [check_name(n, what) for n in names]
    seen: dict[str, str] = {}
    for n in out:
        key = n.casefold()
        if key in seen:
            same = f"{n!r} appears twice" if seen[key] == n else f"{seen[key]!r} and {n!r} differ only in case"
            raise ValueError(f"{what}s must be unique, ignoring case (they become folders): {same} in {out}")
        seen[key] = n
    return out


def check_id2label(id2label: Any, what: str = "id2label") -> dict[int, str]:
    """A label map ``{0: name, ..., n - 1: name}`` with int keys and str values.

    Keys that are decimal strings (``"0"``: JSON has no int keys, so every ``config.json`` stores them so)
    are converted; anything else (``"a"``, ``1.5``, ``True``, a gap or a duplicate) is refused, because a
    head of ``n`` logits needs exactly the ids ``0 .. n - 1``.
    """
    if not isinstance(id2label, Mapping):
        raise TypeError(f"{what} must be a dict {{int id: str label}}, got {_describe(id2label)}")
    if not id2label:
        raise ValueError(f"{what} is empty: a classification head needs at least one label")
    out: dict[int, str] = {}
    keys: dict[int, Any] = {}
    for key, label in id2label.items():
        if isinstance(key, str) and key.isascii() and key.isdecimal():
            index = int(key)
        else:
            try:
                index = check_int(f"{what} key", key)
            except TypeError:
                raise TypeError(f"{what} key {key!r} is not an int (or a decimal string)") from None
        if not isinstance(label, str):
            raise TypeError(f"{what}[{key!r}] must be a str label, got {_describe(label)}")
        if index in out:
            raise ValueError(f"{what} has the id {index} twice (keys {keys[index]!r} and {key!r})")
        out[index], keys[index] = label, key
    if sorted(out) != list(range(len(out))):
        bad = next(i for i in sorted(out) if i < 0 or i >= len(out))
        raise ValueError(f"{what} ids must be 0 .. {len(out) - 1} (one per label), got the id {bad}")
    return dict(sorted(out.items()))


def check_label(label: Any, index: int, num_labels: int | None = None) -> int:
    """One class label as an ``int`` (``labels[index]`` of a batch or a dataset), in ``[0, num_labels)``.

    Strings (``"3"``), floats (``1.0``) and bools are refused instead of cast: ``int("3")`` and ``int(1.9)``
    would hide a dataset whose label column is not what the head predicts.
    """
    high = None if num_labels is None else num_labels - 1
    try:
        return check_int(f"labels[{index}]", label, 0, high)
    except TypeError:
        raise TypeError(f"labels[{index}] = {label!r} is not an int class label "
                        f"(got {type(label).__name__}; strings, floats and bools are refused)") from None


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation now (``MemAvailable``), or None when unknown.

    Read from ``/proc/meminfo`` (Linux: it counts reclaimable page cache, unlike "free"), else from
    ``sysconf``: available physical pages, or all physical pages where the OS does not report available
    ones (macOS). No psutil dependency; None on a system with neither (Windows).
    """
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    for pages in ("SC_AVPHYS_PAGES", "SC_PHYS_PAGES"):
        try:
            return os.sysconf(pages) * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            continue
    return None


def format_bytes(num_bytes: float) -> str:
    """``1536`` -> ``'1.5 KiB'``: sizes in messages, in the binary units the OS reports."""
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    size, i = float(num_bytes), 0
    while abs(size) >= 1024 and i < len(units) - 1:
        size, i = size / 1024, i + 1
    return f"{size:.0f} B" if i == 0 else f"{size:.1f} {units[i]}"


def check_memory(num_bytes: int, what: str) -> None:
    """Raise ``ResourceLimitError`` when ``what`` would need more than ``MEMORY_FRACTION`` of the available
    memory, before any of it is allocated: the OS would otherwise swap for minutes or kill the process
    without a message. Does nothing when the available memory cannot be read."""
    available = available_memory()
    if available is None:
        return
    limit = int(available * MEMORY_FRACTION)
    if num_bytes > limit:
        raise ResourceLimitError(
            f"{what} needs about {format_bytes(num_bytes)} of memory, more than the limit of "
            f"{format_bytes(limit)} ({MEMORY_FRACTION:.0%} of the {format_bytes(available)} available now)"
        )


def check_tensors(tensors: object, shapes: dict[str, tuple[int, ...]], name: str) -> None:
    """Every expected key present, a tensor of the expected shape; nothing else. A wrong shape would
    otherwise surface as a RuntimeError from ``load_state_dict`` at the first ``for_task``."""
    if not isinstance(tensors, dict):
        raise TypeError(f"{name} must be a dict of tensors, got {type(tensors).__name__}")
    missing, extra = sorted(set(shapes) - set(tensors)), sorted(set(tensors) - set(shapes))
    if missing or extra:
        raise ValueError(f"{name} is missing {len(missing)} keys (e.g. {missing[:3]}) and has {len(extra)} "
                         f"unexpected ones (e.g. {extra[:3]})")
    for key, shape in shapes.items():
        value = tensors[key]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}[{key!r}] must be a tensor, got {type(value).__name__}")
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"{name}[{key!r}] has shape {tuple(value.shape)}, the config needs {tuple(shape)}")


class JobConfig:
    """Base of a job's options dataclass (``FitConfig``, ``DistillConfig``): built once from a config plus
    keyword overrides, so that a typo is named instead of falling back to a default."""

    @classmethod
    def from_options(cls, config: Any, options: Mapping[str, Any]) -> Any:
        """``config`` (default: the defaults) with ``options`` replaced; an unknown option is named."""
        if config is not None and not isinstance(config, cls):
            raise TypeError(f"config must be a {cls.__name__}, got {type(config).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise TypeError(f"got unknown options {unknown}; {cls.__name__} fields: {names}")
        return dataclasses.replace(config or cls(), **options)  # type: ignore[type-var]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]
