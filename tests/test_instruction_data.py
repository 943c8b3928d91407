"""Instruction data (data.format "instruction") with a checkpoint's own tokenizer: EOS without a pad token,
chat-template rendering and the response-only loss mask against hand-built expectations, whole-example
packing, the loader's labels, and the errors (no EOS, messages without a template, config, vocabulary)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from ds_moe_div.config import load_experiment
from ds_moe_div.config_loader import ConfigError
from ds_moe_div.data import BatchLoader, DataConfig, DataError, TokenizerConfig, load_tokenizer, prepare_data
from ds_moe_div.data.example_packing import assign_rows, fit_to_row
from ds_moe_div.data.examples import canonical_example, parse_example
from ds_moe_div.data.instruction import InstructionEncoder
from ds_moe_div.data.special import special_token_ids
from tests.instruction_fixtures import make_chat_dir, write_jsonl

pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore")

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus two?"},
                {"role": "assistant", "content": "It is 4."}, {"role": "user", "content": "And in code?"},
                {"role": "assistant", "content": "def add(a, b): return a + b"}]
# The ChatML rendering, cut where the loss mask changes: (text, scored).
RENDERED = [(("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 plus two?<|im_end|>\n"
              "<|im_start|>assistant\n"), False), ("It is 4.<|im_end|>\n", True),
            ("<|im_start|>user\nAnd in code?<|im_end|>\n<|im_start|>assistant\n", False),
            ("def add(a, b): return a + b<|im_end|>\n", True)]


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    return make_chat_dir(tmp_path_factory.mktemp("chat") / "tiny_chat")


def _expected(tokenizer, pieces):
    ids, mask = [], []
    for text, scored in pieces:
        piece = tokenizer.encode(text, add_special_tokens=False).ids
        ids += piece
        mask += [int(scored)] * len(piece)
    return ids, mask


def _encoder(chat_dir, scored="response", template=True):
    tokenizer = load_tokenizer(chat_dir / "tokenizer.json", project_tokens=False)
    ids = special_token_ids(tokenizer, chat_dir, source=chat_dir / "tokenizer.json")
    return tokenizer, ids, InstructionEncoder(tokenizer, eos_id=ids.eos_id, template_dir=chat_dir if template else None,
                                              scored=scored)


def _text(row: dict, **cfg) -> str:
    return canonical_example(row, DataConfig(format="instruction", **cfg), source="t.jsonl", row=1)


def test_checkpoint_eos_without_pad_token(chat_dir):
    tokenizer, ids, _ = _encoder(chat_dir)
    im_end = tokenizer.token_to_id("<|im_end|>")
    assert tokenizer.token_to_id("<|pad|>") is None and tokenizer.token_to_id("<|eos|>") is None
    assert (ids.eos_id, ids.pad_id) == (im_end, im_end)  # no pad token: padding holds the EOS id
    assert "tokenizer_config.json" in ids.eos_from


def test_eos_sources_in_documented_order(tmp_path, chat_dir):
    for name in ("tokenizer.json", "config.json"):
        shutil.copy(chat_dir / name, tmp_path / name)
    tokenizer = load_tokenizer(tmp_path / "tokenizer.json", project_tokens=False)
    endoftext, im_start, im_end = (tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [endoftext, im_end], "pad_token_id": im_start}))
    assert special_token_ids(tokenizer, tmp_path, source="t").eos_id == endoftext  # config.json, first of a list
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": im_start}))
    assert special_token_ids(tokenizer, tmp_path, source="t").eos_id == im_start  # generation_config before config
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"}}))
    assert special_token_ids(tokenizer, tmp_path, source="t").eos_id == im_end
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    found = special_token_ids(tokenizer, tmp_path, source="t")
    assert (found.eos_id, found.pad_id) == (endoftext, im_start)  # tokenizer_config first; pad from config.json


def test_tokenizer_without_any_eos_is_refused(tmp_path, chat_dir):
    shutil.copy(chat_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "x"}))
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": f"b{i}", "domain": "x"} for i in range(8)])
    cfg = DataConfig(corpus=str(tmp_path / "d.jsonl"), format="instruction", cache_dir=str(tmp_path / "cache"),
                     val_fraction=0.0, test_fraction=0.0,
                     tokenizer=TokenizerConfig(path=str(tmp_path / "tokenizer.json")), seq_len=16)
    with pytest.raises(DataError, match=r"no end-of-text token.*Add \"eos_token\".*tokenizer_config.json"):
        prepare_data(cfg, show_progress=False)
    assert not any((tmp_path / "cache").rglob("manifest.json"))  # nothing cached


def test_messages_rendered_with_chat_template_and_masked_to_responses(chat_dir):
    tokenizer, _, encoder = _encoder(chat_dir)
    text = _text({"messages": CONVERSATION})
    rendered, _ = encoder.render(parse_example(text), "t")
    assert rendered == "".join(piece for piece, _ in RENDERED)
    [(ids, mask)] = encoder.encode_batch([text], ["t"])
    want_ids, want_mask = _expected(tokenizer, RENDERED)
    assert ids.tolist() == want_ids and mask.tolist() == want_mask
    assert tokenizer.decode([i for i, m in zip(want_ids, want_mask) if m], skip_special_tokens=False) == \
        "It is 4.<|im_end|>\ndef add(a, b): return a + b<|im_end|>\n"
    _, _, everything = _encoder(chat_dir, scored="all")
    assert everything.encode_batch([text], ["t"])[0][1].tolist() == [1] * len(want_ids)


def test_prompt_response_with_template_and_plain(chat_dir):
    tokenizer, ids, encoder = _encoder(chat_dir)
    text = _text({"prompt": "What is 2 plus two?", "response": "It is 4."})
    [(got, mask)] = encoder.encode_batch([text], ["t"])
    want = _expected(tokenizer, [("<|im_start|>user\nWhat is 2 plus two?<|im_end|>\n<|im_start|>assistant\n", False),
                                 ("It is 4.<|im_end|>\n", True)])
    assert (got.tolist(), mask.tolist()) == want
    _, _, plain = _encoder(chat_dir, template=False)  # no template: prompt + response + EOS
    [(got, mask)] = plain.encode_batch([text], ["t"])
    prompt, response = (tokenizer.encode(t, add_special_tokens=False).ids for t in ("What is 2 plus two?", "It is 4."))
    assert got.tolist() == prompt + response + [ids.eos_id]
    assert mask.tolist() == [0] * len(prompt) + [1] * (len(response) + 1)
    with pytest.raises(DataError, match=r"messages example needs a chat template.*chat_template.*prompt/response"):
        plain.encode_batch([_text({"messages": CONVERSATION})], ["data.jsonl example 3"])


def test_examples_without_response_are_empty_and_bad_rows_named():
    assert _text({"prompt": "q", "response": "  "}) == ""
    assert _text({"messages": [{"role": "user", "content": "q"}]}) == ""
    with pytest.raises(DataError, match=r"t.jsonl:1: an instruction example needs column 'messages', or 'prompt' and "
                                        r"'response'.*data.messages_column"):
        _text({"text": "q"})
    with pytest.raises(DataError, match=r"message 0 of 'messages'.*\"role\": <str>"):
        _text({"messages": [{"role": "user"}]})
    assert json.loads(_text({"q": "a", "a": "b"}, prompt_column="q", response_column="a")) == {"prompt": "a",
                                                                                                 "response": "b"}


def test_instruction_config_keys_are_validated():
    cfg = load_experiment(None, ["data.format=instruction"])
    assert cfg.data.scored == "response" and DataConfig().scored == "all"
    assert load_experiment(None, ["data.format=instruction", "data.loss_on=all"]).data.scored == "all"
    with pytest.raises((ValueError, ConfigError), match=r"loss_on=\"response\" needs format=\"instruction\""):
        load_experiment(None, ["data.loss_on=response"])
    with pytest.raises((ValueError, ConfigError), match="format"):
        load_experiment(None, ["data.format=chat"])
    with pytest.raises(ValueError, match="messages_column is empty"):
        DataConfig(format="instruction", messages_column="")


def test_packing_keeps_examples_whole_and_truncates_long_ones():
    ids, mask = np.arange(10, dtype=np.int32), np.array([0] * 6 + [1] * 4, np.uint8)
    assert fit_to_row(ids, mask, 6) is None  # no response token left: dropped
    cut = fit_to_row(ids, mask, 8)
    assert cut[2] and cut[0].tolist() == list(range(8)) and cut[1].tolist() == [0] * 6 + [1] * 2
    assert assign_rows(np.array([4, 3, 2, 5, 5]), [np.array([0, 1, 2, 3, 4])], 9) == [[0, 1, 2], [3], [4]]


def test_prepared_rows_and_loader_labels(chat_dir, tmp_path):
    rows = [{"messages": CONVERSATION, "domain": "chat"}] + [
        {"prompt": f"Write code number {i}:", "response": f" def add(a, b): return a + {i}", "domain": "code"}
        for i in range(12)] + [{"prompt": "What is two plus two? " * 12, "response": "It is four.", "domain": "code"},
                               {"prompt": "Write code:", "response": " def add(a, b): return a + b" * 9, "domain": "code"}]
    cfg = DataConfig(corpus=str(write_jsonl(tmp_path / "d.jsonl", rows)), format="instruction", seq_len=96,
                     cache_dir=str(tmp_path / "cache"), val_fraction=0.0, test_fraction=0.0, packing="mixed",
                     tokenizer=TokenizerConfig(path=str(chat_dir / "tokenizer.json")))
    data = prepare_data(cfg, show_progress=False)
    tokenizer, ids, _ = _encoder(chat_dir)
    assert (data.eos_id, data.pad_id) == (ids.eos_id, ids.eos_id)
    assert data.stats.dropped_examples["train"] == 1  # the long prompt: no response token fits a row
    assert data.stats.truncated_examples["train"] == 1  # the long response: cut, its start kept
    split = data.splits["train"]
    want_ids, want_mask = _expected(tokenizer, RENDERED)
    found = [r for r in range(len(split)) if split.tokens_NS1[r, :len(want_ids)].tolist() == want_ids]
    assert len(found) == 1 and split.loss_mask_NS1[found[0], :len(want_ids)].tolist() == want_mask
    domains = np.asarray(split.domains_NS1)
    assert ((np.asarray(split.loss_mask_NS1) == 1) <= (domains >= 0)).all()  # padding is never scored
    assert data.stats.scored_tokens["train"] == int(np.asarray(split.loss_mask_NS1)[:, 1:].sum())
    batch = next(iter(BatchLoader(split, micro_batch_size=len(split), shuffle=False, loop=False)))
    mask_t = torch.from_numpy(np.asarray(split.loss_mask_NS1, dtype=np.int64))
    tokens_t = torch.from_numpy(np.asarray(split.tokens_NS1, dtype=np.int64))
    assert torch.equal(batch["labels"], torch.where(mask_t[:, 1:] == 1, tokens_t[:, 1:], -100))
    assert torch.equal(batch["domain_ids"] >= 0, torch.from_numpy(domains[:, :-1] >= 0))  # prompts keep domains
    assert (batch["domain_ids"] >= 0).sum() > (batch["labels"] != -100).sum()


def test_vocabulary_bigger_than_embedding_is_refused(chat_dir, tmp_path):
    from ds_moe_div.hf.vocab import check_vocabulary

    check_vocabulary(chat_dir / "tokenizer.json", chat_dir)
    rows = json.loads((chat_dir / "config.json").read_text())["vocab_size"]
    big = load_tokenizer(chat_dir / "tokenizer.json", project_tokens=False)
    big.add_tokens([f"extra{i}" for i in range(rows + 5 - big.get_vocab_size())])
    big.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=rf"ids up to {rows + 4} \({rows + 5} rows\).*embeds only {rows} tokens.*"
                                         "leave data.tokenizer.path unset"):
        check_vocabulary(tmp_path / "tokenizer.json", chat_dir)


def test_parquet_rows_and_a_tokenizer_trained_here(tmp_path):
    """Parquet with messages (null where a row has prompt/response); no tokenizer.path: a BPE trained on the
    examples' plain text, prompt + response + <|eos|>, and messages refused (no template)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"Question {i}:", "response": f" answer {i}.", "messages": None, "domain": "ab"[i % 2]}
            for i in range(40)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    cfg = DataConfig(corpus=str(tmp_path / "d.parquet"), format="instruction", seq_len=32,
                     cache_dir=str(tmp_path / "cache"), tokenizer=TokenizerConfig(vocab_size=300, min_frequency=1))
    data = prepare_data(cfg, show_progress=False)
    assert data.stats.documents["train"]["a"] + data.stats.documents["train"]["b"] > 30
    tokenizer = load_tokenizer(data.tokenizer_path)
    split = data.splits["train"]
    row, mask = split.tokens_NS1[0].tolist(), split.loss_mask_NS1[0].tolist()
    assert row[0] != data.eos_id and data.eos_id == tokenizer.token_to_id("<|eos|>")
    first_end = row.index(data.eos_id)
    text = tokenizer.decode(row[:first_end])
    assert text.startswith("Question ") and " answer " in text
    prompt_len = len(tokenizer.encode(text[:text.index(" answer")], add_special_tokens=False).ids)
    assert mask[:first_end + 1] == [0] * prompt_len + [1] * (first_end + 1 - prompt_len)
    messages = [{"prompt": None, "response": None, "messages": CONVERSATION, "domain": "a"}] * 1
    pq.write_table(pa.Table.from_pylist(rows + messages), tmp_path / "m.parquet")
    with pytest.raises(DataError, match="messages example needs a chat template"):
        prepare_data(DataConfig(corpus=str(tmp_path / "m.parquet"), format="instruction", seq_len=32,
                                cache_dir=str(tmp_path / "cache"), tokenizer=cfg.tokenizer), show_progress=False)
