"""The recommended variant per target sparsity, backed by the measurements in docs/findings.md.

`RECOMMENDED` is what `pick` chooses from the committed H200 sweep of SmolLM2-135M-Instruct
(`results/sweep/h200/threshold-uniform/results.json`, every variant in threshold mode with uniform
allocation); `tests/test_findings.py` re-derives it from that file. Scripts call `recommended(s)` when
no method is given (`experiments/quality/evaluate.py`, `experiments/quality/calibrate.py`, the lm-eval model).

The rule (`pick`): among the variants measured at target s whose measured parameter-weighted sparsity
is within `slack` of s or above (a variant must not win by sparsifying less: CATS reaches about half
its target, the transformed variants a point or two less), take the lowest held-out perplexity;
variants within `tie` (relative) of that are tied, and a tie goes to the first in `PREFERENCE`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from wina_jax.sparsity.base import check_sparsity

PREFERENCE = ("wina", "teal", "wina[c_sites=all]", "cats")  # then any other spec, in row order


@dataclasses.dataclass(frozen=True)
class Recommendation:
  spec: str  # a `wina_jax.eval.variants` spec
  mode: str  # 'threshold' | 'topk'
  allocation: str  # 'uniform' | 'greedy'


RECOMMENDED = {s: Recommendation("wina", "threshold", "uniform") for s in (0.25, 0.4, 0.5, 0.65)}
DENSE = Recommendation("dense", "topk", "uniform")


def recommended(sparsity: float) -> Recommendation:
  """The recommendation of the nearest measured level (dense at 0; ties go to the higher level)."""
  s = check_sparsity(sparsity)
  if s == 0:
    return DENSE
  level = min(RECOMMENDED, key=lambda lv: (abs(lv - s), -lv))
  return RECOMMENDED[level]


def pick(rows: Sequence[dict], target: float, *, slack: float = 0.01, tie: float = 0.01) -> str:
  """The rule in the module docstring over sweep rows ({'method', 'sparsity', 'measured_sparsity', 'ppl'})."""
  cands = [
    r
    for r in rows
    if r["method"] != "dense"
    and abs(r["sparsity"] - target) < 1e-9
    and r["measured_sparsity"] >= target - slack
  ]
  if not cands:
    raise ValueError(f"no variant at target {target} reaches {target - slack:.3f} measured sparsity")
  best = min(r["ppl"] for r in cands)
  tied = [r["method"] for r in cands if r["ppl"] <= best * (1 + tie)]
  order = {m: i for i, m in enumerate(PREFERENCE)}
  return min(tied, key=lambda m: (order.get(m, len(order)), tied.index(m)))
