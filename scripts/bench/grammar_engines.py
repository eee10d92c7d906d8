#!/usr/bin/env python3
"""Grammar engines compared on the CPU: llguidance (what bloom_server.structured uses), xgrammar and outlines-core,
each on the same tokenizers, schemas and regexes. For every (tokenizer, engine) cell:

  prep     the tokenizer's preparation, once: from tokenizer.json to an object ready to compile grammars
  compile  per grammar: from the schema (or regex) to a matcher ready for its first mask; counts of the grammars
           the engine accepts, refuses (an error naming why), or did not reach within the time limit
  first    the first mask of a fresh matcher (engines differ in how much work they leave for it)
  mask     per-token mask time while following a valid instance of each grammar token by token (tokenized by the
           tokenizer itself, then EOS), pooled over every step; "followed" counts the instances whose every token
           (and the final EOS) the engine allowed
  advance  per-token time to feed the matcher the token

    PYTHONPATH=/tmp/ge-site:$PWD/src python3 scripts/bench/grammar_engines.py \\
        --tokenizer tiny --tokenizer PATH/tokenizer.json --time-limit 900 --json OUT.json

The grammars: tests/fixtures/structured/schemas.json (JSON schemas) and regexes.json. An instance of each is
generated here from the schema (a small deterministic generator; a pattern's strings come from Python's own regex
parser) and checked with jsonschema_rs where it is installed. JSON is compact (no free whitespace), as the server
asks of its engine. Each cell runs in its own process (a fresh start: no engine warms another's caches, and a cell
over its share of the time limit is killed, its unfinished grammars counted as not reached). An engine that cannot
be imported is skipped with a line. Measurement only: nothing imports this script.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
FIXTURES = ROOT / "tests" / "fixtures" / "structured"
ENGINES = ("llguidance", "xgrammar", "outlines-core")
MODULES = {"llguidance": "llguidance", "xgrammar": "xgrammar", "outlines-core": "outlines_core"}
EOS = 2  # BLOOM's </s> (and the embedded model's)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", action="append", default=None,
                   help="a tokenizer.json, or 'tiny' for the embedded model's (trained here); repeatable "
                        "(default: tiny)")  # fmt: skip
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated, from " + ", ".join(ENGINES))
    p.add_argument("--time-limit", type=float, default=900.0,
                   help="seconds in all; each cell gets an even share of what is left when it starts")  # fmt: skip
    p.add_argument("--schemas", type=int, default=None, help="only the first N schemas of the corpus")
    p.add_argument("--regexes", type=int, default=None, help="only the first N regexes of the corpus")
    p.add_argument("--seed", type=int, default=0, help="the instance generator's seed")
    p.add_argument("--json", type=Path, default=None, help="write every record and the summary here")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)  # internal: one cell
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------- valid instances

WORDS = ("north river bank small green house open market seven quiet lake report station morning light cold "
         "coffee table paper stone road winter garden").split()  # fmt: skip
FORMATS = {
    "date-time": "2024-03-15T09:30:00Z",
    "date": "2024-03-15",
    "time": "09:30:00Z",
    "email": "ana.lopez@example.com",
    "uuid": "123e4567-e89b-42d3-a456-426614174000",
    "uri": "https://example.com/docs/a",
    "ipv4": "192.168.1.20",
}


def regex_instance(pattern: str, rng: random.Random) -> str:
    """A string that `pattern` matches in full, from the tree of Python's own regex parser (the subset the corpus
    uses: literals, classes, repeats, groups, alternations, anchors)."""
    from re import _constants as c
    from re import _parser as parser

    printable = [chr(i) for i in range(0x21, 0x7F) if chr(i) not in '"\\']

    def klass(items: list) -> str:
        chars: list[str] = []
        negate = False
        for op, av in items:
            if op is c.NEGATE:
                negate = True
            elif op is c.LITERAL:
                chars.append(chr(av))
            elif op is c.RANGE:
                chars.extend(chr(i) for i in range(av[0], av[1] + 1))
            elif op is c.CATEGORY and av is c.CATEGORY_DIGIT:
                chars.extend("0123456789")
            elif op is c.CATEGORY and av is c.CATEGORY_WORD:
                chars.extend("abcxyz_019")
            elif op is c.CATEGORY and av is c.CATEGORY_SPACE:
                chars.append(" ")
            else:
                raise ValueError(f"regex class item {op} not supported by the generator")
        if negate:
            chars = [ch for ch in printable if ch not in chars]
        return rng.choice(chars)

    def walk(items: Any, out: list[str]) -> None:
        for op, av in items:
            if op is c.LITERAL:
                out.append(chr(av))
            elif op is c.NOT_LITERAL:
                out.append(rng.choice([ch for ch in printable if ord(ch) != av]))
            elif op is c.ANY:
                out.append(rng.choice("abcdef"))
            elif op is c.IN:
                out.append(klass(av))
            elif op in (c.MAX_REPEAT, c.MIN_REPEAT, getattr(c, "POSSESSIVE_REPEAT", None)):
                lo, hi, sub = av
                hi = lo + 4 if hi is c.MAXREPEAT else min(hi, lo + 4)
                for _ in range(rng.randint(lo, hi)):
                    walk(sub, out)
            elif op is c.SUBPATTERN:
                walk(av[3], out)
            elif op is c.BRANCH:
                walk(rng.choice(av[1]), out)
            elif op is c.AT:
                pass  # anchors: the whole string is generated
            else:
                raise ValueError(f"regex op {op} not supported by the generator")

    out: list[str] = []
    walk(parser.parse(pattern), out)
    return "".join(out)


def _text(rng: random.Random, lo: int, hi: int) -> str:
    target = max(lo, min(hi, rng.randint(8, 28)))
    words: list[str] = []
    while len(" ".join(words)) < target:
        words.append(rng.choice(WORDS))
    return " ".join(words)[:target]


def _resolve(root: dict, ref: str) -> dict:
    node: Any = root
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def _number(s: dict, rng: random.Random, integer: bool) -> int | float:
    lo = s.get("minimum", s["exclusiveMinimum"] + (1 if integer else 0.5) if "exclusiveMinimum" in s else 0)
    hi = s.get("maximum", s["exclusiveMaximum"] - 1 if "exclusiveMaximum" in s else lo + 1000)
    if integer:
        return rng.randint(int(lo), int(hi))
    step = s.get("multipleOf")
    if step:
        k_lo, k_hi = int(-(-lo // step)), int(hi // step)
        return round(rng.randint(k_lo, k_hi) * step, 6)
    return round(rng.uniform(lo, hi) if lo < hi else lo, 2)


def schema_instance(s: Any, rng: random.Random, root: dict, depth: int = 0) -> Any:
    """A value valid for schema `s` (the keywords the corpus uses), properties in the schema's order."""
    if s is True or s == {}:
        return "any"
    if "$ref" in s:
        return schema_instance(_resolve(root, s["$ref"]), rng, root, depth + 1)
    if "const" in s:
        return s["const"]
    if "enum" in s:
        return rng.choice(s["enum"])
    for key in ("anyOf", "oneOf"):
        if key in s:
            return schema_instance(rng.choice(s[key]), rng, root, depth + 1)
    t = s.get("type")
    if isinstance(t, list):
        t = rng.choice(t)
    if t is None:
        t = "object" if "properties" in s else "string"
    if t == "object":
        out: dict[str, Any] = {}
        for name, sub in s.get("properties", {}).items():
            out[name] = schema_instance(sub, rng, root, depth + 1)
        extra = s.get("additionalProperties")
        if isinstance(extra, dict) and len(out) < s.get("maxProperties", len(out) + 1):
            out["extra_1"] = schema_instance(extra, rng, root, depth + 1)
        return out
    if t == "array":
        prefix = s.get("prefixItems", [])
        items = [schema_instance(sub, rng, root, depth + 1) for sub in prefix]
        if s.get("items") is False:
            return items
        lo, hi = s.get("minItems", 0), s.get("maxItems", 3)
        n = max(lo, min(hi, rng.randint(1, 3) if depth < 3 else 0)) - len(items)
        sub = s.get("items", {"type": "string"})
        for _ in range(max(0, n)):
            for _try in range(20):  # uniqueItems: draw again on a repeat
                v = schema_instance(sub, rng, root, depth + 1)
                if not s.get("uniqueItems") or v not in items:
                    break
            items.append(v)
        return items
    if t == "string":
        if "format" in s:
            return FORMATS[s["format"]]
        if "pattern" in s:
            return regex_instance(s["pattern"], rng)
        return _text(rng, s.get("minLength", 0), s.get("maxLength", 40))
    if t in ("integer", "number"):
        return _number(s, rng, t == "integer")
    if t == "boolean":
        return rng.choice([True, False])
    if t == "null":
        return None
    raise ValueError(f"schema type {t!r} not supported by the generator")


