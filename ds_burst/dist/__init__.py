"""Layer 1, the only ``torch.distributed`` user: groups, batched P2P, collectives, the SP topology (a DeepSpeed
``mpu``) and relayouts between contiguous and zigzag shards."""
