"""Layer 4, training: the demo Llama-style model, sequence-parallel losses, memory features and estimator, data."""
