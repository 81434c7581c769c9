"""The gate over a vocabulary split across ranks (nudgefast/parallel/sharded_gate.py) equals the
unsharded references: p_top / entropy (base_stats_ref) to float32 rounding, the greedy and the Gumbel
candidates (sample_rows_ref) exactly, ties across shards included."""
import pytest
import torch

from gate_rows import MIXED_ROWS, Cfg, apply, legacy_state
from nudgefast.kernels.nudge_gate import MODE_BASE_ONLY, MODE_NUDGING, ModelCursor, base_stats_ref, nudge_step_ref
from nudgefast.kernels.rng import STREAM_BASE
from nudgefast.kernels.sample import SAMPLE_GREEDY, SAMPLE_GUMBEL, sample_rows_ref
from nudgefast.parallel.sharded_gate import (combine_stats, effective_mode, nudge_step_from_candidates, shard_bounds,
                                             shard_stats)

SPLITS = {2: [0.3], 3: [0.1, 0.75], 4: [0.05, 0.5, 0.55]}  # unequal shard sizes (fractions of V)


def split_points(V, ranks):
    cuts = sorted({max(1, min(V - 1, round(f * V))) for f in SPLITS[ranks]})
    return [0] + cuts + [V]


def sharded(x, points, seed, step, stream, inv_temp, mode, with_stats=True):
    stats = torch.stack([shard_stats(x[:, a:b], a, seed, step, stream, inv_temp, mode, with_stats=with_stats)
                         for a, b in zip(points[:-1], points[1:])])
    return combine_stats(stats)


@pytest.mark.parametrize("ranks", [2, 3, 4])
@pytest.mark.parametrize("V,dtype", [(37, torch.float32), (1000, torch.float32), (517, torch.bfloat16)])
def test_sharded_equals_unsharded(ranks, V, dtype):
    g = torch.Generator().manual_seed(V * 10 + ranks)
    B = 9
    x = (torch.randn(B, V, generator=g) * torch.tensor([0.3, 1, 3, 8, 20, 1, 1, 2, 5]).reshape(-1, 1)).to(dtype)
    x[5, V // 2] = float("-inf")  # -inf logits are allowed
    x[6, : points_first(V, ranks)] = float("-inf")  # a whole shard of -inf
    seed = torch.randint(-2**62, 2**62, (B,), generator=g)
    step = torch.randint(0, 1000, (B,), generator=g)
    inv_temp = torch.tensor([1.0, 2.0, 0.5, 1.0, 1.25, 1.0, 0.7, 3.0, 1.0], dtype=torch.float32)
    mode = torch.full((B,), SAMPLE_GUMBEL, dtype=torch.int32)
    mode[0] = SAMPLE_GREEDY
    top_p = torch.ones(B)
    points = split_points(V, ranks)
    p_top, entropy, greedy, gumbel = sharded(x, points, seed, step, 1, inv_temp, mode)
    p_ref, h_ref = base_stats_ref(x)
    torch.testing.assert_close(p_top, p_ref, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(entropy, h_ref, rtol=2e-5, atol=2e-6)
    assert torch.equal(greedy, x.float().argmax(dim=-1))
    ref = sample_rows_ref(x, seed, step, 1, inv_temp, top_p, mode)
    assert torch.equal(torch.where(mode == SAMPLE_GREEDY, greedy, gumbel), ref)
    # the Gumbel rows really sampled (else the comparison above says nothing about the noise)
    assert not torch.equal(gumbel[1:], greedy[1:])
    # without the gate's statistics (base_only) the candidates are the same
    _, _, greedy2, gumbel2 = sharded(x, points, seed, step, 1, inv_temp, mode, with_stats=False)
    assert torch.equal(greedy2, greedy) and torch.equal(gumbel2, gumbel)


def points_first(V, ranks):
    return split_points(V, ranks)[1]


@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_ties_across_shards_take_the_first_global_index(ranks):
    V = 40
    points = split_points(V, ranks)
    x = torch.randn(3, V, generator=torch.Generator().manual_seed(ranks))
    # row 0: the maximum sits in every shard (at each shard's last column): the first shard's wins
    for b in points[1:]:
        x[0, b - 1] = 7.0
    # row 1: tie inside the last shard and with the second-to-last one
    x[1, points[-2]] = x[1, points[-1] - 1] = x[1, points[-2] - 1] = 9.0
    # row 2: a tie inside one shard only
    x[2, points[1] + 1] = x[2, points[1] + 2] = 5.0
    seed, step = torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64)
    mode = torch.full((3,), SAMPLE_GREEDY, dtype=torch.int32)
    _, _, greedy, _ = sharded(x, points, seed, step, 0, torch.ones(3), mode)
    assert greedy.tolist() == x.argmax(dim=-1).tolist() == [points[1] - 1, points[-2] - 1, points[1] + 1]


def test_gumbel_ties_across_shards_take_the_first_global_index():
    # equal best draws in two shards (built directly as the gathered numbers): the smaller index wins
    stats = torch.zeros(3, 1, 6, dtype=torch.float64)
    stats[:, 0, 1] = 1.0  # z
    stats[:, 0, 4] = torch.tensor([2.5, 3.0, 3.0])
    stats[:, 0, 5] = torch.tensor([1.0, 20.0, 31.0])
    assert combine_stats(stats)[3].tolist() == [20]


def test_shard_bounds_cover_the_vocabulary():
    for V, N in [(10, 3), (7, 4), (1000, 8), (5, 5)]:
        b = shard_bounds(V, N)
        assert b[0][0] == 0 and b[-1][1] == V and all(b[i][1] == b[i + 1][0] for i in range(N - 1))
    with pytest.raises(ValueError, match="ranks"):
        shard_bounds(10, 0)


def _rank(rank, world, port, x, points, seed, step, inv_temp, mode, out):
    from datetime import timedelta

    import torch.distributed as dist

    from nudgefast.parallel.sharded_gate import sharded_candidates

    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timedelta(seconds=30))
    pg = dist.ProcessGroupGloo(store, rank, world, timedelta(seconds=30))
    a, b = points[rank], points[rank + 1]
    out[rank] = [t.clone() for t in sharded_candidates(x[:, a:b], a, seed, step, 1, inv_temp, mode, pg)]


