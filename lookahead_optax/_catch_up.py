"""`lazy(..., catch_up=True)`: bring an idle row to where the dense optimizer left it.

A row that `lazy` leaves idle for $\\Delta$ steps keeps its inner state and
its params; the dense optimizer, whose gradient rows are zero meanwhile,
would have run $\\Delta$ zero-gradient steps on them. Each masked table keeps
the step of each row's last update (`CatchUpState.last_step`); when a row is
touched again, before `inner` runs on it, this module applies those
$\\Delta$ steps in closed form:

* each parameter-shaped state leaf $s$ becomes $f^\\Delta s$, where $f$ is
  what one zero-gradient step of `inner` multiplies it by (Adam's $\\beta_1$
  and $\\beta_2$, a momentum's decay, RMSProp's decay, Lion's $\\beta_2$);
* the row's params become $d^\\Delta p$, where $d = 1 - \\eta_t \\lambda$ is
  what one zero-gradient step with a zero state multiplies the params by
  (decoupled weight decay, `optax.add_decayed_weights`; $d = 1$ without it);
* where the zero-gradient update is linear in a single state leaf (SGD with
  momentum: $u = c\\,s$), the params also get the geometric series of the
  idle updates, $c\\,s\\,(d^\\Delta - f^\\Delta) / (d - f)$.

$f$, $d$ and $c$ are read, in one place (`_factors`), by running one
zero-gradient step of `inner` on a two-row probe of each table at the
current step; `analyse` checks once per parameter structure (concretely, on
a four-row probe, over two steps) that the state of `inner` does scale that
way and rejects it otherwise, naming the state leaf that does not.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lookahead_optax import _checks
from lookahead_optax import _tree

# Rows of the probe: (param, state) = (1, 0), (0, 1), (-1.75, 0), (-1.75, 0.375).
_PROBE_PARAMS = (1.0, 0.0, -1.75, -1.75)
_PROBE_STATE = (0.0, 1.0, 0.0, 0.375)
_RTOL = 1e-5


class CatchUpState(NamedTuple):
  """What `lazy(..., catch_up=True)` keeps next to the inner state.

  Attributes:
    count: the number of updates so far (int32 scalar; int64 when
      `jax_enable_x64` is on at `init`).
    last_step: a tree with the params' structure: at each masked table a
      vector of one integer per row (dtype of `count`), the value of `count`
      after the row's last update (0: not updated since `init`);
      `optax.MaskedNode()` at the other leaves.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import lookahead_optax as lo
    >>> params = {"embed": jnp.zeros((4, 2)), "bias": jnp.zeros((2,))}
    >>> tx = lo.lazy(optax.adamw(1e-3), catch_up=True)
    >>> state = tx.init(params)
    >>> grads = {"embed": lo.SparseRows(jnp.array([2]), jnp.ones((1, 2))),
    ...          "bias": jnp.ones((2,))}
    >>> _, state = tx.update(grads, state, params)
    >>> print(state.catch_up.count, state.catch_up.last_step["embed"])
    1 [0 0 1 0]
    >>> state.catch_up.last_step["bias"]  # not a masked table
    MaskedNode()
  """

  count: jax.Array
  last_step: Any


def check_argument(catch_up: Any, freeze_state: bool) -> bool:
  """`catch_up` as a bool, checked against `freeze_state`."""
  if not isinstance(catch_up, (bool, np.bool_)):
    raise TypeError(f"`catch_up` must be a bool, got {catch_up!r}.")
  if catch_up and not freeze_state:
    raise ValueError(
        "`catch_up=True` needs `freeze_state=True`: with "
        "`freeze_state=False` the inner state of every row already takes "
        "every step, so there is nothing to catch up.")
  return bool(catch_up)


def _step_dtype() -> Any:
  return jax.dtypes.canonicalize_dtype(jnp.int64)


def init_state(params: Any, flags: list) -> CatchUpState:
  """Zero counts, and a zero last step for every row of each masked table."""
  dtype = _step_dtype()
  leaves, treedef = jax.tree.flatten(params, is_leaf=_tree.is_masked_node)
  return CatchUpState(
      count=jnp.zeros((), dtype),
      last_step=jax.tree.unflatten(treedef, [
          jnp.zeros((jnp.shape(p)[0],), dtype) if flag else
          optax.MaskedNode() for flag, p in zip(flags, leaves)]))


def _probe_rows(values: tuple, like: Any) -> jax.Array:
  """Rows holding `values`, each row the shape of one row of `like`."""
  dtype = jnp.result_type(like)
  col = jnp.asarray(values, dtype)
  shape = (len(values),) + tuple(jnp.shape(like)[1:])
  return jnp.broadcast_to(jnp.reshape(col, (-1,) + (1,) * (len(shape) - 1)),
                          shape)


def _probe(inner: Any, params: Any, state: Any, flags: list, rows: slice,
           extra_args: dict) -> tuple:
  """One zero-gradient step of `inner` on probe rows of the masked tables.

  The masked tables of `params` and their parameter-shaped state leaves are
  replaced by the probe rows `rows` of `_PROBE_PARAMS` / `_PROBE_STATE`;
  the other leaves keep their values (and get a zero gradient too).

  Returns:
    (probe params, probe state, updates, new state) of that step.
  """
  p_values, s_values = _PROBE_PARAMS[rows], _PROBE_STATE[rows]
  leaves, treedef = jax.tree.flatten(params, is_leaf=_tree.is_masked_node)
  probe_params = jax.tree.unflatten(treedef, [
      _probe_rows(p_values, p) if flag else p
      for flag, p in zip(flags, leaves)])
  probe_state = _tree.map_param_shaped(
      lambda _, x: _probe_rows(s_values, x),
      [True if flag else None for flag in flags], params, state)
  zeros = jax.tree.map(jnp.zeros_like, probe_params)
  extra = {k: v for k, v in extra_args.items() if k != "touched_rows"}
  updates, new_state = inner.update(zeros, probe_state, probe_params, **extra)
  return probe_params, probe_state, updates, new_state


def _state_leaves(flags: list, params: Any, state: Any, *others: Any
                  ) -> list:
  """Per params leaf, the (path-free) list of its parameter-shaped state
  leaves (with the matching leaves of `others`), in tree order."""
  found = [[] for _ in flags]

  def collect(i, x, *ys):
    found[i].append((x,) + ys)
    return x

  _tree.map_param_shaped(collect, [i if f else None
                                   for i, f in enumerate(flags)],
                         params, state, *others)
  return found


def _first(x: jax.Array, row: int) -> jax.Array:
  return jnp.reshape(x[row], (-1,))[0]


def describe(state: Any) -> str:
  """The inner optimizer, named by the types of its state's nodes."""
  names = []

  def visit(x):
    if isinstance(x, tuple) and hasattr(x, "_fields"):
      if type(x).__name__ not in names:
        names.append(type(x).__name__)
      for child in x:
        visit(child)
    elif isinstance(x, (tuple, list)):
      for child in x:
        visit(child)
    elif isinstance(x, dict):
      for child in x.values():
        visit(child)

  visit(state)
  return "`inner` (state " + (", ".join(names) or type(state).__name__) + ")"


