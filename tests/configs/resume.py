"""Float pretraining only, checkpointed every 4 steps: the kill-and-resume test's config."""

from matquant_jax.lab import configs


def get_config():
  c = configs.base_config()
  c.model.update(num_layers=2, embed_dim=64, hidden_dim=128, head_dim=16, sliding_window_size=16)
  c.data.update(vocab_size=512, seq_len=32, batch_size=8, eval_batch_size=8, eval_batches=1)
  c.pretrain.update(steps=120, checkpoint_every=4, log_every=4)
  c.runs = []
  c.eval.update(bits=(2,), mixnmatch={})
  return c
