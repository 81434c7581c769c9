"""Compile every Triton kernel for real GPUs on a machine without one, and report its resources.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` runs the whole compiler (TTIR ->
TTGIR -> LLVM -> PTX -> ptxas -> cubin) on the CPU; ptxas and cuobjdump ship in the triton wheel.
The launch configurations are not re-typed here: each case CALLS THE REAL LAUNCHER (small CPU
tensors with the real head_dim, head counts, page size and dtype) while the kernels are replaced by
recorders, and Triton's own argument binder turns the recorded call into the signature, constexprs
and specialisation attributes (pointer alignment, ints equal to 1 or divisible by 16) that the same
call on a GPU would compile. Runtime sizes (batch, sequence, vocabulary) are not constexprs, so each
distinct (kernel, signature, constexprs, options, target) is compiled once.

    python scripts/kernel_report.py                   # full sweep, writes benchmarks/KERNELS.md
    python scripts/kernel_report.py --subset ci       # the representative subset CI compiles
    python scripts/kernel_report.py --json out.json   # machine-readable rows (the test reads these)

Exit status 1 when any compile fails or any kernel in NO_SPILL spills on sm_90.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The kernels must be JIT functions (compilable), not interpreter objects: drop the interpreter flag
# BEFORE triton or any kernel module is imported. The launchers read it at call time (see _capture).
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from nudgefast.kernels import activation, kv_store, norm, paged_decode_attention as decode_mod  # noqa: E402
from nudgefast.kernels import paged_prefill_attention as prefill_mod  # noqa: E402
from nudgefast.kernels import nudge_gate, sample, spec_accept  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"sm_80": GPUTarget("cuda", 80, 32), "sm_90": GPUTarget("cuda", 90, 32)}
SM_COUNT = 132  # H100 SXM / H200: what the split-K choice of decode attention sees
MODULES = (activation, kv_store, norm, decode_mod, prefill_mod, nudge_gate, sample, spec_accept)

# Kernels that must not spill on sm_90 at these head_dims, or at all when they have no head_dim
# (issue 13, item 2). head_dim 256 is reported, not enforced.
NO_SPILL = {"_decode_kernel", "_decode_merge_kernel", "_prefill_kernel", "_store_kv_kernel", "_store_kv_rope_kernel",
            "_add_rms_norm_kernel", "_act_mul_kernel",
            # the sampler and the split scans of the gate / sampler / accept launchers (issue 13, item 3)
            "_sample_kernel", "_split_scan_kernel", "_split_nucleus_kernel"}
# Enforced only in their SPLIT=True variants (the combine of the chunk records): the single-program
# nucleus step kernel already spilled 24 bytes at 128 registers before the split (reported, not enforced).
NO_SPILL_WHEN_SPLIT = {"_nudge_step_kernel", "_spec_accept_kernel"}
NO_SPILL_HEAD_DIMS = (64, 128)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# ================================================================================================
# THE TABLE: what to compile. Each family is a launcher call over a grid of model-shape parameters.
# When a launcher's Python signature changes, update its `call_*` below; the kernel signature and
# constexprs follow from the launcher itself.
# ================================================================================================

@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    call: callable          # call(**params): invokes the launcher once (kernels are recorders then)
    full: dict | list       # parameter -> values swept by the full report (cartesian product; a list: union)
    ci: dict                # the representative subset CI compiles (must include what NO_SPILL checks)


def call_decode(head_dim, group, dtype, page_size, softcap, window, split, n_kv=8):
    q = torch.zeros(2, n_kv * group, head_dim, dtype=DTYPES[dtype])
    pages = torch.zeros(4, page_size, n_kv, head_dim, dtype=DTYPES[dtype])
    tables = torch.zeros(2, 4, dtype=torch.int32)
    lens = torch.ones(2, dtype=torch.int32)
    decode_mod.paged_decode_attention(q, pages, pages, tables, lens, head_dim ** -0.5, window=window,
                                      softcap=softcap, num_splits=8 if split else 1)


def call_prefill(head_dim, group, dtype, page_size, softcap, window, q_len, n_kv=8):
    # q as the model makes it: a view of the fused qkv projection.
    hq = n_kv * group
    qkv = torch.zeros(2 * q_len, (hq + 2 * n_kv) * head_dim, dtype=DTYPES[dtype])
    q = qkv[:, :hq * head_dim].view(2 * q_len, hq, head_dim)
    pages = torch.zeros(4, page_size, n_kv, head_dim, dtype=DTYPES[dtype])
    tables = torch.zeros(2, 4, dtype=torch.int32)
    lens = torch.full((2,), q_len, dtype=torch.int32)
    cu = torch.tensor([0, q_len, 2 * q_len], dtype=torch.int32)
    prefill_mod.paged_prefill_attention(q, pages, pages, tables, lens, cu, head_dim ** -0.5, window=window,
                                        softcap=softcap, max_q_len=q_len)


def call_store(head_dim, n_kv, dtype, page_size):
    qkv = torch.zeros(3, (4 * n_kv) * head_dim, dtype=DTYPES[dtype])  # q of 2 * n_kv heads, then k, v
    k = qkv[:, 2 * n_kv * head_dim:3 * n_kv * head_dim].view(3, n_kv, head_dim)
    v = qkv[:, 3 * n_kv * head_dim:].view(3, n_kv, head_dim)
    pages = torch.zeros(4, page_size, n_kv, head_dim, dtype=DTYPES[dtype])
    kv_store.store_kv(k, v, pages, pages.clone(), torch.zeros(3, dtype=torch.int64))


def call_store_rope(head_dim, n_kv, group, dtype, page_size):
    hq = n_kv * group
    qkv = torch.zeros(3, (hq + 2 * n_kv) * head_dim, dtype=DTYPES[dtype])
    q = qkv[:, :hq * head_dim].view(3, hq, head_dim)
    k = qkv[:, hq * head_dim:(hq + n_kv) * head_dim].view(3, n_kv, head_dim)
    v = qkv[:, (hq + n_kv) * head_dim:].view(3, n_kv, head_dim)
    pages = torch.zeros(4, page_size, n_kv, head_dim, dtype=DTYPES[dtype])
    cos, sin = kv_store.rope_cache(torch.ones(head_dim // 2), 64, DTYPES[dtype], "cpu")
    kv_store.store_kv_rope(q, k, v, pages, pages.clone(), torch.zeros(3, dtype=torch.int64),
                           torch.zeros(3, dtype=torch.int64), cos, sin)


def call_norm(hidden, post, pre, dtype, weights="dt"):
    h = torch.zeros(3, hidden, dtype=DTYPES[dtype])
    w = torch.ones(hidden, dtype=DTYPES[dtype] if weights == "dt" else torch.float32)
    norm.add_rms_norm(h, h.clone(), w if post else None, w if pre else None, 1e-6)


def call_act(inter, act, dtype):
    activation.act_mul(torch.zeros(3, 2 * inter, dtype=DTYPES[dtype]), act)


# The gate / sampler / accept launchers are changing to per-row parameters in device tensors
# (per-row threshold, temperature, ... in GateState; GateParams keeps mode and max_sample). The
# builders below use that interface when nudge_gate has it (new_gate_state / set_row) and the
# single-config one otherwise; adapt them here when those signatures move.
PER_ROW = hasattr(nudge_gate, "new_gate_state")


def _gate_setup(mode, gate, word, sampler, batch, vocab, max_new=64):
    """(state, params) of a batch whose rows all use this configuration."""
    temperature, top_p = _SAMPLERS[sampler]
    word_start = torch.zeros(vocab, dtype=torch.bool)
    if PER_ROW:
        state = nudge_gate.new_gate_state(batch, out_width=max_new, stop_width=2, word_start=word_start,
                                          device="cpu")
        for row in range(batch):
            nudge_gate.set_row(state, row, seed=row, gate=gate, threshold=0.4, granularity="word" if word else "token",
                               temperature=temperature, top_p=top_p, max_new_tokens=max_new, stop_ids=[1])
        max_sample = sample.SAMPLE_GREEDY if sampler == "greedy" else sample.SAMPLE_NUCLEUS
        return state, nudge_gate.GateParams(mode=_MODES[mode], max_sample=max_sample)
    state = nudge_gate.GateState(
        seed=torch.zeros(batch, dtype=torch.int64), word_state=torch.zeros(batch, dtype=torch.int32),
        span=torch.zeros(batch, dtype=torch.int32), finished=torch.zeros(batch, dtype=torch.int32),
        n_out=torch.zeros(batch, dtype=torch.int32), n_nudged=torch.zeros(batch, dtype=torch.int32),
        out_tokens=torch.zeros(batch, max_new, dtype=torch.int32),
        out_from_nudger=torch.zeros(batch, max_new, dtype=torch.int8),
        stop_ids=torch.full((2,), -1, dtype=torch.int64), word_start=word_start)
    params = nudge_gate.GateParams(mode=_MODES[mode], gate=gate, threshold=0.4, word_level=word,
                                   temperature=temperature, top_p=top_p, max_new_tokens=max_new)
    return state, params


def _cursor(batch, page_size=16):
    return nudge_gate.ModelCursor(
        input_ids=torch.zeros(batch, dtype=torch.int64), positions=torch.zeros(batch, dtype=torch.int64),
        seq_lens=torch.zeros(batch, dtype=torch.int32), slot_mapping=torch.zeros(batch, dtype=torch.int64),
        block_tables=torch.zeros(batch, 8, dtype=torch.int32), page_size=page_size)


_SAMPLERS = {"greedy": (0.0, 1.0), "gumbel": (0.7, 1.0), "nucleus": (0.7, 0.9)}
_MODES = {"nudging": nudge_gate.MODE_NUDGING, "base_only": nudge_gate.MODE_BASE_ONLY,
          "nudger_only": nudge_gate.MODE_NUDGER_ONLY}


# Vocabulary and batch decide how many programs share a row (vocab_split.plan_chunks for 132 SMs:
# batch 1 splits a 262k row over 64 programs, batch 256 keeps one program per row). Logits are
# torch.empty: the launchers only read shapes and strides here, and a [256, 262144] float32 row
# block would be a 268 MB fill.
def call_gate(mode, gate, word, sampler, dtype, vocab=262_144, batch=1):
    logits = torch.empty(batch, vocab, dtype=DTYPES[dtype])
    state, params = _gate_setup(mode, gate, word, sampler, batch, vocab)
    nudge_gate.nudge_step(None if mode == "nudger_only" else logits, None if mode == "base_only" else logits,
                          state, params, _cursor(batch), _cursor(batch))


def call_sample(sampler, dtype, vocab=262_144, batch=1):
    temperature, top_p = _SAMPLERS[sampler]
    sample.sample(torch.empty(batch, vocab, dtype=DTYPES[dtype]), torch.zeros(batch, dtype=torch.int64),
                  torch.zeros(batch, dtype=torch.int32), 0, temperature, top_p)


def call_accept(mode, word, sampler, dtype, k, vocab=262_144, batch=1):
    logits = torch.empty(batch, k + 1, vocab, dtype=DTYPES[dtype])
    draft = torch.zeros(batch, k, dtype=torch.int64)
    state, params = _gate_setup(mode, 0, word, sampler, batch, vocab)
    spec_accept.spec_accept(logits, draft, state, params, _cursor(batch), _cursor(batch),
                            spec_accept.SpecStats.zeros(batch))


# Full sweep of an attention family: every head_dim x GQA x page size (group 1 and 4 cover 1..8: the
# group only enters as BLOCK_G / BLOCK_M = max(16, ...) and the "== 1" specialisation); the other
# dtypes at GQA 4; softcap and window (constexpr switches) at head_dim 128 and 256.
def _attn_full(**extra):
    first = {k: v[:1] for k, v in extra.items()}
    return [dict(head_dim=[64, 128, 256], group=[1, 4], dtype=["bf16"], page_size=[16, 32], softcap=[0.0],
                 window=[0], **extra),
            dict(head_dim=[64, 128, 256], group=[4], dtype=["fp16", "fp32"], page_size=[16, 32], softcap=[0.0],
                 window=[0], **extra),
            dict(head_dim=[128, 256], group=[4], dtype=["bf16"], page_size=[16], softcap=[0.0, 50.0],
                 window=[0, 4096], **first)]


FAMILIES = [
    Family("decode attention", call_decode,
           full=_attn_full(split=[False, True]),
           ci=dict(head_dim=[64, 128, 256], group=[1, 8], dtype=["bf16"], page_size=[16], softcap=[0.0],
                   window=[0], split=[False, True])),
    Family("prefill attention", call_prefill,
           # q_len 5: a speculative verify chunk (K=4); 512: a prompt chunk (the widest tile)
           full=_attn_full(q_len=[5, 512]),
           ci=dict(head_dim=[64, 128, 256], group=[1, 8], dtype=["bf16"], page_size=[16], softcap=[0.0],
                   window=[0], q_len=[5, 512])),
    Family("KV store", call_store,
           full=dict(head_dim=[64, 128, 256], n_kv=[1, 8, 32], dtype=list(DTYPES), page_size=[16, 32]),
           ci=dict(head_dim=[64, 128, 256], n_kv=[8, 32], dtype=["bf16"], page_size=[16])),
    Family("KV store + RoPE", call_store_rope,
           full=dict(head_dim=[64, 128, 256], n_kv=[1, 8, 32], group=[1, 4], dtype=list(DTYPES), page_size=[16]),
           ci=dict(head_dim=[64, 128, 256], n_kv=[8, 32], group=[1, 4], dtype=["bf16"], page_size=[16])),
    Family("residual add + RMSNorm", call_norm,
           # hidden sizes: SmolLM2-135M 576, OLMo-2-1B 2048, Llama/OLMo-2-7B 4096, Gemma-2-9B 3584, 8192
           full=[dict(hidden=[576, 2048, 3584, 4096, 8192], post=[False, True], pre=[False, True], dtype=list(DTYPES)),
                 dict(hidden=[3584], post=[True], pre=[True], dtype=["bf16"], weights=["f32"])],
           ci=dict(hidden=[4096], post=[False, True], pre=[True], dtype=["bf16"])),
    Family("MLP act(gate) * up", call_act,
           # intermediate sizes: OLMo-2-1B 8192, 7B 11008, Llama-3-8B 14336, Gemma-2-9B 14336
           full=dict(inter=[8192, 11008, 14336], act=["silu", "gelu_tanh"], dtype=list(DTYPES)),
           ci=dict(inter=[11008], act=["silu"], dtype=["bf16"])),
    # vocabularies: Llama-2 32000, GPT-2/OLMo 50257 (odd: no divisibility of the row stride), Qwen2
    # 151936, Gemma 262144; batch 1 and 8 split rows over programs, 256 keeps one program per row
    Family("nudge gate", call_gate,
           full=[dict(mode=list(_MODES), gate=[0], word=[True], sampler=list(_SAMPLERS), dtype=["bf16"],
                      vocab=[262_144], batch=[1, 256]),
                 dict(mode=["nudging"], gate=[0, 1], word=[False, True], sampler=["greedy"], dtype=list(DTYPES),
                      vocab=[262_144], batch=[1, 256]),
                 dict(mode=["nudging"], gate=[0], word=[True], sampler=list(_SAMPLERS), dtype=list(DTYPES),
                      vocab=[32_000, 50_257, 151_936, 262_144], batch=[1, 8, 64, 256])],
           ci=dict(mode=["nudging"], gate=[0], word=[True], sampler=["greedy", "nucleus"], dtype=["bf16"],
                   vocab=[262_144], batch=[1, 256])),
    Family("sampler", call_sample,
           full=dict(sampler=list(_SAMPLERS), dtype=list(DTYPES), vocab=[32_000, 50_257, 151_936, 262_144],
                     batch=[1, 8, 256]),
           ci=dict(sampler=["nucleus"], dtype=["bf16"], vocab=[262_144], batch=[1, 256])),
    Family("speculative accept", call_accept,
           full=[dict(mode=["nudging", "base_only"], word=[True], sampler=list(_SAMPLERS), dtype=["bf16"], k=[1, 4, 16],
                      vocab=[262_144], batch=[1, 64]),
                 dict(mode=["nudging"], word=[False], sampler=["greedy"], dtype=list(DTYPES), k=[4],
                      vocab=[32_000, 262_144], batch=[1, 64])],
           # CI: greedy only (the split nucleus kernels are compiled by the gate and sampler families)
           ci=dict(mode=["nudging"], word=[True], sampler=["greedy"], dtype=["bf16"], k=[4],
                   vocab=[262_144], batch=[1, 64])),
]

# ================================================================================================
# Capture, compile, measure
# ================================================================================================


class _Recorder:
    def __init__(self, fn, sink):
        self.fn, self.sink = fn, sink

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.sink.append((self.fn, args, kwargs))


@contextlib.contextmanager
def _capture():
    """Kernels become recorders; launchers take their Triton path on CPU tensors, as on an H100."""
    sink, saved = [], []
    for mod in MODULES:
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, JITFunction):
                saved.append((mod, name, obj))
                setattr(mod, name, _Recorder(obj, sink))
    patches = [(decode_mod, "_sm_count", lambda device: SM_COUNT),
               (decode_mod, "interpreter_needs_upcast", lambda q: False),
               (prefill_mod, "interpreter_needs_upcast", lambda q: False)]
    for mod, name, new in patches:
        if hasattr(mod, name):
            saved.append((mod, name, getattr(mod, name)))
            setattr(mod, name, new)
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # the launchers' "use Triton on this tensor" test
    try:
        yield sink
    finally:
        for mod, name, obj in saved:
            setattr(mod, name, obj)
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


_BINDERS = {}


ALIGNMENT = {"mode": "launch"}


def _bind(fn, args, kwargs, target):
    """Triton's own launch-time specialisation of this call, without a driver.

    ALIGNMENT "none" drops the divisibility attributes (pointers 16-byte aligned, ints multiples of
    16): the worst case, a launch on unaligned views, where nothing can be vectorised.
    """
    key = (id(fn), target.arch)
    if key not in _BINDERS:
        backend = make_backend(target)
        _BINDERS[key] = backend, create_function_from_signature(fn.signature, fn.params, backend)
    backend, binder = _BINDERS[key]
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    if ALIGNMENT["mode"] == "none":
        attrs = {}
    return options, signature, constexprs, attrs


_CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def _resources(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(_CUOBJDUMP), "--dump-resource-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    m = _USAGE.search(text)
    if not m:
        raise RuntimeError(f"cannot read cuobjdump output: {text!r}")
    reg, stack, shared, local = map(int, m.groups())
    return dict(registers=reg, stack=stack, static_shared=shared, local=local)


def _spills(ptx_log: str | None) -> int | None:
    return None


def _describe_constexprs(fn, constexprs):
    names = fn.arg_names
    out = {}
    for path, value in sorted(constexprs.items()):
        name = names[path[0]]
        if fn.params[path[0]].is_constexpr:
            out[name] = value
    return out


def run(subset: str, families: list[str] | None, targets: list[str], log=print) -> list[dict]:
    rows, seen = [], {}
    for fam in FAMILIES:
        if families and fam.name not in families:
            continue
        grids = fam.ci if subset == "ci" else fam.full
        grids = grids if isinstance(grids, list) else [grids]
        points = list(dict.fromkeys(tuple(zip(g, values)) for g in grids
                                    for values in itertools.product(*g.values())))
        for point in points:
            params = dict(point)
            with _capture() as sink:
                fam.call(**params)
            if not sink:
                raise RuntimeError(f"{fam.name} {params}: the launcher launched no kernel")
            for fn, args, kwargs in sink:
                for tname in targets:
                    target = TARGETS[tname]
                    options, signature, constexprs, attrs = _bind(fn, args, kwargs, target)
                    key = (fn.__name__, tname, repr(sorted(signature.items())), repr(sorted(constexprs.items())),
                           repr(sorted(attrs.items())), options.num_warps, options.num_stages)
                    if key not in seen:
                        t0 = time.time()
                        row = dict(family=fam.name, kernel=fn.__name__, target=tname,
                                   constexprs=_describe_constexprs(fn, constexprs),
                                   num_warps=options.num_warps, num_stages=options.num_stages, params=[params])
                        try:
                            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                                      options=options.__dict__)
                            row.update(_resources(compiled.asm["cubin"]))
                            row["shared"] = compiled.metadata.shared
                            row["error"] = None
                        except Exception as e:  # reported (and fails the run), not swallowed
                            row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}"
                        row["compile_s"] = round(time.time() - t0, 2)
                        seen[key] = row
                        rows.append(row)
                        log(_one_line(row))
                    else:
                        seen[key]["params"].append(params)
    return rows


def _one_line(r):
    c = ",".join(f"{k}={v}" for k, v in r["constexprs"].items())
    if r["error"]:
        return f"FAIL {r['target']} {r['kernel']} [{c}] w{r['num_warps']}: {r['error']}"
    return (f"{r['target']} {r['kernel']:22s} regs {r['registers']:3d} stack {r['stack']:4d} "
            f"smem {r['shared']:6d} w{r['num_warps']} {r['compile_s']:5.1f}s [{c}]")


def problems(rows) -> list[str]:
    out = []
    for r in rows:
        if r["error"]:
            out.append(f"compile failure: {r['target']} {r['kernel']} {r['constexprs']}: {r['error']}")
        elif r["target"] == "sm_90" and r["stack"] > 0 and (
                (r["kernel"] in NO_SPILL
                 and any(p.get("head_dim", NO_SPILL_HEAD_DIMS[0]) in NO_SPILL_HEAD_DIMS for p in r["params"]))
                or (r["kernel"] in NO_SPILL_WHEN_SPLIT and r["constexprs"].get("SPLIT"))):
            out.append(f"spills on sm_90: {r['kernel']} {r['constexprs']} w{r['num_warps']}: "
                       f"{r['stack']} stack bytes per thread (shapes: {_summarise_params(r['params'])})")
    return out


def write_markdown(rows, path: Path, command: str, append: bool = False):
    if append:  # a further section: the worst case without alignment attributes
        lines = ["", "## Worst case: no alignment known", "",
                 f"Appended by `{command}`: the same launches compiled WITHOUT the divisibility attributes (as",
                 "for unaligned views: nothing can be vectorised, every element gets its own address). Reported,",
                 "not enforced; real launches on torch allocations get the attributes of the table above.", "",
                 "| target | kernel | constexprs | warps | regs | stack | smem | model shapes |",
                 "|---|---|---|---|---|---|---|---|"]
        lines += _table_rows(rows)
        with open(path, "a") as f:
            f.write("\n".join(lines) + "\n")
        return
    lines = [
        "# Triton kernels compiled for sm_80 and sm_90 (no GPU needed)",
        "",
        f"Written by `{command}` (triton {triton.__version__}). Every row is one distinct compile: a kernel, its",
        "constexprs and launch options as the launcher chose them for the model shapes in `params` (head_dim,",
        "GQA group, dtype, page size, softcap, window, ...; runtime sizes such as batch, sequence length and",
        "vocabulary are not constexprs and share a row). `regs`: registers per thread; `stack`: local stack",
        "bytes per thread (register spills; 0 = none); `smem`: shared memory per program (bytes, Triton's",
        "allocation). From `cuobjdump --dump-resource-usage` on the cubin.",
        "",
    ]
    lines += _summary(rows)
    lines += [""] + _split_plan()
    lines += ["", "## Every compile", "",
              "| target | kernel | constexprs | warps | regs | stack | smem | model shapes |",
              "|---|---|---|---|---|---|---|---|"]
    lines += _table_rows(rows)
    path.write_text("\n".join(lines) + "\n")


def _split_plan():
    """Programs per row and launches per step of the gate / sampler / accept launchers (issue 13, item 3)."""
    from nudgefast.kernels.vocab_split import plan_chunks

    out = ["## Programs per vocabulary row and launches per step (gate, sampler, accept)", "",
           f"From `vocab_split.plan_chunks` for {SM_COUNT} SMs. Before the split every launcher ran ONE program per",
           "row (a batch-1 step of a 262k vocabulary on one SM, the nucleus search as 9 further serial passes",
           "inside it) in ONE launch. Now, when the rows alone do not fill the SMs, each row is split into C",
           "chunks: `_split_scan_kernel` (rows x C [x 2 models]) writes chunk records, a nucleus-capable batch",
           "(max_sample = nucleus) adds 8 search passes and the draw as `_split_nucleus_kernel` launches of the",
           "same grid, and the step kernel (one program per row, `SPLIT=True`) combines. Launches per step:",
           "1 with C = 1; 2 (greedy / Gumbel batches) or 11 (nucleus-capable) with C > 1. Speculative accept",
           "splits its B x (K+1) verify positions the same way (rows = B x (K+1) below).", "",
           "| rows | V = 32000 | V = 50257 | V = 151936 | V = 262144 |", "|---|---|---|---|---|"]
    for rows in (1, 2, 4, 8, 16, 32, 64, 128, 132, 256):
        cells = []
        for vocab in (32_000, 50_257, 151_936, 262_144):
            C, (length,) = plan_chunks(rows, [vocab], "cpu")
            cells.append("1 program, 1 launch" if C == 1 else f"C = {C} x {length}: 2 / 11 launches")
        out.append(f"| {rows} | " + " | ".join(cells) + " |")
    return out


def _summary(rows):
    """Most registers / stack bytes per kernel and target, by head_dim where the kernel has one."""
    out = ["## Summary: most registers / stack bytes per thread over all configurations", "",
           "| kernel | target | head_dim 64 | head_dim 128 | head_dim 256 | (no head_dim) |", "|---|---|---|---|---|---|"]
    order = [f.name for f in FAMILIES]
    seen = {}
    for r in rows:
        if r["error"]:
            continue
        for p in r["params"]:
            key = (order.index(r["family"]), r["kernel"], r["target"])
            cell = seen.setdefault(key, {})
            hd = p.get("head_dim")
            regs, stack = cell.get(hd, (0, 0))
            cell[hd] = (max(regs, r["registers"]), max(stack, r["stack"]))
    for (fam, kernel, target), cell in sorted(seen.items()):
        fmt = lambda hd: "-" if hd not in cell else f"{cell[hd][0]} / {cell[hd][1]}"  # noqa: E731
        out.append(f"| `{kernel}` ({FAMILIES[fam].name}) | {target} | {fmt(64)} | {fmt(128)} | {fmt(256)} | "
                   f"{fmt(None)} |")
    return out


def _table_rows(rows):
    lines = []
    order = [f.name for f in FAMILIES]
    for r in sorted(rows, key=lambda r: (order.index(r["family"]), r["kernel"], r["target"],
                                         json.dumps(r["constexprs"], default=str))):
        c = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items())
        shapes = _summarise_params(r["params"])
        if r["error"]:
            lines.append(f"| {r['target']} | `{r['kernel']}` | {c} | {r['num_warps']} | FAIL | | | {r['error']} |")
        else:
            lines.append(f"| {r['target']} | `{r['kernel']}` | {c} | {r['num_warps']} | {r['registers']} | "
                         f"{r['stack']} | {r['shared']} | {shapes} |")
    return lines


def _summarise_params(params):
    # one compile can serve launchers of different families (the sampler's split scan is also the
    # nudger-only gate's): the union of their parameters
    keys = list(dict.fromkeys(k for p in params for k in p))
    return "; ".join(f"{k} {'/'.join(str(v) for v in sorted({p[k] for p in params if k in p}, key=str))}"
                     for k in keys)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--subset", choices=["ci", "full"], default="full")
    p.add_argument("--family", action="append", help="only these families (repeatable)")
    p.add_argument("--target", action="append", choices=sorted(TARGETS), help="default: all")
    p.add_argument("--alignment", choices=["launch", "none"], default="launch",
                   help="launch: the attributes a launch on aligned tensors gets (default); none: no alignment known")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--markdown", default=None, help="default for the full subset: benchmarks/KERNELS.md")
    p.add_argument("--no-markdown", action="store_true")
    p.add_argument("--append", action="store_true", help="append the rows to --markdown as a worst-case section")
    a = p.parse_args(argv)
    t0 = time.time()
    ALIGNMENT["mode"] = a.alignment
    rows = run(a.subset, a.family, a.target or sorted(TARGETS))
    bad = problems(rows) if a.alignment == "launch" else [r for r in problems(rows) if "compile failure" in r]
    if a.json:
        Path(a.json).write_text(json.dumps(dict(rows=rows, problems=bad), indent=1, default=str))
    md = a.markdown or (str(ROOT / "benchmarks" / "KERNELS.md") if a.subset == "full" and not a.family else None)
    if md and not a.no_markdown:
        args = list(argv if argv is not None else sys.argv[1:])
        shown = [x for i, x in enumerate(args) if x != "--json" and (i == 0 or args[i - 1] != "--json")]
        write_markdown(rows, Path(md), "python " + shlex.join(["scripts/kernel_report.py"] + shown), append=a.append)
    print(f"{len(rows)} compiles in {time.time() - t0:.0f}s; {len(bad)} problems")
    for b in bad:
        print("PROBLEM:", b)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
