"""Local attention kernels (installed as ``ds_burst.kernels``): Triton tiles and their PyTorch references.

Nothing here uses ``torch.distributed``; the ring schedules call these per block.
"""