def test_sharded_candidates_over_gloo():
    # the same reduction through a real all-gather between processes: every rank gets the unsharded answer
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    g = torch.Generator().manual_seed(5)
    B, V, world = 4, 301, 3
    x = torch.randn(B, V, generator=g) * 3
    x[0, 0] = x[0, 250] = 50.0  # a tie across ranks
    seed, step = torch.arange(B, dtype=torch.int64) * 7919, torch.arange(B) + 3
    inv_temp = torch.full((B,), 1.5)
    mode = torch.tensor([SAMPLE_GREEDY, SAMPLE_GUMBEL, SAMPLE_GUMBEL, SAMPLE_GUMBEL], dtype=torch.int32)
    points = [0, 120, 121, V]
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        procs = [ctx.Process(target=_rank, args=(r, world, port, x, points, seed, step, inv_temp, mode, out))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
        assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
        results = [out[r] for r in range(world)]
    ref = sample_rows_ref(x, seed, step, 1, inv_temp, torch.ones(B), mode)
    p_ref, h_ref = base_stats_ref(x)
    for p_top, entropy, greedy, gumbel in results:
        assert greedy[0] == 0
        assert torch.equal(torch.where(mode == SAMPLE_GREEDY, greedy, gumbel), ref)
        torch.testing.assert_close(p_top, p_ref, rtol=2e-6, atol=1e-7)
        torch.testing.assert_close(entropy, h_ref, rtol=2e-5, atol=2e-6)


def _clone(obj):
    return type(obj)(**{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in vars(obj).items()})


def _cursor(B, page_size, gen):
    pos = torch.randint(1, 3 * page_size, (B,), generator=gen)
    bt = torch.randperm(8 * B, generator=gen)[: 4 * B].reshape(B, 4).to(torch.int32)
    slot = bt.gather(1, (pos // page_size).unsqueeze(1)).squeeze(1).long() * page_size + pos % page_size
    return ModelCursor(input_ids=torch.randint(0, 9, (B,), generator=gen), positions=pos,
                       seq_lens=(pos + 1).to(torch.int32), slot_mapping=slot, block_tables=bt, page_size=page_size)


@pytest.mark.parametrize("mode", [MODE_NUDGING, MODE_BASE_ONLY])
@pytest.mark.parametrize("ranks", [2, 3])
def test_step_from_sharded_candidates_equals_the_reference_step(mode, ranks):
    # the whole decode step from the shards' numbers (what tensor parallelism runs on rank 0) writes
    # what nudge_step_ref writes from the whole logits: tokens, provenance, rule state, endings, cursors
    V = 301
    gen = torch.Generator().manual_seed(100 * ranks + mode)
    rows = [r for r in MIXED_ROWS if r[4] == 1.0]  # nucleus rows gather the logits instead
    B = len(rows)
    state = legacy_state(seed=torch.randint(-2**62, 2**62, (B,), generator=gen),
                         word_state=torch.zeros(B, dtype=torch.int32), span=torch.zeros(B, dtype=torch.int32),
                         finished=torch.zeros(B, dtype=torch.int32), n_out=torch.zeros(B, dtype=torch.int32),
                         n_nudged=torch.zeros(B, dtype=torch.int32), out_tokens=torch.zeros(B, 12, dtype=torch.int32),
                         out_from_nudger=torch.zeros(B, 12, dtype=torch.int8),
                         stop_ids=torch.tensor([3, V - 4]), word_start=torch.rand(V, generator=gen) < 0.5)
    params = apply(state, [Cfg(mode, gate, thr, word, temp, 1.0, max_new)
                           for gate, thr, word, temp, _, max_new in rows])
    bc, nc = _cursor(B, 4, gen), (_cursor(B, 3, gen) if mode == MODE_NUDGING else None)
    want = (_clone(state), _clone(bc), nc and _clone(nc))
    points = split_points(V, ranks)
    for _ in range(8):
        scale = torch.tensor([0.5, 1, 2, 4, 8, 1, 3][:B]).reshape(-1, 1)
        base = torch.randn(B, V, generator=gen) * scale
        nudger = torch.randn(B, V, generator=gen) * 3 if mode == MODE_NUDGING else None
        if nudger is not None:
            nudger[::3] = base[::3]  # rows where the models agree
        nudge_step_ref(base, nudger, want[0], params, want[1], want[2])
        m = effective_mode(state, params)
        stats = torch.stack([shard_stats(base[:, a:b], a, state.seed, state.n_out, STREAM_BASE, state.inv_temp, m)
                             for a, b in zip(points[:-1], points[1:])])
        nudge_step_from_candidates(combine_stats(stats), nudger, state, params, bc, nc, sample_rows_ref)
        for got, ref in zip((state, bc, nc), want):
            for k, v in (vars(ref).items() if ref is not None else ()):
                if isinstance(v, torch.Tensor):
                    assert torch.equal(getattr(got, k), v), k
    assert int(state.n_out.sum()) > B  # rows ran several steps
    if mode == MODE_NUDGING:  # both writers appear (else the gate was not exercised)
        src = state.out_from_nudger[state.n_out.unsqueeze(1) > torch.arange(12)]
        assert 0 < int(src.sum()) < src.numel()
