"""The gate and the candidate draw over a vocabulary split across tensor-parallel ranks, without
gathering the logits.

With a vocabulary-parallel output head, rank r holds the logits of the global indices
[offset_r, offset_r + V_r) of every row. Everything the fused gate needs from the base's logits is a
pass over the row that reduces to a few numbers, and those numbers combine across shards exactly as
the kernel's per-lane accumulators combine across lanes (kernels/sample.py scan_row):

  per shard (`shard_stats`), per row:  m     max of x
                                       z     sum exp(x - m)
                                       sx    sum exp(x - m) * (x - m)       (p log p terms, unnormalised)
                                       arg   first global index of m
                                       bv    max of s + g, s = x * inv_temp, g = gumbel(seed, step, stream,
                                             GLOBAL index): the same noise the unsharded draw adds
                                       bi    first global index of bv
  combine (`combine_stats`):           M = max m_r, w_r = exp(m_r - M), Z = sum w_r z_r,
                                       SX = sum w_r (sx_r + (m_r - M) z_r)
                                       p_top = 1 / Z, entropy = log Z - SX / Z
                                       greedy = smallest arg_r among shards with m_r == M
                                       gumbel = smallest bi_r among shards with bv_r == max bv

That is 6 numbers per row and rank: one all-gather of a [B, 6] float64 tensor (indices below 2**53
are exact in float64) replaces gathering [B, V] logits. Every rank combines the same gathered numbers
in the same order, so every rank ends with the same token (no broadcast of the result). The greedy
and Gumbel candidates equal the unsharded ones exactly (an argmax is order-free and each s + g is
the same float op on the same values; the first-index rule is kept by taking the smallest index
among the shards that reach the maximum). p_top and the entropy are sums, so they equal the unsharded
values to float32 rounding (the summation order differs), as the Triton kernel's do.

The nucleus (top_p < 1) path needs more: its cutoff depends on the global mass above it. Each of the
cutoff search's passes (kernels/sample.py nucleus_cutoff: 8 passes of 16 candidate cutoffs) sums a
mass per candidate on each shard: 8 all-reduces of [B, 16] floats (plus the global max and sum of
exp(s - mt) for mt, zt: one more all-gather), then the Gumbel argmax over the kept set is local and
combines like the plain draw. So 10 small collectives per step instead of 1; or gather each shard's
top-k (k = NUCLEUS_TOPK) values, which settles the cutoff whenever the top-k holds top_p of the
mass (as sample_rows_ref does), at B * k * N floats. Not implemented here: a batch with a nucleus
row falls back to gathering the logits (see parallel/tensor.py).

`nudge_step_from_candidates` is the rest of the decode step on rank 0: the nudger's candidate, the
rule, the ending and the splice, with the torch reference of kernels/nudge_gate.py
(step_from_candidates_ref), exactly as nudge_step_ref runs them after its candidates.
"""
from __future__ import annotations

import torch

from nudgefast.kernels.nudge_gate import (MODE_BASE_ONLY, MODE_NUDGER_ONLY, GateParams, GateState, ModelCursor,
                                          confident_from_stats, step_from_candidates_ref)
from nudgefast.kernels.rng import STREAM_NUDGER, gumbel_ref
from nudgefast.kernels.sample import CONTENDER_SPAN, NEG_BIG, SAMPLE_GREEDY

NUM_STATS = 6  # m, z, sx, arg, bv, bi


class Scratch:
    """[B, V_r] float32 buffers kept from one decode step to the next: on the CPU a fresh temporary of
    that size costs its page faults every step (milliseconds per few MB on a loaded machine)."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, like: torch.Tensor) -> torch.Tensor:
        b = self.buffers.get(name)
        if b is None or b.shape != like.shape or b.device != like.device:
            b = self.buffers[name] = torch.empty(like.shape, dtype=torch.float32, device=like.device)
        return b


def _mass(x: torch.Tensor, m: torch.Tensor, scratch: Scratch) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, sx) [B]: sum exp(x - m) and sum exp(x - m) * (x - m) over the row, in two kept buffers."""
    # a shard of only -inf logits: z = sx = 0 (not -inf - -inf = nan); combine_stats skips it
    xm = torch.sub(x, torch.where(m == float("-inf"), 0.0, m).unsqueeze(1), out=scratch.get("xm", x))
    e = torch.exp(xm, out=scratch.get("e", x))
    z = e.sum(dim=-1)
    # the sum of e * (x - m) where e > 0: a -inf entry (e = 0, xm = -inf) must add 0, not nan; clamping
    # xm to the finite range changes only those. In place, like the two buffers above
    sx = e.mul_(xm.clamp_(min=NEG_BIG)).sum(dim=-1)
    return z, sx


