"""Paged KV cache: one page pool per model, a block allocator, and the attention metadata.

Layout, per layer: k_pages and v_pages of shape [num_pages, page_size, num_kv_heads, head_dim].
A token at position `pos` of a sequence lives in page `block_table[pos // page_size]`, offset
`pos % page_size`; its flat slot is `page * page_size + offset`.

Pages are handed out on demand, between decode rounds (the engine's scheduler): before a round
every running row holds pages for every position the round can write, so the decode loop itself
never allocates. One extra page per pool, the *scratch page*, is never handed out: block-table
entries past a row's pages point at it, so a stray write can never land in another row's KV.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelSpec


class KVPoolExhausted(RuntimeError):
    """A request needs more KV pages than the pool has free."""


class RequestTooLarge(KVPoolExhausted, ValueError):
    """A request needs more KV pages than the whole pool holds: it could never run (a bad request,
    refused at add_request; smaller requests wait for pages instead)."""


@dataclass
class AttentionMetadata:
    """Everything attention needs about the current forward, passed explicitly (no globals).

    Tokens of the forward are flattened over the batch. Row b's queries are the last q_len_b tokens
    of its sequence: positions seq_lens[b] - q_len_b ... seq_lens[b] - 1, already stored in the
    pages through slot_mapping before attention reads them.
    """
    slot_mapping: torch.Tensor        # int64 [T]; negative = do not store (padding)
    block_tables: torch.Tensor        # int32 [B, max_pages]
    seq_lens: torch.Tensor            # int32 [B], KV length including this forward's tokens
    cu_q_lens: torch.Tensor | None    # int32 [B+1]; None means one query per row (decode)
    max_q_len: int = 1

    @property
    def is_decode(self) -> bool:
        return self.cu_q_lens is None


class BlockAllocator:
    """Free list of page ids. Host-side: used at admission and release only."""

    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int, *, what: str = "request") -> list[int]:
        if n > len(self._free):
            raise KVPoolExhausted(
                f"{what} needs {n} KV pages but only {len(self._free)} of {self.num_pages} are free; "
                "use a shorter prompt or max_new_tokens, a smaller batch, or a larger kv_cache_tokens")
        pages = [self._free.pop() for _ in range(n)]
        return pages

    def free(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)


class KVPool:
    """The page pool of one model, all layers."""

    def __init__(self, spec: ModelSpec, num_pages: int, page_size: int, dtype: torch.dtype, device: torch.device):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"KV pool needs num_pages >= 1 and page_size >= 1 (got {num_pages}, {page_size})")
        self.page_size = page_size
        self.num_pages = num_pages  # pages that can be handed out
        self.scratch_page = num_pages  # never handed out: the target of unused block-table entries
        shape = (num_pages + 1, page_size, spec.num_kv_heads, spec.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.num_layers)]
        self.allocator = BlockAllocator(num_pages)

    def pages_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.page_size)

    @staticmethod
    def bytes_per_token(spec: ModelSpec, dtype: torch.dtype) -> int:
        return 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * torch.tensor([], dtype=dtype).element_size()


def slots_for(block_tables: torch.Tensor, positions: torch.Tensor, page_size: int) -> torch.Tensor:
    """Flat slot of each (row, position): block_tables [B, P] with positions [B, Q] -> int64 [B, Q]."""
    pages = torch.gather(block_tables, 1, (positions // page_size).to(torch.int64))
    return pages.to(torch.int64) * page_size + positions % page_size
