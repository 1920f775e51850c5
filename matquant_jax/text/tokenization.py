"""Tokenizers of real checkpoints behind one small interface.

From a SentencePiece model file (Gemma), a Hugging Face tokenizer.json (the
`tokenizers` package), or a GGUF file's own vocabulary: byte-level BPE
(llama.cpp's 'gpt2' tokenizer model, as in SmolLM2) or SentencePiece
(its 'llama' model, as in Gemma 3), rebuilt as a SentencePiece model proto.
"""

from __future__ import annotations

import os
from typing import Protocol, Sequence

from matquant_jax.core import files


class Tokenizer(Protocol):
  bos_id: int | None
  eos_id: int | None

  def encode(self, text: str) -> list[int]: ...
  def decode(self, ids: Sequence[int]) -> str: ...
  def vocab_size(self) -> int: ...


class SentencePieceTokenizer:
  """A SentencePiece model (Gemma's tokenizer.model): a file path or a loaded processor."""

  def __init__(self, model):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    self.sp = model if isinstance(model, spm.SentencePieceProcessor) else spm.SentencePieceProcessor(
        model_file=model)
    self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
    self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None

  def encode(self, text: str) -> list[int]:
    return self.sp.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    return self.sp.decode(list(ids))

  def vocab_size(self) -> int:
    return self.sp.vocab_size()


class HFTokenizer:
  """A `tokenizers.Tokenizer` (from tokenizer.json or built from a GGUF vocabulary)."""

  def __init__(self, tokenizer, bos_id: int | None = None, eos_id: int | None = None):
    self.tk, self.bos_id, self.eos_id = tokenizer, bos_id, eos_id

  def encode(self, text: str) -> list[int]:
    return self.tk.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self.tk.decode(list(ids), skip_special_tokens=False)

  def vocab_size(self) -> int:
    return self.tk.get_vocab_size(with_added_tokens=True)


def wrap(tokenizer) -> Tokenizer:
  """A Tokenizer from one, or from a bare `sentencepiece.SentencePieceProcessor`."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  return SentencePieceTokenizer(tokenizer) if isinstance(tokenizer, spm.SentencePieceProcessor) else tokenizer


def from_sentencepiece(path: str) -> SentencePieceTokenizer:
  if not os.path.exists(path):
    raise FileNotFoundError(f'SentencePiece model {path} does not exist')
  return SentencePieceTokenizer(path)


def from_tokenizer_json(path: str, bos_id: int | None = None, eos_id: int | None = None) -> HFTokenizer:
  import tokenizers  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    raise FileNotFoundError(f'tokenizer file {path} does not exist')
  return HFTokenizer(tokenizers.Tokenizer.from_file(path), bos_id, eos_id)


def from_directory(directory: str) -> Tokenizer | None:
  """tokenizer.json, else tokenizer.model, in a model directory (None if neither is there)."""
  special = {}
  cfg = os.path.join(directory, 'config.json')
  if os.path.exists(cfg):
    hf = files.read_json(cfg)
    special = {'bos_id': hf.get('bos_token_id'), 'eos_id': hf.get('eos_token_id')}
    if isinstance(special['eos_id'], list):
      special['eos_id'] = special['eos_id'][0]
  if os.path.exists(os.path.join(directory, 'tokenizer.json')):
    return from_tokenizer_json(os.path.join(directory, 'tokenizer.json'), **special)
  if os.path.exists(os.path.join(directory, 'tokenizer.model')):
    return from_sentencepiece(os.path.join(directory, 'tokenizer.model'))
  return None


def from_gguf(reader) -> Tokenizer:
  """The tokenizer stored in a GGUF file's tokenizer.ggml.* fields."""
  field = lambda k, d=None: reader.fields[k].contents() if k in reader.fields else d
  kind = field('tokenizer.ggml.model')
  if kind == 'llama':
    return _sentencepiece_from_gguf(field)
  if kind != 'gpt2':
    raise ValueError(f'GGUF tokenizer model {kind!r} is not supported ("gpt2" byte-level BPE, '
                     '"llama" SentencePiece)')
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  tokens = field('tokenizer.ggml.tokens')
  merges = [tuple(m.split(' ', 1)) for m in field('tokenizer.ggml.merges')]
  tk = tokenizers.Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if field('tokenizer.ggml.pre') == 'smollm':  # SmolLM splits digits one by one
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  else:
    tk.pre_tokenizer = byte_level
  tk.decoder = decoders.ByteLevel()
  special = [t for t, kind in zip(tokens, field('tokenizer.ggml.token_type')) if kind == 3]
  tk.add_special_tokens(special)
  return HFTokenizer(tk, field('tokenizer.ggml.bos_token_id'), field('tokenizer.ggml.eos_token_id'))


