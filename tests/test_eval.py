"""Perplexity and multiple-choice scoring against independent torch computations on tiny HF models."""

import math

import numpy as np
import pytest
import torch
from conftest import make_hf_model

from wina_jax.convert.load import from_transformers
from wina_jax.eval import multiple_choice as mc
from wina_jax.eval.perplexity import perplexity
from wina_jax.eval.tasks import Example


@pytest.fixture(scope="module")
def tiny():
  model = make_hf_model("llama_gqa_tied")
  params, cfg = from_transformers(model)
  return model, params, cfg


def test_perplexity_is_exp_mean_nll_of_transformers_loss(tiny, rng):
  model, params, cfg = tiny
  windows = rng.randint(0, cfg.vocab_size, (5, 24))
  res = perplexity(params, cfg, windows, batch_size=2, progress=False)  # 5 = 2 + 2 + 1 padded
  with torch.no_grad():
    ids = torch.tensor(windows)
    losses = [float(model(ids[i : i + 1], labels=ids[i : i + 1]).loss) for i in range(len(windows))]
  assert res["tokens"] == 5 * 23
  assert res["nll"] == pytest.approx(np.mean(losses), rel=1e-5)
  assert res["ppl"] == pytest.approx(math.exp(np.mean(losses)), rel=1e-5)
  np.testing.assert_allclose(res["window_nll"], losses, rtol=1e-5)  # per window, padding dropped


def test_perplexity_zero_frac_reports_sites_and_rejects_bad_windows(tiny, rng):
  _, params, cfg = tiny
  half = lambda site, x, kernel: x * (np.arange(x.shape[-1]) % 2 == 0)
  res = perplexity(
    params, cfg, rng.randint(0, cfg.vocab_size, (3, 8)), half, batch_size=2, progress=False, zero_frac=True
  )
  assert all(v == pytest.approx(0.5, abs=1e-6) for v in res["zero_frac"].values())
  with pytest.raises(ValueError, match="windows"):
    perplexity(params, cfg, np.zeros((0, 8), np.int32))


def _torch_loglikelihood(model, ctx, cont):
  """Sum of log p(cont | ctx) and greedy-ness, from one unbatched torch forward."""
  ids = torch.tensor([ctx + cont])
  with torch.no_grad():
    logp = torch.log_softmax(model(ids).logits[0].double(), -1)
  pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
  tgt = torch.tensor(cont)
  return float(logp[pos, tgt].sum()), bool((logp[pos].argmax(-1) == tgt).all())


def test_loglikelihoods_match_unbatched_torch(tiny, rng):
  model, params, cfg = tiny
  v = cfg.vocab_size
  ctx_a = list(rng.randint(0, v, 9))
  reqs = [
    (ctx_a, [5]),
    (ctx_a, [7]),
    (ctx_a, [5]),  # shared input, one-token continuations
    (ctx_a[:4], ctx_a[4:] + [11]),  # same input as above, longer continuation
    (list(rng.randint(0, v, 3)), list(rng.randint(0, v, 4))),
    (list(rng.randint(0, v, 70)), list(rng.randint(0, v, 6))),  # a second length bucket
    ([1], [2]),
  ]
  got = mc.loglikelihoods(params, cfg, reqs, batch_tokens=128, progress=False)
  for (ctx, cont), (ll, greedy) in zip(reqs, got):
    want, want_greedy = _torch_loglikelihood(model, ctx, cont)
    assert ll == pytest.approx(want, abs=2e-4)
    assert greedy == want_greedy
  # a greedy continuation is recognised as such
  ctx = list(rng.randint(0, v, 6))
  with torch.no_grad():
    nxt = int(model(torch.tensor([ctx])).logits[0, -1].argmax())
  assert mc.loglikelihoods(params, cfg, [(ctx, [nxt])], progress=False)[0][1]


def test_left_truncation_keeps_the_last_tokens(tiny, rng):
  model, params, cfg = tiny
  ctx, cont = list(rng.randint(0, cfg.vocab_size, 40)), [3, 4]
  ((ll, _),) = mc.loglikelihoods(params, cfg, [(ctx, cont)], max_len=16, progress=False)
  want, _ = _torch_loglikelihood(model, ctx[-(16 + 1 - 2) :], cont)
  assert ll == pytest.approx(want, abs=2e-4)


def test_accuracy_hand_computed():
  # choice lengths 1 and 4: raw scores prefer choice 0, per-character scores prefer choice 1
  ex = Example(requests=(("q", " a"), ("q", " bbbb")), choices=("a", "bbbb"), gold=1)
  ex2 = Example(requests=(("q", " x"), ("q", " y")), choices=("x", "y"), gold=0)
  res = mc.accuracy([ex, ex2], [[-2.0, -4.0], [-1.0, -3.0]])
  assert res == {
    "acc": 0.5,
    "acc_norm": 1.0,
    "n": 2,  # -4/4 > -2/1; ex2 right either way
    "correct": [0, 1],
    "correct_norm": [1, 1],
  }


