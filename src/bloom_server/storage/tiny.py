"""The embedded default model: a small BLOOM checkpoint and a byte-level BPE tokenizer, built locally.

Nothing is downloaded. The tokenizer is trained with `tokenizers` on text that ships with Python itself (docstrings
of standard-library modules), the weights are seeded random; the result is a real checkpoint directory (config.json,
safetensors, tokenizer.json) loaded through the same code path as real weights.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # BLOOM's ids 0..3
_CORPUS_MODULES = (
    "argparse", "asyncio", "collections", "csv", "datetime", "decimal", "email", "functools", "http.client",
    "inspect", "itertools", "json", "logging", "os", "pathlib", "pickle", "random", "re", "shutil", "socket",
    "sqlite3", "statistics", "string", "subprocess", "tarfile", "textwrap", "threading", "unittest",
    "urllib.parse", "uuid", "zipfile",
)  # fmt: skip
TINY_FORMAT = 2  # bump when the recipe changes, so cached copies are rebuilt


def corpus() -> list[str]:
    """English text from the standard library's own docstrings: the same on every machine with this Python."""
    import importlib
    import inspect

    texts: list[str] = []
    for name in _CORPUS_MODULES:
        mod = importlib.import_module(name)
        for obj in [mod, *vars(mod).values()]:
            doc = inspect.getdoc(obj) if (inspect.ismodule(obj) or inspect.isclass(obj) or callable(obj)) else None
            if doc:
                texts.extend(p.strip() for p in doc.split("\n\n") if len(p.strip()) > 20)
    return texts


CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def train_tokenizer(out_dir: Path, vocab_size: int = 2048) -> None:
    """Byte-level BPE like BLOOM's, with its special tokens at its ids; writes tokenizer.json and the HF configs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "BloomTokenizerFast",
                "unk_token": "<unk>",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "pad_token": "<pad>",
                "padding_side": "left",
                "add_prefix_space": False,
                "model_max_length": 2048,
                # BLOOM has no chat format of its own; this plain one lets every route work on the embedded model.
                "chat_template": CHAT_TEMPLATE,
            },
            indent=2,
        )
    )
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, indent=2)
    )


def build_tiny_model(
    out_dir: Path, *, vocab_size: int = 2048, hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0
) -> Path:
    """Write a seeded random BLOOM checkpoint with a trained tokenizer to out_dir (atomically: built aside, renamed)."""
    import torch
    from transformers import BloomConfig, BloomForCausalLM

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out_dir.parent))
    os.chmod(tmp, 0o755)
    try:
        train_tokenizer(tmp, vocab_size)
        config = BloomConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            n_layer=layers,
            n_head=heads,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
            # A wide init makes logits peaky, so greedy choices are far from ties and batching cannot flip them.
            initializer_range=0.5,
            torch_dtype="float32",
        )
        torch.manual_seed(seed)
        model = BloomForCausalLM(config).eval()
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "bloom_server_tiny.json").write_text(json.dumps({"format": TINY_FORMAT, "seed": seed}))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def tiny_dir(home: str | None = None) -> Path:
    """Where the embedded model is kept: under `home` (the home setting, BLOOM_HOME, which the caller passes: storage
    reads no settings), else ~/.cache/bloom-server."""
    return Path(home or os.path.join(os.path.expanduser("~"), ".cache", "bloom-server")) / "tiny-bloom"


def ensure_tiny_model(path: Path | None = None) -> Path:
    """The embedded model's directory (default: tiny_dir()), built on first use (a few seconds on one core)."""
    path = Path(path) if path else tiny_dir()
    stamp = path / "bloom_server_tiny.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("format") == TINY_FORMAT:
        return path
    log.info("building the embedded tiny BLOOM model in %s", path)
    return build_tiny_model(path)
