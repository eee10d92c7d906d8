"""`bloom-server preshard` and the fast backend's sequential reader: a pre-sharded directory holds exactly each
rank's tensors, verifies like a download, and serves the same greedy text as the plain checkpoint, with one rank and
with two ranks under torchrun (gloo); the reader lands every byte where it belongs whatever the chunking."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from bloom_server.errors import ModelDirError
from bloom_server.fast.shapes import BloomShape
from bloom_server.fast.tp import TPGroup
from bloom_server.fast.weights import from_checkpoint, iter_tensors, read_safetensors
from bloom_server.progress import LoadProgress
from bloom_server.storage import marker
from bloom_server.storage.model_dir import resolve_model_dir
from bloom_server.storage.safetensors import plan_chunks, read_header, weights_source
from helpers import ServerProcess, free_port

ARGS = ["--backend", "fast", "--max-input-length", "32", "--max-new-tokens", "16", "--max-batch-size", "4",
        "--max-total-tokens", "48"]  # fmt: skip
PROMPTS = ["Deepspeed is", "The quick brown fox jumps over", "A"]


def _preshard(model: Path, tp: int, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bloom_server", "preshard", "--model", str(model), "--tp", str(tp),
                           "--out", str(out), *extra], capture_output=True, text=True, timeout=120)  # fmt: skip


@pytest.fixture(scope="module")
def presharded(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("preshard")
    out = {}
    for tp in (1, 2):
        r = _preshard(tiny_model_dir, tp, root / f"tp{tp}")
        assert r.returncode == 0, r.stderr
        out[tp] = root / f"tp{tp}"
    return out


def test_each_rank_file_holds_exactly_its_tensors_and_the_directory_verifies(presharded, tiny_model_dir):
    d = presharded[2]
    shape = BloomShape.from_dir(tiny_model_dir)
    assert sorted(p.name for p in d.iterdir() if p.suffix == ".safetensors") == [
        "model-tp02-rank00.safetensors", "model-tp02-rank01.safetensors"]  # fmt: skip
    for rank in (0, 1):
        h = read_header(d / f"model-tp02-rank{rank:02d}.safetensors")
        assert h.metadata["tp_rank"] == str(rank) and h.metadata["tp_size"] == "2"
        t = h.by_name()
        assert t["h.0.self_attention.query_key_value.weight"].shape == (3 * shape.hidden_size // 2, shape.hidden_size)
        assert t["h.0.self_attention.dense.weight"].shape == (shape.hidden_size, shape.hidden_size // 2)
        assert t["word_embeddings.weight"].shape == (-(-shape.vocab_size // 2), shape.hidden_size)
        assert "lm_head.weight" not in t  # the tied head is the embedding
        # stored in load order, back to back: the rank's load is one sequential pass over the file
        assert [e.name for e in h.tensors][:3] == ["word_embeddings.weight", "word_embeddings_layernorm.weight",
                                                   "word_embeddings_layernorm.bias"]  # fmt: skip
        assert all(a.end == b.start for a, b in zip(h.tensors, h.tensors[1:]))
        assert h.tensors[-1].end == h.size
        # and the same bytes the sliced plain checkpoint gives that rank
        a = from_checkpoint(d, shape, TPGroup(rank, 2), dtype=torch.float32)
        b = from_checkpoint(tiny_model_dir, shape, TPGroup(rank, 2), dtype=torch.float32)
        assert a.vocab_start == b.vocab_start
        assert all(torch.equal(x, y) for x, y in zip(iter_tensors(a), iter_tensors(b)))
    md = resolve_model_dir(str(d))
    assert md.layout == "fast_presharded" and md.weights_format == "safetensors"
    m = json.loads((d / marker.COMPLETE).read_text())
    assert m["format"] == marker.FORMAT and all(f["sha256"] for f in m["files"])
    assert {f["path"] for f in m["files"]} >= {"model-tp02-rank00.safetensors", "preshard.json", "config.json",
                                              "tokenizer.json"}  # fmt: skip
    assert not (d / marker.IN_PROGRESS).exists()


def test_a_damaged_or_unfinished_preshard_is_refused_naming_the_file(presharded, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(presharded[2], d)
    with open(d / "model-tp02-rank01.safetensors", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ModelDirError, match="model-tp02-rank01.safetensors: expected .* bytes, found 1000"):
        resolve_model_dir(str(d))
    (d / marker.IN_PROGRESS).write_text("{}")
    with pytest.raises(ModelDirError, match="did not finish"):
        resolve_model_dir(str(d))


def test_wrong_world_size_and_bad_arguments_are_clear(presharded, tiny_model_dir, tmp_path):
    with pytest.raises(ModelDirError, match="pre-sharded for 2 tensor-parallel rank.* this launch has 4"):
        weights_source(presharded[2], 0, 4)
    r = _preshard(tiny_model_dir, 3, tmp_path / "x")  # 4 heads
    assert r.returncode == 2 and "do not split over 3 ranks" in r.stderr
    r = _preshard(tiny_model_dir, 1, presharded[2])  # another degree into a finished preshard: refused
    assert r.returncode == 2 and "not empty" in r.stderr


def test_a_rerun_keeps_a_finished_preshard_and_redoes_a_cut_off_one(presharded, tiny_model_dir, tmp_path):
    """The download Job runs preshard after the download and before the precompile: a retried Job pod reruns it."""
    d = tmp_path / "tp2"
    shutil.copytree(presharded[2], d)
    before = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    r = _preshard(tiny_model_dir, 2, d)
    assert r.returncode == 0 and "nothing to do" in r.stderr, r.stderr
    assert {p.name: p.stat().st_mtime_ns for p in d.iterdir()} == before
    # the same directory asked for another dtype is not this preshard: refused, untouched
    r = _preshard(tiny_model_dir, 2, d, "--dtype", "fp16")
    assert r.returncode == 2 and "not empty" in r.stderr
    # cut off mid-way: the in-progress marker (ours) and a partial rank file; the rerun starts again and finishes
    (d / "model-tp02-rank01.safetensors").unlink()
    (d / marker.COMPLETE).unlink()
    marker.write_marker(
        d,
        marker.IN_PROGRESS,
        {
            "format": marker.FORMAT,
            "state": "in_progress",
            "writer": "bloom-server preshard",
            "source": str(tiny_model_dir),
        },
    )
    (d / "model-tp02-rank01.safetensors.tmp").write_bytes(b"partial")
    r = _preshard(tiny_model_dir, 2, d)
    assert r.returncode == 0 and "unfinished preshard" in r.stderr, r.stderr
    assert resolve_model_dir(str(d)).layout == "fast_presharded"
    assert not (d / "model-tp02-rank01.safetensors.tmp").exists()
    rank1 = "model-tp02-rank01.safetensors"
    assert (d / rank1).read_bytes() == (presharded[2] / rank1).read_bytes()
    # an in-progress marker that is not a preshard's (a download's): not removed
    other = tmp_path / "download"
    other.mkdir()
    marker.write_marker(other, marker.IN_PROGRESS, {"format": marker.FORMAT, "state": "in_progress"})
    r = _preshard(tiny_model_dir, 2, other)
    assert r.returncode == 2 and "not empty" in r.stderr and (other / marker.IN_PROGRESS).exists()


def test_sequential_reader_places_every_byte_whatever_the_chunking(tiny_model_dir, tmp_path):
    h = read_header(tiny_model_dir / "model.safetensors")
    wanted = [(0, t) for t in h.tensors]
    ref = {t.name: t for t in h.tensors}
    from safetensors.torch import load_file

    sd = load_file(str(tiny_model_dir / "model.safetensors"))
    for chunk, threads in ((7, 3), (4096, 1), (1 << 20, 4)):
        progress = LoadProgress()
        out = read_safetensors([h], wanted, dtype=torch.float32, device="cpu", threads=threads, chunk_bytes=chunk,
                               progress=progress)  # fmt: skip
        assert all(torch.equal(o, sd[t.name]) for o, (_, t) in zip(out, wanted))
        assert progress.loaded_bytes == progress.total_bytes == sum(t.nbytes for t in ref.values())
    # a cast on the way (fp32 stored, fp16 wanted) and a subset with gaps between the tensors read
    some = wanted[::3]
    out = read_safetensors([h], some, dtype=torch.float16, device="cpu", threads=2, chunk_bytes=1000)
    assert all(o.dtype == torch.float16 and torch.equal(o, sd[t.name].half()) for o, (_, t) in zip(out, some))
    chunks = plan_chunks(some, 1000)
    assert sum(c.wanted_bytes for c in chunks) == sum(t.nbytes for _, t in some)
    # a file cut short after its header was read: an error naming it, not garbage
    cut = tmp_path / "model.safetensors"
    shutil.copyfile(tiny_model_dir / "model.safetensors", cut)
    hc = read_header(cut)
    with open(cut, "r+b") as f:
        f.truncate(hc.size - 100)
    with pytest.raises(ModelDirError, match="unexpected end of file"):
        read_safetensors([hc], [(0, t) for t in hc.tensors], dtype=torch.float32, device="cpu", threads=2)
    with pytest.raises(ModelDirError, match="truncated"):
        read_header(cut)


def _texts(srv) -> list[str]:
    status, body, _ = srv.post("/generate", {"text": PROMPTS, "max_new_tokens": 12, "min_length": 100})
    assert status == 200, body
    return body["text"]


@pytest.mark.slow
def test_presharded_serves_the_plain_checkpoints_greedy_text_one_and_two_ranks(presharded, tiny_model_dir, tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    runs = {
        "plain": ([], tiny_model_dir),
        "tp1": ([], presharded[1]),
        "tp2": ([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "bloom_server"],
                presharded[2]),
    }  # fmt: skip
    texts = {}
    for name, (launcher, model) in runs.items():
        srv = ServerProcess(["--model", str(model), *ARGS], free_port(), launcher=launcher or None,
                            log_path=tmp_path / f"{name}.log")  # fmt: skip
        try:
            srv.wait_ready()
            texts[name] = _texts(srv)
            status, ready, _ = srv.get("/ready")
            assert status == 200 and ready["progress"]["loaded_bytes"] == ready["progress"]["total_bytes"] > 0
            if name == "tp2":
                assert "2 of 4 heads" in srv.log()
        finally:
            srv.stop()
    assert texts["tp1"] == texts["plain"] and texts["tp2"] == texts["plain"]
    assert all(t.strip() for t in texts["plain"])


def _component_steps() -> tuple[list[str], dict[str, str]]:
    """The bloom-176b-fast component's preshard arguments and the InferenceService's BLOOM_* settings, as written."""
    import yaml

    comp = Path(__file__).resolve().parents[1] / "manifests" / "components" / "bloom-176b-fast" / "kustomization.yaml"
    ops = [op for p in yaml.safe_load(comp.read_text())["patches"] for op in yaml.safe_load(p["patch"])]
    preshard = next(
        op["value"] for op in ops if isinstance(op.get("value"), dict) and op["value"].get("name") == "preshard"
    )
    env = next(op["value"] for op in ops if op["path"] == "/spec/predictor/containers/0/env")
    return [str(a) for a in preshard["args"]], {e["name"]: e["value"] for e in env if e["name"].startswith("BLOOM_")}


@pytest.mark.slow
def test_the_176b_fast_overlays_steps_at_two_ranks_serve_the_one_rank_text(tiny_model_dir, tmp_path):
    """The bloom-176b-fast overlay's path on the tiny model: its Job's preshard (its flags, --tp 2 for its 8), no
    precompile (the CPU runs no Triton kernels), then its server settings at 2 ranks under torchrun (gloo) from the
    pre-sharded directory; /generate gives the text one rank gives from the same fp16 weights. The CPU computes in
    fp32 (BLOOM_DTYPE=fp32 only here): 1 and 2 ranks add the row-parallel partial sums in another order, which fp16
    would round differently."""
    args, env = _component_steps()
    assert args[args.index("--tp") + 1] == env["BLOOM_NUM_GPUS"] == "8" and "--dtype" in args
    assert env["BLOOM_BACKEND"] == "fast" and env["BLOOM_DTYPE"] == "fp16"
    outs = {}
    for tp in (1, 2):
        a = list(args)
        a[a.index("--model") + 1] = str(tiny_model_dir)
        a[a.index("--tp") + 1] = str(tp)
        a[a.index("--out") + 1] = str(tmp_path / f"tp{tp}")
        r = subprocess.run([sys.executable, "-m", "bloom_server", "preshard", *a], capture_output=True, text=True,
                           timeout=120)  # fmt: skip
        assert r.returncode == 0, r.stderr
        outs[tp] = tmp_path / f"tp{tp}"
        assert json.loads((outs[tp] / "preshard.json").read_text())["dtype"] == "F16"
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    texts = {}
    for tp in (1, 2):
        launcher = [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "bloom_server"]
        srv = ServerProcess(["--model", str(outs[tp])], free_port(), env={**env, "BLOOM_DTYPE": "fp32",
                            "BLOOM_NUM_GPUS": str(tp)}, launcher=launcher if tp == 2 else None,
                            log_path=tmp_path / f"tp{tp}.log")  # fmt: skip
        try:
            srv.wait_ready()
            texts[tp] = _texts(srv)
            status, info, _ = srv.get("/info")
            assert status == 200 and info["backend"] == "fast" and info["tensor_parallel"] == tp, info
            assert (info["max_batch_size"], info["max_input_tokens"], info["max_new_tokens"]) == (
                int(env["BLOOM_MAX_BATCH_SIZE"]),
                int(env["BLOOM_MAX_INPUT_LENGTH"]),
                int(env["BLOOM_MAX_NEW_TOKENS"]),
            )
            if tp == 2:
                assert "2 of 4 heads" in srv.log()
        finally:
            srv.stop()
    assert texts[2] == texts[1] and all(t.strip() for t in texts[1])
