"""Text in and out: tokenizers (`tokenization`) and the `Sampler` (`sampler`)."""

from matquant_jax.text import sampler, tokenization
from matquant_jax.text.sampler import SampleOutput, Sampler, Sampling
from matquant_jax.text.tokenization import Tokenizer
