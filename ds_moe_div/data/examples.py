"""Instruction examples as corpus rows: one canonical JSON string per example, so that the document pass
(duplicates, labels, max_documents, splits) treats them like texts.

    text = canonical_example({"prompt": "2+2?", "response": "4"}, cfg, source="x.jsonl", row=3)
    example = parse_example(text)          # Example(messages=None, prompt="2+2?", response="4")

A row holds `messages` (a list of {"role": str, "content": str}; other keys are dropped) or `prompt` and
`response` strings (the columns are data.messages_column / prompt_column / response_column; messages wins
when a row has both). An example without response text (no assistant message with content, or a blank
response) counts as empty and is skipped like an empty document.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .errors import DataError, at

ASSISTANT = "assistant"


@dataclass(frozen=True)
class Example:
    messages: tuple[tuple[str, str], ...] | None  # (role, content) pairs
    prompt: str | None
    response: str | None

    def as_messages(self) -> list[dict[str, str]]:
        """The conversation a chat template renders: messages, or prompt as user and response as assistant."""
        if self.messages is not None:
            return [{"role": role, "content": content} for role, content in self.messages]
        return [{"role": "user", "content": self.prompt}, {"role": ASSISTANT, "content": self.response}]

    def plain_text(self) -> str:
        """The example's text without a template (what a tokenizer trained here learns from)."""
        if self.messages is not None:
            return "\n".join(content for _, content in self.messages)
        return f"{self.prompt}{self.response}"


def _messages(value: Any, column: str, where: str) -> list[list[str]]:
    if not isinstance(value, list | tuple) or not value:
        raise DataError(f"{where}: column {column!r} holds {type(value).__name__}, not a non-empty list of "
                        '{"role", "content"} messages; fix the row or point data.messages_column elsewhere')
    out = []
    for i, message in enumerate(value):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(role, str) or not isinstance(content, str):
            raise DataError(f"{where}: message {i} of {column!r} is {message!r}; each message must be "
                            '{"role": <str>, "content": <str>} (text content only)')
        out.append([role, content])
    return out


def canonical_example(fields: dict[str, Any], cfg, *, source: str, row: int) -> str:
    """The row's example as canonical JSON, or "" when it has no response text. `fields` maps the
    configured column names present in the row to their values."""
    where = at(source, row)
    messages = fields.get(cfg.messages_column)
    if messages is not None:
        pairs = _messages(messages, cfg.messages_column, where)
        if not any(role == ASSISTANT and content.strip() for role, content in pairs):
            return ""
        return json.dumps({"messages": pairs}, ensure_ascii=False)
    prompt, response = fields.get(cfg.prompt_column), fields.get(cfg.response_column)
    if prompt is None or response is None:
        raise DataError(f"{where}: an instruction example needs column {cfg.messages_column!r}, or "
                        f"{cfg.prompt_column!r} and {cfg.response_column!r} (row has {sorted(fields)}); set "
                        "data.messages_column, or data.prompt_column and data.response_column")
    for column, value in ((cfg.prompt_column, prompt), (cfg.response_column, response)):
        if not isinstance(value, str):
            raise DataError(f"{where}: column {column!r} holds {type(value).__name__}, not text")
    if not response.strip():
        return ""
    return json.dumps({"prompt": prompt, "response": response}, ensure_ascii=False)


def parse_example(text: str) -> Example:
    data = json.loads(text)
    if "messages" in data:
        return Example(tuple((role, content) for role, content in data["messages"]), None, None)
    return Example(None, data["prompt"], data["response"])
