"""Checkpoint helpers: checking a restored state, migrating optax states.

The state of `lookahead` is a plain pytree of arrays (`LookaheadState`), so any
pytree checkpointer (orbax-checkpoint, flax serialization, `np.savez` of the
leaves) saves and restores it exactly. These helpers cover the two things a
checkpointer cannot know: whether a checkpoint was written by the optimizer
you are restoring into, and how to start Lookahead from a checkpoint written
without it.
"""

import numbers
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lookahead_optax import _checks
from lookahead_optax import _tree
from lookahead_optax._lookahead import LookaheadState
from lookahead_optax._lookahead import PullbackState

_Key = Union[str, int]


def _key_name(key: Any) -> _Key:
  """One path entry, with dict keys and attribute names made alike."""
  if isinstance(key, jax.tree_util.DictKey):
    name = key.key
    if isinstance(name, str) and name.isdecimal():
      # Orbax saves tuple indices and int dict keys (e.g. the `0` of an
      # `nnx.Optimizer`'s state) as strings: "0" is the index 0.
      return int(name)
    return name if isinstance(name, (str, int)) else str(name)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.SequenceKey):
    return key.idx
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return key.key
  return str(key)


def _path_str(path: tuple[_Key, ...]) -> str:
  text = ""
  for key in path:
    if isinstance(key, int):
      text += f"[{key}]"
    else:
      text += f".{key}" if text else str(key)
  return text or "<root>"


def _leaf_spec(
    leaf: Any, name: str = "state", path: tuple[_Key, ...] = ()
) -> tuple[tuple[int, ...], Any]:
  """(shape, dtype) of an array, a ShapeDtypeStruct or checkpoint metadata."""
  shape = getattr(leaf, "shape", None)
  dtype = getattr(leaf, "dtype", None)
  if shape is None or dtype is None:
    if not isinstance(leaf, (numbers.Number, np.generic)):
      raise TypeError(
          f"`{name}` leaf {_path_str(path)} is not an array (nor anything "
          f"with `shape` and `dtype`): got {type(leaf).__name__} {leaf!r}."
      )
    shape, dtype = np.shape(leaf), jnp.result_type(leaf)
  try:
    dtype = jnp.dtype(dtype)
  except TypeError:
    pass
  return tuple(shape), dtype


def _describe(spec: tuple[tuple[int, ...], Any]) -> str:
  shape, dtype = spec
  name = getattr(dtype, "name", str(dtype))
  return f"{name}[{','.join(str(d) for d in shape)}]"


def _flatten(tree: Any) -> dict[tuple[_Key, ...], Any]:
  if hasattr(tree, "item_metadata"):  # an orbax StepMetadata
    tree = tree.item_metadata
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {tuple(_key_name(k) for k in path): leaf for path, leaf in leaves}


def _align_variable_values(
    got: dict[tuple[_Key, ...], Any], want: dict[tuple[_Key, ...], Any]
) -> dict[tuple[_Key, ...], Any]:
  """Renames the paths of `got` that differ from `want` by a `value` level.

  A Flax NNX `Variable` holds its array in `.value`: the state of an
  `nnx.Optimizer` (and its checkpoint) has a path `...count.value` where
  `nnx.to_pure_dict` of it, or the plain optax state, has `...count`.
  """
  out = {}
  for path, leaf in got.items():
    if path not in want:
      if path[-1:] == ("value",) and path[:-1] in want:
        path = path[:-1]
      elif path + ("value",) in want:
        path = path + ("value",)
    out.setdefault(path, leaf)
  return out if len(out) == len(got) else got


