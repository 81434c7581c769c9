"""One request as the engine sees it: its prompts, its parameters, where it is, what it wrote.

A request moves WAITING -> RUNNING -> FINISHED (or ABORTED); a preempted request goes back to
WAITING with everything it wrote, and is re-prefilled from its prompt plus that text later, so its
output does not change. The device-side state of a running request (gate state, cursors) lives in
the runner's row batch; `snapshot` keeps what the runner hands back when the row leaves early.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ..params import Completion, NudgeConfig, RequestOutput


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"


class IncrementalText:
    """Incremental detokenization: text pieces per emitted token, by writer.

    Decoding a growing window (from `prefix` on) and emitting only what the last token added keeps
    each call short and lets decoders that strip a leading space (SentencePiece) or hold back half
    a UTF-8 character behave as they do on the whole sequence. finish() returns whatever the full
    decode has beyond the pieces already given, so the pieces always add up to decode(all ids)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0    # ids[:read] are accounted for in `text`
        self.text = ""

    def add(self, ids: list[int], from_nudger: list[bool]) -> list[tuple[str, bool]]:
        if self.tok is None:
            self.ids.extend(ids)
            return []
        pieces = []
        for t, nudged in zip(ids, from_nudger):
            self.ids.append(t)
            before = self.tok.decode(self.ids[self.prefix:self.read])
            now = self.tok.decode(self.ids[self.prefix:])
            if len(now) > len(before) and not now.endswith("\ufffd"):
                piece = now[len(before):]
                pieces.append((piece, nudged))
                self.text += piece
                self.prefix, self.read = self.read, len(self.ids)
        return pieces

    def finish(self, nudged_tail: bool) -> list[tuple[str, bool]]:
        if self.tok is None:
            return []
        full = self.tok.decode(self.ids)
        if full.startswith(self.text) and len(full) > len(self.text):
            rest = full[len(self.text):]
            self.text = full
            return [(rest, nudged_tail)]
        return []


@dataclass(eq=False)  # identity: requests are compared and hashed as objects
class Request:
    id: str
    config: NudgeConfig
    arrival: int                         # admission order: the youngest is preempted first
    kind: str                            # "plain" | "speculative" | "crossvocab"
    models: tuple[str, ...]              # models in play, in ("base", "nudger") order
    prompts: dict[str, list[int]]        # per model, as it will be prefilled
    seed: int                            # this row's sampler seed
    stop_ids: list[int]                  # shared vocabulary: the rule's stop ids
    tokenizer: object = None             # decodes token_ids (the nudger's, else the base's)
    status: Status = Status.WAITING
    tokens: list[int] = field(default_factory=list)       # emitted so far (host copy)
    from_nudger: list[bool] = field(default_factory=list)
    pages: dict[str, list[int]] = field(default_factory=dict)
    snapshot: dict | None = None         # device state handed back by the runner at preemption
    abort_requested: bool = False
    finish_reason: str | None = None
    preemptions: int = 0
    sent: int = 0                        # tokens already given out in RequestOutputs
    pieces: list[tuple[str, bool]] = field(default_factory=list)  # all text pieces given out
    crossvocab_row: object = None        # the text-level path's per-row state
    row_stats: dict = field(default_factory=dict)  # per-request statistics from the runner
    spec_counters: dict | None = None    # the speculation counters of its current row (runner.collect)

    def __post_init__(self):
        self.text = IncrementalText(self.tokenizer)

    @property
    def finished(self) -> bool:
        return self.status in (Status.FINISHED, Status.ABORTED)

    def prompt_tokens(self) -> dict[str, int]:
        return {m: len(self.prompts[m]) for m in self.models}

    def delta(self) -> RequestOutput | None:
        """The output since the last call (None when there is nothing new and nothing ended)."""
        new_ids = self.tokens[self.sent:]
        new_src = self.from_nudger[self.sent:]
        pieces = self.text.add(new_ids, new_src) if self.crossvocab_row is None else []
        self.sent = len(self.tokens)
        done = self.finished
        completion = None
        if done and self.status == Status.FINISHED:
            if self.crossvocab_row is None:
                pieces += self.text.finish(self.from_nudger[-1] if self.from_nudger else False)
            self.pieces += pieces
            completion = self.completion()
        else:
            self.pieces += pieces
        if self.crossvocab_row is not None:
            pieces = self.crossvocab_pieces()
        if not new_ids and not pieces and not done:
            return None
        return RequestOutput(request_id=self.id, token_ids=new_ids, from_nudger=new_src,
                             text="".join(p for p, _ in pieces), pieces=pieces, finished=done,
                             finish_reason=self.finish_reason if done else None, completion=completion)

    def crossvocab_pieces(self) -> list[tuple[str, bool]]:
        """The text-level path shares text, not tokens: new pieces come from its row."""
        row = self.crossvocab_row
        fresh = row.pieces[row.pieces_sent:]
        row.pieces_sent = len(row.pieces)
        self.pieces += fresh
        return list(fresh)

    def completion(self) -> Completion:
        from ..crossvocab_reference import merge_spans

        if self.crossvocab_row is not None:
            return self.crossvocab_row.completion
        stats = dict(self.row_stats)
        stats["prompt_tokens"] = self.prompt_tokens()
        stats["preemptions"] = self.preemptions
        stats["spans"] = merge_spans(self.pieces)
        return Completion(text=self.text.text, token_ids=list(self.tokens), from_nudger=list(self.from_nudger),
                          finish_reason=self.finish_reason, stats=stats)