# Invalid instances, each breaking one keyword of a corpus schema: an engine that accepts the schema should refuse
# them before EOS. (schema name, keyword broken, instance)
INVALID = (
    ("movie", "uniqueItems", '{"title":"x","year":2000,"genres":["drama","drama"]}'),
    ("course", "multipleOf", '{"code":"AB123","title":"x","credits":0.7}'),
    ("recipe", "exclusiveMinimum", '{"name":"x","servings":1,"ingredients":[{"item":"y","grams":0}]}'),
    ("loose_metadata", "maxProperties", '{"id":1,"a":1,"b":2,"c":3}'),
    ("person", "maximum", '{"name":"x","age":151}'),
    ("person", "maxLength", '{"name":"' + "x" * 31 + '","age":3}'),
    ("person", "format", '{"name":"x","age":3,"email":"not an email"}'),
    ("tags_list", "maxItems", '["a","b","c","d","e","f"]'),
    ("stock_quote", "pattern", '{"symbol":"abc","price":1.5,"change_pct":0}'),
)


# One string field three ways, the same text in it: where a mask's cost depends on how the string is bounded.
STRING_PROBES = (
    ("unbounded", {"type": "string"}),
    ("maxLength 40", {"type": "string", "maxLength": 40}),
    ("pattern [a-z ]{1,40}", {"type": "string", "pattern": "^[a-z ]{1,40}$"}),
)
PROBE_TEXT = '{"s":"north river bank small green house"}'


