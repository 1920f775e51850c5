"""matquant_jax: Matryoshka Quantization in JAX/Flax."""

from setuptools import find_packages, setup

# Ranges a user's environment may satisfy; the tested pins are in constraints.txt (`make setup`).
INSTALL_REQUIRES = [
    'jax>=0.10.2,<0.12',
    'flax>=0.12.8,<0.13',
    'optax>=0.2.8,<0.3',
    'orbax-checkpoint>=0.12.8,<0.13',
    'ml_collections>=1.1',
    'tensorflow-datasets>=4.9.10,<5',
    'array_record>=0.8.6',
    'importlib_resources>=6',  # tensorflow-datasets needs it for builders in packages
    'absl-py>=2.5',
    'sentencepiece>=0.2.3',
    'tensorboardX>=2.6',
    'tqdm>=4.66',
    'matplotlib>=3.8',
    'numpy>=1.26',
    'ml_dtypes>=0.5',  # bfloat16 in numpy
    'safetensors>=0.8',  # Hugging Face checkpoints and the parent artifact
    'gguf>=0.19,<0.20',  # GGUF checkpoints (dequantized with its numpy kernels)
    'tokenizers>=0.23',  # tokenizer.json and GGUF byte-level BPE vocabularies
    'filelock>=3.12',  # jobs (and test workers) sharing a data dir build it once
]

setup(
    name='matquant_jax',
    version='0.1.0',
    description='Matryoshka Quantization (MatQuant) of LLMs in JAX/Flax',
    python_requires='>=3.11',
    packages=find_packages(include=['matquant_jax', 'matquant_jax.*']),
    install_requires=INSTALL_REQUIRES,
    # The suite also executes the Colab notebooks (colabs/) in a local kernel; `make test` runs
    # it on two workers (pytest-xdist), one test file per worker at a time.
    # `make bench` also judges exported GGUF files with llama.cpp through llama-cpp-python's
    # ctypes binding (built from its sdist by evals.llama_cpp), which imports these.
    extras_require={'test': ['pytest>=9', 'pytest-xdist>=3.8', 'nbclient>=0.11', 'nbformat>=5.11',
                             'ipykernel>=7'],
                    'bench': ['diskcache>=5.6', 'jinja2>=3.1']},
)
