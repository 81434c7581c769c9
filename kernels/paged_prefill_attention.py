"""Multi-token attention over the paged KV cache: prefill chunks and speculative verify.

The queries are flattened over the batch: q is [T, Hq, D] and sequence b owns
q[cu_q_lens[b]:cu_q_lens[b+1]]. They are the LAST q_len_b tokens of that sequence and are already
stored in the pages, so query i of sequence b sits at position seq_lens[b] - q_len_b + i and sees the
keys at positions <= its own (causal), restricted further by the sliding window when window > 0.
Sequences with q_len 0 are allowed and produce nothing. The page layout, GQA, softcap, window and
precision rules are those of paged_decode_attention.py, whose shared helpers this file uses.

The Triton kernel tiles the queries of one sequence and one kv head as rows (token, query head in
the group), so each K/V tile is loaded once for all the query heads sharing it; it runs an online
softmax over the key tiles each query block can see (causal and window bounds skip whole tiles).
"""
import os

import torch

from nudgefast.kernels import HAS_TRITON
from nudgefast.kernels.paged_decode_attention import (
    check_lengths_fit,
    check_paged_attention_inputs,
    dense_attention,
    gather_kv_pages,
    interpreter_needs_upcast,
    kv_tile_size,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from nudgefast.kernels.paged_decode_attention import _kv_tile, dot_f32, tanh_f32

# Chunks up to this many queries per sequence (speculative verify, short appends) are attended for
# the whole batch at once, padded to the longest chunk; longer chunks (prompt prefill) go one
# sequence at a time so that no padded queries are computed.
_BATCHED_MAX_Q = 16


def _check_prefill_inputs(op, q, k_pages, v_pages, block_tables, seq_lens, cu_q_lens, scale,
                          window, softcap):
    check_paged_attention_inputs(op, q, k_pages, v_pages, block_tables, seq_lens, scale, window,
                                 softcap)
    if not isinstance(cu_q_lens, torch.Tensor):
        raise TypeError(f"{op}: cu_q_lens must be a torch.Tensor, got {type(cu_q_lens).__name__}")
    if cu_q_lens.dim() != 1 or cu_q_lens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: cu_q_lens must be a 1-D int32 tensor [batch + 1], got "
                        f"{cu_q_lens.dtype} of shape {tuple(cu_q_lens.shape)}")
    if cu_q_lens.shape[0] != seq_lens.shape[0] + 1:
        raise ValueError(f"{op}: cu_q_lens has {cu_q_lens.shape[0]} entries, expected batch + 1 = "
                         f"{seq_lens.shape[0] + 1}")
    if cu_q_lens.device != q.device:
        raise ValueError(f"{op}: cu_q_lens is on {cu_q_lens.device}, q on {q.device}")


