"""The lm-evaluation-harness adapter and the local task YAMLs, against the harness's own machinery."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from test_sweep import ROOT, _env, tiny_folder  # noqa: F401  (fixture)

from wina_jax.convert.load import from_transformers
from wina_jax.eval import multiple_choice as mc
from wina_jax.eval.lm_eval_adapter import TASKS_DIR, WinaLM
from wina_jax.eval.tasks import TASKS, load_task

HARNESS = os.path.join(os.path.dirname(__import__("lm_eval").__file__), "tasks")
HARNESS_YAML = {
  "piqa": "piqa/piqa.yaml",
  "hellaswag": "hellaswag/hellaswag.yaml",
  "arc_easy": "arc/arc_easy.yaml",
  "boolq": "super_glue/boolq/default.yaml",
}
FIELDS = ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice")


def _yaml(path):
  loader = type("L", (yaml.SafeLoader,), {})
  loader.add_constructor("!function", lambda l, n: "!function " + l.construct_scalar(n))
  with open(path) as f:
    return yaml.load(f, Loader=loader)


@pytest.mark.parametrize("task", sorted(HARNESS_YAML))
def test_local_yamls_copy_the_harness_definitions(task):
  ours, theirs = (
    _yaml(os.path.join(TASKS_DIR, f"{task}_local.yaml")),
    _yaml(os.path.join(HARNESS, HARNESS_YAML[task])),
  )
  assert {k: ours[k] for k in FIELDS} == {k: theirs[k] for k in FIELDS}


@pytest.fixture(scope="module")
def task_manager():
  from lm_eval.tasks import TaskManager

  return TaskManager(include_path=TASKS_DIR)


def test_harness_requests_equal_our_prompts(task_manager):
  from lm_eval.tasks import get_task_dict

  names = [f"{t}_local" for t in TASKS]
  for name, task in get_task_dict(names, task_manager).items():
    task.build_all_requests(limit=4)
    by_doc = {}
    for inst in sorted(task.instances, key=lambda i: (i.doc_id, i.idx)):
      by_doc.setdefault(inst.doc_id, []).append(tuple(inst.args))
    docs = list(task.eval_docs)[:4]
    ours = load_task(name[: -len("_local")], 4)
    for i, ex in enumerate(ours):
      assert tuple(by_doc[i]) == ex.requests, name
      gold = task.doc_to_text(docs[i]) if task.multiple_input else task.doc_to_target(docs[i])
      assert int(gold) == ex.gold, name
      assert tuple(task.doc_to_choice(docs[i])) == ex.choices, name


def test_adapter_scores_like_the_native_evaluator(task_manager, smollm2_tokenizer):
  import lm_eval
  import transformers
  from conftest import TINY

  cfg = transformers.LlamaConfig(**{**TINY, "vocab_size": smollm2_tokenizer.vocab_size})
  cfg._attn_implementation = "eager"
  params, jcfg = from_transformers(transformers.LlamaForCausalLM(cfg).eval())
  lm = WinaLM(
    params=params,
    cfg=jcfg,
    tokenizer=smollm2_tokenizer,
    method="teal",
    sparsity=0.5,
    mode="topk",
    batch_tokens=512,
    progress=False,
  )
  out = lm_eval.simple_evaluate(
    model=lm, tasks=["piqa_local", "winogrande_local"], limit=4, task_manager=task_manager, log_samples=True
  )
  for task in ("piqa", "winogrande"):
    native = mc.evaluate(
      lm.variant.params,
      lm.variant.cfg,
      smollm2_tokenizer,
      load_task(task, 4),
      lm.variant.sparsifier,
      batch_tokens=512,
      progress=False,
    )
    res = out["results"][f"{task}_local"]
    assert res["acc,none"] == native["acc"]
    if "acc_norm,none" in res:
      assert res["acc_norm,none"] == native["acc_norm"]
    # per-request log-likelihoods agree with a fresh native scoring of the harness's own requests
    samples = out["samples"][f"{task}_local"]
    reqs = [mc.encode_pair(lm.tok_encode, c, x, lm.eot_token_id) for s in samples for c, x in s["arguments"]]
    lls = [
      ll
      for ll, _ in mc.loglikelihoods(
        lm.variant.params, lm.variant.cfg, reqs, lm.variant.sparsifier, progress=False
      )
    ]
    harness = [float(r[0][0]) for s in samples for r in s["resps"]]
    np.testing.assert_allclose(harness, lls, atol=1e-4)


def test_cli_registers_the_model(tiny_folder, tmp_path):  # noqa: F811
  """The harness CLI with our model: its per-request log-likelihoods and accuracies equal our own
  multiple-choice scorer's on the same rows and the same variant."""
  out = tmp_path / "out"
  args = dict(model=tiny_folder, method="wina", sparsity=0.5, mode="topk", batch_tokens=512)
  cmd = [
    sys.executable,
    "-m",
    "wina_jax.eval.lm_eval_adapter",
    "--model",
    "wina_jax",
    "--model_args",
    ",".join(f"{k}={v}" for k, v in args.items()),
    "--tasks",
    "arc_easy_local",
    "--limit",
    "4",
    "--include_path",
    TASKS_DIR,
    "--output_path",
    str(out),
    "--log_samples",
  ]
  subprocess.run(cmd, check=True, cwd=ROOT, env=_env(), capture_output=True)
  files = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs]
  with open(next(f for f in files if os.path.basename(f).startswith("results"))) as f:
    res = json.load(f)["results"]["arc_easy_local"]
  with open(next(f for f in files if os.path.basename(f).startswith("samples_arc_easy_local"))) as f:
    samples = sorted((json.loads(line) for line in f), key=lambda s: s["doc_id"])
  lm = WinaLM(progress=False, **args)
  v = lm.variant
  native = mc.evaluate(
    v.params, v.cfg, lm.tokenizer, load_task("arc_easy", 4), v.sparsifier, batch_tokens=512, progress=False
  )
  assert res["acc,none"] == native["acc"] and res["acc_norm,none"] == native["acc_norm"]
  pairs = [(a["arg_0"], a["arg_1"]) for s in samples for a in s["arguments"].values()]  # gen_args_0, 1, ...
  reqs = [mc.encode_pair(lm.tok_encode, c, x, lm.eot_token_id) for c, x in pairs]
  lls = [ll for ll, _ in mc.loglikelihoods(v.params, v.cfg, reqs, v.sparsifier, progress=False)]
  np.testing.assert_allclose([float(r[0][0]) for s in samples for r in s["resps"]], lls, atol=1e-4)


def test_adapter_without_method_uses_the_recommended_variant(smollm2_tokenizer):
  import transformers
  from conftest import TINY

  from wina_jax.eval.recommended import recommended

  cfg = transformers.LlamaConfig(**{**TINY, "vocab_size": smollm2_tokenizer.vocab_size})
  params, jcfg = from_transformers(transformers.LlamaForCausalLM(cfg).eval())
  lm = WinaLM(
    params=params,
    cfg=jcfg,
    tokenizer=smollm2_tokenizer,
    sparsity=0.5,
    calib_windows=2,
    seq_len=16,
    progress=False,
  )
  rec = recommended(0.5)
  assert lm.variant.method == rec.spec and lm.variant.sparsifier.mode == rec.mode
  dense = WinaLM(params=params, cfg=jcfg, tokenizer=smollm2_tokenizer, progress=False)
  assert dense.variant.method == "dense"
