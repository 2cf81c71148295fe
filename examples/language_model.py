"""A word-level language model with Lookahead and lazy embedding updates.

A small causal transformer (Flax linen: embedding, one attention block, an
untied output layer) trained on the Python documentation topics that ship
with Python (`pydoc_data.topics`, no download). Most of its ~2,400 words are
rare, so each batch touches few rows of the embedding table. Four optimizers:

* ``adamw``;
* ``lookahead(adamw)``;
* ``lookahead(partition(lazy(adam) on the embedding, adamw elsewhere))``: the
  embedding rows that a batch does not look up keep their params and Adam
  moments (no stale-momentum drift, no weight decay), as LazyAdam does; dense
  gradients from `jax.grad`, the looked-up ids passed as `touched_rows`;
* the same with row-sparse gradients: `lo.sparse_value_and_grad` gives a
  `lo.SparseRows` for the embedding table (the gradient rows of the ids looked
  up, never the dense table-sized gradient) and `lazy` updates only those
  rows. Same results, a step whose cost follows the batch, not the table.

Reports the validation perplexity (on the slow weights for Lookahead; on the
fast weights too), how many of the embedding rows that no training batch
looked up the optimizer moved anyway, and saves the validation curves.

Then it times one training step (forward, gradient, update; jitted, donated)
with a large input table, `--table-rows` rows (default 1M) of hashed word
bigrams next to the words, dense path against sparse path, and prints the
speedup and the memory XLA reports for each.

  python examples/language_model.py            # full run, a few minutes
  python examples/language_model.py --smoke    # CI
"""

import collections
import inspect
import re
import time
import warnings

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


def bigram_ids(tokens, table_rows):
  """Row ids of hashed word bigrams (previous word, word), in [0, rows)."""
  prev = jnp.pad(tokens, ((0, 0), (1, 0)))[:, :-1]
  return (tokens * 7919 + prev * 104729) % table_rows


class TinyTransformer(nn.Module):
  vocab_size: int
  dim: int = 64
  # > 0: an input table of hashed bigrams with this many rows (recommender-
  # or large-vocabulary-sized), added to the word embedding.
  table_rows: int = 0

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab_size, self.dim, name="embed")(tokens)
    if self.table_rows:
      x = x + nn.Embed(self.table_rows, self.dim, name="bigrams")(
          bigram_ids(tokens, self.table_rows))
    pos = self.param("pos", nn.initializers.normal(0.02),
                     (CONTEXT, self.dim))
    x = x + pos[: tokens.shape[-1]]
    mask = nn.make_causal_mask(tokens)
    h = nn.LayerNorm()(x)
    x = x + nn.SelfAttention(num_heads=4)(h, mask=mask)
    h = nn.LayerNorm()(x)
    x = x + nn.Dense(self.dim)(nn.gelu(nn.Dense(4 * self.dim)(h)))
    return nn.Dense(self.vocab_size, name="out")(nn.LayerNorm()(x))


TABLES = ("embed", "bigrams")  # the leaves updated lazily


def lookahead_takes_sparse_rows():
  """Whether this lookahead_optax's `lookahead` accepts `SparseRows`."""
  if "rows_per_step" not in inspect.signature(lo.lookahead).parameters:
    return False
  tx = lo.lookahead(lo.lazy(optax.adam(1e-3)), rows_per_step=1)
  params = jnp.zeros((4, 2))
  try:
    tx.update(lo.SparseRows(jnp.array([1]), jnp.ones((1, 2))),
              tx.init(params), params)
  except (TypeError, ValueError):
    return False
  return True


