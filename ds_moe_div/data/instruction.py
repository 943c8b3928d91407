"""Render instruction examples into token ids and a loss mask (1 = a token the LM loss scores as a target).

    encoder = InstructionEncoder(tokenizer, eos_id=eos, template_dir=Path(tokenizer_path).parent, scored="response")
    [(ids, mask)] = encoder.encode_batch([text], where=["train.jsonl:3"])   # text: examples.canonical_example

With a chat template (`chat_template` in the folder's tokenizer_config.json, or chat_template.jinja /
chat_template.json there; read with transformers' `AutoTokenizer.from_pretrained(folder)` and rendered with
its `apply_chat_template`): the conversation is rendered once (a prompt/response pair as one user and one
assistant message). The response of assistant message i is the text between the rendering of messages[:i]
with the generation prompt and the rendering of messages[:i+1]: its content and whatever the template closes
the turn with (e.g. `<|im_end|>`), so the model learns to stop. A template that does not render a
conversation as a prefix of the next longer one (some drop earlier reasoning) is refused. The rendered text is
tokenised once without added special tokens (the template writes its own BOS), and a token is scored when its
first character lies in a response.
Without a template: prompt ids + response ids + EOS (each tokenised on its own, nothing added in between, no
BOS: put any separator at the end of the prompt); the response ids and the EOS are scored. `messages` without
a template is refused. scored "all": every token of the example is scored (padding never is).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import DataError
from .examples import ASSISTANT, Example, parse_example
from .special import read_json

TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def has_chat_template(folder: Path | None) -> bool:
    if folder is None:
        return False
    if any((folder / name).is_file() for name in TEMPLATE_FILES):
        return True
    return bool(read_json(folder / "tokenizer_config.json").get("chat_template"))


def load_chat_tokenizer(folder: Path):
    """transformers' tokenizer of `folder` (only its chat template and special-token strings are used)."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise DataError(f"{folder} has a chat template; rendering it needs transformers (pip install -e '.[hf]')") from None
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a broken folder
        raise DataError(f"{folder}: transformers cannot load this tokenizer folder for its chat template "
                        f"({type(e).__name__}: {e}); fix its tokenizer_config.json") from None


class InstructionEncoder:
    def __init__(self, tokenizer, *, eos_id: int, template_dir: Path | None, scored: str) -> None:
        """`tokenizer`: the data's `tokenizers.Tokenizer` (it encodes); `template_dir`: the folder whose
        chat template renders (None or no template there: prompt + response + EOS)."""
        self.tokenizer, self.eos_id, self.scored = tokenizer, eos_id, scored
        self.template_dir = template_dir
        self.chat = load_chat_tokenizer(template_dir) if has_chat_template(template_dir) else None

    def _apply(self, messages: list[dict], generation_prompt: bool, where: str) -> str:
        try:
            return self.chat.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as e:  # noqa: BLE001 - jinja templates raise their own errors (raise_exception)
            raise DataError(f"{where}: the chat template of {self.template_dir} refused this conversation "
                            f"({type(e).__name__}: {e}); fix the example's roles or order") from None

    def render(self, example: Example, where: str) -> tuple[str, list[tuple[int, int]]]:
        """(rendered text, [(start, end)) character spans of the responses)."""
        messages = example.as_messages()
        full = self._apply(messages, False, where)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != ASSISTANT:
                continue
            before, upto = self._apply(messages[:i], True, where), self._apply(messages[:i + 1], False, where)
            if not (upto.startswith(before) and full.startswith(upto)):
                raise DataError(f"{where}: the chat template of {self.template_dir} does not render this conversation "
                                f"as a continuation of its first {i} messages (+ generation prompt), so the response "
                                f"tokens of message {i} cannot be told apart; use a template that renders turns "
                                "independently, or prompt/response columns")
            spans.append((len(before), len(upto)))
        return full, spans

    def encode_batch(self, texts: list[str], where: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(int32 ids, uint8 mask) of each canonical example text."""
        examples = [parse_example(text) for text in texts]
        if self.chat is None:
            return self._plain(examples, where)
        rendered = [self.render(example, w) for example, w in zip(examples, where, strict=True)]
        encodings = self.tokenizer.encode_batch([text for text, _ in rendered], add_special_tokens=False)
        out = []
        for encoding, (_, spans) in zip(encodings, rendered, strict=True):
            starts = np.fromiter((start for start, _ in encoding.offsets), dtype=np.int64, count=len(encoding.offsets))
            mask = np.zeros(len(starts), dtype=bool)
            for lo, hi in spans:
                mask |= (starts >= lo) & (starts < hi)
            out.append(self._finish(np.asarray(encoding.ids, dtype=np.int32), mask))
        return out

    def _plain(self, examples: list[Example], where: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        for example, w in zip(examples, where, strict=True):
            if example.messages is not None:
                raise DataError(f"{w}: a messages example needs a chat template, and {self.template_dir or 'the tokenizer'} "
                                "has none; use the checkpoint's tokenizer folder (tokenizer_config.json with "
                                "\"chat_template\", or chat_template.jinja next to data.tokenizer.path), or give "
                                "prompt/response columns (rendered as prompt + response + EOS)")
        prompts = self.tokenizer.encode_batch_fast([e.prompt for e in examples], add_special_tokens=False)
        responses = self.tokenizer.encode_batch_fast([e.response for e in examples], add_special_tokens=False)
        out = []
        for prompt, response in zip(prompts, responses, strict=True):
            ids = np.asarray([*prompt.ids, *response.ids, self.eos_id], dtype=np.int32)
            mask = np.zeros(len(ids), dtype=bool)
            mask[len(prompt.ids):] = True
            out.append(self._finish(ids, mask))
        return out

    def _finish(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.scored == "all":
            mask = np.ones(len(ids), dtype=bool)
        return ids, mask.astype(np.uint8)
