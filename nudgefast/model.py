"""ONE decoder-only transformer for every supported family, parametrised by ModelSpec.

Llama (Llama-2/3, SmolLM2, Mistral), Qwen2, OLMo, OLMo-2, Gemma-2 and Gemma-3 differ only in flags:
where the norms sit and what kind they are, q/k norms, biases, qkv clipping, the activation,
embedding scale, soft-capping, per-layer sliding windows and rope bases. q/k/v and gate/up are
fused into single matmuls at load time.

Tokens are flattened over the batch ([T] ids, [T] positions); attention reads and writes the paged
KV pool through an explicit AttentionMetadata.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .blocks import BlockWeight, read_block_weights
from .config import ConfigError, ModelSpec, load_spec
from .kv_cache import AttentionMetadata, KVPool
from .loader import fused_state_dict, read_tensors
from .ops import Backend


def default_dtype(spec: ModelSpec, device: torch.device) -> torch.dtype:
    """The compute dtype when none is asked for: the checkpoint's, except that a float32 checkpoint
    (what converting a GGUF file or an fp32 export gives) runs in bfloat16 on CUDA. The GPU path is
    built for 16-bit weights (half the bytes per decode step, tensor-core attention), and every
    supported family was trained in bf16; on the CPU float32 stays (the C++ ops are float32)."""
    if torch.device(device).type == "cuda" and spec.dtype == torch.float32:
        return torch.bfloat16
    return spec.dtype


class Transformer:
    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor], device: torch.device,
                 dtype: torch.dtype, backend: Backend):
        self.spec, self.device, self.dtype, self.backend = spec, device, dtype, backend
        # Tensor parallelism (nudgefast/parallel/tensor.py): None on one device; else the shard's
        # collectives (vocab-parallel embedding, the all-reduce after each row-parallel linear, the
        # gather of the vocab-parallel logits). spec and weights are then this rank's shard.
        self.tp = None
        w = {k: v.to(device) for k, v in weights.items()}
        if spec.tie_word_embeddings:
            w["lm_head"] = w["embed"]
        self.embed = w["embed"]
        self.lm_head = w["lm_head"]
        self.embed_scale = (torch.tensor(spec.embed_scale, dtype=dtype).item()
                            if spec.embed_scale is not None else None)
        self.final_norm = self._norm_weight(w.get("final_norm"))
        self.layers = []
        for i in range(spec.num_layers):
            p = f"layers.{i}."
            self.layers.append({
                "qkv": w[p + "qkv"], "qkv_bias": w.get(p + "qkv_bias"),
                "o": w[p + "o"], "o_bias": w.get(p + "o_bias"),
                "gate_up": w[p + "gate_up"], "gate_up_bias": w.get(p + "gate_up_bias"),
                "down": w[p + "down"], "down_bias": w.get(p + "down_bias"),
                "q_norm": self._norm_weight(w.get(p + "q_norm")),
                "k_norm": self._norm_weight(w.get(p + "k_norm")),
                "attn_pre_norm": self._norm_weight(w.get(p + "attn_pre_norm")),
                "attn_post_norm": self._norm_weight(w.get(p + "attn_post_norm")),
                "mlp_pre_norm": self._norm_weight(w.get(p + "mlp_pre_norm")),
                "mlp_post_norm": self._norm_weight(w.get(p + "mlp_post_norm")),
                "window": spec.layer_windows[i],
                "rope": spec.layer_rope[i],
            })
        self.inv_freqs = [r.inv_freq(spec.head_dim).to(device) for r in spec.ropes]
        # Residual add + RMSNorms in one launch (kernels/norm.py) and the MLP's act(gate) * up in one
        # (kernels/activation.py): the GPU path (the Triton backend).
        self.fused_norm = backend.fused_rope and spec.norm_kind in ("rms", "rms_gemma")
        self.fused_act = backend.fused_rope
        if self.fused_norm:
            from .kernels.norm import add_rms_norm
            self._add_rms_norm = add_rms_norm
        if self.fused_act:
            from .kernels.activation import act_mul
            self._act_mul = act_mul
        self.rope_caches = None
        if backend.fused_rope or (backend.rope_in_store and dtype == torch.float32):
            # With RoPE inside the KV store (GPU; CPU native ops in float32), the cos/sin tables of every
            # position are built once here instead of per step; the values are the per-step tables'
            # (same elementwise ops), and the rotation's products and sums are the torch ops' too.
            from .kernels.kv_store import rope_cache
            # + 64: speculative drafts may run a few positions past the last emitted one
            self.rope_caches = [rope_cache(inv, spec.max_position_embeddings + 64, dtype, device)
                                for inv in self.inv_freqs]

    @classmethod
    def from_dir(cls, model_dir: str | Path, device: torch.device, dtype: torch.dtype | None,
                 backend: Backend, weights: str = "dense") -> "Transformer":
        """weights: "dense" reads model.safetensors; "gguf" (CPU, float32) keeps every quantized
        linear weight in the blocks of the GGUF file the directory was converted from (blocks.py);
        "gguf-q8" as well, multiplied with activations quantized to int8 per block (block_linear_q8:
        faster, not exact)."""
        spec = load_spec(model_dir)
        dtype = dtype or default_dtype(spec, device)
        if weights == "dense":
            raw = read_tensors(Path(model_dir))
        elif weights in ("gguf", "gguf-q8"):
            if device.type != "cpu" or dtype != torch.float32:
                raise ConfigError(f"weights={weights!r} computes on the CPU in float32; got device={device}, "
                                  f"dtype={dtype} (use weights='dense' there)")
            blocks = read_block_weights(Path(model_dir))
            if weights == "gguf-q8":  # x quantized to int8 per block in decode (inexact, opt-in)
                for w in blocks.values():
                    w.act8 = True
            raw = read_tensors(Path(model_dir), skip=frozenset(blocks))
            raw.update(blocks)
        else:
            raise ValueError(f"weights={weights!r}; expected 'dense', 'gguf' or 'gguf-q8'")
        return cls(spec, fused_state_dict(spec, raw, dtype), device, dtype, backend)

    def _linear(self, x: torch.Tensor, w, bias: torch.Tensor | None) -> torch.Tensor:
        if type(w) is BlockWeight:
            return self.backend.block_linear(x, w, bias)
        return F.linear(x, w, bias)

    def _norm_weight(self, w: torch.Tensor | None) -> torch.Tensor | None:
        # Gemma's RMSNorm scales by (1 + w), computed in float32: fold the 1 in once, here.
        if w is None:
            return None
        if self.spec.norm_kind == "rms_gemma":
            return (1.0 + w.float()).to(self.device)
        return w

    def _norm(self, x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        kind = self.spec.norm_kind
        if kind == "layernorm_np":
            return F.layer_norm(x.float(), (x.shape[-1],), None, None, 1e-5).to(x.dtype)
        if kind == "rms_gemma":
            return self.backend.rms_norm(x.float(), w, self.spec.norm_eps).to(x.dtype)
        return self.backend.rms_norm(x, w, self.spec.norm_eps)

    def _rope_tables(self, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        tables = []
        pos = positions.float()[:, None]
        for inv in self.inv_freqs:
            freqs = pos * inv[None, :]
            emb = torch.cat([freqs, freqs], dim=-1)
            tables.append((emb.cos().to(self.dtype)[:, None, :], emb.sin().to(self.dtype)[:, None, :]))
        return tables

    def _residual(self, h: torch.Tensor, a: torch.Tensor, w_a: torch.Tensor | None, norm_out: bool,
                  w_out: torch.Tensor | None):
        """h + (post-norm of a, when the family has post-norms), and the next block's input: the
        pre-norm (weight w_out) of the sum when norm_out, else the sum itself. One launch on the
        GPU (kernels/norm.py); the per-op path elsewhere, and for OLMo's weightless layer norm."""
        post = self.spec.post_norms
        if self.fused_norm:
            return self._add_rms_norm(h, a, w_a if post else None, w_out if norm_out else None, self.spec.norm_eps)
        if post:
            a = self._norm(a, w_a)
        h = h + a
        return h, (self._norm(h, w_out) if norm_out else h)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv: KVPool,
                logits_indices: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions: [T]. Returns logits [N, vocab] for the rows in logits_indices
        (all T rows when None), in the model dtype."""
        spec = self.spec
        T = input_ids.shape[0]
        H, Hkv, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
        if self.tp is not None:
            h = self.tp.embed(input_ids, self.embed)
        else:
            h = self.embed.rows(input_ids) if type(self.embed) is BlockWeight else F.embedding(input_ids, self.embed)
        if self.embed_scale is not None:
            h = h * self.embed_scale
        ropes = self._rope_tables(positions) if self.rope_caches is None else None
        pre = spec.pre_norms
        x = self._norm(h, self.layers[0]["attn_pre_norm"]) if pre and self.layers else h
        for i, L in enumerate(self.layers):
            # --- attention block (x: this block's input, normed by the previous residual step)
            qkv = self._linear(x, L["qkv"], L["qkv_bias"])
            if spec.clip_qkv is not None:
                qkv = qkv.clamp(-spec.clip_qkv, spec.clip_qkv)
            q, k, v = qkv.split([spec.q_size, spec.kv_size, spec.kv_size], dim=-1)
            if spec.qk_norm == "full" and self.tp is not None:  # the norm's mean spans every rank's columns
                q, k = self.tp.full_qk_norm(q, k, L["q_norm"], L["k_norm"], spec.norm_eps)
            elif spec.qk_norm == "full":
                q, k = self._norm(q, L["q_norm"]), self._norm(k, L["k_norm"])
            q, k, v = q.reshape(T, H, D), k.reshape(T, Hkv, D), v.reshape(T, Hkv, D)
            if spec.qk_norm == "head":
                q, k = self._norm(q, L["q_norm"]), self._norm(k, L["k_norm"])
            if ropes is None:  # one launch: q rotated in place, rotated k and v into the cache
                self.backend.store_kv_rope(q, k, v, kv.k[i], kv.v[i], meta.slot_mapping, positions,
                                           *self.rope_caches[L["rope"]])
            else:
                cos, sin = ropes[L["rope"]]
                q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
                self.backend.store_kv(k, v, kv.k[i], kv.v[i], meta.slot_mapping)
            a = self.backend.attention(q, kv.k[i], kv.v[i], meta, spec.attn_scale, L["window"], spec.attn_softcap)
            a = self._linear(a.reshape(T, H * D), L["o"], L["o_bias"])
            if self.tp is not None:
                a = self.tp.all_reduce(a)
            h, x = self._residual(h, a, L["attn_post_norm"], pre, L["mlp_pre_norm"])
            # --- MLP block
            gate_up = self._linear(x, L["gate_up"], L["gate_up_bias"])
            if self.fused_act:  # GPU path: act(gate) * up in one launch (kernels/activation.py)
                hidden = self._act_mul(gate_up, spec.activation)
            else:
                gate, up = gate_up.chunk(2, dim=-1)
                act = F.silu(gate) if spec.activation == "silu" else F.gelu(gate, approximate="tanh")
                hidden = act * up
            m = self._linear(hidden, L["down"], L["down_bias"])
            if self.tp is not None:
                m = self.tp.all_reduce(m)
            last = i + 1 == len(self.layers)
            h, x = self._residual(h, m, L["mlp_post_norm"], pre and not last,
                                  None if last else self.layers[i + 1]["attn_pre_norm"])
        if logits_indices is not None:
            h = h[logits_indices]
        h = self._norm(h, self.final_norm)
        logits = self._linear(h, self.lm_head, None)
        if spec.final_softcap:
            logits = torch.tanh(logits / spec.final_softcap) * spec.final_softcap
        if self.tp is not None:  # the gathered logits, or the gate's numbers of the shards (parallel/tensor.py)
            logits = self.tp.output(logits)
        return logits
