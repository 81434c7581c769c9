"""Tokens/s of the base model at tensor_parallel_size 1 and N on this machine (base_only, greedy),
with the outputs checked equal token for token. Usage:
    .venv/bin/python scripts/bench_tp.py MODEL_DIR [N=2] [NEW_TOKENS=32]
Each size runs in its own engine; the first generate warms up, the second is timed. The per-step
communication is reported from the model's shapes (per forward and rank, 2 all-reduces of [T, hidden]
per layer + 1 for the embedding, and a gather of [rows, ceil(V / N)] logits on rank 0) and timed
alone: those collectives at batch 1 between N processes, without the model."""
import sys
import time

import torch

import nudgefast as nf
from nudgefast.config import load_spec


def run(model_dir, n, new_tokens):
    engine = nf.NudgingEngine(base=model_dir, tensor_parallel_size=n)
    cfg = nf.NudgeConfig(mode="base_only", max_new_tokens=new_tokens, stop_token_ids=[])
    prompt = [[2] + list(range(1000, 1032))]
    engine.generate_ids(prompt, None, nf.NudgeConfig(mode="base_only", max_new_tokens=4))
    t0 = time.perf_counter()
    out = engine.generate_ids(prompt, None, cfg)[0]
    dt = time.perf_counter() - t0
    engine.close()
    return out.token_ids, len(out.token_ids) / dt


def _comm_rank(rank, world, port, spec, steps, out):
    from datetime import timedelta

    import torch.distributed as dist

    from nudgefast.parallel.tensor import Collectives

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timedelta(seconds=60))
    tp = Collectives(dist.ProcessGroupGloo(store, rank, world, timedelta(seconds=60)), rank, world, spec.vocab_size)
    h = torch.randn(1, spec.hidden_size)
    logits = torch.randn(1, -(-spec.vocab_size // world))
    for i in range(steps + 5):  # 5 warm-up steps
        if i == 5:
            t0 = time.perf_counter()
        for _ in range(2 * spec.num_layers + 1):
            tp.all_reduce(h)
        tp.gather_logits(logits)
    if rank == 0:
        out["step_s"] = (time.perf_counter() - t0) / steps


def comm_cost(spec, world, steps=50) -> float:
    """Seconds per decode step (batch 1) of the collectives alone: what the forward adds at N ranks."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = torch.multiprocessing.get_context("spawn")
    with ctx.Manager() as m:
        out = m.dict()
        procs = [ctx.Process(target=_comm_rank, args=(r, world, port, spec, steps, out)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        return out["step_s"]


def main():
    model_dir = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    new_tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 32
    spec = load_spec(model_dir)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, model {model_dir}")
    # N = 1 before and after N = n: a machine whose load changes shows up as two different N = 1 figures
    ids1, tps1 = run(model_dir, 1, new_tokens)
    idsn, tpsn = run(model_dir, n, new_tokens)
    ids1b, tps1b = run(model_dir, 1, new_tokens)
    elems = (2 * spec.num_layers + 1) * spec.hidden_size
    print(f"N=1: {tps1:.2f} then {tps1b:.2f} tokens/s; N={n}: {tpsn:.2f} tokens/s; "
          f"ratio {tpsn / ((tps1 + tps1b) / 2):.2f}; same tokens: {ids1 == idsn == ids1b} ({len(ids1)} tokens)")
    print(f"per decode step and rank: {2 * spec.num_layers + 1} all-reduces of {spec.hidden_size} floats "
          f"({elems * 4} bytes fp32) + a gather of {-(-spec.vocab_size // n)} logits on rank 0 "
          f"({-(-spec.vocab_size // n) * 4} bytes fp32 per rank)")
    print(f"those collectives alone (gloo, batch 1): {1e3 * comm_cost(spec, n):.2f} ms per step")


if __name__ == "__main__":
    main()
