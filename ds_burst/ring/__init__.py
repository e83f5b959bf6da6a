"""Layer 2, the ring: the engine that moves payloads along ring passes, the forward and the two backward
patterns, the double ring and Ulysses-inside/ring-across schedules, and the ring's buffer pool."""
