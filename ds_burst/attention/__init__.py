"""Layer 3, the public op: ``burst_attn_func``, its cached call plan, validation, the autograd function,
selective checkpointing and the typed options (``BurstConfig``)."""
