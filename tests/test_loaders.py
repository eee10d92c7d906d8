"""The loader setting (BLOOM_LOADER): which read path brings the fast backend's weights to the device. The selection
and its refusals (backends/fast_loader.py), and each field loader that runs on a CPU (fast/loaders.py) loading the
tiny model's layouts (plain checkpoint at one and two ranks, the pre-sharded files) into tensors equal to the builtin
path's, with load progress reaching the total."""

from __future__ import annotations

import logging

import pytest

torch = pytest.importorskip("torch")

from bloom_server.backends import fast_loader
from bloom_server.errors import ConfigError
from bloom_server.fast.loaders import FIELD_LOADERS
from bloom_server.fast.shapes import BloomShape
from bloom_server.fast.tp import TPGroup
from bloom_server.fast.weights import from_checkpoint, iter_tensors
from bloom_server.progress import LoadProgress
from bloom_server.settings import load_settings

CPU_LOADERS = [n for n, f in FIELD_LOADERS.items() if not f.cuda_only]


def installed_as(monkeypatch, *names):
    monkeypatch.setattr(fast_loader, "installed", lambda name: name in names)


# ------------------------------------------------------------------------------------------------- the selection


def test_builtin_and_auto_run_the_builtin_path_until_a_measurement_names_another():
    assert fast_loader.choose("builtin", cuda=True, source="whole") == "builtin"
    assert fast_loader.AUTO_LOADER == "builtin"
    assert fast_loader.choose("auto", cuda=True, source="whole") == "builtin"
    assert load_settings().loader == "auto"


def test_auto_takes_the_measured_loader_where_it_can_run_and_falls_back_with_a_log_line(monkeypatch, caplog):
    monkeypatch.setattr(fast_loader, "AUTO_LOADER", "instanttensor")
    installed_as(monkeypatch, "instanttensor")
    assert fast_loader.choose("auto", cuda=True, source="presharded") == "instanttensor"
    with caplog.at_level(logging.INFO, logger="bloom_server.backends.fast_loader"):
        assert fast_loader.choose("auto", cuda=False, source="presharded") == "builtin"
    assert "BLOOM_LOADER=auto" in caplog.text and "CUDA devices only" in caplog.text
    installed_as(monkeypatch)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="bloom_server.backends.fast_loader"):
        assert fast_loader.choose("auto", cuda=True, source="whole") == "builtin"
    assert "instanttensor is not installed" in caplog.text


@pytest.mark.parametrize(
    ("name", "have", "cuda", "source", "why"),
    [
        ("fastsafetensors", (), True, "whole", "fastsafetensors is not installed"),
        ("runai", (), True, "whole", "runai-model-streamer is not installed"),
        ("instanttensor", ("instanttensor",), False, "whole", "CUDA devices only"),
        ("fastsafetensors", ("fastsafetensors",), True, "pickle", "pickled"),
    ],
)
def test_a_named_loader_that_cannot_run_here_is_refused_naming_the_setting(monkeypatch, name, have, cuda, source, why):
    installed_as(monkeypatch, *have)
    with pytest.raises(ConfigError, match=rf"BLOOM_LOADER={name}: .*{why}"):
        fast_loader.choose(name, cuda=cuda, source=source)


def test_a_named_loader_that_can_run_is_chosen(monkeypatch):
    installed_as(monkeypatch, *FIELD_LOADERS)
    for name in FIELD_LOADERS:
        assert fast_loader.choose(name, cuda=True, source="presharded") == name


def test_the_setting_is_case_blind_takes_the_library_name_and_refuses_others(monkeypatch):
    from pydantic import ValidationError

    monkeypatch.setenv("BLOOM_LOADER", "RunAI_Streamer")
    assert load_settings().loader == "runai"
    monkeypatch.setenv("BLOOM_LOADER", "FastSafetensors")
    assert load_settings().loader == "fastsafetensors"
    monkeypatch.setenv("BLOOM_LOADER", "kvikio")
    with pytest.raises(ValidationError):
        load_settings()


def test_serve_refuses_a_loader_that_is_not_installed_before_the_port_opens(tiny_model_dir, monkeypatch, caplog):
    from bloom_server.serve import serve

    installed_as(monkeypatch)
    settings = load_settings(backend="fast", model=str(tiny_model_dir), loader="fastsafetensors")
    assert serve(settings) == 2
    assert "BLOOM_LOADER=fastsafetensors: fastsafetensors is not installed" in caplog.text


