"""The default pipeline on a tiny budget (under 2 minutes): for smoke tests, not for numbers."""

from matquant_jax.lab import configs


def get_config():
  c = configs.base_config()
  c.model.update(num_layers=2, embed_dim=64, hidden_dim=128, head_dim=16, sliding_window_size=16)
  c.data.update(vocab_size=512, seq_len=32, batch_size=8, eval_batch_size=8, eval_batches=2)
  c.pretrain.update(steps=30, checkpoint_every=15, log_every=5)
  c.qat.update(steps=6, checkpoint_every=3, log_every=3)
  c.eval.mixnmatch = {'pyramid': (2, 8)}
  return c