def shard_stats(logits: torch.Tensor, offset: int, seed: torch.Tensor, step: torch.Tensor, stream: int,
                inv_temp: torch.Tensor, mode: torch.Tensor, scratch: Scratch | None = None,
                with_stats: bool = True) -> torch.Tensor:
    """float64 [B, NUM_STATS]: this shard's numbers (see the module docstring). with_stats=False
    (base_only: no gate) skips z and sx (reported as 1 and 0: p_top and entropy are then meaningless).

    logits [B, V_r] are the global columns offset .. offset + V_r - 1; seed int64 [B], step int [B],
    inv_temp float32 [B] (float32(1 / temperature)), mode int [B] (SAMPLE_*; greedy rows report
    bv = -inf). A nucleus row is drawn as a plain Gumbel row here: the caller routes nucleus rows
    elsewhere."""
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"logits must be [B, V_r] with V_r >= 1, got {tuple(logits.shape)}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    x = logits.float()
    m, arg = x.max(dim=-1)  # torch.max returns the first index of the maximum
    scratch = scratch or Scratch()
    if with_stats:
        z, sx = _mass(x, m, scratch)
    else:
        z, sx = torch.ones_like(m), torch.zeros_like(m)
    sampled = mode != SAMPLE_GREEDY
    if not bool(sampled.any()):  # a host read, as sample_rows_ref's: this is the CPU path
        bv, bi = torch.full_like(m, float("-inf")), torch.zeros_like(arg)  # greedy rows: no draw
    else:
        v = scratch.get("v", x).fill_(float("-inf"))
        s = torch.mul(x, inv_temp.reshape(-1, 1), out=scratch.get("s", x))
        # noise only where it can win: g lies in (GUMBEL_MIN, GUMBEL_MAX), so a token more than
        # CONTENDER_SPAN below this shard's best scaled logit cannot hold the shard's best draw (and
        # the row's best draw is the best shard's): exactly the dense draw, for a few tokens
        contender = (s >= s.max(dim=-1, keepdim=True).values - CONTENDER_SPAN) & sampled.reshape(-1, 1)
        rows, cols = contender.nonzero(as_tuple=True)
        noise = gumbel_ref(seed.reshape(-1)[rows], step.reshape(-1)[rows], stream, cols + offset)  # GLOBAL index
        v[rows, cols] = s[rows, cols] + noise
        bv, bi = v.max(dim=-1)  # greedy rows: all -inf
    return torch.stack([m.double(), z.double(), sx.double(), (arg + offset).double(), bv.double(),
                        (bi + offset).double()], dim=1)


