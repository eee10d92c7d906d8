"""Find the directory to serve and say what it holds. Reads only: KServe mounts the PVC read-only."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from bloom_server.errors import ModelDirError

KSERVE_MOUNT = "/mnt/models"  # where KServe mounts a pvc:// storage URI in kserve-container
DS_CONFIG = "ds_inference_config.json"


@dataclass(frozen=True)
class ModelDir:
    path: Path
    layout: str  # "hf" (config.json + weights) or "ds_presharded" (ds_inference_config.json + .pt shards)
    model_id: str
    revision: str | None = None

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


def resolve_model_dir(spec: str, model_id: str | None = None, revision: str | None = None) -> ModelDir:
    """A plain directory, a Hub cache entry (`models--org--name` or the repo id `org/name` looked up in the cache),
    or `pvc://NAME/PATH` (mapped to KServe's mount point)."""
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

    from bloom_server import marker

    recorded = marker.check_model_dir(path)  # refuses a download that did not finish or does not verify
    sha = sha or recorded
    if (path / DS_CONFIG).is_file():
        layout = "ds_presharded"
    elif (path / "config.json").is_file():
        layout = "hf"
    else:
        raise ModelDirError(f"{path} holds neither config.json nor {DS_CONFIG}: not a model directory")
    if not (path / "tokenizer.json").is_file():
        raise ModelDirError(f"{path} has no tokenizer.json (the server tokenizes with the fast tokenizer)")
    return ModelDir(path=path, layout=layout, model_id=model_id or name, revision=sha)
