"""Nudging across model families: the fast path for a base model and a nudger whose tokenizers
differ (DESIGN.md section 1, "Different tokenizers"). The rule and every definition it uses are in
crossvocab_reference.py; this module runs the same rule on paged caches, batched, and tests hold the
two equal. NudgingEngine.generate routes here when mode="nudging" and the vocabularies differ (same
vocabulary = same size and the same string for every id).

How each model keeps its ids for the shared text (the invariant: at every hand-over, and for the
final text, each model holds exactly the fresh encoding of the text after its prompt):
- Text is appended only at word boundaries of its writer (a nudger word boundary, where the base
  decides, or a base hand-over); the writer's tokens since the last append are decoded and added.
- Then BOTH models re-tokenize from their *anchor*: the writer, to replace a non-canonical spelling
  it may have sampled ("Ġhel" "lo" for "Ġhello"); the reader, to read the new text. Only the tokens
  from the first difference on are rolled back (the KV cache keeps its prefix; paged slots are
  simply overwritten) and prefilled, all of a row's new tokens in one chunk of the next varlen
  forward. The whole continuation is never re-encoded.
- An anchor is a word-start token (its string starts with "Ġ", "▁" or " ") that starts at a
  space right after a non-whitespace character whose pair with the word-start marker appears in no
  vocabulary token. Tokenizers never merge across such a point (byte-level pre-tokenizers split
  there, and a BPE without pre-tokenization, as Gemma's, has no merge that crosses it: the only
  Gemma token that would, ">▁</", makes ">" a non-anchor character), so the fresh encoding of the
  text equals the ids before the anchor followed by the encoding of the text from the anchor on.
  Each model's anchor is the last one in its previous window; windows therefore span the model's
  last word plus the new text. Bounded exception (cost, not correctness): text without anchors
  (no spaces, e.g. CJK or long runs of digits and newlines) keeps the window growing.
- Tokenizers that prepend a space to the text (Llama-2, Metaspace) get the window without its
  leading space: they put the marker back themselves.

Counting: max_new_tokens counts emitted tokens, each in its writer's vocabulary. Pages come on
demand: before each forward every row gets the pages its ids need (the scheduler preempts the
youngest request when a pool is short). A request is refused at admission only if prompt +
max_new_tokens + max(16, max_new_tokens // 2) positions (the reader's tokenization of a word can take
more tokens than the writer's) exceed a whole pool.

Per step the rows still running split by the logits they wait for; each model runs ONE varlen
forward over its group (single tokens of rows that write, prefill chunks of rows that just read
text), the candidates are drawn with the counter-based sampler (base: stream 0, nudger: stream 1,
step = tokens emitted so far in the row), and the host advances each row's word-level state. The
host reads the candidates every step: word boundaries need the tokenizers, which live on the host.

Output: Completion.text is the shared text; token_ids are the NUDGER's ids of the final text (its
fresh encoding); from_nudger[i] says whether the character where nudger token i starts came from
the nudger. stats: "spans" [(start_char, end_char, from_nudger)], "base_ids" and "nudger_ids" (each
model's ids for the final text, as tracked), "emitted_tokens", "nudged_tokens" (emitted by the
nudger), "handovers", "reencoded_chars" (characters re-tokenized by both models in all, a small
multiple of the text's length), and per-call "forwards" / "forward_tokens" per model.
"""
from __future__ import annotations

import bisect
import weakref
from dataclasses import dataclass, field

import torch

from ..crossvocab_reference import BASE, NUDGE, TextCodec, agrees, merge_spans
from ..kernels.nudge_gate import base_stats_ref
from ..kernels.sample import inverse_temperature, sample_mode, sample_rows, sample_rows_ref
from ..kv_cache import AttentionMetadata

WORD_MARKERS = ("\u0120", "\u2581", " ")
_WHITESPACE_BYTES = (9, 10, 11, 12, 13, 32)

# What each phase of a row waits for.
WRITE_N, DECIDE_B, WRITE_B, HANDOVER_N = "write_n", "decide_b", "write_b", "handover_n"
NEEDS = {WRITE_N: "nudger", DECIDE_B: "base", WRITE_B: "base", HANDOVER_N: "nudger"}