def combine_stats(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """stats [R, B, NUM_STATS] (every rank's shard_stats, as an all-gather gives them) ->
    (p_top float32 [B], entropy float32 [B], greedy int64 [B], gumbel int64 [B])."""
    if stats.dim() != 3 or stats.shape[2] != NUM_STATS:
        raise ValueError(f"stats must be [ranks, B, {NUM_STATS}], got {tuple(stats.shape)}")
    m, z, sx = stats[..., 0].float(), stats[..., 1].float(), stats[..., 2].float()
    M = m.max(dim=0).values
    live = z > 0  # a shard of only -inf logits adds nothing (and must not add -inf * 0)
    w = torch.where(live, torch.exp(m - M), 0.0)
    Z = (w * z).sum(dim=0)
    SX = torch.where(live, w * (sx + (m - M) * z), 0.0).sum(dim=0)
    p_top, entropy = 1.0 / Z, torch.log(Z) - SX / Z
    big = torch.finfo(torch.float64).max
    # first index among the shards that reach the maximum: the unsharded argmax's tie rule
    greedy = torch.where(stats[..., 0] == stats[..., 0].max(dim=0).values, stats[..., 3], big).min(dim=0).values
    gumbel = torch.where(stats[..., 4] == stats[..., 4].max(dim=0).values, stats[..., 5], big).min(dim=0).values
    return p_top, entropy, greedy.long(), gumbel.long()


def shard_bounds(vocab: int, ranks: int) -> list[tuple[int, int]]:
    """The vocabulary-parallel split: rank r holds [r * per, min((r + 1) * per, vocab)), per = ceil(V / N)
    (the last shard may be shorter, or empty when V < N * per; an empty shard is padded by the model)."""
    if ranks < 1 or vocab < 1:
        raise ValueError(f"need vocab >= 1 and ranks >= 1, got {vocab}, {ranks}")
    per = -(-vocab // ranks)
    return [(min(r * per, vocab), min((r + 1) * per, vocab)) for r in range(ranks)]


def sharded_candidates(local_logits: torch.Tensor, offset: int, seed, step, stream: int, inv_temp, mode, pg,
                       scratch: Scratch | None = None, with_stats: bool = True):
    """On every rank of the process group object `pg` (as parallel/tensor.py builds): (p_top, entropy,
    greedy, gumbel) of the whole vocabulary, from one all-gather of [B, NUM_STATS] numbers.
    local_logits holds this rank's real columns only (no padding columns)."""
    if local_logits.shape[1]:
        mine = shard_stats(local_logits, offset, seed, step, stream, inv_temp, mode, scratch, with_stats)
    else:  # an empty shard (V < N * ceil(V / N)): a row that adds nothing and wins no argmax
        mine = empty_stats(local_logits.shape[0], local_logits.device)
    parts = [torch.empty_like(mine) for _ in range(pg.size())]
    pg.allgather([parts], [mine]).wait()
    return combine_stats(torch.stack(parts))


def empty_stats(B: int, device=None) -> torch.Tensor:
    """The numbers of a shard without columns: no mass, no maximum, no candidate."""
    inf, big = float("inf"), torch.finfo(torch.float64).max
    row = torch.tensor([-inf, 0.0, 0.0, big, -inf, big], dtype=torch.float64, device=device)
    return row.expand(B, NUM_STATS).clone()


def effective_mode(state: GateState, params: GateParams) -> torch.Tensor:
    """int32 [B]: the sampler each row uses, min(its sample_mode, params.max_sample), as every gate does."""
    return state.sample_mode.clamp(max=params.max_sample)


def nudge_step_from_candidates(candidates, nudger_logits: torch.Tensor | None, state: GateState,
                               params: GateParams, base: ModelCursor, nudger: ModelCursor | None, sample) -> None:
    """One decode step, in place, from the sharded base's (p_top, entropy, greedy, gumbel) (what
    sharded_candidates gives) instead of its logits: nudge_step_ref's semantics. `sample` draws the
    nudger's candidate (sample_rows_ref or a kernel with its signature). No nucleus rows: their base
    candidate needs the gathered logits."""
    if params.mode == MODE_NUDGER_ONLY:
        raise ValueError("nudge_step_from_candidates needs the base model (mode nudger_only has none)")
    p_top, entropy, greedy, gumbel = candidates
    mode = effective_mode(state, params)
    b = torch.where(mode == SAMPLE_GREEDY, greedy, gumbel)
    if params.mode == MODE_BASE_ONLY:
        n, confident = b, torch.zeros_like(state.finished, dtype=torch.bool)
    else:
        n = sample(nudger_logits, state.seed, state.n_out, STREAM_NUDGER, state.inv_temp, state.top_p, mode)
        confident = confident_from_stats(p_top, entropy, state)
    step_from_candidates_ref(b, n, confident, state, params, base, nudger)  # nudge_step_ref's own steps
