"""Layer 6, command-line entry points (``python -m ds_burst.plan``, calibration)."""
