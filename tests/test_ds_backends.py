"""The DeepSpeed backends on a CPU (CI has no DeepSpeed and no GPU): what they refuse, and when; what they report;
the random-checkpoint script; the pre-sharded directory post-processing; the tied-head fix. GPU-only tests are marked
`gpu` and skip without CUDA (scripts/gpu/check.sh runs the full comparison on a GPU)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from bloom_server.backends import create_backend
from bloom_server.backends import ds_inference as dsi
from bloom_server.backends import ds_zero as dsz
from bloom_server.errors import ConfigError, ModelDirError
from bloom_server.settings import load_settings
from bloom_server.storage.model_dir import ModelDir
from bloom_server.types import RankContext

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench" / "make_random_bloom.py"
GPU = RankContext(rank=0, world_size=1, local_rank=0, device_type="cuda")


def _script_module():
    spec = importlib.util.spec_from_file_location("make_random_bloom", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rb") / "tiny"
    subprocess.run([sys.executable, str(SCRIPT), str(out), "--shape", "tiny", "--seed", "3"], check=True, cwd=ROOT)
    return out


def _hf_dir(path: Path) -> ModelDir:
    return ModelDir(path=path, layout="hf", model_id="m")


def _presharded_dir(tmp_path: Path, dtype: str = "float16", tp: int = 1) -> ModelDir:
    cfg = {"type": "BLOOM", "checkpoints": {"non_tp": ["non-tp.pt"], "tp": ["tp_00_00.pt"]}, "version": 1.0,
           "parallelization": "tp", "tp_size": tp, "dtype": dtype}  # fmt: skip
    (tmp_path / "ds_inference_config.json").write_text(json.dumps(cfg))
    return ModelDir(path=tmp_path, layout="ds_presharded", model_id="m")


@pytest.fixture
def no_deepspeed(monkeypatch):
    """`import deepspeed` fails, whether or not it is installed here."""
    monkeypatch.setitem(sys.modules, "deepspeed", None)


@pytest.fixture
def forbid_deepspeed(monkeypatch):
    """Any attempt to import deepspeed fails the test: the refusal must come first."""

    def boom(backend):
        raise AssertionError(f"{backend} imported deepspeed before refusing the settings")

    monkeypatch.setattr(dsi, "import_deepspeed", boom)
    monkeypatch.setattr(dsz, "import_deepspeed", boom)


# --- refusals -------------------------------------------------------------------------------------------------------


def test_bf16_with_kernel_injection_is_refused_before_any_model_work(forbid_deepspeed, tmp_path):
    missing = ModelDir(path=tmp_path / "does-not-exist", layout="hf", model_id="m")  # reading it would fail otherwise
    backend = dsi.DSInferenceBackend(load_settings(backend="ds_inference", dtype="bf16"), missing, GPU)
    with pytest.raises(ConfigError, match="bf16.*kernel injection") as e:
        backend.load()
    assert "--dtype fp16" in str(e.value) and "--no-kernel-inject" in str(e.value)
    assert backend.model is None


def test_bf16_without_kernel_injection_passes_validation(forbid_deepspeed, tmp_path):
    settings = load_settings(backend="ds_inference", dtype="bf16", kernel_inject=False)
    backend = dsi.DSInferenceBackend(settings, _hf_dir(tmp_path), GPU)
    backend.validate()  # no error
    with pytest.raises(AssertionError, match="imported deepspeed"):
        backend.load()  # validation passed, so it went on to import deepspeed


@pytest.mark.parametrize("cls, backend", [(dsi.DSInferenceBackend, "ds_inference"), (dsz.DSZeroBackend, "ds_zero")])
def test_missing_deepspeed_is_a_config_error_with_the_install_hint(no_deepspeed, tmp_path, cls, backend):
    b = cls(load_settings(backend=backend, dtype="fp16"), _hf_dir(tmp_path), GPU)
    with pytest.raises(ConfigError) as e:
        b.load()
    assert "pip install 'bloom-server[deepspeed]'" in str(e.value)
    assert backend in str(e.value)


@pytest.mark.parametrize("cls, backend", [(dsi.DSInferenceBackend, "ds_inference"), (dsz.DSZeroBackend, "ds_zero")])
def test_without_a_gpu_the_error_says_so(monkeypatch, tmp_path, cls, backend):
    monkeypatch.setitem(sys.modules, "deepspeed", types.ModuleType("deepspeed"))  # "installed"
    cpu = RankContext(device_type="cpu")
    b = cls(load_settings(backend=backend, dtype="fp16"), _hf_dir(tmp_path), cpu)
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        b.load()


def test_presharded_checkpoint_needs_kernel_injection(forbid_deepspeed, tmp_path):
    settings = load_settings(backend="ds_inference", dtype="fp16", kernel_inject=False)
    with pytest.raises(ConfigError, match="pre-sharded.*kernel injection"):
        dsi.DSInferenceBackend(settings, _presharded_dir(tmp_path), GPU).load()


def test_int8_checkpoint_rules(forbid_deepspeed, tmp_path):
    int8_tp4 = _presharded_dir(tmp_path, dtype="int8", tp=4)
    fp16 = load_settings(backend="ds_inference", dtype="fp16")
    with pytest.raises(ConfigError, match="int8 weights"):
        dsi.DSInferenceBackend(fp16, int8_tp4, RankContext(world_size=4, device_type="cuda")).load()
    auto = load_settings(backend="ds_inference", dtype="auto")
    b = dsi.DSInferenceBackend(auto, int8_tp4, RankContext(world_size=2, device_type="cuda"))
    assert b.resolved_dtype() == "int8"  # auto follows the checkpoint
    with pytest.raises(ConfigError, match="tp_size=4.*2 ranks"):
        b.load()
    dsi.DSInferenceBackend(auto, int8_tp4, RankContext(world_size=4, device_type="cuda")).validate()


def test_int8_is_refused_before_loading_when_deepspeed_lacks_it(monkeypatch, tmp_path):
    import torch

    accel = types.SimpleNamespace(supported_dtypes=lambda: [torch.float32, torch.float16, torch.bfloat16])  # 0.19.8
    fake = types.ModuleType("deepspeed")
    fake.__version__ = "0.19.8"
    fake_accel = types.ModuleType("deepspeed.accelerator")
    fake_accel.get_accelerator = lambda: accel
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    monkeypatch.setitem(sys.modules, "deepspeed.accelerator", fake_accel)
    monkeypatch.setattr(dsi, "require_cuda", lambda backend, ctx: None)

    def no_model_work(*a, **k):
        raise AssertionError("went on past the int8 check")

    monkeypatch.setattr(dsi, "ensure_distributed", no_model_work)
    b = dsi.DSInferenceBackend(load_settings(backend="ds_inference", dtype="int8"), _hf_dir(tmp_path), GPU)
    with pytest.raises(ConfigError, match=r"int8 is not supported by the installed DeepSpeed \(0.19.8\)"):
        b.load()
    # A DeepSpeed whose accelerator lists int8 goes on to load.
    accel.supported_dtypes = lambda: [torch.float16, torch.int8]
    with pytest.raises(AssertionError, match="went on past"):
        b.load()


def test_int8_needs_kernel_injection(forbid_deepspeed, tmp_path):
    settings = load_settings(backend="ds_inference", dtype="int8", kernel_inject=False)
    with pytest.raises(ConfigError, match="int8 needs DeepSpeed kernel injection"):
        dsi.DSInferenceBackend(settings, _hf_dir(tmp_path), GPU).load()


def test_ds_zero_refusals(forbid_deepspeed, tmp_path):
    with pytest.raises(ConfigError, match="no int8"):
        dsz.DSZeroBackend(load_settings(backend="ds_zero", dtype="int8"), _hf_dir(tmp_path), GPU).load()
    with pytest.raises(ModelDirError, match="pre-sharded"):
        dsz.DSZeroBackend(load_settings(backend="ds_zero", dtype="fp16"), _presharded_dir(tmp_path), GPU).load()


# --- what they report -----------------------------------------------------------------------------------------------


def test_factory_and_describe(tmp_path):
    settings = load_settings(backend="ds_inference", dtype="auto", max_input_length=1000, max_new_tokens=100,
                             max_total_tokens=2048)  # fmt: skip
    b = create_backend(settings, _hf_dir(tmp_path), RankContext(world_size=8, device_type="cuda"))
    assert isinstance(b, dsi.DSInferenceBackend)
    d = b.describe()
    assert d["dtype"] == "fp16" and d["tp_size"] == 8 and d["max_tokens"] == 2048 and d["kernel_inject"] is True
    # Without max_total_tokens the engine is built for max input + max new tokens.
    b2 = create_backend(load_settings(backend="ds_inference", max_input_length=300, max_new_tokens=50, dtype="int8"),
                        _hf_dir(tmp_path), GPU)  # fmt: skip
    assert b2.describe()["max_tokens"] == 350 and b2.describe()["dtype"] == "int8"
    z = create_backend(load_settings(backend="ds_zero", dtype="bf16", cpu_offload=True), _hf_dir(tmp_path), GPU)
    assert isinstance(z, dsz.DSZeroBackend)
    assert z.describe()["dtype"] == "bf16" and z.describe()["cpu_offload"] is True


def test_ds_zero_synced_gpus_only_with_several_ranks(tmp_path):
    s = load_settings(backend="ds_zero", dtype="fp16")
    assert dsz.DSZeroBackend(s, _hf_dir(tmp_path), GPU).extra_generate_kwargs() == {}
    two = RankContext(rank=1, world_size=2, local_rank=1, device_type="cuda")
    assert dsz.DSZeroBackend(s, _hf_dir(tmp_path), two).extra_generate_kwargs() == {"synced_gpus": True}


def test_zero3_config():
    c = dsz.zero3_inference_config("fp16", hidden_size=1024, world_size=4, cpu_offload=False)
    assert c["zero_optimization"]["stage"] == 3 and "offload_param" not in c["zero_optimization"]
    assert c["fp16"]["enabled"] and not c["bf16"]["enabled"]
    assert c["train_batch_size"] == c["train_micro_batch_size_per_gpu"] * c["gradient_accumulation_steps"] * 4
    off = dsz.zero3_inference_config("bf16", hidden_size=1024, world_size=1, cpu_offload=True)
    assert off["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert off["bf16"]["enabled"] and not off["fp16"]["enabled"]


def test_importing_the_backends_imports_nothing_heavy():
    code = (
        "import sys, bloom_server.backends.ds_inference, bloom_server.backends.ds_zero\n"
        "bad = [m for m in ('torch', 'deepspeed', 'transformers', 'fastapi') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the random checkpoint script -----------------------------------------------------------------------------------


def test_make_random_bloom_tiny_is_a_servable_model_dir(tiny_dir):
    from bloom_server.storage.model_dir import resolve_model_dir

    md = resolve_model_dir(str(tiny_dir))
    assert md.layout == "hf" and md.path == tiny_dir
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["n_layer"], cfg["n_head"], cfg["vocab_size"]) == (64, 2, 4, 1024)
    assert cfg["torch_dtype"] == "float16" and cfg.get("tie_word_embeddings", True) is True
    assert list(tiny_dir.glob("*.safetensors"))


def test_tiny_checkpoint_loads_and_its_tokenizer_fits_the_embedding(tiny_dir):
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    tok = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    ids = tok.encode("DeepSpeed is a library for serving large models").ids
    assert ids and max(ids) < 1024
    assert [tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>", "<pad>")] == [0, 1, 2, 3]
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), torch_dtype=torch.float32)
    assert model.lm_head.weight is model.transformer.word_embeddings.weight  # tied, as BLOOM
    w = model.transformer.h[0].mlp.dense_h_to_4h.weight
    assert abs(float(w.detach().std()) - 0.02) < 0.003  # BLOOM's init, not nn.Linear's
    assert float(model.transformer.h[0].input_layernorm.weight.detach().min()) == 1.0
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 1024) and torch.isfinite(logits).all()


def test_random_weights_are_seeded():
    mrb = _script_module()
    cfg = mrb.bloom_config("tiny", layers=1, dtype="fp32")
    a = mrb.random_model(cfg, "fp32", seed=1).state_dict()
    b = mrb.random_model(cfg, "fp32", seed=1).state_dict()
    c = mrb.random_model(cfg, "fp32", seed=2).state_dict()
    key = "transformer.h.0.self_attention.query_key_value.weight"
    assert (a[key] == b[key]).all() and not (a[key] == c[key]).all()


def test_shapes_of_the_published_models():
    mrb = _script_module()
    c = mrb.bloom_config("176b", layers=2)
    assert (c.hidden_size, c.n_layer, c.n_head, c.vocab_size) == (14336, 2, 112, 250880)
    c = mrb.bloom_config("7b1")
    assert (c.hidden_size, c.n_layer, c.n_head) == (4096, 30, 32)
    assert mrb.bloom_config("560m").n_layer == 24


def test_presharded_without_a_gpu_launch_explains_the_launcher(tmp_path):
    r = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "m"), "--presharded-out", str(tmp_path / "ds"), "--tp", "2"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode != 0 and "deepspeed --num_gpus 2" in r.stderr
    assert not (tmp_path / "m").exists()  # refused before building anything


# --- writing the pre-sharded layout (the part that needs no GPU) ----------------------------------------------------


def test_finalize_presharded_dir_makes_it_servable_and_movable(tiny_dir, tmp_path):
    from bloom_server.storage.model_dir import resolve_model_dir

    out = tmp_path / "ds"
    out.mkdir()
    written = {"type": "bloom", "base_dir": str(out), "checkpoints": {"non_tp": ["non-tp.pt"], "tp": ["tp_00_00.pt"]},
               "version": 1.0, "parallelization": "tp", "tp_size": 1, "dtype": "float16"}  # fmt: skip
    (out / "ds_inference_config.json").write_text(json.dumps(written))
    dsi.finalize_presharded_dir(out, tiny_dir)
    cfg = json.loads((out / "ds_inference_config.json").read_text())
    assert "base_dir" not in cfg and cfg["checkpoints"] == written["checkpoints"]
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (tiny_dir / name).read_bytes()
    md = resolve_model_dir(str(out))
    assert md.layout == "ds_presharded"
    assert dsi.DSInferenceBackend(load_settings(backend="ds_inference"), md, GPU).resolved_dtype() == "fp16"


# --- the output embedding of a meta-built model (the "Half != float" pitfall) ----------------------------------------


def test_tied_head_is_hidden_from_deepspeeds_loader_and_computes_the_same(tiny_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), torch_dtype=torch.float32).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        before = model(ids).logits
    dsi.tie_head_for_meta_load(model)
    # DeepSpeed's loader replaces nn.Linear children (with an fp32 copy): the head must no longer be one...
    assert not isinstance(model.lm_head, torch.nn.Linear)
    # ...and still read the embedding's own tensor, so DeepSpeed's "meta lm_head -> loaded embedding" tie applies.
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    # What DeepSpeed does after loading: point the head at the freshly loaded embedding.
    loaded = torch.nn.Parameter(torch.randn_like(model.transformer.word_embeddings.weight))
    model.transformer.word_embeddings.weight = loaded
    model.lm_head.weight = loaded
    with torch.no_grad():
        out = model(ids).logits
    assert torch.isfinite(out).all() and not torch.equal(out, before)


def test_tied_head_on_the_meta_device():
    import torch

    mrb = _script_module()
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(mrb.bloom_config("tiny"), torch_dtype=torch.float16)
    dsi.tie_head_for_meta_load(model)
    assert model.lm_head.weight.is_meta and model.lm_head.weight.dtype == torch.float16
    assert not isinstance(model.lm_head, torch.nn.Linear)


def test_untied_heads_are_left_alone(tiny_dir):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(tiny_dir), tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg)
    dsi.tie_head_for_meta_load(model)
    assert isinstance(model.lm_head, torch.nn.Linear)


def test_restore_head_dtype_casts_a_head_that_came_back_fp32(tiny_dir):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(tiny_dir), tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float16)
    model.lm_head.float()  # what DeepSpeed 0.19.8's LinearLayer does to an untied head
    dsi.restore_head_dtype(model, torch.float16)
    assert model.lm_head.weight.dtype == torch.float16
    assert model.transformer.word_embeddings.weight.dtype == torch.float16


# --- on a GPU (skipped in CI) ---------------------------------------------------------------------------------------


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kernel_inject", [True, False])
def test_ds_inference_matches_plain_transformers_on_gpu(tiny_dir, kernel_inject):
    pytest.importorskip("deepspeed")
    import torch
    from transformers import AutoModelForCausalLM

    from bloom_server.runtime.protocol import GenerateBatch
    from bloom_server.types import SamplingParams

    settings = load_settings(backend="ds_inference", dtype="fp16", kernel_inject=kernel_inject)
    b = dsi.DSInferenceBackend(settings, _hf_dir(tiny_dir), GPU)
    b.load()
    rows = ((5, 6, 7, 8), (9, 10))
    batch = GenerateBatch(rows, (20, 20), SamplingParams.from_dict({"min_new_tokens": 20}), 0, 3, None)
    got = b.generate(batch).token_ids
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_dir), torch_dtype=torch.float16).cuda().eval()
    for row, out in zip(rows, got):
        want = ref.generate(torch.tensor([row]).cuda(), max_new_tokens=20, min_new_tokens=20, do_sample=False)
        assert list(out) == want[0, len(row) :].tolist()


# --- DeepSpeed's workspace: sized at the configured limits by the first forward ----------------------------------


class _RecordingEngine:
    """Stands in for DeepSpeed's InferenceEngine around a real (tiny) transformers model: records each generate's
    shape, optionally failing as DeepSpeed's fused QKV GEMM does on a workspace that is too small."""

    def __init__(self, model, fail: str | None = None):
        self.module, self.calls, self.fail = model, [], fail

    def generate(self, input_ids, attention_mask, max_new_tokens, min_new_tokens, **kwargs):
        self.calls.append((tuple(input_ids.shape), max_new_tokens, min_new_tokens, int(attention_mask.sum())))
        if self.fail:
            raise RuntimeError(self.fail)
        if not hasattr(self.module, "generate"):  # a shape too large to run on a CPU: recorded only
            return None
        return self.module.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            **kwargs,
        )


