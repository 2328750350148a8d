"""megadrp: DRPruning (distributionally robust structured pruning) on DeepSpeed ZeRO-3.

torch is left unpinned on purpose: install the build for your machine first (the Makefile
installs the CPU wheel; on a GPU cluster install the CUDA build your drivers need), so
that pip never swaps it for a multi-GB build you did not ask for.
"""
from setuptools import find_packages, setup

setup(
    name="megadrp",
    version="0.1.0",
    description="DRPruning: L0 structured pruning of Llama models with distributionally robust domain weights",
    packages=find_packages(include=["megadrp", "megadrp.*"]) + ["megadrp.configs", "megadrp.ds_configs"],
    # The recipes and DeepSpeed JSONs stay at the top of the checkout, where users and the Slurm
    # scripts name them; installed, they live inside the package (megadrp/resources.py finds them).
    package_dir={"megadrp.configs": "configs", "megadrp.ds_configs": "ds_configs"},
    package_data={"megadrp.configs": ["*.yaml", "tiny/*.yaml"], "megadrp.ds_configs": ["*.json"]},
    entry_points={"console_scripts": ["megadrp = megadrp.cli:main"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.5",  # scaled_dot_product_attention(enable_gqa=...) is 2.5's
        "deepspeed>=0.15",
        "transformers>=4.45",
        "sentencepiece>=0.2",
        "safetensors>=0.4",
        "numpy>=1.24",
        "scipy>=1.10",
        "pyyaml>=6",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "wandb>=0.16",
        "pyarrow>=14",  # data_tools: CulturaX ships parquet
        "zstandard>=0.22",  # data_tools: SlimPajama ships .jsonl.zst
    ],
    extras_require={
        "mpi": ["mpi4py>=3.1"],
        # megadrp.evaluate --tasks: downstream accuracy with lm-evaluation-harness, the harness
        # published numbers use (its HF backend needs accelerate)
        "eval": ["lm_eval>=0.4.5", "accelerate>=0.26"],
        # pytest-timeout: a hung test fails with its stack instead of holding CI until its limit
        "test": ["pytest>=7", "pytest-timeout>=2.1", "megatron-core>=0.9", "lm_eval>=0.4.5", "accelerate>=0.26"],
    },
)
