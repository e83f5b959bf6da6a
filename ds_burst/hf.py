"""``ds_burst.hf``: the Hugging Face attention backend (:mod:`ds_burst.integrations.hf`) and the DeepSpeed ALST
drop-ins used by the HF Trainer / Accelerate / TRL (:mod:`ds_burst.integrations.alst`), under one public name."""

from ds_burst.integrations import hf as _hf
from ds_burst.integrations.alst import (
    BurstSPAttentionHF,
    BurstSPDataLoaderAdapter,
    documents_from_position_ids,
    register_with_transformers,
)
from ds_burst.integrations.hf import *  # noqa: F403

__all__ = [*_hf.__all__, "register_with_transformers", "BurstSPAttentionHF", "BurstSPDataLoaderAdapter",
           "documents_from_position_ids"]