def _tiny_model(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_dir)).eval()


@pytest.mark.parametrize(
    "limits, expect",
    [
        (dict(max_batch_size=16, max_input_length=512, max_new_tokens=100), ((16, 512), 100)),  # the 176B overlay's
        (dict(max_batch_size=3, max_input_length=24, max_new_tokens=40, max_total_tokens=40), ((3, 24), 16)),
    ],
)
def test_the_first_forward_is_a_generate_at_the_configured_limits(tiny_dir, tmp_path, limits, expect):
    """Every row of the largest batch, the longest prompt, run to the max total tokens: the shape DeepSpeed sizes its
    workspace for (a real transformers generate here, on the CPU)."""
    import torch

    b = dsi.DSInferenceBackend(load_settings(backend="ds_inference", dtype="fp16", **limits), _hf_dir(tiny_dir), GPU)
    if expect[0][0] * (expect[0][1] + expect[1]) > 2000:  # the overlay's shape: recorded, not run on a CPU
        b.model = _RecordingEngine(types.SimpleNamespace(config=types.SimpleNamespace(vocab_size=250880)))
    else:
        b.model = _RecordingEngine(_tiny_model(tiny_dir))
    b.input_device = torch.device("cpu")
    b.reserve_at_limits()
    ((shape, new, min_new, attended),) = b.model.calls
    assert (shape, new) == expect and min_new == new and attended == shape[0] * shape[1]


