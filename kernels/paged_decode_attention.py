"""Single-token decode attention over the paged KV cache.

Page layout (project-wide): per layer, `k_pages` / `v_pages` are [num_pages, page_size, n_kv_heads,
head_dim]. Position `pos` of row b lives in page `block_tables[b, pos // page_size]` at offset
`pos % page_size`. `seq_lens[b]` counts the valid positions of row b INCLUDING the current token
(already stored), so the query sits at position `seq_lens[b] - 1`. Rows with seq_lens 0 are padding
and produce zeros. Block-table entries past a row's last page are never read by the kernel (the
reference clamps them), so they may hold anything. Page slots past a row's end must hold finite
values (create the pool with torch.zeros): the references mask them by score, and 0 * NaN = NaN.

Rules, shared with paged_prefill_attention.py (which imports the helpers below):
- GQA: query head h reads kv head h // (n_q_heads // n_kv_heads).
- scores = (q . k) * scale; with softcap > 0, scores = softcap * tanh(scores / softcap).
- window > 0: the query at position p sees keys at positions > p - window (the last `window`
  positions including itself, the Hugging Face sliding-window rule).
- softmax and accumulation in fp32; the output has q's dtype.

The Triton kernel is flash-decoding: one program per (row, kv head, split) loads each K/V tile
once for the whole group of query heads sharing that kv head, keeps an online softmax in fp32, and
(when there are few rows and heads to fill the GPU) splits the sequence into chunks whose partial
results a second small kernel merges. With a power-of-two page of >= 16 slots each K/V tile is one
page-aligned run of keys (kv_tile_size): one block-table read per tile, a scalar 64-bit page base and
loop-invariant int32 offsets, which keeps the kernel free of register spills at head_dim 64-256
(benchmarks/KERNELS.md). Odd page sizes look each key's page up.
"""
import math
import os

import torch
import torch.nn.functional as F

from nudgefast.kernels import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

_INT_DTYPES = (torch.int32, torch.int64)


# ----------------------------------------------------------------------------------------------
# Shared helpers (also used by paged_prefill_attention.py)
# ----------------------------------------------------------------------------------------------

def check_paged_attention_inputs(op, q, k_pages, v_pages, block_tables, seq_lens, scale, window,
                                 softcap):
    """Validate what the paged attention ops share; raise TypeError/ValueError naming the problem."""
    for name, t in (("q", q), ("k_pages", k_pages), ("v_pages", v_pages),
                    ("block_tables", block_tables), ("seq_lens", seq_lens)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if k_pages.dim() != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(f"{op}: k_pages and v_pages must both be [num_pages, page_size, n_kv_heads, "
                         f"head_dim], got {tuple(k_pages.shape)} and {tuple(v_pages.shape)}")
    if q.dim() != 3:
        raise ValueError(f"{op}: q must be 3-D [tokens, n_q_heads, head_dim], got {tuple(q.shape)}")
    n_q_heads, head_dim = q.shape[1:]
    n_kv_heads = k_pages.shape[2]
    if head_dim != k_pages.shape[3]:
        raise ValueError(f"{op}: q head_dim {head_dim} != pages head_dim {k_pages.shape[3]}")
    if n_kv_heads == 0 or n_q_heads % n_kv_heads != 0:
        raise ValueError(f"{op}: n_q_heads {n_q_heads} must be a multiple of n_kv_heads {n_kv_heads}")
    if not (q.dtype == k_pages.dtype == v_pages.dtype) or not q.dtype.is_floating_point:
        raise TypeError(f"{op}: q, k_pages, v_pages must share one floating dtype, got {q.dtype}, "
                        f"{k_pages.dtype}, {v_pages.dtype}")
    if block_tables.dim() != 2 or block_tables.dtype not in _INT_DTYPES:
        raise TypeError(f"{op}: block_tables must be a 2-D int32 tensor [batch, max_pages], got "
                        f"{block_tables.dtype} of shape {tuple(block_tables.shape)}")
    if seq_lens.dim() != 1 or seq_lens.dtype not in _INT_DTYPES:
        raise TypeError(f"{op}: seq_lens must be a 1-D int32 tensor [batch], got {seq_lens.dtype} "
                        f"of shape {tuple(seq_lens.shape)}")
    if seq_lens.shape[0] != block_tables.shape[0]:
        raise ValueError(f"{op}: seq_lens has {seq_lens.shape[0]} rows, block_tables "
                         f"{block_tables.shape[0]}")
    devices = {t.device for t in (q, k_pages, v_pages, block_tables, seq_lens)}
    if len(devices) != 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted(map(str, devices))}")
    if not isinstance(window, int) or window < 0:
        raise ValueError(f"{op}: window must be an int >= 0 (0 = no window), got {window!r}")
    if not math.isfinite(float(softcap)) or softcap < 0:
        raise ValueError(f"{op}: softcap must be a finite float >= 0 (0 = off), got {softcap!r}")
    if not math.isfinite(float(scale)):
        raise ValueError(f"{op}: scale must be finite, got {scale!r}")


