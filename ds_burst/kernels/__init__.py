"""Layer 1, local attention tiles: the PyTorch reference (also the CPU path), Triton, torch's fused SDPA ops,
the kernel registry and the measured ``auto`` choice. No ``torch.distributed`` here."""
