"""Tensor parallelism on CPU (gloo, 2 ranks): each rank holds half the heads, half the MLP and half of a padded
vocabulary, reads only its own slices of the checkpoint, and the collectives run inside each step. The result must
be the one-rank result: the same greedy tokens, logits equal to rounding."""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from helpers import free_port
from test_fast_engine import PROMPTS, build_random_bloom

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def _gloo_rank(rank: int, world: int, port: int) -> Iterator[Any]:
    """This process as `rank` of a gloo group of `world` on 127.0.0.1:port; yields its TPGroup."""
    import torch.distributed as dist

    from bloom_server.fast.tp import TPGroup

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield TPGroup(rank=rank, world=world)
    finally:
        dist.destroy_process_group()


def _rank(rank: int, world: int, port: int, model_dir: str, out_dir: str) -> None:
    from bloom_server.fast.engine import FastEngine
    from bloom_server.fast.sampling import SamplingConfig
    from bloom_server.fast.shapes import BloomShape
    from bloom_server.fast.weights import from_checkpoint

    with _gloo_rank(rank, world, port) as tp:
        shape = BloomShape.from_dir(model_dir)
        w = from_checkpoint(model_dir, shape, tp, dtype=torch.float32)
        engine = FastEngine(w, shape, max_batch=4, max_seq=64, tp=tp)
        out = {
            "heads": engine.model.hp,
            "vocab_rows": w.emb.shape[0],
            "qkv_rows": w.layers[0].qkv_w.shape[0],
            "greedy": engine.generate(PROMPTS, 16, SamplingConfig()).tokens,
            "sampled": engine.generate(PROMPTS, 8, SamplingConfig(do_sample=True, top_k=20), seed=5).tokens,
            "logits": engine.forward_logits(PROMPTS),
            # the reductions beside the model's sums: the emptiest rank's free memory (the prefix cache's size)
            "min": tp.all_reduce(torch.tensor([10.0 + rank]), "min").item(),
            "max": tp.all_reduce(torch.tensor([10.0 + rank]), "max").item(),
        }
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(out, f)


