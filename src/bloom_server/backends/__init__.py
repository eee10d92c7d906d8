"""Backends: token ids in, token ids out, on this rank's devices. Chosen by setting and imported lazily, so
DeepSpeed is imported only when chosen. Backends never import FastAPI."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bloom_server.backends.base import Backend
    from bloom_server.settings import Settings
    from bloom_server.storage.model_dir import ModelDir
    from bloom_server.types import RankContext

_BACKENDS = {
    "hf": ("bloom_server.backends.hf", "HFBackend"),
    "ds_inference": ("bloom_server.backends.ds_inference", "DSInferenceBackend"),
    "ds_zero": ("bloom_server.backends.ds_zero", "DSZeroBackend"),
    "fast": ("bloom_server.backends.fast", "FastBackend"),
}


def backend_class(name: str) -> type[Backend]:
    """The class of a backend, by its setting's name (importing its module imports neither torch nor DeepSpeed)."""
    module_name, class_name = _BACKENDS[name]
    return getattr(importlib.import_module(module_name), class_name)


def create_backend(settings: Settings, model_dir: ModelDir, ctx: RankContext) -> Backend:
    return backend_class(settings.backend)(settings, model_dir, ctx)
