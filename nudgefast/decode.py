"""The decode loops: base-only, nudger-only and nudging share one loop; speculative rounds are in
speculative.py.

Per step, every model in play runs one decode forward on its cursor (input token, position, slot),
then ONE gate step (kernels/nudge_gate.py) picks the token for every row, records it, and splices it
into every cursor for the next step. Per-row state (mode, span, finished, counters) lives in device
tensors; the host reads the all-finished flag every `flag_interval` steps and nothing else until the
end. On CUDA the whole step is replayed from a CUDA graph per batch-size bucket.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from .kernels.nudge_gate import (FINISH_LENGTH, FINISH_STOP, GateParams, GateState, ModelCursor, gate_params_for,
                                 gate_state_for, nudge_step, nudge_step_ref)
from .kv_cache import AttentionMetadata, slots_for


@dataclass
class Side:
    """One model taking part in a generation: the loaded model, its prompts, its cursor."""
    name: str
    loaded: object                     # api.LoadedModel
    prompts: list[list[int]]
    pages: list[list[int]]             # reserved page ids per row
    cursor: ModelCursor | None = None


def gate_params(config) -> GateParams:
    return gate_params_for(config)


def resolve_stop_ids(engine, config, sides: list[Side]) -> list[int]:
    """The user's stop ids, else the union of the EOS ids of the models in play and the nudger's
    end-of-turn token when its vocabulary has one (DESIGN.md section 1)."""
    if config.stop_token_ids is not None:
        return sorted(set(config.stop_token_ids))
    ids: set[int] = set()
    for s in sides:
        ids.update(s.loaded.eos_ids)
    nudger = engine.nudger
    if nudger is not None and any(s.loaded is nudger for s in sides) and nudger.tokenizer is not None:
        eot = nudger.tokenizer.end_of_turn_id()
        if eot is not None:
            ids.add(eot)
    return sorted(ids)


def row_seeds(seed: int | None, n: int) -> torch.Tensor:
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") >> 2
    # distinct, decorrelated streams per row; the RNG hashes them further
    return torch.tensor([(seed * 0x9E3779B1 + r * 0x85EBCA77) % (1 << 62) for r in range(n)], dtype=torch.int64)


def validate_prompts(name: str, prompts, vocab: int, max_ctx: int, max_new: int) -> None:
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"{name}_prompts must be a non-empty list of token-id lists")
    for i, p in enumerate(prompts):
        if not isinstance(p, (list, tuple)) or not all(isinstance(t, int) for t in p):
            raise TypeError(f"{name} prompt {i} must be a list of ints")
        if len(p) == 0:
            raise ValueError(f"{name} prompt {i} is empty")
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"{name} prompt {i} has token ids outside the model's vocabulary [0, {vocab}): {bad[:5]}")
        if len(p) + max_new > max_ctx:
            raise ValueError(f"{name} prompt {i} has {len(p)} tokens; with max_new_tokens={max_new} it exceeds the "
                             f"model's context of {max_ctx} positions")


def build_sides(engine, base_prompts, nudger_prompts, config) -> list[Side]:
    need = {"nudging": ("base", "nudger"), "base_only": ("base",), "nudger_only": ("nudger",)}[config.mode]
    prompts = {"base": base_prompts, "nudger": nudger_prompts}
    sides = []
    for name in need:
        loaded = getattr(engine, name)
        if loaded is None:
            raise ValueError(f"mode={config.mode!r} needs a {name} model; the engine was built without one")
        validate_prompts(name, prompts[name], loaded.spec.vocab_size, loaded.spec.max_position_embeddings,
                         config.max_new_tokens)
        sides.append(Side(name, loaded, [list(p) for p in prompts[name]], []))
    if len(sides) == 2 and len(sides[0].prompts) != len(sides[1].prompts):
        raise ValueError(f"base_prompts has {len(sides[0].prompts)} rows but nudger_prompts has "
                         f"{len(sides[1].prompts)}: row i of each must belong together")
    if config.speculate and config.mode != "nudging":
        raise ValueError(f"speculate={config.speculate} needs mode='nudging' (the nudger drafts for the base model)")
    return sides


def reserve_pages(sides: list[Side], config, slack: int) -> None:
    """Admission: reserve every row's pages up front (prompt + max_new_tokens + slack), all or none."""
    try:
        for s in sides:
            pool = s.loaded.kv
            for i, p in enumerate(s.prompts):
                s.pages.append(pool.allocator.allocate(pool.pages_for(len(p) + config.max_new_tokens + slack),
                                                       what=f"{s.name} row {i}"))
    except Exception:
        release_pages(sides)
        raise


