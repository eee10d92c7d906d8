"""DeepSpeed ZeRO stage 3 for inference: every rank holds 1/world of each weight and gathers a layer's weights just
before running it (optionally from CPU memory). Slow per token, but it serves a model larger than the GPUs' memory
with the plain transformers code. Every rank must run every forward (`synced_gpus=True`), even one whose rows
finished early. DeepSpeed and torch are imported inside methods only.
"""

from __future__ import annotations

import logging
from typing import Any

from bloom_server.backends.base import TransformersModelBackend
from bloom_server.backends.ds_inference import ensure_distributed, import_deepspeed, require_cuda
from bloom_server.errors import ConfigError, ModelDirError

log = logging.getLogger(__name__)


def zero3_inference_config(dtype: str, hidden_size: int, world_size: int, cpu_offload: bool) -> dict[str, Any]:
    """A ZeRO-3 config with no optimizer. Bucket sizes follow the hidden size (one hidden x hidden matrix per
    collective); a persistence threshold of 0 partitions every tensor, the small ones too."""
    zero: dict[str, Any] = {
        "stage": 3,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 0,
    }
    if cpu_offload:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "fp16": {"enabled": dtype == "fp16"},
        "bf16": {"enabled": dtype == "bf16"},
        "zero_optimization": zero,
        # Required by the config parser even without training: one row per rank per step.
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world_size,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class DSZeroBackend(TransformersModelBackend):
    name = "ds_zero"

    def resolved_dtype(self) -> str:
        return "fp16" if self.settings.dtype == "auto" else self.settings.dtype

    def validate(self) -> None:
        if self.resolved_dtype() == "int8":
            raise ConfigError("ds_zero has no int8: use --dtype fp16 or bf16 (or --backend ds_inference for int8)")
        if self.model_dir.layout != "hf":
            raise ModelDirError(
                f"{self.model_dir.path} is a DeepSpeed pre-sharded checkpoint: it loads only with "
                "--backend ds_inference; ds_zero needs a Hugging Face checkpoint"
            )

    def load(self) -> None:
        self.validate()
        deepspeed = import_deepspeed(self.name)
        require_cuda(self.name, self.ctx)
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig

        ensure_distributed(deepspeed, self.ctx)
        dtype = self.resolved_dtype()
        torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
        config = AutoConfig.from_pretrained(str(self.model_dir.path))
        ds_config = zero3_inference_config(dtype, config.hidden_size, self.ctx.world_size, self.settings.cpu_offload)
        # While this object lives, from_pretrained builds the model under zero.Init: each rank allocates only its
        # partition (transformers holds it by weak reference, so keep it on self).
        self._hf_ds_config = HfDeepSpeedConfig(ds_config)
        model = AutoModelForCausalLM.from_pretrained(str(self.model_dir.path), torch_dtype=torch_dtype).eval()
        engine = deepspeed.initialize(model=model, config_params=ds_config)[0]
        engine.module.eval()
        self._engine = engine
        self.model = engine.module
        self.input_device = torch.device("cuda", self.ctx.local_rank)

    def extra_generate_kwargs(self) -> dict[str, Any]:
        # A rank whose rows hit EOS must still join every forward, or the others wait forever in the all-gather.
        return {"synced_gpus": True} if self.ctx.world_size > 1 else {}

    def describe(self) -> dict[str, Any]:
        return {
            "dtype": self.resolved_dtype(),
            "zero_stage": 3,
            "world_size": self.ctx.world_size,
            "cpu_offload": bool(self.settings.cpu_offload),
            "device": str(self.input_device),
        }
