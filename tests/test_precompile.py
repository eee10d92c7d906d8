"""Kernels compiled ahead of time: `bloom-server precompile` (the fast backend's decode kernels for a named GPU
architecture, on a host with no GPU, into a Triton cache directory) and the seed a server start copies from it
(fast/coldstart/precompile.py). The compile runs Triton's real CUDA compiler (ptxas ships with Triton); nothing launches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bloom_server.fast.coldstart import precompile as pc
from helpers import ServerProcess, free_port

triton_missing = not pc.triton_installed()
ARGS = ["--dtype", "fp16", "--max-batch-size", "16", "--max-input-length", "64", "--max-new-tokens", "32"]


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    full.pop("TRITON_INTERPRET", None)  # compile for real, not the interpreter
    return subprocess.run([sys.executable, "-m", "bloom_server", "precompile", *args], env=full, text=True,
                          capture_output=True, timeout=timeout)  # fmt: skip


def _meta(entry: Path) -> dict:
    """The compiled kernel's metadata in a Triton cache entry (beside it: the group file listing the entry)."""
    return json.loads(next(f for f in entry.glob("*.json") if not f.name.startswith("__grp__")).read_text())


def report_of(p: subprocess.CompletedProcess) -> dict:
    start = p.stdout.index("{")
    return json.loads(p.stdout[start:])


@pytest.mark.slow  # compile worker processes, a minute on two cores
@pytest.mark.skipif(triton_missing, reason="Triton is not installed (the test extra installs it on Linux x86_64)")
def test_precompile_writes_every_variant_for_the_target_and_a_second_run_finds_them(tiny_model_dir, tmp_path):
    out = tmp_path / "seed"
    p = run_cli("--model", str(tiny_model_dir), "--out", str(out), "--target", "cuda:90", "--workers", "2", *ARGS)
    assert p.returncode == 0, p.stderr[-3000:]
    rep = report_of(p)
    assert rep["ok"] and rep["targets"][0]["target"] == 90 and rep["max_batch"] == 16 and rep["max_seq"] == 96
    variants = rep["targets"][0]["variants"]
    assert variants > 10  # GEMV configs x epilogues x row stages, and the attention kernel
    entries = pc.cubin_entries(out)
    assert len(entries) == variants == rep["new_entries"]
    for name in entries:  # binaries for sm_90, as Triton keeps them in its cache
        meta = _meta(out / name)
        assert meta["target"]["arch"] == 90, meta["target"]
        assert any(f.suffix == ".cubin" and f.stat().st_size > 0 for f in (out / name).iterdir())
    assert json.loads((out / pc.SEED_INFO).read_text())["entries"] == variants
    # A server with these settings (the facts its compile workers get) knows the seed covers sm_90 and nothing else.
    facts = {"model_dir": "/elsewhere", "world": 1, "dtype": "float16", "max_batch": 16, "max_seq": 96}
    assert pc.seed_archs(out, facts) == (90,)
    assert pc.seed_archs(out, {**facts, "max_batch": 32}) == ()
    # Same settings again: every variant found in the cache, nothing new. Another architecture: as many new ones.
    again = run_cli("--model", str(tiny_model_dir), "--out", str(out), "--target", "sm_90", "--target", "8.0",
                    "--workers", "2", *ARGS)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    rep2 = report_of(again)
    assert [t["target"] for t in rep2["targets"]] == [90, 80]
    assert rep2["new_entries"] == variants and rep2["entries"] == 2 * variants
    archs = {_meta(out / n)["target"]["arch"] for n in pc.cubin_entries(out)}
    assert archs == {80, 90}


