"""Linear weights kept in a GGUF file's quantized blocks instead of dequantized float32.

On the CPU, decode is bound by the bytes of weights read per token. A model converted from GGUF
holds exactly the values its blocks encode, so the engine can read the blocks (4.5-8.5 bits per
weight) and multiply by the same values (`weights="gguf"` in NudgingEngine): ~5x fewer bytes for
SmolLM2's Q4_1 file than the float32 copy transformers loads.

A BlockWeight holds W [N, K] as integer codes with one float32 scale and offset per block of B
columns:  W[n, k] = scale[n, k // B] * code[n, k] + offset[n, k // B]  (multiply, then add). Layouts:
  bits=4: codes 0..15, two per byte, uint8 [N, K / 2], B = 32. In block b, byte j holds column
          32b + j in its low nibble and column 32b + 16 + j in its high nibble (Q4_0's order).
  bits=8: int8 codes [N, K], B = 32 or 16.
Every supported GGML type maps onto one of them exactly (d, m: the block's float16 scale/min;
sc, mn: a K-quant's 6-bit sub-block scale/min):
  Q4_0: bits 4, scale d, offset -8d        Q4_1: bits 4, scale d, offset m
  Q4_K: bits 4, scale d*sc, offset -dmin*mn (per 32 columns)
  Q5_0: bits 8, code q-16, scale d          Q5_1: bits 8, scale d, offset m
  Q5_K: bits 8, scale d*sc, offset -dmin*mn Q8_0: bits 8, scale d
  Q6_K: bits 8, B = 16, code q-32, scale d*sc
`dequantize()` reproduces the `gguf` package's dequantized values bit for bit (the same float32
products and sums), which tests/test_blocks.py checks against the converted model.safetensors.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError


def _int_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return codes.to(torch.int16)
    n = codes.shape[0]
    packed = codes.view(n, -1, 16).to(torch.int16)
    return torch.stack([packed & 0x0F, packed >> 4], dim=2).reshape(n, -1)


def _dequantize(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    n, nb = scale.shape
    w = _int_codes(codes, bits).float().view(n, nb, block)
    return (w * scale[:, :, None] + offset[:, :, None]).view(n, nb * block)


def _exact_in_half(t: torch.Tensor) -> bool:
    """Every value of float32 t survives a round trip through float16 (finite, same bits)."""
    h = t.half()
    return bool(torch.isfinite(h).all()) and bool(torch.equal(h.float(), t))


@dataclass
class BlockWeight:
    codes: torch.Tensor  # uint8 [N, K/2] (bits 4) or int8 [N, K] (bits 8)
    scale: torch.Tensor  # float32 [N, K/block]
    offset: torch.Tensor  # float32 [N, K/block]
    bits: int
    block: int
    # multiply with x quantized to int8 per block (weights="gguf-q8", block_linear_q8): inexact
    act8: bool = False

    def __post_init__(self):
        n, nb = self.scale.shape
        k = nb * self.block
        want = (n, k // 2) if self.bits == 4 else (n, k)
        if (self.bits, self.block) not in ((4, 32), (8, 32), (8, 16)):
            raise ValueError(f"unsupported block layout bits={self.bits} block={self.block}")
        if tuple(self.codes.shape) != want or self.offset.shape != self.scale.shape:
            raise ValueError(f"block weight parts disagree: codes {tuple(self.codes.shape)}, scale "
                             f"{tuple(self.scale.shape)}, offset {tuple(self.offset.shape)}")
        # What the native op reads, the same values in fewer bytes per token: float16 scales and
        # offsets where every one of them is a float16 exactly (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 hold
        # GGML's own float16 d and m; K-quants' d * sc products usually are not); no offsets ([N, 0])
        # where every offset is zero (Q8_0, Q5_0, Q6_K). A 4-bit block is then 20 bytes, as in the file.
        offset = self.offset if bool(self.offset.ne(0).any()) else self.offset.new_empty(n, 0)
        self.kernel_scale, self.kernel_offset = self.scale, offset
        if self.scale.dtype == torch.float32 and _exact_in_half(self.scale) and _exact_in_half(offset):
            self.kernel_scale, self.kernel_offset = self.scale.half(), offset.half()

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.scale.shape[0], self.scale.shape[1] * self.block))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.offset))

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def to(self, target) -> "BlockWeight":
        """Block weights live on the CPU and compute in float32: moving them anywhere else is an error,
        float32/CPU targets are no-ops (so the loader treats them like tensors)."""
        if target in (torch.float32, "cpu") or (isinstance(target, torch.device) and target.type == "cpu"):
            return self
        raise ValueError(f"GGUF block weights run on the CPU in float32 only (asked for {target})")

    def int_codes(self) -> torch.Tensor:
        """The codes as int16 [N, K] (4-bit codes unpacked)."""
        return _int_codes(self.codes, self.bits)

    def dequantize(self) -> torch.Tensor:
        """W as float32 [N, K]: scale * code, then + offset (two roundings, as gguf computes it)."""
        return _dequantize(self.codes, self.scale, self.offset, self.bits, self.block)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized rows W[ids] (the embedding lookup of a tied, quantized embedding, every forward:
        no BlockWeight is built for them, so none of its load-time checks runs)."""
        return _dequantize(self.codes[ids], self.scale[ids], self.offset[ids], self.bits, self.block)

    def widened(self, bits: int, block: int) -> "BlockWeight":
        """The same values in a wider layout (4 -> 8 bits, block 32 -> 16): exact."""
        w = self
        if bits == 8 and w.bits == 4:
            w = BlockWeight(w.int_codes().to(torch.int8), w.scale, w.offset, 8, w.block, w.act8)
        if block == 16 and w.block == 32:
            w = BlockWeight(w.codes, w.scale.repeat_interleave(2, dim=1), w.offset.repeat_interleave(2, dim=1),
                            w.bits, 16, w.act8)
        if (w.bits, w.block) != (bits, block):
            raise ValueError(f"cannot widen bits={self.bits} block={self.block} to bits={bits} block={block}")
        return w


