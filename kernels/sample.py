"""Candidate sampling: greedy argmax, or temperature + nucleus (top-p) by Gumbel-max.

Semantics (shared by `sample_ref` and the Triton `sample`, and by the gate and speculative-accept
kernels, which call the same @triton.jit helpers):
- temperature == 0: argmax of the logits, the FIRST index on ties (torch.argmax).
- otherwise, with s = logits.float() * float32(1 / temperature):
  nucleus (top_p < 1): token i is kept iff the total probability of the tokens whose probability is
  strictly greater than p_i is < top_p (so tied tokens are kept or dropped together and the top token
  is always kept). The kept set is {i : e_i >= cutoff} with e_i = exp(s_i - max s).
  The draw is argmax over kept i of (s_i + g_i), g_i = gumbel(seed, step, stream, i) from rng.py:
  Gumbel-max, an exact draw from the renormalised nucleus, a pure function of its key.

Cost of one draw, single program per row (streaming the row in blocks, nothing kept on chip):
- greedy: 1 pass; temperature with top_p == 1: 1 pass (+ 2 hash rounds and 2 logs per entry);
- nucleus: 1 pass (max and sum of exp) + NUCLEUS_PASSES = 8 passes of a 16-way search over the
  float32 bit pattern of the cutoff (the cutoff lies in [0, 1], bit patterns 0..0x3F800000 < 2**30,
  4 bits per pass; each pass sums, for 16 candidate cutoffs at once, the mass strictly above them,
  for one exp per entry) + 1 Gumbel pass: 10 passes in all, against about 32 for a binary bisection.
  The caller's row stays in L2 between passes at these sizes (a 262144-entry bf16 row is 512 KiB).
With one program per row only B SMs work, so at small batches a pass is bound by one SM's load
latency and arithmetic, not by HBM bandwidth. So the launchers split rows (vocab_split.py): when
B rows do not fill the SMs, each row is cut into C chunks (C from vocab_split.plan_chunks: ~2
programs per SM, chunks of >= 4096 entries in whole 2048-entry blocks, C <= 128; a 262k row at
batch 1 gets 64 programs), `_split_scan_kernel` writes one record per (row, chunk) (the same pass
as above, over the chunk), each nucleus search pass and the final draw become a (row, chunk) launch
of `_split_nucleus_kernel`, and one program per row combines the records. Launches per call:
  before: 1 (one program per row);  C = 1 (large batches): 1, unchanged;
  C > 1: 2 for a greedy / Gumbel batch (records + combine), 11 for a nucleus-capable batch
  (records + 8 search passes + draw + combine). The combine is exact for the tokens (same noise,
  first-index tie rule); see vocab_split.py.
The reference (the CPU path) sorts only when a top-1024 does not settle the nucleus, and draws noise
only for the tokens that can still win (see sample_ref); it reads one count on the host to choose.
The kernel and the reference agree token for token except at float-rounding boundaries (a cutoff
sum or a Gumbel race decided in the last ulp), which random inputs essentially never hit.
"""
import torch

from nudgefast.kernels import HAS_TRITON
from nudgefast.kernels.rng import GUMBEL_MAX, GUMBEL_MIN, gumbel_ref
from nudgefast.kernels.vocab_split import (F_BV, F_M, F_MT, F_SX, F_Z, F_ZT, I_ARG, I_BI, NUM_FLOATS, NUM_INTS,
                                           SPLIT_MAX_CHUNKS, plan_chunks)

SAMPLE_GREEDY, SAMPLE_GUMBEL, SAMPLE_NUCLEUS = 0, 1, 2
SCAN_BLOCK = 2048  # entries per block in the streaming passes (8 per thread at 8 warps)
NUM_WARPS = 8  # one program streams a whole row: more bytes in flight per iteration beats occupancy
NUCLEUS_BLOCK = 512  # entries per block in the cutoff search ([512, 16] partial sums: 32 per thread)
NUCLEUS_SPLITS = 16  # candidate cutoffs per search pass
NUCLEUS_PASSES = 8  # 16**8 = 2**32 > 0x3F800000: the search closes on one bit pattern
ONE_BITS = 0x3F800000  # float32 1.0: e_i <= 1 always, and nothing is strictly above it
NEG_BIG = -3.4028234663852886e38  # finite "minus infinity" for online maxima: keeps inf - inf out
NUCLEUS_TOPK = 1024  # the reference's first try at the nucleus cutoff before a full sort
CONTENDER_SPAN = GUMBEL_MAX - GUMBEL_MIN + 1.0  # scaled-logit gap no noise can close (+1 for rounding)


def sample_mode(temperature: float, top_p: float) -> int:
    """Which sampler a (temperature, top_p) pair needs; raises ValueError on values out of range."""
    if not isinstance(temperature, (int, float)) or temperature != temperature or temperature < 0:
        raise ValueError(f"temperature must be a float >= 0, got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if temperature == 0:
        return SAMPLE_GREEDY
    return SAMPLE_GUMBEL if top_p >= 1.0 else SAMPLE_NUCLEUS


def inverse_temperature(temperature: float) -> float:
    """1 / temperature rounded to float32: both implementations scale by exactly this number."""
    if temperature == 0:
        return 1.0
    return torch.tensor(1.0 / temperature, dtype=torch.float32).item()


def check_logits(logits: torch.Tensor, name: str, rows: int | None = None) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(logits).__name__}")
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"{name} must be [B, V] with V >= 1, got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {logits.dtype}")
    if rows is not None and logits.shape[0] != rows:
        raise ValueError(f"{name} has {logits.shape[0]} rows, expected {rows}")