def check_state_structure(
    state: Any, expected: Any, *, name: str = "state"
) -> None:
  """Checks that a (restored) state has the structure of `expected`.

  Compares the leaf paths, shapes and dtypes of two pytrees and raises a
  `ValueError` naming the first path that differs. Container types are not
  compared: a dict key and a NamedTuple field of the same name match, and so
  do a list and a tuple, so `state` may be the tree of a checkpoint's metadata
  (e.g. orbax's `checkpointer.metadata(path).item_metadata`, where
  NamedTuples are saved as dicts) and `expected` the abstract state of the
  optimizer you are restoring into (`jax.eval_shape(tx.init, params)`).
  Empty nodes (`optax.EmptyState()`, `None`) hold no leaves and are
  ignored. Leaves may be arrays, `jax.ShapeDtypeStruct`s, Python or NumPy
  scalars, or any object with `shape` and `dtype` attributes.

  Keys that orbax writes as strings match the indices they stand for (the
  `"0"` of a saved `opt_state.inner_state[0]`), and the `value` level of a
  Flax NNX variable is optional, so the checkpoint of an `nnx.Optimizer`
  (`nnx.state(optimizer)`, or its `nnx.to_pure_dict`) checks against the
  state of the optimizer it is restored into.

  Args:
    state: the state to check: restored arrays or checkpoint metadata (an
      orbax `StepMetadata` is unwrapped to its `item_metadata`).
    expected: a pytree with the expected structure, shapes and dtypes, e.g.
      `jax.eval_shape(tx.init, params)`.
    name: how to call `state` in the error message.

  Raises:
    TypeError: if a leaf of `state` or `expected` is not an array (e.g. a
      string), naming its path.
    ValueError: if a leaf of `expected` is missing from `state` or the other
      way round (naming the first such path, and saying when the state holds
      no slow weights, i.e. was saved without lookahead), or a leaf has
      another shape or dtype.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import lookahead_optax as lo
    >>> params = {"w": jnp.zeros(3)}
    >>> expected = jax.eval_shape(
    ...     lo.lookahead(optax.adam(1e-3)).init, params)
    >>> lo.check_state_structure(
    ...     lo.lookahead(optax.adam(1e-2)).init(params), expected)  # passes
    >>> lo.check_state_structure(optax.adam(1e-3).init(params), expected)
    Traceback (most recent call last):
      ...
    ValueError: `state` does not match the expected structure: it has no
    leaf inner_state[0].count (expected int32[]), and an unexpected leaf
    [0].count (int32[]). In all, 5 expected leaves are missing and 3 are
    unexpected. It holds no slow weights: was it saved without lookahead?
    See `lookahead_optax.migrate_optax_state`.
  """
  got = _flatten(state)
  want = _flatten(expected)
  for path, leaf in got.items():
    _leaf_spec(leaf, name, path)
  for path, leaf in want.items():
    _leaf_spec(leaf, "expected", path)
  got = _align_variable_values(got, want)
  missing = [p for p in want if p not in got]
  extra = [p for p in got if p not in want]
  if missing or extra:
    parts = []
    if missing:
      parts.append(
          f"it has no leaf {_path_str(missing[0])} (expected "
          f"{_describe(_leaf_spec(want[missing[0]], 'expected'))})"
      )
    if extra:
      parts.append(
          f"an unexpected leaf {_path_str(extra[0])} "
          f"({_describe(_leaf_spec(got[extra[0]]))})"
      )
    message = (
        f"`{name}` does not match the expected structure: "
        + ", and ".join(parts) + "."
    )
    if len(missing) > 1 or len(extra) > 1:
      message += (
          f" In all, {len(missing)} expected leaves are missing and "
          f"{len(extra)} are unexpected."
      )
    if (any("slow_params" in p for p in want)
        and not any("slow_params" in p for p in got)):
      message += (
          " It holds no slow weights: was it saved without lookahead? See "
          "`lookahead_optax.migrate_optax_state`."
      )
    raise ValueError(message)
  for path, leaf in want.items():
    want_spec, got_spec = _leaf_spec(leaf), _leaf_spec(got[path])
    if got_spec[0] != want_spec[0]:
      raise ValueError(
          f"`{name}` leaf {_path_str(path)} has shape {got_spec[0]}, "
          f"expected {want_spec[0]}."
      )
    if got_spec[1] != want_spec[1]:
      raise ValueError(
          f"`{name}` leaf {_path_str(path)} has dtype {got_spec[1]}, "
          f"expected {want_spec[1]}."
      )


def _is_lookahead_state(x: Any) -> bool:
  return isinstance(x, LookaheadState)


