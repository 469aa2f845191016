"""dalle_jax: DALL·E, DALL·E mini, CLIP and the diffusion family in JAX/Flax, at pod scale."""
from setuptools import find_packages, setup

setup(
    name="dalle_jax",
    version="0.1.0",
    description="Text-to-image models (VQGAN, DALL·E, DALL·E mini, CLIP, diffusion) in JAX/Flax",
    packages=find_packages(include=["dalle_jax", "dalle_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.11",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "ml_collections>=1.0",
        "absl-py>=2.0",
        "numpy>=1.26",
        "pillow>=10.0",
        "tqdm>=4.66",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "protobuf>=4.0",  # transformers reads SentencePiece protos (T5 spiece.model -> tokenizer.json)
        "transformers>=4.45",
        "tensorflow-datasets>=4.9.7",
        "array-record>=0.5",
        "grain>=0.2.10",
        "tensorboardX>=2.6",
        "scipy>=1.11",
        "etils[epath]>=1.5",
        "emoji>=2.0",
        "msgpack>=1.0",
    ],
    extras_require={
        # gs:// workdirs and data: epath's fsspec route and orbax's bucket checks.
        "gcs": ["gcsfs>=2024.2", "google-cloud-storage>=2.14"],
        # Reference packages for the parity tests and benchmarks (CPU torch).
        "test": ["pytest>=8.0", "pytest-xdist>=3.5", "torch==2.13.0", "min-dalle==0.4.11",
                 "diffusers==0.42.1"],
    },
)
