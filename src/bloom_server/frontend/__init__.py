"""Rank 0 only, torch-free: tokenizer, request validation, dynamic batching, and the asyncio face of the model."""
