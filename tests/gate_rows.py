"""Per-row gate configurations for the kernel tests (the nudge step, speculative accept, native ops).

Cfg is one row's settings; apply() writes one Cfg (every row) or a list (one per row) into a
GateState's per-row parameter tensors and returns the batch's GateParams; legacy_state builds a
GateState from its running-state fields; row_of cuts one row out as a batch of one.
"""
from dataclasses import dataclass

import torch

from nudgefast.kernels.nudge_gate import (GATE_ENTROPY, GATE_TOP_PROB, GateParams, GateState, ModelCursor,
                                          new_gate_state, set_row_params)
from nudgefast.kernels.sample import sample_mode


# a mixed batch for the step tests of every implementation, one row each:
# (gate, threshold, word, temperature, top_p, max_new); the stop ids differ per row too
MIXED_ROWS = [
    (GATE_TOP_PROB, 0.4, True, 0.0, 1.0, 6),
    (GATE_ENTROPY, 1.5, True, 0.7, 0.8, 9),
    (GATE_TOP_PROB, 0.9, False, 1.3, 1.0, 4),
    (GATE_ENTROPY, 0.5, False, 0.0, 1.0, 7),
    (GATE_TOP_PROB, 0.2, True, 0.7, 1.0, 3),
    (GATE_ENTROPY, 3.0, False, 0.9, 0.5, 8),
    (GATE_TOP_PROB, 0.6, True, 2.0, 0.95, 5),
    (GATE_TOP_PROB, 0.3, False, 0.0, 0.5, 6),  # greedy ignores top_p
    (GATE_ENTROPY, 1.0, True, 0.5, 0.7, 9),
]


@dataclass(frozen=True)
class Cfg:
    """One row's settings (the kernels take them per row from GateState; mode is the batch's)."""
    mode: int
    gate: int
    threshold: float
    word_level: bool
    temperature: float
    top_p: float
    max_new_tokens: int


def apply(state, cfg):
    """Writes cfg (one Cfg for every row, or a list with one per row) into the state's per-row
    parameters; returns the batch's GateParams (the most general sampler any row needs)."""
    if isinstance(cfg, GateParams):
        return cfg
    B = state.seed.shape[0]
    cfgs = list(cfg) if isinstance(cfg, (list, tuple)) else [cfg] * B
    assert len(cfgs) == B and len({c.mode for c in cfgs}) == 1
    for i, c in enumerate(cfgs):
        set_row_params(state, i, gate=c.gate, threshold=c.threshold, granularity=bool(c.word_level),
                       temperature=c.temperature, top_p=c.top_p, max_new_tokens=c.max_new_tokens)
    return GateParams(cfgs[0].mode, max(sample_mode(c.temperature, c.top_p) for c in cfgs))


def legacy_state(*, seed, word_state, span, finished, n_out, n_nudged, out_tokens, out_from_nudger, stop_ids,
                 word_start):
    """A GateState from the running-state fields; stop_ids [S] (every row) or [B, S]; the per-row
    parameters start neutral (apply() sets them)."""
    B = seed.shape[0]
    state = new_gate_state(B, out_width=out_tokens.shape[1], stop_width=stop_ids.shape[-1], word_start=word_start)
    for k, v in dict(seed=seed, word_state=word_state, span=span, finished=finished, n_out=n_out, n_nudged=n_nudged,
                     out_tokens=out_tokens, out_from_nudger=out_from_nudger).items():
        setattr(state, k, v)
    state.stop_ids = stop_ids.expand(B, -1).clone() if stop_ids.dim() == 1 else stop_ids
    return state


def row_of(obj, i):
    """Row i of a GateState / ModelCursor / SpecStats as a batch of one (the shared word_start kept)."""
    B = obj.seed.shape[0] if isinstance(obj, GateState) else obj.input_ids.shape[0] if isinstance(
        obj, ModelCursor) else next(iter(vars(obj).values())).shape[0]
    return type(obj)(**{k: v[i:i + 1].clone() if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == B
                        and k != "word_start" else (v.clone() if isinstance(v, torch.Tensor) else v)
                        for k, v in vars(obj).items()})
