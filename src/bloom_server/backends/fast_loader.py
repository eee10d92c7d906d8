"""Which read path brings the fast backend's weights to the device: the loader setting (BLOOM_LOADER). `builtin` is the
project's own (storage/prefetch.py, fast/weights.py `read_safetensors`); a field loader is a maintained library
(fast/loaders.py); `auto` is settings.AUTO_LOADER, the measured choice, where it can run here, else builtin.

A named library that is not installed, needs CUDA on a rank without it, or cannot read the checkpoint is refused with
a ConfigError naming BLOOM_LOADER: before the port opens (`check`, from what can be known without torch) and again at
load (`choose`, with the device known). Torch-free; no library is imported here."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from bloom_server.errors import ConfigError, ModelDirError
from bloom_server.fast.loaders import FIELD_LOADERS, installed
from bloom_server.settings import AUTO_LOADER

if TYPE_CHECKING:
    from bloom_server.settings import Settings
    from bloom_server.storage.model_dir import ModelDir

log = logging.getLogger(__name__)


def unusable(name: str, *, cuda: bool, source: str | None) -> str | None:
    """Why field loader `name` cannot load here (None: it can). `source`: the weights' kind
    (storage/safetensors.py `weights_source`; None: not known yet)."""
    f = FIELD_LOADERS[name]
    if not installed(name):
        return f"{f.dist} is not installed (pip install {f.dist})"
    if f.cuda_only and not cuda:
        return f"{f.dist} reads onto CUDA devices only, and this rank runs on the CPU"
    if source == "pickle":
        return f"{f.dist} reads safetensors files, and this checkpoint is pickled (.bin)"
    return None


def choose(setting: str, *, cuda: bool, source: str | None, quiet: bool = False) -> str:
    """The loader that runs: "builtin" or a field loader's name. A library named outright that cannot run here:
    ConfigError; `auto` falls back to builtin with a log line (none when `quiet`)."""
    if setting == "builtin":
        return "builtin"
    if setting == "auto":
        if AUTO_LOADER == "builtin":
            return "builtin"
        why = unusable(AUTO_LOADER, cuda=cuda, source=source)
        if why is None:
            return AUTO_LOADER
        if not quiet:
            log.info("BLOOM_LOADER=auto: %s, so the builtin read path loads the weights", why)
        return "builtin"
    if setting not in FIELD_LOADERS:
        raise ConfigError(f"BLOOM_LOADER={setting!r}: not a loader (auto, builtin, {', '.join(FIELD_LOADERS)})")
    why = unusable(setting, cuda=cuda, source=source)
    if why is not None:
        raise ConfigError(f"BLOOM_LOADER={setting}: {why}; BLOOM_LOADER=builtin (or auto) reads without it")
    return setting


def _builtin(setting: str) -> bool:
    return setting == "builtin" or (setting == "auto" and AUTO_LOADER == "builtin")


def _source(model_dir: ModelDir, rank: int, world: int) -> str | None:
    from bloom_server.storage.safetensors import weights_source

    try:
        return weights_source(model_dir.path, rank, world).kind
    except ModelDirError:
        return None  # the load says what is wrong with the directory


def check(settings: Settings, model_dir: ModelDir, rank: int, world: int) -> None:
    """Refuse a loader that cannot run here before the port opens: not installed, CUDA-only on a host without a
    visible GPU, pickled weights. The load checks again with the device known (`for_load`)."""
    if _builtin(settings.loader):
        return
    from bloom_server.fast.coldstart.precompile import gpu_likely

    choose(settings.loader, cuda=gpu_likely(), source=_source(model_dir, rank, world), quiet=True)


def planned(settings: Settings, model_dir: ModelDir, rank: int, world: int) -> str:
    """The loader this rank's load will run, as far as it can be known before torch (a visible GPU stands for CUDA):
    what decides, before torch is imported, whether the prefetch starts (backends/fast_coldstart.py). A setting that
    cannot run here gives builtin (`check` refused it before; the load says why again)."""
    if _builtin(settings.loader):
        return "builtin"
    from bloom_server.fast.coldstart.precompile import gpu_likely

    try:
        return choose(settings.loader, cuda=gpu_likely(), source=_source(model_dir, rank, world), quiet=True)
    except ConfigError:
        return "builtin"


def for_load(settings: Settings, model_dir: ModelDir, rank: int, world: int, cuda: bool) -> str:
    """The loader this rank's load runs (`choose`, with the device known); the builtin setting reads nothing more."""
    if _builtin(settings.loader):
        return "builtin"
    return choose(settings.loader, cuda=cuda, source=_source(model_dir, rank, world))
