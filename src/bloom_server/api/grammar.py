"""Structured output as each API surface asks for it, turned into the engine's Grammar: TGI's `grammar`
(`{"type": "json" | "regex" | "json_object", "value": ...}`, also in the original /generate body), OpenAI's
`response_format` (`text`, `json_object`, `json_schema`) and chat `tools` with a `tool_choice` that names a function
or is `required`. Shapes and canonical form only: the grammar itself is compiled and checked by the engine
(bloom_server.structured), which names the field."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from bloom_server.errors import InvalidRequest
from bloom_server.types import Grammar

# A schema or regex larger than this is refused before it is compiled (a grammar's cost grows with its text).
MAX_GRAMMAR_BYTES = 64 * 1024


def make_grammar(kind: str, value: Any, field: str) -> Grammar:
    """A request's grammar in canonical form (what crosses the ranks and keys the cache). `value`: the schema (a
    dict, or a JSON string of one) or the regex. Raises InvalidRequest naming `field` when it is not one."""
    if kind == "json_object":
        return Grammar("json_object", "")
    if kind == "json_schema":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise InvalidRequest(f"{field}: not valid JSON ({exc})", field=field) from None
        if isinstance(value, bool):  # JSON Schema's true (anything) and false (nothing)
            value = {} if value else {"not": {}}
        if not isinstance(value, dict):
            raise InvalidRequest(f"{field}: a JSON schema must be an object", field=field)
        try:
            source = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"{field}: {exc}", field=field) from None
    elif kind == "regex":
        if not isinstance(value, str) or not value:
            raise InvalidRequest(f"{field}: a regex must be a non-empty string", field=field)
        source = value
    else:
        raise InvalidRequest(f"{field}: unknown grammar type {kind!r}", field=field)
    if len(source.encode()) > MAX_GRAMMAR_BYTES:
        raise InvalidRequest(f"{field}: {len(source.encode())} bytes; the limit is {MAX_GRAMMAR_BYTES}", field=field,
                             limit=MAX_GRAMMAR_BYTES)  # fmt: skip
    return Grammar(kind, source)


def _bad(field: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"{field}: {message}", field=field)


def tgi_grammar(value: Any, field: str) -> Grammar | None:
    """TGI's grammar parameter: `{"type": "json", "value": <schema object or its JSON text>}`, `{"type": "regex",
    "value": <pattern>}`, or `{"type": "json_object"}` (any JSON object). None: unconstrained."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _bad(field, 'must be an object {"type": "json" | "regex" | "json_object", "value": ...}')
    kind = value.get("type")
    if kind == "json_object":
        return make_grammar("json_object", None, field)
    if kind not in ("json", "regex"):
        raise _bad(f"{field}.type", f'must be "json", "regex" or "json_object" (got {kind!r})')
    if "value" not in value:
        raise _bad(f"{field}.value", "is required")
    return make_grammar("json_schema" if kind == "json" else "regex", value["value"], f"{field}.value")


def response_format_grammar(rf: Any, field: str = "response_format") -> Grammar | None:
    """OpenAI's response_format. `json_schema.strict` is taken (a boolean): the output follows the schema either
    way, since every token is masked by it."""
    if rf is None:
        return None
    if not isinstance(rf, dict):
        raise _bad(field, 'must be an object such as {"type": "json_object"}')
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return make_grammar("json_object", None, field)
    if kind != "json_schema":
        raise _bad(f"{field}.type", f'must be "text", "json_object" or "json_schema" (got {kind!r})')
    spec = rf.get("json_schema")
    if not isinstance(spec, dict):
        raise _bad(f"{field}.json_schema", 'is required with type "json_schema": {"name": ..., "schema": {...}}')
    if "strict" in spec and not isinstance(spec["strict"], (bool, type(None))):
        raise _bad(f"{field}.json_schema.strict", "must be a boolean")
    if "name" in spec and not isinstance(spec["name"], str):
        raise _bad(f"{field}.json_schema.name", "must be a string")
    schema = spec.get("schema", {})  # OpenAI's default: no schema, any JSON object
    if schema == {}:
        return make_grammar("json_object", None, field)
    return make_grammar("json_schema", schema, f"{field}.json_schema.schema")


@dataclass(frozen=True)
class ToolPlan:
    """How a constrained tool call's text becomes OpenAI's `tool_calls`: one named function (the text is its
    arguments), or any of several (`required`: the text is `{"name": ..., "arguments": {...}}`)."""

    names: tuple[str, ...]
    named: bool

    def call(self, text: str) -> tuple[str, str] | None:
        """(name, arguments as JSON text) from a finished answer; None when it does not parse (a cut answer)."""
        if self.named:
            return self.names[0], text
        try:
            obj = json.loads(text)
            return obj["name"], json.dumps(obj["arguments"], ensure_ascii=False)
        except (ValueError, KeyError, TypeError):
            return None


def tool_grammar(tools: Any, tool_choice: Any) -> tuple[Grammar, ToolPlan] | None:
    """OpenAI chat `tools` with `tool_choice`: `{"type": "function", "function": {"name": ...}}` or "required"
    constrain the answer to a call (its arguments to the function's `parameters` schema). "none" (or no tools)
    leaves the answer free. "auto" is refused: the model may then answer in text or call, which a grammar cannot
    let a model choose honestly."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise _bad("tool_choice", "needs `tools`")
        return None
    if tool_choice in (None, "auto"):
        raise _bad("tool_choice", 'only "none", "required" or a named function are supported with tools '
                   '("auto" is not)')  # fmt: skip
    if tool_choice == "none":
        return None
    if not isinstance(tools, list):
        raise _bad("tools", "must be a list")
    params: dict[str, Any] = {}
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise _bad(f"tools[{i}]", 'must be {"type": "function", "function": {"name": ..., "parameters": {...}}}')
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise _bad(f"tools[{i}].function.name", "must be a non-empty string")
        schema = fn.get("parameters", {"type": "object"})
        if not isinstance(schema, dict):
            raise _bad(f"tools[{i}].function.parameters", "must be a JSON schema object")
        params[name] = (schema or {"type": "object"}, f"tools[{i}].function.parameters")
    if tool_choice == "required":
        names = tuple(params)
        options = [{"type": "object", "properties": {"name": {"const": n}, "arguments": params[n][0]},
                    "required": ["name", "arguments"], "additionalProperties": False} for n in names]  # fmt: skip
        schema = options[0] if len(options) == 1 else {"anyOf": options}
        return make_grammar("json_schema", schema, "tools"), ToolPlan(names, named=False)
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise _bad("tool_choice", 'must be "none", "required" or {"type": "function", "function": {"name": ...}}')
    if name not in params:
        raise _bad("tool_choice.function.name", f"{name!r} is not one of the tools ({', '.join(params)})")
    schema, field = params[name]
    return make_grammar("json_schema", schema, field), ToolPlan((name,), named=True)


def tool_field(tools: Any, tool_choice: Any) -> str:
    """The field a bad tool schema is reported under: the named function's parameters, or `tools`."""
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        for i, t in enumerate(tools or []):
            if isinstance(t, dict) and (t.get("function") or {}).get("name") == name:
                return f"tools[{i}].function.parameters"
    return "tools"
