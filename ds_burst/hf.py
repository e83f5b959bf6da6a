"""``ds_burst.hf``: the Hugging Face attention backend (:mod:`ds_burst.integrations.hf`), under its public name."""

from ds_burst.integrations.hf import *  # noqa: F403
from ds_burst.integrations.hf import __all__  # noqa: F401
