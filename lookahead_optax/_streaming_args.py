"""Streaming DiLoCo's arguments, and the split of the params into fragments.

`check_args` checks `lookahead`'s streaming arguments once, when the
optimizer is built; `leaf_fragments` gives each params leaf its fragment
(from an int P: whole leaves, largest first, each to the fragment with the
fewest values so far; or from a prefix tree of fragment numbers), and
`sync_slots` the step of each fragment's sync within a period.
"""

import numbers
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lookahead_optax import _checks
from lookahead_optax import _compress
from lookahead_optax import _tree


class StreamingOptions(NamedTuple):
  """The streaming arguments of `lookahead`, checked (static)."""

  fragments: Any  # an int P, or a prefix tree of fragment numbers
  num_fragments: int
  fmt: Optional[str]  # a name in `_compress.FORMATS`, None for float32
  error_feedback: bool
  overlap: bool
  mix: Any  # a float in [0, 1] (or a traced scalar)


_ARGUMENTS = ("fragments", "communication_dtype", "error_feedback", "overlap",
              "mix")


def _check_bool(name: str, value: Any) -> bool:
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"`{name}` must be True or False, got {value!r}.")
  return bool(value)


def _is_fragment_number(x: Any) -> bool:
  return (isinstance(x, (numbers.Integral, np.integer))
          and not isinstance(x, (bool, np.bool_)))


def _count_fragments(fragments: Any) -> int:
  """P for an int or a prefix tree of fragment numbers (checked)."""
  if fragments is None:
    return 1
  if _is_fragment_number(fragments):
    if int(fragments) < 1:
      raise ValueError(
          f"`fragments` must be an integer >= 1, got {fragments!r}.")
    return int(fragments)
  leaves = jax.tree.leaves(fragments)
  bad = [x for x in leaves if not _is_fragment_number(x) or int(x) < 0]
  if not leaves or bad:
    raise TypeError(
        "`fragments` must be None, an integer >= 1, or a pytree (a prefix of "
        "the params) whose leaves are fragment numbers, integers >= 0; got "
        f"{bad[0] if bad else fragments!r}.")
  count = max(int(x) for x in leaves) + 1
  empty = sorted(set(range(count)) - {int(x) for x in leaves})
  if empty:
    raise ValueError(
        f"`fragments` numbers fragments 0 to {count - 1}, but fragment "
        f"{empty[0]} has no leaves: number them 0, 1, ..., P - 1.")
  return count


def check_args(*, axis_name: Any, sync_period: Any, inner_state: str,
               fragments: Any, communication_dtype: Any, error_feedback: Any,
               overlap: Any, mix: Any) -> Optional[StreamingOptions]:
  """The checked streaming options, or None when none is given.

  Raises:
    TypeError, ValueError: naming the argument.
  """
  error_feedback = _check_bool("error_feedback", error_feedback)
  overlap = _check_bool("overlap", overlap)
  given = [name for name, value in zip(
      _ARGUMENTS, (fragments, communication_dtype, error_feedback, overlap,
                   mix)) if value is not None and value is not False]
  if not given:
    return None
  if axis_name is None:
    raise ValueError(
        f"`{given[0]}` needs `axis_name`: it is an option of DiLoCo, whose "
        "replicas average their pseudo-gradients over a mapped axis.")
  num = _count_fragments(fragments)
  fmt = _compress.format_name(communication_dtype)
  if mix is not None:
    _checks.check_unit_interval("mix", mix, allow_schedule=False)
  if error_feedback and fmt is None:
    raise ValueError(
        "`error_feedback=True` needs a low-precision `communication_dtype` "
        "(in float32 nothing is dropped to feed back).")
  if (num > 1 or overlap) and not isinstance(sync_period, numbers.Integral):
    raise TypeError(
        "`sync_period` must be a Python int with `fragments` or `overlap` "
        f"(it sets the schedule), got {sync_period!r}.")
  if num > 1 and int(sync_period) % num:
    raise ValueError(
        f"`sync_period` must be a multiple of the number of fragments P = "
        f"{num} (each fragment syncs every `sync_period` steps, one every "
        f"`sync_period / P`), got {sync_period!r}.")
  if overlap and int(sync_period) == 1:
    raise ValueError(
        "`overlap=True` needs `sync_period` >= 2: it takes the pseudo-"
        "gradient from the params before a step's inner update, and with "
        "`sync_period=1` that is the slow weights themselves.")
  if inner_state == "pullback":
    raise ValueError(
        f"`inner_state='pullback'` cannot combine with `{given[0]}`; use "
        "'keep' or 'reset' (reset per fragment at its sync).")
  return StreamingOptions(fragments, num, fmt, error_feedback, overlap,
                          0.0 if mix is None else mix)


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


def leaf_fragments(sopts: StreamingOptions, params: Any) -> list:
  """The fragment number of each params leaf (`jax.tree.leaves` order).

  Raises:
    ValueError: when a fragment gets no leaf.
  """
  leaves = jax.tree.leaves(params)
  if _is_fragment_number(sopts.fragments) or sopts.fragments is None:
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
