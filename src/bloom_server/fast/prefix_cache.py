"""KV of recent prompt prefixes, kept on the device in blocks of `block` tokens, so that a row whose prompt starts
with a cached prefix copies its keys and values into its slot and computes only the rest.

Keys: block b of a prompt is found by (the id of the block before it, its own tokens), a chain from the first block,
so a block matches only after the same whole prefix, exactly (a trie over blocks; no hash of the tokens can
collide). BLOOM's ALiBi bias depends only on a key's position, and a cached block sits at the same positions in
every prompt it starts, so its K/V are copied as they are (no position fix-up, unlike rotary embeddings).

A lookup reuses at most the prompt's full blocks before its last token (the last token's logits are needed, so at
least one token is always computed). After a row's prompt is in its slot, its full blocks not yet cached are copied
out (`insert`). Memory: `capacity_bytes` on this rank, as pages of one block each ([layers, heads, tokens, head dim]
for K and for V, in one tensor each), allocated at construction; when full, the least recently used block goes
first. A lookup or an insert touches a chain from its last block back to its first, so a block is always more
recent than the blocks after it: eviction takes a chain's tail before its head, and no reachable block is ever
orphaned. Every rank holds the same blocks (the decisions depend on the tokens only), each its share of the heads.

Copies are queued on the device like kernels (index tensors through `to_device`: no host sync), in stream order with
the prefills that write the slots and the decodes that read them.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from bloom_server.fast.sampling import to_device

# Tokens per block: the granularity of a match (up to block - 1 tokens of a shared prefix are recomputed) and of the
# bookkeeping (one dictionary entry per block).
BLOCK_TOKENS = 32
# The size when none is set, on a GPU: a quarter of the device memory the load left free (the rest stays for the
# prefill's temporaries), at most 4 GiB, the size that held every shared prefix in the run that measured the cache
# (docs/results/fast-engine.md "Chunked prefill and the prefix cache").
AUTO_FREE_FRACTION = 0.25
AUTO_MAX_BYTES = 4 << 30


def auto_capacity(free_bytes: int) -> int:
    """The cache's bytes when its size is not set, from the device memory free on the emptiest rank."""
    return int(min(AUTO_MAX_BYTES, max(0, free_bytes) * AUTO_FREE_FRACTION))


@dataclass(eq=False)
class _Block:
    id: int
    key: tuple[int, tuple[int, ...]]  # (parent block id, 0 for none; its tokens)
    page: int


