"""matquant_jax: Matryoshka Quantization in JAX/Flax."""

from setuptools import find_packages, setup

# A tested set (Python 3.11, 2026-11); `make setup` installs exactly these.
INSTALL_REQUIRES = [
    'jax>=0.10.2,<0.12',
    'flax==0.12.8',
    'optax==0.2.8',
    'orbax-checkpoint==0.12.8',
    'ml_collections==1.1.0',
    'tensorflow-datasets==4.9.10',
    'array_record==0.8.6',
    'importlib_resources>=6',  # tensorflow-datasets needs it for builders in packages
    'absl-py==2.5.1',
    'sentencepiece==0.2.3',
    'tensorboardX==2.6.5',
    'tqdm>=4.66',
    'matplotlib>=3.8',
    'numpy>=1.26',
    'ml_dtypes>=0.5',  # bfloat16 in numpy
    'safetensors==0.8.0',  # Hugging Face checkpoints and the parent artifact
    'gguf==0.19.0',  # GGUF checkpoints (dequantized with its numpy kernels)
    'tokenizers==0.23.3',  # tokenizer.json and GGUF byte-level BPE vocabularies
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
    extras_require={'test': ['pytest==9.2.0', 'pytest-xdist==3.8.0', 'nbclient==0.11.0', 'nbformat==5.11.1',
                             'ipykernel==7.4.0']},
)
