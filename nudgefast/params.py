"""What a caller hands the engine and what it gets back: NudgeConfig, Completion, RequestOutput.

A leaf module: it imports nothing of nudgefast, so every layer (engine, runner, api, serve, bench)
can import it without pulling the others in.
"""
from __future__ import annotations

from dataclasses import dataclass, field

MODES = ("nudging", "base_only", "nudger_only")
GATES = ("top_prob", "entropy")
GRANULARITIES = ("token", "word")
MAX_SPECULATE = 16
MAX_STOP_IDS = 64  # per request; stop ids live per row in a device table of this width at most


@dataclass(frozen=True)
class NudgeConfig:
    """One request's parameters (DESIGN section 1). Every field may differ between the requests
    of one running batch."""
    mode: str = "nudging"
    gate: str = "top_prob"
    threshold: float = 0.4
    granularity: str = "word"
    speculate: int = 0
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] | None = None

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"NudgeConfig: {msg}")

        def number(x) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x  # NaN fails x == x

        if self.mode not in MODES:
            bad(f"mode={self.mode!r}; expected one of {MODES}")
        if self.gate not in GATES:
            bad(f"gate={self.gate!r}; expected one of {GATES}")
        if self.granularity not in GRANULARITIES:
            bad(f"granularity={self.granularity!r}; expected one of {GRANULARITIES}")
        if not number(self.threshold):
            bad(f"threshold={self.threshold!r} must be a number")
        if self.gate == "top_prob" and not 0.0 <= self.threshold <= 1.0:
            bad(f"threshold={self.threshold} must be in [0, 1] for gate='top_prob'")
        if self.gate == "entropy" and not self.threshold >= 0.0:
            bad(f"threshold={self.threshold} must be >= 0 (nats) for gate='entropy'")
        if type(self.speculate) is not int or not 0 <= self.speculate <= MAX_SPECULATE:
            bad(f"speculate={self.speculate!r} must be an int in [0, {MAX_SPECULATE}]")
        if type(self.max_new_tokens) is not int or self.max_new_tokens < 1:
            bad(f"max_new_tokens={self.max_new_tokens!r} must be an int >= 1")
        if not number(self.temperature) or not self.temperature >= 0.0:
            bad(f"temperature={self.temperature!r} must be a number >= 0 (0 = greedy)")
        if not number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            bad(f"top_p={self.top_p!r} must be in (0, 1]")
        if self.seed is not None and type(self.seed) is not int:
            bad(f"seed={self.seed!r} must be an int or None")
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
                    type(i) is int and i >= 0 for i in self.stop_token_ids):
                bad(f"stop_token_ids={self.stop_token_ids!r} must be a list of non-negative ints")
            if len(set(self.stop_token_ids)) > MAX_STOP_IDS:
                bad(f"stop_token_ids has {len(set(self.stop_token_ids))} ids; at most {MAX_STOP_IDS}")


@dataclass
class Completion:
    """A finished answer. stats["spans"] holds [(start_char, end_char, from_nudger)] over text."""
    text: str
    token_ids: list[int]
    from_nudger: list[bool]
    finish_reason: str                      # "stop" or "length"
    stats: dict = field(default_factory=dict)

    @property
    def nudged_fraction(self) -> float:
        return sum(self.from_nudger) / len(self.from_nudger) if self.from_nudger else 0.0

    @property
    def nudged_spans(self) -> list[tuple[int, int]]:
        """Character ranges of `text` written by the nudger."""
        return [(a, b) for a, b, nudged in self.stats.get("spans", []) if nudged]


@dataclass
class RequestOutput:
    """What one engine step produced for one request: deltas since its previous output."""
    request_id: str
    token_ids: list[int]
    from_nudger: list[bool]
    text: str
    pieces: list[tuple[str, bool]]          # the text delta split by writer: (text, written by the nudger)
    finished: bool = False
    finish_reason: str | None = None        # "stop" | "length" | "abort" once finished
    completion: Completion | None = None    # the whole answer once finished (None for an abort)

