"""The fast engine's cold start: the Triton kernels compiled ahead of time (worker processes, the kernel cache seed,
`bloom-server precompile`)."""