def _reject(where: str, what: str, name: str = "`inner`") -> ValueError:
  return ValueError(
      f"`catch_up=True` cannot catch up {name} on the table {where}: {what}. "
      "Catching up needs an inner optimizer whose zero-gradient step scales "
      "each parameter-shaped state leaf by a constant factor and the params "
      "by a factor (decoupled weight decay), e.g. optax.adam, adamw, sgd "
      "with momentum, rmsprop, lion, radam and chains of them. Use "
      "`catch_up=False` for it (or put this table outside the mask).")


def _verify(paths: list, flags: list, probe: tuple, name: str) -> list:
  """Checks one probe step; per masked leaf (factors, decay, drift row)."""
  probe_params, probe_state, updates, new_state = probe
  state_rows = _state_leaves(flags, probe_params, probe_state, new_state)
  upd_leaves = jax.tree.leaves(updates, is_leaf=_tree.is_masked_node)
  out = []
  for i, flag in enumerate(flags):
    if not flag:
      out.append(None)
      continue
    where = paths[i]
    factors = []
    for _, new in state_rows[i]:
      new = np.asarray(new, np.float64)
      f = new[1].ravel()[0]
      ok = (np.isfinite(f) and np.all(new[1] == f) and np.all(new[0] == 0)
            and np.all(new[2] == 0)
            and np.allclose(new[3], 0.375 * f, rtol=_RTOL, atol=0))
      if not ok:
        raise _reject(where, (
            "a zero-gradient step does not multiply a parameter-shaped "
            "state leaf by one constant factor (it depends on the params, "
            "moves additively or differs between elements; e.g. weight "
            "decay applied before a momentum, or Adafactor)"), name)
      factors.append(f)
    u = np.asarray(upd_leaves[i], np.float64)
    decay = u[0].ravel()[0]
    if not (np.isfinite(decay) and np.all(u[0] == decay)
            and np.allclose(u[2], -1.75 * decay, rtol=_RTOL, atol=0)):
      raise _reject(where, (
          "with a zero gradient and a zero state its update is not a "
          "constant multiple of the params (decoupled weight decay)"), name)
    drift = u[1].ravel()[0]
    linear = (len(factors) == 1 and np.isfinite(drift)
              and np.all(u[1] == drift)
              and np.allclose(u[3], u[2] + 0.375 * drift, rtol=_RTOL,
                              atol=1e-30))
    out.append((tuple(factors), linear and drift != 0))
  return out


