"""Tensor parallelism for the base model on torch.distributed (gloo on the CPU, NCCL on CUDA).

Rank 0 is the engine's process: `ShardedModel` stands in for a `Transformer` there (same forward,
same spec, plus `kv_spec`, this rank's shard of the KV heads, which sizes its KV pool), so the
engine, the runner and the kernels run unchanged. Ranks 1..N-1 are worker processes started here
(torch.multiprocessing, spawn). Every base forward on rank 0 is mirrored on the workers: rank 0
sends the forward's shapes down a pipe (host ints only) and broadcasts its inputs (ids, positions,
slot mapping, block tables, sequence lengths, query offsets, logits rows) as one int64 tensor; then
every rank runs its shard of the same forward, meeting at the collectives inside it:

  embedding     vocabulary-parallel rows, masked lookup, all-reduce
  attention     heads split across ranks (column-parallel qkv), each rank keeps the KV pages of
                its own KV heads; a KV head is replicated on N / Hkv ranks when Hkv < N;
                row-parallel o, one all-reduce
  MLP           column-parallel gate_up, row-parallel down, one all-reduce
  output head   vocabulary-parallel rows; then either a gather of the [rows, V / N] logits onto
                rank 0 (prefill, speculative verify, a batch with nucleus rows), or, in a plain
                decode step, the gate's reduction of each shard (sharded_gate.py): one all-gather
                of [rows, 6] numbers, from which rank 0 takes each row's base candidate and gate
                statistics and runs the rule, the ending and the splice (`decode_and_gate`).

The pipe is also the workers' lifeline: when the engine closes (or its process dies) the pipe
closes and the worker exits. A worker that dies makes rank 0 raise TensorParallelError: before a
forward (its exit code is seen), or inside one (gloo reports the closed connection, or the
collective times out after `timeout` seconds), never a hang.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import time
import traceback
import weakref
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..config import ConfigError, ModelSpec, load_spec
from ..kv_cache import AttentionMetadata, KVPool
from ..kernels.nudge_gate import MODE_BASE_ONLY, GateParams, GateState, ModelCursor
from ..kernels.rng import STREAM_BASE
from ..kernels.sample import SAMPLE_NUCLEUS
from .sharded_gate import Scratch, effective_mode, nudge_step_from_candidates, shard_bounds, sharded_candidates

DEFAULT_TIMEOUT = 60.0  # seconds a collective may wait for a peer before the forward fails


class TensorParallelError(RuntimeError):
    """A tensor-parallel worker died or a collective failed: the sharded model cannot continue."""


# ----------------------------------------------------------------------------- sharding


def check_shardable(spec: ModelSpec, world: int) -> None:
    """Clear errors for the shapes this Megatron split cannot take."""
    if type(world) is not int or world < 1:
        raise ValueError(f"tensor_parallel_size must be an int >= 1, got {world!r}")
    H, Hkv = spec.num_heads, spec.num_kv_heads
    problems = []
    if H % world:
        problems.append(f"num_heads={H} is not divisible by tensor_parallel_size={world}")
    elif Hkv % world and world % Hkv:
        problems.append(f"num_kv_heads={Hkv} neither divides nor is divisible by tensor_parallel_size={world}")
    if spec.intermediate_size % world:
        problems.append(f"intermediate_size={spec.intermediate_size} is not divisible by {world}")
    if problems:
        raise ConfigError(f"{spec.family} model cannot be split {world} ways: " + "; ".join(problems))


def local_spec(spec: ModelSpec, world: int) -> ModelSpec:
    return dataclasses.replace(spec, num_heads=spec.num_heads // world, num_kv_heads=max(1, spec.num_kv_heads // world),
                               intermediate_size=spec.intermediate_size // world)


def kv_heads_of(spec: ModelSpec, rank: int, world: int) -> range:
    """The KV heads rank `rank` keeps: a block of Hkv / N, or the one its query heads share (Hkv < N)."""
    Hkv = spec.num_kv_heads
    if Hkv >= world:
        per = Hkv // world
        return range(rank * per, (rank + 1) * per)
    return range(rank * Hkv // world, rank * Hkv // world + 1)


def shard_weights(spec: ModelSpec, w: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """This rank's shard of a fused_state_dict (the full dict is consumed as it goes)."""
    D, H, I = spec.head_dim, spec.num_heads, spec.intermediate_size
    hq = H // world
    kv = kv_heads_of(spec, rank, world)
    q_rows = slice(rank * hq * D, (rank + 1) * hq * D)
    k_rows = slice(spec.q_size + kv.start * D, spec.q_size + kv.stop * D)
    v_rows = slice(spec.q_size + spec.kv_size + kv.start * D, spec.q_size + spec.kv_size + kv.stop * D)
    i_per = I // world
    gate_rows, up_rows = slice(rank * i_per, (rank + 1) * i_per), slice(I + rank * i_per, I + (rank + 1) * i_per)
    lo, hi = shard_bounds(spec.vocab_size, world)[rank]
    per = -(-spec.vocab_size // world)

    def vocab_rows(t):
        out = torch.zeros(per, t.shape[1], dtype=t.dtype)  # the last shard is padded with zero rows
        out[: hi - lo] = t[lo:hi]
        return out

    out = {}
    for name in list(w):
        t = w.pop(name)
        kind = name.rsplit(".", 1)[-1]
        if kind in ("qkv", "qkv_bias"):
            t = torch.cat([t[q_rows], t[k_rows], t[v_rows]])
        elif kind == "o":
            t = t[:, q_rows]
        elif kind == "o_bias" or kind == "down_bias":
            if rank:  # a row-parallel bias is added once, before the all-reduce: on rank 0 only
                t = torch.zeros_like(t)
        elif kind in ("gate_up", "gate_up_bias"):
            t = torch.cat([t[gate_rows], t[up_rows]])
        elif kind == "down":
            t = t[:, gate_rows]
        elif name in ("embed", "lm_head"):
            t = vocab_rows(t)
        elif kind == "q_norm" and spec.qk_norm == "full":  # OLMo-2: one weight per projection column
            t = t[q_rows]
        elif kind == "k_norm" and spec.qk_norm == "full":
            t = t[kv.start * D: kv.stop * D]
        out[name] = t.contiguous()
    return out


class Collectives:
    """The hooks Transformer.forward calls when its `tp` is set (model.py)."""

    def __init__(self, pg, rank: int, world: int, spec: ModelSpec):
        vocab = spec.vocab_size
        self.pg, self.rank, self.world, self.vocab = pg, rank, world, vocab
        self.lo, self.hi = shard_bounds(vocab, world)[rank]
        self.per = -(-vocab // world)
        # OLMo-2's q/k norms average over the whole projection: the widths of the whole q and k, and
        # whether this rank's k columns count (a KV head replicated on N / Hkv ranks counts once)
        self.q_width, self.k_width = spec.q_size, spec.kv_size
        self.k_counts = spec.num_kv_heads >= world or rank % (world // spec.num_kv_heads) == 0
        # (seed, step, inv_temp, mode, with_stats) of the rows of the next output head: set for a decode
        # step whose gate reduces the vocabulary shards instead of gathering them (see `output`)
        self.gate_rows: tuple | None = None
        self.scratch = Scratch()  # the reduction's [rows, V / N] buffers, kept across decode steps

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        self.pg.allreduce([x]).wait()
        return x

    def full_qk_norm(self, q: torch.Tensor, k: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """RMS norms of q and k over the whole projection, from this rank's columns: the sums of
        squares of every rank's columns in one all-reduce of [T, 2], then each rank scales its own."""
        qf, kf = q.float(), k.float()
        ss = torch.stack([qf.square().sum(-1), kf.square().sum(-1) * float(self.k_counts)], dim=1)
        ss = self.all_reduce(ss)
        q = (qf * torch.rsqrt(ss[:, :1] / self.q_width + eps)).to(q.dtype) * wq
        k = (kf * torch.rsqrt(ss[:, 1:] / self.k_width + eps)).to(k.dtype) * wk
        return q, k

    def embed(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        mine = (ids >= self.lo) & (ids < self.hi)
        h = F.embedding((ids - self.lo).clamp(0, self.per - 1), table)
        # other ranks' rows are exact zeros here, so the all-reduce gives each row its value exactly
        return self.all_reduce(h * mine.unsqueeze(1).to(h.dtype))

    def output(self, x: torch.Tensor):
        """The output head's last step on this rank's [rows, V / N] logits: the whole logits on rank 0
        (`gather_logits`), or, when `gate_rows` is set, the gate's numbers of the whole vocabulary on
        every rank, (p_top, entropy, greedy, gumbel) [rows] each, from one all-gather of [rows, 6]."""
        if self.gate_rows is None:
            return self.gather_logits(x)
        (seed, step, inv_temp, mode, with_stats), self.gate_rows = self.gate_rows, None
        # the last shard's padding columns (zero rows of the head) are no tokens
        return sharded_candidates(x[:, : self.hi - self.lo], self.lo, seed, step, STREAM_BASE, inv_temp, mode,
                                  self.pg, self.scratch, with_stats)

    def gather_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0 gets the whole [rows, V] logits (the gate runs there); a worker only sends its
        shard and gets it back (its forward's result is never read)."""
        x = x.contiguous()
        opts = dist.GatherOptions()
        opts.rootRank = 0
        if self.rank:
            self.pg.gather([], [x], opts).wait()
            return x
        parts = [torch.empty_like(x) for _ in range(self.world)]
        self.pg.gather([parts], [x], opts).wait()
        return torch.cat(parts, dim=-1)[:, : self.vocab]


def _process_group(store, rank: int, world: int, device: torch.device, timeout: float):
    # A process group object of our own (not the default group): several engines can live in one
    # process, and a user's own torch.distributed set-up is left alone.
    if device.type == "cuda":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timedelta(seconds=timeout)
        return dist.ProcessGroupNCCL(store, rank, world, opts)
    return dist.ProcessGroupGloo(store, rank, world, timedelta(seconds=timeout))


def read_shard(model_dir: str | Path, spec: ModelSpec, rank: int, world: int, dtype: torch.dtype):
    """This rank's shard as fused_state_dict gives it, reading only the shard's slices from the
    safetensors files (safe_open(...).get_slice): no rank ever holds the whole model.
    Equal to shard_weights(spec, fused_state_dict(spec, whole checkpoint), rank, world)."""
    from safetensors import safe_open

    from ..loader import _strip_prefix, checkpoint_files, fused_state_dict

    D, I = spec.head_dim, spec.intermediate_size
    hq, i_per = spec.num_heads // world, I // world
    kv = kv_heads_of(spec, rank, world)
    lo, hi = shard_bounds(spec.vocab_size, world)[rank]
    per = -(-spec.vocab_size // world)
    rows = {"q_proj": (rank * hq * D, (rank + 1) * hq * D), "k_proj": (kv.start * D, kv.stop * D),
            "v_proj": (kv.start * D, kv.stop * D), "gate_proj": (rank * i_per, (rank + 1) * i_per),
            "up_proj": (rank * i_per, (rank + 1) * i_per)}
    cols = {"o_proj": rows["q_proj"], "down_proj": rows["gate_proj"]}
    if spec.qk_norm == "full":  # OLMo-2's q/k norms weigh each projection column: sliced like q and k
        rows.update(q_norm=rows["q_proj"], k_norm=rows["k_proj"])
    raw = {}
    for path in checkpoint_files(Path(model_dir)):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    parts = _strip_prefix(name).split(".")
                    proj, kind = (parts[-2], parts[-1]) if len(parts) >= 2 else ("", "")
                    sl = f.get_slice(name)
                    if proj in rows:
                        a, b = rows[proj]
                        t = sl[a:b]
                    elif proj in cols and kind == "weight":
                        a, b = cols[proj]
                        t = sl[:, a:b]
                    elif proj in cols:  # a row-parallel bias: added once, on rank 0
                        t = sl[:] if rank == 0 else torch.zeros_like(sl[:])
                    elif proj in ("embed_tokens", "lm_head"):
                        mine = sl[lo:hi]
                        t = torch.zeros(per, mine.shape[1], dtype=mine.dtype)  # the last shard is padded
                        t[: hi - lo] = mine
                    else:
                        t = f.get_tensor(name)
                    raw[name] = t
        except ConfigError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ConfigError(f"cannot read {path}: {e}") from None
    return fused_state_dict(dataclasses.replace(local_spec(spec, world), vocab_size=per), raw, dtype)


def _build(model_dir: str, rank: int, world: int, device: torch.device, dtype: torch.dtype, backend_kind: str, pg):
    from ..model import Transformer
    from ..ops import Backend

    spec = load_spec(model_dir)
    w = read_shard(model_dir, spec, rank, world, dtype)
    # for_device loads the native ops library where rank 0 uses it (a fresh process has not yet)
    backend = Backend("triton") if backend_kind == "triton" else Backend.for_device(device, backend_kind == "native")
    model = Transformer(local_spec(spec, world), w, device, dtype, backend)
    model.tp = Collectives(pg, rank, world, spec)
    return spec, model


# ----------------------------------------------------------------------------- the forward's inputs

HEADER = ("T", "B", "max_pages", "has_cu", "max_q_len", "n_logits", "num_pages", "page_size", "gate")


def _pack(input_ids, positions, meta: AttentionMetadata, logits_indices, gate_rows=None):
    parts = [input_ids, positions, meta.slot_mapping, meta.block_tables.reshape(-1), meta.seq_lens]
    if meta.cu_q_lens is not None:
        parts.append(meta.cu_q_lens)
    if logits_indices is not None:
        parts.append(logits_indices)
    if gate_rows is not None:  # seed, step, inv_temp (its float32 bits, exact), mode; with_stats is the header's
        seed, step, inv_temp, mode, _ = gate_rows
        parts += [seed, step, inv_temp.float().contiguous().view(torch.int32), mode]
    return torch.cat([p.reshape(-1).to(torch.int64) for p in parts])


def _gate_rows_of(h: dict) -> int:
    """How many rows the header's gate numbers cover (0: the logits are gathered instead)."""
    if not h["gate"]:
        return 0
    return h["n_logits"] if h["n_logits"] >= 0 else h["T"]


def _unpack(buf: torch.Tensor, h: dict):
    T, B, P = h["T"], h["B"], h["max_pages"]
    R = _gate_rows_of(h)
    sizes = ([T, T, T, B * P, B] + ([B + 1] if h["has_cu"] else []) + ([h["n_logits"]] if h["n_logits"] >= 0 else [])
             + [R] * (4 if R else 0))
    parts = list(buf.split(sizes))
    ids, pos, slot, bt, sl = parts[:5]
    rest = parts[5:]
    cu = rest.pop(0).to(torch.int32) if h["has_cu"] else None
    li = rest.pop(0) if h["n_logits"] >= 0 else None
    gate_rows = None
    if R:
        seed, step, bits, mode = rest
        gate_rows = (seed, step, bits.to(torch.int32).view(torch.float32), mode.to(torch.int32), h["gate"] == 2)
    meta = AttentionMetadata(slot_mapping=slot, block_tables=bt.reshape(B, P).to(torch.int32),
                             seq_lens=sl.to(torch.int32), cu_q_lens=cu, max_q_len=h["max_q_len"])
    return ids, pos, meta, li, gate_rows


# ----------------------------------------------------------------------------- workers


class _PipeChannel:
    """Spawned workers: the forward's header comes down a host pipe, which also tells the worker
    when the engine is gone (EOF)."""

    def __init__(self, conn):
        self.conn = conn

    def recv(self):
        try:
            return self.conn.recv()
        except (EOFError, OSError):  # the engine closed or died: nothing more will come
            return None


class _CollectiveChannel:
    """torchrun: the header is broadcast over a gloo group of its own with a long timeout (an idle
    engine leaves the workers waiting here), apart from the forward's collectives, which time out."""

    def __init__(self, group):
        self.group = group

    def send(self, header) -> None:
        t = torch.tensor([0] * (len(HEADER) + 1) if header is None else [1, *header], dtype=torch.int64)
        dist.broadcast(t, 0, group=self.group)

    def recv(self):
        t = torch.empty(len(HEADER) + 1, dtype=torch.int64)
        dist.broadcast(t, 0, group=self.group)
        return None if int(t[0]) == 0 else tuple(t[1:].tolist())


def _serve(model, pg, channel, device, dtype) -> None:
    """A worker's loop: one mirrored forward per header, until the channel says stop."""
    kv = None
    while True:
        msg = channel.recv()
        if msg is None:
            return
        h = dict(zip(HEADER, msg))
        n = (3 * h["T"] + h["B"] * h["max_pages"] + h["B"] + (h["B"] + 1 if h["has_cu"] else 0) + max(h["n_logits"], 0)
             + 4 * _gate_rows_of(h))
        buf = torch.empty(n, dtype=torch.int64, device=device)
        try:
            pg.broadcast(buf, 0).wait()
            if kv is None or (kv.num_pages, kv.page_size) != (h["num_pages"], h["page_size"]):
                kv = KVPool(model.spec, h["num_pages"], h["page_size"], dtype, device)
            ids, pos, meta, li, model.tp.gate_rows = _unpack(buf, h)
            model.forward(ids, pos, meta, kv, logits_indices=li)
        except Exception:  # a peer died or timed out: rank 0 reports it; this rank just ends
            return


def _worker(rank, world, port, model_dir, device, dtype, backend_kind, conn, timeout):
    conn.send(("started", None))  # the spawn bootstrap (re-importing the main module) went through
    try:
        device = torch.device(device)
        if device.type == "cuda":
            torch.cuda.set_device(rank)
            device = torch.device("cuda", rank)
        torch.set_num_threads(max(1, torch.get_num_threads() // world))
        store = dist.TCPStore("127.0.0.1", port, world, False, timedelta(seconds=timeout))
        pg = _process_group(store, rank, world, device, timeout)
        spec, model = _build(model_dir, rank, world, device, dtype, backend_kind, pg)
        conn.send(("ready", None))
    except BaseException:  # report why to rank 0, which raises it
        conn.send(("error", traceback.format_exc()))
        return
    _serve(model, pg, _PipeChannel(conn), device, dtype)
    # nothing of this process outlives it (no files, no output): skip the interpreter's teardown of
    # torch and gloo, which takes seconds on a loaded machine while the engine waits in close()
    os._exit(0)


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shutdown(procs, conns, pg_holder, control) -> None:
    torchrun = bool(control)
    for ch in control:  # torchrun: tell the other ranks to stop serving
        try:
            ch.send(None)
        except (OSError, RuntimeError, ValueError):
            pass
    control.clear()
    if torchrun and dist.is_initialized():
        # tear the groups down now, as the other ranks do: left to interpreter exit, gloo's threads
        # can be destroyed while still joinable (std::terminate) on a loaded machine
        try:
            dist.destroy_process_group()
        except (RuntimeError, ValueError):
            pass
    for c in conns:
        try:
            c.send(None)
        except (OSError, ValueError):
            pass
        c.close()
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.terminate()
            p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join()
    pg_holder.clear()


class ShardedModel:
    """Rank 0's shard of a base model split `world` ways; stands in for a Transformer in the engine."""

    def __init__(self, model_dir: str | Path, device: torch.device, dtype: torch.dtype | None, backend, world: int,
                 timeout: float = DEFAULT_TIMEOUT):
        from ..model import default_dtype

        model_dir = str(Path(model_dir))
        self.spec = load_spec(model_dir)
        check_shardable(self.spec, world)
        if backend.kind == "triton" and device.type != "cuda":
            raise ConfigError("tensor parallelism: the triton backend needs a CUDA device")
        self.world, self.timeout = world, timeout
        self.device = torch.device("cuda", 0) if device.type == "cuda" and device.index is None else device
        self.dtype = dtype or default_dtype(self.spec, device)
        self.kv_spec = local_spec(self.spec, world)
        self.reduce_gate = True  # plain decode steps reduce the vocabulary shards (False: gather the logits)
        self.broken: str | None = None
        self.procs, self.conns = [], []
        self._pg, self._control = [], []  # held in lists so the finalizer can drop them
        self._finalizer = weakref.finalize(self, _shutdown, self.procs, self.conns, self._pg, self._control)
        self.backend = backend
        if launched_by_torchrun():
            self._from_environment(model_dir, device, backend, world, timeout)
            return
        port = _free_port()
        ctx = torch.multiprocessing.get_context("spawn")
        for r in range(1, world):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(r, world, port, model_dir, str(device), self.dtype, backend.kind,
                                                  child, timeout), daemon=True, name=f"nudgefast-tp{r}")
            p.start()
            child.close()
            self.procs.append(p)
            self.conns.append(parent)
        try:
            for r, (p, c) in enumerate(zip(self.procs, self.conns), 1):
                self._await(r, p, c, "started", timeout)
            store = dist.TCPStore("127.0.0.1", port, world, True, timedelta(seconds=timeout))
            pg = _process_group(store, 0, world, self.device, timeout)
            self._pg.append(pg)
            self._store = store
            self.spec, self.model = _build(model_dir, 0, world, self.device, self.dtype, backend.kind, pg)
            for r, (p, c) in enumerate(zip(self.procs, self.conns), 1):
                status, detail = self._await(r, p, c, "ready", timeout)
                if status != "ready":
                    raise TensorParallelError(f"tensor-parallel worker {r} failed to load {model_dir}:\n{detail}")
        except BaseException as e:
            self.close()
            if isinstance(e, TensorParallelError):
                raise
            raise TensorParallelError(f"tensor-parallel start-up failed: {self._dead() or e}") from e

    @staticmethod
    def _await(r, p, c, what, timeout):
        """The worker's next start-up message, failing fast (not after `timeout`) if it exits first."""
        deadline = time.monotonic() + timeout
        while not c.poll(0.1):
            if p.exitcode is not None:
                hint = ("; a script that creates the engine at import time needs `if __name__ == '__main__':` "
                        "(workers are spawned: they re-import the main module)") if what == "started" else ""
                raise TensorParallelError(f"tensor-parallel worker {r} (pid {p.pid}) exited with code {p.exitcode} "
                                          f"during start-up{hint}")
            if time.monotonic() > deadline:
                raise TensorParallelError(f"tensor-parallel worker {r} sent no '{what}' within {timeout:.0f} s")
        return c.recv()

    def _from_environment(self, model_dir, device, backend, world, timeout) -> None:
        """Under torchrun every rank runs the user's script: rank 0 goes on as the engine, the
        others serve the mirrored forwards here and end their process when rank 0 closes."""
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if size != world:
            raise ConfigError(f"torchrun started {size} processes but tensor_parallel_size={world}")
        if device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout))
        pg = dist.group.WORLD
        control = _CollectiveChannel(dist.new_group(backend="gloo", timeout=timedelta(days=30)))
        self.spec, self.model = _build(model_dir, rank, world, self.device, self.dtype, backend.kind, pg)
        if rank == 0:
            self._pg.append(pg)
            self._control.append(control)
            return
        _serve(self.model, pg, control, self.device, self.dtype)
        dist.destroy_process_group()
        raise SystemExit(0)

    def _dead(self) -> str | None:
        for r, p in enumerate(self.procs, 1):
            if p.exitcode is not None:
                return f"tensor-parallel worker {r} (pid {p.pid}) exited with code {p.exitcode}"
        return None

    def _dead_soon(self, wait: float = 2.0) -> str | None:
        """After a failed collective: a worker that just died may not be reaped yet; name it if so."""
        deadline = time.monotonic() + wait
        while True:
            dead = self._dead()
            if dead or time.monotonic() > deadline or not self.procs:
                return dead
            time.sleep(0.05)

    def _fail(self, why: str):
        self.broken = why
        self.close()
        raise TensorParallelError(why + "; the sharded base model is closed (make a new engine)")

    def forward(self, input_ids, positions, meta: AttentionMetadata, kv: KVPool,
                logits_indices: torch.Tensor | None = None, gate_rows: tuple | None = None):
        """A Transformer's forward, mirrored on every rank: the whole logits on rank 0; or, with
        gate_rows = (seed int64, step, inv_temp float32, mode) of each logits row and with_stats, the
        base's (p_top, entropy, greedy, gumbel) of each row, reduced shard by shard (sharded_gate.py;
        without stats p_top and entropy are not computed)."""
        if self.broken:
            raise TensorParallelError(self.broken + "; the sharded base model is closed (make a new engine)")
        dead = self._dead()
        if dead:
            self._fail(dead)
        T, B = input_ids.shape[0], meta.block_tables.shape[0]
        header = (T, B, meta.block_tables.shape[1], int(meta.cu_q_lens is not None), int(meta.max_q_len),
                  -1 if logits_indices is None else int(logits_indices.shape[0]), kv.num_pages, kv.page_size,
                  0 if gate_rows is None else 1 + bool(gate_rows[4]))  # 0: gather; 1: candidates; 2: + stats
        try:
            for c in self.conns:
                c.send(header)
            for ch in self._control:
                ch.send(header)
            self._pg[0].broadcast(_pack(input_ids, positions, meta, logits_indices, gate_rows), 0).wait()
            self.model.tp.gate_rows = gate_rows
            return self.model.forward(input_ids, positions, meta, kv, logits_indices=logits_indices)
        except (OSError, RuntimeError) as e:
            self._fail(f"{self._dead_soon() or 'a tensor-parallel collective failed'} ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''})")

    # ---- what the bench reads of a model (the weight bytes of a forward): rank 0's shard

    @property
    def layers(self) -> list:
        return self.model.layers

    @property
    def lm_head(self) -> torch.Tensor:
        return self.model.lm_head

    @property
    def final_norm(self) -> torch.Tensor | None:
        return self.model.final_norm

    # ---- the decode step's gate over the sharded vocabulary (the runner's seam: runner/steps.py)

    def reduces_gate(self, state: GateState, params: GateParams) -> bool:
        """Whether a plain decode step of these rows can take the base's candidates from the shards'
        reductions (`decode_and_gate`): yes unless a row samples from a nucleus (top_p < 1), whose
        cutoff needs the whole distribution (those batches gather the logits), or `reduce_gate` was
        turned off (scripts/bench_tp.py compares both). One host read of the rows' modes when the
        batch samples at all: once per round, where the runner asks."""
        if not self.reduce_gate:
            return False
        if params.max_sample < SAMPLE_NUCLEUS:
            return True
        return not bool((effective_mode(state, params) == SAMPLE_NUCLEUS).any())

    def decode_and_gate(self, cursor: ModelCursor, kv: KVPool, nudger_logits: torch.Tensor | None,
                        state: GateState, params: GateParams, nudger: ModelCursor | None, sample) -> None:
        """One decode step of the base at `cursor` and the gate step, in place, without gathering
        the base's logits: every rank reduces its vocabulary shard to 6 numbers per row, one
        all-gather of [B, 6], and rank 0 runs the rule, the ending and the splice on the combined
        candidates (nudge_step_from_candidates; same tokens as the gate on the whole logits)."""
        meta = AttentionMetadata(slot_mapping=cursor.slot_mapping, block_tables=cursor.block_tables,
                                 seq_lens=cursor.seq_lens, cu_q_lens=None)
        # base_only rows read no gate statistics: the shards skip them, as the fused gate kernels do
        gate_rows = (state.seed, state.n_out, state.inv_temp, effective_mode(state, params),
                     params.mode != MODE_BASE_ONLY)
        candidates = self.forward(cursor.input_ids, cursor.positions, meta, kv, gate_rows=gate_rows)
        nudge_step_from_candidates(candidates, nudger_logits, state, params, cursor, nudger, sample)

    def close(self) -> None:
        """Stop the workers (idempotent); called by NudgingEngine.close and at interpreter exit."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive
