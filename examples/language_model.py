"""A word-level language model with Lookahead and lazy embedding updates.

A small causal transformer (Flax linen: embedding, one attention block, an
untied output layer) trained on the Python documentation topics that ship
with Python (`pydoc_data.topics`, no download). Most of its ~2,400 words are
rare, so each batch touches few rows of the embedding table. Three optimizers:

* ``adamw``;
* ``lookahead(adamw)``;
* ``lookahead(partition(lazy(adam) on the embedding, adamw elsewhere))``: the
  embedding rows that a batch does not look up keep their params and Adam
  moments (no stale-momentum drift, no weight decay), as LazyAdam does.

Reports the validation perplexity (on the slow weights for Lookahead; on the
fast weights too), how many of the embedding rows that no training batch
looked up the optimizer moved anyway, and saves the validation curves.

  python examples/language_model.py            # full run, about a minute
  python examples/language_model.py --smoke    # CI
"""

import collections
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from pydoc_data import topics

import lookahead_optax as lo

import _common  # the examples' plumbing: flags, data, tables, figures
from _common import plt

CONTEXT = 32
UNK = "<unk>"


def load_corpus(min_count=2):
  """Token ids of the pydoc topics, split into train and validation."""
  text = " ".join(topics.topics[k] for k in sorted(topics.topics))
  words = re.findall(r"[a-z]+|[0-9]+|[^\sa-z0-9]", text.lower())
  counts = collections.Counter(words)
  vocab = [UNK] + sorted(w for w, c in counts.items() if c >= min_count)
  index = {w: i for i, w in enumerate(vocab)}
  ids = np.array([index.get(w, 0) for w in words], np.int32)
  # Every 10th block of 1,000 tokens is validation data.
  blocks = np.arange(len(ids)) // 1000
  return ids[blocks % 10 != 9], ids[blocks % 10 == 9], vocab, counts


class TinyTransformer(nn.Module):
  vocab_size: int
  dim: int = 64

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab_size, self.dim, name="embed")(tokens)
    pos = self.param("pos", nn.initializers.normal(0.02),
                     (CONTEXT, self.dim))
    x = x + pos[: tokens.shape[-1]]
    mask = nn.make_causal_mask(tokens)
    h = nn.LayerNorm()(x)
    x = x + nn.SelfAttention(num_heads=4)(h, mask=mask)
    h = nn.LayerNorm()(x)
    x = x + nn.Dense(self.dim)(nn.gelu(nn.Dense(4 * self.dim)(h)))
    return nn.Dense(self.vocab_size, name="out")(nn.LayerNorm()(x))


def make_optimizer(name, learning_rate, params):
  if name == "adamw":
    return optax.adamw(learning_rate, weight_decay=0.01)
  if name == "lookahead(adamw)":
    return lo.lookahead(optax.adamw(learning_rate, weight_decay=0.01))
  labels = {k: "embed" if k == "embed" else "rest" for k in params}
  inner = optax.partition(
      {"embed": lo.lazy(optax.adam(learning_rate)),
       "rest": optax.adamw(learning_rate, weight_decay=0.01)}, labels)
  return lo.lookahead(inner)


OPTIMIZERS = ("adamw", "lookahead(adamw)",
              "lookahead(lazy(adam) on embedding, adamw elsewhere)")


def windows(ids, starts):
  return np.stack([ids[s:s + CONTEXT + 1] for s in starts])


