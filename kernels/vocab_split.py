"""One row's vocabulary split into chunks: the partial statistics each chunk reports, how they
combine exactly, and how many chunks a launch uses.

Why: the gate statistics, both candidates and the nucleus cut-off are scans over a whole vocabulary
row. One program per row leaves a batch-1 step of a 262k vocabulary on one SM (and the nucleus
search adds 9 more serial passes over the row), so at small batches the launchers (sample.py
sample_rows, nudge_gate.py nudge_step, spec_accept.py spec_accept) split each row over C chunks,
one program per (row, chunk), and a small combine finishes the row. With C = 1 they keep the single
program per row (no workspace, one launch).

The partial record of one chunk [lo, hi) of one logits row (x = logits.float(), s = x * inv_temp,
indices GLOBAL, i.e. the row's own vocabulary indices):

  floats (F_*, float32 [..., C, NUM_FLOATS])     ints (I_*, int32 [..., C, NUM_INTS])
  F_M   m  = max x (NEG_BIG for an empty or all -inf chunk)
  F_Z   z  = sum exp(x - m)                        I_ARG  first index of m (lo when none is larger)
  F_SX  sx = sum exp(x - m) * (x - m)  (e > 0)
  F_BV  bv = max over the sampled set of s + g     I_BI   first index of bv
  F_MT  mt = max s     (nucleus rows only)
  F_ZT  zt = sum exp(s - mt)
with g = gumbel(seed, step, stream, GLOBAL index) (rng.py): the same noise the unsplit draw adds.
The combine (`combine_partials_ref`, and the Triton `combine_chunks` in sample.py):
  M = max m_c, w_c = exp(m_c - M), Z = sum w_c z_c, SX = sum w_c (sx_c + (m_c - M) z_c),
  p_top = 1 / Z, entropy = log Z - SX / Z;  MT = max mt_c, ZT = sum zt_c exp(mt_c - MT);
  greedy = smallest arg_c among the chunks with m_c == M, draw = smallest bi_c among bv_c == max bv.
The first-index tie rule survives the split because chunks are index ranges: the global first
maximum lies in the first chunk reaching the maximum and is that chunk's first maximum. Each s + g is
the same float operation on the same values, so the candidates are exact; Z, SX, ZT are sums in a
different order, equal to the unsplit ones to float32 rounding (as the single program's per-lane
accumulators already are). This is the math of nudgefast/parallel/sharded_gate.py (a vocabulary
split across ranks is a split into chunks), which can switch to this record and combine.

Nucleus rows (sample.py, `_split_nucleus_kernel`): the cut-off search keeps its 8 passes of 16
candidate cut-offs, each now a (rows, C) launch; a program first recombines MT, ZT and the previous
pass's per-chunk masses (float32 [..., PASSES, C, SPLITS]) into the search interval, identically in
every program of the row (same values, same order), then sums its chunk's mass above the 16 new
candidates. Every candidate is summed in the same order (the same per-chunk tree, then the chunks in
index order), and float addition of non-negative terms is monotone, so the computed mass stays
monotone in the cut-off and the search is exact for the computed masses. A final (rows, C) pass
draws the chunk's Gumbel-max over the kept set into F_BV / I_BI.
"""
import torch

from nudgefast.kernels.rng import gumbel_ref

F_M, F_Z, F_SX, F_BV, F_MT, F_ZT = range(6)
NUM_FLOATS = 6
I_ARG, I_BI = range(2)
NUM_INTS = 2
NEG_BIG = -3.4028234663852886e38  # as sample.NEG_BIG: a finite "minus infinity" (no inf - inf)

SPLIT_MIN_CHUNK = 4096  # entries: below this a program's fixed cost (params, key, record) dominates
SPLIT_MAX_CHUNKS = 128  # chunks per row at most: the combine reads them in one [128] vector
SPLIT_WAVES = 2  # aim for about two programs per SM across the launch
DEFAULT_SM_COUNT = 132  # H100 SXM / H200: what a launch planned on the CPU (tests, compile reports) assumes
_SM_COUNTS: dict = {}


