"""Argument types and output-folder options shared by every ``wave-hf`` subcommand (merge included)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any


def int_arg(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type`` for an int in ``[low, high]`` whose error names the value and the range."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            accepted = f"[{low}, {high}]" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be an int {accepted}, got {text!r}")
        return value

    parse.__name__ = "int"
    return parse


def float_arg(low: float, *, inclusive: bool = False, high: float | None = None) -> Callable[[str], float]:
    """An argparse ``type`` for a finite float above ``low`` (or at it, with ``inclusive``) and, with ``high``,
    at most ``high``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if (not math.isfinite(value) or value < low or (value == low and not inclusive)
                or (high is not None and value > high)):
            accepted = (f"in {'[' if inclusive else '('}{low:g}, {high:g}]" if high is not None
                        else f"{'>=' if inclusive else '>'} {low:g}")
            raise argparse.ArgumentTypeError(f"must be a finite number {accepted}, got {text!r}")
        return value

    parse.__name__ = "float"
    return parse


def output_args(p: argparse.ArgumentParser, default: str | None = None, what: str = "output folder") -> None:
    if default is None:
        p.add_argument("--out", required=True, help=f"{what}; other files already there are kept")
    else:
        p.add_argument("--out", default=default, help=f"{what} (default {default}); other files there are kept")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty folder that wave-hf did not write (its other files are kept)")


def prepare_out(args: argparse.Namespace, *inputs: Any) -> None:
    """Check ``--out`` against the current folder and the inputs before any work is done."""
    from .io import check_output_dir

    flat: list[str] = []
    for ref in inputs:
        if isinstance(ref, (list, tuple)):
            flat += [str(r) for r in ref]
        elif ref is not None:
            flat.append(str(ref))
    check_output_dir(args.out, inputs=flat, overwrite=args.overwrite)
