"""Evaluation: log perplexity, the paper's zero-shot tasks and the offline Shakespeare task,
text sources.
"""

# pylint: disable=g-importing-member
from matquant_jax.evals.sources import (
    as_str, tfds_examples, read_texts, token_stream)
from matquant_jax.evals.perplexity import (
    LOGITS_BYTES, token_logprobs, make_eval_fn, log_perplexity)
from matquant_jax.evals.tasks import (
    Item, arc, boolq, hellaswag, piqa, winogrande, TASKS, PAPER_TASKS, OFFLINE_TASK, task_items,
    shakespeare_next_line, loglikelihoods, accuracy, table_row)
