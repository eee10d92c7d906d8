"""DeepSpeed-Inference: fused BLOOM kernels (kernel injection) and tensor parallelism over the launcher's ranks.

Two layouts load here:
- DeepSpeed's pre-sharded checkpoint (`ds_inference_config.json` + `non-tp.pt` + `tp_*.pt`, fp16 or int8): the model
  is built on the meta device, so no rank ever holds a full copy, and DeepSpeed reads the shards straight into the
  fused layers. Kernel injection only: the shards hold the fused layers' own tensors.
- A plain Hugging Face checkpoint: loaded on the CPU, then injected (fp16, int8 quantized on the fly) or, with
  `kernel_inject=False`, split by DeepSpeed's automatic tensor parallelism (any dtype, any model DeepSpeed can split).

DeepSpeed's BLOOM kernels refuse transformers newer than 4.43.4, hence the project's pin. DeepSpeed and torch are
imported inside methods only: importing this module does nothing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bloom_server.backends.base import TransformersModelBackend
from bloom_server.errors import ConfigError, ModelDirError

if TYPE_CHECKING:
    import torch

    from bloom_server.settings import Settings
    from bloom_server.storage.model_dir import ModelDir
    from bloom_server.types import RankContext

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'bloom-server[deepspeed]'"
DS_CONFIG = "ds_inference_config.json"
# Files a served directory needs beside the weights: the model's shape and the tokenizer (the server requires
# tokenizer.json). Copied next to a pre-sharded checkpoint we write.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


# --- shared by ds_inference and ds_zero -------------------------------------------------------------------------


def import_deepspeed(backend: str) -> Any:
    try:
        import deepspeed
    except ImportError as e:
        raise ConfigError(f"the {backend} backend needs DeepSpeed, which is not installed: {INSTALL_HINT}") from e
    return deepspeed


def require_cuda(backend: str, ctx: RankContext) -> None:
    import torch

    if ctx.device_type != "cuda" or not torch.cuda.is_available():
        raise ConfigError(f"the {backend} backend needs a CUDA GPU; on a CPU use --backend hf")
    if ctx.local_rank >= torch.cuda.device_count():
        raise ConfigError(f"local rank {ctx.local_rank} has no GPU: {torch.cuda.device_count()} visible")
    torch.cuda.set_device(ctx.local_rank)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_distributed(deepspeed: Any, ctx: RankContext) -> None:
    """DeepSpeed wants a process group even for one rank. Adopt the runtime's (it must reach GPUs: nccl), or, for a
    single process started without a launcher, make a one-rank group on a free local port."""
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() != ctx.world_size:
            raise ConfigError(
                f"the process group has {dist.get_world_size()} ranks but the rank context says {ctx.world_size}"
            )
        backend = str(dist.get_backend())
        if ctx.world_size > 1 and "nccl" not in backend:
            raise ConfigError(
                f"DeepSpeed tensor parallelism all-reduces GPU tensors: the default process group must use nccl, "
                f"not {backend}"
            )
        deepspeed.init_distributed()  # wraps the existing group; creates nothing
        return
    if ctx.world_size == 1:
        for key, value in (("RANK", "0"), ("LOCAL_RANK", str(ctx.local_rank)), ("WORLD_SIZE", "1")):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    deepspeed.init_distributed(dist_backend="nccl", auto_mpi_discovery=False)


# --- the backend ---------------------------------------------------------------------------------------------------


class DSInferenceBackend(TransformersModelBackend):
    name = "ds_inference"

    def __init__(
        self,
        settings: Settings,
        model_dir: ModelDir,
        ctx: RankContext,
        *,
        save_mp_checkpoint_path: str | os.PathLike | None = None,
    ):
        super().__init__(settings, model_dir, ctx)
        # Set only by write_presharded_checkpoint(): DeepSpeed then also writes its pre-sharded layout there.
        self.save_mp_checkpoint_path = save_mp_checkpoint_path

    # What the settings ask for, checked before anything is imported or read.

    @property
    def kernel_inject(self) -> bool:
        return bool(self.settings.kernel_inject)

    @property
    def max_tokens(self) -> int:
        return self.settings.total_tokens_limit

    def resolved_dtype(self) -> str:
        """fp16 | int8 | bf16 | fp32: the dtype DeepSpeed runs. 'auto' follows a pre-sharded checkpoint's own."""
        dtype = self.settings.dtype
        if dtype == "auto":
            dtype = "fp16"
            if self.model_dir.layout == "ds_presharded" and _ckpt_dtype(self.model_dir) == "int8":
                dtype = "int8"
        return dtype

    def validate(self) -> None:
        dtype = self.resolved_dtype()
        if self.kernel_inject and dtype == "bf16":
            raise ConfigError(
                "bf16 with DeepSpeed kernel injection is not supported: its fused BLOOM kernels run fp16 or int8. "
                "Use --dtype fp16 (or int8), or --no-kernel-inject for bf16 through DeepSpeed's automatic tensor "
                "parallelism, or --backend hf"
            )
        if not self.kernel_inject and dtype == "int8":
            raise ConfigError("int8 needs DeepSpeed kernel injection: drop --no-kernel-inject, or use fp16/bf16")
        if self.model_dir.layout == "fast_presharded":
            raise ConfigError(
                f"{self.model_dir.path} is pre-sharded for the fast backend (`bloom-server preshard`): serve it with "
                "--backend fast, or point ds_inference at the plain checkpoint or a DeepSpeed pre-sharded one"
            )
        if self.model_dir.layout == "ds_presharded":
            if not self.kernel_inject:
                raise ConfigError(
                    f"{self.model_dir.path} is a DeepSpeed pre-sharded checkpoint: its shards hold the fused "
                    "kernels' tensors, so it loads only with kernel injection (drop --no-kernel-inject)"
                )
            ckpt_dtype = _ckpt_dtype(self.model_dir)
            if ckpt_dtype == "int8" and dtype != "int8":
                raise ConfigError(f"{self.model_dir.path} holds int8 weights: serve it with --dtype int8 (or auto)")
            tp = int(self.model_dir.ds_config.get("tp_size", 1))
            if ckpt_dtype == "int8" and tp != self.ctx.world_size:
                raise ConfigError(
                    f"an int8 pre-sharded checkpoint loads only at its own tensor-parallel degree: it was written "
                    f"for tp_size={tp}, this launch has {self.ctx.world_size} ranks (use --num_gpus {tp})"
                )

    def load(self) -> None:
        self.validate()
        deepspeed = import_deepspeed(self.name)
        require_cuda(self.name, self.ctx)
        import torch

        dtype = self.resolved_dtype()
        if dtype == "int8":
            refuse_int8_if_unsupported(deepspeed)
        ensure_distributed(deepspeed, self.ctx)
        # int8 starts from fp16 weights; DeepSpeed quantizes them (or reads int8 shards) into its fused layers.
        build_dtype = {"fp16": torch.float16, "int8": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[
            dtype
        ]
        ds_dtype = torch.int8 if dtype == "int8" else build_dtype
        kwargs: dict[str, Any] = {
            "dtype": ds_dtype,
            "tensor_parallel": {"tp_size": self.ctx.world_size},
            "replace_with_kernel_inject": self.kernel_inject,
            # Input + output tokens the fused kernels' KV cache is sized for (DeepSpeed's default, 1024, silently
            # produced garbage past it). The engine validates requests against the same number.
            "max_tokens": self.max_tokens,
        }
        if self.kernel_inject:
            # The fused kernels' workspace must hold max_tokens: DeepSpeed otherwise shrinks it silently to what free
            # memory allows, and a longer request then runs past it. With min_tokens equal, it refuses instead.
            kwargs["min_tokens"] = self.max_tokens
        if self.save_mp_checkpoint_path is not None:
            kwargs["save_mp_checkpoint_path"] = str(self.save_mp_checkpoint_path)

        if self.model_dir.layout == "ds_presharded":
            model = self._meta_model(deepspeed, build_dtype)
            ckpt = dict(self.model_dir.ds_config)
            # DeepSpeed prefers a base_dir written inside the json over the argument: a checkpoint written elsewhere
            # (or moved, or mounted read-only at another path) must be read from where it is now.
            ckpt["base_dir"] = str(self.model_dir.path)
            kwargs.update(checkpoint=ckpt, base_dir=str(self.model_dir.path))
        else:
            model = self._hf_model(build_dtype)

        log.info("rank %d: deepspeed.init_inference(%s)", self.ctx.rank, _printable(kwargs))
        engine = deepspeed.init_inference(model, **kwargs)
        restore_head_dtype(engine.module, build_dtype)
        _refuse_meta_leftovers(engine.module, self.model_dir)
        self.model = engine
        self.input_device = torch.device("cuda", self.ctx.local_rank)
        if self.kernel_inject:
            self.reserve_at_limits()

    def reserve_at_limits(self) -> None:
        """The first forward of a kernel-injected model sizes DeepSpeed's one workspace (activations, attention
        scores, KV cache) for that forward's batch size, and it never grows: a later, larger batch writes past it
        ("The specified pointer resides on host memory" in the QKV GEMM, or corrupt output). So the first forward is
        a generate at the configured limits, on every rank alike: max-batch-size rows of max-input-length tokens,
        decoded to max total tokens. A workspace or a step that cannot hold them stops the start, naming them."""
        import torch

        s = self.settings
        rows, prompt = s.max_batch_size, min(s.max_input_length, self.max_tokens - 1)
        new = self.max_tokens - prompt
        vocab = int(getattr(self.model.module.config, "vocab_size", 0) or 0)
        token = min(100, max(vocab - 1, 0))  # an ordinary token: no special id, inside any BLOOM vocabulary
        ids = torch.full((rows, prompt), token, dtype=torch.long, device=self.input_device)
        try:
            with torch.inference_mode():
                self.model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=new,
                    min_new_tokens=new,
                    do_sample=False,
                    pad_token_id=token,
                )
            if torch.device(self.input_device).type == "cuda":
                torch.cuda.synchronize(self.input_device)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
            raise ConfigError(
                f"DeepSpeed cannot run a batch at the configured limits (--max-batch-size {rows}, --max-input-length "
                f"{prompt}, --max-total-tokens {self.max_tokens}) on {self.ctx.world_size} GPU(s): {e}. Lower them "
                "(BLOOM_MAX_BATCH_SIZE, BLOOM_MAX_INPUT_LENGTH, BLOOM_MAX_TOTAL_TOKENS) or add GPUs"
            ) from e
        log.info("rank %d: DeepSpeed's workspace holds %d rows x %d tokens (a generate at the limits ran)",
                 self.ctx.rank, rows, self.max_tokens)  # fmt: skip

    def _meta_model(self, deepspeed: Any, dtype: torch.dtype) -> Any:
        from transformers import AutoConfig, AutoModelForCausalLM

        if not (self.model_dir.path / "config.json").is_file():
            raise ModelDirError(f"{self.model_dir.path} has no config.json: the model cannot be built from its shards")
        config = AutoConfig.from_pretrained(str(self.model_dir.path))
        with deepspeed.OnDevice(dtype=dtype, device="meta"):
            model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
        tie_head_for_meta_load(model)
        return model.eval()

    def _hf_model(self, dtype: torch.dtype) -> Any:
        from transformers import AutoModelForCausalLM

        # On the CPU: DeepSpeed moves each rank's share to its GPU (every rank reads the whole checkpoint once).
        return AutoModelForCausalLM.from_pretrained(
            str(self.model_dir.path),
            torch_dtype=dtype,
            low_cpu_mem_usage=True,
            use_safetensors=self.model_dir.weights_format == "safetensors",  # never a .bin beside safetensors
        ).eval()

    def describe(self) -> dict[str, Any]:
        return {
            "dtype": self.resolved_dtype(),
            "tp_size": self.ctx.world_size,
            "max_tokens": self.max_tokens,
            "kernel_inject": self.kernel_inject,
            "layout": self.model_dir.layout,
            "device": str(self.input_device),
        }


