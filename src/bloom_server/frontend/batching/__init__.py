"""How queued requests become steps for the ranks: `dynamic` (whole generate calls, one batch at a time) and
`continuous` (rows join and leave a running batch every step)."""
