"""Independent numpy references for GGUF models (Llama family, Gemma 3): they check the JAX
decoder and the loaders.

They share no code with models/gemma.py or checkpoints.py: they read the GGUF
tensors in their stored layout and compute the way llama.cpp's graphs do
(interleaved RoPE on the stored Llama Q/K rows; for Gemma 3 the stored norm
weights, which already hold 1 + scale, and its layer pattern and RoPE bases).
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
  logp = _log_softmax(norm(x, w('output_norm.weight')) @ emb.T)
  return float(-np.mean(logp[np.arange(seq - 1), ids[1:]]))


def _log_softmax(logits):
  logp = logits - logits.max(-1, keepdims=True)
  return logp - np.log(np.exp(logp).sum(-1, keepdims=True))


def gguf_gemma3_forward(path: str, ids, keep_rows=()) -> tuple[float, np.ndarray]:
  """(mean next-token NLL in nats, logits at `keep_rows`) of `ids` (BOS included by the caller)
  under a llama.cpp 'gemma3' GGUF file, in float64: embeddings * sqrt(D); per layer RMSNorm by the
  stored weight, QK-norm, half-split RoPE (base 10k on sliding layers, the file's base on every
  sixth, global, layer), GQA, sliding window, post norms, GeGLU (tanh); tied head, no soft caps."""
  r = gguf.GGUFReader(path)
  t = {x.name: x for x in r.tensors}
  w = lambda n: np.asarray(gguf.dequantize(t[n].data, t[n].tensor_type), np.float64)
  f = lambda k, d=None: r.fields[f'gemma3.{k}'].contents() if f'gemma3.{k}' in r.fields else d
  n_head, n_kv, hd = f('attention.head_count'), f('attention.head_count_kv'), f('attention.key_length')
  eps, window, layers = f('attention.layer_norm_rms_epsilon'), f('attention.sliding_window'), f('block_count')
  ids = np.asarray(ids)
  emb = w('token_embd.weight')
  x = emb[ids] * np.sqrt(emb.shape[1])
  seq = len(ids)
  norm = lambda v, g: v / np.sqrt(np.mean(v * v, -1, keepdims=True) + eps) * g
  pos = np.arange(seq)
  def rope(v, base, scale):  # v: [T, heads, hd]; rotate halves (NEOX order)
    ang = (pos[:, None] / scale) * base ** (-np.arange(0, hd, 2) / hd)[None]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    a, b = v[..., :hd // 2], v[..., hd // 2:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)
  scale_q = hd**-0.5 if layers != 62 else (emb.shape[1] // n_head)**-0.5
  dist = pos[:, None] - pos[None, :]
  gelu = lambda g: 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3)))
  for i in range(layers):
    local = i % 6 < 5
    base, scale = (10_000.0, 1.0) if local else (f('rope.freq_base'), f('rope.scaling.factor', 1.0))
    allowed = (dist >= 0) & (dist < window) if local else dist >= 0
    h = norm(x, w(f'blk.{i}.attn_norm.weight'))
    q = (h @ w(f'blk.{i}.attn_q.weight').T).reshape(seq, n_head, hd)
    k = (h @ w(f'blk.{i}.attn_k.weight').T).reshape(seq, n_kv, hd)
    v = (h @ w(f'blk.{i}.attn_v.weight').T).reshape(seq, n_kv, hd)
    q = rope(norm(q, w(f'blk.{i}.attn_q_norm.weight')), base, scale) * scale_q
    k = rope(norm(k, w(f'blk.{i}.attn_k_norm.weight')), base, scale)
    k, v = np.repeat(k, n_head // n_kv, axis=1), np.repeat(v, n_head // n_kv, axis=1)
    s = np.where(allowed, np.einsum('qnh,knh->nqk', q, k), -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    a = np.einsum('nqk,knh->qnh', p, v).reshape(seq, n_head * hd) @ w(f'blk.{i}.attn_output.weight').T
    x = x + norm(a, w(f'blk.{i}.post_attention_norm.weight'))
    h = norm(x, w(f'blk.{i}.ffn_norm.weight'))
    g, u = h @ w(f'blk.{i}.ffn_gate.weight').T, h @ w(f'blk.{i}.ffn_up.weight').T
    m = (gelu(g) * u) @ w(f'blk.{i}.ffn_down.weight').T
    x = x + norm(m, w(f'blk.{i}.post_ffw_norm.weight'))
  x = norm(x, w('output_norm.weight'))
  nll, kept = [], {}
  for start in range(0, seq, 128):  # the 262k-entry head, 128 rows at a time
    rows = np.arange(start, min(start + 128, seq))
    logits = x[rows] @ emb.T
    logp = _log_softmax(logits)
    nll += [-logp[j, ids[r + 1]] for j, r in enumerate(rows) if r + 1 < seq]
    kept.update({r: logits[j] for j, r in enumerate(rows) if r in keep_rows})
  return float(np.mean(nll)), np.stack([kept[r] for r in keep_rows]) if keep_rows else np.zeros((0,))