def _strip(abstract: Any) -> Any:
  """The state tree with every LookaheadState replaced by its inner state."""

  def strip_one(x):
    if not _is_lookahead_state(x):
      return x
    inner = x.inner_state
    if isinstance(inner, PullbackState):
      inner = inner.inner_state
    return _strip(inner)

  return jax.tree.map(strip_one, abstract, is_leaf=_is_lookahead_state)


_KNOWN_FIELDS = ("inner_state", "slow_params", "step")


def _lookahead_states_preorder(tree: Any) -> list[Any]:
  """Every LookaheadState in `tree`, each before those nested in it."""
  out = []
  for x in jax.tree.leaves(tree, is_leaf=_is_lookahead_state):
    if _is_lookahead_state(x):
      out.append(x)
      out.extend(_lookahead_states_preorder(x.inner_state))
  return out


def _extra_fields(tx: Any, abstract: Any, params: Any) -> list[dict[str, Any]]:
  """The fields of each LookaheadState of `tx`'s state other than the three
  that migration builds (e.g. the state of an outer optimizer), initialised as
  `tx.init` does. Computed in one jitted call that returns only them, so the
  rest of the state is never allocated."""

  def extras_of(states):
    return [{f: getattr(x, f) for f in x._fields if f not in _KNOWN_FIELDS}
            for x in states]

  templates = extras_of(_lookahead_states_preorder(abstract))
  if not jax.tree.leaves(templates):
    return templates  # Nothing to compute (e.g. empty states).
  return jax.jit(
      lambda p: extras_of(_lookahead_states_preorder(tx.init(p))))(params)


def _param_subtrees(node: Any, params_def: Any) -> list[Any]:
  """The subtrees of `node` with the params' structure and float leaves."""
  leaves, treedef = jax.tree.flatten(node, is_leaf=_tree.is_masked_node)
  if treedef == params_def and leaves and all(
      _tree.is_masked_node(x) or (
          hasattr(x, "shape") and hasattr(x, "dtype")
          and jnp.issubdtype(x.dtype, jnp.inexact)) for x in leaves):
    return [node]
  children, child_def = jax.tree.flatten(
      node, is_leaf=lambda x: x is not node)
  if child_def.num_leaves == 1 and child_def.num_nodes == 1:
    return []
  return [s for c in children for s in _param_subtrees(c, params_def)]


def _params_mismatch(opt_state: Any, params: Any) -> Union[str, None]:
  """A message blaming `params` if `opt_state` agrees on other shapes.

  Finds the subtrees of `opt_state` that have the structure of `params` (e.g.
  Adam's moments); if they all have the same shapes and `params` do not,
  the params are the odd one out.
  """
  params_def = jax.tree.structure(params, is_leaf=_tree.is_masked_node)
  subtrees = _param_subtrees(opt_state, params_def)
  if not subtrees:
    return None
  shapes = [[None if _tree.is_masked_node(x) else tuple(x.shape)
             for x in jax.tree.leaves(t, is_leaf=_tree.is_masked_node)]
            for t in subtrees]
  if any(s != shapes[0] for s in shapes[1:]):
    return None
  leaves = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=_tree.is_masked_node)[0]
  for (path, leaf), shape in zip(leaves, shapes[0]):
    if shape is not None and tuple(np.shape(leaf)) != shape:
      return (
          f"`params` leaf {_tree.path_str(path)} has shape "
          f"{tuple(np.shape(leaf))}, but `opt_state` holds state of shape "
          f"{shape} for it: are the params from the same checkpoint as the "
          "optimizer state?"
      )
  return None


