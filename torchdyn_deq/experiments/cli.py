"""argparse value types shared by the experiment command lines."""
from __future__ import annotations

import argparse
from typing import Callable, List, Sequence


def comma_separated(valid: Sequence[str], allow_all: bool = False) -> Callable[[str], List[str]]:
    """A comma-separated, non-empty subset of ``valid`` (``'all'`` for every one when
    ``allow_all``), duplicates dropped, order kept."""
    def parse(text: str) -> List[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        if allow_all and "all" in items:
            return list(valid)
        unknown = [item for item in items if item not in valid]
        if unknown or not items:
            extra = " (or all)" if allow_all else ""
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {', '.join(valid)}{extra}; got {text!r}")
        return list(dict.fromkeys(items))
    return parse


def positive(kind: type) -> Callable[[str], float]:
    """A positive ``kind`` (``int`` or ``float``)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value
    return parse


def seed_list(text: str) -> List[int]:
    """A comma-separated, non-empty list of distinct non-negative integers (seeds), order kept;
    a repeated seed is refused: it would count one run twice in a mean and a standard deviation."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items or not all(item.isdigit() for item in items):
        raise argparse.ArgumentTypeError(f"expected comma-separated non-negative integers such as 0,1,2; got {text!r}")
    seeds = [int(item) for item in items]
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct seeds (each run once); got {text!r}")
    return seeds
