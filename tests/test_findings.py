"""The recommended defaults are derived from the committed results, and docs/findings.md matches them."""

import json
import os
import subprocess
import sys

import pytest

from wina_jax.eval import recommended as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIFORM = os.path.join(ROOT, "results", "sweep", "h200", "threshold-uniform", "results.json")


def test_recommended_table_is_the_rules_pick_on_the_committed_h200_grid():
  with open(UNIFORM) as f:
    rows = json.load(f)
  for s, rec in R.RECOMMENDED.items():
    assert R.pick(rows, s) == rec.spec, (
      f"at {s}: the results pick {R.pick(rows, s)}, the library says {rec.spec}"
    )
    assert (rec.mode, rec.allocation) == ("threshold", "uniform")  # what that grid measured


def test_pick_excludes_undersparse_variants_and_breaks_ties_by_preference():
  rows = [
    {"method": "cats", "sparsity": 0.5, "measured_sparsity": 0.25, "ppl": 10.0},
    {"method": "teal", "sparsity": 0.5, "measured_sparsity": 0.50, "ppl": 20.0},
    {"method": "wina", "sparsity": 0.5, "measured_sparsity": 0.50, "ppl": 20.1},
    {"method": "x", "sparsity": 0.4, "measured_sparsity": 0.40, "ppl": 1.0},
  ]
  assert R.pick(rows, 0.5) == "wina"  # cats sparsifies too little; wina ties teal (0.5%)
  assert R.pick(rows, 0.5, tie=0.001) == "teal"  # no longer tied
  with pytest.raises(ValueError, match="reaches"):
    R.pick(rows, 0.65)


def test_recommended_levels_and_bad_input():
  assert R.recommended(0.0) == R.DENSE
  assert R.recommended(0.5) == R.RECOMMENDED[0.5]
  assert R.recommended(0.3) == R.RECOMMENDED[0.25] and R.recommended(0.9) == R.RECOMMENDED[0.65]
  with pytest.raises(ValueError, match="sparsity"):
    R.recommended(1.0)


def test_findings_document_matches_the_result_files():
  res = subprocess.run(
    [sys.executable, "-m", "experiments.quality.findings", "--check"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"},
  )
  assert res.returncode == 0, res.stderr[-2000:]


def test_protocol_standard_errors_are_per_task_and_paired():
  """avg4 and its SE from per-row correctness; a paired difference cancels the rows both cells share."""
  import math

  sys.path.insert(0, ROOT)
  from experiments.quality import findings as F

  a = {f"{t}/correct": [1, 1, 0, 0] for t in F.INFORMATIVE}
  b = {f"{t}/correct": [1, 0, 0, 0] for t in F.INFORMATIVE}
  avg, se = F._avg4_se(a)
  sd = math.sqrt(1 / 3)  # sample sd of 1, 1, 0, 0
  assert avg == pytest.approx(0.5) and se == pytest.approx(math.sqrt(4 * (sd / 2) ** 2) / 4)
  diff, diff_se = F._avg4_se(a, b)  # row differences 0, 1, 0, 0: sd 0.5, SE 0.25 per task
  assert diff == pytest.approx(0.25) and diff_se == pytest.approx(0.25 / 2)  # sqrt(4 x 0.25^2) / 4
  assert F._avg4_se(a, a) == (0.0, 0.0)