def migrate_optax_state(
    tx: optax.GradientTransformation,
    opt_state: optax.OptState,
    params: optax.Params,
    *,
    step: int = 0,
) -> optax.OptState:
  """Builds the state of `tx` from the state of the same optimizer sans lookahead.

  Use it to continue a run checkpointed without Lookahead with Lookahead,
  e.g. from an `optax.adam` state to `lookahead(optax.adam)`: the inner
  state is taken from `opt_state` as it is (Adam's moments and step count go
  on), and the slow weights start as a copy of `params` (in the `slow_dtype`
  of the lookahead, if one was given), as if Lookahead had been initialised on
  them. `tx` may hold its lookaheads anywhere (`optax.chain(clip,
  lookahead(adam))` migrates from the state of `optax.chain(clip, adam)`);
  with `inner_state="pullback"` the last-synced inner state starts as a copy
  of the migrated one. Nothing is computed but copies, and the arrays keep
  their shardings.

  Args:
    tx: the optimizer to migrate to, containing one or more `lookahead`s.
    opt_state: the state of the optimizer `tx` without its lookaheads (each
      `lookahead(inner)` replaced by `inner`), with its real container
      types (restore it with the abstract state of that optimizer as target).
    params: the current params, from the same checkpoint.
    step: the lookahead step count to start from, an integer in
      $[0, 2^{31} - 1]$ (default 0: the first sync comes `sync_period` steps
      after the migration).

  Returns:
    A state of `tx`.

  Raises:
    TypeError: if `tx` is not a gradient transformation, or `step` is not an
      integer.
    ValueError: if `tx` holds no lookahead, `step` is outside
      $[0, 2^{31} - 1]$, `params` have other shapes than the state in
      `opt_state` holds (naming the leaf), or `opt_state` does not have the
      structure of the state of `tx` without its lookaheads (naming the first
      differing path).

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import lookahead_optax as lo
    >>> params = {"w": jnp.array([1.0, 2.0])}
    >>> adam = optax.adam(0.1)
    >>> adam_state = adam.init(params)
    >>> updates, adam_state = adam.update({"w": jnp.ones(2)}, adam_state)
    >>> params = optax.apply_updates(params, updates)  # a plain-optax run
    >>> tx = lo.lookahead(optax.adam(0.1), sync_period=5)
    >>> state = lo.migrate_optax_state(tx, adam_state, params)
    >>> state.inner_state[0].count, lo.slow_params(state)
    (Array(1, dtype=int32), {'w': Array([0.9, 1.9], dtype=float32)})
  """
  _checks.check_transformation("tx", tx)
  step = _checks.check_step("step", step)
  abstract = jax.eval_shape(tx.init, params)
  if not any(_is_lookahead_state(x) for x in jax.tree.leaves(
      abstract, is_leaf=_is_lookahead_state)):
    raise ValueError(
        "`tx` holds no lookahead: its state has no LookaheadState, so there "
        "is nothing to migrate to."
    )
  stripped = _strip(abstract)
  try:
    check_state_structure(opt_state, stripped, name="opt_state")
  except ValueError as e:
    # `abstract` was built from `params`: when they are what is wrong, say so.
    blame = _params_mismatch(opt_state, params)
    if blame is not None:
      raise ValueError(blame) from e
    raise
  extras = _extra_fields(tx, abstract, params)

  def copy(x):
    return jnp.array(x, copy=True)

  def build(template, plain):
    if not _is_lookahead_state(template):
      return plain
    extra = extras.pop(0)
    pullback = isinstance(template.inner_state, PullbackState)
    inner_template = (
        template.inner_state.inner_state if pullback else template.inner_state
    )
    inner = migrate(inner_template, plain)
    if pullback:
      inner = PullbackState(inner, jax.tree.map(copy, inner))
    try:
      slow = jax.tree.map(
          lambda s, p: s if _tree.is_masked_node(s) else jnp.array(
              p, dtype=s.dtype, copy=True),
          template.slow_params, params, is_leaf=_tree.is_masked_node)
    except ValueError as e:
      raise _checks.WordedError(
          "The slow weights of a lookahead in `tx` do not have the structure "
          f"of `params`: {jax.tree.structure(template.slow_params)} vs "
          f"{jax.tree.structure(params)}."
      ) from e
    return LookaheadState(
        inner_state=inner,
        slow_params=slow,
        step=jnp.asarray(step, dtype=template.step.dtype),
        **extra,
    )

  def migrate(template, plain):
    try:
      return jax.tree.map(
          build, template, plain, is_leaf=_is_lookahead_state)
    except _checks.WordedError:
      raise
    except ValueError as e:
      raise ValueError(
          "`opt_state` has the leaves but not the container types of the "
          "state of `tx` without its lookaheads: "
          f"{jax.tree.structure(plain)} vs {jax.tree.structure(_strip(template))}."
          " Restore it with the abstract state of that optimizer as target."
      ) from e

  return migrate(abstract, opt_state)
