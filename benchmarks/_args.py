"""The one list syntax of the checkout's command-line tools (benchmarks and scripts), the
``adasum`` program's: comma-separated, as in ``--worlds 2,4``."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")

_KINDS = {int: "an integer", float: "a number"}


def comma_list(kind: Callable[[str], T], choices: Sequence[str] | None = None) -> Callable[[str], list[T]]:
    """An argparse ``type`` for a comma-separated list of ``kind`` (empty items skipped); the
    error names the item that is wrong. Give the default as a string ("2,4"): argparse
    parses it with the same type, and ``--help`` shows it as the user would type it."""
    def parse(text: str) -> list[T]:
        values = []
        for item in filter(None, (v.strip() for v in text.split(","))):
            if choices is not None and item not in choices:
                raise argparse.ArgumentTypeError(f"{item!r} is not one of {', '.join(choices)}")
            try:
                values.append(kind(item))
            except ValueError:
                raise argparse.ArgumentTypeError(f"{item!r} is not {_KINDS.get(kind, kind)}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"{text!r} names nothing: give a comma-separated list")
        return values
    return parse
