#!/usr/bin/env python3
"""Write a random-weight BLOOM of a named shape as a real Hugging Face checkpoint directory, and optionally the
DeepSpeed pre-sharded layout of the same weights.

    python scripts/bench/make_random_bloom.py OUT --shape 560m
    python scripts/bench/make_random_bloom.py OUT --shape 176b --layers 4 --dtype fp16
    deepspeed --num_gpus 2 scripts/bench/make_random_bloom.py OUT --shape 7b1 --presharded-out OUT-ds --tp 2

OUT gets config.json, model*.safetensors and a byte-level BPE tokenizer (tokenizer.json and its configs) trained
locally: nothing is downloaded. The embedding has the shape's real vocabulary (250880 for the BLOOM shapes); the
tokenizer is small, and every id it produces is below that. Random weights are fine for speed and for comparing two
engines on the same weights; the text they generate means nothing.

--presharded-out DIR writes DeepSpeed's pre-sharded checkpoint (ds_inference_config.json, non-tp.pt, tp_*.pt) through
`init_inference(save_mp_checkpoint_path=...)`. That needs DeepSpeed, a GPU per tensor-parallel rank and the deepspeed
launcher with --num_gpus equal to --tp.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# (hidden, layers, heads, vocab) of the published checkpoints; `tiny` is for tests.
SHAPES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (64, 2, 4, 1024),
    "560m": (1024, 24, 16, 250880),
    "7b1": (4096, 30, 32, 250880),
    "176b": (14336, 70, 112, 250880),
}
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def bloom_config(shape: str, layers: int | None = None, dtype: str = "fp16", init_std: float = 0.02):
    from transformers import BloomConfig

    hidden, n_layer, heads, vocab = SHAPES[shape]
    return BloomConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        n_layer=layers or n_layer,
        n_head=heads,
        layer_norm_epsilon=1e-5,
        initializer_range=init_std,
        apply_residual_connection_post_layernorm=False,
        attention_softmax_in_fp32=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        unk_token_id=0,
        pretraining_tp=1,
        slow_but_exact=False,
        tie_word_embeddings=True,
        use_cache=True,
        torch_dtype=DTYPES[dtype],
    )


def random_model(config, dtype: str, seed: int, device: str = "cpu"):
    """Build on the meta device, then allocate and fill once: normal(0, initializer_range) for matrices and
    embeddings, zeros for biases, ones for LayerNorm weights (BLOOM's own init, without the double work of
    nn.Module defaults followed by `_init_weights`). device="cuda" fills on the GPU (seconds instead of a minute
    for the large shapes; the numbers differ from the CPU's for the same seed) and returns the model there."""
    import torch
    from transformers import BloomForCausalLM

    torch_dtype = getattr(torch, DTYPES[dtype])
    with torch.device("meta"):
        model = BloomForCausalLM(config)
    model = model.to(torch_dtype).to_empty(device=device)
    model.tie_weights()
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # named_parameters() yields the tied embedding once
            if name.endswith("bias"):
                p.zero_()
            elif "layernorm" in name or "ln_f" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, config.initializer_range, generator=gen)
    return model.eval()


def train_tokenizer(out_dir: Path, vocab_size: int) -> None:
    """The project's tokenizer recipe (bloom_server.storage.tiny): byte-level BPE with BLOOM's special ids."""
    from bloom_server.storage.tiny import train_tokenizer as project_recipe

    project_recipe(out_dir, vocab_size)


def write_hf_checkpoint(
    out: Path,
    shape: str,
    *,
    layers: int | None = None,
    dtype: str = "fp16",
    seed: int = 0,
    init_std: float = 0.02,
    tokenizer_vocab: int = 2048,
    init_device: str = "cpu",
) -> Path:
    from tokenizers import Tokenizer

    config = bloom_config(shape, layers, dtype, init_std)
    out.mkdir(parents=True, exist_ok=True)
    train_tokenizer(out, min(tokenizer_vocab, config.vocab_size))
    n_tok = Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size()
    if n_tok > config.vocab_size:
        raise SystemExit(f"tokenizer has {n_tok} ids but the model's vocabulary is {config.vocab_size}")
    model = random_model(config, dtype, seed, init_device).cpu()
    model.save_pretrained(out, safe_serialization=True, max_shard_size="4GB")
    meta = {"shape": shape, "layers": config.n_layer, "dtype": dtype, "seed": seed, "init_std": init_std}
    (out / "random_bloom.json").write_text(json.dumps({**meta, "init_device": init_device}))
    for f in out.iterdir():  # safetensors writes 0600; a server running as another user must read it
        f.chmod(0o644)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="directory for the Hugging Face checkpoint")
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--layers", type=int, default=None, help="number of transformer blocks (default: the shape's)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="dtype of the saved weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-std", type=float, default=0.02, help="std of the random weights (BLOOM's init: 0.02)")
    p.add_argument("--tokenizer-vocab", type=int, default=2048, help="size of the trained tokenizer")
    p.add_argument("--init-device", default="cpu", help="where to draw the random weights: cpu or cuda (faster)")
    p.add_argument("--presharded-out", type=Path, default=None, help="also write DeepSpeed's pre-sharded layout here")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree of the pre-sharded layout")
    p.add_argument("--presharded-dtype", choices=("fp16", "int8"), default="fp16")
    p.add_argument("--max-tokens", type=int, default=2048, help="DeepSpeed max_tokens while writing")
    p.add_argument(
        "--presharded-only",
        action="store_true",
        help="OUT already holds the checkpoint (written earlier by this script): only write --presharded-out",
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.presharded_out is not None and args.tp != world:
        raise SystemExit(
            f"--tp {args.tp} needs one process per GPU: run under `deepspeed --num_gpus {args.tp} "
            f"scripts/bench/make_random_bloom.py ...` (this run has WORLD_SIZE={world})"
        )
    if args.presharded_only and (args.presharded_out is None or not (args.out / "config.json").is_file()):
        raise SystemExit("--presharded-only needs --presharded-out and a checkpoint already in OUT (config.json)")
    if rank == 0 and not args.presharded_only:
        write_hf_checkpoint(
            args.out,
            args.shape,
            layers=args.layers,
            dtype=args.dtype,
            seed=args.seed,
            init_std=args.init_std,
            tokenizer_vocab=args.tokenizer_vocab,
            init_device=args.init_device,
        )
        print(f"wrote {args.out}")
    if args.presharded_out is None:
        return 0

    from bloom_server.backends.ds_inference import write_presharded_checkpoint
    from bloom_server.types import RankContext

    ctx = RankContext(
        rank=rank, world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")), device_type="cuda"
    )
    # Every rank reads the checkpoint rank 0 wrote: wait for it (the process group exists once DeepSpeed is up).
    write_presharded_checkpoint(
        args.out, args.presharded_out, ctx=ctx, dtype=args.presharded_dtype, max_tokens=args.max_tokens,
        wait_for_rank0=world > 1,
    )  # fmt: skip
    if rank == 0:
        print(f"wrote {args.presharded_out} (DeepSpeed pre-sharded, tp={world}, {args.presharded_dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