def test_two_ranks_equal_one_rank(tmp_path):
    import torch.multiprocessing as mp

    from bloom_server.fast.engine import FastEngine
    from bloom_server.fast.sampling import SamplingConfig
    from bloom_server.fast.shapes import BloomShape
    from bloom_server.fast.weights import from_checkpoint

    model_dir = build_random_bloom(tmp_path / "m", vocab=1001, heads=6)  # 1001 rows: rank 1's vocab part is padded
    shape = BloomShape.from_dir(model_dir)
    one = FastEngine(from_checkpoint(model_dir, shape, dtype=torch.float32), shape, max_batch=4, max_seq=64)
    greedy = one.generate(PROMPTS, 16, SamplingConfig()).tokens
    sampled = one.generate(PROMPTS, 8, SamplingConfig(do_sample=True, top_k=20), seed=5).tokens
    logits = one.forward_logits(PROMPTS)

    mp.start_processes(_rank, args=(2, free_port(), str(model_dir), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")  # fmt: skip
    ranks = [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(2)]
    for r in ranks:
        assert r["heads"] == 3 and r["vocab_rows"] == 501 and r["qkv_rows"] == 3 * 3 * shape.head_dim
        assert (r["min"], r["max"]) == (10.0, 11.0)
        assert r["greedy"] == greedy
        assert r["sampled"] == sampled
        for i, row in enumerate(PROMPTS):
            assert torch.allclose(r["logits"][i, : len(row)], logits[i, : len(row)], atol=1e-4, rtol=1e-4)


def test_random_weights_hold_only_the_rank_shard():
    """Random weights for one rank of several keep only that rank's bytes: a row shard is a copy, not a view of the
    whole drawn tensor (which would put the whole query_key_value and dense_h_to_4h on every GPU: 220 GB per GPU for
    the 70-layer model at TP=8). The shards still equal the matching slices of the one-rank weights."""
    from bloom_server.fast.shapes import BloomShape
    from bloom_server.fast.tp import TPGroup
    from bloom_server.fast.weights import iter_tensors, random_weights

    shape = BloomShape(2048, 256, 2, 4)
    full = random_weights(shape, TPGroup(rank=0, world=1), dtype=torch.float32)
    for rank in range(2):
        w = random_weights(shape, TPGroup(rank=rank, world=2), dtype=torch.float32)
        assert sum(t.untyped_storage().nbytes() for t in iter_tensors(w)) == w.nbytes()
        rows = w.layers[0].fc1_w.shape[0]
        assert torch.equal(w.layers[0].fc1_w, full.layers[0].fc1_w[rank * rows : (rank + 1) * rows])


def _int8_rank(rank: int, world: int, port: int, model_dir: str, presharded: str, out_dir: str) -> None:
    from bloom_server.fast.engine import FastEngine
    from bloom_server.fast.quant import quantize_weights
    from bloom_server.fast.shapes import BloomShape
    from bloom_server.fast.weights import from_checkpoint

    with _gloo_rank(rank, world, port) as tp:
        shape = BloomShape.from_dir(model_dir)
        out = {}
        # Quantized at load from this rank's slices (the row-parallel maxima all-reduced), and read pre-sharded.
        for name, w in (("at load", quantize_weights(from_checkpoint(model_dir, shape, tp, dtype=torch.float16), tp)),
                        ("presharded", from_checkpoint(presharded, shape, tp, dtype=torch.float16))):  # fmt: skip
            engine = FastEngine(w, shape, max_batch=4, max_seq=64, tp=tp)
            out[name] = {"greedy": engine.generate(PROMPTS, 16).tokens, "dense_s": w.layers[0].dense_s,
                         "logits": engine.forward_logits(PROMPTS), "bytes": w.nbytes()}  # fmt: skip
        with open(os.path.join(out_dir, f"int8-rank{rank}.pkl"), "wb") as f:
            pickle.dump(out, f)


def test_two_int8_ranks_equal_one_int8_rank(tmp_path, tiny_model_dir):
    """The sharded int8 path: scales of whole rows whatever the split (an all-reduce of the row maxima at load, the
    whole rows in `bloom-server preshard --dtype int8 --tp 2`), so two ranks serve the one-rank int8 model: the same
    greedy tokens, logits equal to rounding, each rank holding about half the int8 bytes."""
    import shutil
    import subprocess
    import sys

    import torch.multiprocessing as mp

    from bloom_server.fast.engine import FastEngine
    from bloom_server.fast.quant import quantize_weights
    from bloom_server.fast.shapes import BloomShape
    from bloom_server.fast.weights import from_checkpoint

    model_dir = build_random_bloom(tmp_path / "m", vocab=1001, heads=6)  # rank 1's vocabulary rows (and scales) padded
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):  # preshard copies a tokenizer
        if (tiny_model_dir / f).is_file():
            shutil.copyfile(tiny_model_dir / f, model_dir / f)
    pre = tmp_path / "int8-tp2"
    r = subprocess.run([sys.executable, "-m", "bloom_server", "preshard", "--model", str(model_dir), "--tp", "2",
                        "--out", str(pre), "--dtype", "int8"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    shape = BloomShape.from_dir(model_dir)
    w = quantize_weights(from_checkpoint(model_dir, shape, dtype=torch.float16))
    one = FastEngine(w, shape, max_batch=4, max_seq=64)
    greedy = one.generate(PROMPTS, 16).tokens
    logits = one.forward_logits(PROMPTS)

    mp.start_processes(_int8_rank, args=(2, free_port(), str(model_dir), str(pre), str(tmp_path)), nprocs=2,
                       join=True, start_method="spawn")  # fmt: skip
    for rank in range(2):
        got = pickle.loads((tmp_path / f"int8-rank{rank}.pkl").read_bytes())
        for name, r in got.items():
            assert r["greedy"] == greedy, name
            assert torch.equal(r["dense_s"], w.layers[0].dense_s), name  # the whole rows' scales on every rank
            assert 0.45 * w.nbytes() < r["bytes"] < 0.6 * w.nbytes(), name
            for i, row in enumerate(PROMPTS):
                assert torch.allclose(r["logits"][i, : len(row)], logits[i, : len(row)], atol=2e-2, rtol=1e-2), name
