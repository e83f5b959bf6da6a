"""ds-burst: BurstAttention sequence parallelism for DeepSpeed."""

from setuptools import find_packages, setup

setup(
    name="ds-burst",
    version="0.1.0",
    description="BurstAttention: topology-aware ring attention for long-context training with DeepSpeed",
    python_requires=">=3.10",
    packages=find_packages(include=["ds_burst", "ds_burst.*"]),
    # the cost model's default rates (measured figures with their sources), read at import
    package_data={"ds_burst.core": ["rates/*.json"]},
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton>=3.0"],
        "deepspeed": ["deepspeed>=0.16"],
        "hf": ["transformers>=4.48", "accelerate>=1.0"],
        "train": ["deepspeed>=0.16", "wandb", "tqdm", "matplotlib"],
        "dev": ["pytest", "pytest-timeout", "ruff"],
    },
)
