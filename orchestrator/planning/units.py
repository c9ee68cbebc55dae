"""Sizes and counts as people read and write them: `human` (bytes), `count` (parameters),
`parse_bytes` (--gpu-memory)."""

from __future__ import annotations

import re

GiB = 1024**3


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B?)\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """'80GiB', '80GB', '80G', '81920MiB', '85899345920' -> bytes (G and GiB both mean 2**30;
    'GB' means 10**9, as GPU vendors print it)."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"not a memory size: {text!r} (write e.g. 80GiB, 40GB or 24G)")
    number, unit, suffix = float(m.group(1)), m.group(2).upper(), m.group(3).upper()
    power = "KMGT".find(unit) + 1 if unit else 0
    base = 1000 if suffix == "B" and unit else 1024
    return int(number * base**power)


def count(n: int) -> str:
    """6738415616 -> '6.74B', 1040000 -> '1.04M'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def human(nbytes: float) -> str:
    """Bytes as GiB/MiB/KiB with three significant figures."""
    for unit, size in (("TiB", 1024**4), ("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(nbytes) >= size:
            return f"{nbytes / size:.3g} {unit}" if nbytes / size < 100 else f"{nbytes / size:.0f} {unit}"
    return f"{int(nbytes)} B"
