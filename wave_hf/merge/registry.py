"""The merge-method registry: every method is a dataclass (its fields are its options) with ``run``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from torch import nn

from ..registry import Registry
from .common import MergeData


class MergeMethod:
    """Base class. Subclasses are dataclasses whose fields are the method's options (the config schema)."""

    name: str = "?"
    needs_data: bool = True  # needs merge images
    uses_augmented: bool = True  # also gets the offline augmented copies
    single_model: bool = True

    def run(self, models: Sequence[nn.Module], tasks: Sequence[str], data: MergeData | None):
        raise NotImplementedError

    def options(self) -> dict:
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}


def _fields(cls: type[MergeMethod]) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else ()


MERGE_METHODS: Registry[type[MergeMethod]] = Registry("merge method", _fields)


def register_merge_method(name: str) -> Callable[[type[MergeMethod]], type[MergeMethod]]:
    """Class decorator: ``@register_merge_method("fs_merge")`` adds the class to ``MERGE_METHODS``."""
    add = MERGE_METHODS.register(name)

    def deco(cls: type[MergeMethod]) -> type[MergeMethod]:
        cls.name = name
        return add(cls)

    return deco


def get_method(method: str, **kwargs) -> MergeMethod:
    """The configured method; unknown names and options fail with the accepted ones listed."""
    return MERGE_METHODS[method](**MERGE_METHODS.check_options(method, kwargs))
