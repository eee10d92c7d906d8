#!/usr/bin/env python3
"""Check the DeepSpeed backends against the hf backend on random-weight BLOOMs, on one GPU.

    python scripts/gpu/check.py all --work /tmp/gpu-check --out "$OUT"          # every check, then a table
    python scripts/gpu/check.py all --work /tmp/cpu-check --device cpu --cases hf --shape tiny   # script logic on CPU

Each check runs in its own process (a crash or a DeepSpeed sys.exit cannot stop the others; DeepSpeed keeps one
fused-kernel workspace per process) and writes a JSON result; the `all` command compares them with the reference and
prints a table. Per check:
- free-running greedy generation, 100 new tokens forced (min_new_tokens == max_new_tokens), each prompt alone and the
  four prompts as one left-padded batch, through the backend's own generate();
- forced decoding: the batch decodes along the reference's tokens while the raw logits of every step are kept, so
  the prompt forward and every KV-cache step are compared on equal inputs even where free-running tokens part
  (random weights put near-ties in reach of fp16 rounding); relative error ||a - b|| / ||b|| and argmax agreement;
- forward_nll on a few (conditioning, response) pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "bench"))
sys.path.insert(0, str(HERE.parents[1] / "src"))

PROMPTS = (
    "DeepSpeed is",
    "The quick brown fox jumps over the lazy dog because",
    "Once upon a time, in a land far away, there lived a",
    "Hello",
)
NEW_TOKENS = 100
SINGLES = 2  # prompts also generated alone (all of them run as one padded batch)
CASE_TIMEOUT_S = 300

# name -> (model, backend, options, compare with). Models: "main" (BLOOM's own init), "peaky" (wider init: outputs
# that do not just repeat the last token), "pre16"/"pre8" (pre-sharded layouts written by the *_write cases).
CASES: dict[str, dict] = {  # in the order they run: the most important first, in case time runs out
    "hf": dict(model="main", backend="hf"),
    "ds_kernel": dict(model="main", backend="ds_inference", ref="hf"),
    "ds_write_fp16": dict(model="main", backend="write", dtype="fp16", out="pre16", ref="hf"),
    "ds_presharded_fp16": dict(model="pre16", backend="ds_inference", ref="ds_write_fp16"),
    "ds_zero": dict(model="main", backend="ds_zero", ref="hf"),
    "ds_autotp": dict(model="main", backend="ds_inference", kernel_inject=False, ref="hf"),
    "hf_peaky": dict(model="peaky", backend="hf"),
    "ds_kernel_peaky": dict(model="peaky", backend="ds_inference", ref="hf_peaky"),
    "ds_write_int8": dict(model="main", backend="write", dtype="int8", out="pre8", ref="hf"),
    "ds_presharded_int8": dict(model="pre8", backend="ds_inference", dtype="int8", ref="ds_write_int8"),
    "hf_again": dict(model="main", backend="hf", ref="hf"),  # the reference's own run-to-run spread
}


# --- one check, in its own process ----------------------------------------------------------------------------------


def model_path(work: Path, model: str) -> Path:
    return work / "models" / model


def build_models(work: Path, shape: str, layers: int | None, peaky_layers: int, peaky_std: float, device: str) -> None:
    import make_random_bloom as mrb

    for name, kw in (
        ("main", dict(layers=layers, init_std=0.02)),
        ("peaky", dict(layers=peaky_layers, init_std=peaky_std)),
    ):
        path = model_path(work, name)
        if not (path / "config.json").is_file():
            t = time.time()
            mrb.write_hf_checkpoint(path, shape, dtype="fp16", seed=0, init_device=device, **kw)
            print(f"built {name}: {shape} {kw} in {time.time() - t:.1f}s", flush=True)


def open_model_dir(path: Path):
    from bloom_server.storage.model_dir import ModelDir, resolve_model_dir

    try:
        return resolve_model_dir(str(path))
    except Exception as e:  # noqa: BLE001 - a half-written project module must not stop the check
        print(f"resolve_model_dir failed ({e!r}); using the directory as it is", flush=True)
        layout = "ds_presharded" if (path / "ds_inference_config.json").is_file() else "hf"
        return ModelDir(path=path, layout=layout, model_id=path.name)


def make_backend(spec: dict, work: Path, device: str):
    from bloom_server.settings import load_settings
    from bloom_server.types import RankContext

    ctx = RankContext(rank=0, world_size=1, local_rank=0, device_type=device)
    dtype = spec.get("dtype", "fp16" if device == "cuda" else "fp32")
    path = model_path(work, spec["model"])
    if spec["backend"] == "write":
        from bloom_server.backends.ds_inference import write_presharded_checkpoint

        out = model_path(work, spec["out"])
        return write_presharded_checkpoint(path, out, ctx=ctx, dtype=dtype, max_tokens=1024), "write"
    settings = load_settings(
        backend=spec["backend"],
        dtype=dtype,
        kernel_inject=spec.get("kernel_inject", True),
        max_input_length=512,
        max_new_tokens=NEW_TOKENS,
        max_total_tokens=1024,
    )
    model_dir = open_model_dir(path)
    if spec["backend"] == "hf":
        try:
            from bloom_server.backends.hf import HFBackend as cls
        except ImportError:
            cls, via = None, "transformers"
        else:
            via = "bloom_server.backends.hf"
        if cls is None:
            cls = _plain_hf_backend()
        return cls(settings, model_dir, ctx), via
    from bloom_server.backends import create_backend

    return create_backend(settings, model_dir, ctx), spec["backend"]


def _plain_hf_backend():
    """Stand-in for the hf backend while it does not exist: transformers' from_pretrained on one device."""
    from bloom_server.backends.base import TransformersModelBackend

    class PlainHF(TransformersModelBackend):
        name = "hf"

        def load(self) -> None:
            import torch
            from transformers import AutoModelForCausalLM

            dtype = torch.float16 if self.ctx.device_type == "cuda" else torch.float32
            self.input_device = torch.device("cuda", 0) if self.ctx.device_type == "cuda" else torch.device("cpu")
            self.model = AutoModelForCausalLM.from_pretrained(str(self.model_dir.path), torch_dtype=dtype)
            self.model = self.model.to(self.input_device).eval()

    return PlainHF