def refuse_int8_if_unsupported(deepspeed: Any) -> None:
    """DeepSpeed's InferenceEngine accepts only the dtypes its accelerator lists. In 0.19.8 the CUDA accelerator lists
    fp32, fp16 and bf16, so `init_inference(dtype=torch.int8)` raises "Data type torch.int8 is not supported by cuda
    accelerator" (seen on an H100, docs/gpu-checks.md). Say so before any weight is read."""
    import torch
    from deepspeed.accelerator import get_accelerator

    if torch.int8 not in get_accelerator().supported_dtypes():
        raise ConfigError(
            f"int8 is not supported by the installed DeepSpeed ({getattr(deepspeed, '__version__', '?')}): its "
            "inference engine accepts only fp32/fp16/bf16 on this accelerator, so neither an int8 pre-sharded "
            "checkpoint nor on-the-fly int8 quantization can load. Serve the fp16 checkpoint with --dtype fp16"
        )


# --- the tied output embedding of a meta-built model ----------------------------------------------------------------


def tie_head_for_meta_load(model: Any) -> None:
    """Make DeepSpeed tie the output layer to the loaded input embedding instead of loading a copy of it.

    BLOOM's lm_head shares the word-embedding matrix. Built on the meta device it is an nn.Linear, so DeepSpeed's
    checkpoint loader replaces it with a LinearLayer that it allocates in fp32 (0.19.8 ignores the dtype there) and
    fills from `lm_head.weight` in non-tp.pt: the first generate fails with "expected mat1 and mat2 to have the same
    dtype (Half != float)", and the head costs a second, full-vocabulary copy per GPU. Swapped for a module the loader
    does not recognise, the head keeps its meta weight; after loading, DeepSpeed points a meta lm_head at the loaded
    embedding (the same tensor, in the model's dtype), as the original model had it.
    """
    import torch

    if not getattr(model.config, "tie_word_embeddings", True):
        return
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or emb is None or getattr(head, "bias", None) is not None or head.weight is not emb.weight:
        return

    class TiedOutputEmbedding(torch.nn.Module):
        """logits = hidden @ embedding.T, reading the input embedding's own tensor."""

        def __init__(self, weight: torch.nn.Parameter):
            super().__init__()
            self.weight = weight

        def forward(self, hidden: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.linear(hidden, self.weight)

    model.set_output_embeddings(TiedOutputEmbedding(head.weight))


def restore_head_dtype(model: Any, dtype: torch.dtype) -> None:
    """Cast an output layer that came back in another floating dtype than the model runs (an untied head loaded by
    DeepSpeed's fp32 LinearLayer). Kernel-injected layers (int8 weights, fp32 scales) are left alone."""
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return
    for name, p in head.named_parameters():
        if p.is_floating_point() and p.dtype != dtype and p.dtype != torch.int8 and not p.is_meta:
            log.warning("output layer %s came back as %s: casting it to %s", name, p.dtype, dtype)
            p.data = p.data.to(dtype)


def _refuse_meta_leftovers(model: Any, model_dir: ModelDir) -> None:
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise ModelDirError(f"{model_dir.path}: the checkpoint did not provide {left[:5]} ({len(left)} tensors)")


def _ckpt_dtype(model_dir: ModelDir) -> str:
    raw = str(model_dir.ds_config.get("dtype", "float16")).lower()
    return {"float16": "fp16", "fp16": "fp16", "half": "fp16", "int8": "int8", "bfloat16": "bf16"}.get(raw, raw)


def _printable(kwargs: dict[str, Any]) -> dict[str, Any]:
    out = dict(kwargs)
    if isinstance(out.get("checkpoint"), dict):
        out["checkpoint"] = {k: v for k, v in out["checkpoint"].items() if k != "checkpoints"}
    return out


# --- writing the pre-sharded layout ---------------------------------------------------------------------------------


def finalize_presharded_dir(out_dir: Path, source_dir: Path) -> None:
    """Make DeepSpeed's freshly written layout servable and movable: drop the absolute `base_dir` it records (the
    loader takes the directory it is given), and copy the model config and tokenizer beside the shards."""
    cfg_path = out_dir / DS_CONFIG
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("base_dir", None)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    for name in SIDE_FILES:
        if (source_dir / name).is_file():
            shutil.copyfile(source_dir / name, out_dir / name)
    if not (out_dir / "tokenizer.json").is_file():
        raise ModelDirError(f"{source_dir} has no tokenizer.json to copy into {out_dir}")
    # The server loads pickled shards only from a directory with a verifying completion marker (storage/model_dir.py):
    # this one was written here, from `source_dir`, so it gets one (sizes only: hashing 350 GB would take minutes).
    from bloom_server.storage import marker

    source_commit = None
    if (source_dir / marker.COMPLETE).is_file():
        source_commit = marker.read_marker(source_dir, marker.COMPLETE).get("commit")
    marker.write_local_marker(
        out_dir, writer="bloom-server write_presharded_checkpoint (DeepSpeed save_mp_checkpoint_path)",
        repo_id=str(source_dir), commit=source_commit or "local-deepspeed-preshard",
    )  # fmt: skip


def write_presharded_checkpoint(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    ctx: RankContext | None = None,
    dtype: str = "fp16",
    max_tokens: int = 2048,
    wait_for_rank0: bool = False,
) -> DSInferenceBackend:
    """Load a Hugging Face checkpoint with kernel injection at this launch's tensor-parallel degree and write
    DeepSpeed's pre-sharded layout of it to out_dir (every rank writes its own shards). Returns the loaded backend,
    which can generate: the model that wrote the checkpoint.

    Run on every rank under the launcher. With `wait_for_rank0`, ranks first wait at a barrier (rank 0 may still be
    writing model_dir)."""
    from bloom_server.settings import load_settings
    from bloom_server.storage.model_dir import ModelDir
    from bloom_server.types import RankContext

    ctx = ctx or RankContext(device_type="cuda")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    # max_tokens only sizes the kernels' workspace while writing; the shards do not depend on it.
    settings = load_settings(
        backend="ds_inference",
        dtype=dtype,
        kernel_inject=True,
        max_input_length=max(1, max_tokens // 2),
        max_total_tokens=max_tokens,
    )
    backend = DSInferenceBackend(
        settings,
        ModelDir(path=model_dir, layout="hf", model_id=model_dir.name),
        ctx,
        save_mp_checkpoint_path=out_dir,
    )
    if wait_for_rank0:
        ds = import_deepspeed(backend.name)
        require_cuda(backend.name, ctx)
        ensure_distributed(ds, ctx)
        ds.comm.barrier()
    out_dir.mkdir(parents=True, exist_ok=True)
    backend.load()
    if ctx.world_size > 1:
        import deepspeed

        deepspeed.comm.barrier()  # every rank's shards are on disk before rank 0 lists them in the marker
    if ctx.rank == 0:
        finalize_presharded_dir(out_dir, model_dir)
    return backend