def crossvocab_slack(max_new_tokens: int) -> int:
    return max(16, max_new_tokens // 2)


def _byte_level_chars() -> list[str]:
    """The byte -> printable character map of byte-level BPE vocabularies (GPT-2's convention:
    printable Latin-1 bytes stand for themselves, the others are shifted past 255)."""
    keep = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    chars, shift = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + shift))
            shift += 1
    return chars


_BYTE_CHARS = _byte_level_chars()
_WHITESPACE_SPELLINGS = frozenset(WORD_MARKERS) | frozenset("\t\n\r\x0b\x0c") | frozenset(
    _BYTE_CHARS[b] for b in _WHITESPACE_BYTES)


def barrier_breakers(tokenizer) -> frozenset:
    """Characters c (as vocabulary strings spell them) such that some token contains c directly
    followed by a word-start marker: a merge could cross a space after c."""
    found = set()
    for s in tokenizer.tok.get_vocab(with_added_tokens=True):
        for i in range(1, len(s)):
            if s[i] in WORD_MARKERS and s[i - 1] not in _WHITESPACE_SPELLINGS:
                found.add(s[i - 1])
    return frozenset(found)


class WindowEncoder:
    """Incremental fresh encoding of a growing text, from anchors (see the module docstring)."""

    def __init__(self, codec: TextCodec):
        self.codec = codec
        self.breakers = barrier_breakers(codec.tokenizer)
        # A tokenizer that spells "a" as "▁a" prepends a space: give it windows without theirs.
        self.prepends_space = codec.decode(codec.encode("a"), at_start=False).startswith(" ")

    def _breaks(self, ch: str) -> bool:
        if ch.isspace() or ch in WORD_MARKERS:  # a literal "▁" is a space to SentencePiece vocabularies
            return True
        if not self.breakers:
            return False
        return ch in self.breakers or _BYTE_CHARS[ch.encode("utf-8", "surrogatepass")[-1]] in self.breakers

    def window(self, text: str, start: int) -> tuple[list[int], list[int], list[int]]:
        """Encode text[start:] (start is 0 or an anchor's character). Returns the ids, the character
        where each token starts, and the indices (into the ids) of the anchors found."""
        shift = 1 if start > 0 and self.prepends_space else 0
        enc = self.codec.tokenizer.tok.encode(text[start + shift:], add_special_tokens=False)
        ids, starts, anchors = list(enc.ids), [], []
        for j, (tid, (a, _)) in enumerate(zip(ids, enc.offsets)):
            word = self.codec.word_start(tid)
            # the marker the tokenizer prepended to a shifted window stands for the space we cut off
            pos = start if shift and j == 0 else start + shift + a
            starts.append(pos)
            if word and 0 < pos < len(text) and text[pos] == " " and not self._breaks(text[pos - 1]):
                anchors.append(j)
        return ids, starts, anchors


_encoders: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def encoder_for(loaded) -> WindowEncoder:
    """The (cached) WindowEncoder of a LoadedModel's tokenizer."""
    enc = _encoders.get(loaded.tokenizer)
    if enc is None or enc.codec.vocab_rows != loaded.spec.vocab_size:
        enc = WindowEncoder(TextCodec(loaded.tokenizer, loaded.spec.vocab_size))
        _encoders[loaded.tokenizer] = enc
    return enc




def crossvocab_stop_ids(engine, config) -> tuple[frozenset, frozenset]:
    """(base stop ids, nudger stop ids), each in its own vocabulary (crossvocab_reference.py)."""
    def eos_and_eot(loaded):
        ids = set(loaded.eos_ids)
        eot = loaded.tokenizer.end_of_turn_id()
        if eot is not None:
            ids.add(eot)
        return frozenset(ids)

    nudger = (frozenset(config.stop_token_ids) if config.stop_token_ids is not None
              else eos_and_eot(engine.nudger))
    return eos_and_eot(engine.base), nudger


def check_crossvocab_config(config) -> None:
    if config.granularity != "word":
        raise ValueError("granularity='token' needs a shared vocabulary; with different tokenizers "
                         "nudging runs on words (granularity='word')")
    if config.speculate:
        raise ValueError(f"speculate={config.speculate} needs a shared vocabulary (the nudger drafts the base "
                         "model's tokens); use speculate=0 with different tokenizers")