def release_pages(sides: list[Side]) -> None:
    for s in sides:
        for pages in s.pages:
            s.loaded.kv.allocator.free(pages)
        s.pages = []


def block_table(pages: list[list[int]], device) -> torch.Tensor:
    width = max(len(p) for p in pages)
    table = torch.zeros(len(pages), width, dtype=torch.int32)
    for i, p in enumerate(pages):
        table[i, :len(p)] = torch.tensor(p, dtype=torch.int32)
    return table.to(device)


def prefill(side: Side, device) -> torch.Tensor:
    """Run every prompt of this side through its model in one flattened forward; return the logits
    of each row's last prompt token [B, V] and leave side.cursor at that token."""
    m = side.loaded.model
    page_size = side.loaded.kv.page_size
    lens = torch.tensor([len(p) for p in side.prompts], dtype=torch.int32)
    ids = torch.tensor([t for p in side.prompts for t in p], dtype=torch.int64, device=device)
    positions = torch.cat([torch.arange(n, dtype=torch.int64) for n in lens.tolist()]).to(device)
    tables = block_table(side.pages, device)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lens, 0)
    row_of_token = torch.repeat_interleave(torch.arange(len(lens)), lens).to(device)
    slots = (tables[row_of_token, positions // page_size].to(torch.int64) * page_size + positions % page_size)
    meta = AttentionMetadata(slot_mapping=slots, block_tables=tables, seq_lens=lens.to(device),
                             cu_q_lens=cu.to(device), max_q_len=int(lens.max()))
    last = (cu[1:] - 1).to(torch.int64).to(device)
    logits = m.forward(ids, positions, meta, side.loaded.kv, logits_indices=last)
    last_pos = (lens - 1).to(torch.int64).to(device)
    side.cursor = ModelCursor(
        input_ids=torch.tensor([p[-1] for p in side.prompts], dtype=torch.int64, device=device),
        positions=last_pos, seq_lens=lens.to(device),
        slot_mapping=slots_for(tables, last_pos[:, None], page_size)[:, 0],
        block_tables=tables, page_size=page_size)
    return logits


def decode_forward(side: Side) -> torch.Tensor:
    c = side.cursor
    meta = AttentionMetadata(slot_mapping=c.slot_mapping, block_tables=c.block_tables, seq_lens=c.seq_lens,
                             cu_q_lens=None)
    return side.loaded.model.forward(c.input_ids, c.positions, meta, side.loaded.kv)


def new_gate_state(n_rows: int, config, stop_ids: list[int], word_start: torch.Tensor, device) -> GateState:
    """Every row with the generation's one config (the per-row parameter tensors all equal)."""
    return gate_state_for(config, n_rows, stop_ids, word_start, row_seeds(config.seed, n_rows), device)


def word_start_table(engine, sides: list[Side], config) -> torch.Tensor:
    size = max(s.loaded.spec.vocab_size for s in sides)
    if config.mode == "nudging" and config.granularity == "word":
        tok = engine.nudger.tokenizer or engine.base.tokenizer
        if tok is None:
            raise ValueError("granularity='word' needs a tokenizer.json (word starts come from token strings)")
        return tok.word_start_table(size)
    return torch.zeros(size, dtype=torch.bool)


def run_generation(engine, base_prompts, nudger_prompts, config):
    sides = build_sides(engine, base_prompts, nudger_prompts, config)
    device = engine.device
    params = gate_params(config)
    stop_ids = resolve_stop_ids(engine, config, sides)
    state = new_gate_state(len(sides[0].prompts), config, stop_ids, word_start_table(engine, sides, config), device)
    slack = config.speculate + 1 if config.speculate else 0
    reserve_pages(sides, config, slack)
    try:
        with torch.inference_mode():
            if config.speculate:
                from .speculative import run_speculative
                stats = run_speculative(engine, sides, state, params, config)
            else:
                stats = run_steps(engine, sides, state, params)
    finally:
        release_pages(sides)
    return collect(engine, sides, state, stats)


@contextlib.contextmanager
def no_host_sync(engine):
    """With engine.sync_debug on CUDA, any host synchronisation between two flag reads raises."""
    if not (engine.sync_debug and engine.device.type == "cuda"):
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def gate_fn(engine):
    """The gate step of the engine's backend: Triton on CUDA, C++ on the CPU when built, else torch."""
    if engine.backend.kind == "triton":
        return nudge_step
    if engine.backend.kind == "native":
        from .native import nudge_step_native
        return nudge_step_native
    return nudge_step_ref


def run_steps(engine, sides: list[Side], state: GateState, params: GateParams) -> dict:
    """Prefill both prompts, then one gate step per token until every row has finished."""
    by_name = {s.name: s for s in sides}
    base, nudger = by_name.get("base"), by_name.get("nudger")
    step = gate_fn(engine)
    logits = {s.name: prefill(s, engine.device) for s in sides}
    step(logits.get("base"), logits.get("nudger"), state, params, base and base.cursor, nudger and nudger.cursor)
    steps = 1
    max_new = int(state.max_new.max())  # one host read before the loop: no row runs longer
    runner = None
    if engine.cuda_graphs:
        from .cuda_graphs import GraphStep
        runner = GraphStep.get(engine, sides, state, params)
    live = runner.state if runner is not None else state
    flag_reads = 0
    while steps < max_new:
        n = min(engine.flag_interval, max_new - steps)
        with no_host_sync(engine):
            for _ in range(n):
                if runner is not None:
                    runner.run()
                else:
                    bl = decode_forward(base) if base else None
                    nl = decode_forward(nudger) if nudger else None
                    step(bl, nl, state, params, base and base.cursor, nudger and nudger.cursor)
        steps += n
        flag_reads += 1
        if bool((live.finished != 0).all()):  # the one host read, every flag_interval steps
            break
    if runner is not None:
        runner.copy_out(state)
    return {"steps": steps, "flag_reads": flag_reads}


def collect(engine, sides: list[Side], state: GateState, stats: dict):
    from .api import Completion

    n_out = state.n_out.cpu().tolist()
    finished = state.finished.cpu().tolist()
    tokens = state.out_tokens.cpu()
    src = state.out_from_nudger.cpu()
    tok_side = next((s for s in sides if s.name == "nudger"), sides[0])
    tokenizer = tok_side.loaded.tokenizer
    extra = stats.pop("per_row", None)
    outs = []
    for r in range(len(n_out)):
        ids = tokens[r, :n_out[r]].tolist()
        reason = {FINISH_STOP: "stop", FINISH_LENGTH: "length"}.get(finished[r], "length")
        row_stats = dict(stats)
        if extra is not None:
            row_stats.update({k: v[r] for k, v in extra.items()})
        outs.append(Completion(text=tokenizer.decode(ids) if tokenizer is not None else "", token_ids=ids,
                               from_nudger=[bool(x) for x in src[r, :n_out[r]].tolist()],
                               finish_reason=reason, stats=row_stats))
    return outs