def test_tokenized_scoring_and_bundle_round_trip(tiny, smollm2_tokenizer, tmp_path, rng):
  """score(tokenize(...)) equals evaluate(...); a bundle gives back the same requests and windows."""
  from wina_jax.eval import bundle

  _, params, cfg = tiny
  exs = [
    Example((("Q: a b?", " yes"), ("Q: a b?", " no way")), ("yes", "no way"), 1),
    Example((("The", " cat sat"), ("The", " dog")), ("cat sat", "dog"), 0),
  ]
  toks = mc.tokenize(smollm2_tokenizer, exs)
  assert toks.sizes == (2, 2) and toks.chars == (3, 6, 7, 3) and toks.gold == (1, 0)
  toks = mc.Tokenized(
    tuple(([t % cfg.vocab_size for t in c], [t % cfg.vocab_size for t in x]) for c, x in toks.requests),
    toks.sizes,
    toks.chars,
    toks.gold,
  )
  lls = [ll for ll, _ in mc.loglikelihoods(params, cfg, toks.requests, progress=False)]
  want = mc._accuracy(toks.gold, [toks.chars[:2], toks.chars[2:]], [lls[:2], lls[2:]])
  assert mc.score(params, cfg, toks, progress=False) == want
  windows = {"ppl": rng.randint(0, 100, (3, 8))}
  bundle.save(str(tmp_path / "b.npz"), {"t": toks}, windows, {"limit": 2})
  tasks, wins, meta = bundle.load(str(tmp_path / "b.npz"))
  assert tasks["t"] == toks and np.array_equal(wins["ppl"], windows["ppl"]) and meta["limit"] == 2
  with pytest.raises(ValueError, match="other settings"):
    bundle.check_meta(meta, {"limit": 3}, "b.npz")
  with pytest.raises(FileNotFoundError, match="--bundle"):
    bundle.load(str(tmp_path / "missing.npz"))


def test_encode_pair_moves_trailing_spaces_and_handles_empty_context():
  enc = lambda s: [ord(c) for c in s]
  assert mc.encode_pair(enc, "Q: a ", "b", prefix_id=0) == (enc("Q: a"), enc(" b"))
  assert mc.encode_pair(enc, "", "hi", prefix_id=0) == ([0], enc("hi"))
  assert mc.encode_pair(enc, "", "hi", prefix_id=ord("h")) == ([ord("h")], [ord("i")])


def test_bucket_lengths_are_few(tiny):
  lengths = {mc.bucket_length(n, 512) for n in range(1, 600)}
  assert lengths == {64, 128, 256, 512}
  with pytest.raises(ValueError, match="empty continuation"):
    mc.loglikelihoods(tiny[1], tiny[2], [([1], [])], progress=False)


def test_task_loading_limits_and_mmlu_spans_subjects():
  from wina_jax.eval.tasks import TASKS, load_task, mmlu_subjects

  for name in TASKS:
    exs = load_task(name, 3)
    assert len(exs) == 3
    for ex in exs:
      assert len(ex.requests) == len(ex.choices) >= 2 and 0 <= ex.gold < len(ex.choices)
      assert all(cont.startswith(" ") for _, cont in ex.requests)
  subjects = mmlu_subjects()
  first = load_task("mmlu", len(subjects))
  about = {ex.requests[0][0].split("\n\n")[0] for ex in first}
  assert len(subjects) == 57 and len(about) == 57  # one question per subject first
  with pytest.raises(ValueError, match="unknown task"):
    load_task("gsm8k")
  with pytest.raises(ValueError, match="limit"):
    load_task("piqa", 0)


def test_variants_transform_keeps_dense_and_threshold_mode_calibrates(tiny, rng):
  from wina_jax.eval import variants

  _, params, cfg = tiny
  windows = rng.randint(0, cfg.vocab_size, (4, 16))
  base = perplexity(params, cfg, windows, progress=False)["ppl"]
  dense_t = variants.build(params, cfg, "dense-transform", 0.5)
  assert dense_t.transformed and "residual_attn" in dense_t.params["layers"]["0"]
  assert perplexity(dense_t.params, dense_t.cfg, windows, dense_t.sparsifier, progress=False)[
    "ppl"
  ] == pytest.approx(base, rel=1e-4)
  th = variants.build(params, cfg, "teal", 0.5, mode="threshold", calib_windows=windows, progress=False)
  res = perplexity(params, cfg, windows, th.sparsifier, progress=False, zero_frac=True)
  from wina_jax.sparsity import parameter_weighted_sparsity

  assert parameter_weighted_sparsity(res["zero_frac"], cfg) == pytest.approx(0.5, abs=0.05)  # on its own data
  with pytest.raises(ValueError, match="unknown method"):
    variants.parse("magic-transform")
  with pytest.raises(ValueError, match="calibration windows"):
    variants.build(params, cfg, "wina", 0.5, mode="threshold")


def test_dense_variant_in_threshold_mode_needs_no_calibration(tiny, rng):
  """The sweep's dense cell shares the sweep's mode flag; dense has nothing to threshold."""
  from wina_jax.eval import variants

  _, params, cfg = tiny
  windows = rng.randint(0, cfg.vocab_size, (2, 16))
  dense = variants.build(params, cfg, "dense", 0.0, mode="threshold", calib_windows=windows, progress=False)
  teal0 = variants.build(params, cfg, "teal", 0.0, mode="threshold", calib_windows=windows, progress=False)
  base = perplexity(params, cfg, windows, progress=False)["ppl"]
  for v in (dense, teal0):
    assert perplexity(v.params, v.cfg, windows, v.sparsifier, progress=False)["ppl"] == base
