"""transformers + accelerate: the whole model on this rank (device_map="auto" over visible GPUs, or the CPU).

Under a launcher with several ranks every rank holds a full copy and runs the same step: that keeps the lockstep
protocol exercised on CPUs (gloo), and costs only memory.
"""

from __future__ import annotations

import logging
from typing import Any

from bloom_server.backends.base import TransformersModelBackend, torch_dtype
from bloom_server.errors import ConfigError, ModelDirError

log = logging.getLogger(__name__)


class HFBackend(TransformersModelBackend):
    whole_copy_per_rank = True
    spills_over_devices = True  # device_map="auto" on one process
    name = "hf"

    def load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        if self.model_dir.layout == "fast_presharded":
            raise ModelDirError(
                f"{self.model_dir.path} is pre-sharded for the fast backend (`bloom-server preshard`): serve it with "
                "--backend fast, or point the hf backend at the plain checkpoint"
            )
        if self.model_dir.layout != "hf":
            raise ModelDirError(
                f"{self.model_dir.path} is a DeepSpeed pre-sharded checkpoint: it loads only with --backend ds_inference"
            )
        dtype = torch_dtype(self.settings.dtype, self.ctx.device_type)
        # safetensors whenever the directory has them: transformers then never unpickles a pytorch_model.bin lying
        # beside them. A pickle-only directory came through model_dir.check_pickles (verified, or the opt-out).
        kwargs: dict[str, Any] = {
            "torch_dtype": dtype,
            "use_safetensors": self.model_dir.weights_format == "safetensors",
        }
        if self.settings.dtype == "int8":
            if self.ctx.device_type != "cuda":
                raise ConfigError("int8 with the hf backend needs a GPU (bitsandbytes); use fp32 or bf16 on CPU")
            kwargs["load_in_8bit"] = True
        if self.ctx.device_type == "cuda":
            if self.ctx.world_size > 1:
                # One full copy per rank, on this rank's GPU.
                kwargs["device_map"] = {"": self.ctx.local_rank}
            else:
                kwargs["device_map"] = "auto"
        self._phase("reading weights")
        self.model = AutoModelForCausalLM.from_pretrained(str(self.model_dir.path), **kwargs).eval()
        if self.ctx.device_type == "cuda":
            self.input_device = torch.device("cuda", self.ctx.local_rank if self.ctx.world_size > 1 else 0)
        else:
            self.input_device = torch.device("cpu")
        self._dtype = str(dtype).replace("torch.", "")

    def describe(self) -> dict[str, Any]:
        return {"dtype": getattr(self, "_dtype", None), "device": str(self.input_device)}
