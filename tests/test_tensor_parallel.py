"""Tensor parallelism on the CPU (gloo, worker processes): a base model split N ways writes exactly
what it writes on one device, token for token (greedy and seeded sampling, base_only and nudging at
both granularities); a dead worker is a clear error, never a hang; no worker outlives its engine."""
import dataclasses
import os
import signal
import time

import pytest
import torch

import nudgefast as nf
from nudgefast.config import ConfigError, load_spec
from nudgefast.parallel.tensor import TensorParallelError, check_shardable
from pairs import CASES, PROMPTS_BASE, PROMPTS_NUDGER, sampled, threshold
from tiny_models import FAMILIES, make_tiny, train_tokenizer

MAX_NEW = 8


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


def pair_dirs(family, root, tokenizer):
    head_scale, nudger_seed, _ = CASES[family]
    return (make_tiny(family, root / "base", seed=1, tokenizer=tokenizer, head_scale=head_scale),
            make_tiny(family, root / "nudger", seed=nudger_seed, tokenizer=tokenizer, head_scale=head_scale))


def configs(family, world):
    """The cases, as batches that run together: first everything whose base candidate the sharded gate
    reduces (greedy and Gumbel rows, mixed in one batch per mode), then, at N = 2, the nucleus rows
    (top_p < 1), whose batches gather the logits instead. Speculation and the nucleus fallback run
    the same code at every N: they run at N = 2 only, which keeps the N = 4 runs (4 processes on
    a 2-core CI machine, every collective waiting for all four) to the acceptance cases."""
    tok_thr = threshold(family, "top_prob", "token")
    plain = [nf.NudgeConfig(mode="base_only", max_new_tokens=MAX_NEW),
             nf.NudgeConfig(mode="base_only", max_new_tokens=MAX_NEW, temperature=0.8, seed=7)]
    for gran in ("token", "word"):
        plain.append(nf.NudgeConfig(mode="nudging", granularity=gran, threshold=threshold(family, "top_prob", gran),
                                    max_new_tokens=MAX_NEW))
    plain.append(nf.NudgeConfig(mode="nudging", max_new_tokens=MAX_NEW, seed=11, **sampled(family)))
    if world > 2:
        return [plain]
    # speculation: the base's verify forward over the drafted tokens is sharded like any forward
    plain.append(nf.NudgeConfig(mode="nudging", granularity="token", threshold=tok_thr, max_new_tokens=MAX_NEW,
                                speculate=2))
    nucleus = [nf.NudgeConfig(mode="base_only", max_new_tokens=MAX_NEW, temperature=0.9, top_p=0.8, seed=5),
               nf.NudgeConfig(mode="nudging", granularity="token", threshold=tok_thr, max_new_tokens=MAX_NEW,
                              temperature=0.9, top_p=0.8, seed=13)]
    return [plain, nucleus]


def run_batch(engine, cfgs):
    """All rows of these configs (every prompt under every config) as one running batch, through the
    engine's request API: (token_ids, from_nudger, finish_reason) per config and prompt."""
    ids = []
    for cfg in cfgs:
        ids.append([engine.add_request(base_ids=PROMPTS_BASE[i] if cfg.mode != "nudger_only" else None,
                                       nudger_ids=PROMPTS_NUDGER[i] if cfg.mode != "base_only" else None,
                                       config=cfg, request_id=f"{len(ids)}.{i}")
                    for i in range(len(PROMPTS_BASE))])
    done = {}
    for _ in range(1000):  # bounded: each round emits at least one token per running row
        if not engine.has_unfinished():
            break
        for out in engine.step():
            if out.finished:
                c = out.completion
                done[out.request_id] = (c.token_ids, c.from_nudger, c.finish_reason)
    assert not engine.has_unfinished()
    return [[done[r] for r in row] for row in ids]