def run_case(name: str, work: Path, device: str) -> dict:
    import torch
    from tokenizers import Tokenizer

    from bloom_server.runtime.protocol import ForwardBatch, GenerateBatch
    from bloom_server.types import SamplingParams

    spec = CASES[name]
    res: dict = {"case": name, "ok": False, "spec": spec}
    tok = Tokenizer.from_file(str(model_path(work, "main") / "tokenizer.json"))
    prompts = [tuple(tok.encode(p).ids) for p in PROMPTS]
    params = SamplingParams.from_dict({"do_sample": False, "min_new_tokens": NEW_TOKENS})

    def batch(rows):
        return GenerateBatch(
            input_ids=tuple(rows), max_new_tokens=(NEW_TOKENS,) * len(rows), params=params, seed=0,
            pad_token_id=3, eos_token_id=None,
        )  # fmt: skip

    t0 = time.time()
    backend, via = make_backend(spec, work, device)
    res["via"] = via
    if via != "write":
        backend.load()
    if device == "cuda":
        torch.cuda.synchronize()
    res["load_s"] = round(time.time() - t0, 2)
    res["versions"] = {
        m: sys.modules[m].__version__ for m in ("torch", "transformers", "deepspeed") if m in sys.modules
    }
    res["describe"] = backend.describe()

    # Free-running greedy: each prompt alone (timed), then all four as one padded batch.
    singles, times = [], []
    for row in prompts[:SINGLES]:
        t = time.time()
        singles.append(list(backend.generate(batch([row])).token_ids[0]))
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.time() - t)
    res["tokens_single"] = singles
    res["ms_per_step_bs1"] = round(1000 * min(times[1:] or times) / NEW_TOKENS, 2)  # first call warms up
    res["tokens_batch"] = [list(r) for r in backend.generate(batch(prompts)).token_ids]
    res["distinct_tokens"] = len({t for r in singles for t in r})

    # Forced decoding along the reference's batch tokens (or our own, for a reference), raw logits kept per step.
    ref = spec.get("ref")
    forced = json.loads((work / f"{ref}.json").read_text())["tokens_batch"] if ref else res["tokens_batch"]
    logits = forced_logits(backend, prompts, forced)  # [steps, batch, vocab] fp32 on CPU
    torch.save(logits, work / f"{name}.logits.pt")  # fp32: the comparison must not add rounding; others compare
    if ref:
        ref_logits = torch.load(work / f"{ref}.logits.pt").float()
        n = min(ref_logits.shape[0], logits.shape[0])
        a, b = logits[:n], ref_logits[:n]
        res["logits_rel_err"] = float((a - b).norm() / b.norm())
        res["logits_rel_err_step0"] = float((a[0] - b[0]).norm() / b[0].norm())
        res["argmax_agree"] = float((a.argmax(-1) == b.argmax(-1)).float().mean())

    fb = ForwardBatch(
        conditioning_ids=tuple(prompts[:3]), response_ids=tuple(tuple(r[:20]) for r in forced[:3]), pad_token_id=3
    )
    res["nll"] = backend.forward_nll(fb)
    res["ok"] = True
    return res


