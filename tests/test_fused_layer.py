"""The GPU path's fused layer glue: RoPE inside the KV store (store_kv_rope) with rope tables built
once, the residual add fused with the RMSNorms around it (kernels/norm.py) and the MLP's act(gate) * up
in one launch (kernels/activation.py). Held two ways on the CPU (Triton under the interpreter):

- the model with the Triton backend (fused RoPE and residual norms, Triton store and attention) gives
  the logits of the torch backend (the per-op path, reference store and attention) for a prefill and
  a decode step, for all six families; fp32, tolerance 1e-4 (the kernels sum in another order);
- counted from an op trace (scripts/layer_launches.py), a decode step launches no RoPE glue (no
  cat/neg/cos/sin) and fewer kernels per layer than the per-op path.
"""
import importlib.util
from pathlib import Path

import pytest
import torch

from nudgefast.bench.presets import SHAPES, planted_next_map, planted_weights
from nudgefast.config import spec_from_config
from nudgefast.kv_cache import AttentionMetadata, KVPool
from nudgefast.model import Transformer
from nudgefast.ops import Backend

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _config(name):
    """A bench preset, or a tiny_models family (its Hugging Face config, untied head for planting)."""
    if name in SHAPES:
        return dict(SHAPES[name])
    from tiny_models import hf_config
    return hf_config(name, 300, tie_word_embeddings=False).to_dict()


def _run(preset, kind, prompt_len=6, batch=2, page_size=4):
    spec = spec_from_config(_config(preset))
    weights = planted_weights(spec, 0, "cpu", torch.float32, planted_next_map(spec.vocab_size, 0))
    model = Transformer(spec, weights, torch.device("cpu"), torch.float32, Backend(kind))
    assert (model.rope_caches is not None) == (kind == "triton")
    pages = -(-(prompt_len + 1) // page_size)
    kv = KVPool(spec, batch * pages + 1, page_size, torch.float32, torch.device("cpu"))
    tables = (torch.arange(batch * pages, dtype=torch.int32).view(batch, pages) + 1).flip(1).contiguous()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, spec.vocab_size, (batch * prompt_len + batch,), generator=gen)
    out = []
    # prefill: prompt_len tokens per row
    pos = torch.arange(prompt_len).repeat(batch)
    rows = torch.arange(batch).repeat_interleave(prompt_len)
    slots = tables[rows, pos // page_size].long() * page_size + pos % page_size
    meta = AttentionMetadata(slot_mapping=slots, block_tables=tables,
                             seq_lens=torch.full((batch,), prompt_len, dtype=torch.int32),
                             cu_q_lens=torch.arange(0, batch * prompt_len + 1, prompt_len, dtype=torch.int32),
                             max_q_len=prompt_len)
    out.append(model.forward(ids[:batch * prompt_len], pos, meta, kv))
    # one decode step
    pos = torch.full((batch,), prompt_len)
    slots = tables[torch.arange(batch), pos // page_size].long() * page_size + pos % page_size
    meta = AttentionMetadata(slot_mapping=slots, block_tables=tables,
                             seq_lens=torch.full((batch,), prompt_len + 1, dtype=torch.int32), cu_q_lens=None)
    out.append(model.forward(ids[batch * prompt_len:], pos, meta, kv))
    return out


@pytest.mark.parametrize("preset", ["llama", "qwen2", "olmo", "olmo2", "gemma2", "gemma3"])
def test_triton_backend_with_fused_glue_matches_torch_backend(preset):
    # every family: pre-norm, post-norm, both (Gemma, float32 norm weights), weightless layer norm
    # (OLMo: the per-op residual), two rope tables and sliding windows (Gemma 3)
    for got, want in zip(_run(preset, "triton"), _run(preset, "torch")):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("preset", ["llama-tiny", "olmo2-tiny"])
def test_decode_step_launches_no_rope_or_residual_glue(preset):
    launches = _load_script("layer_launches")
    fused, unfused = launches.per_layer(preset, True), launches.per_layer(preset, False)
    step = launches.count(preset, True)
    assert not {"aten.cat", "aten.neg", "aten.cos", "aten.sin"} & set(step), step  # no RoPE glue, no tables
    assert fused["triton._store_kv_rope_kernel"] == 1 and fused["triton._store_kv_kernel"] == 0
    assert fused["triton._add_rms_norm_kernel"] == 2 and fused["aten.add"] == 0  # both residual steps fused
    # the per-op path pays 2 cat + 2 neg + 4 mul + 2 add per layer for the rotation alone
    assert sum(fused.values()) <= sum(unfused.values()) - 10
    assert fused["triton._act_mul_kernel"] == 1 and fused["aten.silu"] == 0
    if preset == "llama-tiny":  # 4 GEMMs, store, attention, 2 residual steps, act * up: nothing else
        assert sum(fused.values()) == 9, fused


def test_float32_checkpoints_default_to_bf16_on_cuda_only():
    from nudgefast.model import default_dtype
    fp32 = spec_from_config(dict(SHAPES["llama-tiny"], torch_dtype="float32"))
    fp16 = spec_from_config(dict(SHAPES["llama-tiny"], torch_dtype="float16"))
    assert default_dtype(fp32, torch.device("cuda")) == torch.bfloat16
    assert default_dtype(fp32, torch.device("cpu")) == torch.float32
    assert default_dtype(fp16, torch.device("cuda")) == torch.float16  # a 16-bit checkpoint keeps its dtype
