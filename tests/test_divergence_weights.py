"""`objectives.divergence.domain_weights`: the generalized divergence weights domains by their token share
(the spec's w_d) by default, also when the domain means are taken over sequences; `sequences` keeps the
(sequence, domain)-unit share. Both are checked against a naive loop over sequences and domains."""
from __future__ import annotations

import math

import pytest
import torch

from ds_moe_div import objectives as obj
from ds_moe_div.composer import ObjectiveComposer
from ds_moe_div.config import load_experiment
from ds_moe_div.model import ModelOutput
from ds_moe_div.routing import RoutingRecord

DT = torch.float64
E, D = 4, 3
# Domain 0 has long sequences, domain 2 short ones: token share and sequence share differ.
IDS = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 0],
                    [1, 1, 1, 1, 2, 2, -1, -1],
                    [2, 2, -1, -1, -1, -1, -1, -1],
                    [1, 1, 1, 0, 0, 0, 0, 0]])


def _entropy(p):
    return -sum(float(x) * math.log(float(x)) for x in p if x > 0)


def naive_generalized_jsd(probs_TE, ids_BS, weights):
    """Loops: q_d = mean over (sequence, domain) units of the unit's mean probs; w_d by tokens or units."""
    num_seqs, seq_len = ids_BS.shape
    units, tokens = {d: [] for d in range(D)}, {d: 0 for d in range(D)}
    for b in range(num_seqs):
        for d in range(D):
            rows = [b * seq_len + s for s in range(seq_len) if int(ids_BS[b, s]) == d]
            if rows:
                units[d].append(probs_TE[rows].mean(0))
                tokens[d] += len(rows)
    present = [d for d in range(D) if units[d]]
    q = {d: torch.stack(units[d]).mean(0) for d in present}
    raw = {d: (tokens[d] if weights == "tokens" else len(units[d])) for d in present}
    w = {d: raw[d] / sum(raw.values()) for d in present}
    mixture = sum(w[d] * q[d] for d in present)
    return _entropy(mixture) - sum(w[d] * _entropy(q[d]) for d in present)


def _probs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(IDS.numel(), E, generator=g, dtype=DT).mul(2).softmax(-1)


def _composer_divergence(probs_TE, weights):
    cfg = load_experiment(None, ["objectives.balance.coef=0", "objectives.divergence.coef=1",
                                 'objectives.divergence.form="generalized"',
                                 'objectives.divergence.average="sequence"',
                                 f'objectives.divergence.domain_weights="{weights}"']).objectives
    idx = probs_TE.topk(2, -1).indices
    record = RoutingRecord(layer_id=0, logits_TE=probs_TE.log(), probs_TE=probs_TE, indices_TK=idx,
                           weights_TK=torch.full((len(idx), 2), 0.5, dtype=DT), kept_TK=torch.ones(len(idx), 2, dtype=torch.bool),
                           l_aux=torch.tensor(0.0, dtype=DT), capacity=None)
    out = ModelOutput(lm_loss=torch.tensor(0.0, dtype=DT), token_nll_BS=torch.zeros(IDS.shape, dtype=DT), routing=(record,))
    return ObjectiveComposer(cfg, num_domains=D)(out, domain_ids_BS=IDS, step=0).unscaled["divergence"]


@pytest.mark.parametrize("weights", ["tokens", "sequences"])
def test_generalized_sequence_average_matches_naive_loops(weights):
    probs = _probs()
    got = -_composer_divergence(probs, weights)
    expected = naive_generalized_jsd(probs, IDS, weights)
    assert float(got) == pytest.approx(expected, rel=1e-10)


def test_token_share_is_the_default_and_differs_from_sequence_share():
    assert load_experiment(None).objectives.divergence.domain_weights == "tokens"
    probs = _probs(1)
    tokens, sequences = naive_generalized_jsd(probs, IDS, "tokens"), naive_generalized_jsd(probs, IDS, "sequences")
    assert abs(tokens - sequences) > 1e-3 * abs(tokens)
    assert float(-_composer_divergence(probs, "tokens")) != pytest.approx(sequences, rel=1e-6)


def test_domain_token_counts_ignore_padding():
    counts = obj.domain_token_counts(domain_ids_BS=IDS, num_domains=D, dtype=DT)
    assert counts.tolist() == [13.0, 7.0, 4.0]
