"""Multiple-choice scoring as lm-evaluation-harness does it, batched, bucketed and jitted.

A request is (context ids, continuation ids); its score is the summed log-probability of the continuation
given the context, plus whether greedy decoding would produce it. A question's prediction is the argmax
of its choices' scores (acc), or of the scores divided by each choice's length in characters (acc_norm,
the harness's `len(choice)`).

Batching: requests whose model inputs (context + continuation minus the last token) are identical share
one forward (MMLU's four one-token answers, BoolQ's yes/no); rows are sorted by length and right-padded
to a bucket (powers of two), with `batch_tokens // bucket` rows per batch, so jit compiles one shape per
bucket.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from wina_jax import sites as S
from wina_jax.config import ModelConfig
from wina_jax.eval.tasks import Example
from wina_jax.model import jit_forward

Request = tuple[list[int], list[int]]  # (context ids, continuation ids)


def encode_pair(
  encode: Callable[[str], list[int]], context: str, continuation: str, prefix_id: int
) -> Request:
  """Token ids of (context, continuation) as the harness's TemplateLM: trailing context spaces move to
  the continuation, the continuation is the tail of encode(context + continuation), and an empty context
  becomes [prefix_id]."""
  if not context:
    cont = encode(continuation)
    return ([prefix_id], cont) if cont[:1] != [prefix_id] else (cont[:1], cont[1:])
  n_spaces = len(context) - len(context.rstrip())
  if n_spaces:
    context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
  whole, ctx = encode(context + continuation), encode(context)
  return ctx, whole[len(ctx) :]


def bucket_length(n: int, max_len: int, smallest: int = 64, buckets: Optional[Sequence[int]] = None) -> int:
  """The padded length for a row of n tokens: the smallest of `buckets` >= n (default: powers of two
  >= smallest), capped at max_len. Fewer buckets mean fewer compiles and more padding."""
  if buckets:
    return min(next((b for b in sorted(buckets) if b >= n), max_len), max_len)
  b = smallest
  while b < n:
    b *= 2
  return min(b, max_len)


@jax.jit
def _score_rows(logits, next_tok, last_pos, extra):
  """logits [B, T, V]; next_tok [B, T] teacher-forced targets; last_pos [B]; extra [B, E] candidate
  tokens after the last input -> (logp of next_tok [B, T], greedy hit [B, T], logp of extra [B, E],
  argmax after the last input [B])."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  lp_next = jnp.take_along_axis(logp, next_tok[..., None], axis=-1)[..., 0]
  hit = jnp.argmax(logp, axis=-1) == next_tok
  last = jnp.take_along_axis(logp, last_pos[:, None, None], axis=1)[:, 0]
  return lp_next, hit, jnp.take_along_axis(last, extra, axis=-1), jnp.argmax(last, axis=-1)


