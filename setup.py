"""ds-burst: BurstAttention sequence parallelism for DeepSpeed."""

from setuptools import setup

setup(
    name="ds-burst",
    version="0.1.0",
    description="BurstAttention: topology-aware ring attention for long-context training with DeepSpeed",
    python_requires=">=3.10",
    # The Triton kernels live in the top-level folder kernels/ but install as ds_burst.kernels,
    # so no top-level package named `kernels` shadows Hugging Face's.
    packages=["ds_burst", "ds_burst.schedules", "ds_burst.kernels"],
    package_dir={"ds_burst": "ds_burst", "ds_burst.schedules": "ds_burst/schedules", "ds_burst.kernels": "kernels"},
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton>=3.0"],
        "deepspeed": ["deepspeed>=0.16"],
        "hf": ["transformers>=4.48"],
        "train": ["deepspeed>=0.16", "wandb", "tqdm", "matplotlib"],
        "dev": ["pytest", "pytest-timeout", "ruff"],
    },
)
