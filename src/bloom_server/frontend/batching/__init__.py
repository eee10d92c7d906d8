"""How queued requests become steps for the ranks: `dynamic` (whole generate calls, one batch at a time) and
`continuous` (rows join and leave a running batch every step)."""

from __future__ import annotations

from bloom_server.errors import ConfigError


def batching_mode(wanted: str, can_continuous: bool, backend: str) -> str:
    """The batching a server runs: `wanted` (the batching setting) against what the backend declares
    (`supports_continuous`). auto: continuous where the backend can, else dynamic; continuous where it cannot: a
    ConfigError (the composition root asks before loading, so the server stops at start)."""
    if wanted == "continuous" and not can_continuous:
        raise ConfigError(
            f"--batching continuous: the {backend} backend cannot join requests to a running batch; "
            "use --batching dynamic or auto"
        )
    if wanted == "auto":
        return "continuous" if can_continuous else "dynamic"
    return wanted