class PrefixCache:
    def __init__(self, engine: Any, capacity_bytes: int, block: int = BLOCK_TOKENS):
        self.engine = engine
        self.block = block
        k = engine.k_cache  # [layers, slots, heads, max_seq, D]
        L, _, hp, _, D = k.shape
        self.page_bytes = 2 * L * hp * block * D * k.element_size()
        self.pages = int(capacity_bytes // self.page_bytes)
        if self.pages < 1:
            raise ValueError(f"a prefix cache of {capacity_bytes} bytes holds no block of {self.page_bytes} bytes")
        self.k = torch.zeros((L, hp, self.pages * block, D), dtype=k.dtype, device=k.device)
        self.v = torch.zeros_like(self.k)
        self._index: dict[tuple[int, tuple[int, ...]], _Block] = {}
        self._lru: collections.OrderedDict[int, _Block] = collections.OrderedDict()  # least recent first
        self._free = list(range(self.pages - 1, -1, -1))
        self._ids = itertools.count(1)
        self.hits = 0  # lookups that reused at least one block
        self.misses = 0  # lookups that reused none
        self.hit_tokens = 0  # prompt tokens not computed thanks to the cache
        self.evictions = 0  # blocks dropped to make room

    @property
    def capacity_bytes(self) -> int:
        return self.pages * self.page_bytes

    @property
    def bytes(self) -> int:
        return len(self._lru) * self.page_bytes

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "hit_tokens": self.hit_tokens, "bytes": self.bytes,
                "capacity_bytes": self.capacity_bytes, "evictions": self.evictions}  # fmt: skip

    def _chain(self, prompt: Sequence[int], blocks: int) -> list[_Block]:
        """The cached blocks that start the prompt, at most `blocks` of them, in order."""
        chain: list[_Block] = []
        parent, n = 0, self.block
        for b in range(blocks):
            found = self._index.get((parent, tuple(prompt[b * n : (b + 1) * n])))
            if found is None:
                break
            chain.append(found)
            parent = found.id
        return chain

    def _touch(self, chain: list[_Block]) -> None:
        for blk in reversed(chain):  # the first block ends most recent: tails are evicted before heads
            self._lru.move_to_end(blk.id)

    def _positions(self, chain: list[_Block]) -> torch.Tensor:
        n = self.block
        return to_device([blk.page * n + t for blk in chain for t in range(n)], self.k.device)

    def cached(self, prompt: Sequence[int]) -> int:
        """Tokens `load` would copy for this prompt now (whole blocks before its last token); nothing changes."""
        return len(self._chain(prompt, (len(prompt) - 1) // self.block)) * self.block

    def load(self, slot: int, prompt: Sequence[int]) -> int:
        """Copy the longest cached prefix of the prompt (whole blocks, before its last token) into the slot's
        positions [0, P); returns P (0: a miss)."""
        chain = self._chain(prompt, (len(prompt) - 1) // self.block)
        if not chain:
            self.misses += 1
            return 0
        self._touch(chain)
        P = len(chain) * self.block
        at = self._positions(chain)
        e = self.engine
        e.k_cache[:, slot, :, :P] = self.k.index_select(2, at)
        e.v_cache[:, slot, :, :P] = self.v.index_select(2, at)
        e.hold(slot, P)
        self.hits += 1
        self.hit_tokens += P
        return P

    def insert(self, rows: Sequence[tuple[int, Sequence[int]]]) -> None:
        """Each (slot, prompt) is in its slot (positions [0, len)): its full blocks not cached yet are copied out,
        evicting the least recently used blocks when the pages are full (never one of that prompt's own chain). The
        rows of one step go in order (a later row finds an earlier row's blocks) and are copied out together: one
        gather and one copy for K and for V, whatever the number of rows."""
        n = self.block
        writes: dict[int, tuple[int, int]] = {}  # page -> (slot, first position): a page reused later keeps the last
        for slot, prompt in rows:
            full = len(prompt) // n
            chain = self._chain(prompt, full)
            self._touch(chain)
            mine = {blk.id for blk in chain}
            parent = chain[-1].id if chain else 0
            new: list[_Block] = []
            for b in range(len(chain), full):
                if self._free:
                    page = self._free.pop()
                else:
                    victim = next(iter(self._lru.values()))
                    if victim.id in mine:
                        break  # the cache is this prompt's own chain: keep it
                    del self._lru[victim.id], self._index[victim.key]
                    self.evictions += 1
                    page = victim.page  # maybe an earlier row's block of this call: its write is replaced below
                blk = _Block(next(self._ids), (parent, tuple(prompt[b * n : (b + 1) * n])), page)
                self._index[blk.key] = blk
                self._lru[blk.id] = blk
                mine.add(blk.id)
                new.append(blk)
                writes[page] = (slot, b * n)
                parent = blk.id
            self._touch(chain + new)
        if not writes:
            return
        pages = list(writes)
        t = range(n)
        dst = to_device([p * n + i for p in pages for i in t], self.k.device)
        src_slot = to_device([writes[p][0] for p in pages for _ in t], self.k.device)
        src_pos = to_device([writes[p][1] + i for p in pages for i in t], self.k.device)
        e = self.engine
        # [tokens, layers, heads, D] (separated index dims go first) -> the pages' layout [layers, heads, tokens, D]
        self.k.index_copy_(2, dst, e.k_cache[:, src_slot, :, src_pos].permute(1, 2, 0, 3))
        self.v.index_copy_(2, dst, e.v_cache[:, src_slot, :, src_pos].permute(1, 2, 0, 3))
