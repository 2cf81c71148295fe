"""DiLoCo's sync: fragments that sync at staggered steps, compressed means.

Every `diloco` step runs its sync here (one fragment is the paper's DiLoCo),
except with `fragments="slices"`, whose sync (`_slices`) cuts every leaf
instead and reuses `outer_step` and `landing`:

* the params leaves are split into P fragments (`leaf_fragments`: whole
  leaves, largest first, each to the fragment with the fewest values so
  far; or from a prefix tree of fragment numbers); fragment f syncs after
  the inner steps t with
  `t % sync_period == ((f + 1) * sync_period // P) % sync_period`
  (`sync_slots`), so one fragment syncs every `sync_period / P` steps;
* at its sync, fragment f's pseudo-gradient alone is averaged over the axis
  (`_compress.mean`: float32, or encoded with a float32 mean) in a
  `jax.lax.cond` of its own, and the outer step is `outer` applied to that
  fragment alone, with the fragment's own outer state (`StreamingState`);
* the params of the fragment then become
  $\\text{mix} \\cdot (\\theta + u) + (1 - \\text{mix}) \\phi'$, where
  $\\theta + u$ are the fast weights after this step's inner update $u$ and
  $\\phi'$ the new slow weights (`mix = 0`: they land on $\\phi'$, bitwise
  where the landing is exact). With `overlap`, the pseudo-gradient is taken
  from the params $\\theta$ as they enter the step, so the collective depends
  on nothing the step computes.

References:
  Douillard et al., [Streaming DiLoCo with overlapping communication:
  Towards a Distributed Free Lunch](https://arxiv.org/abs/2501.18512), 2025.
"""

import numbers
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lookahead_optax import _compress
from lookahead_optax import _participation
from lookahead_optax import _sync
from lookahead_optax import _tree
from lookahead_optax._types import StreamingState


def is_fragment_number(x: Any) -> bool:
  return (isinstance(x, (numbers.Integral, np.integer))
          and not isinstance(x, (bool, np.bool_)))


def sync_slots(num_fragments: int, sync_period: int) -> list:
  """`step % sync_period` at fragment f's sync, for each f."""
  return [((f + 1) * sync_period // num_fragments) % sync_period
          for f in range(num_fragments)]


def _balanced(sizes: list, num: int) -> list:
  """Leaves to `num` fragments, largest first to the least loaded one.

  Ties go to the earlier leaf and the lower fragment number, so the split
  depends on the params' shapes alone (the same on every replica).
  """
  loads, out = [0] * num, [0] * len(sizes)
  for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
    f = min(range(num), key=lambda f: (loads[f], f))
    out[i] = f
    loads[f] += sizes[i]
  return out


def _from_prefix(fragments: Any, params: Any) -> list:
  """Each params leaf's fragment number, from a prefix tree (by path)."""
  per_param, unused = _tree.by_path_prefix(fragments, params)
  flat = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=_tree.is_masked_node)[0]
  out = []
  for (path, leaf), named in zip(flat, per_param):
    if _tree.is_masked_node(leaf):
      continue
    if named is None:
      raise ValueError(
          f"`fragments` gives no fragment for params leaf "
          f"{_tree.path_str(path)}: it must be a prefix of the params.")
    out.append(int(named[1]))
  if unused:
    raise ValueError(
        f"`fragments` names {_tree.path_str(unused[0])}, which is no params "
        "leaf or prefix of one.")
  return out


def leaf_fragments(sopts: Any, params: Any) -> list:
  """The fragment number of each params leaf (`jax.tree.leaves` order).

  Raises:
    ValueError: when a fragment gets no leaf.
  """
  leaves = jax.tree.leaves(params)
  if is_fragment_number(sopts.fragments) or sopts.fragments is None:
    if len(leaves) < sopts.num_fragments:
      raise ValueError(
          f"`fragments={sopts.num_fragments}`, but the params have "
          f"{len(leaves)} leaves: each fragment needs at least one.")
    return _balanced([int(np.prod(jnp.shape(x))) for x in leaves],
                     sopts.num_fragments)
  out = _from_prefix(sopts.fragments, params)
  empty = sorted(set(range(sopts.num_fragments)) - set(out))
  if empty:
    raise ValueError(f"`fragments`: fragment {empty[0]} has no params leaf.")
  return out


def _masked(treedef: Any, leaves: list, keep: list) -> Any:
  """The tree with `optax.MaskedNode()` at the leaves not in `keep`."""
  keep = set(keep)
  return jax.tree.unflatten(treedef, [
      x if i in keep else optax.MaskedNode() for i, x in enumerate(leaves)])