@dataclass
class Track:
    """One model's ids for one row: prompt + its tokenization of the shared text (+ the tokens it
    wrote since the text was last extended). Its pages are the request's (req.pages[model])."""
    ids: list[int]
    n_prompt: int
    cached: int = 0  # ids[:cached] have their KV in the cache
    flushed: int = 0  # ids[:flushed] are part of the shared text
    anchor_tok: int = 0  # re-tokenization windows start at ids[anchor_tok] ...
    anchor_char: int = 0  # ... which is this character of the text
    starts: list[int] = field(default_factory=list)  # character where each continuation token starts

    def __post_init__(self):
        self.flushed = self.anchor_tok = self.n_prompt

    def continuation(self) -> list[int]:
        return self.ids[self.n_prompt:]


@dataclass
class Row:
    req: object  # engine Request
    seed: int
    tracks: dict
    base_stop: frozenset
    nudger_stop: frozenset
    text: str = ""
    pieces: list = field(default_factory=list)
    pieces_sent: int = 0
    mode: str = NUDGE
    span: int = 0
    emitted: int = 0
    by_nudger: int = 0
    handovers: int = 0
    reencoded_chars: int = 0  # characters re-tokenized, both models, all windows
    phase: str = WRITE_N
    held_n: int = -1  # the nudger's word-start candidate while the base decides
    finish: str | None = None
    completion: object = None
    forwards: dict = field(default_factory=lambda: {"base": 0, "nudger": 0})
    forward_tokens: dict = field(default_factory=lambda: {"base": 0, "nudger": 0})

    @property
    def config(self):
        return self.req.config


