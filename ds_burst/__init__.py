"""ds-burst: BurstAttention distributed attention for long-context training with DeepSpeed.

Public API::

    q_loc = ds_burst.shard_sequence(q, dim=1, group=None, layout="zigzag")
    out = ds_burst.burst_attn_func(q_loc, k_loc, v_loc, causal=True, group=None, layout="zigzag")
    full = ds_burst.gather_sequence(out, dim=1, group=None, layout="zigzag")
    out, max_logit = ds_burst.burst_attn_func(q_loc, k_loc, v_loc, return_max_logit=True)   # QK-clip
    per_layer = ds_burst.reduce_max_logits([max_logit, ...])   # once per step, the whole sequence's

DeepSpeed integration::

    topo = ds_burst.init_sequence_parallel(8)            # SP/DP groups, a DeepSpeed mpu
    attn = ds_burst.DistributedAttention(local_attn, topo.get_sequence_parallel_group())  # Ulysses drop-in
    engine, *_ = ds_burst.deepspeed_initialize(model, ds_config, topo)  # deepspeed.initialize(mpu=topo), ZeRO-3 safe
"""

from ds_burst.attention.api import burst_attn_func
from ds_burst.attention.config import BurstConfig
from ds_burst.attention.max_logit import pop_max_logits, reduce_max_logits
from ds_burst.dist.comm import CommTimeoutError, comm_stats, reset_comm_stats, set_comm_timeout
from ds_burst.dist.relayout import gather_sequence, shard_sequence
from ds_burst.dist.topology import Topology, get_topology, init_sequence_parallel
from ds_burst.integrations.deepspeed import DistributedAttention, patch_deepspeed, unpatch_deepspeed
from ds_burst.integrations.zero import deepspeed_initialize

__version__ = "0.1.0"

__all__ = [
    "burst_attn_func",
    "reduce_max_logits",
    "pop_max_logits",
    "shard_sequence",
    "gather_sequence",
    "comm_stats",
    "reset_comm_stats",
    "set_comm_timeout",
    "CommTimeoutError",
    "init_sequence_parallel",
    "get_topology",
    "Topology",
    "deepspeed_initialize",
    "BurstConfig",
    "DistributedAttention",
    "patch_deepspeed",
    "unpatch_deepspeed",
    "__version__",
]
