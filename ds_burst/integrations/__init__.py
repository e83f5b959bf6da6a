"""Layer 5, integrations: the DeepSpeed drop-ins (``DistributedAttention``, ALST's classes), ZeRO-3
initialisation and the Hugging Face attention backend."""