def make_jobs(args: argparse.Namespace) -> list[dict]:
    """The grammars with a valid instance each, then the invalid instances: [{name, kind, source, text, checked}]
    (checked: jsonschema_rs or re agree the instance is valid, or for kind "invalid" invalid; None: not checked)."""
    rng = random.Random(args.seed)
    schemas = json.loads((FIXTURES / "schemas.json").read_text())[: args.schemas]
    regexes = json.loads((FIXTURES / "regexes.json").read_text())[: args.regexes]
    try:
        import jsonschema_rs
    except ImportError:
        jsonschema_rs = None
    jobs = []
    for entry in schemas:
        value = schema_instance(entry["schema"], rng, entry["schema"])
        valid = None if jsonschema_rs is None else bool(
            jsonschema_rs.validator_for(entry["schema"], validate_formats=True).is_valid(value))  # fmt: skip
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        jobs.append({"name": entry["name"], "kind": "json_schema", "source": entry["schema"], "text": text,
                     "checked": valid})  # fmt: skip
    for i, pattern in enumerate(regexes):
        text = regex_instance(pattern, rng)
        jobs.append({"name": f"regex_{i}", "kind": "regex", "source": pattern, "text": text,
                     "checked": re.fullmatch(pattern, text) is not None})  # fmt: skip
    by_name = {e["name"]: e["schema"] for e in schemas}
    for name, keyword, text in INVALID:
        if name in by_name:
            valid = None if jsonschema_rs is None else bool(
                jsonschema_rs.validator_for(by_name[name], validate_formats=True).is_valid(json.loads(text)))  # fmt: skip
            jobs.append({"name": f"{name}:{keyword}", "kind": "invalid", "source": by_name[name], "text": text,
                         "checked": None if valid is None else not valid})  # fmt: skip
    for label, sub in STRING_PROBES:
        schema = {"type": "object", "properties": {"s": sub}, "required": ["s"], "additionalProperties": False}
        jobs.append({"name": f"string:{label}", "kind": "string", "source": schema, "text": PROBE_TEXT,
                     "checked": re.fullmatch(sub.get("pattern", ".*"), json.loads(PROBE_TEXT)["s"]) is not None})  # fmt: skip
    return jobs