def _sentencepiece_from_gguf(field) -> SentencePieceTokenizer:
  """A SentencePiece BPE model proto from llama.cpp's 'llama' vocabulary: pieces, scores and
  types (llama.cpp's token types are SentencePiece's piece types), special ids, no
  normalization beyond spaces as U+2581, a dummy prefix only if the file asks for one."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  from sentencepiece import sentencepiece_model_pb2 as pb  # pylint: disable=g-import-not-at-top
  tokens, scores, types = (field(f'tokenizer.ggml.{k}') for k in ('tokens', 'scores', 'token_type'))
  m = pb.ModelProto()
  unk = field('tokenizer.ggml.unknown_token_id', -1)
  for i, (piece, score, kind) in enumerate(zip(tokens, scores, types)):
    # llama.cpp files may type <unk> as control; SentencePiece needs it UNKNOWN.
    m.pieces.add(piece=piece, score=score, type=pb.ModelProto.SentencePiece.UNKNOWN if i == unk else kind)
  t = m.trainer_spec
  t.model_type = pb.TrainerSpec.BPE
  t.vocab_size = len(tokens)
  t.byte_fallback = pb.ModelProto.SentencePiece.BYTE in types
  for key, ggml_key in (('unk', 'unknown'), ('bos', 'bos'), ('eos', 'eos'), ('pad', 'padding')):
    i = field(f'tokenizer.ggml.{ggml_key}_token_id', -1)
    setattr(t, f'{key}_id', i)
    if i >= 0:  # SentencePiece finds its special ids by these piece names
      setattr(t, f'{key}_piece', tokens[i])
  n = m.normalizer_spec
  n.name = 'identity'
  n.add_dummy_prefix = bool(field('tokenizer.ggml.add_space_prefix', True))
  n.remove_extra_whitespaces = False
  n.escape_whitespaces = True
  return SentencePieceTokenizer(spm.SentencePieceProcessor(model_proto=m.SerializeToString()))


# llama.cpp's token types (gguf-py `TokenType`; SentencePiece's piece types use the same numbers).
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def gguf_vocab(tokenizer, num_embed: int, pre: str | None = None) -> dict:
  """The tokenizer as llama.cpp's tokenizer.ggml.* fields (the inverse of `from_gguf`), padded
  to `num_embed` entries with unused '[PAD<i>]' tokens as convert_hf_to_gguf.py pads.

  SentencePiece -> 'llama' (pieces, scores, piece types); byte-level BPE -> 'gpt2' (tokens,
  merges, special added tokens as control). `pre` names llama.cpp's pre-tokenizer; by default
  it is read off the tokenizer's own pre-tokenizer ('smollm': digits split one by one, then
  GPT-2's byte level; 'gpt-2': byte level alone) and anything else is refused.
  """
  tokenizer = wrap(tokenizer)
  if isinstance(tokenizer, SentencePieceTokenizer):
    from sentencepiece import sentencepiece_model_pb2 as pb  # pylint: disable=g-import-not-at-top
    m = pb.ModelProto.FromString(tokenizer.sp.serialized_model_proto())
    sp = tokenizer.sp
    out = dict(model='llama', pre=pre or 'default', tokens=[p.piece for p in m.pieces],
               scores=[p.score for p in m.pieces], types=[int(p.type) for p in m.pieces], merges=None,
               unk=sp.unk_id() if sp.unk_id() >= 0 else None, pad=sp.pad_id() if sp.pad_id() >= 0 else None,
               add_space_prefix=bool(m.normalizer_spec.add_dummy_prefix))
  elif isinstance(tokenizer, HFTokenizer):
    import json  # pylint: disable=g-import-not-at-top
    spec = json.loads(tokenizer.tk.to_str())
    if spec['model']['type'] != 'BPE':
      raise ValueError(f'a {spec["model"]["type"]} tokenizer has no llama.cpp vocabulary here (BPE only)')
    by_id = {i: t for t, i in tokenizer.tk.get_vocab(with_added_tokens=True).items()}
    tokens = [by_id.get(i, f'[PAD{i}]') for i in range(max(by_id) + 1)]
    types = [NORMAL if i in by_id else UNUSED for i in range(len(tokens))]
    for added in spec.get('added_tokens') or []:
      types[added['id']] = CONTROL if added.get('special') else USER_DEFINED
    merges = [m if isinstance(m, str) else ' '.join(m) for m in spec['model']['merges']]
    out = dict(model='gpt2', pre=pre or _bpe_pre(spec.get('pre_tokenizer')), tokens=tokens, scores=None,
               types=types, merges=merges, unk=None, pad=None, add_space_prefix=False)
  else:
    raise TypeError(f'cannot write a vocabulary for a tokenizer of type {type(tokenizer).__name__}')
  if len(out['tokens']) > num_embed:
    raise ValueError(f'the tokenizer has {len(out["tokens"])} tokens, the model embeds only {num_embed}')
  pad = range(len(out['tokens']), num_embed)
  out['tokens'] += [f'[PAD{i}]' for i in pad]
  out['types'] += [UNUSED] * len(pad)
  if out['scores'] is not None:
    out['scores'] += [-1000.0] * len(pad)
  return dict(out, bos=tokenizer.bos_id, eos=tokenizer.eos_id)


def _bpe_pre(pre_tokenizer: dict | None) -> str:
  """llama.cpp's pre-tokenizer name for the two byte-level forms `from_gguf` builds."""
  kinds = [p['type'] for p in (pre_tokenizer or {}).get('pretokenizers', [pre_tokenizer or {}])]
  if kinds == ['ByteLevel']:
    return 'gpt-2'
  digits = (pre_tokenizer or {}).get('pretokenizers', [{}])[0]
  if kinds == ['Digits', 'ByteLevel'] and digits.get('individual_digits'):
    return 'smollm'
  raise ValueError(f'the tokenizer\'s pre-tokenizer {kinds} has no known llama.cpp name; pass '
                   'tokenizer_pre= (llama.cpp\'s tokenizer.ggml.pre, as convert_hf_to_gguf.py picks it)')
