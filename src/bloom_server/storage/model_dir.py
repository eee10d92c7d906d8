"""Find the directory to serve and say what it holds. Reads only: KServe mounts the PVC read-only."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from bloom_server.errors import ModelDirError
from bloom_server.storage.marker import PICKLE_SUFFIXES  # one list of the extensions torch.load unpickles

log = logging.getLogger(__name__)

KSERVE_MOUNT = "/mnt/models"  # where KServe mounts a pvc:// storage URI in kserve-container
DS_CONFIG = "ds_inference_config.json"
TRUST_HINT = "--trust-unverified-pickles / BLOOM_TRUST_UNVERIFIED_PICKLES=1"


@dataclass(frozen=True)
class ModelDir:
    path: Path
    # "hf" (config.json + weights), "ds_presharded" (ds_inference_config.json + .pt shards), or "fast_presharded"
    # (`bloom-server preshard`: config.json + one safetensors file per tensor-parallel rank, no plain checkpoint)
    layout: str
    model_id: str
    revision: str | None = None
    weights_format: str = "safetensors"  # "safetensors" or "pickle": what the weights will be loaded from
    sizes: dict | None = None  # n_layer, n_head, hidden_size, vocab_size from config.json, checked (model_config)

    @property
    def ds_config(self) -> dict:
        return json.loads((self.path / DS_CONFIG).read_text())


def hub_cache_dirs() -> list[Path]:
    """The Hub cache locations huggingface_hub itself would use, in its order of precedence."""
    out = []
    if os.environ.get("HF_HUB_CACHE"):
        out.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        out.append(Path(os.environ["HF_HOME"]) / "hub")
    out.append(Path.home() / ".cache" / "huggingface" / "hub")
    return out


def _snapshot_of(repo_cache: Path, revision: str | None) -> tuple[Path, str]:
    """models--org--name -> snapshots/<sha>, through refs/<revision> (default main) or the only snapshot."""
    snapshots = repo_cache / "snapshots"
    if not snapshots.is_dir():
        raise ModelDirError(f"{repo_cache} has no snapshots/ folder: not a Hub cache entry")
    ref = repo_cache / "refs" / (revision or "main")
    if ref.is_file():
        sha = ref.read_text().strip()
        if (snapshots / sha).is_dir():
            return snapshots / sha, sha
    if revision and (snapshots / revision).is_dir():
        return snapshots / revision, revision
    found = sorted(p for p in snapshots.iterdir() if p.is_dir())
    if len(found) == 1:
        return found[0], found[0].name
    raise ModelDirError(
        f"{repo_cache}: cannot choose a snapshot (refs/{revision or 'main'} missing; {len(found)} snapshots)"
    )


def resolve_model_dir(
    spec: str, model_id: str | None = None, revision: str | None = None, *, trust_unverified_pickles: bool = False
) -> ModelDir:
    """A plain directory, a Hub cache entry (`models--org--name` or the repo id `org/name` looked up in the cache),
    or `pvc://NAME/PATH` (mapped to KServe's mount point). Pickled weights need a verifying completion marker that
    lists them, unless `trust_unverified_pickles` (check_pickles)."""
    if spec.startswith("pvc://"):
        path = Path(KSERVE_MOUNT)
        name = spec[len("pvc://") :].rstrip("/").split("/")[-1]
    else:
        path = Path(spec).expanduser()
        name = path.resolve().name if path.exists() else spec
    sha = None
    if not path.exists() and not spec.startswith("pvc://") and "/" in spec and not spec.startswith(("/", ".")):
        # A repo id: look it up in the Hub cache, never download.
        entry = "models--" + spec.replace("/", "--")
        for cache in hub_cache_dirs():
            if (cache / entry).is_dir():
                path, sha = _snapshot_of(cache / entry, revision)
                name = spec
                break
        else:
            raise ModelDirError(
                f"model {spec!r} is neither a directory nor in the Hub cache "
                f"({', '.join(str(c) for c in hub_cache_dirs())}); run `bloom-server download` first"
            )
    elif path.name.startswith("models--") and (path / "snapshots").is_dir():
        name = path.name[len("models--") :].replace("--", "/")
        path, sha = _snapshot_of(path, revision)
    if not path.is_dir():
        raise ModelDirError(f"model directory {path} does not exist")

    from bloom_server.storage import marker
    from bloom_server.storage.safetensors import PRESHARD_MANIFEST, checkpoint_files

    recorded = marker.check_model_dir(path)  # refuses a download that did not finish or does not verify
    sha = sha or recorded
    fmt = "safetensors"
    if (path / DS_CONFIG).is_file():
        layout, fmt = "ds_presharded", "pickle"
    elif (path / "config.json").is_file():
        kind, _ = checkpoint_files(path)
        layout = "fast_presharded" if kind == "none" and (path / PRESHARD_MANIFEST).is_file() else "hf"
        fmt = "pickle" if kind == "pickle" else "safetensors"
    else:
        raise ModelDirError(f"{path} holds neither config.json nor {DS_CONFIG}: not a model directory")
    if not (path / "tokenizer.json").is_file():
        raise ModelDirError(f"{path} has no tokenizer.json (the server tokenizes with the fast tokenizer)")
    if fmt == "pickle":
        check_pickles(path, layout, verified=recorded is not None, trust=trust_unverified_pickles)
    sizes = None
    if (path / "config.json").is_file():  # checked before anything is allocated from it
        from bloom_server.storage import model_config

        sizes = model_config.read_sizes(path)
        if layout == "hf":
            kind, files = checkpoint_files(path)
            model_config.check_weights(path, sizes, files, kind)
        elif layout == "ds_presharded":
            model_config.check_weights(path, sizes, [path / p for p in pickle_files(path, layout)], "pickle")
    return ModelDir(path=path, layout=layout, model_id=model_id or name, revision=sha, weights_format=fmt,
                    sizes=sizes)  # fmt: skip


def pickle_files(path: Path, layout: str) -> list[str]:
    """Files, relative to `path`, that loading this directory would unpickle: every file with a pickle extension
    (outside hidden folders), and for DeepSpeed's layout every existing file its config names as a checkpoint."""
    root = path.resolve()
    found = set()
    for f in path.rglob("*"):
        rel = f.relative_to(path)
        if any(part.startswith(".") for part in rel.parts[:-1]) or not f.is_file():
            continue
        if f.suffix.lower() in PICKLE_SUFFIXES:
            found.add(rel.as_posix())
    if layout == "ds_presharded":
        try:
            ckpts = json.loads((path / DS_CONFIG).read_text()).get("checkpoints", {})
        except (OSError, ValueError, AttributeError):
            ckpts = {}
        named = ckpts.values() if isinstance(ckpts, dict) else [ckpts]
        for group in named:
            for name in group if isinstance(group, list) else [group]:
                if isinstance(name, str) and (path / name).is_file():
                    f = (path / name).resolve()
                    found.add(f.relative_to(root).as_posix() if f.is_relative_to(root) else name)
    return sorted(found)


def check_pickles(path: Path, layout: str, *, verified: bool, trust: bool) -> None:
    """Pickled weights load only from a directory whose completion marker (`bloom-server download`, or this
    project's own writers) verified and lists every one of them; or with the operator's explicit opt-out."""
    from bloom_server.storage import marker

    pickles = pickle_files(path, layout)
    listed = marker.listed_paths(path) if verified else set()
    unlisted = [p for p in pickles if p not in listed]
    # Listed is not enough: the bytes must have matched a hash the Hub published, not only a size.
    unhashed = [p for p in pickles if p in marker.hash_unverified_paths(path)] if verified else []
    if verified and not unlisted and not unhashed:
        return
    what = "pre-sharded DeepSpeed checkpoint" if layout == "ds_presharded" else "checkpoint"
    if unhashed and not unlisted:
        problem = (f"{path}: {', '.join(unhashed[:3])}{' ...' if len(unhashed) > 3 else ''} "
                   f"{'is' if len(unhashed) == 1 else 'are'} pickled and marked {marker.UNVERIFIED} in its completion "
                   f"marker {marker.COMPLETE} (the Hub published no hash for "
                   f"{'it' if len(unhashed) == 1 else 'them'}: the download checked the size only)")  # fmt: skip
    elif not verified:
        problem = (f"{path}: its {what} is pickled ({', '.join(pickles[:3]) or 'no pickle files yet'}"
                   f"{' ...' if len(pickles) > 3 else ''}) and the directory has no completion marker "
                   f"{marker.COMPLETE}")  # fmt: skip
    else:
        problem = (f"{path}: {', '.join(unlisted[:3])}{' ...' if len(unlisted) > 3 else ''} "
                   f"{'is' if len(unlisted) == 1 else 'are'} pickled and not listed in its completion marker "
                   f"{marker.COMPLETE}")  # fmt: skip
    if trust:
        log.warning("%s; loading it anyway because of %s (unpickling runs whatever code the files hold)",
                    problem, TRUST_HINT)  # fmt: skip
        return
    raise ModelDirError(
        f"{problem}. Unpickling runs whatever code the files hold, so pickled weights load only from a directory "
        f"`bloom-server download` verified. Download it with `bloom-server download`, or, if you made this "
        f"directory yourself and trust every file in it, start with {TRUST_HINT} (dangerous; docs/security.md)"
    )