# ------------------------------------------------------------------------------------------------------ engines


def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins for bytes (GPT-2's table), reversed: character -> byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(ch): b for b, ch in zip(keep, chars)}


class Llguidance:
    """The server's own configuration (bloom_server.structured's limits and JSON options)."""

    def __init__(self) -> None:
        import llguidance

        from bloom_server import structured

        self.llg, self.structured = llguidance, structured

    def prepare(self, tokenizer_json: str, vocab: int) -> None:
        self.tok = self.llg.LLTokenizer(tokenizer_json, n_vocab=vocab, eos_token=[EOS])

    def compile(self, kind: str, source: Any) -> Any:
        M = self.llg.LLMatcher
        text = (M.grammar_from_regex(source) if kind == "regex"
                else M.grammar_from_json_schema(source, defaults=self.structured.JSON_OPTIONS))  # fmt: skip
        m = M(self.tok, text, limits=self.llg.LLParserLimits(**self.structured.LIMITS))
        if m.is_error():
            raise ValueError(m.get_error())
        return m

    def mask(self, m: Any, ptr: int, words: int) -> None:
        m.unsafe_compute_mask_ptr(ptr, words * 4)

    def advance(self, m: Any, token: int) -> bool:
        return bool(m.consume_token(token))


class Xgrammar:
    """Compact JSON (separators without blanks), strict mode (its default); the compiler's own cache off so every
    compile is measured, its threads = this machine's cores."""

    def __init__(self) -> None:
        import transformers
        import xgrammar

        self.xgr, self.transformers = xgrammar, transformers

    def prepare(self, tokenizer_json: str, vocab: int) -> None:
        hf = self.transformers.PreTrainedTokenizerFast(tokenizer_file=tokenizer_json)
        info = self.xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=[EOS])
        self.compiler = self.xgr.GrammarCompiler(info, max_threads=os.cpu_count() or 1, cache_enabled=False)

    def compile(self, kind: str, source: Any) -> Any:
        if kind == "regex":
            compiled = self.compiler.compile_regex(source)
        else:
            compiled = self.compiler.compile_json_schema(json.dumps(source), any_whitespace=False,
                                                         separators=(",", ":"))  # fmt: skip
        return self.xgr.GrammarMatcher(compiled)

    def mask(self, m: Any, ptr: int, words: int) -> None:
        m.fill_next_token_bitmask(self.buf)

    def advance(self, m: Any, token: int) -> bool:
        return bool(m.accept_token(token))


class OutlinesCore:
    """The vocabulary built from tokenizer.json's tokens as bytes (its only other path downloads from a hub); a
    schema becomes a regex (compact: no whitespace), then an index over the whole vocabulary."""

    def __init__(self) -> None:
        import outlines_core
        from outlines_core.json_schema import build_regex_from_schema

        self.oc, self.to_regex = outlines_core, build_regex_from_schema

    def prepare(self, tokenizer_json: str, vocab: int) -> None:
        data = json.loads(Path(tokenizer_json).read_text())
        special = {t["id"] for t in data.get("added_tokens", []) if t.get("special")}
        decode = _byte_decoder()
        tokens: dict[bytes, list[int]] = {}
        for s, i in data["model"]["vocab"].items():
            if i not in special:
                tokens.setdefault(bytes(decode[ch] for ch in s), []).append(i)
        self.vocab = self.oc.Vocabulary(EOS, tokens)

    def compile(self, kind: str, source: Any) -> Any:
        regex = source if kind == "regex" else self.to_regex(json.dumps(source), whitespace_pattern="")
        return self.oc.Guide(self.oc.Index(regex, self.vocab))

    def mask(self, m: Any, ptr: int, words: int) -> None:
        m.write_mask_into(ptr, words, 4)

    def advance(self, m: Any, token: int) -> bool:
        if token == EOS:  # a final state allows EOS but has no move on it: its callers stop there
            return bool(m.is_finished())
        m.advance(token, False)
        return True  # it raises on a token it does not allow


