"""Prior quality ranking for config-only plans (no weights to measure on).

Quality loss is expressed as the predicted increase of log-perplexity, ``loss = Δ ln ppl`` (shown as a percentage
of ppl, ``100·(e^loss − 1)``). Two published figures give the scale:

* **Quantization** (llama.cpp): the ``QUANT_OPTIONS`` table of ``tools/quantize/quantize.cpp`` (printed by
  ``llama-quantize --help``; also quoted in ggml-org/llama.cpp discussion #2094) gives the WikiText-2 ppl increase of
  each type on LLaMA-7B (F16 ppl 5.9066): Q8_0 +0.0004, Q6_K +0.0044, Q5_K_M +0.0142, Q4_K_M +0.0535 (and
  F16 "virtually no quality loss"). As ``Δ ln ppl``: 0.007%, 0.074%, 0.24%, 0.90%. ONNX dynamic int8 has no
  such table; it is given Q8_0's per-tensor-scale error scaled up ten-fold (assumption, marked).
* **Structured pruning**: FLAP (the best retraining-free structured method in ``../shared/docs/methods.md``
  §2.7) takes LLaMA-7B from 12.62 to 14.62 WikiText-2 ppl at 20% of the parameters removed (Δ ln ppl 0.147,
  i.e. 0.74% per percent pruned); LLM-Pruner without tuning reaches 19.77 at 20%. The prior uses the FLAP slope
  linearly, an *optimistic* bound for pruning (Wanda-sp goes from 22.12 at 20% to 366 at 50%: loss grows faster
  than linearly).

**Ranking.** Even the optimistic pruning slope costs as much as the worst K-quant above (+0.90%) at about 1.2%
pruning, and small models lose more to pruning than 7B ones, while nothing published shows structured pruning
beating a lower-precision quant at equal memory. So the prior ranks lexicographically: **least pruning first**
(achieved ratio), then the smaller quantization loss; it never prefers pruning at a higher-precision quant over
a lower-precision quant that fits without pruning. Measurement (:mod:`edgeprune.planner.quality`) replaces the
prior whenever weights are available.
"""
from __future__ import annotations

import math

# Δ ln ppl per quant (see module doc); f32/f16/fp32/fp16 are the reference precision
QUANT_PRIOR = {"f32": 0.0, "f16": 0.0, "q8_0": math.log1p(0.0004 / 5.9066), "q6_k": math.log1p(0.0044 / 5.9066),
               "q5_k_m": math.log1p(0.0142 / 5.9066), "q4_k_m": math.log1p(0.0535 / 5.9066),
               "fp32": 0.0, "fp16": 0.0, "int8": 10 * math.log1p(0.0004 / 5.9066)}
PRUNE_SLOPE = math.log(14.62 / 12.62) / 0.20        # FLAP, LLaMA-7B, 20%: Δ ln ppl per unit ratio


def prior_loss(quant: str, achieved_ratio: float) -> float:
    """Predicted ``Δ ln ppl`` of ``quant`` after removing ``achieved_ratio`` of the non-embedding parameters."""
    return QUANT_PRIOR[quant] + PRUNE_SLOPE * max(achieved_ratio, 0.0)


def prior_rank(quant: str, achieved_ratio: float) -> tuple:
    """Sort key of the prior ranking: least pruning (at 0.1% resolution), then the smaller quantization loss."""
    return (round(achieved_ratio, 3), QUANT_PRIOR[quant])


def loss_pct(loss: float) -> float:
    """``Δ ln ppl`` as the percentage increase of perplexity."""
    return 100 * math.expm1(loss)
