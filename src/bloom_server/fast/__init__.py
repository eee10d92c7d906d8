"""The project's own BLOOM engine in plain PyTorch (learned from gpt-fast's shape, written here).

Pieces, top to bottom:
  catalog.py   the BLOOM tensor list, once: names, full shapes, tensor-parallel split, engine fields
  engine.py    FastEngine: slots of a preallocated KV cache, `prefill` / `decode` / `generate`, CUDA graphs per bucket
  fusion.py    the decode step's fusion variants and the default
  model.py     the BLOOM forward for one rank: embeddings, ALiBi attention over the slot cache, MLP, tied head
  sampling.py  next-token choice on the device (greedy, temperature, top-k, top-p, penalties), no host syncs
  weights.py   checkpoint tensors -> this rank's shards (safetensors slices: a rank reads only its share)
  loaders.py   the field loaders: maintained libraries (fastsafetensors, runai-model-streamer, instanttensor) reading
               safetensors files onto the device, for weights.py when the loader setting names one
  tp.py        the tensor-parallel layout (which dim each tensor is split on) and the collectives
  shapes.py    model shapes (from config.json, or the published 560m / 7b1 / 176b presets)
  rows.py      RowScheduler: the engine-side holder of continuous batching's live rows (joins, chunked prefill,
               decode steps, leaves) over the engine's slots
  prefix_cache.py  KV of recent prompt prefixes in blocks (bounded, LRU), copied into a joining row's slot
  triton_kernels.py  the fused decode kernels (GEMVs with epilogues, decode attention)
  preshard.py  `bloom-server preshard`: a checkpoint split into one file per rank
  coldstart/   the kernels compiled ahead of time (workers, the kernel cache seed, `bloom-server precompile`)

Importing this package imports nothing heavy; the modules that need torch import it themselves.
"""
