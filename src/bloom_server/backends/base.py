"""The backend contract, and the shared generate/forward code for backends that hold a transformers-style model."""

from __future__ import annotations

import abc
import logging
from typing import TYPE_CHECKING, Any

from bloom_server.types import FinishReason, ForwardBatch, GenerateBatch, GenerateOutput, RankContext

if TYPE_CHECKING:
    import torch

    from bloom_server.model_dir import ModelDir
    from bloom_server.settings import Settings

log = logging.getLogger(__name__)


class Backend(abc.ABC):
    """Runs on every rank. `load()` once, then `generate`/`forward_nll` with the same batch on every rank, in lockstep."""

    name: str = "?"

    def __init__(self, settings: "Settings", model_dir: "ModelDir", ctx: RankContext):
        self.settings = settings
        self.model_dir = model_dir
        self.ctx = ctx

    @abc.abstractmethod
    def load(self) -> None:
        """Build the model on this rank's devices. Raise ConfigError/ModelDirError for what the operator must fix."""

    @abc.abstractmethod
    def generate(self, batch: GenerateBatch) -> GenerateOutput: ...

    @abc.abstractmethod
    def forward_nll(self, batch: ForwardBatch) -> float: ...

    def describe(self) -> dict[str, Any]:
        """Facts for /info: dtype actually used, devices, engine limits."""
        return {}


class TransformersModelBackend(Backend):
    """A backend whose loaded object has transformers' `generate()` and `forward()`. Subclasses set `self.model`
    and `self.input_device` in `load()`."""

    model: Any = None
    input_device: "torch.device | str" = "cpu"

    def extra_generate_kwargs(self) -> dict[str, Any]:
        return {}

    def generate(self, batch: GenerateBatch) -> GenerateOutput:
        import torch

        torch.manual_seed(batch.seed)
        input_ids, attention_mask = pad_left(batch.input_ids, batch.pad_token_id, self.input_device)
        kwargs = {"pad_token_id": batch.pad_token_id, "eos_token_id": batch.eos_token_id}
        kwargs.update(batch.params.as_dict())
        kwargs.update(self.extra_generate_kwargs())
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max(batch.max_new_tokens),
                **kwargs,
            )
        new_tokens = out[:, input_ids.shape[1] :].tolist()
        eos = kwargs.get("eos_token_id")
        eos_ids = set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())
        return cut_rows(new_tokens, batch.max_new_tokens, eos_ids)

    def forward_nll(self, batch: ForwardBatch) -> float:
        import torch

        rows = [c + r for c, r in zip(batch.conditioning_ids, batch.response_ids)]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), batch.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, (cond, resp) in enumerate(zip(batch.conditioning_ids, batch.response_ids)):
            n = len(cond) + len(resp)
            ids[i, :n] = torch.tensor(cond + resp)
            mask[i, :n] = 1
            labels[i, len(cond) : n] = torch.tensor(resp)
        with torch.inference_mode():
            logits = self.model(
                input_ids=ids.to(self.input_device), attention_mask=mask.to(self.input_device)
            ).logits.float()
        # Token t is predicted from position t-1: shift by one. Mean over every response token of the batch.
        logits = logits[:, :-1].reshape(-1, logits.shape[-1])
        target = labels[:, 1:].reshape(-1).to(logits.device)
        return float(torch.nn.functional.cross_entropy(logits, target, ignore_index=-100))


def pad_left(rows: tuple[tuple[int, ...], ...], pad_id: int, device: Any) -> "tuple[torch.Tensor, torch.Tensor]":
    """Rows of different lengths -> [batch, max_len] ids and mask, padded on the left (decoder-only generation)."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def cut_rows(new_tokens: list[list[int]], max_new: tuple[int, ...], eos_ids: set[int]) -> GenerateOutput:
    """Cut each row after its first EOS (kept) or at its own max_new_tokens; the rest is batch padding."""
    rows: list[tuple[int, ...]] = []
    reasons: list[FinishReason] = []
    for toks, limit in zip(new_tokens, max_new):
        toks = toks[:limit]
        reason = FinishReason.LENGTH if len(toks) >= limit else FinishReason.TIME
        for j, t in enumerate(toks):
            if t in eos_ids:
                toks, reason = toks[: j + 1], FinishReason.EOS
                break
        rows.append(tuple(toks))
        reasons.append(reason)
    return GenerateOutput(tuple(rows), tuple(reasons))


def torch_dtype(name: str, device_type: str) -> "torch.dtype":
    """Map a dtype setting to torch. 'auto': fp16 on GPU, fp32 on CPU. int8 loads fp16 weights (quantized later)."""
    import torch

    if name == "auto":
        return torch.float16 if device_type == "cuda" else torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "int8": torch.float16}[name]