@pytest.fixture(scope="module")
def one_device(tmp_path_factory, tokenizer):
    """(family, N) -> (base dir, nudger dir, what N = 1 writes for the batches that N runs): each
    family's pair and N = 1 engine made once per test process, shared by its N = 2 and N = 4 tests
    (N = 1 runs the very same batches: rows batched differently may round differently)."""
    pairs, engines, cache = {}, {}, {}

    def get(family, world):
        if family not in pairs:
            pairs[family] = pair_dirs(family, tmp_path_factory.mktemp(family), tokenizer)
            engines[family] = nf.NudgingEngine(base=pairs[family][0], nudger=pairs[family][1], page_size=4)
        if (family, world) not in cache:
            cache[family, world] = [run_batch(engines[family], cfgs) for cfgs in configs(family, world)]
        return (*pairs[family], cache[family, world])

    yield get
    for engine in engines.values():
        engine.close()


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purposes (reaped by join)
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("family,world", [(f, n) for f in FAMILIES for n in (2, 4)])
def test_sharded_base_writes_what_one_device_writes(family, world, one_device):
    # the tiny models have 4 query heads and 2 KV heads: at N = 2 each rank keeps one KV head, at
    # N = 4 each KV head sits on two ranks
    base, nudger, want = one_device(family, world)
    with nf.NudgingEngine(base=base, nudger=nudger, page_size=4, tensor_parallel_size=world) as tp:
        model = tp.base.model
        assert tp.base.kv.k[0].shape[2] == max(1, 2 // world)  # rank 0 keeps only its KV heads
        pids = [p.pid for p in model.procs]
        assert len(pids) == world - 1 and all(alive(p) for p in pids)
        reduced = []  # decode steps whose gate took the shards' reductions instead of the gathered logits
        decode_and_gate = model.decode_and_gate

        def counted(*args):
            reduced.append(1)
            return decode_and_gate(*args)

        model.decode_and_gate = counted
        got, steps = [], []
        for cfgs in configs(family, world):
            reduced.clear()
            got.append(run_batch(tp, cfgs))
            steps.append(len(reduced))
    assert got == want
    assert steps[0] > 0 and steps[1:] in ([], [0])  # top_p < 1 rows gather the logits (the fallback)
    # both sources appear in the nudging cases (else the gate was not exercised), and the seeded
    # samples differ from the greedy answers (else sampling was not exercised)
    assert any(any(src) and not all(src) for _, src, _ in got[0][2])
    assert got[0][1] != got[0][0]
    assert not any(alive(p) for p in pids)


def test_killed_worker_is_a_clear_error(tmp_path, tokenizer):
    base = make_tiny("llama", tmp_path / "base", seed=1, tokenizer=tokenizer)
    engine = nf.NudgingEngine(base=base, page_size=4, tensor_parallel_size=2)
    cfg = nf.NudgeConfig(mode="base_only", max_new_tokens=4)
    first = engine.generate_ids(PROMPTS_BASE[:1], None, cfg)
    assert len(first[0].token_ids) == 4
    pid = engine.base.model.procs[0].pid
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(TensorParallelError, match="worker 1"):
        engine.generate_ids(PROMPTS_BASE[:1], None, cfg)
    assert time.monotonic() - t0 < 30
    with pytest.raises(TensorParallelError, match="closed"):  # stays failed, fast
        engine.base.model.forward(torch.zeros(1, dtype=torch.long), None, None, None)
    engine.close()
    assert not alive(pid)


def test_worker_killed_inside_a_forward_is_a_clear_error(tmp_path, tokenizer):
    # the worker dies after rank 0 checked it: the collective itself must fail, not hang
    base = make_tiny("llama", tmp_path / "base", seed=1, tokenizer=tokenizer)
    engine = nf.NudgingEngine(base=base, page_size=4, tensor_parallel_size=2)
    model = engine.base.model
    model._dead = lambda: None  # hide the exit code: only the collective can notice
    os.kill(model.procs[0].pid, signal.SIGKILL)
    model.procs[0].join()
    t0 = time.monotonic()
    with pytest.raises(TensorParallelError, match="collective failed"):
        engine.generate_ids(PROMPTS_BASE[:1], None, nf.NudgeConfig(mode="base_only", max_new_tokens=3))
    assert time.monotonic() - t0 < 30
    engine.close()


def test_unshardable_shapes_are_refused(tmp_path, tokenizer):
    base = make_tiny("llama", tmp_path / "base", seed=1, tokenizer=tokenizer)
    spec = load_spec(base)
    with pytest.raises(ConfigError, match="num_heads=4 is not divisible by tensor_parallel_size=3"):
        check_shardable(spec, 3)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        nf.NudgingEngine(base=base, tensor_parallel_size=0)
    odd = dataclasses.replace(spec, num_heads=6, num_kv_heads=3, intermediate_size=97)
    with pytest.raises(ConfigError, match="num_kv_heads=3 neither divides nor is divisible by "
                                          "tensor_parallel_size=2; intermediate_size=97"):
        check_shardable(odd, 2)


def test_cli_tensor_parallel_size(tmp_path, tokenizer, capsys):
    import json

    from nudgefast.cli import main

    base = make_tiny("qwen2", tmp_path / "base", seed=1, tokenizer=tokenizer, head_scale=7.5)
    argv = ["generate", "--base", str(base), "--mode", "base_only", "--prompt", "Bake bread?", "--max-new-tokens",
            "6", "--json"]
    outs = []
    for n in ("1", "2"):
        capsys.readouterr()
        assert main(argv + ["--tensor-parallel-size", n]) == 0
        outs.append(json.loads(capsys.readouterr().out.splitlines()[0])["token_ids"])
    assert outs[1] == outs[0] and len(outs[0]) == 6
    assert main(argv + ["--tensor-parallel-size", "0"]) == 2
    assert "--tensor-parallel-size must be >= 1" in capsys.readouterr().err


TORCHRUN_SCRIPT = """
import json, sys
import nudgefast as nf
from nudgefast.parallel.tensor import launched_by_torchrun
assert launched_by_torchrun()
engine = nf.NudgingEngine(base=sys.argv[1], page_size=4, tensor_parallel_size=2)  # ranks > 0 serve, then exit
outs = engine.generate_ids(json.loads(sys.argv[2]), None, nf.NudgeConfig(mode="base_only", max_new_tokens=6))
engine.close()
print("TOKENS", json.dumps([o.token_ids for o in outs]))
"""


def test_torchrun_initialises_from_the_environment(tmp_path, tokenizer):
    import json
    import subprocess
    import sys

    base = make_tiny("llama", tmp_path / "base", seed=1, tokenizer=tokenizer)
    with nf.NudgingEngine(base=base, page_size=4) as one:
        want = [o.token_ids for o in one.generate_ids(PROMPTS_BASE, None,
                                                      nf.NudgeConfig(mode="base_only", max_new_tokens=6))]
    script = tmp_path / "run.py"
    script.write_text(TORCHRUN_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), str(base), json.dumps(PROMPTS_BASE)], capture_output=True, text=True,
                          timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("TOKENS")]
    assert len(lines) == 1  # rank 1 never got past the constructor
    assert json.loads(lines[0][len("TOKENS "):]) == want


