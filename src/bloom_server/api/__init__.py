"""HTTP, rank 0 only. Never imports torch or backends."""