def forced_logits(backend, prompts, forced) -> torch.Tensor:
    """Decode the batch along given tokens through the model's own generate() (so its KV cache is the one in use),
    returning the raw logits of every step."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    from bloom_server.backends.base import pad_left

    ids, mask = pad_left(tuple(prompts), 3, backend.input_device)
    target = torch.tensor(forced, device=backend.input_device)  # [batch, steps]
    width = ids.shape[1]

    class Force(LogitsProcessor):
        def __call__(self, input_ids, scores):
            step = input_ids.shape[1] - width
            out = torch.full_like(scores, float("-inf"))
            out.scatter_(1, target[:, step : step + 1], 0.0)
            return out

    with torch.inference_mode():
        out = backend.model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=target.shape[1], min_new_tokens=target.shape[1],
            do_sample=False, pad_token_id=3, logits_processor=LogitsProcessorList([Force()]),
            output_logits=True, return_dict_in_generate=True, **backend.extra_generate_kwargs(),
        )  # fmt: skip
    got = out.sequences[:, width:]
    if not torch.equal(got, target):
        raise RuntimeError("forced decoding did not follow the forced tokens")
    return torch.stack([x.float().cpu() for x in out.logits])


def case_main(args) -> int:
    work = Path(args.work)
    try:
        res = run_case(args.name, work, args.device)
    except BaseException as e:  # noqa: BLE001 - SystemExit from DeepSpeed too: record it, the table says why
        res = {"case": args.name, "ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
        traceback.print_exc()
    (work / f"{args.name}.json").write_text(json.dumps(res))
    print(json.dumps({k: v for k, v in res.items() if not k.startswith("tokens")}), flush=True)
    return 0 if res["ok"] else 1


# --- every check, then the table ------------------------------------------------------------------------------------


def all_main(args) -> int:
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "cases.log"
    started = time.time()
    names = args.cases.split(",") if args.cases else list(CASES)
    if any(CASES[n]["model"] in ("main", "peaky") for n in names):
        build_models(work, args.shape, args.layers, args.peaky_layers, args.peaky_std, args.device)
    results = {}
    deadline = float(os.environ.get("GPU_CHECK_DEADLINE", "inf"))  # epoch seconds: skip what cannot finish
    with open(log_path, "a") as log:
        for name in names:
            left = deadline - time.time()
            if left < 40:
                results[name] = {"ok": False, "error": "not run: the device time set aside for the checks ran out"}
                print(f"[{name}] skipped (out of time)", flush=True)
                continue
            ref = CASES[name].get("ref")
            if ref and ref not in results:
                names_ran = ", ".join(results) or "none"
                print(f"[{name}] needs {ref}, which did not run (ran: {names_ran})", flush=True)
            t = time.time()
            log.write(f"\n===== {name} =====\n")
            log.flush()
            cmd = [sys.executable, __file__, "case", name, "--work", str(work), "--device", args.device]
            (work / f"{name}.json").unlink(missing_ok=True)
            try:
                limit = min(CASE_TIMEOUT_S, left - 10)
                subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=limit, check=False)
            except subprocess.TimeoutExpired:
                (work / f"{name}.json").write_text(
                    json.dumps({"case": name, "ok": False, "error": f"timed out after {limit:.0f}s"})
                )
            f = work / f"{name}.json"
            results[name] = (
                json.loads(f.read_text()) if f.is_file() else {"ok": False, "error": "no result (process died)"}
            )
            results[name]["wall_s"] = round(time.time() - t, 1)
            print(f"[{name}] {'ok' if results[name]['ok'] else 'FAILED'} in {results[name]['wall_s']}s", flush=True)
    for name, r in results.items():  # keep the wall time with the result, for the table command
        (work / f"{name}.json").write_text(json.dumps(r))
    print(summarize(results), flush=True)
    print(f"total {time.time() - started:.0f}s", flush=True)
    return 0


def table_main(args) -> int:
    """Every result in the work directory (from several `all` runs), in CASES order."""
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {n: json.loads((work / f"{n}.json").read_text()) for n in CASES if (work / f"{n}.json").is_file()}
    table = summarize(results)
    print(table, flush=True)
    (out / "summary.md").write_text(table + "\n")
    (out / "summary.json").write_text(json.dumps(results, indent=1))
    return 0


def compare_tokens(a: list[list[int]], b: list[list[int]]) -> str:
    same = sum(x == y for x, y in zip(a, b))
    firsts = [next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), None) for x, y in zip(a, b)]
    diverge = [f for f in firsts if f is not None]
    return f"{same}/{len(b)}" + (f" (first diff at step {min(diverge)})" if diverge else "")


def summarize(results: dict) -> str:
    head = (
        "| check | vs | ok | load s | ms/step bs1 | distinct | tokens bs1 same | tokens batch same | "
        "logits rel err (all / prompt) | argmax agree | nll (ref) |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in results.items():
        ref = CASES.get(name, {}).get("ref") or ""
        if not r.get("ok"):
            lines.append(f"| {name} | {ref} | FAIL: {r.get('error', '?')[:300]} |" + " |" * 8)
            continue
        rr = results.get(ref, {})
        same1 = compare_tokens(r["tokens_single"], rr["tokens_single"]) if rr.get("ok") else "-"
        sameb = compare_tokens(r["tokens_batch"], rr["tokens_batch"]) if rr.get("ok") else "-"
        err = f"{r['logits_rel_err']:.2e} / {r['logits_rel_err_step0']:.2e}" if "logits_rel_err" in r else "-"
        agree = f"{100 * r['argmax_agree']:.2f}%" if "argmax_agree" in r else "-"
        nll = f"{r['nll']:.4f}" + (f" ({rr['nll']:.4f})" if rr.get("ok") else "")
        lines.append(
            f"| {name} | {ref} | ok | {r['load_s']} | {r['ms_per_step_bs1']} | {r['distinct_tokens']} | {same1} | "
            f"{sameb} | {err} | {agree} | {nll} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("all")
    a.add_argument("--work", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    a.add_argument("--cases", default=None, help="comma-separated subset, in order")
    a.add_argument("--shape", default="560m")
    a.add_argument("--layers", type=int, default=None)
    a.add_argument("--peaky-layers", type=int, default=4)
    a.add_argument("--peaky-std", type=float, default=0.1)
    t = sub.add_parser("table")
    t.add_argument("--work", required=True)
    t.add_argument("--out", required=True)
    c = sub.add_parser("case")
    c.add_argument("name", choices=sorted(CASES))
    c.add_argument("--work", required=True)
    c.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = p.parse_args(argv)
    return {"all": all_main, "table": table_main, "case": case_main}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
