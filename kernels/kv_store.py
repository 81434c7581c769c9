"""Write new K/V rows into the paged KV cache.

Page layout (project-wide): per layer, `k_pages` and `v_pages` are [num_pages, page_size, n_kv_heads,
head_dim]. The token with flat slot `s` lives at page `s // page_size`, offset `s % page_size`; the
caller computes slots from its block tables (`slot = block_tables[b, pos // page_size] * page_size +
pos % page_size`). A negative slot means "do not write this row": padding rows of a batch, or
tokens whose KV is already in the cache and must not be rewritten.

`store_kv` runs the Triton kernel on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1, which
is how the tests exercise it) and the plain-torch `store_kv_ref` otherwise.
"""
import os

import torch

from nudgefast.kernels import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl


def _check_store_inputs(k, v, k_pages, v_pages, slot_mapping):
    for name, t in (("k", k), ("v", v), ("k_pages", k_pages), ("v_pages", v_pages),
                    ("slot_mapping", slot_mapping)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"store_kv: {name} must be a torch.Tensor, got {type(t).__name__}")
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"store_kv: k and v must both be [T, n_kv_heads, head_dim], got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if k_pages.dim() != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(f"store_kv: k_pages and v_pages must both be [num_pages, page_size, "
                         f"n_kv_heads, head_dim], got {tuple(k_pages.shape)} and {tuple(v_pages.shape)}")
    if k.shape[1:] != k_pages.shape[2:]:
        raise ValueError(f"store_kv: k rows {tuple(k.shape[1:])} do not match the pages' "
                         f"(n_kv_heads, head_dim) {tuple(k_pages.shape[2:])}")
    if not (k.dtype == v.dtype == k_pages.dtype == v_pages.dtype):
        raise TypeError(f"store_kv: k, v, k_pages, v_pages must share one dtype, got {k.dtype}, "
                        f"{v.dtype}, {k_pages.dtype}, {v_pages.dtype}")
    if slot_mapping.dtype != torch.int64 or slot_mapping.shape != (k.shape[0],):
        raise TypeError(f"store_kv: slot_mapping must be int64 of shape [T]=({k.shape[0]},), got "
                        f"{slot_mapping.dtype} of shape {tuple(slot_mapping.shape)}")
    devices = {t.device for t in (k, v, k_pages, v_pages, slot_mapping)}
    if len(devices) != 1:
        raise ValueError(f"store_kv: all tensors must be on one device, got {sorted(map(str, devices))}")


