"""Count the kernels one decode step launches per layer, from an op trace (no GPU needed).

The model runs one decode step (batch 4) with the GPU backend's code path ("triton": fused RoPE +
KV store, residual add + RMSNorm in one kernel, act(gate) * up in one kernel, Triton attention) on CPU tensors: every Triton launch is counted (and not run), and every
aten op that would launch a kernel is counted through a TorchDispatchMode (views, reshapes and other
metadata-only ops are not kernels and are skipped). It prints the same step with the per-op path too
(RoPE and norms as torch glue, per-step rope tables: what the GPU path did before).

    python scripts/layer_launches.py [--preset llama-tiny]

"Per layer" is exact: a two-layer step minus a one-layer step; "outside" is a zero-layer step.
aten ops are counted as dispatched on the CPU: a few (F.rms_norm, SDPA) may map to a different
number of CUDA kernels, equally before and after.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys

if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # JIT functions are enough: no kernel is run here

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from nudgefast.bench.presets import SHAPES  # noqa: E402
from nudgefast.config import spec_from_config  # noqa: E402
from nudgefast.kernels import activation, kv_store, norm, paged_decode_attention, paged_prefill_attention  # noqa: E402
from nudgefast.kv_cache import AttentionMetadata, KVPool  # noqa: E402
from nudgefast.model import Transformer  # noqa: E402
from nudgefast.ops import Backend  # noqa: E402

_NOT_KERNELS = {"view", "_unsafe_view", "reshape", "split", "split_with_sizes", "chunk", "t", "transpose", "expand",
                "as_strided", "slice", "select", "unsqueeze", "squeeze", "detach", "alias", "permute", "lift_fresh",
                "empty", "empty_like", "empty_strided", "_to_copy_noop", "unbind", "narrow", "_reshape_alias",
                "clone_noop", "item", "_local_scalar_dense", "is_same_size", "sym_size", "sym_stride", "dim"}


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in _NOT_KERNELS:
            self.ops["aten." + name] += 1
        return func(*args, **(kwargs or {}))


class _Launch:
    def __init__(self, name, counter):
        self.name, self.counter = name, counter

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.counter["triton." + self.name] += 1
        return launch


@contextlib.contextmanager
def _triton_counted(counter):
    saved = []
    for mod in (activation, kv_store, norm, paged_decode_attention, paged_prefill_attention):
        for name in [n for n in vars(mod) if n.endswith("_kernel") and n.startswith("_")]:
            saved.append((mod, name, getattr(mod, name)))
            setattr(mod, name, _Launch(name, counter))
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # the launchers' "Triton on this tensor" test, at call time
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
        for mod, name, obj in saved:
            setattr(mod, name, obj)


def build(preset: str, fused: bool, dtype=torch.float32, batch=4, context=9, page_size=16):
    spec = spec_from_config(dict(SHAPES[preset]))
    backend = Backend("triton")
    backend.fused_rope = fused  # False: the per-op glue (RoPE, rope tables, residual + norms) of before
    gen = torch.Generator().manual_seed(0)
    from nudgefast.bench.presets import planted_next_map, planted_weights
    weights = planted_weights(spec, 0, "cpu", dtype, planted_next_map(spec.vocab_size, 0))
    model = Transformer(spec, weights, torch.device("cpu"), dtype, backend)
    pages_per_row = -(-(context + 1) // page_size)
    kv = KVPool(spec, batch * pages_per_row, page_size, dtype, torch.device("cpu"))
    tables = torch.arange(batch * pages_per_row, dtype=torch.int32).view(batch, pages_per_row)
    positions = torch.full((batch,), context, dtype=torch.int64)
    slots = (tables[:, context // page_size].long() * page_size + context % page_size)
    meta = AttentionMetadata(slot_mapping=slots, block_tables=tables,
                             seq_lens=torch.full((batch,), context + 1, dtype=torch.int32), cu_q_lens=None)
    ids = torch.randint(0, spec.vocab_size, (batch,), generator=gen)
    return model, kv, ids, positions, meta


def count(preset: str, fused: bool, layers: int | None = None) -> collections.Counter:
    """Kernels of one decode step (the first `layers` layers only, when given)."""
    model, kv, ids, positions, meta = build(preset, fused)
    if layers is not None:
        model.layers = model.layers[:layers]
    counter = collections.Counter()
    with _triton_counted(counter), _Counter() as mode, torch.no_grad():
        model.forward(ids, positions, meta, kv)
    counter.update(mode.ops)
    return counter


def per_layer(preset: str, fused: bool) -> collections.Counter:
    """One layer's kernels: a two-layer step minus a one-layer step (exact, whatever is per step)."""
    return count(preset, fused, 2) - count(preset, fused, 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llama-tiny", choices=sorted(SHAPES))
    a = p.parse_args(argv)
    print(f"decode step of {a.preset} (batch 4): kernels launched (aten ops dispatched on the CPU + Triton launches)")
    for fused, label in ((False, "before: RoPE, residual + norms and act * up as torch ops, rope tables per step"),
                         (True, "after: RoPE inside the KV store, residual + norms fused, act * up fused, tables built once")):
        layer, rest = per_layer(a.preset, fused), count(a.preset, fused, 0)
        print(f"  {label}: {sum(layer.values())} per layer + {sum(rest.values())} per step outside the layer loop")
        print("     per layer: " + ", ".join(f"{n} {k}" for k, n in sorted(layer.items(), key=lambda x: (-x[1], x[0]))))
        print("     outside:   " + ", ".join(f"{n} {k}" for k, n in sorted(rest.items(), key=lambda x: (-x[1], x[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
