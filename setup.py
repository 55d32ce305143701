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
        "test": ["pytest>=8", "hypothesis>=6"],
    },
    entry_points={
        "console_scripts": [
            "moba-pretrain = moba_megatron.pretrain:main",
            "moba-demo = moba_megatron.demo:main",
        ]
    },
)