@pytest.mark.slow  # compile worker processes
@pytest.mark.skipif(triton_missing, reason="Triton is not installed")
def test_precompile_follows_the_server_settings_a_bigger_batch_adds_variants(tiny_model_dir, tmp_path):
    one = run_cli("--model", str(tiny_model_dir), "--out", str(tmp_path / "a"), "--target", "90", "--workers", "2",
                  "--dtype", "fp16", "--max-batch-size", "1")  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    sixteen = run_cli("--model", str(tiny_model_dir), "--out", str(tmp_path / "a"), "--target", "90", "--workers",
                      "2", "--dtype", "fp16", "--max-batch-size", "16")  # fmt: skip
    assert sixteen.returncode == 0, sixteen.stderr[-3000:]
    # A server of one row runs only the one-row variants; 16 rows add the multi-row ones (rows 2 and 16).
    assert report_of(one)["targets"][0]["variants"] < report_of(sixteen)["targets"][0]["variants"]
    assert report_of(sixteen)["new_entries"] > 0


def test_precompile_refuses_bad_input_naming_it(tiny_model_dir, tmp_path):
    p = run_cli("--model", str(tiny_model_dir), "--out", str(tmp_path / "x"), "--target", "volta")
    assert p.returncode == 2 and "--target" in p.stderr and "volta" in p.stderr
    p = run_cli("--model", str(tiny_model_dir), "--out", str(tmp_path / "x"), "--target", "90", "--dtype", "fp32")
    assert p.returncode == 2 and "--dtype fp32" in p.stderr
    p = run_cli("--model", str(tmp_path / "nowhere"), "--target", "90")
    assert p.returncode == 2 and "nowhere" in p.stderr
    p = run_cli("--model", str(tiny_model_dir), "--target", "90", "--max-batch-size", "0")
    assert p.returncode == 2 and "--max-batch-size" in p.stderr
    p = run_cli("--model", str(tiny_model_dir), "--out", str(tmp_path / "x"), "--target", "90", "--tp", "0")
    assert p.returncode == 2 and "--tp" in p.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("spec,arch", [("cuda:80", 80), ("sm_86", 86), ("sm90", 90), ("90", 90), ("8.6", 86),
                                       (" CUDA:90 ", 90), ("100", 100)])  # fmt: skip
def test_parse_target(spec, arch):
    assert pc.parse_target(spec) == arch


@pytest.mark.parametrize("spec", ["", "cuda:", "volta", "sm_9", "8.66", "cuda:x90", "9000", "-90"])
def test_parse_target_refuses(spec):
    with pytest.raises(ValueError, match="CUDA architecture"):
        pc.parse_target(spec)


def _entry(root: Path, name: str, payload: bytes) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "k.cubin").write_bytes(payload)
    (root / name / "k.json").write_text("{}")


def test_seed_copies_what_the_cache_lacks_and_leaves_the_rest(tmp_path):
    seed, cache = tmp_path / "seed", tmp_path / "cache"
    for n in ("AAA", "BBB", "CCC"):
        _entry(seed, n, n.encode() * 10)
    (seed / pc.SEED_INFO).write_text("{}")  # a file, not an entry
    _entry(seed, ".hidden", b"x")  # a dot directory (a half-copied entry of another copy): skipped
    _entry(cache, "BBB", b"kept")
    got = pc.seed_kernel_cache(seed, cache)
    assert (got["copied"], got["present"], got["failed"]) == (2, 1, 0)
    assert got["bytes"] == 30 + 30 + 4  # two entries' files
    assert sorted(p.name for p in cache.iterdir()) == ["AAA", "BBB", "CCC"]
    assert (cache / "AAA" / "k.cubin").read_bytes() == b"AAA" * 10
    assert (cache / "BBB" / "k.cubin").read_bytes() == b"kept"
    again = pc.seed_kernel_cache(seed, cache)
    assert (again["copied"], again["present"]) == (0, 3)


def test_seed_that_cannot_be_read_is_reported_not_raised(tmp_path):
    got = pc.seed_kernel_cache(tmp_path / "missing", tmp_path / "cache")
    assert got["copied"] == 0 and got["failed"] == 1