def init_state(config: Any, outer: optax.GradientTransformation,
               slow: Any) -> StreamingState:
  """One outer state per fragment, and the error-feedback buffers."""
  slow_c = _sync.in_compute_dtype(slow)
  leaves, treedef = jax.tree.flatten(slow_c)
  frag = leaf_fragments(config, slow)
  states = tuple(
      outer.init(_masked(treedef, leaves,
                         [i for i, g in enumerate(frag) if g == f]))
      for f in range(config.num_fragments))
  residuals = (jax.tree.map(jnp.zeros_like, slow_c)
               if config.error_feedback else None)
  return StreamingState(states, residuals, _participation.init_counts())


class Fragment(NamedTuple):
  """What one fragment's sync needs (static)."""

  leaves: list  # the indices of its params leaves
  treedef: Any  # the params' tree structure
  num_leaves: int


def outer_step(opts: Any, frag: Fragment, slow: list, params: list,
               inner_updates: Optional[list], outer_state: Any,
               residual: Optional[list], weight: Optional[jax.Array],
               counts: Any) -> tuple[list, Any, Optional[list], Any]:
  """One fragment's sync: mean pseudo-gradient, then the outer step.

  The pseudo-gradient is taken from the fast weights `params +
  inner_updates`, or with `overlap` (`inner_updates` None) from the params
  entering the step. With this replica's `weight`, the mean is weighted and
  needs a quorum (`_participation`). Returns the new slow weights (their
  dtypes), the fragment's new outer state, its new error-feedback buffers
  and the new `ReplicaCounts`.
  """
  sopts = opts.streaming
  slow_c = [s.astype(_sync.compute_dtype(s)) for s in slow]
  if inner_updates is None:
    source = [p.astype(s.dtype) for p, s in zip(params, slow_c)]
  else:
    source = [_sync.fast_weights(p, u, s.dtype)
              for p, u, s in zip(params, inner_updates, slow_c)]
  delta = [s - x for s, x in zip(slow_c, source)]
  vote = None
  if weight is None:
    if residual is not None:
      delta = [d + r for d, r in zip(delta, residual)]
    mean, dropped = _compress.mean(delta, opts.axis_name, sopts.fmt)
  else:
    vote = _participation.vote(weight, opts.axis_name, sopts.min_replicas)
    total = jnp.where(vote.total > 0, vote.total, 1.0)
    mean, dropped = _compress.mean(
        _participation.messages(delta, residual, vote), opts.axis_name,
        sopts.fmt, total)
  old_outer = outer_state

  def tree(values):
    full = [None] * frag.num_leaves
    for i, v in zip(frag.leaves, values):
      full[i] = v
    return _masked(frag.treedef, full, frag.leaves)
  targets, outer_state = _sync.apply_outer(opts.outer, tree(mean),
                                           outer_state, tree(slow_c))
  targets = jax.tree.leaves(targets)
  # Every replica keeps the target itself (they must agree bitwise).
  stored = [_sync.stored_slow(p, None, t, s, keep_target=True)
            for p, t, s in zip(params, targets, slow)]
  if vote is None:
    residual = dropped if residual is not None else None
  else:
    stored, outer_state, residual = _participation.settle(
        vote, (stored, outer_state), (slow, old_outer), residual, dropped)
    counts = _participation.counted(counts, vote, opts.axis_name)
  if sopts.check_replicas is not None:
    (stored, outer_state), counts = _participation.checked(
        (stored, outer_state), counts, opts.axis_name, sopts.check_replicas)
  return stored, outer_state, residual, counts


def landing(p: jax.Array, u: jax.Array, slow_new: jax.Array, old_slow: Any,
            mix: Any) -> jax.Array:
  """The update to $\\text{mix} (p + u) + (1 - \\text{mix}) \\phi'$."""
  cdtype = _sync.compute_dtype(old_slow)
  target = slow_new.astype(cdtype)
  if not (isinstance(mix, numbers.Real) and mix == 0):
    fast = _sync.fast_weights(p, u, cdtype)
    mix = jnp.asarray(mix, cdtype)
    target = mix * fast + (1 - mix) * target
  return _sync.landing_update(p, u, target, old_slow)


class Leaves(NamedTuple):
  """The per-leaf lists of one step (`jax.tree.leaves` order of the params)."""

  params: list
  inner_updates: list
  slow: list
  residuals: Optional[list]


