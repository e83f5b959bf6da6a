"""ds-burst: BurstAttention distributed attention for long-context training with DeepSpeed.

Public API::

    q_loc = ds_burst.shard_sequence(q, dim=1, group=None, layout="zigzag")
    out = ds_burst.burst_attn_func(q_loc, k_loc, v_loc, causal=True, group=None, layout="zigzag")
    full = ds_burst.gather_sequence(out, dim=1, group=None, layout="zigzag")
"""

from .attention import burst_attn_func
from .comm import comm_stats, reset_comm_stats
from .relayout import gather_sequence, shard_sequence

__version__ = "0.1.0"

__all__ = ["burst_attn_func", "shard_sequence", "gather_sequence", "comm_stats", "reset_comm_stats", "__version__"]