def loglikelihoods(
  params: dict,
  cfg: ModelConfig,
  requests: Sequence[Request],
  sparsifier: Any = S.dense,
  *,
  batch_tokens: int = 4096,
  max_len: Optional[int] = None,
  buckets: Optional[Sequence[int]] = None,
  dense_prefix: Union[None, int, Callable[[int], Optional[int]]] = None,
  progress: bool = True,
) -> list[tuple[float, bool]]:
  """(sum of continuation log-probs, is greedy) per request; inputs longer than `max_len` (default
  max_position_embeddings) keep their last max_len tokens, as the harness does.

  buckets: padded lengths (`bucket_length`; default powers of two from 64).
  dense_prefix: positions < dense_prefix run dense; a callable gets the padded length of each batch
    (e.g. `functools.partial(wina_jax.sparsity.resolve_prefill, 'last_fraction:0.99')`)."""
  max_len = max_len or cfg.max_position_embeddings
  rows: dict[tuple, list] = {}  # model input -> [(request index, start, last token)]
  for i, (ctx, cont) in enumerate(requests):
    if not cont:
      raise ValueError(f"request {i} has an empty continuation; nothing to score")
    toks = (list(ctx) + list(cont))[-(max_len + 1) :]
    inp = tuple(toks[:-1])
    rows.setdefault(inp, []).append((i, len(inp) - len(cont), toks[-1]))
  n_extra = 1 << (max(len({t for _, _, t in g}) for g in rows.values()) - 1).bit_length()
  order = sorted(rows, key=len, reverse=True)
  out: list = [None] * len(requests)
  bar = tqdm(total=len(requests), desc="loglikelihood", disable=not progress, leave=False)
  pos = 0
  while pos < len(order):
    t = bucket_length(len(order[pos]), max_len, buckets=buckets)
    b = max(1, batch_tokens // t)
    chunk = order[pos : pos + b]
    pos += len(chunk)
    tokens, next_tok = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
    last_pos, extra = np.zeros((b,), np.int32), np.zeros((b, n_extra), np.int32)
    slots = []
    for r, inp in enumerate(chunk):
      n = len(inp)
      tokens[r, :n] = inp
      next_tok[r, : n - 1] = inp[1:]
      last_pos[r] = n - 1
      lasts = sorted({tk for _, _, tk in rows[inp]})
      extra[r, : len(lasts)] = lasts
      slots.append({tk: e for e, tk in enumerate(lasts)})
    prefix = dense_prefix(t) if callable(dense_prefix) else dense_prefix
    logits = jit_forward(params, jnp.asarray(tokens), cfg, sparsifier, dense_prefix=prefix).logits
    lp, hit, lp_extra, top = (
      np.asarray(a)
      for a in _score_rows(logits, jnp.asarray(next_tok), jnp.asarray(last_pos), jnp.asarray(extra))
    )
    for r, inp in enumerate(chunk):
      n = len(inp)
      for i, start, tk in rows[inp]:
        e = slots[r][tk]
        out[i] = (
          float(lp[r, start : n - 1].sum() + lp_extra[r, e]),
          bool(hit[r, start : n - 1].all() and top[r] == tk),
        )
        bar.update(1)
  bar.close()
  return out


@dataclasses.dataclass(frozen=True)
class Tokenized:
  """A task's examples as token ids, all that scoring needs (no tokenizer, no dataset library).

  requests: (context ids, continuation ids) per choice, examples back to back; sizes [E]: choices per
  example; chars: len(choice) in characters per request (acc_norm); gold [E]: the right choice."""

  requests: tuple[Request, ...]
  sizes: tuple[int, ...]
  chars: tuple[int, ...]
  gold: tuple[int, ...]


def tokenize(tokenizer, examples: Sequence[Example]) -> Tokenized:
  """`examples` (from `wina_jax.eval.tasks.load_task`) -> `Tokenized`, encoded as the harness does."""
  if not examples:
    raise ValueError("no examples to tokenize")
  encode = functools.partial(_encode, tokenizer)
  reqs = tuple(encode_pair(encode, c, x, tokenizer.eos_token_id) for ex in examples for c, x in ex.requests)
  return Tokenized(
    reqs,
    tuple(len(ex.requests) for ex in examples),
    tuple(len(c) for ex in examples for c in ex.choices),
    tuple(ex.gold for ex in examples),
  )


def _accuracy(gold: Sequence[int], chars: Sequence[Sequence[int]], scores: Sequence[Sequence[float]]) -> dict:
  correct, correct_norm = [], []
  for g, c, s in zip(gold, chars, scores, strict=True):
    s = np.asarray(s, np.float64)
    correct.append(int(np.argmax(s) == g))
    correct_norm.append(int(np.argmax(s / np.asarray(c, np.float64)) == g))
  n = len(gold)
  return {
    "acc": sum(correct) / n,
    "acc_norm": sum(correct_norm) / n,
    "n": n,
    "correct": correct,
    "correct_norm": correct_norm,
  }


def accuracy(examples: Sequence[Example], scores: Sequence[Sequence[float]]) -> dict:
  """{'acc', 'acc_norm', 'n', 'correct', 'correct_norm'}: argmax of the scores, and of scores / len(choice)
  (characters); correct / correct_norm [n]: 1 where that argmax is the gold choice (for bootstrap bands)."""
  return _accuracy([ex.gold for ex in examples], [[len(c) for c in ex.choices] for ex in examples], scores)


def _split(flat: Sequence, sizes: Sequence[int]) -> list:
  out, k = [], 0
  for n in sizes:
    out.append(list(flat[k : k + n]))
    k += n
  return out


def score(params: dict, cfg: ModelConfig, task: Tokenized, sparsifier: Any = S.dense, **kw) -> dict:
  """Accuracy of a tokenized task (as `accuracy` returns it); `kw` go to `loglikelihoods`."""
  lls = [ll for ll, _ in loglikelihoods(params, cfg, task.requests, sparsifier, **kw)]
  return _accuracy(task.gold, _split(task.chars, task.sizes), _split(lls, task.sizes))


def evaluate(
  params: dict, cfg: ModelConfig, tokenizer, examples: Sequence[Example], sparsifier: Any = S.dense, **kw
) -> dict:
  """Accuracy of `examples` (from `wina_jax.eval.tasks.load_task`); `kw` go to `loglikelihoods`."""
  return score(params, cfg, tokenize(tokenizer, examples), sparsifier, **kw)


def _encode(tokenizer, text: str) -> list[int]:
  return tokenizer(text, add_special_tokens=False)["input_ids"]