# ------------------------------------------------------------------------------------------- the field loaders


def _equal(a, b) -> None:
    ta, tb = list(iter_tensors(a)), list(iter_tensors(b))
    assert len(ta) == len(tb) > 0
    for x, y in zip(ta, tb):
        assert x.dtype == y.dtype and x.shape == y.shape and x.device == y.device
        assert torch.equal(x, y)
    assert (a.vocab_start, a.vocab_size) == (b.vocab_start, b.vocab_size)


@pytest.fixture(scope="module")
def presharded(tiny_model_dir, tmp_path_factory):
    from bloom_server.fast.preshard import preshard

    out = tmp_path_factory.mktemp("presharded") / "tp2"
    preshard(str(tiny_model_dir), 2, out, log=lambda _: None)
    return out


@pytest.mark.parametrize("name", CPU_LOADERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_field_loader_gives_the_builtin_paths_tensors_for_one_rank(tiny_model_dir, name, dtype):
    pytest.importorskip(FIELD_LOADERS[name].module)
    shape = BloomShape.from_dir(tiny_model_dir)
    progress = LoadProgress()
    got = from_checkpoint(tiny_model_dir, shape, dtype=dtype, progress=progress, loader=name)
    _equal(got, from_checkpoint(tiny_model_dir, shape, dtype=dtype))
    assert progress.total_bytes > 0 and progress.loaded_bytes == progress.total_bytes
    assert progress.timings["field loader read, s"] >= 0


@pytest.mark.parametrize("name", CPU_LOADERS)
def test_a_field_loader_honours_tensor_parallel_shards_of_a_plain_and_a_presharded_checkpoint(
    tiny_model_dir, presharded, name
):
    pytest.importorskip(FIELD_LOADERS[name].module)
    shape = BloomShape.from_dir(tiny_model_dir)
    for rank in range(2):
        tp = TPGroup(rank, 2)
        want = from_checkpoint(tiny_model_dir, shape, tp, dtype=torch.float32)
        for source in (tiny_model_dir, presharded):
            progress = LoadProgress()
            got = from_checkpoint(source, shape, tp, dtype=torch.float32, progress=progress, loader=name)
            _equal(got, want)
            assert progress.loaded_bytes == progress.total_bytes > 0


@pytest.mark.parametrize("name", CPU_LOADERS)
def test_the_prefetch_started_before_torch_is_closed_as_the_field_loader_starts(tiny_model_dir, name):
    pytest.importorskip(FIELD_LOADERS[name].module)
    from bloom_server.storage.prefetch import start_prefetch

    progress = LoadProgress()
    ahead = start_prefetch(tiny_model_dir, rank=0, world=1, threads=2, chunk_bytes=4096, progress=progress)
    assert ahead is not None
    shape = BloomShape.from_dir(tiny_model_dir)
    got = from_checkpoint(tiny_model_dir, shape, dtype=torch.float32, progress=progress, loader=name)
    _equal(got, from_checkpoint(tiny_model_dir, shape, dtype=torch.float32))
    assert ahead.state in ("finished", "closed")
    assert "prefetched before the field loader started, GB" in progress.timings


# ------------------------------------------------------------------------------- the prefetch and the field loader


def _serve_prefetch(tiny_model_dir, loader: str) -> LoadProgress:
    """What serve's before-torch step does about the prefetch with this loader setting."""
    from bloom_server.backends.fast_coldstart import start_prefetch
    from bloom_server.storage.model_dir import resolve_model_dir

    progress = LoadProgress()
    start_prefetch(load_settings(backend="fast", loader=loader), resolve_model_dir(str(tiny_model_dir)), progress)
    return progress


def test_the_loader_is_planned_before_torch_as_the_load_will_choose_it(tiny_model_dir, monkeypatch):
    from bloom_server.fast.coldstart import precompile
    from bloom_server.storage.model_dir import resolve_model_dir

    md = resolve_model_dir(str(tiny_model_dir))

    def planned(loader: str) -> str:
        return fast_loader.planned(load_settings(backend="fast", loader=loader), md, 0, 1)

    installed_as(monkeypatch, "instanttensor", "fastsafetensors")
    monkeypatch.setattr(precompile, "gpu_likely", lambda: True)
    assert [planned(x) for x in ("instanttensor", "fastsafetensors", "builtin", "auto")] == [
        "instanttensor", "fastsafetensors", "builtin", "builtin"
    ]  # fmt: skip
    monkeypatch.setattr(precompile, "gpu_likely", lambda: False)
    assert planned("instanttensor") == "builtin"  # CUDA only: refused before the port opens, never a field read
    installed_as(monkeypatch)
    assert planned("fastsafetensors") == "builtin"


def test_with_a_field_loader_chosen_no_prefetch_starts_and_the_library_reads_alone(tiny_model_dir, monkeypatch):
    from safetensors import safe_open

    from bloom_server.fast import weights

    installed_as(monkeypatch, "runai")  # a field loader that runs on a CPU; its read is the fake below
    progress = _serve_prefetch(tiny_model_dir, "runai")
    assert progress.prefetcher is None and progress.phase == "starting" and progress.prefetched_bytes == 0
    seen = []

    def fake_stream(name, paths, names, device, info=None):
        seen.append((name, progress.prefetcher, progress.prefetched_bytes))  # what reads the disk as it starts
        for path in paths:
            with safe_open(str(path), framework="pt") as f:
                for k in f.keys():
                    if k in names:
                        yield k, f.get_tensor(k)

    monkeypatch.setattr(weights, "stream", fake_stream)
    shape = BloomShape.from_dir(tiny_model_dir)
    got = from_checkpoint(tiny_model_dir, shape, dtype=torch.float32, progress=progress, loader="runai")
    _equal(got, from_checkpoint(tiny_model_dir, shape, dtype=torch.float32))
    assert seen == [("runai", None, 0)]
    assert progress.timings["prefetched before the field loader started, GB"] == 0
    assert progress.loaded_bytes == progress.total_bytes > 0


@pytest.mark.parametrize("setting", ["builtin", "auto"])
def test_the_builtin_path_still_follows_the_prefetch_and_notes_when_it_finished(tiny_model_dir, setting):
    progress = _serve_prefetch(tiny_model_dir, setting)
    ahead = progress.prefetcher
    assert ahead is not None and progress.phase == "prefetching"
    ahead.join(30)
    assert ahead.state == "finished" and progress.prefetched_bytes > 0
    assert (
        progress.timings["prefetch finished, s after process start"]
        >= (progress.timings["prefetch started, s after process start"])
    )
    shape = BloomShape.from_dir(tiny_model_dir)
    got = from_checkpoint(tiny_model_dir, shape, dtype=torch.float32, progress=progress)
    _equal(got, from_checkpoint(tiny_model_dir, shape, dtype=torch.float32))
    assert progress.timings["chunks the loader read from disk itself"] == 0


@pytest.mark.parametrize("name", CPU_LOADERS)
def test_the_fast_backend_loads_through_the_setting(tiny_model_dir, name, caplog):
    pytest.importorskip(FIELD_LOADERS[name].module)
    from bloom_server.backends.fast import FastBackend
    from bloom_server.runtime.protocol import GenerateBatch
    from bloom_server.storage.model_dir import resolve_model_dir
    from bloom_server.types import RankContext, SamplingParams

    md = resolve_model_dir(str(tiny_model_dir))
    outs = []
    for loader in ("builtin", name):
        s = load_settings(backend="fast", loader=loader, max_input_length=16, max_total_tokens=48, max_batch_size=2)
        b = FastBackend(s, md, RankContext())
        b.progress = LoadProgress()
        with caplog.at_level(logging.INFO, logger="bloom_server.backends.fast"):
            b.load()
        assert f"{loader} loader" in caplog.text
        assert b.progress.loaded_bytes == b.progress.total_bytes > 0
        assert b.progress.timings["reading weights from, s after process start"] > 0
        batch = GenerateBatch(((5, 17, 99, 4),), (6,), SamplingParams.from_dict({}), seed=0, pad_token_id=3,
                              eos_token_id=2)  # fmt: skip
        outs.append(b.generate(batch))
    assert outs[0] == outs[1]
