"""Chat templates for /v1/chat/completions: the tokenizer's own (`chat_template` in tokenizer_config.json) or one
given by setting (the template text, or a path to a file). Rendered with jinja2's sandbox, as transformers does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bloom_server.errors import InvalidRequest


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", origin: str = "setting"):
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        self.template = env.from_string(source)
        self.bos_token, self.eos_token, self.origin = bos_token, eos_token, origin

    @classmethod
    def load(cls, model_dir: str | Path | None, setting: str | None) -> ChatTemplate | None:
        """The setting wins over the tokenizer's template; None when neither exists."""
        config: dict[str, Any] = {}
        if model_dir is not None:
            try:
                config = json.loads((Path(model_dir) / "tokenizer_config.json").read_text())
            except (OSError, ValueError):
                config = {}
        bos, eos = _token(config.get("bos_token")), _token(config.get("eos_token"))
        if setting:
            path = Path(setting)
            text = path.read_text() if len(setting) < 4096 and "{" not in setting and path.is_file() else setting
            return cls(text, bos, eos, origin="setting")
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if isinstance(template, str) and template.strip():
            return cls(template, bos, eos, origin="tokenizer_config.json")
        return None

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        from jinja2.exceptions import TemplateError

        try:
            return self.template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except TemplateError as exc:
            raise InvalidRequest(f"messages: the chat template refused them: {exc}", field="messages") from None


def _token(value: Any) -> str:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""
