"""`bloom-server client "a prompt"`: stream a completion from a running server to the terminal, over the standard
library's http.client. Its defaults (url, port, api_key) are the settings' (settings.py), as `serve` reads them."""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import time
import urllib.parse
from typing import Any, TextIO


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help='the prompt ("-" reads it from standard input)')
    p.add_argument(
        "--url",
        default=None,
        help="server URL (default: $BLOOM_URL, else http://127.0.0.1:$BLOOM_PORT, port 8080 by default)",
    )
    p.add_argument("--api-key", default=None, help="sent as `Authorization: Bearer` (default: $BLOOM_API_KEY)")
    p.add_argument("--max-new-tokens", type=int, default=50, help="new tokens to generate (default 50)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sample")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling, in (0, 1]")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="reproduce a sampled answer")
    p.add_argument("--stop", action="append", default=None, help="a string that ends the generation (repeatable)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the server (default 300)")
    p.add_argument("--quiet", action="store_true", help="no statistics on standard error")


def default_url(settings: Any) -> str:
    """The url setting ($BLOOM_URL), else the local server on the port `serve` reads ($BLOOM_PORT, 8080 by default)."""
    return settings.url or f"http://127.0.0.1:{settings.port}"


def body_for(args: argparse.Namespace, prompt: str) -> dict[str, Any]:
    params: dict[str, Any] = {"max_new_tokens": args.max_new_tokens}
    if args.temperature and args.temperature > 0:
        params.update(do_sample=True, temperature=args.temperature)
        if args.top_p is not None:
            params["top_p"] = args.top_p
        if args.top_k is not None:
            params["top_k"] = args.top_k
    for name in ("repetition_penalty", "seed", "stop"):
        if getattr(args, name) is not None:
            params[name] = getattr(args, name)
    return {"inputs": prompt, "parameters": params}


def run(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """0: done; 1: the server refused or failed the request (its message on stderr); 2: no server reachable."""
    from pydantic import ValidationError

    from bloom_server.cli.serve import print_invalid
    from bloom_server.settings import load_settings

    try:
        settings = load_settings()
    except ValidationError as exc:
        print_invalid("client", exc)
        return 2
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    url = urllib.parse.urlparse(args.url or default_url(settings))
    key = args.api_key or (settings.api_key.get_secret_value() if settings.api_key is not None else None)
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    conn_cls = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    conn = conn_cls(url.hostname or "127.0.0.1", url.port, timeout=args.timeout)
    path = (url.path.rstrip("/") or "") + "/generate_stream"
    start = time.monotonic()
    try:
        conn.request("POST", path, json.dumps(body_for(args, prompt)), headers)
        resp = conn.getresponse()
        if resp.status != 200:
            print(f"bloom-server client: {resp.status}: {_message(resp.read())}", file=err)
            return 1
        return _stream(resp, out, err, start, args.quiet)
    except (ConnectionError, OSError, http.client.HTTPException) as exc:
        print(f"bloom-server client: cannot reach {url.geturl()}: {exc}", file=err)
        return 2
    finally:
        conn.close()


def _stream(resp: http.client.HTTPResponse, out: TextIO, err: TextIO, start: float, quiet: bool) -> int:
    tokens, first = 0, None
    for raw in resp:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data:"):
            continue
        event = json.loads(line[5:])
        if event.get("error"):
            out.write("\n")
            print(f"bloom-server client: {event.get('error_type', 'error')}: {event['error']}", file=err)
            return 1
        tokens += 1
        first = first or time.monotonic()
        out.write(event["token"]["text"])
        out.flush()
        details = event.get("details")
        if details:
            out.write("\n")
            out.flush()
            if not quiet:
                took = time.monotonic() - start
                print(
                    f"[{details['generated_tokens']} tokens, {details['finish_reason']}, {took:.2f} s, "
                    f"first token after {first - start:.2f} s]",
                    file=err,
                )
    return 0


def _message(raw: bytes) -> str:
    try:
        body = json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")[:500]
    error = body.get("error")
    if isinstance(error, dict):
        return str(error.get("message"))
    return str(body.get("message") or error)
