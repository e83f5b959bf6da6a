"""Ring schedules (no Triton, no direct torch.distributed): one file per schedule."""
