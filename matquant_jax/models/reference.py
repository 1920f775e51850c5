"""An independent numpy reference for Llama-family GGUF models (checks the JAX decoder and loader).

It shares no code with models/gemma.py or checkpoints.py: it reads the GGUF
tensors in their stored layout and applies RoPE the way llama.cpp does.
"""

import gguf
import numpy as np


def gguf_llama_nll(path: str, ids) -> float:
  """Mean next-token NLL (nats) of `ids` under a Llama-family GGUF model, computed in float64
  numpy straight from the file, with llama.cpp's interleaved RoPE on the stored Q/K rows."""
  r = gguf.GGUFReader(path)
  t = {x.name: x for x in r.tensors}
  w = lambda n: np.asarray(gguf.dequantize(t[n].data, t[n].tensor_type), np.float64)
  f = lambda k: r.fields[k].contents()
  n_head, n_kv, eps = f('llama.attention.head_count'), f('llama.attention.head_count_kv'), f(
      'llama.attention.layer_norm_rms_epsilon')
  base = f('llama.rope.freq_base')
  emb = w('token_embd.weight')
  x = emb[ids]
  seq, d = x.shape
  hd = d // n_head
  norm = lambda v, g: v / np.sqrt(np.mean(v * v, -1, keepdims=True) + eps) * g
  ang = np.arange(seq)[:, None] * base ** (-np.arange(0, hd, 2) / hd)[None]  # [T, hd/2]
  def rope(v):  # v: [T, heads, hd], pairs (2i, 2i+1)
    a, b = v[..., 0::2], v[..., 1::2]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    out = np.empty_like(v)
    out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
    return out
  causal = np.tril(np.ones((seq, seq), bool))
  for i in range(f('llama.block_count')):
    h = norm(x, w(f'blk.{i}.attn_norm.weight'))
    q = rope((h @ w(f'blk.{i}.attn_q.weight').T).reshape(seq, n_head, hd))
    k = rope((h @ w(f'blk.{i}.attn_k.weight').T).reshape(seq, n_kv, hd))
    v = (h @ w(f'blk.{i}.attn_v.weight').T).reshape(seq, n_kv, hd)
    k, v = np.repeat(k, n_head // n_kv, axis=1), np.repeat(v, n_head // n_kv, axis=1)
    s = np.einsum('qnh,knh->nqk', q, k) / np.sqrt(hd)
    s = np.where(causal, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    x = x + np.einsum('nqk,knh->qnh', p, v).reshape(seq, d) @ w(f'blk.{i}.attn_output.weight').T
    h = norm(x, w(f'blk.{i}.ffn_norm.weight'))
    g, u = h @ w(f'blk.{i}.ffn_gate.weight').T, h @ w(f'blk.{i}.ffn_up.weight').T
    x = x + (g / (1 + np.exp(-g)) * u) @ w(f'blk.{i}.ffn_down.weight').T
  logits = norm(x, w('output_norm.weight')) @ emb.T
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  return float(-np.mean(logp[np.arange(seq - 1), ids[1:]]))