def test_seed_dir_setting(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    assert pc.seed_dir(None, model) is None  # no seed in the model directory
    (model / pc.SEED_DIRNAME).mkdir()
    assert pc.seed_dir(None, model) == model / pc.SEED_DIRNAME
    assert pc.seed_dir("off", model) is None and pc.seed_dir("", model) is None
    assert pc.seed_dir(str(tmp_path / "elsewhere"), model) == tmp_path / "elsewhere"


def test_a_fast_server_seeds_its_kernel_cache_from_the_model_directory(tiny_model_dir, tmp_path):
    """The real server, started on a model directory holding a seed: its kernel cache (BLOOM_KERNEL_CACHE_DIR) has
    the seed's entries before it is ready, /ready's timings say how many were copied, and it serves."""
    model = tmp_path / "model"
    model.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.is_file():
            (model / f.name).symlink_to(f)
    for n in ("K1", "K2"):
        _entry(model / pc.SEED_DIRNAME, n, b"binary")
    cache = tmp_path / "kc"
    env = {"BLOOM_KERNEL_CACHE_DIR": str(cache)}
    with ServerProcess(["--model", str(model), "--backend", "fast", *ARGS], free_port(), env=env,
                       log_path=tmp_path / "srv.log") as srv:  # fmt: skip
        status, body, _ = srv.get("/ready")
        assert status == 200
        timings = body["progress"]["timings"]
        assert timings["kernel cache seed: entries copied"] == 2
        assert timings["kernel cache seed: entries already there"] == 0
        assert {"K1", "K2"} <= {p.name for p in cache.iterdir()}
        status, out, _ = srv.post("/generate", {"text": ["Deepspeed is"], "max_new_tokens": 4})
        assert status == 200 and out["num_generated_tokens"] == [4]
    # BLOOM_KERNEL_CACHE_SEED=off: no copy, even with the seed there.
    cache2 = tmp_path / "kc2"
    env = {"BLOOM_KERNEL_CACHE_DIR": str(cache2), "BLOOM_KERNEL_CACHE_SEED": "off"}
    with ServerProcess(["--model", str(model), "--backend", "fast", *ARGS], free_port(), env=env,
                       log_path=tmp_path / "srv2.log") as srv:  # fmt: skip
        status, body, _ = srv.get("/ready")
        assert status == 200 and "kernel cache seed: entries copied" not in body["progress"]["timings"]
        assert not (cache2.exists() and any(p.name in ("K1", "K2") for p in cache2.iterdir()))


def _info(tmp_path: Path, **over) -> Path:
    info = {"world": 2, "dtype": "float16", "max_batch": 16, "max_seq": 612, "fast_decode": None, "ok": True,
            "triton": pc.triton_version() or "3.0.0", "targets": [{"target": 90, "ok": True},
                                                                   {"target": 80, "ok": True}]}  # fmt: skip
    info.update(over)
    (tmp_path / pc.SEED_INFO).write_text(json.dumps(info))
    return tmp_path


def test_seed_archs_only_for_the_same_settings_and_triton(tmp_path, monkeypatch):
    facts = {"model_dir": "/mnt/models", "world": 2, "dtype": "float16", "max_batch": 16, "max_seq": 612,
             "fast_decode": None}  # fmt: skip
    if pc.triton_version() is None:
        pytest.skip("Triton is not installed")
    assert pc.seed_archs(_info(tmp_path), facts) == (90, 80)
    for key, value in (("world", 1), ("dtype", "bfloat16"), ("max_batch", 8), ("max_seq", 1024), ("weights", "int8")):
        assert pc.seed_archs(_info(tmp_path), {**facts, key: value}) == (), key
    assert pc.seed_archs(_info(tmp_path, triton="0.0.1"), facts) == ()
    assert pc.seed_archs(_info(tmp_path, ok=False), facts) == ()
    assert pc.seed_archs(_info(tmp_path, targets=[{"target": 90, "ok": False}, {"target": 80, "ok": True}]),
                         facts) == (80,)  # fmt: skip
    base = {**facts, "fast_decode": "base"}  # another fusion: other kernels
    assert pc.seed_archs(_info(tmp_path), base) == ()
    assert pc.seed_archs(_info(tmp_path, fast_decode="base"), base) == (90, 80)
    assert pc.seed_archs(tmp_path / "missing", facts) == () and pc.seed_archs(None, facts) == ()


def test_the_int8_plan_is_the_fp16_plan_on_int8_weights_with_the_larger_batches(tiny_model_dir):
    """`--dtype int8`: the same decode calls (one definition: the model's row limits and row blocks), on int8 weights,
    and past 16 rows the row buckets the fp16 plan leaves to cuBLAS (each bucket's GEMM key, or the gemv's 64-row
    blocks below the GEMM's threshold)."""
    pytest.importorskip("triton")
    from bloom_server.fast import triton_kernels as tk

    facts = pc.plan_facts(tiny_model_dir, world=1, dtype=pc.model_dtype("int8"), max_batch=32, max_seq=96,
                          fast_decode=None, weights=pc.weight_format("int8"))  # fmt: skip
    q, f = tk.plan_for(facts), tk.plan_for({**facts, "weights": pc.weight_format("fp16")})
    assert q.quant and not f.quant and q.gemvs == f.gemvs and q.dtype == f.dtype == "float16"
    assert f.rows(2) == (2, 16) and q.rows(2) == (2, 16, 24, 32)
    big = tk.plan_for({**facts, "max_batch": 128}).rows(2)
    assert big == (2, 16, 24, 32, 40, 64, 72, 128) and max(tk.plan_for({**facts, "max_batch": 999}).rows(2)) == 256
    # Past 16 rows: every GEMM bucket the batch reaches, each specialised as "not / divisible by 16".
    assert {tk.gemm_block_rows(m) for m in big if m > 16} == {32, 64, 128}
    assert {m % 16 == 0 for m in big if m > 16} == {True, False} and max(big) <= tk.max_rows(True)
    assert all(tk.uses_gemm(m, True) or tk.block_rows(m) in (16, 64) for m in big)
    assert tk.plan_for({**facts, "max_batch": 16}).rows(2) == (2, 16)
    assert tk.DecodePlan.from_json(q.to_json()) == q


@pytest.mark.slow  # compile worker processes
@pytest.mark.skipif(triton_missing, reason="Triton is not installed")
def test_precompile_covers_the_int8_kernels(tiny_model_dir, tmp_path):
    args = ["--model", str(tiny_model_dir), "--target", "90", "--workers", "2", "--max-batch-size", "32"]
    fp16 = run_cli(*args, "--out", str(tmp_path / "fp16"), "--dtype", "fp16")
    int8 = run_cli(*args, "--out", str(tmp_path / "int8"), "--dtype", "int8")
    assert fp16.returncode == 0 and int8.returncode == 0, int8.stderr[-3000:]
    rep = report_of(int8)
    assert rep["ok"] and rep["weights"] == "int8" and report_of(fp16)["weights"] is None
    # The int8 variants are other binaries (int8 weight pointers, the QUANT constexpr), and more (the 64-row blocks).
    assert not pc.cubin_entries(tmp_path / "int8") & pc.cubin_entries(tmp_path / "fp16") - _attention(tmp_path)
    assert rep["targets"][0]["variants"] > report_of(fp16)["targets"][0]["variants"]
    facts = {"model_dir": "/x", "world": 1, "dtype": "float16", "max_batch": 32, "max_seq": 612, "fast_decode": None}
    assert pc.seed_archs(tmp_path / "int8", {**facts, "max_seq": rep["max_seq"], "weights": "int8"}) == (90,)
    assert pc.seed_archs(tmp_path / "int8", {**facts, "max_seq": rep["max_seq"], "weights": None}) == ()


def _attention(tmp_path: Path) -> set[str]:
    """The decode attention's entries, which fp16 and int8 weights share."""
    return {n for n in pc.cubin_entries(tmp_path / "int8") if "attn" in _meta(tmp_path / "int8" / n).get("name", "")}