def _table_sized_leaves(inner: Any, params: Any, flags: list,
                        paths: list, name: str) -> None:
  """Rejects a state leaf that follows the table size but is not per row."""

  def shrink(flag, p):
    if _tree.is_masked_node(p):
      return p
    shape = tuple(jnp.shape(p))
    if flag:
      shape = (len(_PROBE_PARAMS),) + shape[1:]
    return jax.ShapeDtypeStruct(shape, jnp.result_type(p))

  leaves, treedef = jax.tree.flatten(params, is_leaf=_tree.is_masked_node)
  real = jax.eval_shape(inner.init, params)
  small = jax.eval_shape(inner.init, jax.tree.unflatten(
      treedef, [shrink(f, p) for f, p in zip(flags, leaves)]))
  real_leaves, real_def = jax.tree.flatten(real, is_leaf=_tree.is_masked_node)
  small_leaves, small_def = jax.tree.flatten(small,
                                             is_leaf=_tree.is_masked_node)
  shaped = {id(x) for rows in _state_leaves(flags, params, real)
            for (x,) in rows}
  bad = real_def != small_def or any(
      not _tree.is_masked_node(a) and id(a) not in shaped
      and jnp.shape(a) != jnp.shape(b)
      for a, b in zip(real_leaves, small_leaves))
  if bad:
    where = next((paths[i] for i, f in enumerate(flags) if f), "<root>")
    raise _reject(where, (
        "its state has leaves that depend on the table size but are not "
        "parameter-shaped (e.g. Adafactor's factored moments)"), name)


def _analyse(inner: Any, params: Any, flags: list) -> list:
  """Per params leaf: None, or whether the params' drift is added."""
  paths = [_tree.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(
      params, is_leaf=_tree.is_masked_node)[0]]
  with jax.ensure_compile_time_eval():
    leaves, treedef = jax.tree.flatten(params, is_leaf=_tree.is_masked_node)
    # The other leaves only need to be there: at most 2 along each axis.
    base = jax.tree.unflatten(treedef, [
        p if _tree.is_masked_node(p) else
        _probe_rows(_PROBE_PARAMS, p) if flag else
        jnp.zeros(tuple(min(n, 2) for n in jnp.shape(p)), jnp.result_type(p))
        for flag, p in zip(flags, leaves)])
    state = inner.init(base)
    name = describe(state)
    _table_sized_leaves(inner, params, flags, paths, name)
    try:
      probe = _probe(inner, base, state, flags, slice(None), {})
      first = _verify(paths, flags, probe, name)
      probe = _probe(inner, base, probe[3], flags, slice(None), {})
      second = _verify(paths, flags, probe, name)
    except ValueError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      where = next((paths[i] for i, f in enumerate(flags) if f), "<root>")
      raise _reject(where, f"a zero-gradient step on its rows fails ({e})",
                    name) from e
  out = []
  for i, (a, b) in enumerate(zip(first, second)):
    if a is None:
      out.append(None)
      continue
    if not np.allclose(a[0], b[0], rtol=_RTOL, atol=0):
      raise _reject(paths[i], (
          "the factor a zero-gradient step multiplies its state by changes "
          "from step to step (e.g. Adafactor's decay schedule)"), name)
    out.append(a[1] and b[1])
  return out


