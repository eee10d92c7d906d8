"""Tensor parallelism on CPU (gloo, 2 ranks): each rank holds half the heads, half the MLP and half of a padded
vocabulary, reads only its own slices of the checkpoint, and the collectives run inside each step. The result must
be the one-rank result: the same greedy tokens, logits equal to rounding."""

from __future__ import annotations

import os
import pickle

import pytest

torch = pytest.importorskip("torch")

from helpers import free_port
from test_fast_engine import PROMPTS, build_random_bloom

pytestmark = pytest.mark.slow


def _rank(rank: int, world: int, port: int, model_dir: str, out_dir: str) -> None:
    import torch.distributed as dist

    from bloom_server.fast.engine import FastEngine
    from bloom_server.fast.sampling import SamplingConfig
    from bloom_server.fast.shapes import BloomShape
    from bloom_server.fast.tp import TPGroup
    from bloom_server.fast.weights import from_checkpoint

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        tp = TPGroup(rank=rank, world=world)
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
        }
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(out, f)
    finally:
        dist.destroy_process_group()


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