def main():
  parser = _common.parser(
      __doc__, "language_model.png",
      steps_help="training steps per optimizer (default 600, smoke 5)")
  parser.add_argument("--learning-rate", type=float, default=3e-3)
  args = parser.parse_args()
  steps = args.steps or (5 if args.smoke else 600)
  # Evaluate every 48 steps: not a multiple of k, so fast and slow differ.
  chunk = min(steps, 5 if args.smoke else 48)
  batch_size = 16
  train_ids, valid_ids, vocab, counts = load_corpus()
  rare = sum(1 for w in vocab[1:] if counts[w] <= 5)
  print(f"pydoc topics: {len(train_ids)} train / {len(valid_ids)} validation "
        f"tokens, vocabulary {len(vocab)} words ({rare} seen <= 5 times)")
  valid_count = 64 if args.smoke else 256
  valid = windows(valid_ids, np.linspace(
      0, len(valid_ids) - CONTEXT - 2, valid_count).astype(int))

  model = TinyTransformer(len(vocab))
  params0 = model.init(jax.random.key(0), valid[:1, :-1])["params"]

  def loss_fn(params, batch):
    logits = model.apply({"params": params}, batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch[:, 1:]).mean()

  @jax.jit
  def perplexity(params):
    return jnp.exp(loss_fn(params, valid))

  results = {}
  bar = _common.progress(len(OPTIMIZERS) * steps, "training")
  for name in OPTIMIZERS:
    tx = make_optimizer(name, args.learning_rate, params0)

    @jax.jit
    def train_chunk(params, state, batches, tx=tx):
      def step(carry, batch):
        params, state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        # Ids looked up: only the lazy optimizer uses them.
        extra = ({"touched_rows": {"embed": {"embedding": batch[:, :-1]}}}
                 if "lazy" in name else {})
        updates, state = tx.update(grads, state, params, **extra)
        return (optax.apply_updates(params, updates), state), loss

      (params, state), losses = jax.lax.scan(step, (params, state), batches)
      return params, state, losses.mean()

    rng = np.random.default_rng(0)  # the same batches for every optimizer
    params, state = params0, tx.init(params0)
    start = time.time()
    curve, seen_ids = [], []
    for done in range(0, steps, chunk):
      n = min(chunk, steps - done)
      starts = rng.integers(0, len(train_ids) - CONTEXT - 1, (n, batch_size))
      batches = np.stack([windows(train_ids, s) for s in starts])
      seen_ids.append(batches[..., :-1].ravel())
      params, state, _ = train_chunk(params, state, batches)
      slow = lo.eval_params(state, params) if "lookahead" in name else params
      curve.append((done + n, float(perplexity(params)),
                    float(perplexity(slow))))
      bar.update(n)
    # Embedding rows no training batch looked up: how many did the optimizer
    # move anyway (weight decay, stale moments)?
    seen = np.zeros(len(vocab), bool)
    seen[np.unique(np.concatenate(seen_ids))] = True
    moved = np.any(np.asarray(slow["embed"]["embedding"])
                   != np.asarray(params0["embed"]["embedding"]), axis=1)
    results[name] = dict(curve=np.array(curve), seconds=time.time() - start,
                         fast=curve[-1][1], slow=curve[-1][2],
                         unseen=int((~seen).sum()),
                         unseen_moved=int((moved & ~seen).sum()))
  bar.close()

  print(f"{steps} steps of {batch_size} x {CONTEXT} tokens, "
        f"learning rate {args.learning_rate:g}; lookahead k=5, alpha=0.5")
  _common.print_table(
      [("optimizer", "<54"), ("valid ppl (fast)", ">17.2f"),
       ("valid ppl (slow)", ">17.2f"), ("unseen rows moved", ">19"),
       ("time", ">7")],
      [(name, r["fast"], r["slow"] if "lookahead" in name else None,
        f"{r['unseen_moved']}/{r['unseen']}", f"{r['seconds']:.0f}s")
       for name, r in results.items()])

  fig, ax = plt.subplots(figsize=(6.5, 4))
  for name, r in results.items():
    c = r["curve"]
    if "lookahead" in name:
      line, = ax.plot(c[:, 0], c[:, 2], label=f"{name} (slow)")
      ax.plot(c[:, 0], c[:, 1], ":", color=line.get_color(), lw=0.8)
    else:
      ax.plot(c[:, 0], c[:, 1], label=name)
  ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("validation perplexity")
  ax.set_title("pydoc topics, word-level transformer (dotted: fast weights)",
               fontsize=10)
  ax.legend(fontsize=7)
  fig.tight_layout()
  _common.save_figure(fig, args.out, "language_model.png")


if __name__ == "__main__":
  main()