def concat_rows(parts: list) -> BlockWeight | torch.Tensor:
    """Stack weights along N (the fused qkv and gate_up projections). Block weights of different
    layouts are widened to a common one; a dense part makes the result dense."""
    if not all(isinstance(p, BlockWeight) for p in parts):
        return torch.cat([p.dequantize() if isinstance(p, BlockWeight) else p for p in parts])
    bits, block = max(p.bits for p in parts), min(p.block for p in parts)
    parts = [p.widened(bits, block) for p in parts]
    return BlockWeight(torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]),
                       torch.cat([p.offset for p in parts]), bits, block, any(p.act8 for p in parts))


def permute_rows(w: BlockWeight, permute) -> BlockWeight:
    """Apply a row permutation (a function of a [N, ...] tensor) to every part of a block weight."""
    return BlockWeight(permute(w.codes), permute(w.scale), permute(w.offset), w.bits, w.block, w.act8)


def block_linear_ref(x: torch.Tensor, w: BlockWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The reference of the native block_linear op: x [M, K] float32 @ W.T -> [M, N]."""
    return torch.nn.functional.linear(x, w.dequantize(), bias)


# Rows of x up to which block_linear_q8 quantizes x (decode, verification); more rows (prefill) are
# multiplied exactly. The same constant as kDirectRows in csrc/block_linear.cpp.
Q8_MAX_ROWS = 16


def quantize_activations_ref(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x float32 [M, K] -> (xq int8 [M, K], dx float32 [M, K / block]) with x ~= dx * xq per block:
    dx = amax / 127, xq = round-half-even(x * (127 / amax)), all zero for an all-zero block. The same
    float32 operations as the native kernel, so the same integers."""
    m, k = x.shape
    xb = x.reshape(m, k // block, block)
    amax = xb.abs().amax(dim=-1, keepdim=True)
    # torch.full_like(...) / amax, not 127.0 / amax: torch computes a scalar over a tensor as
    # reciprocal() * 127, two roundings, where the native kernel divides once (127.f / amax)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    xq = torch.round(xb * inv).clamp(-127, 127).to(torch.int8).reshape(m, k)
    return xq, (amax / 127.0).reshape(m, k // block)


def block_linear_q8_ref(x: torch.Tensor, w: BlockWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The reference of block_linear_q8 (weights="gguf-q8"), x [..., K] float32 @ W.T: with at most
    Q8_MAX_ROWS rows of x, y[m, n] = sum over blocks b of scale[n, b] * dx[m, b] * (codes[n, b] . xq[m, b])
    + offset[n, b] * dx[m, b] * sum(xq[m, b]) (integer block dots and sums): W times the dequantized
    x, dx * xq, so the error is W . (dx xq - x); more rows (prefill) are multiplied exactly, as
    block_linear_ref."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.shape[0] > Q8_MAX_ROWS:
        return block_linear_ref(x, w, bias)
    n, nb = w.scale.shape
    xq, dx = quantize_activations_ref(x2, w.block)
    codes = w.int_codes().to(torch.int64).view(n, nb, w.block)
    dots = torch.einsum("nbj,mbj->mnb", codes, xq.to(torch.int64).view(-1, nb, w.block))  # exact integers
    y = (dots.double() * (w.scale[None].double() * dx[:, None].double())).sum(-1)
    y = y + (dx.double() * xq.double().view(-1, nb, w.block).sum(-1)) @ w.offset.double().T
    y = y.float().view(*lead, n)
    return y if bias is None else y + bias


def q8_error_bound(x: torch.Tensor, w: BlockWeight) -> torch.Tensor:
    """[M, N] bound of |block_linear_q8 - block_linear| from quantizing x (at most Q8_MAX_ROWS rows):
    each x is off by at most dx / 2, so sum over k of |W[n, k]| * dx[m, block of k] / 2."""
    _, dx = quantize_activations_ref(x, w.block)
    return (dx.repeat_interleave(w.block, dim=1) / 2) @ w.dequantize().abs().T


def kernel_info() -> dict:
    """The block_linear kernels of the native ops: {"exact": chosen, "q8": chosen, "available": [...]},
    or None without the native ops."""
    try:
        from . import _C  # noqa: F401
        names = torch.ops.nudgefast.block_kernels()
    except (ImportError, AttributeError, RuntimeError):
        return None
    return {"exact": names[0].split(":", 1)[1], "q8": names[1].split(":", 1)[1], "available": list(names[2:])}


# ----------------------------------------------------------------------------- GGML blocks -> BlockWeight

def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _low_high(qs: np.ndarray, group: int) -> np.ndarray:
    """Nibbles of bytes [n, g * group] -> codes [n, g, 2, group]: low nibbles then high nibbles."""
    n = qs.shape[0]
    qs = qs.reshape(n, -1, 1, group)
    return (qs >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & np.uint8(0x0F)


def _high_bits(qh: np.ndarray, count: int) -> np.ndarray:
    """Bit i of a little-endian uint32 per block -> [n, count] uint8."""
    qh = np.ascontiguousarray(qh).view(np.uint32).reshape(-1, 1)
    return ((qh >> np.arange(count, dtype=np.uint32).reshape(1, count)) & np.uint32(1)).astype(np.uint8)


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 6-bit sub-block scales and mins of Q4_K / Q5_K (12 bytes -> 8 + 8 values)."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _decode(type_name: str, blocks: np.ndarray):
    """GGML blocks [n_blocks, type_size] -> (codes [n_blocks, elements], scale, offset [n_blocks, subs],
    bits, block) in the BlockWeight conventions above."""
    n = blocks.shape[0]
    zeros = lambda shape: np.zeros(shape, np.float32)  # noqa: E731
    if type_name == "Q8_0":
        d = _f16(blocks[:, :2])
        return blocks[:, 2:].view(np.int8), d, zeros(d.shape), 8, 32
    if type_name == "Q4_0":
        d = _f16(blocks[:, :2])
        return _low_high(blocks[:, 2:], 16).reshape(n, 32), d, -8 * d, 4, 32
    if type_name == "Q4_1":
        d, m = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
        return _low_high(blocks[:, 4:], 16).reshape(n, 32), d, m, 4, 32
    if type_name in ("Q5_0", "Q5_1"):
        d = _f16(blocks[:, :2])
        head = 2 if type_name == "Q5_0" else 4
        q = _low_high(blocks[:, head + 4:], 16).reshape(n, 32) | (_high_bits(blocks[:, head:head + 4], 32) << 4)
        if type_name == "Q5_0":
            return (q.astype(np.int8) - np.int8(16)), d, zeros(d.shape), 8, 32
        return q.astype(np.int8), d, _f16(blocks[:, 2:4]), 8, 32
    if type_name in ("Q4_K", "Q5_K"):
        d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
        sc, mn = _k_scale_min(blocks[:, 4:16])
        scale, offset = d * sc, -(dmin * mn)  # gguf: (d * sc) * q - (dmin * mn)
        if type_name == "Q4_K":  # 4 groups of 64 columns: 32 low nibbles, then 32 high nibbles
            return _low_high(blocks[:, 16:], 32).reshape(n, 256), scale, offset, 4, 32
        qh = blocks[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
        q = _low_high(blocks[:, 48:], 32).reshape(n, 8, 32) | ((qh & np.uint8(1)) << 4)
        return q.reshape(n, 256).astype(np.int8), scale, offset, 8, 32
    if type_name == "Q6_K":
        ql, qh = blocks[:, :128], blocks[:, 128:192]
        sc = blocks[:, 192:208].view(np.int8).astype(np.float32)
        d = _f16(blocks[:, 208:210])
        low = _low_high(ql, 64).reshape(n, 2, 2, 64)  # 2 halves of 128 columns, each 2 x 64 nibbles
        high = (qh.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & np.uint8(3)
        q = low.reshape(n, 2, 4, 32) | (high << 4)
        return (q.reshape(n, 256).astype(np.int8) - np.int8(32)), d * sc, zeros(sc.shape), 8, 16
    return None


SUPPORTED_TYPES = ("Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0")


def from_ggml(type_name: str, raw: np.ndarray, shape: tuple[int, int]) -> BlockWeight:
    """A 2-D GGML tensor (raw bytes, torch-order shape [N, K]) as a BlockWeight."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    if type_name not in SUPPORTED_TYPES:
        raise ValueError(f"GGML type {type_name} has no block layout here (supported: {SUPPORTED_TYPES})")
    elements, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    n, k = shape
    blocks = np.ascontiguousarray(raw).reshape(-1, type_size)
    codes, scale, offset, bits, block = _decode(type_name, blocks)
    codes = codes.reshape(n, k)
    scale, offset = (np.ascontiguousarray(a, dtype=np.float32).reshape(n, k // block) for a in (scale, offset))
    if bits == 4:
        groups = codes.reshape(n, k // 32, 2, 16)
        codes = groups[:, :, 0] | (groups[:, :, 1] << 4)
        codes = torch.from_numpy(np.ascontiguousarray(codes, dtype=np.uint8).reshape(n, k // 2))
    else:
        codes = torch.from_numpy(np.ascontiguousarray(codes, dtype=np.int8))
    return BlockWeight(codes, torch.from_numpy(scale.copy()), torch.from_numpy(offset.copy()), bits, block)


def gguf_source(model_dir: Path) -> Path:
    """The GGUF file `model_dir` was converted from (its conversion marker names it), checked to be
    still there and the same size; ConfigError naming what is wrong otherwise."""
    from .gguf import CONVERSION_MARKER

    model_dir = Path(model_dir)
    try:
        marker = json.loads((model_dir / CONVERSION_MARKER).read_text())
        source = Path(marker["source"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"weights='gguf' needs a model converted from a GGUF file; {model_dir} has no "
                          f"readable {CONVERSION_MARKER} (use weights='dense')") from None
    if not source.is_file() or source.stat().st_size != marker.get("source_size"):
        raise ConfigError(f"{model_dir} was converted from {source}, which is gone or has changed; "
                          f"weights='gguf' reads its blocks (reconvert, or use weights='dense')")
    return source


def read_block_weights(model_dir: Path) -> dict[str, BlockWeight]:
    """{HF tensor name: BlockWeight} for every quantized 2-D tensor of the GGUF file `model_dir` was
    converted from (named in its conversion marker), with the converter's row un-permutation applied."""
    import mmap

    from . import gguf

    source = gguf_source(model_dir)
    header = gguf.read_gguf_header(source)
    family = gguf.FAMILIES[header.architecture]
    config = family.config(header)
    names = gguf.hf_tensor_names(header, config)
    out: dict[str, BlockWeight] = {}
    with open(source, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            file_map = np.frombuffer(mapped, dtype=np.uint8)
            for gguf_name, hf_name in names.items():
                info = header.tensors[gguf_name]
                type_name = _type_name(info.ggml_type)
                if len(info.shape) != 2 or type_name not in SUPPORTED_TYPES:
                    continue  # norms, float tensors: read dense from model.safetensors
                start = header.data_offset + info.offset
                w = from_ggml(type_name, file_map[start:start + info.nbytes], info.shape)
                heads = gguf.unpermuted_heads(family, config, gguf_name)
                if heads is not None:
                    w = permute_rows(w, lambda t: gguf._unpermute_rows(t, heads))
                out[hf_name] = w
            del file_map
        finally:
            mapped.close()
    return out


def _type_name(ggml_type: int) -> str:
    from gguf.constants import GGMLQuantizationType
    return GGMLQuantizationType(ggml_type).name
