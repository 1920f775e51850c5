"""The public namespace: every name imports and says what it does."""

import matquant_jax as mq


def test_every_exported_name_imports_and_has_a_docstring():
  for name in mq.__all__:
    obj = getattr(mq, name)
    assert (obj.__doc__ or '').strip(), f'mq.{name} has no docstring'
  assert mq.QuantSpec(4).bits == 4 and mq.OmniQuantOptions().epochs == 40


def test_quantspec_is_keyword_only_after_bits():
  import pytest
  with pytest.raises(TypeError):
    mq.QuantSpec(4, 8)  # pylint: disable=too-many-function-args
  assert mq.QuantSpec(4, parent_bits=4).parent_bits == 4


def test_qat_options_are_checked_and_read_from_a_config():
  import pytest
  from matquant_jax.lab import configs
  with pytest.raises(ValueError, match='train.steps must be an integer >= 1'):
    mq.QATOptions(steps=0, learning_rate=1e-3)
  opts = mq.QATOptions.from_config(configs.base_config().qat, mq.QuantSpec(8, group_size=32))
  assert (opts.steps, opts.learning_rate, opts.spec.group_size) == (250, 3e-5, 32)