def _attend_rows(q, k_pages, v_pages, block_tables, scale, window, softcap, rows, q_starts,
                 q_lens, seq_lens, out):
    """Attention for the sequences `rows` (host ints), padded to their longest chunk; writes out."""
    page_size = k_pages.shape[1]
    n_q_heads, head_dim = q.shape[1:]
    device = q.device
    n_rows, max_q = len(rows), max(q_lens)
    # Keys any of these queries can see: [first_key, max seq_len).
    first_pos = [s - n for s, n in zip(seq_lens, q_lens)]
    first_key = min(max(0, p - window + 1) for p in first_pos) if window > 0 else 0
    first_page = first_key // page_size
    n_pages = -(-max(seq_lens) // page_size) - first_page
    if n_rows == block_tables.shape[0]:  # every row has queries (the usual verify step)
        tables = block_tables
    elif n_rows == 1:
        tables = block_tables[rows[0]:rows[0] + 1]
    else:
        tables = block_tables[torch.tensor(rows, device=block_tables.device)]
    k, v = gather_kv_pages(k_pages, v_pages, tables, first_page, n_pages)
    k, v = k.to(torch.float32), v.to(torch.float32)

    if n_rows == 1:  # no padding: the chunk is a contiguous slice of q
        token_ids = None
        qb = q[q_starts[0]:q_starts[0] + q_lens[0]].unsqueeze(0)
    else:  # scatter the chunks into [n_rows, max_q] with one index (padded queries stay zero)
        row_of = torch.repeat_interleave(torch.arange(n_rows), torch.tensor(q_lens))
        within = torch.cat([torch.arange(n) for n in q_lens])
        token_ids = torch.cat([torch.arange(s, s + n) for s, n in zip(q_starts, q_lens)]).to(device)
        row_of, within = row_of.to(device), within.to(device)
        qb = q.new_zeros((n_rows, max_q, n_q_heads, head_dim))
        qb[row_of, within] = q[token_ids]
    qb = qb.to(torch.float32).transpose(1, 2)  # [n_rows, Hq, max_q, D]

    key_pos = torch.arange(first_page * page_size, first_page * page_size + k.shape[1], device=device)
    query_pos = (torch.tensor(first_pos, device=device).view(n_rows, 1)
                 + torch.arange(max_q, device=device).view(1, max_q))  # [n_rows, max_q]
    visible = key_pos.view(1, 1, -1) <= query_pos.unsqueeze(-1)  # causal, and < seq_len
    if window > 0:
        visible &= key_pos.view(1, 1, -1) > (query_pos - window).unsqueeze(-1)
    # Padded queries (i >= q_len) see keys past their row's end; their outputs are dropped below.
    attn = dense_attention(qb, k, v, visible.unsqueeze(1), scale, softcap)  # [n_rows, Hq, max_q, D]
    attn = attn.transpose(1, 2).to(out.dtype)
    if token_ids is None:
        out[q_starts[0]:q_starts[0] + q_lens[0]] = attn[0]
    else:
        out[token_ids] = attn[row_of, within]


def paged_prefill_attention_ref(q, k_pages, v_pages, block_tables, seq_lens, cu_q_lens, scale,
                                window=0, softcap=0.0, max_q_len=None):
    """Plain-torch multi-token paged attention (one host read of the lengths per call).

    Per group of sequences: the needed pages gathered once (whole pages, one index_select for K
    and V), one explicit [queries, keys] mask, one fused SDPA call with GQA inside (explicit scores
    only with softcap). Short chunks (<= 16 queries, e.g. speculative verify) run as one padded
    batch, so the verify step has no Python loop over rows; long prefill chunks run per sequence.
    max_q_len is accepted for signature parity with the kernel and not needed here.
    """
    op = "paged_prefill_attention_ref"
    _check_prefill_inputs(op, q, k_pages, v_pages, block_tables, seq_lens, cu_q_lens, scale,
                          window, softcap)
    cu = cu_q_lens.tolist()
    lens = seq_lens.tolist()
    q_lens = [b - a for a, b in zip(cu[:-1], cu[1:])]
    if cu[0] != 0 or cu[-1] != q.shape[0] or min(q_lens, default=0) < 0:
        raise ValueError(f"{op}: cu_q_lens must rise from 0 to T={q.shape[0]}, got {cu}")
    bad = [b for b, (n, s) in enumerate(zip(q_lens, lens)) if n > s]
    if bad:
        raise ValueError(f"{op}: row {bad[0]} has q_len {q_lens[bad[0]]} > seq_len {lens[bad[0]]}")
    check_lengths_fit(op, max(lens, default=0), block_tables, k_pages.shape[1])

    out = torch.empty_like(q)
    active = [b for b, n in enumerate(q_lens) if n > 0]
    if not active:
        return out
    if max(q_lens) <= _BATCHED_MAX_Q:
        groups = [active]
    else:
        groups = [[b] for b in active]
    for rows in groups:
        _attend_rows(q, k_pages, v_pages, block_tables, scale, window, softcap, rows,
                     [cu[b] for b in rows], [q_lens[b] for b in rows], [lens[b] for b in rows], out)
    return out


if HAS_TRITON:

    @triton.jit
    def _prefill_kernel(
        q_ptr, k_pages_ptr, v_pages_ptr, block_tables_ptr, seq_lens_ptr, cu_q_lens_ptr, out_ptr,
        scale, softcap, window, group_size, head_dim, page_size, tokens_per_block,
        stride_qt, stride_qh, stride_qd,
        stride_kpp, stride_kps, stride_kph, stride_kpd,
        stride_vpp, stride_vps, stride_vph, stride_vpd,
        stride_btb, stride_btp,
        stride_ot, stride_oh, stride_od,
        USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
        UPCAST_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        PAGED: tl.constexpr, EVEN_D: tl.constexpr,
    ):
        LOG2E: tl.constexpr = 1.4426950408889634
        seq = tl.program_id(0)
        q_block = tl.program_id(1)
        kv_head = tl.program_id(2)

        q_begin = tl.load(cu_q_lens_ptr + seq).to(tl.int32)
        q_len = tl.load(cu_q_lens_ptr + seq + 1).to(tl.int32) - q_begin
        first_tok = q_block * tokens_per_block
        if first_tok < q_len:
            seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
            # Row r of the tile is query token first_tok + r // group_size, query head
            # kv_head * group_size + r % group_size: the group shares every K/V tile.
            r = tl.arange(0, BLOCK_M)
            tok = first_tok + r // group_size
            heads = kv_head * group_size + r % group_size
            row_valid = (r < tokens_per_block * group_size) & (tok < q_len)
            q_pos = seq_len - q_len + tok  # absolute position of each row's query
            d = tl.arange(0, BLOCK_D)
            d_mask = d < head_dim
            q_tok = (q_begin + tok).to(tl.int64)
            q = tl.load(q_ptr + q_tok[:, None] * stride_qt + heads[:, None] * stride_qh
                        + d[None, :] * stride_qd,
                        mask=row_valid[:, None] & d_mask[None, :], other=0.0)

            # Keys this block can see: [kv_lo, kv_hi). The last query bounds the causal end; the
            # first query's window bounds the start.
            last_tok = tl.minimum(first_tok + tokens_per_block, q_len) - 1
            kv_hi = seq_len - q_len + last_tok + 1
            first_q_pos = seq_len - q_len + first_tok
            kv_lo = 0
            if USE_WINDOW:
                kv_lo = tl.maximum(first_q_pos - window + 1, 0)

            m = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max, log2 units
            l = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            bt_row = block_tables_ptr + seq.to(tl.int64) * stride_btb
            n = tl.arange(0, BLOCK_N)
            k_offs = n[:, None] * stride_kps + d[None, :] * stride_kpd  # int32, one page at most
            v_offs = n[:, None] * stride_vps + d[None, :] * stride_vpd
            # Tiles start on multiples of BLOCK_N, so a PAGED tile lies inside one page (_kv_tile).
            for tile in range(kv_lo - kv_lo % BLOCK_N, kv_hi, BLOCK_N):
                k = _kv_tile(k_pages_ptr, bt_row, stride_btp, page_size, tile, kv_head, n, d, kv_lo, kv_hi,
                             d_mask, stride_kpp, stride_kps, stride_kph, stride_kpd, k_offs, PAGED, EVEN_D)
                s = dot_f32(q, tl.trans(k), DOT_PRECISION, UPCAST_DOT)  # [BLOCK_M, BLOCK_N]
                if USE_SOFTCAP:
                    s = softcap * tanh_f32(s * (scale / softcap)) * LOG2E
                else:
                    s = s * (scale * LOG2E)
                pos = tile + n
                visible = (pos < kv_hi)[None, :] & (pos[None, :] <= q_pos[:, None])
                if USE_WINDOW:
                    visible = visible & (pos[None, :] > q_pos[:, None] - window)
                s = tl.where(visible, s, float("-inf"))
                # A row can see nothing in this tile (window start, or a padding row): keep its
                # max finite so that exp2 gives 0, not NaN.
                m_new = tl.maximum(m, tl.max(s, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m - m_safe)
                p = tl.exp2(s - m_safe[:, None])
                l = l * alpha + tl.sum(p, axis=1)
                v = _kv_tile(v_pages_ptr, bt_row, stride_btp, page_size, tile, kv_head, n, d, kv_lo, kv_hi,
                             d_mask, stride_vpp, stride_vps, stride_vph, stride_vpd, v_offs, PAGED, EVEN_D)
                acc = acc * alpha[:, None] + dot_f32(p.to(v.dtype), v, DOT_PRECISION, UPCAST_DOT)
                m = m_new

            out = acc / tl.where(l > 0, l, 1.0)[:, None]
            tl.store(out_ptr + q_tok[:, None] * stride_ot + heads[:, None] * stride_oh
                     + d[None, :] * stride_od,
                     out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_mask[None, :])


def _use_triton(t):
    return HAS_TRITON and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def prefill_launch_config(head_dim, group, page_size, max_q_len, dtype=torch.bfloat16):
    """Constexprs and warps of _prefill_kernel for a model shape and chunk length (one place, also read
    by scripts/kernel_report.py through the launcher)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    # float32 takes exact ("ieee") products, which run as FMA loops with every operand in registers,
    # not on tensor cores: half the rows, 16 keys per tile and 8 warps from 64 x 128 keep it from
    # spilling (checked by scripts/kernel_report.py).
    fp32 = dtype == torch.float32
    # Rows are (token, head of the group) pairs. Fit the tile to the chunk: a 5-token verify with
    # group 4 needs 32 rows, a prefill gets 128 (64 for wide heads, to bound registers).
    row_cap = (128 if block_d <= 128 else 64) // (2 if fp32 else 1)
    block_m = min(row_cap, max(16, triton.next_power_of_2(max_q_len * group)))
    block_m = max(block_m, triton.next_power_of_2(group))
    block_n, paged = kv_tile_size(head_dim, page_size, cap=16 if fp32 else None)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PAGED=paged, EVEN_D=block_d == head_dim,
                num_warps=8 if block_m * block_d >= (64 * 128 if fp32 else 128 * 128) else 4)


def paged_prefill_attention(q, k_pages, v_pages, block_tables, seq_lens, cu_q_lens, scale,
                            window=0, softcap=0.0, max_q_len=None):
    """Causal attention of each sequence's last q_len tokens; see the module docstring.

    q: [T, Hq, D]; k_pages, v_pages: [num_pages, page_size, Hkv, D]; block_tables: int32
    [B, max_pages]; seq_lens: int32 [B] (including the chunk); cu_q_lens: int32 [B + 1].
    max_q_len: the longest chunk (an upper bound is fine); None reads it from cu_q_lens, which
    costs a host sync. Returns [T, Hq, D] in q.dtype. Triton on CUDA (or under TRITON_INTERPRET=1);
    the reference otherwise.
    """
    if not _use_triton(q):
        return paged_prefill_attention_ref(q, k_pages, v_pages, block_tables, seq_lens, cu_q_lens,
                                           scale, window, softcap, max_q_len)
    op = "paged_prefill_attention"
    _check_prefill_inputs(op, q, k_pages, v_pages, block_tables, seq_lens, cu_q_lens, scale,
                          window, softcap)
    n_tokens, n_q_heads, head_dim = q.shape
    batch = seq_lens.shape[0]
    page_size, n_kv_heads = k_pages.shape[1], k_pages.shape[2]
    group = n_q_heads // n_kv_heads
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if n_tokens == 0 or batch == 0:
        return out
    if max_q_len is None:
        max_q_len = int((cu_q_lens[1:] - cu_q_lens[:-1]).max())
    if not isinstance(max_q_len, int) or max_q_len < 0:
        raise ValueError(f"{op}: max_q_len must be an int >= 0, got {max_q_len!r}")
    if max_q_len == 0:
        return out

    cfg = prefill_launch_config(head_dim, group, page_size, max_q_len, q.dtype)
    tokens_per_block = cfg["BLOCK_M"] // group
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    grid = (batch, triton.cdiv(max_q_len, tokens_per_block), n_kv_heads)
    _prefill_kernel[grid](
        q, k_pages, v_pages, block_tables, seq_lens, cu_q_lens, out,
        float(scale), float(softcap), window, group, head_dim, page_size, tokens_per_block,
        *q.stride(), *k_pages.stride(), *v_pages.stride(), *block_tables.stride(), *out.stride(),
        USE_SOFTCAP=softcap > 0, USE_WINDOW=window > 0, DOT_PRECISION=precision, UPCAST_DOT=interpreter_needs_upcast(q),
        **cfg,
    )
    return out
