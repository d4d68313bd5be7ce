from setuptools import find_packages, setup

setup(
    name="trainer_lib",
    version="0.1.0",
    description="Supervised fine-tuning and KTO alignment of causal language models, behind one call; documentation in docs/, starting from README.md.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["trainer_lib", "trainer_lib.*"]),
    package_data={"trainer_lib": ["assets/*"]},
    python_requires=">=3.10",
    install_requires=[
        # torch is bounded above so that a machine with the CPU build installed keeps it,
        # instead of resolving to the newest release with several GB of CUDA wheels.
        "torch>=2.4,<=2.13.0",
        "transformers>=4.56",
        "accelerate>=1.4",
        "deepspeed>=0.16",
        "peft>=0.14",
        "datasets>=3.0",
        "pyarrow>=15",  # the prepared data's tables (also a dependency of datasets)
        "xxhash>=3.0",  # checkpoint checksums and run identity (also a dependency of datasets)
        "wandb>=0.19",
        "numpy>=1.26",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "safetensors>=0.4",
        "tensorboard>=2.15",
    ],
    extras_require={
        "dev": ["pytest>=8", "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6"],
        "bench": ["trl>=1.0", "psutil>=5.9"],
    },
    entry_points={"console_scripts": ["trainer-lib=trainer_lib.cli:main"]},
)