ADAPTERS = {"llguidance": Llguidance, "xgrammar": Xgrammar, "outlines-core": OutlinesCore}


def _emit(record: dict) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def worker(spec_path: Path) -> int:
    """One cell, in its own process: prepare the tokenizer, then each grammar (compile, first mask, follow its
    instance); one JSON line per record on stdout. Stops starting grammars at the deadline."""
    import torch

    spec = json.loads(spec_path.read_text())
    deadline = spec["deadline"]
    eng = ADAPTERS[spec["engine"]]()
    vocab = spec["vocab"]
    words = (vocab + 31) // 32
    t0 = time.perf_counter()
    eng.prepare(spec["tokenizer"], vocab)
    _emit({"type": "prep", "s": time.perf_counter() - t0})
    buf = torch.zeros((1, words), dtype=torch.int32)
    eng.buf = buf  # xgrammar fills a tensor, the others a pointer
    ptr = buf.data_ptr()
    flat = buf.view(-1)
    for job in spec["jobs"]:
        if time.time() > deadline:
            break
        _emit({"type": "start", "name": job["name"]})
        rec: dict[str, Any] = {"type": "job", "name": job["name"], "kind": job["kind"]}
        t0 = time.perf_counter()
        try:
            m = eng.compile(job["kind"], job["source"])
        except Exception as exc:  # noqa: BLE001 -- an engine's refusal is a result: recorded, the next grammar goes on
            rec.update(ok=False, compile_s=time.perf_counter() - t0, error=" ".join(str(exc).split())[:300])
            _emit(rec)
            continue
        rec.update(ok=True, compile_s=time.perf_counter() - t0)
        masks: list[float] = []
        advances: list[float] = []
        followed, reject = True, None
        for i, token in enumerate(job["ids"] + [EOS]):
            buf.zero_()
            t1 = time.perf_counter()
            eng.mask(m, ptr, words)
            masks.append(time.perf_counter() - t1)
            if not (int(flat[token >> 5]) >> (token & 31)) & 1:
                followed, reject = False, {"step": i, "token": token, "of": len(job["ids"]) + 1}
                break
            t1 = time.perf_counter()
            try:
                ok = eng.advance(m, token)
            except Exception as exc:  # noqa: BLE001 -- a refused token is a result, as above
                ok, reject = False, {"step": i, "token": token, "error": str(exc)[:200]}
            advances.append(time.perf_counter() - t1)
            if not ok:
                followed = False
                reject = reject or {"step": i, "token": token, "of": len(job["ids"]) + 1}
                break
        rec.update(followed=followed, reject=reject, first_mask_s=masks[0] if masks else None,
                   mask_us=[round(x * 1e6, 2) for x in masks], advance_us=[round(x * 1e6, 2) for x in advances])  # fmt: skip
        _emit(rec)
    _emit({"type": "end"})
    return 0


# -------------------------------------------------------------------------------------------------------- driver


def tokenizer_path(name: str, scratch: Path) -> tuple[str, str]:
    """(label, path of a tokenizer.json)."""
    if name == "tiny":
        from bloom_server.storage.tiny import train_tokenizer

        out = scratch / "tiny"
        train_tokenizer(out)
        return "tiny (embedded)", str(out / "tokenizer.json")
    return Path(name).name if Path(name).name != "tokenizer.json" else str(name), str(name)


def version(engine: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(engine)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_cell(spec: dict, scratch: Path, grace: float = 10.0) -> tuple[list[dict], str]:
    """Run one cell's worker until it ends or its deadline (+grace) passes; (records, how it ended)."""
    path = scratch / f"spec-{spec['engine']}-{abs(hash(spec['tokenizer']))}.json"
    path.write_text(json.dumps(spec))
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None
    records: list[dict] = []
    ended = "done"
    while True:
        left = spec["deadline"] + grace - time.time()
        if left <= 0:
            proc.kill()
            ended = "killed at the time limit"
            break
        ready, _, _ = select.select([proc.stdout], [], [], min(left, 1.0))
        if not ready:
            continue
        line = proc.stdout.readline()
        if not line:
            break
        rec = json.loads(line)
        records.append(rec)
        if rec["type"] == "end":
            break
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        err = ""
    if proc.returncode not in (0, None, -9) and ended == "done":
        ended = f"exited {proc.returncode}: {' '.join((err or '').split()[-30:])}"
    return records, ended


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))]