def check_lengths_fit(op, max_seq_len, block_tables, page_size):
    """Host-side check (the references sync anyway): every row must fit in its block table."""
    capacity = block_tables.shape[1] * page_size
    if max_seq_len > capacity:
        raise ValueError(f"{op}: a row has seq_len {max_seq_len} but block_tables holds only "
                         f"{block_tables.shape[1]} pages x {page_size} = {capacity} positions")


def gather_kv_pages(k_pages, v_pages, block_tables, first_page, n_pages):
    """Pages [first_page, first_page + n_pages) of every row of K and V, each [B, L, Hkv, D].

    A single row whose pages have consecutive ids (what a fresh allocator hands out) is returned as
    a view of the pool: no copy at all. Otherwise one index_select over whole pages per cache (a
    memcpy per page, no per-token indexing); block-table entries past a row's last page are
    clamped to a valid page id and the positions they cover are masked by the caller.
    """
    num_pages, page_size, n_kv_heads, head_dim = k_pages.shape
    batch, length = block_tables.shape[0], n_pages * page_size
    if batch == 1:
        ids = block_tables[0, first_page:first_page + n_pages].tolist()
        if ids == list(range(ids[0], ids[0] + n_pages)) and 0 <= ids[0] <= num_pages - n_pages:
            span = slice(ids[0], ids[0] + n_pages)
            return (k_pages[span].reshape(1, length, n_kv_heads, head_dim),
                    v_pages[span].reshape(1, length, n_kv_heads, head_dim))
    ids = block_tables[:, first_page:first_page + n_pages].reshape(-1).long().clamp_(0, num_pages - 1)
    return (torch.index_select(k_pages, 0, ids).view(batch, length, n_kv_heads, head_dim),
            torch.index_select(v_pages, 0, ids).view(batch, length, n_kv_heads, head_dim))


def dense_attention(q, k, v, mask, scale, softcap):
    """q [B, Hq, M, D]; k, v [B, L, Hkv, D] (any strides); mask bool [B, 1, M, L] or None (all True).

    Returns [B, Hq, M, D] in the compute dtype. Without softcap this is one fused
    scaled_dot_product_attention call: on the CPU it takes the strided k/v views as they are (no
    transpose copy), handles GQA itself (enable_gqa) and never materialises the score matrix. With
    softcap the scores are computed explicitly, since SDPA cannot apply tanh before the softmax.
    A query whose mask row is all False gets NaN here; callers zero or drop those rows.
    """
    k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, Hkv, L, D] views
    if softcap <= 0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    batch, n_q_heads, n_queries, head_dim = q.shape
    n_kv_heads = k.shape[1]
    group = n_q_heads // n_kv_heads
    # Fold the query heads of a group into the query axis: one matmul per kv head, no K/V repeat.
    qg = q.reshape(batch, n_kv_heads, group * n_queries, head_dim)
    scores = torch.matmul(qg, k.transpose(-1, -2)).mul_(scale / softcap).tanh_().mul_(softcap)
    scores = scores.view(batch, n_q_heads, n_queries, -1)
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).view(batch, n_kv_heads, group * n_queries, -1)
    return torch.matmul(probs, v).view(batch, n_q_heads, n_queries, head_dim)


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------