def make_optimizer(name, learning_rate, params, ids_per_step=None):
  """The optimizer `name`; `ids_per_step`: lookups per table and step."""
  if name == "adamw":
    return optax.adamw(learning_rate, weight_decay=0.01)
  if name == "lookahead(adamw)":
    return lo.lookahead(optax.adamw(learning_rate, weight_decay=0.01))
  labels = {k: "table" if k in TABLES else "rest" for k in params}
  inner = optax.partition(
      {"table": lo.lazy(optax.adam(learning_rate)),
       "rest": optax.adamw(learning_rate, weight_decay=0.01)}, labels)
  if "SparseRows" not in name:
    return lo.lookahead(inner)
  if not lookahead_takes_sparse_rows():
    return inner  # (an older lookahead_optax: lazy alone)
  # Row-sparse syncs: lookahead keeps the ids of each cycle and syncs only
  # those rows; it needs the number of ids each step brings per table.
  return lo.lookahead(inner, rows_per_step={
      k: {"embedding": ids_per_step} for k in TABLES if k in params})


LAZY = "lookahead(lazy(adam) on embedding, adamw elsewhere)"
SPARSE = LAZY + ", SparseRows"
OPTIMIZERS = ("adamw", "lookahead(adamw)", LAZY, SPARSE)


def make_loss(model):
  def loss_fn(params, batch):
    logits = model.apply({"params": params}, batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch[:, 1:]).mean()
  return loss_fn


def make_train_step(name, model, tx):
  """`step(params, state, batch) -> (params, state, loss)` for one batch."""
  loss_fn = make_loss(model)

  def step(params, state, batch):
    if "SparseRows" in name:
      # SparseRows at the table leaves: only the looked-up rows.
      loss, grads = lo.sparse_value_and_grad(loss_fn)(params, batch)
      extra = {}
    else:
      loss, grads = jax.value_and_grad(loss_fn)(params, batch)
      # Ids looked up: only the lazy optimizer uses them.
      tokens = batch[:, :-1]
      ids = {"embed": {"embedding": tokens}}
      if "bigrams" in params:
        ids["bigrams"] = {"embedding": bigram_ids(
            tokens, params["bigrams"]["embedding"].shape[0])}
      extra = {"touched_rows": ids} if "lazy" in name else {}
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state, loss

  return step


# The step timing (also used by benchmarks/sparse.py).
DENSE_STEP = "dense gradient (jax.grad)"
SPARSE_STEP = "SparseRows gradient (lo.sparse_value_and_grad)"
REGION_ANALYSIS = {"xla_cpu_copy_insertion_use_region_analysis": True}
BATCH_SIZE = 16


def benchmark_setup(table_rows, vocab_size=2400, seed=0):
  """`setup(name) -> (step, init, compiler_options)` for a big input table.

  `step(params, state, batch) -> (params, state)` is one training step of
  `TinyTransformer(vocab_size, table_rows=table_rows)`; `init()` gives fresh
  params, optimizer state and a batch. Both paths use the optimizer of
  `LAZY` (lookahead around it where `lookahead` takes `SparseRows`); the
  dense path is compiled with XLA:CPU's region analysis, its fast setting.
  """
  model = TinyTransformer(vocab_size, table_rows=table_rows)
  rng = np.random.default_rng(seed)
  batch = rng.integers(0, vocab_size, (BATCH_SIZE, CONTEXT + 1)).astype(
      np.int32)
  params0 = jax.jit(model.init)(jax.random.key(seed), batch[:1, :-1])["params"]
  with_lookahead = lookahead_takes_sparse_rows()

  def setup(name):
    path = SPARSE if name == SPARSE_STEP else LAZY
    tx = make_optimizer(path, 1e-3, params0, BATCH_SIZE * CONTEXT)
    if not with_lookahead:
      tx = make_optimizer(SPARSE, 1e-3, params0)
    train = make_train_step(path, model, tx)

    def step(params, state, batch):
      params, state, _ = train(params, state, batch)
      return params, state

    def init():
      params = jax.tree.map(lambda x: jnp.array(x, copy=True), params0)
      return params, tx.init(params), jnp.asarray(batch)

    options = REGION_ANALYSIS if name == DENSE_STEP else None
    return step, init, options

  return setup