def sm_count(device) -> int:
    """Streaming multiprocessors of `device` (DEFAULT_SM_COUNT off CUDA)."""
    device = torch.device(device)
    if device.type != "cuda":
        return DEFAULT_SM_COUNT
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def plan_chunks(rows: int, vocabs, device, chunks: int | None = None, align: int = 2048) -> tuple[int, list[int]]:
    """(C, [chunk length per logits]): how a launch splits rows of these vocabulary sizes.

    chunks=None: the heuristic. C = 1 (the single-program path) when the rows alone give a wave
    (rows >= SMs); else enough chunks for ~SPLIT_WAVES programs per SM, each chunk at least
    SPLIT_MIN_CHUNK entries and a multiple of `align` (the scan block: whole blocks, aligned loads),
    at most SPLIT_MAX_CHUNKS. chunks=n forces n chunks of ceil(V / n) entries (no alignment: tests
    use it to put chunk boundaries anywhere); fewer when the last ones would be empty.
    A chunk length is per logits tensor (two models may differ in V); chunks past a shorter
    vocabulary are empty and report neutral records.
    """
    vocabs = [int(v) for v in vocabs]
    if not vocabs or min(vocabs) < 1:
        raise ValueError(f"vocabulary sizes must be >= 1, got {vocabs}")
    V = max(vocabs)
    if chunks is not None:
        if not isinstance(chunks, int) or isinstance(chunks, bool) or not 1 <= chunks <= SPLIT_MAX_CHUNKS:
            raise ValueError(f"chunks must be an int in [1, {SPLIT_MAX_CHUNKS}], got {chunks!r}")
        length = -(-V // chunks)
        C = -(-V // length)
        return C, [-(-v // C) for v in vocabs]
    sms = sm_count(device)
    if rows >= sms or V < 2 * SPLIT_MIN_CHUNK:
        return 1, list(vocabs)
    want = -(-SPLIT_WAVES * sms // rows)
    blocks = max(-(-SPLIT_MIN_CHUNK // align), -(-(-(-V // want)) // align), -(-V // (SPLIT_MAX_CHUNKS * align)))
    C = -(-V // (blocks * align))
    if C <= 1:
        return 1, list(vocabs)
    return C, [align * -(-(-(-v // C)) // align) for v in vocabs]


# ----------------------------------------------------------------------------- torch reference


def chunk_partials_ref(logits: torch.Tensor, lo: int, hi: int, seed: torch.Tensor, step: torch.Tensor,
                       stream: int, inv_temp: torch.Tensor, sampled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 [B, NUM_FLOATS], int32 [B, NUM_INTS]): the record of columns [lo, hi) of logits [B, V].

    sampled bool [B]: rows that draw (bv/bi; the others report bv = -inf, bi = lo). The nucleus
    restriction is not applied here (the record of a plain Gumbel draw)."""
    B = logits.shape[0]
    x = logits[:, lo:hi].float()
    fl = torch.zeros(B, NUM_FLOATS)
    it = torch.full((B, NUM_INTS), lo, dtype=torch.int32)
    fl[:, F_M] = NEG_BIG
    fl[:, F_MT] = NEG_BIG
    fl[:, F_BV] = float("-inf")
    if hi <= lo:
        return fl, it
    m, arg = x.max(dim=-1)  # the first index of the maximum
    live = m > float("-inf")
    m = torch.where(live, m, NEG_BIG)
    xm = x - m.unsqueeze(1)
    e = torch.exp(xm)
    fl[:, F_M], fl[:, F_Z] = m, e.sum(dim=-1)
    fl[:, F_SX] = torch.where(e > 0, e * xm, 0.0).sum(dim=-1)
    it[:, I_ARG] = torch.where(live, arg + lo, lo).to(torch.int32)
    s = x * inv_temp.reshape(-1, 1)
    mt = s.max(dim=-1).values
    mt = torch.where(mt > float("-inf"), mt, NEG_BIG)
    fl[:, F_MT], fl[:, F_ZT] = mt, torch.exp(s - mt.unsqueeze(1)).sum(dim=-1)
    v = s + gumbel_ref(seed.reshape(-1, 1), step.reshape(-1, 1), stream, torch.arange(lo, hi))
    v = v.masked_fill(~sampled.reshape(-1, 1), float("-inf"))
    bv, bi = v.max(dim=-1)
    fl[:, F_BV] = bv
    it[:, I_BI] = torch.where(bv > float("-inf"), bi + lo, lo).to(torch.int32)
    return fl, it


def combine_partials_ref(floats: torch.Tensor, ints: torch.Tensor):
    """floats [B, C, NUM_FLOATS], ints [B, C, NUM_INTS] -> (p_top, entropy, greedy, draw, mt, zt), [B] each
    (float32, float32, int64, int64, float32, float32): the module docstring's combine."""
    m, z, sx = floats[..., F_M], floats[..., F_Z], floats[..., F_SX]
    M = m.max(dim=1, keepdim=True).values
    w = torch.exp(m - M)
    Z = (w * z).sum(dim=1)
    SX = (w * (sx + (m - M) * z)).sum(dim=1)
    big = torch.iinfo(torch.int32).max
    greedy = torch.where(m == M, ints[..., I_ARG], big).min(dim=1).values.long()
    bv = floats[..., F_BV]
    draw = torch.where(bv == bv.max(dim=1, keepdim=True).values, ints[..., I_BI], big).min(dim=1).values.long()
    mt = floats[..., F_MT]
    MT = mt.max(dim=1, keepdim=True).values
    ZT = (floats[..., F_ZT] * torch.exp(mt - MT)).sum(dim=1)
    return 1.0 / Z, torch.log(Z) - SX / Z, greedy, draw, MT.squeeze(1), ZT
