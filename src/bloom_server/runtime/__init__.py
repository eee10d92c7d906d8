"""Same code on every rank: process groups, the control channel, and the lockstep loop."""