class CrossVocabRunner:
    """The running rows of the text-level path. Each round runs a few iterations; per iteration the
    rows split by the logits they wait for and each model runs ONE varlen forward over its group
    (single tokens of rows that write, prefill chunks of rows that just read text, whole prompts of
    rows that just joined), then the host advances every row's word-level state."""

    ITERATIONS_PER_ROUND = 8

    def __init__(self, engine):
        self.engine = engine
        self.device = engine.device
        self.loaded = {"base": engine.base, "nudger": engine.nudger}
        self.enc = {name: encoder_for(m) for name, m in self.loaded.items()}
        self.sampler = sample_rows if engine.backend.kind == "triton" else sample_rows_ref
        self.rows: list[Row] = []

    # ---- membership --------------------------------------------------------------------------
    def attach(self, req, stops: tuple[frozenset, frozenset]) -> None:
        tracks = {m: Track(ids=list(req.prompts[m]), n_prompt=len(req.prompts[m])) for m in ("base", "nudger")}
        req.crossvocab_row = Row(req=req, seed=req.seed, tracks=tracks, base_stop=stops[0], nudger_stop=stops[1])

    def admit(self, req) -> None:
        self.rows.append(req.crossvocab_row)

    def remove(self, req, keep_state: bool = False) -> None:
        row = req.crossvocab_row
        if row in self.rows:
            self.rows.remove(row)
        if keep_state:  # preempted: its pages go; it is prefilled again from its ids when it returns
            for tr in row.tracks.values():
                tr.cached = 0

    def requests(self) -> list:
        return [r.req for r in self.rows]

    # ---- text and ids --------------------------------------------------------------------
    def sync(self, row: Row, name: str) -> None:
        """Bring this model's ids to the fresh encoding of row.text, re-tokenizing from its anchor."""
        tr = row.tracks[name]
        new, starts, anchors = self.enc[name].window(row.text, tr.anchor_char)
        row.reencoded_chars += len(row.text) - tr.anchor_char
        a = tr.anchor_tok
        old = tr.ids[a:]
        k = 0
        while k < min(len(old), len(new)) and old[k] == new[k]:
            k += 1
        tr.ids[a:] = new
        tr.starts[a - tr.n_prompt:] = starts
        tr.cached = min(tr.cached, a + k)
        tr.flushed = len(tr.ids)
        if anchors:
            tr.anchor_tok, tr.anchor_char = a + anchors[-1], starts[anchors[-1]]

    def append_text(self, row: Row, writer: str) -> None:
        """The writer's new tokens become shared text; both models re-tokenize it."""
        tr = row.tracks[writer]
        piece = self.enc[writer].codec.decode(tr.ids[tr.flushed:], at_start=not row.text)
        tr.flushed = len(tr.ids)
        if piece:
            row.text += piece
            row.pieces.append((piece, writer == "nudger"))
        self.sync(row, "base")
        self.sync(row, "nudger")

    # ---- the rule --------------------------------------------------------------------------
    def emit(self, row: Row, who: str, token: int) -> None:
        row.tracks[who].ids.append(token)
        row.emitted += 1
        if who == "nudger":
            row.by_nudger += 1
            row.span += 1
        row.phase = WRITE_N if who == "nudger" else WRITE_B
        if row.emitted >= row.config.max_new_tokens:
            self.finish(row, "length")

    def nudger_emits(self, row: Row, n: int) -> None:
        if n in row.nudger_stop:
            self.finish(row, "stop")
        else:
            self.emit(row, "nudger", n)

    def advance(self, row: Row, cand: int, confident: bool) -> None:
        """One candidate of the model the row waited for -> the row's next state."""
        nudger, base = self.enc["nudger"].codec, self.enc["base"].codec
        if row.phase == WRITE_N:
            if row.span >= 1 and nudger.word_start(cand):
                row.held_n = cand
                self.append_text(row, "nudger")  # the base reads the nudger's words and decides
                row.phase = DECIDE_B
            else:
                self.nudger_emits(row, cand)
        elif row.phase == DECIDE_B:
            agree = agrees(base.token_text(cand), nudger.token_text(row.held_n))
            if (confident or agree) and cand not in row.base_stop:
                row.mode = BASE
                row.handovers += 1
                self.emit(row, "base", cand)
            else:
                self.nudger_emits(row, row.held_n)
        elif row.phase == WRITE_B:
            boundary = base.word_start(cand) or cand in row.base_stop
            if boundary and not (confident and cand not in row.base_stop):
                self.append_text(row, "base")  # the nudger reads the base's words and writes here
                row.mode, row.span, row.phase = NUDGE, 0, HANDOVER_N
                row.handovers += 1
            else:
                self.emit(row, "base", cand)
        else:  # HANDOVER_N
            self.nudger_emits(row, cand)

    def finish(self, row: Row, reason: str) -> None:
        row.finish = reason
        for who in ("base", "nudger"):
            tr = row.tracks[who]
            if tr.flushed < len(tr.ids):
                self.append_text(row, who)
        row.completion = self.completion(row)
        req = row.req
        req.tokens, req.from_nudger = list(row.completion.token_ids), list(row.completion.from_nudger)
        req.finish_reason = reason

    # ---- the device side -----------------------------------------------------------------
    def ensure_pages(self, name: str, rows: list[Row]) -> list[Row]:
        """Pages for every id of these rows (the scheduler may preempt younger requests, or one of
        these rows); returns the rows still running."""
        sched, pool = self.engine.scheduler, self.loaded[name].kv
        for row in list(rows):
            if row in self.rows:
                sched.grow(row.req, {name: pool.pages_for(len(row.tracks[name].ids))}, self.engine._preempt)
        return [r for r in rows if r in self.rows]

    def forward(self, name: str, rows: list[Row]) -> torch.Tensor:
        """One varlen forward of model `name` over every row's uncached ids; logits [R, V] at each
        row's last id."""
        loaded = self.loaded[name]
        pool, page = loaded.kv, loaded.kv.page_size
        chunks, starts, tables = [], [], []
        for row in rows:
            tr = row.tracks[name]
            if tr.cached >= len(tr.ids):  # nothing new (text that re-tokenized to the same ids)
                tr.cached = len(tr.ids) - 1
            chunks.append(tr.ids[tr.cached:])
            starts.append(tr.cached)
            tables.append(row.req.pages[name])
            tr.cached = len(tr.ids)
            row.forwards[name] += 1
            row.forward_tokens[name] += len(chunks[-1])
        lens = torch.tensor([len(c) for c in chunks], dtype=torch.int64)
        start = torch.tensor(starts, dtype=torch.int64)
        ids = torch.tensor([t for c in chunks for t in c], dtype=torch.int64, device=self.device)
        row_of_token = torch.repeat_interleave(torch.arange(len(rows)), lens)
        cu = torch.zeros(len(rows) + 1, dtype=torch.int64)
        cu[1:] = torch.cumsum(lens, 0)
        positions = start[row_of_token] + torch.arange(int(cu[-1])) - cu[:-1][row_of_token]
        width = max(len(p) for p in tables)
        table = torch.tensor([p + [pool.scratch_page] * (width - len(p)) for p in tables], dtype=torch.int32)
        slots = (table[row_of_token, positions // page].to(torch.int64) * page + positions % page).to(self.device)
        table = table.to(self.device)
        positions = positions.to(self.device)
        seq_lens = (start + lens).to(torch.int32).to(self.device)
        if int(lens.max()) == 1:
            meta = AttentionMetadata(slot_mapping=slots, block_tables=table, seq_lens=seq_lens, cu_q_lens=None)
            last = None
        else:
            meta = AttentionMetadata(slot_mapping=slots, block_tables=table, seq_lens=seq_lens,
                                     cu_q_lens=cu.to(torch.int32).to(self.device), max_q_len=int(lens.max()))
            last = (cu[1:] - 1).to(self.device)
        return loaded.model.forward(ids, positions, meta, pool, logits_indices=last)

    def step(self, name: str, rows: list[Row]) -> None:
        """Forward `name` for these rows, draw its candidates, advance each row."""
        too_long = [r for r in rows if len(r.tracks[name].ids) > self.loaded[name].spec.max_position_embeddings]
        for r in too_long:  # the model's context is full: the answer ends here
            self.finish(r, "length")
        rows = [r for r in rows if r.finish is None]
        rows = self.ensure_pages(name, rows)
        if not rows:
            return
        logits = self.forward(name, rows)
        dev = self.device
        cfgs = [r.config for r in rows]
        seeds = torch.tensor([r.seed for r in rows], dtype=torch.int64, device=dev)
        steps = torch.tensor([r.emitted for r in rows], dtype=torch.int32, device=dev)
        inv_temp = torch.tensor([inverse_temperature(c.temperature) for c in cfgs], dtype=torch.float32, device=dev)
        top_p = torch.tensor([float(c.top_p) for c in cfgs], dtype=torch.float32, device=dev)
        modes = torch.tensor([sample_mode(c.temperature, c.top_p) for c in cfgs], dtype=torch.int32, device=dev)
        stream = 0 if name == "base" else 1
        cands = self.sampler(logits, seeds, steps, stream, inv_temp, top_p, modes).tolist()
        if name == "base":
            p_top, entropy = base_stats_ref(logits)
            p_top, entropy = p_top.tolist(), entropy.tolist()
            confident = [(p >= c.threshold) if c.gate == "top_prob" else (h <= c.threshold)
                         for p, h, c in zip(p_top, entropy, cfgs)]
        else:
            confident = [False] * len(rows)
        for row, cand, conf in zip(rows, cands, confident):
            self.advance(row, int(cand), bool(conf))

    def run_round(self) -> list:
        """A few iterations over the running rows; returns the requests that finished."""
        ended = []
        for _ in range(self.ITERATIONS_PER_ROUND):
            if not self.rows:
                break
            for name in ("nudger", "base"):  # a row the nudger hands on joins the base's group
                group = [r for r in self.rows if r.finish is None and NEEDS[r.phase] == name]
                if group:
                    self.step(name, group)
            for r in [r for r in self.rows if r.finish is not None]:
                self.rows.remove(r)
                ended.append(r.req)
        return ended

    def completion(self, row: Row):
        from ..params import Completion

        spans = merge_spans(row.pieces)
        ends = [e for _, e, _ in spans]
        nudger = row.tracks["nudger"]

        def from_nudger(char: int) -> bool:
            i = bisect.bisect_right(ends, char)
            return spans[min(i, len(spans) - 1)][2] if spans else True

        stats = {"crossvocab": True, "spans": spans, "base_ids": row.tracks["base"].continuation(),
                 "nudger_ids": nudger.continuation(), "emitted_tokens": row.emitted,
                 "nudged_tokens": row.by_nudger, "handovers": row.handovers,
                 "reencoded_chars": row.reencoded_chars, "prompt_tokens": row.req.prompt_tokens(),
                 "preemptions": row.req.preemptions,
                 "forwards": dict(row.forwards), "forward_tokens": dict(row.forward_tokens)}
        return Completion(text=row.text, token_ids=nudger.continuation(),
                          from_nudger=[from_nudger(c) for c in nudger.starts], finish_reason=row.finish,
                          stats=stats)
