"""Numbers as people read them: 1234567 -> '1.23M' (used by the CLI and the report alike)."""

from __future__ import annotations


def human(n: float | None, unit: str = "", digits: int = 3) -> str:
    """1234567 -> '1.23M'; None -> '-'."""
    if n is None:
        return "-"
    for scale, suffix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.{digits}g}{suffix}{unit}"
    return f"{n:.{digits}g}{unit}"
