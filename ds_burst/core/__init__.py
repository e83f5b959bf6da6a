"""Layer 0, pure Python (no torch): options, settings, sequence layouts, masks by global position, the ring's
step plan, byte counts and the cost model."""