# ----------------------------------------------------------------------------- torch reference


def nucleus_mask_ref(scaled: torch.Tensor, top_p) -> torch.Tensor:
    """bool [B, V]: tokens whose strictly-more-probable mass is < top_p (ties kept together).

    top_p: a float for every row, or float32 [B] (one per row)."""
    if isinstance(top_p, torch.Tensor):
        top_p = top_p.reshape(-1, 1)
    m = scaled.max(dim=-1, keepdim=True).values
    e = torch.exp(scaled - m)
    target = e.sum(dim=-1, keepdim=True) * top_p

    def cutoff_within(desc):
        # the exclusive prefix sums of the sorted values are non-decreasing, so the positions with
        # before < target are a prefix; its last entry is the cutoff (a tie group's first member has
        # exactly the strictly-greater mass before it)
        before = desc.cumsum(dim=-1) - desc
        before[:, 0] = 0.0
        last = (before < target).sum(dim=-1, keepdim=True) - 1
        return desc.gather(-1, last), before[:, -1:] >= target

    # A real next-token nucleus is small: the top NUCLEUS_TOPK values (topk, sorted) settle the cutoff
    # whenever they already hold the target mass; only otherwise sort the whole row.
    k = min(e.shape[-1], NUCLEUS_TOPK)
    cutoff, settled = cutoff_within(e.topk(k, dim=-1).values)
    if k < e.shape[-1] and not bool(settled.all()):
        cutoff, _ = cutoff_within(e.sort(dim=-1, descending=True).values)
    return e >= cutoff


