"""A tiny Hugging Face MoE directory shaped like a chat model's, and instruction data for it.

The tokenizer has no pad token and none of the project's <|pad|>/<|eos|>: its EOS is `<|im_end|>`
(tokenizer_config.json, generation_config.json, config.json), and tokenizer_config.json carries a ChatML
chat template written here. Shared by tests/test_instruction_*.py.
"""
from __future__ import annotations

import json
from pathlib import Path

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
WORDS = ("user assistant system What is two plus two? It is four. Write code: def add(a, b): return a + b. "
         "The integral of x is x squared over two. Experts specialise on domains: code, math, prose. ") * 20


def chat_tokenizer():
    """A byte-level BPE with ChatML's special tokens; no pad token."""
    from tokenizers import trainers
    from tokenizers.pre_tokenizers import ByteLevel

    from ds_moe_div.data.tokenize import new_tokenizer

    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=300, min_frequency=1, special_tokens=list(SPECIAL),
                                  initial_alphabet=ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([WORDS], trainer=trainer)
    return tok


def make_chat_dir(out_dir, *, family: str = "qwen3_moe", template: bool = True, seed: int = 0) -> Path:
    """A tiny random `family` checkpoint whose tokenizer is chat_tokenizer() (EOS <|im_end|>, no pad)."""
    from ds_moe_div.hf.tiny import tiny_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = chat_tokenizer()
    eos = tok.token_to_id("<|im_end|>")
    model = tiny_model(family, vocab_size=tok.get_vocab_size(), seed=seed)
    model.config.eos_token_id, model.config.pad_token_id = eos, None
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = eos, None
    model.save_pretrained(out, max_shard_size="64KB", save_original_format=True)
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "bos_token": None,
              "pad_token": None, "model_max_length": 4096}
    if template:
        config["chat_template"] = CHATML
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return out


def write_jsonl(path, rows) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def instruction_rows(n: int = 48) -> list[dict]:
    """Alternating prompt/response and messages examples over two domains."""
    rows = []
    for i in range(n):
        domain = ("math", "code")[i % 2]
        if i % 3 == 0:
            rows.append({"messages": [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": f"What is {i} plus two?"},
                                      {"role": "assistant", "content": f"It is {i + 2}."},
                                      {"role": "user", "content": "And in code?"},
                                      {"role": "assistant", "content": f"def add(a, b): return a + b  # {i}"}],
                         "domain": domain})
        else:
            rows.append({"prompt": f"Write code number {i}:", "response": f" def add(a, b): return a + {i}",
                         "messages": None, "domain": domain})
    return rows