def summarize(records: list[dict], jobs: list[dict], kind: str) -> dict:
    mine = [j for j in jobs if j["kind"] == kind]
    done = [r for r in records if r["type"] == "job" and r["kind"] == kind]
    ok = [r for r in done if r["ok"]]
    compile_ms = [r["compile_s"] * 1e3 for r in ok]
    masks = [x for r in ok for x in r["mask_us"]]
    advances = [x for r in ok for x in r["advance_us"]]
    firsts = [r["first_mask_s"] * 1e3 for r in ok if r["first_mask_s"] is not None]
    out: dict[str, Any] = {
        "total": len(mine),
        "accepted": len(ok),
        "refused": len(done) - len(ok),
        "not_reached": len(mine) - len(done),
        "followed": sum(1 for r in ok if r["followed"]),
        "refused_names": [r["name"] for r in done if not r["ok"]],
        "not_followed": [r["name"] for r in ok if not r["followed"]],
        "not_followed_complement": [r["name"] for r in ok if r["followed"]],  # for kind "invalid": let through
        "masks": len(masks),
    }
    if compile_ms:
        out.update(compile_ms_median=statistics.median(compile_ms), compile_ms_p90=_pct(compile_ms, 0.9),
                   compile_ms_max=max(compile_ms), first_mask_ms_median=statistics.median(firsts))  # fmt: skip
    if masks:
        out.update(mask_us_median=statistics.median(masks), mask_us_mean=statistics.fmean(masks),
                   mask_us_p99=_pct(masks, 0.99), mask_us_max=max(masks),
                   advance_us_median=statistics.median(advances) if advances else None)  # fmt: skip
    return out


def _f(x: float | None, nd: int = 1) -> str:
    return "—" if x is None else f"{x:,.{nd}f}"