def time_step(table_rows, repeats):
  """Times both paths (interleaved); returns {name: (ms, temp MB, ...)}."""
  setup = benchmark_setup(table_rows)
  # The dense path gets the compiler option that lazy's CPU warning asks for.
  warnings.filterwarnings("ignore", message="lazy: XLA:CPU")
  runs = {}
  for name in (DENSE_STEP, SPARSE_STEP):
    step, init, options = setup(name)
    jitted = jax.jit(step, donate_argnums=(0, 1), compiler_options=options)
    params, state, batch = init()
    memory = jitted.lower(params, state, batch).compile().memory_analysis()
    params, state = jitted(params, state, batch)  # compile and warm up
    runs[name] = [jitted, (params, state), batch, memory, []]
  for _ in range(repeats):
    for name, run in runs.items():
      jitted, (params, state), batch = run[0], run[1], run[2]
      start = time.perf_counter()
      for _ in range(4):
        params, state = jitted(params, state, batch)
      jax.block_until_ready(params)
      run[4].append((time.perf_counter() - start) / 4 * 1e3)
      run[1] = (params, state)
  return {name: dict(ms=float(np.median(run[4])),
                     temp_mb=run[3].temp_size_in_bytes / 2**20,
                     out_mb=run[3].output_size_in_bytes / 2**20)
          for name, run in runs.items()}


def windows(ids, starts):
  return np.stack([ids[s:s + CONTEXT + 1] for s in starts])


