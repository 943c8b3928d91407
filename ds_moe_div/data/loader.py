"""BatchLoader: seeded, rank-sharded, resumable micro-batches of packed sequences as torch tensors.

Global order: per epoch a seeded permutation of the split (natural) or a seeded draw in which every
domain appears equally often (balanced, see epoch_order). Global step t covers positions [t*G, (t+1)*G) of that order,
G = micro_batch_size * world_size; rank r takes [t*G + r*B, t*G + (r+1)*B). So one rank with 2B sees
exactly the union of what two ranks with B see, and the order does not depend on world_size.
Training (loop=True) drops the last partial global step of an epoch. Evaluation (loop=False): one pass
in file order (unless shuffle), the last global step padded with rows of <|pad|> inputs, labels -100 and
domain -1, so every rank runs the same number of steps with the same shapes.

Batch: input_ids [B,S] int64 = tokens[:, :-1]; labels [B,S] int64 = tokens[:, 1:] (-100 where the target
is padding, or, for instruction data, not a response token: loss_mask 0); domain_ids [B,S] int64 =
domains[:, :-1] (-1 = padding; prompt tokens keep their example's domain).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from .errors import DataError
from .prepared import PackedSplit

IGNORE_INDEX = -100


def check_enough(split: PackedSplit, global_batch_size: int) -> None:
    """Raise DataError when `split` holds fewer sequences than one global batch (micro * world_size)."""
    if len(split) < global_batch_size:
        raise DataError(
            f"split {split.name!r} holds {len(split)} sequences of seq_len {split.seq_len}, fewer than one global "
            f"batch of {global_batch_size} (micro_batch_size * world_size); use a larger corpus, a smaller "
            "seq_len or micro_batch_size, or a larger val/test fraction for evaluation splits")


def epoch_order(split: PackedSplit, *, epoch: int, seed: int, shuffle: bool, sampling: str,
                global_batch: int = 1) -> np.ndarray:
    """Sequence indices of one epoch, a pure function of its arguments.

    balanced: every domain present in the split is drawn equally often, per_domain times, where
    per_domain >= N / num_domains is rounded up so that the epoch is a whole number of global batches.
    Slots are laid out as consecutive random permutations of the domains, so each global batch is close
    to balanced too; within a domain, sequences are drawn without replacement until its pool is used up.
    """
    n = len(split)
    if sampling == "natural":
        return np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    rng = np.random.default_rng([seed, epoch, 1])
    pools = [np.flatnonzero(split.domain_of_sequence_N == d) for d in range(split.num_domains)]
    pools = [pool for pool in pools if len(pool)]
    quantum = global_batch // math.gcd(len(pools), global_batch)
    per_domain = -(-n // (len(pools) * quantum)) * quantum
    slots = np.concatenate([rng.permutation(len(pools)) for _ in range(per_domain)])
    order = np.empty(len(slots), dtype=np.int64)
    for d, pool in enumerate(pools):
        reps = -(-per_domain // len(pool))
        order[slots == d] = np.concatenate([rng.permutation(pool) for _ in range(reps)])[:per_domain]
    return order


class BatchLoader:
    def __init__(self, split: PackedSplit, *, micro_batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, sampling: str = "natural", loop: bool = True) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size={micro_batch_size}: must be >= 1")
        if sampling not in ("natural", "balanced"):
            raise ValueError(f"sampling={sampling!r}: use 'natural' or 'balanced'")
        if sampling == "balanced" and not shuffle:
            raise ValueError("sampling='balanced' draws at random: use shuffle=True (or sampling='natural')")
        self.split, self.micro, self.rank, self.world = split, micro_batch_size, rank, world_size
        self.seed, self.shuffle, self.sampling, self.loop = seed, shuffle, sampling, loop
        self.global_batch = micro_batch_size * world_size
        if loop:
            check_enough(split, self.global_batch)
        elif len(split) == 0:
            raise DataError(f"split {split.name!r} is empty; set a nonzero {split.name}_fraction to evaluate on it")
        self.epoch, self.step = 0, 0
        self._order_epoch, self._order = -1, np.zeros(0, np.int64)

    def __len__(self) -> int:
        """Steps per epoch (one pass when loop=False)."""
        n = len(self._epoch_order(self.epoch))
        return n // self.global_batch if self.loop else -(-n // self.global_batch)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            self._order = epoch_order(self.split, epoch=epoch, seed=self.seed, shuffle=self.shuffle,
                                      sampling=self.sampling, global_batch=self.global_batch)
            self._order_epoch = epoch
        return self._order

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if not self.loop:  # each iteration is a fresh evaluation pass
            self.epoch, self.step = 0, 0
            return (self._batch(step) for step in range(len(self)))
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if not self.loop:
            raise TypeError("a loop=False loader is iterated with `for batch in loader`")
        if self.step >= len(self):
            self.epoch, self.step = self.epoch + 1, 0
        batch = self._batch(self.step)
        self.step += 1
        return batch

    def _batch(self, step: int) -> dict[str, torch.Tensor]:
        order = self._epoch_order(self.epoch)
        start = step * self.global_batch + self.rank * self.micro
        index = order[start:start + self.micro]
        sort = np.argsort(index, kind="stable")  # memmap reads in file order, then back to draw order
        tokens = np.asarray(self.split.tokens_NS1[index[sort]])[np.argsort(sort)]
        domains = np.asarray(self.split.domains_NS1[index[sort]])[np.argsort(sort)]
        if len(index) < self.micro:  # evaluation only: pad to a full micro-batch
            missing = self.micro - len(index)
            tokens = np.concatenate([tokens, np.full((missing, tokens.shape[1]), self.split.pad_id, np.int32)])
            domains = np.concatenate([domains, np.full((missing, domains.shape[1]), -1, np.int16)])
        tokens_t = torch.from_numpy(tokens.astype(np.int64))
        domains_t = torch.from_numpy(domains.astype(np.int64))
        labels = tokens_t[:, 1:].masked_fill(domains_t[:, 1:] < 0, IGNORE_INDEX)
        if self.split.loss_mask_NS1 is not None:  # instruction data: prompt targets are not scored
            mask = np.asarray(self.split.loss_mask_NS1[index[sort]])[np.argsort(sort)]
            mask = np.concatenate([mask, np.zeros((self.micro - len(index), mask.shape[1]), np.uint8)])
            labels = labels.masked_fill(torch.from_numpy(mask[:, 1:] == 0), IGNORE_INDEX)
        return {"input_ids": tokens_t[:, :-1].contiguous(), "labels": labels.contiguous(),
                "domain_ids": domains_t[:, :-1].contiguous()}

    def state_dict(self) -> dict:
        """Position of the next batch; with load_state_dict a resumed loader continues exactly."""
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "sampling": self.sampling,
                "shuffle": self.shuffle, "global_batch_size": self.global_batch, "num_sequences": len(self.split)}

    def load_state_dict(self, state: dict) -> None:
        expected = {"seed": self.seed, "sampling": self.sampling, "shuffle": self.shuffle,
                    "global_batch_size": self.global_batch, "num_sequences": len(self.split)}
        changed = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        if changed:
            raise ValueError(f"loader state does not fit this loader (saved, now): {changed}; resume with the "
                             "same data, seed, sampling and global batch size (world_size may change)")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