def test_a_batch_deepspeed_cannot_hold_stops_the_start_naming_the_limits(tiny_dir):
    import torch

    settings = load_settings(
        backend="ds_inference", dtype="fp16", max_batch_size=4, max_input_length=30, max_new_tokens=10
    )
    b = dsi.DSInferenceBackend(settings, _hf_dir(tiny_dir), GPU)
    b.model = _RecordingEngine(
        _tiny_model(tiny_dir),
        fail="The specified pointer resides on host memory and is not registered with any CUDA device.",
    )
    b.input_device = torch.device("cpu")
    with pytest.raises(ConfigError) as err:
        b.reserve_at_limits()
    msg = str(err.value)
    for part in (
        "--max-batch-size 4",
        "--max-input-length 30",
        "--max-total-tokens 40",
        "BLOOM_MAX_BATCH_SIZE",
        "resides on host memory",
    ):
        assert part in msg


def test_kernel_injection_asks_deepspeed_for_a_workspace_of_max_tokens_or_a_refusal(monkeypatch, tiny_dir):
    """min_tokens = max_tokens: DeepSpeed refuses a workspace smaller than the limit instead of shrinking it."""
    seen = {}

    class Stop(Exception):
        pass

    def init_inference(model, **kwargs):
        seen.update(kwargs)
        raise Stop

    fake = types.ModuleType("deepspeed")
    fake.init_inference = init_inference
    monkeypatch.setattr(dsi, "import_deepspeed", lambda backend: fake)
    monkeypatch.setattr(dsi, "require_cuda", lambda backend, ctx: None)
    monkeypatch.setattr(dsi, "ensure_distributed", lambda deepspeed, ctx: None)
    for inject, expect in ((True, 700), (False, None)):
        seen.clear()
        settings = load_settings(
            backend="ds_inference", dtype="fp16", max_input_length=600, max_new_tokens=100, kernel_inject=inject
        )
        with pytest.raises(Stop):
            dsi.DSInferenceBackend(settings, _hf_dir(tiny_dir), GPU).load()
        assert seen["max_tokens"] == 700 and seen.get("min_tokens") == expect