def fragment_sync(opts: Any, frag: Fragment, flag: jax.Array, x: Leaves,
                  outer_state: Any, weight: Optional[jax.Array],
                  counts: Any) -> tuple[Leaves, Any, Any]:
  """Fragment `frag`'s sync where `flag`, in a `jax.lax.cond` of its own.

  Returns the fragment's leaves (the updates in `inner_updates`), its outer
  state and the `ReplicaCounts`; where `flag` is False they are as the
  inner step left them.
  """
  sopts = opts.streaming
  pick = lambda leaves: [leaves[i] for i in frag.leaves]  # pylint: disable=unnecessary-lambda-assignment
  p, u, slow = pick(x.params), pick(x.inner_updates), pick(x.slow)
  res = None if x.residuals is None else pick(x.residuals)
  lands = lambda new_slow: [landing(a, b, n, s, sopts.mix)  # pylint: disable=unnecessary-lambda-assignment
                            for a, b, n, s in zip(p, u, new_slow, slow)]
  if sopts.overlap:
    # The conditional gets no operand that this step computes, so that its
    # collectives need not wait for the inner update; the landing follows.
    new_slow, outer_state, res, counts = jax.lax.cond(
        flag, lambda ops: outer_step(opts, frag, *ops),
        lambda ops: (ops[0], ops[3], ops[4], ops[6]),
        (slow, p, None, outer_state, res, weight, counts))
    updates = [jnp.where(flag, a, b) for a, b in zip(lands(new_slow), u)]
    return Leaves(p, updates, new_slow, res), outer_state, counts

  def synced(ops):
    new_slow, outer_f, res_f, counts_f = outer_step(opts, frag, *ops)
    return new_slow, lands(new_slow), outer_f, res_f, counts_f

  # The landing in the branch: a step without this sync returns `u` as is.
  new_slow, updates, outer_state, res, counts = jax.lax.cond(
      flag, synced, lambda ops: (ops[0], ops[2], ops[3], ops[4], ops[6]),
      (slow, p, u, outer_state, res, weight, counts))
  return Leaves(p, updates, new_slow, res), outer_state, counts


def sync(opts: Any, params: Any, inner_updates: Any, slow: Any, state: Any,
         step: jax.Array, weight: Optional[jax.Array] = None
         ) -> tuple[Any, Any, Any, list]:
  """The fragments' syncs of this step (`fragment_sync` for each).

  Returns the updates, the slow weights, the `StreamingState` and, per
  params leaf (flattened with `optax.MaskedNode` holes, None there), the
  flag of its fragment's sync (for the inner-state policy).
  """
  p_leaves, treedef = jax.tree.flatten(params)
  x = Leaves(p_leaves, treedef.flatten_up_to(inner_updates),
             treedef.flatten_up_to(slow),
             None if state.residuals is None
             else treedef.flatten_up_to(state.residuals))
  out = Leaves(*(None if v is None else list(v) for v in x))
  frag_of = leaf_fragments(opts.streaming, params)
  outer_states, flags = list(state.outer_states), [None] * len(p_leaves)
  counts = state.counts
  slots = sync_slots(opts.streaming.num_fragments, opts.sync_period)
  for f, slot in enumerate(slots):
    frag = Fragment([i for i, g in enumerate(frag_of) if g == f], treedef,
                    len(p_leaves))
    flag = step % opts.sync_period == slot
    done, outer_states[f], counts = fragment_sync(
        opts, frag, flag, x, outer_states[f], weight, counts)
    for j, i in enumerate(frag.leaves):
      flags[i] = flag
      for field in ("inner_updates", "slow", "residuals"):
        if getattr(out, field) is not None:
          getattr(out, field)[i] = getattr(done, field)[j]
  unflat = lambda leaves: jax.tree.unflatten(treedef, leaves)  # pylint: disable=unnecessary-lambda-assignment
  residuals = None if out.residuals is None else unflat(out.residuals)
  return (unflat(out.inner_updates), unflat(out.slow),
          StreamingState(tuple(outer_states), residuals, counts),
          _with_holes(flags, params))


def _with_holes(per_leaf: list, params: Any) -> list:
  """`per_leaf` with None at the params' `optax.MaskedNode` holes."""
  it = iter(per_leaf)
  return [None if _tree.is_masked_node(x) else next(it)
          for x in jax.tree.leaves(params, is_leaf=_tree.is_masked_node)]