def main():
  parser = _common.parser(
      __doc__, "language_model.png",
      steps_help="training steps per optimizer (default 600, smoke 5)")
  parser.add_argument("--learning-rate", type=float, default=3e-3)
  parser.add_argument("--table-rows", type=int, default=None,
                      help="rows of the big input table for the step timing "
                      "(default 1M, smoke 50k; 0 skips the timing)")
  args = parser.parse_args()
  table_rows = (args.table_rows if args.table_rows is not None
                else 50_000 if args.smoke else 1_000_000)
  sparse_lookahead = lookahead_takes_sparse_rows()
  steps = args.steps or (5 if args.smoke else 600)
  # Evaluate every 48 steps: not a multiple of k, so fast and slow differ.
  chunk = min(steps, 5 if args.smoke else 48)
  batch_size = BATCH_SIZE
  train_ids, valid_ids, vocab, counts = load_corpus()
  rare = sum(1 for w in vocab[1:] if counts[w] <= 5)
  print(f"pydoc topics: {len(train_ids)} train / {len(valid_ids)} validation "
        f"tokens, vocabulary {len(vocab)} words ({rare} seen <= 5 times)")
  valid_count = 64 if args.smoke else 256
  valid = windows(valid_ids, np.linspace(
      0, len(valid_ids) - CONTEXT - 2, valid_count).astype(int))

  model = TinyTransformer(len(vocab))
  params0 = model.init(jax.random.key(0), valid[:1, :-1])["params"]
  loss_fn = make_loss(model)

  @jax.jit
  def perplexity(params):
    return jnp.exp(loss_fn(params, valid))

  results = {}
  bar = _common.progress(len(OPTIMIZERS) * steps, "training")
  for name in OPTIMIZERS:
    tx = make_optimizer(name, args.learning_rate, params0,
                        batch_size * CONTEXT)
    train_step = make_train_step(name, model, tx)

    @jax.jit
    def train_chunk(params, state, batches, train_step=train_step):
      def step(carry, batch):
        params, state, loss = train_step(*carry, batch)
        return (params, state), loss

      (params, state), losses = jax.lax.scan(step, (params, state), batches)
      return params, state, losses.mean()

    uses_lookahead = "lookahead" in name and (
        name != SPARSE or sparse_lookahead)
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
      slow = lo.eval_params(state, params) if uses_lookahead else params
      curve.append((done + n, float(perplexity(params)),
                    float(perplexity(slow))))
      bar.update(n)
    # Embedding rows no training batch looked up: how many did the optimizer
    # move anyway (weight decay, stale moments)?
    seen = np.zeros(len(vocab), bool)
    seen[np.unique(np.concatenate(seen_ids))] = True
    moved = np.any(np.asarray(slow["embed"]["embedding"])
                   != np.asarray(params0["embed"]["embedding"]), axis=1)
    label = name if uses_lookahead or "lookahead" not in name else (
        name.replace("lookahead(", "", 1).replace("),", ",", 1)
        + " (this lookahead_optax's lookahead does not take SparseRows)")
    results[label] = dict(curve=np.array(curve), seconds=time.time() - start,
                          lookahead=uses_lookahead,
                         fast=curve[-1][1], slow=curve[-1][2],
                         unseen=int((~seen).sum()),
                         unseen_moved=int((moved & ~seen).sum()))
  bar.close()

  print(f"{steps} steps of {batch_size} x {CONTEXT} tokens, "
        f"learning rate {args.learning_rate:g}; lookahead k=5, alpha=0.5")
  _common.print_table(
      [("optimizer", "<66"), ("valid ppl (fast)", ">17.2f"),
       ("valid ppl (slow)", ">17.2f"), ("unseen rows moved", ">19"),
       ("time", ">7")],
      [(name, r["fast"], r["slow"] if r["lookahead"] else None,
        f"{r['unseen_moved']}/{r['unseen']}", f"{r['seconds']:.0f}s")
       for name, r in results.items()])

  timing = None
  if table_rows:
    print(f"\nOne training step with a {table_rows:,}-row x 64 bigram table "
          f"(batch {BATCH_SIZE} x {CONTEXT}; jit, params and state donated):")
    timing = time_step(table_rows, repeats=2 if args.smoke else 5)
    dense, sparse = timing[DENSE_STEP], timing[SPARSE_STEP]
    _common.print_table(
        [("path", "<62"), ("step (ms)", ">10.1f"), ("XLA temp (MB)", ">14.1f"),
         ("XLA output (MB)", ">16.1f")],
        [(name, t["ms"], t["temp_mb"], t["out_mb"])
         for name, t in timing.items()])
    print(f"sparse path speedup: {dense['ms'] / sparse['ms']:.1f}x")

  fig, axes = plt.subplots(1, 2 if timing else 1, squeeze=False,
                           figsize=(11 if timing else 6.5, 4),
                           gridspec_kw={"width_ratios": [1.6, 1]} if timing
                           else None)
  ax = axes[0, 0]
  for name, r in results.items():
    c = r["curve"]
    # Dashed: the SparseRows run, which retraces the touched-rows run.
    style = "--" if "SparseRows" in name else "-"
    if r["lookahead"]:
      line, = ax.plot(c[:, 0], c[:, 2], style, label=f"{name} (slow)")
      ax.plot(c[:, 0], c[:, 1], ":", color=line.get_color(), lw=0.8)
    else:
      ax.plot(c[:, 0], c[:, 1], label=name)
  ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("validation perplexity")
  ax.set_title("pydoc topics, word-level transformer (dotted: fast weights)",
               fontsize=10)
  ax.legend(fontsize=6)
  if timing:
    ax = axes[0, 1]
    names = list(timing)
    ms = [timing[n]["ms"] for n in names]
    bars = ax.barh([0, 1], ms, color=["tab:gray", "tab:green"])
    ax.set_yticks([0, 1], ["dense gradient\n(jax.grad)",
                           "SparseRows\n(sparse_value_and_grad)"], fontsize=8)
    ax.bar_label(bars, [f"{m:.1f} ms" for m in ms], fontsize=8)
    ax.set_xlabel("train step (ms), lower is better")
    ax.set_title(f"{table_rows:,}-row table: "
                 f"{ms[0] / ms[1]:.1f}x faster step", fontsize=10)
    ax.set_xlim(0, max(ms) * 1.3)
  fig.tight_layout()
  _common.save_figure(fig, args.out, "language_model.png")


if __name__ == "__main__":
  main()
