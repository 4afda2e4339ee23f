"""Installs `weight_averaging`: EMA and LAWA weight averaging for JAX, and AlgoPerf submissions."""

from setuptools import find_packages, setup

setup(
    name="weight_averaging",
    version="0.1.0",
    description=("EMA and LAWA weight averaging for JAX (replicated, sharded or in "
                 "host memory) and AlgoPerf submissions built on them."),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    classifiers=["License :: OSI Approved :: Apache Software License"],
    python_requires=">=3.11",
    packages=find_packages(include=["weight_averaging", "weight_averaging.*"]),
    install_requires=[
        "jax>=0.4.28",
        "jaxlib>=0.4.28",
        "optax>=0.2.2",
        "numpy>=1.24",
        "absl-py",
        "orbax-checkpoint",
        "matplotlib",
        "tqdm",
    ],
    extras_require={
        # flax: the batch-norm workload's model (teacher_student_bn), as AlgoPerf's models.
        "test": ["pytest>=7", "hypothesis>=6", "flax"],
    },
)
