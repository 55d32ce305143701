from setuptools import find_packages, setup

setup(
    name="moba-megatron",
    version="0.1.0",
    description="MoBA (Mixture of Block Attention) as a first-class attention of megatron-core",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["moba_megatron", "moba_megatron.*"]),
    python_requires=">=3.12",
    install_requires=[
        "torch>=2.9",
        "megatron-core>=0.19,<0.20",
        "pyyaml>=6",
        "psutil",  # megatron-core's dist_checkpointing needs it for checkpoints
    ],
    extras_require={
        "flash": ["flash-attn>=2.8"],
        "te": ["transformer-engine[pytorch]"],
        "hf": ["transformers>=4.56", "tokenizers>=0.21", "safetensors>=0.4", "tqdm"],
        "plot": ["matplotlib>=3.8"],
        "test": ["pytest>=8", "hypothesis>=6", "tensorboard", "transformers>=4.56", "tokenizers>=0.21",
                 "safetensors>=0.4", "tqdm", "matplotlib>=3.8", "ruff>=0.6"],
    },
    entry_points={
        "console_scripts": [
            "moba-pretrain = moba_megatron.pretrain:main",
            "moba-demo = moba_megatron.demo:main",
            "moba-convert = moba_megatron.tools.convert:main",
        ]
    },
)