def check_row_params(B: int, device, inv_temp, top_p, mode) -> None:
    """The per-row sampler parameters: float32 [B], float32 [B], int32 [B] on the logits' device."""
    for t, name, dtype in ((inv_temp, "inv_temp", torch.float32), (top_p, "top_p", torch.float32),
                           (mode, "mode", torch.int32)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a {dtype} tensor [B], got {type(t).__name__}")
        if t.dtype != dtype or tuple(t.shape) != (B,):
            raise ValueError(f"{name} must be {dtype} [{B}], got {t.dtype} {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, the logits on {device}")


def row_params(B: int, device, temperature: float, top_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inv_temp, top_p, mode) tensors [B] giving every row one (temperature, top_p); validates them."""
    mode = sample_mode(temperature, top_p)
    return (torch.full((B,), inverse_temperature(temperature), dtype=torch.float32, device=device),
            torch.full((B,), float(top_p), dtype=torch.float32, device=device),
            torch.full((B,), mode, dtype=torch.int32, device=device))


def sample_rows_ref(logits: torch.Tensor, seed: torch.Tensor, step: torch.Tensor, stream: int, inv_temp: torch.Tensor,
                    top_p: torch.Tensor, mode: torch.Tensor, max_sample: int = SAMPLE_NUCLEUS) -> torch.Tensor:
    """int64 [B]: one candidate per row, each row with its own sampler (vectorised over the batch).

    inv_temp float32 [B] (float32(1 / temperature), see inverse_temperature), top_p float32 [B], mode
    int32 [B] (SAMPLE_*). A row equals sample_ref on that row alone with its (temperature, top_p).
    A row uses min(mode, max_sample), as the Triton and C++ versions (where max_sample is a
    compile-time constant that prunes the sampling code).

    Only tokens that can win get noise: GUMBEL_MIN < g < GUMBEL_MAX, so a token more than
    GUMBEL_MAX - GUMBEL_MIN below the row's best scaled logit can never beat it. When few tokens
    qualify (a peaked row, a small nucleus) the noise is drawn for them alone; the result is the
    dense Gumbel-max exactly. (The host reads a count or two here: this is the CPU path.)
    """
    check_logits(logits, "logits")
    check_row_params(logits.shape[0], logits.device, inv_temp, top_p, mode)
    if max_sample not in (SAMPLE_GREEDY, SAMPLE_GUMBEL, SAMPLE_NUCLEUS):
        raise ValueError(f"max_sample must be SAMPLE_GREEDY, SAMPLE_GUMBEL or SAMPLE_NUCLEUS, got {max_sample!r}")
    if max_sample != SAMPLE_NUCLEUS:
        mode = mode.clamp(max=max_sample)
    x = logits.float()
    sampled = mode != SAMPLE_GREEDY
    n_sampled = int(sampled.sum())
    if n_sampled == 0:
        return x.argmax(dim=-1)
    s = x * inv_temp.reshape(-1, 1)
    contender = s >= s.max(dim=-1, keepdim=True).values - CONTENDER_SPAN
    if n_sampled < x.shape[0]:
        contender &= sampled.reshape(-1, 1)  # greedy rows draw no noise
    nucleus = mode == SAMPLE_NUCLEUS
    if bool(nucleus.all()):
        contender &= nucleus_mask_ref(s, top_p)
    elif bool(nucleus.any()):
        # the cutoff of a row depends on that row alone: compute it on the nucleus rows only, so a
        # Gumbel or greedy row never forces the full sort
        idx = nucleus.nonzero().squeeze(1)
        keep = torch.ones_like(contender)
        keep[idx] = nucleus_mask_ref(s[idx], top_p[idx])
        contender &= keep
    seed, step = seed.reshape(-1, 1), step.reshape(-1, 1)
    if int(contender.sum()) * 4 < contender.numel():
        rows, cols = contender.nonzero(as_tuple=True)
        v = torch.full_like(s, float("-inf"))
        v[rows, cols] = s[rows, cols] + gumbel_ref(seed[rows, 0], step[rows, 0], stream, cols)
    else:
        index = torch.arange(x.shape[1], device=x.device)
        v = (s + gumbel_ref(seed, step, stream, index)).masked_fill_(~contender, float("-inf"))
    if n_sampled == x.shape[0]:
        return v.argmax(dim=-1)
    return torch.where(sampled, v.argmax(dim=-1), x.argmax(dim=-1))


def sample_ref(logits: torch.Tensor, seed: torch.Tensor, step: torch.Tensor, stream: int, temperature: float,
               top_p: float) -> torch.Tensor:
    """int64 [B]: one candidate per row, every row with the same (temperature, top_p)."""
    sample_mode(temperature, top_p)
    check_logits(logits, "logits")
    return sample_rows_ref(logits, seed, step, stream, *row_params(logits.shape[0], logits.device, temperature, top_p))


# ----------------------------------------------------------------------------- Triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    from nudgefast.kernels.rng import gumbel, row_key

    _GREEDY = tl.constexpr(SAMPLE_GREEDY)
    _GUMBEL = tl.constexpr(SAMPLE_GUMBEL)
    _NUCLEUS = tl.constexpr(SAMPLE_NUCLEUS)
    _NEG_BIG = tl.constexpr(NEG_BIG)
    _ONE_BITS = tl.constexpr(ONE_BITS)
    _INT_BIG = tl.constexpr(2**31 - 1)
    _NUC_BLOCK = tl.constexpr(NUCLEUS_BLOCK)
    _NUC_SPLITS = tl.constexpr(NUCLEUS_SPLITS)
    _NUC_PASSES = tl.constexpr(NUCLEUS_PASSES)
    _F_M, _F_Z, _F_SX, _F_BV, _F_MT, _F_ZT = (tl.constexpr(F_M), tl.constexpr(F_Z), tl.constexpr(F_SX),
                                              tl.constexpr(F_BV), tl.constexpr(F_MT), tl.constexpr(F_ZT))
    _I_ARG, _I_BI = tl.constexpr(I_ARG), tl.constexpr(I_BI)
    _NUM_FLOATS, _NUM_INTS = tl.constexpr(NUM_FLOATS), tl.constexpr(NUM_INTS)

    @triton.jit
    def scan_span(row_ptr, lo, hi, key, inv_temp, sample, STATS: tl.constexpr, MAX_SAMPLE: tl.constexpr,
                  BLOCK: tl.constexpr):
        """One streaming pass over entries [lo, hi) of a row of logits (any float dtype).

        Returns the chunk record of vocab_split.py: (m, z, sx, arg, bv, bi, mt, zt), indices global.
        sample: this row's sampler (runtime, <= MAX_SAMPLE, which prunes the code of the others).
          STATS: m, z, sx of the UNtempered logits (else z = sx = 0; m and arg are always kept);
          sample == gumbel: bv, bi = max of s + g and its first index (else -inf, lo);
          sample == nucleus: mt, zt = max of s and sum of exp(s - mt), for the cutoff search.
        Per-lane accumulators (combined once at the end, by the same math as chunks combine) keep the
        loop free of cross-lane reductions. The per-row choice is a scalar branch: a greedy row never
        pays for the noise.
        """
        lanes = tl.arange(0, BLOCK)
        m = tl.full([BLOCK], _NEG_BIG, tl.float32)  # lane max of x (finite start: no inf - inf)
        z = tl.zeros([BLOCK], tl.float32)  # lane sum of exp(x - m)
        sx = tl.zeros([BLOCK], tl.float32)  # lane sum of exp(x - m) * (x - m)
        arg = lo + lanes  # lane argmax; a lane that never beats the start reports its first entry
        bv = tl.full([BLOCK], float("-inf"), tl.float32)  # lane best of s + g
        bi = lo + lanes
        mt = tl.full([BLOCK], _NEG_BIG, tl.float32)  # lane max of s
        zt = tl.zeros([BLOCK], tl.float32)
        for start in range(lo, hi, BLOCK):
            idx = start + lanes
            x = tl.load(row_ptr + idx, mask=idx < hi, other=float("-inf")).to(tl.float32)
            # the lane max and argmax are a compare and a select: kept for every row
            m_new = tl.maximum(m, x)
            if STATS:
                alpha = tl.exp(m - m_new)
                xm = x - m_new
                ex = tl.exp(xm)
                # rescale the lane's sum of e*(x - m) to the new max: e' = e*alpha, x - m' = (x - m) + (m - m')
                sx = alpha * (sx + (m - m_new) * z) + ex * tl.maximum(xm, _NEG_BIG)  # -inf entries add 0
                z = alpha * z + ex
            arg = tl.where(x > m, idx, arg)  # strict: a lane keeps its first maximum
            m = m_new
            if MAX_SAMPLE != _GREEDY:
                if sample == _GUMBEL:
                    v = x * inv_temp + gumbel(key, idx)
                    better = v > bv
                    bv = tl.where(better, v, bv)
                    bi = tl.where(better, idx, bi)
            if MAX_SAMPLE == _NUCLEUS:
                if sample == _NUCLEUS:
                    s = x * inv_temp
                    mt_new = tl.maximum(mt, s)
                    zt = zt * tl.exp(mt - mt_new) + tl.exp(s - mt_new)
                    mt = mt_new
        m_all = tl.max(m, axis=0)
        z_all = 0.0
        sx_all = 0.0
        if STATS:
            w = tl.exp(m - m_all)
            z_all = tl.sum(z * w, axis=0)
            sx_all = tl.sum(w * (sx + (m - m_all) * z), axis=0)
        arg_all = tl.min(tl.where(m == m_all, arg, _INT_BIG), axis=0)
        bv_all = tl.max(bv, axis=0)
        bi_all = tl.min(tl.where(bv == bv_all, bi, _INT_BIG), axis=0)
        mt_all = tl.max(mt, axis=0)
        zt_all = tl.sum(zt * tl.exp(mt - mt_all), axis=0)
        return m_all, z_all, sx_all, arg_all, bv_all, bi_all, mt_all, zt_all

    @triton.jit
    def scan_row(row_ptr, V, key, inv_temp, sample, STATS: tl.constexpr, MAX_SAMPLE: tl.constexpr,
                 BLOCK: tl.constexpr):
        """scan_span over the whole row, finished: (p_top, entropy, best, mt, zt).

        STATS: p_top = max softmax and entropy (nats) of the UNtempered logits (else 0, 0);
        sample == greedy: best = first argmax; == gumbel: best = argmax(s + g), the finished draw;
        == nucleus: best = -1, and mt, zt feed the cutoff search.
        """
        _m, z, sx, arg, _bv, bi, mt, zt = scan_span(row_ptr, 0, V, key, inv_temp, sample, STATS, MAX_SAMPLE, BLOCK)
        p_top = 0.0
        entropy = 0.0
        if STATS:
            p_top = 1.0 / z
            entropy = tl.log(z) - sx / z
        best = tl.where(sample == _GREEDY, arg, tl.where(sample == _GUMBEL, bi, -1))
        return p_top, entropy, best, mt, zt

    @triton.jit
    def cutoff_candidates(lo, hi, SPLITS: tl.constexpr):
        """The SPLITS bit patterns one search pass tests in (lo, hi] (the last one is hi)."""
        frac = tl.arange(0, SPLITS).to(tl.int64) + 1
        return lo + ((hi - lo) * frac) // SPLITS

    @triton.jit
    def cutoff_narrow(lo, hi, mass, target, SPLITS: tl.constexpr):
        """(lo, hi) after a pass: mass[j] is the mass strictly above candidate j."""
        bits = cutoff_candidates(lo, hi, SPLITS)
        below = mass < target
        return tl.max(tl.where(below, lo, bits), axis=0), tl.min(tl.where(below, bits, hi), axis=0)

    @triton.jit
    def mass_above_span(row_ptr, lo, hi, inv_temp, mt, cut, BLOCK: tl.constexpr, SPLITS: tl.constexpr):
        """float32 [SPLITS]: sum over entries [lo, hi) of e = exp(s - mt) where e > cut[j].

        One accumulator tile and one reduction tree for every candidate: the sums are monotone in the
        cut-off (see nucleus_cutoff)."""
        lanes = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK, SPLITS], tl.float32)
        for start in range(lo, hi, BLOCK):
            idx = start + lanes
            x = tl.load(row_ptr + idx, mask=idx < hi, other=float("-inf")).to(tl.float32)
            e = tl.exp(x * inv_temp - mt)
            acc += tl.where(e[:, None] > cut[None, :], e[:, None], 0.0)
        return tl.sum(acc, axis=0)

    @triton.jit
    def nucleus_cutoff(row_ptr, V, inv_temp, mt, zt, top_p, BLOCK: tl.constexpr, SPLITS: tl.constexpr,
                       PASSES: tl.constexpr):
        """Smallest float32 c in [0, 1] with sum(e_j : e_j > c) < top_p * zt, e_j = exp(s_j - mt).

        The kept set {e_i >= c} is then exactly the strictly-greater-mass rule. The mass above c only
        falls as c rises, so a search over c's bit pattern (monotone for c >= 0) finds it; each pass
        tests SPLITS cutoffs at once. Sums for different cutoffs use one summation order, so the
        computed mass is monotone in c too and the search is exact for the computed masses.
        """
        target = top_p * zt
        lo = tl.zeros([], tl.int64)  # predicate false at c = 0 (mass above 0 is all of zt)
        hi = tl.full([], _ONE_BITS, tl.int64)  # predicate true at c = 1 (nothing is above 1)
        for _ in range(PASSES):
            cut = cutoff_candidates(lo, hi, SPLITS).to(tl.int32).to(tl.float32, bitcast=True)
            mass = mass_above_span(row_ptr, 0, V, inv_temp, mt, cut, BLOCK, SPLITS)
            lo, hi = cutoff_narrow(lo, hi, mass, target, SPLITS)
        return hi.to(tl.int32).to(tl.float32, bitcast=True)

    @triton.jit
    def nucleus_gumbel_span(row_ptr, lo, hi, key, inv_temp, mt, cutoff, BLOCK: tl.constexpr):
        """(bv, bi): max over {e_i >= cutoff, i in [lo, hi)} of s_i + g_i and its first index."""
        lanes = tl.arange(0, BLOCK)
        bv = tl.full([BLOCK], float("-inf"), tl.float32)
        bi = lo + lanes
        for start in range(lo, hi, BLOCK):
            idx = start + lanes
            x = tl.load(row_ptr + idx, mask=idx < hi, other=float("-inf")).to(tl.float32)
            s = x * inv_temp
            v = tl.where(tl.exp(s - mt) >= cutoff, s + gumbel(key, idx), float("-inf"))
            better = v > bv
            bv = tl.where(better, v, bv)
            bi = tl.where(better, idx, bi)
        bv_all = tl.max(bv, axis=0)
        return bv_all, tl.min(tl.where(bv == bv_all, bi, _INT_BIG), axis=0)

    @triton.jit
    def nucleus_gumbel_argmax(row_ptr, V, key, inv_temp, mt, cutoff, BLOCK: tl.constexpr):
        """argmax over {e_i >= cutoff} of s_i + g_i (first index on exact ties)."""
        _bv, bi = nucleus_gumbel_span(row_ptr, 0, V, key, inv_temp, mt, cutoff, BLOCK)
        return bi

    @triton.jit
    def finish_sample(row_ptr, V, key, inv_temp, top_p, sample, best, mt, zt, MAX_SAMPLE: tl.constexpr,
                      BLOCK: tl.constexpr):
        """The candidate after scan_row: greedy and plain Gumbel are already done in the scan."""
        if MAX_SAMPLE == _NUCLEUS:
            if sample == _NUCLEUS:
                cutoff = nucleus_cutoff(row_ptr, V, inv_temp, mt, zt, top_p, _NUC_BLOCK, _NUC_SPLITS, _NUC_PASSES)
                best = nucleus_gumbel_argmax(row_ptr, V, key, inv_temp, mt, cutoff, BLOCK)
        return best

    @triton.jit
    def sample_row(row_ptr, V, key, inv_temp, top_p, sample, MAX_SAMPLE: tl.constexpr, BLOCK: tl.constexpr):
        """One candidate from one row of logits (no gate statistics)."""
        _p, _h, best, mt, zt = scan_row(row_ptr, V, key, inv_temp, sample, False, MAX_SAMPLE, BLOCK)
        return finish_sample(row_ptr, V, key, inv_temp, top_p, sample, best, mt, zt, MAX_SAMPLE, BLOCK)

    # ------------------------------------------------------------------ split rows (vocab_split.py)

    @triton.jit
    def combine_chunks(fl_ptr, it_ptr, slot, C, sample, STATS: tl.constexpr, C_BLOCK: tl.constexpr):
        """(best int32, p_top, entropy) of record row `slot` (C chunk records; vocab_split.py's combine).

        best = the first argmax for a greedy row, else the chunks' best draw (Gumbel or nucleus)."""
        cs = tl.arange(0, C_BLOCK)
        ok = cs < C
        rec = slot.to(tl.int64) * C + cs
        m = tl.load(fl_ptr + rec * _NUM_FLOATS + _F_M, mask=ok, other=_NEG_BIG)
        m_all = tl.max(m, axis=0)
        arg = tl.load(it_ptr + rec * _NUM_INTS + _I_ARG, mask=ok, other=_INT_BIG)
        greedy = tl.min(tl.where(m == m_all, arg, _INT_BIG), axis=0)
        bv = tl.load(fl_ptr + rec * _NUM_FLOATS + _F_BV, mask=ok, other=float("-inf"))
        bi = tl.load(it_ptr + rec * _NUM_INTS + _I_BI, mask=ok, other=_INT_BIG)
        draw = tl.min(tl.where(bv == tl.max(bv, axis=0), bi, _INT_BIG), axis=0)
        p_top = 0.0
        entropy = 0.0
        if STATS:
            z = tl.load(fl_ptr + rec * _NUM_FLOATS + _F_Z, mask=ok, other=0.0)
            sx = tl.load(fl_ptr + rec * _NUM_FLOATS + _F_SX, mask=ok, other=0.0)
            w = tl.exp(m - m_all)
            z_all = tl.sum(w * z, axis=0)
            sx_all = tl.sum(w * (sx + (m - m_all) * z), axis=0)
            p_top = 1.0 / z_all
            entropy = tl.log(z_all) - sx_all / z_all
        return tl.where(sample == _GREEDY, greedy, draw), p_top, entropy

    @triton.jit
    def _split_scan_one(l_ptr, stride_r, stride_p, V, CH, srow, pos, c, seed, step, stream, inv_temp, sample, fl_ptr,
                        it_ptr, rec, STATS: tl.constexpr, MAX_SAMPLE: tl.constexpr, BLOCK: tl.constexpr):
        row_ptr = l_ptr + srow.to(tl.int64) * stride_r + pos.to(tl.int64) * stride_p
        key = 0  # an all-greedy batch draws no noise
        if MAX_SAMPLE != _GREEDY:
            key = row_key(seed, step, stream)
        lo = c * CH
        hi = tl.minimum(lo + CH, V)
        m, z, sx, arg, bv, bi, mt, zt = scan_span(row_ptr, lo, hi, key, inv_temp, sample, STATS, MAX_SAMPLE, BLOCK)
        f = fl_ptr + rec * _NUM_FLOATS
        tl.store(f + _F_M, m)
        tl.store(f + _F_Z, z)
        tl.store(f + _F_SX, sx)
        tl.store(f + _F_BV, bv)
        tl.store(f + _F_MT, mt)
        tl.store(f + _F_ZT, zt)
        tl.store(it_ptr + rec * _NUM_INTS + _I_ARG, arg)
        tl.store(it_ptr + rec * _NUM_INTS + _I_BI, bi)

    # Runtime sizes that must not multiply compiles (Triton specialises ints equal to 1 or divisible
    # by 16): rows, chunks, positions per row and the pass index.
    @triton.jit(do_not_specialize=["R", "C", "P", "stream0"])
    def _split_scan_kernel(l0_ptr, l0_stride_r, l0_stride_p, V0, CH0, l1_ptr, l1_stride_r, l1_stride_p, V1, CH1,
                           seed_ptr, step_ptr, fin_ptr, itemp_ptr, mode_ptr, fl_ptr, it_ptr, R, C, P, stream0,
                           MODELS: tl.constexpr, STATS0: tl.constexpr, MAX_SAMPLE: tl.constexpr,
                           HAS_FIN: tl.constexpr, BLOCK: tl.constexpr):
        """Program (r, c, model): the record of chunk c of logical row r of logits `model`.

        Logical row r is position r % P of state row r // P (P = K + 1 for the speculative verify rows,
        else 1); its draw uses step[r // P] + r % P (the output step that position decides when the
        round reaches it). Model 0 draws with stream0 (and gets the gate statistics when STATS0),
        model 1 with stream0 + 1. Finished state rows (HAS_FIN) are skipped: nothing reads them."""
        r = tl.program_id(0)
        c = tl.program_id(1)
        model = tl.program_id(2)
        srow = r // P
        pos = r % P
        go = True
        if HAS_FIN:
            go = tl.load(fin_ptr + srow) == 0
        if go:
            sample = tl.minimum(tl.load(mode_ptr + srow), MAX_SAMPLE)
            inv_temp = tl.load(itemp_ptr + srow)
            seed = tl.load(seed_ptr + srow)
            step = tl.load(step_ptr + srow) + pos
            rec = (model * R + r).to(tl.int64) * C + c
            if model == 0:
                _split_scan_one(l0_ptr, l0_stride_r, l0_stride_p, V0, CH0, srow, pos, c, seed, step, stream0, inv_temp,
                                sample, fl_ptr, it_ptr, rec, STATS0, MAX_SAMPLE, BLOCK)
            elif MODELS == 2:
                _split_scan_one(l1_ptr, l1_stride_r, l1_stride_p, V1, CH1, srow, pos, c, seed, step, stream0 + 1,
                                inv_temp, sample, fl_ptr, it_ptr, rec, False, MAX_SAMPLE, BLOCK)

    @triton.jit
    def _split_nucleus_one(l_ptr, stride_r, stride_p, V, CH, srow, pos, c, q, seed, step, stream, inv_temp, top_p,
                           fl_ptr, it_ptr,
                           mass_ptr, lohi_ptr, slot, C, FINAL: tl.constexpr, BLOCK: tl.constexpr,
                           NUC_BLOCK: tl.constexpr, C_BLOCK: tl.constexpr):
        # the row's max and sum of exp(s - mt), recombined from the records: the same in every program
        cs = tl.arange(0, C_BLOCK)
        ok = cs < C
        rec = slot.to(tl.int64) * C + cs
        mt_c = tl.load(fl_ptr + rec * _NUM_FLOATS + _F_MT, mask=ok, other=_NEG_BIG)
        zt_c = tl.load(fl_ptr + rec * _NUM_FLOATS + _F_ZT, mask=ok, other=0.0)
        mt = tl.max(mt_c, axis=0)
        zt = tl.sum(zt_c * tl.exp(mt_c - mt), axis=0)
        lo = tl.zeros([], tl.int64)
        hi = tl.full([], _ONE_BITS, tl.int64)
        if q > 0:
            # the interval before pass q - 1 and that pass's masses (chunks summed in index order)
            prev = slot.to(tl.int64) * _NUC_PASSES + (q - 1)
            lo = tl.load(lohi_ptr + prev * 2).to(tl.int64)
            hi = tl.load(lohi_ptr + prev * 2 + 1).to(tl.int64)
            js = tl.arange(0, _NUC_SPLITS)
            parts = tl.load(mass_ptr + (prev * C + cs[:, None]) * _NUC_SPLITS + js[None, :], mask=ok[:, None],
                            other=0.0)
            lo, hi = cutoff_narrow(lo, hi, tl.sum(parts, axis=0), top_p * zt, _NUC_SPLITS)
        row_ptr = l_ptr + srow.to(tl.int64) * stride_r + pos.to(tl.int64) * stride_p
        start = c * CH
        end = tl.minimum(start + CH, V)
        if FINAL:
            cutoff = hi.to(tl.int32).to(tl.float32, bitcast=True)
            key = row_key(seed, step, stream)  # only the draw needs it
            bv, bi = nucleus_gumbel_span(row_ptr, start, end, key, inv_temp, mt, cutoff, BLOCK)
            tl.store(fl_ptr + (slot.to(tl.int64) * C + c) * _NUM_FLOATS + _F_BV, bv)
            tl.store(it_ptr + (slot.to(tl.int64) * C + c) * _NUM_INTS + _I_BI, bi)
        else:
            here = slot.to(tl.int64) * _NUC_PASSES + q
            if c == 0:  # every program of the row computed the same interval; one keeps it for the next pass
                tl.store(lohi_ptr + here * 2, lo.to(tl.int32))
                tl.store(lohi_ptr + here * 2 + 1, hi.to(tl.int32))
            cut = cutoff_candidates(lo, hi, _NUC_SPLITS).to(tl.int32).to(tl.float32, bitcast=True)
            mass = mass_above_span(row_ptr, start, end, inv_temp, mt, cut, NUC_BLOCK, _NUC_SPLITS)
            tl.store(mass_ptr + (here * C + c) * _NUC_SPLITS + tl.arange(0, _NUC_SPLITS), mass)

    @triton.jit(do_not_specialize=["R", "C", "P", "stream0", "q"])
    def _split_nucleus_kernel(l0_ptr, l0_stride_r, l0_stride_p, V0, CH0, l1_ptr, l1_stride_r, l1_stride_p, V1, CH1,
                              seed_ptr, step_ptr, fin_ptr, itemp_ptr, topp_ptr, mode_ptr, fl_ptr, it_ptr, mass_ptr,
                              lohi_ptr, R, C, P, stream0, q, MODELS: tl.constexpr, MAX_SAMPLE: tl.constexpr,
                              HAS_FIN: tl.constexpr, FINAL: tl.constexpr, BLOCK: tl.constexpr,
                              NUC_BLOCK: tl.constexpr, C_BLOCK: tl.constexpr):
        """Pass q of the split cut-off search (FINAL: the Gumbel draw over the kept set) for nucleus rows;
        the other rows return at once. Program (r, c, model) as in _split_scan_kernel."""
        r = tl.program_id(0)
        c = tl.program_id(1)
        model = tl.program_id(2)
        srow = r // P
        pos = r % P
        go = tl.minimum(tl.load(mode_ptr + srow), MAX_SAMPLE) == _NUCLEUS
        if HAS_FIN:
            go = go & (tl.load(fin_ptr + srow) == 0)
        if go:
            inv_temp = tl.load(itemp_ptr + srow)
            top_p = tl.load(topp_ptr + srow)
            seed = tl.load(seed_ptr + srow)
            step = tl.load(step_ptr + srow) + pos
            slot = model * R + r
            if model == 0:
                _split_nucleus_one(l0_ptr, l0_stride_r, l0_stride_p, V0, CH0, srow, pos, c, q, seed, step, stream0,
                                   inv_temp, top_p, fl_ptr, it_ptr, mass_ptr, lohi_ptr, slot, C, FINAL, BLOCK,
                                   NUC_BLOCK, C_BLOCK)
            elif MODELS == 2:
                _split_nucleus_one(l1_ptr, l1_stride_r, l1_stride_p, V1, CH1, srow, pos, c, q, seed, step, stream0 + 1,
                                   inv_temp, top_p, fl_ptr, it_ptr, mass_ptr, lohi_ptr, slot, C, FINAL, BLOCK,
                                   NUC_BLOCK, C_BLOCK)

    @triton.jit(do_not_specialize=["C"])
    def _sample_kernel(logits_ptr, row_stride, V, seed_ptr, step_ptr, out_ptr, stream, itemp_ptr, topp_ptr,
                       mode_ptr, fl_ptr, it_ptr, C, MAX_SAMPLE: tl.constexpr, BLOCK: tl.constexpr,
                       SPLIT: tl.constexpr, C_BLOCK: tl.constexpr):
        """One program per row: the whole draw, or (SPLIT) the combine of the row's C chunk records."""
        row = tl.program_id(0)
        sample = tl.minimum(tl.load(mode_ptr + row), MAX_SAMPLE)
        if SPLIT:
            tok, _p, _h = combine_chunks(fl_ptr, it_ptr, row, C, sample, False, C_BLOCK)
        else:
            key = row_key(tl.load(seed_ptr + row), tl.load(step_ptr + row), stream)
            tok = sample_row(logits_ptr + row.to(tl.int64) * row_stride, V, key, tl.load(itemp_ptr + row),
                             tl.load(topp_ptr + row), sample, MAX_SAMPLE, BLOCK)
        tl.store(out_ptr + row, tok.to(tl.int64))

    @triton.jit
    def _nucleus_mask_kernel(logits_ptr, row_stride, V, out_ptr, inv_temp, top_p, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        row_ptr = logits_ptr + row.to(tl.int64) * row_stride
        _p, _h, _b, mt, zt = scan_row(row_ptr, V, 0, inv_temp, tl.full([], _NUCLEUS, tl.int32), False, _NUCLEUS,
                                      BLOCK)
        cutoff = nucleus_cutoff(row_ptr, V, inv_temp, mt, zt, top_p, _NUC_BLOCK, _NUC_SPLITS, _NUC_PASSES)
        for start in range(0, V, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            x = tl.load(row_ptr + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
            keep = tl.exp(x * inv_temp - mt) >= cutoff
            tl.store(out_ptr + row.to(tl.int64) * V + idx, keep.to(tl.int8), mask=idx < V)


def split_scan(models, rows: int, positions: int, C: int, lengths, seed, step, finished, inv_temp, top_p, mode,
               stream0: int, stats0: bool, max_sample: int):
    """Launches the chunk records of `rows` logical rows (vocab_split.py) and, for a nucleus-capable
    batch, the split cut-off search and draw: 1 + (NUCLEUS_PASSES + 1 if max_sample is SAMPLE_NUCLEUS)
    launches of (rows, C, len(models)) programs. Returns (floats, ints), the records
    [len(models) * rows, C, ...], ready for combine_chunks (record row model * rows + r).

    models: one or two (logits, row stride, position stride, V): logical row r reads
    logits + (r // positions) * row stride + (r % positions) * position stride. lengths: each
    model's chunk length. finished: int32 [rows // positions] (skipped when != 0) or None.
    The workspace is allocated here: its shape is static per (rows, C), so a CUDA graph captures it
    from its pool."""
    M = len(models)
    dev = seed.device
    # whole blocks for real chunks (>= SPLIT_MIN_CHUNK: always SCAN_BLOCK / NUCLEUS_BLOCK); the short
    # chunks of forced splits in tests get short blocks (the interpreter runs every lane)
    span = max(16, triton.next_power_of_2(max(lengths)))
    block, nuc_block = min(SCAN_BLOCK, span), min(NUCLEUS_BLOCK, span)
    floats = torch.empty(M * rows, C, NUM_FLOATS, dtype=torch.float32, device=dev)
    ints = torch.empty(M * rows, C, NUM_INTS, dtype=torch.int32, device=dev)
    (l0, r0, p0, V0), (l1, r1, p1, V1) = models[0], models[-1]
    ch0, ch1 = lengths[0], lengths[-1]
    fin = finished if finished is not None else mode
    common = (l0, r0, p0, V0, ch0, l1, r1, p1, V1, ch1, seed, step, fin)
    _split_scan_kernel[(rows, C, M)](*common, inv_temp, mode, floats, ints, rows, C, positions, stream0, MODELS=M,
                                     STATS0=stats0, MAX_SAMPLE=max_sample, HAS_FIN=finished is not None,
                                     BLOCK=block, num_warps=NUM_WARPS)
    if max_sample == SAMPLE_NUCLEUS:
        mass = torch.empty(M * rows, NUCLEUS_PASSES, C, NUCLEUS_SPLITS, dtype=torch.float32, device=dev)
        lohi = torch.empty(M * rows, NUCLEUS_PASSES, 2, dtype=torch.int32, device=dev)
        for q in range(NUCLEUS_PASSES + 1):
            _split_nucleus_kernel[(rows, C, M)](*common, inv_temp, top_p, mode, floats, ints, mass, lohi, rows, C,
                                                positions, stream0, q, MODELS=M, MAX_SAMPLE=max_sample,
                                                HAS_FIN=finished is not None, FINAL=q == NUCLEUS_PASSES,
                                                BLOCK=block, NUC_BLOCK=nuc_block, C_BLOCK=SPLIT_MAX_CHUNKS,
                                                num_warps=NUM_WARPS)
    return floats, ints


def sample_rows(logits: torch.Tensor, seed: torch.Tensor, step: torch.Tensor, stream: int, inv_temp: torch.Tensor,
                top_p: torch.Tensor, mode: torch.Tensor, max_sample: int = SAMPLE_NUCLEUS,
                chunks: int | None = None) -> torch.Tensor:
    """Triton version of sample_rows_ref: int64 [B], no host syncs.

    A row is sampled with min(mode, max_sample); max_sample (compile-time) prunes the sampling code
    (SAMPLE_GREEDY: an all-greedy batch compiles to one argmax pass).
    chunks: programs per row (vocab_split.plan_chunks; None = its heuristic from B, V and the SM
    count). 1: one launch of one program per row. C > 1: C programs per row write chunk records,
    and one program per row combines them: 2 launches, or 11 when max_sample is SAMPLE_NUCLEUS
    (+ NUCLEUS_PASSES search passes and the draw, each over (B, C) programs)."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use sample_rows_ref")
    check_logits(logits, "logits")
    B, V = logits.shape
    if seed.shape != (B,) or seed.dtype != torch.int64:
        raise ValueError(f"seed must be int64 [{B}], got {seed.dtype} {tuple(seed.shape)}")
    if step.shape != (B,) or step.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"step must be int32 [{B}], got {step.dtype} {tuple(step.shape)}")
    check_row_params(B, logits.device, inv_temp, top_p, mode)
    if max_sample not in (SAMPLE_GREEDY, SAMPLE_GUMBEL, SAMPLE_NUCLEUS):
        raise ValueError(f"max_sample must be SAMPLE_GREEDY, SAMPLE_GUMBEL or SAMPLE_NUCLEUS, got {max_sample!r}")
    C, (length,) = plan_chunks(B, [V], logits.device, chunks)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    floats = ints = out  # never read on the single-program path
    if C > 1:
        floats, ints = split_scan([(logits, logits.stride(0), 0, V)], B, 1, C, [length], seed, step, None, inv_temp,
                                  top_p, mode, stream, False, max_sample)
    _sample_kernel[(B,)](logits, logits.stride(0), V, seed, step, out, stream, inv_temp, top_p, mode, floats, ints, C,
                         MAX_SAMPLE=max_sample, BLOCK=SCAN_BLOCK, SPLIT=C > 1, C_BLOCK=SPLIT_MAX_CHUNKS,
                         num_warps=NUM_WARPS)
    return out


def sample(logits: torch.Tensor, seed: torch.Tensor, step: torch.Tensor, stream: int, temperature: float,
           top_p: float) -> torch.Tensor:
    """Triton version of sample_ref: int64 [B], every row with one (temperature, top_p)."""
    mode = sample_mode(temperature, top_p)
    check_logits(logits, "logits")
    return sample_rows(logits, seed, step, stream, *row_params(logits.shape[0], logits.device, temperature, top_p),
                       max_sample=mode)


def nucleus_mask(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Triton version of nucleus_mask_ref(logits * (1 / temperature), top_p): bool [B, V].

    A test and debugging entry point for the cutoff search (the samplers never materialise the mask).
    """
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use nucleus_mask_ref")
    if sample_mode(temperature, top_p) != SAMPLE_NUCLEUS:
        raise ValueError("nucleus_mask needs temperature > 0 and top_p < 1")
    check_logits(logits, "logits")
    logits = logits.contiguous()
    B, V = logits.shape
    out = torch.empty(B, V, dtype=torch.int8, device=logits.device)
    _nucleus_mask_kernel[(B,)](logits, logits.stride(0), V, out, inverse_temperature(temperature), float(top_p),
                               BLOCK=SCAN_BLOCK, num_warps=NUM_WARPS)
    return out.bool()