def store_kv_ref(k, v, k_pages, v_pages, slot_mapping):
    """Plain-torch `store_kv`: one vectorised index_copy_ per cache, no loop over tokens.

    Slots must be < num_pages * page_size (not checked here: checking costs a host sync per layer).
    """
    _check_store_inputs(k, v, k_pages, v_pages, slot_mapping)
    num_pages, page_size, n_kv_heads, head_dim = k_pages.shape
    keep = slot_mapping >= 0
    # On the CPU a host check is cheap, and it lets the common case (no skipped rows) avoid the
    # boolean-mask gathers of k and v.
    if not bool(keep.all()):
        slot_mapping, k, v = slot_mapping[keep], k[keep], v[keep]
    for rows, pages in ((k, k_pages), (v, v_pages)):
        if pages.is_contiguous():
            pages.view(num_pages * page_size, n_kv_heads, head_dim).index_copy_(0, slot_mapping, rows)
        else:  # a strided pool cannot be flattened into a view; index page and offset instead
            pages.index_put_((slot_mapping // page_size, slot_mapping % page_size), rows)


if HAS_TRITON:

    @triton.jit
    def _store_kv_kernel(
        k_ptr, v_ptr, k_pages_ptr, v_pages_ptr, slot_ptr,
        n_kv_heads, head_dim, page_size,
        stride_kt, stride_kh, stride_kd,
        stride_vt, stride_vh, stride_vd,
        stride_kpp, stride_kps, stride_kph, stride_kpd,
        stride_vpp, stride_vps, stride_vph, stride_vpd,
        BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # One program copies BLOCK_H heads of one token's K and V row.
        token = tl.program_id(0).to(tl.int64)
        head_block = tl.program_id(1)
        slot = tl.load(slot_ptr + token)
        if slot >= 0:
            page = slot // page_size
            offset = slot % page_size
            heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
            dims = tl.arange(0, BLOCK_D)
            mask = (heads < n_kv_heads)[:, None] & (dims < head_dim)[None, :]

            k_src = k_ptr + token * stride_kt + heads[:, None] * stride_kh + dims[None, :] * stride_kd
            k_dst = (k_pages_ptr + page * stride_kpp + offset * stride_kps
                     + heads[:, None] * stride_kph + dims[None, :] * stride_kpd)
            tl.store(k_dst, tl.load(k_src, mask=mask), mask=mask)

            v_src = v_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :] * stride_vd
            v_dst = (v_pages_ptr + page * stride_vpp + offset * stride_vps
                     + heads[:, None] * stride_vph + dims[None, :] * stride_vpd)
            tl.store(v_dst, tl.load(v_src, mask=mask), mask=mask)


def _use_triton(t):
    return HAS_TRITON and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def store_kv(k, v, k_pages, v_pages, slot_mapping):
    """Write k[t], v[t] into slot slot_mapping[t] of k_pages, v_pages (in place); skip slots < 0.

    k, v: [T, n_kv_heads, head_dim] (any strides, e.g. views of a fused qkv projection);
    k_pages, v_pages: [num_pages, page_size, n_kv_heads, head_dim]; slot_mapping: int64 [T].
    Slots must be < num_pages * page_size (unchecked: a check would cost a host sync).
    """
    if not _use_triton(k_pages):
        return store_kv_ref(k, v, k_pages, v_pages, slot_mapping)
    _check_store_inputs(k, v, k_pages, v_pages, slot_mapping)
    n_tokens, n_kv_heads, head_dim = k.shape
    if n_tokens == 0:
        return None
    block_d = triton.next_power_of_2(head_dim)
    # About 2K elements per program: one program per token for typical GQA models (8 x 128),
    # a few per token for wide MHA models (32 x 128), so small decode batches still spread out.
    block_h = max(1, min(triton.next_power_of_2(n_kv_heads), 2048 // block_d))
    grid = (n_tokens, triton.cdiv(n_kv_heads, block_h))
    _store_kv_kernel[grid](
        k, v, k_pages, v_pages, slot_mapping,
        n_kv_heads, head_dim, k_pages.shape[1],
        *k.stride(), *v.stride(), *k_pages.stride(), *v_pages.stride(),
        BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4,
    )
    return None


# ----------------------------------------------------------------------------------------------
# RoPE fused into the store: one launch per layer instead of ~10 elementwise torch ops
# ----------------------------------------------------------------------------------------------
#
# Rotary embedding, "rotate half" (GPT-NeoX / Hugging Face) form, on the last dim of size D = 2 * H:
#   out = x * cos + cat(-x[H:], x[:H]) * sin,   cos/sin = cat(c, c)/cat(s, s), c, s = table[position]
# The model computes it in its own dtype, each product and the sum rounded to that dtype (the
# torch/Hugging Face order); the kernel rounds at the same three places, so it is bit-exact with the
# torch ops in bf16/fp16, and in fp32 as long as the compiler does not contract a * b + c into one
# fused multiply-add: the launcher compiles it with enable_fp_fusion=False for that reason.


def rope_cache(inv_freq: torch.Tensor, max_positions: int, dtype: torch.dtype, device) -> tuple:
    """(cos, sin), each [max_positions, D/2] in `dtype`: the model's per-step tables for every
    position at once (built once; the same elementwise ops as Transformer._rope_tables, so the
    same values on one device)."""
    pos = torch.arange(max_positions, device=device).float()[:, None]
    freqs = pos * inv_freq.to(device)[None, :]
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def _rotate_ref(x, cos_half, sin_half, positions):
    cos = torch.cat([cos_half, cos_half], dim=-1)[positions][:, None, :]
    sin = torch.cat([sin_half, sin_half], dim=-1)[positions][:, None, :]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _check_rope_inputs(q, k, positions, cos_half, sin_half):
    if q.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.dtype != k.dtype:
        raise ValueError(f"store_kv_rope: q must be [T, n_q_heads, head_dim] like k {tuple(k.shape)} "
                         f"({k.dtype}), got {tuple(q.shape)} ({q.dtype})")
    head_dim = q.shape[2]
    if head_dim % 2:
        raise ValueError(f"store_kv_rope: head_dim must be even for rotary embeddings, got {head_dim}")
    if positions.dtype not in (torch.int32, torch.int64) or positions.shape != (q.shape[0],):
        raise TypeError(f"store_kv_rope: positions must be int64 [T]=({q.shape[0]},), got {positions.dtype} "
                        f"{tuple(positions.shape)}")
    if (cos_half.shape != sin_half.shape or cos_half.dim() != 2 or cos_half.shape[1] != head_dim // 2
            or cos_half.dtype != q.dtype or sin_half.dtype != q.dtype):
        raise ValueError(f"store_kv_rope: cos/sin tables must be [max_positions, {head_dim // 2}] in {q.dtype}, got "
                         f"{tuple(cos_half.shape)} {cos_half.dtype} / {tuple(sin_half.shape)} {sin_half.dtype}")
    if cos_half.stride(1) != 1 or sin_half.stride(1) != 1 or cos_half.stride(0) != sin_half.stride(0):
        raise ValueError("store_kv_rope: cos/sin tables must have unit stride along head_dim and one row stride")
    if len({t.device for t in (q, positions, cos_half, sin_half)}) != 1:
        raise ValueError("store_kv_rope: q, positions and the tables must be on one device")


def store_kv_rope_ref(q, k, v, k_pages, v_pages, slot_mapping, positions, cos_half, sin_half):
    """Plain torch: rotate q in place, store rotated k and v. Positions must be < max_positions."""
    _check_rope_inputs(q, k, positions, cos_half, sin_half)
    q.copy_(_rotate_ref(q, cos_half, sin_half, positions))
    store_kv_ref(_rotate_ref(k, cos_half, sin_half, positions), v, k_pages, v_pages, slot_mapping)


if HAS_TRITON:

    @triton.jit
    def _round_f32(x, dt: tl.constexpr):
        """x (fp32) rounded to dtype dt and back, to nearest even. bf16 rounds by its bits: Triton's
        interpreter converts fp32 -> bf16 with another rounding than the GPU (and torch), and an
        fp32 value on the bf16 grid converts exactly everywhere (NaN/inf never reach RoPE here)."""
        if dt == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True)
        return x.to(dt).to(tl.float32)

    @triton.jit
    def _rope_rows(x_ptr, stride_h, n_heads, c, s, h, j, HALF: tl.constexpr, EVEN: tl.constexpr):
        """The rotated halves of heads h of one token (x_ptr: its row), rounded like the torch ops."""
        mask = h[:, None] < n_heads
        if not EVEN:
            mask = mask & (j[None, :] < HALF)
        lo_ptr = x_ptr + h[:, None] * stride_h + j[None, :]
        x1 = tl.load(lo_ptr, mask=mask, other=0.0)
        x2 = tl.load(lo_ptr + HALF, mask=mask, other=0.0)
        dt: tl.constexpr = x1.dtype
        x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
        out1 = _round_f32(_round_f32(x1f * c, dt) + _round_f32(-x2f * s, dt), dt).to(dt)
        out2 = _round_f32(_round_f32(x2f * c, dt) + _round_f32(x1f * s, dt), dt).to(dt)
        return out1, out2, mask

    @triton.jit
    def _store_kv_rope_kernel(
        q_ptr, k_ptr, v_ptr, k_pages_ptr, v_pages_ptr, slot_ptr, pos_ptr, cos_ptr, sin_ptr,
        n_q_heads, n_kv_heads, page_size, stride_cos, max_positions,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
        stride_kpp, stride_kps, stride_kph, stride_vpp, stride_vps, stride_vph,
        HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        # One program per token: q rotated in place, k rotated and v copied into the token's slot.
        # (The last dim is contiguous everywhere: checked by the launcher.)
        token = tl.program_id(0).to(tl.int64)
        # clamped: a position past the tables reads the last row instead of memory outside them
        pos = tl.minimum(tl.load(pos_ptr + token).to(tl.int64), max_positions - 1)
        j = tl.arange(0, BLOCK_HALF)
        EVEN: tl.constexpr = BLOCK_HALF == HALF
        jm = j < HALF
        c = tl.load(cos_ptr + pos * stride_cos + j, mask=jm, other=0.0).to(tl.float32)[None, :]
        s = tl.load(sin_ptr + pos * stride_cos + j, mask=jm, other=0.0).to(tl.float32)[None, :]

        h = tl.arange(0, BLOCK_H)
        q_row = q_ptr + token * stride_qt
        for h0 in range(0, n_q_heads, BLOCK_H):  # head blocks: a bounded tile, whatever the head count
            q1, q2, qm = _rope_rows(q_row, stride_qh, n_q_heads, c, s, h0 + h, j, HALF, EVEN)
            q_lo = q_row + (h0 + h)[:, None] * stride_qh + j[None, :]
            tl.store(q_lo, q1, mask=qm)
            tl.store(q_lo + HALF, q2, mask=qm)

        slot = tl.load(slot_ptr + token)
        if slot >= 0:
            page = slot // page_size
            offset = slot % page_size
            for h0 in range(0, n_kv_heads, BLOCK_H):
                hk = h0 + h
                k1, k2, km = _rope_rows(k_ptr + token * stride_kt, stride_kh, n_kv_heads, c, s, hk, j, HALF, EVEN)
                k_dst = k_pages_ptr + page * stride_kpp + offset * stride_kps + hk[:, None] * stride_kph + j[None, :]
                tl.store(k_dst, k1, mask=km)
                tl.store(k_dst + HALF, k2, mask=km)
                v_src = v_ptr + token * stride_vt + hk[:, None] * stride_vh + j[None, :]
                v_dst = v_pages_ptr + page * stride_vpp + offset * stride_vps + hk[:, None] * stride_vph + j[None, :]
                tl.store(v_dst, tl.load(v_src, mask=km), mask=km)
                tl.store(v_dst + HALF, tl.load(v_src + HALF, mask=km), mask=km)


def store_kv_rope(q, k, v, k_pages, v_pages, slot_mapping, positions, cos_half, sin_half):
    """RoPE and the KV store in one launch: q [T, Hq, D] is rotated IN PLACE, k [T, Hkv, D] rotated and
    v copied into slot slot_mapping[t] of the pages (skipped when < 0); positions int64 [T] index
    the tables cos_half/sin_half [max_positions, D/2] (rope_cache), which must cover them (unchecked:
    a check would cost a host sync; the kernel clamps to the last row, so it never reads outside). Triton on CUDA (or under TRITON_INTERPRET=1);
    the reference otherwise.
    """
    if not _use_triton(k_pages):
        return store_kv_rope_ref(q, k, v, k_pages, v_pages, slot_mapping, positions, cos_half, sin_half)
    _check_store_inputs(k, v, k_pages, v_pages, slot_mapping)
    _check_rope_inputs(q, k, positions, cos_half, sin_half)
    if any(t.stride(-1) != 1 for t in (q, k, v, k_pages, v_pages)):
        raise ValueError("store_kv_rope: q, k, v and the pages must have unit stride along head_dim")
    n_tokens, n_q_heads, head_dim = q.shape
    if n_tokens == 0:
        return None
    n_kv_heads = k.shape[1]
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    _store_kv_rope_kernel[(n_tokens,)](
        q, k, v, k_pages, v_pages, slot_mapping, positions, cos_half, sin_half,
        n_q_heads, n_kv_heads, k_pages.shape[1], cos_half.stride(0), cos_half.shape[0],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_pages.stride(0), k_pages.stride(1), k_pages.stride(2), v_pages.stride(0), v_pages.stride(1),
        v_pages.stride(2),
        # ~1K (head, pair) elements per head block: 8 per thread at 4 warps, no spills at any width
        HALF=half, BLOCK_HALF=block_half, BLOCK_H=max(1, min(triton.next_power_of_2(n_q_heads), 1024 // block_half)),
        num_warps=4, enable_fp_fusion=False,
    )
    return None
