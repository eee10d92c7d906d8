"""The decode step's fusion variants (fast/model.py's module doc says what each runs): the names, the default, and
their parsing, apart from the model so that the kernel plan (fast/triton_kernels.py) reads them without importing it."""

from __future__ import annotations

FUSE_FLAGS = ("tgemv", "tattn", "thead")
FUSE_VARIANTS: dict[str, tuple[str, ...]] = {"base": (), "triton_head": FUSE_FLAGS}
# The fastest decode step measured (docs/results/fast-engine.md).
DEFAULT_FUSE = "triton_head"


def parse_fuse(spec: str | None) -> frozenset[str]:
    """A variant name (FUSE_VARIANTS); None: DEFAULT_FUSE."""
    spec = (spec if spec is not None else DEFAULT_FUSE).strip()
    if spec not in FUSE_VARIANTS:
        raise ValueError(f"unknown decode fusion {spec!r}: one of {list(FUSE_VARIANTS)}")
    return frozenset(FUSE_VARIANTS[spec])
