"""Speculative accept timings (pytest-benchmark): the torch reference vs the Triton kernel.

    .venv/bin/pytest benchmarks/test_bench_accept.py --benchmark-group-by=group

One speculative round's accept step for the whole batch (kernels/spec_accept.py): the rule replayed
at K + 1 verified positions, the emitted tokens, the counters and both cursors. K = 4; vocabularies
49152 (SmolLM2) and 262144 (gemma-3); batch 1 and 8; greedy and temperature 0.7. The draft is the
base model's own greedy choice at each position, so a greedy round accepts all K drafts (checked
once before the timing), and replays the bonus position where the row ends the draft in state
BASE; with temperature the base's draw may differ from the draft and the round ends at the first
difference (a shorter path, as in real sampled decoding). CPU: the reference (the CPU engine's
accept). CUDA (skipped without it): the reference on the GPU and the Triton kernel, bf16 logits,
checked once against the reference before the timing. Every timed call first resets the state it
advances (a few tiny ops, the same for every implementation).
"""
import pytest
import torch

from nudgefast.kernels.spec_accept import SpecStats, spec_accept, spec_accept_ref
from test_bench_gate import SAMPLING as GATE_SAMPLING
from test_bench_gate import _inputs, _lm_like, set_sampling

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
VOCABS = (49_152, 262_144)
BATCHES = (1, 8)
SAMPLING = {k: GATE_SAMPLING[k] for k in ("greedy", "temp")}
K = 4


def _run(benchmark, accept, batch, vocab, sampling, dtype, device):
    _, _, state, base, nudger = _inputs(batch, vocab, dtype, device)
    gen = torch.Generator().manual_seed(vocab + batch)
    verify = torch.stack([_lm_like(batch, vocab, gen) for _ in range(K + 1)], dim=1).to(dtype).to(device)
    draft = verify[:, :K].float().argmax(-1).to(torch.int64)
    params = set_sampling(state, sampling)
    stats = SpecStats.zeros(batch, device)
    snapshot = {name: getattr(state, name).clone() for name in ("word_state", "span", "finished", "n_out", "n_nudged")}
    cursors = [(c, {f: getattr(c, f).clone() for f in ("input_ids", "positions", "seq_lens", "slot_mapping")})
               for c in (base, nudger)]

    def once():
        for name, value in snapshot.items():
            getattr(state, name).copy_(value)
        for cursor, fields in cursors:
            for f, value in fields.items():
                getattr(cursor, f).copy_(value)
        accept(verify, draft, state, params, base, nudger, stats)
        if device == "cuda":
            torch.cuda.synchronize()

    once()  # compile (Triton) / warm up outside the timing
    if temperature == 0.0:  # the path claimed above: every draft accepted
        assert stats.accepted.tolist() == [K] * batch and state.n_out.min().item() >= K
    if accept is not spec_accept_ref:  # what is timed computes what the reference computes
        runs = []
        for fn in (accept, spec_accept_ref):
            once_state = {name: getattr(state, name) for name in snapshot}
            for name, value in snapshot.items():
                getattr(state, name).copy_(value)
            for cursor, fields in cursors:
                for f, value in fields.items():
                    getattr(cursor, f).copy_(value)
            fresh = SpecStats.zeros(batch, device)
            fn(verify, draft, state, params, base, nudger, fresh)
            runs.append([t.clone() for t in once_state.values()] + [state.out_tokens.clone()] +
                        [getattr(c, f).clone() for c, fields in cursors for f in fields] +
                        [v.clone() for v in vars(fresh).values()])
        assert all(torch.equal(a, b) for a, b in zip(*runs)), "the timed kernel differs from the reference"
    benchmark(once)


CASES = [(v, b, s) for v in VOCABS for b in BATCHES for s in SAMPLING]


@pytest.mark.benchmark(group="spec_accept")
@pytest.mark.parametrize("vocab,batch,sampling", CASES)
def test_accept_ref_cpu(benchmark, vocab, batch, sampling):
    _run(benchmark, spec_accept_ref, batch, vocab, sampling, torch.float32, "cpu")


@needs_cuda
@pytest.mark.benchmark(group="spec_accept")
@pytest.mark.parametrize("vocab,batch,sampling", CASES)
def test_accept_ref_cuda(benchmark, vocab, batch, sampling):
    _run(benchmark, spec_accept_ref, batch, vocab, sampling, torch.bfloat16, "cuda")


@needs_cuda
@pytest.mark.benchmark(group="spec_accept")
@pytest.mark.parametrize("vocab,batch,sampling", CASES)
def test_accept_triton_cuda(benchmark, vocab, batch, sampling):
    _run(benchmark, spec_accept, batch, vocab, sampling, torch.bfloat16, "cuda")
