"""The embedded data: the TFDS builder `shakespeare_plays` (`shakespeare`), its SentencePiece
vocabulary (`vocab`) and deterministic batches (`pipeline`)."""

from matquant_jax.data import pipeline, shakespeare, vocab
from matquant_jax.data.pipeline import default_data_dir, eval_batches, load_tokens, train_batch