def _signature(params: Any, flags: list) -> tuple:
  leaves, treedef = jax.tree.flatten(params, is_leaf=_tree.is_masked_node)
  return (treedef, tuple(flags), tuple(
      None if _tree.is_masked_node(p) else
      (tuple(jnp.shape(p)[1:]), str(jnp.result_type(p))) for p in leaves))


def analyser(inner: Any):
  """`analyse(params, flags)` for `inner`, cached per parameter structure."""
  cache = {}

  def analyse(params, flags):
    key = _signature(params, flags)
    if key not in cache:
      cache[key] = _analyse(inner, params, flags)
    return cache[key]
  return analyse


def _gaps(count: jax.Array, last: jax.Array, touched: tuple,
          dtype: Any) -> tuple:
  """(idle steps of each row as floats, the new last steps) of one table.

  `touched` is `("rows", unique ids)` (rows gathered, fill id = table size)
  or `("mask", bool per row)` (whole table). Untouched rows get 0. Once
  `count` stops at its largest value the gaps are NaN, not wrong.
  """
  kind, value = touched
  step = optax.safe_increment(count)
  if kind == "rows":
    got = last.at[value].get(mode="fill", fill_value=0)
    gap = jnp.where(value < last.shape[0], count - got, 0)
    # Each row advances by its gap and this step (`got + advance == step`):
    # a scatter-add of what was read updates `last` in place, where a
    # scatter of `step`, which does not need the read, makes XLA:CPU copy
    # the table first (test_jit_donation_and_no_table_sized_temporary).
    new_last = last.at[value].add(gap + (step - count), mode="drop")
  else:
    gap = jnp.where(value, count - last, 0)
    new_last = jnp.where(value, step, last)
  saturated = count == jnp.iinfo(count.dtype).max
  gap = jnp.where(saturated, jnp.nan, gap.astype(dtype))
  return gap, new_last


def _rows(x: jax.Array, like: jax.Array) -> jax.Array:
  return jnp.reshape(x, x.shape + (1,) * (jnp.ndim(like) - 1))


def _series(d: jax.Array, d_gap: jax.Array, f: jax.Array,
            gap: jax.Array) -> jax.Array:
  """$\\sum_{k=1}^{\\Delta} d^{\\Delta-k} f^{k-1}$ (0 for $\\Delta = 0$).

  `d_gap` is $d^\\Delta$. The closed form $(d^\\Delta - f^\\Delta) / (d - f)$
  loses about $\\epsilon / |1 - f / d|$ relative when $f$ is close to $d$.
  """
  same = d == f
  safe = jnp.where(same, d + 1, d - f)
  ratio = (d_gap - jnp.power(f, gap)) / safe
  both = gap * jnp.power(d, jnp.maximum(gap - 1, 0))
  return jnp.where(gap == 0, 0, jnp.where(same, both, ratio))


def check_count(count: Any) -> None:
  """Raises when a concrete counter has reached its largest value."""
  if _checks.is_traced(count):
    return
  limit = np.iinfo(np.asarray(count).dtype).max
  if int(count) >= limit:
    raise ValueError(
        f"`lazy(..., catch_up=True)` has counted {int(count)} steps, the "
        f"largest {np.asarray(count).dtype} value: the idle steps of a row "
        "can no longer be counted. Enable `jax_enable_x64` before `init` "
        "for an int64 counter.")