def table(cells: list[dict]) -> str:
    head = ("| tokenizer | engine | prep s | grammars: accepted / refused / not reached | compile ms: median / p90 "
            "/ max | first mask ms (median) | mask µs: median / mean / p99 | advance µs (median) | instances followed |")  # fmt: skip
    lines = []
    for kind, title in (("json_schema", "JSON schemas"), ("regex", "Regexes")):
        lines += [f"**{title}**", "", head, "|" + "---|" * 9]
        for c in cells:
            if c.get("skipped"):
                lines.append(f"| {c['tokenizer']} | {c['engine']} | skipped: {c['skipped']} |" + " |" * 6)
                continue
            s = c[kind]
            lines.append(
                f"| {c['tokenizer']} | {c['engine']} {c['version']} | {_f(c.get('prep_s'), 2)} | "
                f"{s['accepted']} / {s['refused']} / {s['not_reached']} of {s['total']} | "
                f"{_f(s.get('compile_ms_median'), 2)} / {_f(s.get('compile_ms_p90'), 2)} / "
                f"{_f(s.get('compile_ms_max'), 2)} | {_f(s.get('first_mask_ms_median'), 3)} | "
                f"{_f(s.get('mask_us_median'))} / {_f(s.get('mask_us_mean'))} / {_f(s.get('mask_us_p99'))} | {_f(s.get('advance_us_median'))} | "
                f"{s['followed']} of {s['accepted']} |"
            )
        lines.append("")
    lines += ["**Invalid instances** (each breaks one keyword of a corpus schema; the engine should refuse a token "
              "before EOS)", "", "| tokenizer | engine | refused | let through | not tried (schema refused or "
              "not reached) |", "|---|---|---|---|---|"]  # fmt: skip
    for c in cells:
        if c.get("skipped"):
            continue
        s = c["invalid"]
        through = ", ".join(n.split(":")[1] for n in s["not_followed_complement"]) or "none"
        lines.append(f"| {c['tokenizer']} | {c['engine']} | {s['accepted'] - s['followed']} of {s['total']} | "
                     f"{through} | {s['refused'] + s['not_reached']} |")  # fmt: skip
    lines.append("")
    lines += [f"**One string field** (`{PROBE_TEXT}`; mask µs, median over its steps)", "",
              "| tokenizer | engine | " + " | ".join(label for label, _ in STRING_PROBES) + " |",
              "|---|---|" + "---|" * len(STRING_PROBES)]  # fmt: skip
    for c in cells:
        if c.get("skipped"):
            continue
        by = {r["name"]: r for r in c["records"] if r["kind"] == "string"}
        vals = []
        for label, _ in STRING_PROBES:
            r = by.get(f"string:{label}")
            vals.append("—" if r is None or not r["ok"] else _f(statistics.median(r["mask_us"])))
        lines.append(f"| {c['tokenizer']} | {c['engine']} | " + " | ".join(vals) + " |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker)
    t_end = time.time() + args.time_limit
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    for e in engines:
        if e not in ENGINES:
            raise SystemExit(f"--engines: unknown engine {e!r} (known: {', '.join(ENGINES)})")
    jobs = make_jobs(args)
    bad = [j["name"] for j in jobs if j["checked"] is False]
    if bad:
        raise SystemExit(f"instances not as meant (valid ones invalid, or invalid ones valid): {', '.join(bad)}")
    from tokenizers import Tokenizer

    scratch = Path(tempfile.mkdtemp(prefix="grammar-engines-"))
    available = {}
    for e in engines:
        import importlib.util

        available[e] = importlib.util.find_spec(MODULES[e]) is not None
        if not available[e]:
            print(f"{e}: not installed, skipped", flush=True)
    cells: list[dict] = []
    todo = [(t, e) for t in (args.tokenizer or ["tiny"]) for e in engines if available[e]]
    tokenizers: dict[str, tuple[str, str, int, list[list[int]]]] = {}
    for n, (tname, engine) in enumerate(todo):
        if tname not in tokenizers:
            label, path = tokenizer_path(tname, scratch)
            tok = Tokenizer.from_file(path)
            ids = [tok.encode(j["text"], add_special_tokens=False).ids for j in jobs]
            tokenizers[tname] = (label, path, tok.get_vocab_size(), ids)
        label, path, vocab, ids = tokenizers[tname]
        deadline = time.time() + max(0.0, t_end - time.time()) / (len(todo) - n)
        spec = {"engine": engine, "tokenizer": path, "vocab": vocab, "deadline": deadline,
                "jobs": [dict(j, ids=i) for j, i in zip(jobs, ids)]}  # fmt: skip
        t0 = time.time()
        records, ended = run_cell(spec, scratch)
        prep = next((r["s"] for r in records if r["type"] == "prep"), None)
        started = [r["name"] for r in records if r["type"] == "start"]
        finished = {r["name"] for r in records if r["type"] == "job"}
        cut = [s for s in started if s not in finished]  # in flight when the cell was stopped
        cell = {"tokenizer": label, "vocab": vocab, "engine": engine, "version": version(engine), "prep_s": prep,
                "ended": ended, "cut_in_flight": cut, "wall_s": round(time.time() - t0, 1),
                "json_schema": summarize(records, jobs, "json_schema"), "regex": summarize(records, jobs, "regex"),
                "invalid": summarize(records, jobs, "invalid"),
                "records": [r for r in records if r["type"] == "job"]}  # fmt: skip
        cells.append(cell)
        s = cell["json_schema"]
        print(f"{label} / {engine}: prep {_f(prep, 2)} s, schemas {s['accepted']} accepted, {s['refused']} refused, "
              f"{s['not_reached']} not reached; {ended}{' (in flight: ' + ', '.join(cut) + ')' if cut else ''}; "
              f"{cell['wall_s']} s", flush=True)  # fmt: skip
    print()
    print(table(cells))
    for c in cells:
        for kind in ("json_schema", "regex"):
            s = c[kind]
            if s["refused_names"] or s["not_followed"]:
                print(f"{c['tokenizer']} / {c['engine']} {kind}: refused {s['refused_names']}, "
                      f"instance not followed {s['not_followed']}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "cells": cells,
                                         "instances": [{k: j[k] for k in ("name", "kind", "text")} for j in jobs]},
                                        indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