@pytest.mark.parametrize("family,world", [("llama", 2), ("qwen2", 4), ("gemma3", 4), ("olmo", 2), ("olmo2", 4)])
def test_each_rank_reads_only_its_shard(family, world, tmp_path, tokenizer):
    # read_shard (slices from the safetensors files) equals sharding the whole fused state dict
    from nudgefast.loader import fused_state_dict, read_tensors
    from nudgefast.parallel.tensor import read_shard, shard_weights

    model_dir = make_tiny(family, tmp_path / "m", seed=3, tokenizer=tokenizer)
    spec = load_spec(model_dir)
    for rank in range(world):
        want = shard_weights(spec, fused_state_dict(spec, read_tensors(model_dir), torch.float32), rank, world)
        got = read_shard(model_dir, spec, rank, world, torch.float32)
        assert sorted(got) == sorted(want)
        for k in want:
            assert torch.equal(got[k], want[k]), (rank, k)


ORPHAN_SCRIPT = """
import os, signal, sys
import nudgefast as nf
if __name__ == "__main__":
    engine = nf.NudgingEngine(base=sys.argv[1], page_size=4, tensor_parallel_size=2)
    engine.generate_ids([[5, 6, 7]], None, nf.NudgeConfig(mode="base_only", max_new_tokens=2))
    print("PIDS", *[p.pid for p in engine.base.model.procs], flush=True)
    os.kill(os.getpid(), signal.SIGKILL if sys.argv[2] == "kill" else signal.SIGTERM)
"""

UNGUARDED_SCRIPT = """
import sys
import nudgefast as nf
nf.NudgingEngine(base=sys.argv[1], page_size=4, tensor_parallel_size=2)
"""


def test_unguarded_script_fails_fast_with_a_hint(tmp_path, tokenizer):
    import subprocess
    import sys

    base = make_tiny("llama", tmp_path / "base", seed=1, tokenizer=tokenizer)
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED_SCRIPT)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(script), str(base)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "if __name__ == '__main__':" in proc.stderr and "TensorParallelError" in proc.stderr
    assert time.monotonic() - t0 < 50  # not the 60 s start-up timeout


@pytest.mark.parametrize("how", ["kill", "term"])
def test_workers_end_when_the_engine_process_dies(how, tmp_path, tokenizer):
    # the engine's process is killed without closing anything: its workers see the pipe close and exit
    import subprocess
    import sys

    base = make_tiny("llama", tmp_path / "base", seed=1, tokenizer=tokenizer)
    script = tmp_path / "orphan.py"
    script.write_text(ORPHAN_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(base), how], capture_output=True, text=True, timeout=120)
    pids = [int(p) for ln in proc.stdout.splitlines() if ln.startswith("PIDS") for p in ln.split()[1:]]
    assert len(pids) == 1, proc.stderr[-2000:]
    deadline = time.monotonic() + 20
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids)
