"""Log-likelihoods of continuations given contexts, for our model in memory (EP=1, one process).

    scorer = ModelScorer(model, tokenizer, max_length=cfg.data.seq_len, batch_size=16)
    scorer.loglikelihood([("The capital of France is", " Paris")])   # [(sum log p, is_greedy)]
    scorer.loglikelihood_rolling(["a whole document"])               # [sum log p of every token]
    scorer.logits(input_ids_BS)                                      # [B, S, V] fp32

The semantics are lm-eval's (so that `lm_eval_bridge.DsMoeLM` and our own cloze harness agree):
  - a pair is encoded as in `lm_eval.api.model.TemplateLM._encode_pair`: trailing whitespace of the
    context moves to the continuation, the whole string is encoded and the continuation is the tokens
    after the context's; an empty context is replaced by <|eos|> (the "end of text" prefix);
  - the score is the sum of log p(continuation token | everything before) over the continuation's
    tokens; `is_greedy` is True when every continuation token is the argmax of its distribution;
  - the model sees at most `max_length` (its training seq_len: rotary tables end there) input tokens:
    longer inputs keep their last tokens (left truncation), as lm-eval's HF model does.
Scoring is dropless by default (every MoE gate's `drop_tokens` off within a call): with capacity-based
dropping a sequence's score would depend on the other sequences of its batch (padding and neighbours
compete for expert slots), and lm-eval batches requests differently from our harness. Shape suffixes
(docs/SHAPES.md): B sequences, S positions, V vocabulary.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from ds_moe_div.data.loader import IGNORE_INDEX


@contextlib.contextmanager
def dropless(model):
    """Within the block no MoE layer of `model` drops tokens for capacity (restored afterwards). AutoEP
    layers (imported models) are dropless already."""
    gates = [layer.gate for layer in model.moe_layers() if hasattr(layer, "gate")]
    saved = [gate.drop_tokens for gate in gates]
    try:
        for gate in gates:
            gate.drop_tokens = False
        yield
    finally:
        for gate, value in zip(gates, saved):
            gate.drop_tokens = value


class ModelScorer:
    """Log-likelihoods and next-token logits of a `MoELanguageModel` (or a DeepSpeed engine around one).

    `tokenizer`: a `tokenizers.Tokenizer` (the run's tokenizer.json); `eos_id`/`pad_id`: its special ids.
    """

    def __init__(self, model, tokenizer, *, eos_id: int, pad_id: int, max_length: int, batch_size: int = 16,
                 drop_tokens: bool = False) -> None:
        if max_length < 2 or batch_size < 1:
            raise ValueError(f"max_length={max_length} must be >= 2 and batch_size={batch_size} >= 1")
        self.module = getattr(model, "module", model)  # an engine's module
        self.tokenizer, self.eos_id, self.pad_id = tokenizer, eos_id, pad_id
        self.max_length, self.batch_size, self.drop_tokens = max_length, batch_size, drop_tokens

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context == "":
            return [self.eos_id], self.encode(continuation)
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.encode(context + continuation)
        context_ids = self.encode(context)
        return context_ids, whole[len(context_ids):]

    def logits(self, input_ids_BS: torch.Tensor) -> torch.Tensor:
        """fp32 logits [B, S, V] of the model's lm_head (captured by a forward hook; eval mode, no grad)."""
        captured = []
        handle = self.module.lm_head.register_forward_hook(lambda _m, _i, out: captured.append(out))
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.no_grad(), (contextlib.nullcontext() if self.drop_tokens else dropless(self.module)):
                ids = input_ids_BS.to(self.device)
                self.module(ids, labels_BS=torch.full_like(ids, IGNORE_INDEX))
        finally:
            handle.remove()
            self.module.train(was_training)
        return captured[-1].float()

    def loglikelihood_tokens(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, bool]]:
        """(sum log p, is_greedy) of each (context ids, continuation ids); batched, longest first."""
        windows = []
        for context, continuation in pairs:
            if not continuation:
                raise ValueError("an empty continuation has no log-likelihood")
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            windows.append((whole[:-1], whole[1:], min(len(continuation), len(whole) - 1)))
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
        results: list[tuple[float, bool] | None] = [None] * len(windows)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            width = len(windows[chunk[0]][0])
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            for row, i in enumerate(chunk):
                ids[row, :len(windows[i][0])] = torch.tensor(windows[i][0])
            logprobs = torch.log_softmax(self.logits(ids), dim=-1).cpu()
            for row, i in enumerate(chunk):
                inputs, targets, n = windows[i]
                positions = torch.arange(len(inputs) - n, len(inputs))
                wanted = torch.tensor(targets[-n:])
                rows = logprobs[row, positions]
                score = rows.gather(1, wanted[:, None]).sum().item()
                results[i] = (score, bool((rows.argmax(-1) == wanted).all()))
        return results

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in requests])

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        """Sum of log p of every token of each text, predicted in disjoint windows of max_length tokens
        (lm-eval's rolling windows with context_len=1: a window's first input is the previous token,
        <|eos|> before the text)."""
        pairs, owner = [], []
        for t, text in enumerate(texts):
            ids = self.encode(text)
            for start in range(0, len(ids), self.max_length):
                previous = ids[start - 1] if start else self.eos_id
                pairs.append(([previous], ids[start:start + self.max_length]))
                owner.append(t)
        totals = [0.0] * len(texts)
        for t, (score, _) in zip(owner, self.loglikelihood_tokens(pairs)):
            totals[t] += score
        return totals
