"""Python entry points for the native CPU ops of csrc/ that take structured arguments.

`store_kv` and `paged_attention` are called straight through torch.ops.nudgefast (nudgefast/ops.py);
the gate step takes GateState / ModelCursor / GateParams, which a torch op cannot, so it is
unpacked here into the explicit schema of csrc/ops.cpp:

    nudge_step(base_logits?, nudger_logits?,
               seed, word_state!, span!, finished!, n_out!, n_nudged!, out_tokens!, out_from_nudger!,
               stop_ids, word_start, gate, threshold, word_level, inv_temp, top_p, sample_mode, max_new,
               base_input_ids!?, base_positions!?, base_seq_lens!?, base_slot_mapping!?,
               base_block_tables?, base_page_size,
               nudger_input_ids!?, ..., nudger_block_tables?, nudger_page_size,
               mode, max_sample) -> ()

(`!` = updated in place, `?` = None allowed; a missing cursor is five Nones and page size 1.)
Importing this module needs the built extension (nudgefast._C): check ops.native_ops_available().
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loading the library registers torch.ops.nudgefast)
from .kernels.nudge_gate import GateParams, GateState, ModelCursor, check_step_inputs
from .kernels.sample import SAMPLE_NUCLEUS, check_logits, check_row_params, sample_mode

_OPS = torch.ops.nudgefast


def _cursor_args(cursor: ModelCursor | None) -> list:
    if cursor is None:
        return [None, None, None, None, None, 1]
    return [cursor.input_ids, cursor.positions, cursor.seq_lens, cursor.slot_mapping, cursor.block_tables,
            cursor.page_size]


def nudge_step_native(base_logits: torch.Tensor | None, nudger_logits: torch.Tensor | None, state: GateState,
                      params: GateParams, base: ModelCursor | None, nudger: ModelCursor | None) -> None:
    """One nudging decode step for the whole batch, in place: nudge_step_ref's semantics and signature.

    Inputs are validated by the reference's own checks (same errors). Rows run in parallel on the
    CPU threads; at batch 1 the base and nudger rows are sampled side by side.
    """
    check_step_inputs(base_logits, nudger_logits, state, params, base, nudger)
    _OPS.nudge_step(
        base_logits, nudger_logits,
        state.seed, state.word_state, state.span, state.finished, state.n_out, state.n_nudged,
        state.out_tokens, state.out_from_nudger, state.stop_ids, state.word_start,
        state.gate, state.threshold, state.word_level, state.inv_temp, state.top_p, state.sample_mode,
        state.max_new,
        *_cursor_args(base), *_cursor_args(nudger),
        int(params.mode), int(params.max_sample),
    )


def sample_native(logits: torch.Tensor, seed: torch.Tensor, step: torch.Tensor, stream: int, temperature: float,
                  top_p: float) -> torch.Tensor:
    """sample_ref on the native op: one candidate per row, int64 [B]."""
    sample_mode(temperature, top_p)
    check_logits(logits, "logits")
    return _OPS.sample(logits, seed, step, int(stream), float(temperature), float(top_p))


def sample_rows_native(logits: torch.Tensor, seed: torch.Tensor, step: torch.Tensor, stream: int,
                       inv_temp: torch.Tensor, top_p: torch.Tensor, mode: torch.Tensor,
                       max_sample: int = SAMPLE_NUCLEUS) -> torch.Tensor:
    """sample_rows_ref on the native op (a row uses min(mode, max_sample)): int64 [B]."""
    check_logits(logits, "logits")
    check_row_params(logits.shape[0], logits.device, inv_temp, top_p, mode)
    return _OPS.sample_rows(logits, seed, step, int(stream), inv_temp, top_p, mode, int(max_sample))