def paged_decode_attention_ref(q, k_pages, v_pages, block_tables, seq_lens, scale, window=0,
                               softcap=0.0):
    """Plain-torch decode attention; the CPU engine's hot path (called per layer per token).

    What keeps it fast on the CPU: no Python loop over rows; one host read of min/max seq_len per
    call; only the pages that some row needs are gathered (whole pages, one index_select each for K
    and V, skipping pages before every row's sliding window; a single row on consecutive pages is
    read as a view, no copy); when every row has the same length
    (always at batch 1) the gathered keys are sliced instead of masked; and the attention itself is
    one fused SDPA call that reads the gathered [B, L, Hkv, D] tensors through strided views with
    GQA handled inside, so K/V are never transposed, repeated or copied again (fp32 inputs).
    """
    check_paged_attention_inputs("paged_decode_attention_ref", q, k_pages, v_pages, block_tables,
                                 seq_lens, scale, window, softcap)
    batch, n_q_heads, head_dim = q.shape
    if seq_lens.shape[0] != batch:
        raise ValueError(f"paged_decode_attention_ref: q has {batch} rows, seq_lens {seq_lens.shape[0]}")
    page_size = k_pages.shape[1]
    if batch == 0:
        return torch.empty_like(q)
    lo, hi = (int(x) for x in torch.aminmax(seq_lens))
    if lo < 0:
        raise ValueError(f"paged_decode_attention_ref: seq_lens must be >= 0, got {lo}")
    if hi == 0:
        return torch.zeros_like(q)
    check_lengths_fit("paged_decode_attention_ref", hi, block_tables, page_size)

    # Keys any row can see: [first_key, hi). With a window, row b needs keys >= seq_len_b - window.
    first_key = max(0, lo - window) if window > 0 else 0
    first_page = first_key // page_size
    n_pages = -(-hi // page_size) - first_page
    compute_dtype = torch.float32
    k, v = gather_kv_pages(k_pages, v_pages, block_tables, first_page, n_pages)
    k, v = k.to(compute_dtype), v.to(compute_dtype)
    base = first_page * page_size  # absolute position of gathered key 0

    if lo == hi:  # equal lengths: slice the visible keys, no mask at all
        start = (max(0, hi - window) if window > 0 else 0) - base
        k, v, mask = k[:, start:hi - base], v[:, start:hi - base], None
    else:
        pos = torch.arange(base, base + k.shape[1], device=q.device)
        lens = seq_lens.view(batch, 1).to(torch.int64)
        visible = pos < lens
        if window > 0:
            visible &= pos >= lens - window
        mask = visible.view(batch, 1, 1, -1)
    out = dense_attention(q.to(compute_dtype).unsqueeze(2), k, v, mask, scale, softcap).squeeze(2)
    if lo == 0:  # padding rows see no keys (NaN above); they must read as zeros
        out = out.masked_fill((seq_lens == 0).view(batch, 1, 1), 0.0)
    return out.to(q.dtype)


# ----------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def tanh_f32(x):
        """tanh from exp2 of a non-positive argument: never overflows, exact limits of +-1."""
        e = tl.exp2(-2.8853900817779268 * tl.abs(x))  # exp(-2|x|); 2.885... = 2 / ln(2)
        t = (1.0 - e) / (1.0 + e)
        return tl.where(x >= 0, t, -t)

    @triton.jit
    def dot_f32(a, b, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """a @ b accumulated in fp32. UPCAST works around Triton's interpreter, whose tl.dot
        multiplies bf16 operands as their raw uint16 bits; bf16 values are exact in fp32, so the
        upcast product is the one the GPU computes (up to summation order)."""
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return tl.dot(a, b, input_precision=DOT_PRECISION)

    @triton.jit
    def _kv_tile(pages_ptr, bt_row, stride_btp, page_size, tile, kv_head, n, d, lo, hi, d_mask,
                 stride_pp, stride_ps, stride_ph, stride_pd, tile_offs, PAGED: tl.constexpr, EVEN_D: tl.constexpr):
        """Keys (or values) at positions tile + n, [BLOCK_N, BLOCK_D]; positions outside [lo, hi) read 0.

        PAGED: the tile lies inside one page (page_size is a multiple of BLOCK_N and the tile starts on
        a multiple of BLOCK_N), so one block-table read gives a scalar 64-bit base pointer and the
        element offsets are the loop-invariant int32 `tile_offs`: no per-token page lookup and no
        64-bit pointer per element (which is what made this kernel spill at head_dim 128). Otherwise
        (odd page sizes) each position looks its page up.
        """
        pos = tile + n
        valid = (pos >= lo) & (pos < hi)
        if EVEN_D:
            mask = valid[:, None]
        else:
            mask = valid[:, None] & d_mask[None, :]
        if PAGED:
            page = tl.load(bt_row + (tile // page_size) * stride_btp).to(tl.int64)
            base = pages_ptr + page * stride_pp + kv_head * stride_ph + (tile % page_size) * stride_ps
            return tl.load(base + tile_offs, mask=mask, other=0.0)
        page = tl.load(bt_row + (pos // page_size) * stride_btp, mask=valid, other=0).to(tl.int64)
        offset = pos % page_size
        return tl.load(pages_ptr + page[:, None] * stride_pp + offset[:, None] * stride_ps + kv_head * stride_ph
                       + d[None, :] * stride_pd, mask=mask, other=0.0)

    @triton.jit
    def _decode_kernel(
        q_ptr, k_pages_ptr, v_pages_ptr, block_tables_ptr, seq_lens_ptr,
        out_ptr, part_acc_ptr, part_ml_ptr,
        scale, softcap, window, group_size, head_dim, page_size, num_splits,
        stride_qb, stride_qh, stride_qd,
        stride_kpp, stride_kps, stride_kph, stride_kpd,
        stride_vpp, stride_vps, stride_vph, stride_vpd,
        stride_btb, stride_btp,
        stride_ob, stride_oh, stride_od,
        USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr, WRITE_PARTIAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
        UPCAST_DOT: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        PAGED: tl.constexpr, EVEN_D: tl.constexpr,
    ):
        LOG2E: tl.constexpr = 1.4426950408889634
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)

        seq_len = tl.load(seq_lens_ptr + row).to(tl.int32)
        # Visible keys [kv_lo, seq_len): the window rule for the query at seq_len - 1.
        kv_lo = 0
        if USE_WINDOW:
            kv_lo = tl.maximum(seq_len - window, 0)
        # Tiles start on multiples of BLOCK_N (so that a PAGED tile never straddles a page); the first
        # one masks the keys before kv_lo. A split takes whole tiles.
        first = kv_lo - kv_lo % BLOCK_N
        n_tiles = tl.cdiv(seq_len - first, BLOCK_N)
        tiles_per_split = tl.cdiv(n_tiles, num_splits)
        start = first + split * tiles_per_split * BLOCK_N
        end = tl.minimum(seq_len, start + tiles_per_split * BLOCK_N)

        # The group of query heads that share this kv head: the K/V tiles are loaded once for all.
        g = tl.arange(0, BLOCK_G)
        heads = kv_head * group_size + g
        g_mask = g < group_size
        d = tl.arange(0, BLOCK_D)
        d_mask = d < head_dim
        q = tl.load(q_ptr + row * stride_qb + heads[:, None] * stride_qh + d[None, :] * stride_qd,
                    mask=g_mask[:, None] & d_mask[None, :], other=0.0)

        m = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max, log2 units
        l = tl.zeros([BLOCK_G], tl.float32)  # running sum of exp2(score - m)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        bt_row = block_tables_ptr + row.to(tl.int64) * stride_btb
        n = tl.arange(0, BLOCK_N)
        k_offs = n[:, None] * stride_kps + d[None, :] * stride_kpd  # int32, one page at most
        v_offs = n[:, None] * stride_vps + d[None, :] * stride_vpd
        for tile in range(start, end, BLOCK_N):
            k = _kv_tile(k_pages_ptr, bt_row, stride_btp, page_size, tile, kv_head, n, d, kv_lo, end, d_mask,
                         stride_kpp, stride_kps, stride_kph, stride_kpd, k_offs, PAGED, EVEN_D)
            s = dot_f32(q, tl.trans(k), DOT_PRECISION, UPCAST_DOT)  # [BLOCK_G, BLOCK_N] fp32
            if USE_SOFTCAP:
                s = softcap * tanh_f32(s * (scale / softcap)) * LOG2E
            else:
                s = s * (scale * LOG2E)
            pos = tile + n
            s = tl.where(((pos >= kv_lo) & (pos < end))[None, :], s, float("-inf"))
            # Every tile holds >= 1 visible key (kv_lo < end and tile < end), so m_new is finite.
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            v = _kv_tile(v_pages_ptr, bt_row, stride_btp, page_size, tile, kv_head, n, d, kv_lo, end, d_mask,
                         stride_vpp, stride_vps, stride_vph, stride_vpd, v_offs, PAGED, EVEN_D)
            acc = acc * alpha[:, None] + dot_f32(p.to(v.dtype), v, DOT_PRECISION, UPCAST_DOT)
            m = m_new

        out_mask = g_mask[:, None] & d_mask[None, :]
        if WRITE_PARTIAL:
            # Unnormalised partials [B, Hq, num_splits, D] and (m, l) [B, Hq, num_splits, 2];
            # an empty split leaves m = -inf, l = 0, acc = 0, which the merge weighs as nothing.
            part = (row * tl.num_programs(1) * group_size + heads) * num_splits + split
            tl.store(part_acc_ptr + part[:, None].to(tl.int64) * head_dim + d[None, :], acc,
                     mask=out_mask)
            tl.store(part_ml_ptr + part * 2, m, mask=g_mask)
            tl.store(part_ml_ptr + part * 2 + 1, l, mask=g_mask)
        else:
            out = acc / tl.where(l > 0, l, 1.0)[:, None]  # seq_len 0 -> zeros
            tl.store(out_ptr + row * stride_ob + heads[:, None] * stride_oh + d[None, :] * stride_od,
                     out.to(out_ptr.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _decode_merge_kernel(
        part_acc_ptr, part_ml_ptr, out_ptr,
        n_q_heads, head_dim, num_splits,
        stride_ob, stride_oh, stride_od,
        BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # Merge the splits of one (row, query head): rescale each to the global max and sum.
        row = tl.program_id(0)
        head = tl.program_id(1)
        sp = tl.arange(0, BLOCK_S)
        s_mask = sp < num_splits
        d = tl.arange(0, BLOCK_D)
        d_mask = d < head_dim
        part = (row * n_q_heads + head) * num_splits + sp
        m = tl.load(part_ml_ptr + part * 2, mask=s_mask, other=float("-inf"))
        l = tl.load(part_ml_ptr + part * 2 + 1, mask=s_mask, other=0.0)
        m_max = tl.max(m, axis=0)
        m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # all splits empty: seq_len 0
        w = tl.exp2(m - m_max)
        l_total = tl.sum(l * w, axis=0)
        acc = tl.load(part_acc_ptr + part[:, None].to(tl.int64) * head_dim + d[None, :],
                      mask=s_mask[:, None] & d_mask[None, :], other=0.0)
        out = tl.sum(acc * w[:, None], axis=0) / tl.where(l_total > 0, l_total, 1.0)
        tl.store(out_ptr + row * stride_ob + head * stride_oh + d * stride_od,
                 out.to(out_ptr.dtype.element_ty), mask=d_mask)


def _use_triton(t):
    return HAS_TRITON and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def interpreter_needs_upcast(q):
    """True when tl.dot must see fp32 operands: bf16 under Triton's interpreter (see dot_f32)."""
    return q.dtype == torch.bfloat16 and not q.is_cuda


_SM_COUNT = {}


def _sm_count(device):
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _pick_num_splits(batch, n_kv_heads, max_keys, block_n, device):
    """Split the sequence only when rows x kv heads leave most of the GPU idle.

    Uses only host-known shapes (the block-table width bounds every row's length), so there is no
    host sync and the choice is fixed for a CUDA graph. Each split keeps >= 4 tiles of keys.
    """
    programs = batch * n_kv_heads
    sms = _sm_count(device)
    if programs >= sms:
        return 1
    by_occupancy = triton.cdiv(2 * sms, programs)
    by_length = max(1, triton.cdiv(max_keys, block_n) // 4)
    return max(1, min(by_occupancy, by_length, 32))


def kv_tile_size(head_dim, page_size, cap=None):
    """(BLOCK_N, PAGED): keys per tile and whether each tile lies inside one page.

    A power-of-two page of >= 16 slots (every real pool) is read one page-aligned tile at a time
    (PAGED); odd page sizes fall back to a per-token page lookup. Wide heads take fewer keys per
    tile to bound registers; `cap` bounds it further (a power of two >= 16).
    """
    if cap is None:
        cap = 64 if max(16, triton.next_power_of_2(head_dim)) <= 128 else 32
    if page_size >= 16 and page_size & (page_size - 1) == 0:
        return min(cap, page_size), True
    return cap, False


def decode_launch_config(head_dim, group, page_size, dtype=torch.bfloat16):
    """Constexprs and warps of _decode_kernel that depend on the model's shape (one place, also read
    by scripts/kernel_report.py through the launcher)."""
    # tl.dot wants every dim >= 16.
    block_d = max(16, triton.next_power_of_2(head_dim))
    # float32's exact products run as FMA loops with the operands in registers: 16-key tiles at most
    # (32 x 256 spilled on sm_80).
    block_n, paged = kv_tile_size(head_dim, page_size, cap=16 if dtype == torch.float32 else None)
    return dict(BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, BLOCK_D=block_d, PAGED=paged,
                EVEN_D=block_d == head_dim, num_warps=4)


def paged_decode_attention(q, k_pages, v_pages, block_tables, seq_lens, scale, window=0,
                           softcap=0.0, *, num_splits=None):
    """Decode attention for one new token per row; see the module docstring for the rules.

    q: [B, Hq, D]; k_pages, v_pages: [num_pages, page_size, Hkv, D]; block_tables: int32
    [B, max_pages]; seq_lens: int32 [B] (includes the current token). Returns [B, Hq, D] in q.dtype.
    num_splits: split-K factor (None: chosen from the GPU size and block-table width).
    Triton on CUDA (or under TRITON_INTERPRET=1); the reference otherwise. No host sync on CUDA.
    """
    if not _use_triton(q):
        return paged_decode_attention_ref(q, k_pages, v_pages, block_tables, seq_lens, scale,
                                          window, softcap)
    check_paged_attention_inputs("paged_decode_attention", q, k_pages, v_pages, block_tables,
                                 seq_lens, scale, window, softcap)
    batch, n_q_heads, head_dim = q.shape
    if seq_lens.shape[0] != batch:
        raise ValueError(f"paged_decode_attention: q has {batch} rows, seq_lens {seq_lens.shape[0]}")
    page_size, n_kv_heads = k_pages.shape[1], k_pages.shape[2]
    group = n_q_heads // n_kv_heads
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if batch == 0 or n_q_heads == 0:
        return out

    cfg = decode_launch_config(head_dim, group, page_size, q.dtype)
    block_d, block_n = cfg["BLOCK_D"], cfg["BLOCK_N"]
    if num_splits is None:
        # (the split rule counts keys in units of 64, 32 for wide heads, whatever the tile)
        num_splits = _pick_num_splits(batch, n_kv_heads, block_tables.shape[1] * page_size,
                                      64 if block_d <= 128 else 32, q.device)
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"paged_decode_attention: num_splits must be an int >= 1, got {num_splits!r}")
    split = num_splits > 1
    if split:
        part_acc = torch.empty((batch, n_q_heads, num_splits, head_dim), dtype=torch.float32,
                               device=q.device)
        part_ml = torch.empty((batch, n_q_heads, num_splits, 2), dtype=torch.float32,
                              device=q.device)
    else:
        part_acc = part_ml = out  # unused
    # fp32 inputs get true fp32 products (matching the reference), not TF32.
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    upcast = interpreter_needs_upcast(q)
    _decode_kernel[(batch, n_kv_heads, num_splits)](
        q, k_pages, v_pages, block_tables, seq_lens, out, part_acc, part_ml,
        float(scale), float(softcap), window, group, head_dim, page_size, num_splits,
        *q.stride(), *k_pages.stride(), *v_pages.stride(), *block_tables.stride(), *out.stride(),
        USE_SOFTCAP=softcap > 0, USE_WINDOW=window > 0, WRITE_PARTIAL=split, DOT_PRECISION=precision, UPCAST_DOT=upcast,
        **cfg,
    )
    if split:
        _decode_merge_kernel[(batch, n_q_heads)](
            part_acc, part_ml, out, n_q_heads, head_dim, num_splits, *out.stride(),
            BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d, num_warps=4,
        )
    return out