def update(inner: Any, analyse: Any, grads: Any, inner_state: Any,
           params: Any, extra_args: dict, state: CatchUpState,
           touched: list) -> tuple:
  """Catches up the touched rows, then runs `inner` on them.

  Args:
    inner: the inner optimizer.
    analyse: from `analyser(inner)`.
    grads, inner_state, params: what `inner.update` gets (rows gathered at
      the `("rows", ids)` tables).
    extra_args: passed on to `inner.update`.
    state: the `CatchUpState`.
    touched: per params leaf None, `("rows", unique ids)` or
      `("mask", bool per row)`.

  Returns:
    (updates, new inner state, new `CatchUpState`): the updates include the
    move of the catch-up, `caught_up_params - params`.
  """
  if params is None:
    raise ValueError(
        "`catch_up=True` needs `params` in `update`: the rows it catches up "
        "are rows of the params.")
  if not isinstance(state, CatchUpState):
    raise ValueError(
        "`catch_up=True` needs a state from the `init` of the same `lazy(..., "
        f"catch_up=True)`, got a `LazyState` whose `catch_up` is {state!r}.")
  flags = [t is not None for t in touched]
  drift = analyse(params, flags)
  check_count(state.count)
  _, _, probe_updates, probe_new = _probe(
      inner, params, inner_state, flags, slice(0, 2), extra_args)
  last_leaves, last_def = jax.tree.flatten(state.last_step,
                                           is_leaf=_tree.is_masked_node)
  param_leaves, param_def = jax.tree.flatten(params,
                                             is_leaf=_tree.is_masked_node)
  gaps, new_last = [], []
  for t, last, p in zip(touched, last_leaves, param_leaves):
    if t is None:
      gaps.append(None)
      new_last.append(last)
      continue
    gap, last = _gaps(state.count, last, t, jnp.result_type(p))
    gaps.append(gap)
    new_last.append(last)

  def scale_state(i, x, probe_x):
    f = _first(probe_x, 1).astype(jnp.result_type(x))
    return x * _rows(jnp.power(f, gaps[i].astype(f.dtype)), x)

  caught_state = _tree.map_param_shaped(
      scale_state, [i if f else None for i, f in enumerate(flags)], params,
      inner_state, probe_new)
  olds = _state_leaves(flags, params, inner_state, probe_new)
  probe_upd = jax.tree.leaves(probe_updates, is_leaf=_tree.is_masked_node)
  caught_params = []
  for i, p in enumerate(param_leaves):
    if not flags[i]:
      caught_params.append(p)
      continue
    # d = 1 + u0; d**gap as exp(gap * log1p(u0)), not rounding d first.
    u0 = _first(probe_upd[i], 0)
    gap = gaps[i]
    d_gap = jnp.exp(gap * jnp.log1p(u0))
    new_p = p * _rows(d_gap, p)
    if drift[i]:
      s, probe_s = olds[i][0]
      f = _first(probe_s, 1).astype(u0.dtype)
      c = _first(probe_upd[i], 1)
      new_p = new_p + c * s * _rows(_series(1 + u0, d_gap, f, gap), p)
    caught_params.append(new_p.astype(jnp.result_type(p)))
  caught_tree = jax.tree.unflatten(param_def, caught_params)
  updates, new_inner = inner.update(grads, caught_state, caught_tree,
                                    **extra_args)
  upd_leaves, upd_def = jax.tree.flatten(updates,
                                         is_leaf=_tree.is_masked_node)
  upd_leaves = [
      u + (c - p).astype(jnp.result_type(u)) if flag else u
      for flag, u, c, p in zip(flags, upd_leaves, caught_params,
                               param_leaves)]
  new_state = CatchUpState(
      count=optax.safe_increment(state.count),
      last_step=jax.tree.unflatten(last_def, new_last))
  return (jax.tree.unflatten(upd_def, upd_leaves), new_inner, new_state)

