"""`bloom-server serve`: every serve flag maps to a Settings field; a flag that is not given leaves the environment
(BLOOM_* or the original server's variables) or the default in force. `precompile` takes the same flags."""

from __future__ import annotations

import argparse
import sys
from typing import Any

# flag -> (Settings field, type, help). Booleans are handled by BooleanOptionalAction.
SERVE_FLAGS: list[tuple[str, str, type, str]] = [
    ("--model", "model", str, "model directory, Hub cache repo id, or pvc:// URI (default: the embedded tiny model)"),
    ("--model-id", "model_id", str, "name reported to clients and used in /v1/models/{name}"),
    ("--model-aliases", "model_aliases", str, "names `model` may give besides the id (tgi,dummy; *: any; empty: none)"),
    ("--backend", "backend", str, "hf | ds_inference | ds_zero | fast"),
    ("--dtype", "dtype", str, "auto | fp16 | bf16 | int8 | fp32"),
    ("--host", "host", str, "address to listen on (default 0.0.0.0)"),
    ("--port", "port", int, "port (default 8080)"),
    ("--max-input-length", "max_input_length", int, "max prompt tokens (default 512)"),
    ("--max-new-tokens", "max_new_tokens", int, "max new tokens a request may ask for (default 100)"),
    ("--max-total-tokens", "max_total_tokens", int, "prompt + new tokens the engine is built for"),
    ("--max-batch-size", "max_batch_size", int, "max rows in one generate call, and prompts per request (32)"),
    ("--max-queued-requests", "max_queued_requests", int, "requests waiting before 429 (default 256)"),
    ("--batch-wait-ms", "batch_wait_ms", float, "dynamic batching: wait for others when idle (default 0 ms)"),
    ("--batching", "batching", str, "auto | continuous | dynamic (default auto: continuous with --backend fast)"),
    ("--prefill-step-tokens", "prefill_step_tokens", int, "fast: tokens per step, decode + prefill (0: no limit)"),
    ("--prefill-chunk-tokens", "prefill_chunk_tokens", int, "fast: most tokens of one prompt per step (0: no limit)"),
    ("--prefix-cache-mb", "prefix_cache_mb", float, "fast: MiB of prompt-prefix KV kept (0: off; default: GPU auto)"),
    ("--max-body-bytes", "max_body_bytes", int, "largest request body (default 1 MiB)"),
    ("--drain-timeout-s", "drain_timeout_s", float, "how long in-flight requests may finish on SIGTERM"),
    ("--log-level", "log_level", str, "debug | info | warning | error"),
]
SERVE_BOOLS: list[tuple[str, str, str]] = [
    ("--cap-max-new-tokens", "cap_max_new_tokens", "cap max_new_tokens at the limit instead of rejecting"),
    ("--warmup", "warmup", "run one generate before reporting ready (default on)"),
    ("--kernel-inject", "kernel_inject", "ds_inference: DeepSpeed kernel injection (default on)"),
    ("--cpu-offload", "cpu_offload", "ds_zero: offload parameters to CPU"),
    (
        "--trust-unverified-pickles",
        "trust_unverified_pickles",
        "DANGEROUS: load pickled weights (.pt, .bin) without a verifying completion marker (docs/security.md)",
    ),
]


def add_settings_flags(p: argparse.ArgumentParser) -> None:
    for flag, dest, typ, help_ in SERVE_FLAGS:
        p.add_argument(flag, dest=dest, type=typ, default=None, help=help_)
    for flag, dest, help_ in SERVE_BOOLS:
        p.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_)


def settings_from_args(args: argparse.Namespace, **forced: Any) -> Any:
    from bloom_server.settings import load_settings

    fields = [d for _, d, _, _ in SERVE_FLAGS] + [d for _, d, _ in SERVE_BOOLS]
    return load_settings(**{**{f: getattr(args, f) for f in fields}, **forced})


def print_invalid(command: str, exc: Any) -> None:
    print(f"bloom-server {command}: invalid settings:", file=sys.stderr)
    for err in exc.errors():
        env = str(err["loc"][0]) if err["loc"] else ""
        name = env.removeprefix("BLOOM_").lower()
        where = f"--{name.replace('_', '-')} / {env}" if name else "settings"
        print(f"  {where}: {err['msg']} (got {err.get('input')!r})", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from bloom_server.serve import configure_logging, serve

    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print_invalid("serve", exc)
        return 2
    configure_logging(settings.log_level)
    local_rank = args.local_rank if args.local_rank is not None else args.local_rank_top
    return serve(settings, local_rank)
