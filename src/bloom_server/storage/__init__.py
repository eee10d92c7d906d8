"""Model files on disk, torch-free: resolving and checking a model directory, the completion marker, the download,
safetensors headers and read plans, the load's prefetcher, the embedded tiny model. Standard library (and third-party
packages) only, plus errors.py: the cold start reads from here before torch is imported."""
