"""The probe batch verification runs on, and the metrics that compare two sets of its logits.

Torch only: the daemon, the bench and the tests share it on machines without the service's
dependencies.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# The log-softmax of 8 x 64 tokens over a 152k vocabulary is ~300 MB in fp32 per side; a chunk of
# rows keeps the transient small on a GPU that already holds the model twice.
_ROWS_PER_CHUNK = 64


def probe_batch(
    vocab_size: int,
    *,
    seed: int = 0,
    count: int = 8,
    length: int = 64,
    token_ids: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """The fixed probe: explicit `token_ids`, or `count` seeded sequences of `length` tokens.

    Returns int64 [count, length] on the CPU. The same arguments always give the same batch, so
    versions of one deployment are scored on the same tokens. Explicit sequences must all have
    one length (no padding, so no position is scored on a pad token) and ids below `vocab_size`.
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if token_ids is not None:
        rows = [list(row) for row in token_ids]
        if not rows or not rows[0]:
            raise ValueError("probe token_ids must hold at least one non-empty sequence")
        lengths = sorted({len(row) for row in rows})
        if len(lengths) > 1:
            raise ValueError(f"probe token_ids must all have one length, got lengths {lengths}")
        batch = torch.tensor(rows, dtype=torch.int64)
        bad = (batch < 0) | (batch >= vocab_size)
        if bool(bad.any()):
            row, col = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"probe token id {int(batch[row, col])} at sequence {row}, position {col} is "
                f"outside the vocabulary [0, {vocab_size})"
            )
        return batch
    if count < 1 or length < 1:
        raise ValueError(f"probe count and length must be positive, got {count} and {length}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, vocab_size, (count, length), generator=generator, dtype=torch.int64)


# A reference's top tokens within this many nats of each other are a near-tie: any rounding may
# pick either, so the candidate picking the other one is not a disagreement (README: calibration).
TOP1_MARGIN_NATS = 1.0


def logit_metrics(
    reference: torch.Tensor, candidate: torch.Tensor, *, margin: float = TOP1_MARGIN_NATS
) -> dict[str, float]:
    """Compare candidate logits with reference logits, both [batch, seq, vocab].

    - `mean_kl` / `max_kl`: per-token KL(reference || candidate) in nats, averaged / maximized
      over every position;
    - `top1_near_agreement`: share of positions where the candidate's top token is the
      reference's, or one the reference scores within `margin` nats of its own top token (so a
      near-tie that rounding flips is not a disagreement; a flip to a token the reference finds
      clearly less likely is);
    - `top1_agreement`: share of positions whose argmax agrees exactly (near-ties included; shown,
      not gated);
    - `max_top1_regret`: the largest log p_ref(reference's top) - log p_ref(candidate's top);
    - `max_abs_logit_diff`: the largest |candidate - reference| over every position and entry.

    Computed in fp32 on the logits' device, with one device-to-host transfer at the end. A
    non-finite logit anywhere makes the KL and logit metrics inf (never NaN) and the agreements 0,
    so a threshold comparison always fails it.
    """
    if reference.shape != candidate.shape:
        raise ValueError(
            f"logit shapes differ: reference {list(reference.shape)}, "
            f"candidate {list(candidate.shape)}"
        )
    vocab = reference.shape[-1]
    ref_rows = reference.reshape(-1, vocab)
    cand_rows = candidate.reshape(-1, vocab)
    tokens = ref_rows.shape[0]
    if tokens == 0:
        raise ValueError("no logits to compare")
    sums: list[torch.Tensor] = []  # per chunk: kl sum, agree, near agree, finite
    maxes: list[torch.Tensor] = []  # per chunk: kl max, regret max, diff max
    for start in range(0, tokens, _ROWS_PER_CHUNK):
        ref = ref_rows[start : start + _ROWS_PER_CHUNK].float()
        cand = cand_rows[start : start + _ROWS_PER_CHUNK].float()
        finite = torch.isfinite(ref).all() & torch.isfinite(cand).all()
        ref_logp = torch.log_softmax(ref, dim=-1)
        cand_logp = torch.log_softmax(cand, dim=-1)
        # KL is never negative; fp32 rounding can give -1e-9 on identical rows.
        kl = (ref_logp.exp() * (ref_logp - cand_logp)).sum(dim=-1).clamp_min(0.0)
        ref_top = ref_logp.max(dim=-1)
        picked = ref_logp.gather(-1, cand.argmax(dim=-1, keepdim=True)).squeeze(-1)
        regret = ref_top.values - picked
        agree = (ref_top.indices == cand.argmax(dim=-1)).sum()
        near = (regret <= margin).sum()
        sums.append(torch.stack([kl.sum(), agree.float(), near.float(), finite.float()]))
        maxes.append(torch.stack([kl.max(), regret.max(), (cand - ref).abs().max()]))
    kl_sum, agree, near, finite_chunks = torch.stack(sums).sum(dim=0).tolist()
    kl_max, regret_max, diff_max = torch.stack(maxes).amax(dim=0).tolist()
    if finite_chunks < len(sums):
        return {
            "mean_kl": float("inf"),
            "max_kl": float("inf"),
            "top1_near_agreement": 0.0,
            "top1_agreement": 0.0,
            "max_top1_regret": float("inf"),
            "max_abs_logit_diff": float("inf"),
            "tokens": float(tokens),
        }
    return {
        "mean_kl": kl_sum / tokens,
        "max_kl": kl_max,
        "top1_near_agreement": near / tokens,
        "top1_agreement": agree / tokens,
        "max_top1_regret": regret_max,
        "max_abs_logit_diff": diff_max,
        "tokens": float(tokens),
    }


__all__ = ["TOP1_MARGIN_NATS", "logit_metrics", "probe_batch"]
