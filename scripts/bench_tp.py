"""Tokens/s of the base model at tensor_parallel_size 1 and N on this machine (base_only, greedy),
with the outputs checked equal token for token, and what one decode step communicates. Usage:
    .venv/bin/python scripts/bench_tp.py MODEL_DIR [N=2] [NEW_TOKENS=32] [BATCH=1]
Each run is its own engine; the first generate warms up, the second is timed. Runs: N = 1, N with
the gate over the sharded vocabulary (each rank reduces its logits to 6 numbers per row, one
all-gather), N gathering the logits onto rank 0 instead (the previous design), N = 1 again (a
machine whose load changes shows up as two different N = 1 figures).

The per-step communication is reported from the model's shapes (per decode forward and rank: the
inputs' broadcast, 2 all-reduces of [B, hidden] per layer + 1 for the embedding, then either a
gather of [B, ceil(V / N)] logits on rank 0 or an all-gather of [B, 6] float64) and timed alone:
those collectives between N gloo processes, without the model."""
import sys
import time

import torch

import nudgefast as nf
from nudgefast.config import load_spec
from nudgefast.parallel.sharded_gate import NUM_STATS


def run(model_dir, n, new_tokens, batch, reduce_gate=True):
    engine = nf.NudgingEngine(base=model_dir, tensor_parallel_size=n)
    if n > 1:
        engine.base.model.reduce_gate = reduce_gate
    cfg = nf.NudgeConfig(mode="base_only", max_new_tokens=new_tokens, stop_token_ids=[])
    prompt = [[2] + [1000 + 7 * b + i for i in range(32)] for b in range(batch)]
    engine.generate_ids(prompt, None, nf.NudgeConfig(mode="base_only", max_new_tokens=4))
    t0 = time.perf_counter()
    outs = engine.generate_ids(prompt, None, cfg)
    dt = time.perf_counter() - t0
    engine.close()
    return [o.token_ids for o in outs], sum(len(o.token_ids) for o in outs) / dt


def _comm_rank(rank, world, port, spec, batch, steps, reduce_gate, head_only, out):
    from datetime import timedelta

    import torch.distributed as dist

    from nudgefast.parallel.tensor import Collectives

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timedelta(seconds=60))
    tp = Collectives(dist.ProcessGroupGloo(store, rank, world, timedelta(seconds=60)), rank, world, spec)
    h = torch.randn(batch, spec.hidden_size)
    logits = torch.randn(batch, -(-spec.vocab_size // world))
    inputs = torch.zeros(input_elems(batch, reduce_gate), dtype=torch.int64)
    stats = torch.zeros(batch, NUM_STATS, dtype=torch.float64)
    for i in range(steps + 5):  # 5 warm-up steps
        if i == 5:
            t0 = time.perf_counter()
        if not head_only:
            tp.pg.broadcast(inputs, 0).wait()
            for _ in range(2 * spec.num_layers + 1):
                tp.all_reduce(h)
        if reduce_gate:
            parts = [torch.empty_like(stats) for _ in range(world)]
            tp.pg.allgather([parts], [stats]).wait()
        else:
            tp.gather_logits(logits)
    if rank == 0:
        out["step_s"] = (time.perf_counter() - t0) / steps


def input_elems(batch: int, reduce_gate: bool, pages: int = 64) -> int:
    """int64 elements of a decode step's broadcast inputs (ids, positions, slots, block tables of
    `pages` columns, lengths; + seed, step, inv_temp, mode per row with the sharded gate)."""
    return batch * (3 + pages + 1) + (4 * batch if reduce_gate else 0)


def comm_cost(spec, world, batch, reduce_gate, head_only=False, steps=50) -> float:
    """Seconds per decode step of the collectives alone: what the forward adds at N ranks (head_only:
    the output head's collective alone, the one the sharded gate changes)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = torch.multiprocessing.get_context("spawn")
    with ctx.Manager() as m:
        out = m.dict()
        procs = [ctx.Process(target=_comm_rank, args=(r, world, port, spec, batch, steps, reduce_gate, head_only, out))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        return out["step_s"]


def main():
    model_dir = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    new_tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 32
    batch = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    spec = load_spec(model_dir)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, model {model_dir}, batch {batch}")
    ids1, tps1 = run(model_dir, 1, new_tokens, batch)
    idsr, tpsr = run(model_dir, n, new_tokens, batch, reduce_gate=True)
    idsg, tpsg = run(model_dir, n, new_tokens, batch, reduce_gate=False)
    ids1b, tps1b = run(model_dir, 1, new_tokens, batch)
    print(f"N=1: {tps1:.2f} then {tps1b:.2f} tokens/s; N={n} sharded gate: {tpsr:.2f}; N={n} gathered logits: "
          f"{tpsg:.2f} tokens/s; sharded / gathered {tpsr / tpsg:.2f}; same tokens: {ids1 == idsr == idsg == ids1b} "
          f"({sum(map(len, ids1))} tokens)")
    ar = (2 * spec.num_layers + 1) * batch * spec.hidden_size * 4
    per = -(-spec.vocab_size // n)
    print(f"per decode step and rank: {2 * spec.num_layers + 1} all-reduces of [{batch}, {spec.hidden_size}] fp32 "
          f"({ar} bytes); then gathered logits: {batch * per * 4} bytes sent per worker ({(n - 1) * batch * per * 4} "
          f"received by rank 0), or the sharded gate: {batch * NUM_STATS * 8} bytes sent per rank "
          f"({n * batch * NUM_STATS * 8} after the all-gather) and {4 * batch * 8} more bytes of broadcast inputs")
    for head_only in (False, True):
        for reduce_gate in (False, True):
            what = "sharded gate (all-gather of [B, 6])" if reduce_gate else "gathered logits"
            which = "the output head's collective alone" if head_only else "the step's collectives alone"
            print(f"{which} (gloo, batch {batch}), {what}: "
                  f"{1e3 * comm_cost(spec, n, batch, reduce_gate, head_only):.2f} ms per step")


if __name__ == "__main__":
    main()
