"""What both batchers are built with: the rows in one batch, the queue's two bounds and the Retry-After estimate, and
the token ids every row carries.

The queue is bounded twice: in requests and in tokens (prompt + max new tokens). Past either bound a request is
refused at once (Overloaded -> 429 with Retry-After); a request already accepted is never dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from bloom_server.errors import Overloaded


@dataclass(frozen=True)
class BatcherConfig:
    max_batch_size: int  # rows in one batch (a request's rows always go together)
    max_queued: int  # requests waiting
    pad_token_id: int
    eos_token_id: int | None
    max_queued_tokens: int | None = None  # tokens waiting (None: no bound)

    def check(
        self, depth: int, queued_tokens: Callable[[], int], tokens: int, retry_after: Callable[[], float]
    ) -> None:
        """Refuse a request at once (Overloaded) when `depth` requests already wait, or when its `tokens` would take
        the waiting tokens past the bound (a request alone in the queue is always admitted: it was checked against
        the engine's limits). `queued_tokens` and `retry_after` are asked only for a refusal."""
        if depth >= self.max_queued:
            raise Overloaded(f"{depth} requests are queued (the limit is {self.max_queued})", retry_after())
        if self.max_queued_tokens is not None and depth:
            queued = queued_tokens()
            if queued + tokens > self.max_queued_tokens:
                raise Overloaded(
                    f"{queued} tokens are queued; this request needs {tokens} more "
                    f"(the limit is {self.max_queued_tokens})",
                    retry_after(),
                )

    def retry_after(self, waiting: int, seconds: float) -> float:
        """Seconds until a slot is likely free: one batch plus the batches `waiting` (requests or rows) fill, each
        taking `seconds` (the batcher's recent pace), between 1 and 60."""
        ahead = 1 + math.ceil(waiting / self.max_batch_size)
        return max(1.0, min(60.0, ahead * seconds))
