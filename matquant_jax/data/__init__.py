"""The embedded data: the TFDS builder `shakespeare_plays`, its SentencePiece vocabulary and
deterministic batches.
"""

from matquant_jax.data import pipeline, shakespeare, vocab
