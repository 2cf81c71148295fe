"""Memory traffic of each sync formulation, from XLA's cost analysis.

For `lookahead(adam)` with each option (the default, `inner_state="reset"`,
`"pullback"`, `on_nonfinite="rollback"`, SNOO's outer step) and each
formulation (`sync="select"`, `"cond"`, `"loop"`), the bytes that XLA's cost
analysis of the compiled, donated step reports (`compiled.cost_analysis()`,
"bytes accessed", relative to plain adam's step) and its temporary buffers.
This is a static count of one compiled program (a loop body or a branch
counted once), not a timing: it is how `sync="auto"` is chosen where it was
not timed (accelerators). The compiled program here is the CPU backend's.

Run ``python -m benchmarks.traffic``.
"""

import jax
import optax

import lookahead_optax as lo
from benchmarks import common

OPTIONS = (
    ("keep", dict()),
    ("reset", dict(inner_state="reset")),
    ("pullback", dict(inner_state="pullback")),
    ("rollback", dict(on_nonfinite="rollback")),
    ("snoo", dict(outer="snoo")),
)
FORMULATIONS = ("select", "cond", "loop")


def _compiled(tx, params):
  state = tx.init(params)

  def step(p, s, g):
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s

  return jax.jit(step, donate_argnums=(0, 1)).lower(
      params, state, params).compile()


def _bytes(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost.get("bytes accessed", float("nan")))


def run(n: int = 1_000_000, layers: int = 8, log=print,
        layout: str = "tree") -> list:
  """Rows: option, formulation, bytes vs adam, temp bytes.

  `layout` "leaf" (one array, quick to compile: the tests) or "tree".
  """
  params = common.make_params(layout, n, seed=0, layers=layers)
  leaves = len(jax.tree.leaves(params))
  base = _bytes(_compiled(optax.adam(1e-3), params))
  rows = []
  for name, kwargs in OPTIONS:
    kwargs = dict(kwargs)
    if kwargs.get("outer") == "snoo":
      kwargs["outer"] = optax.sgd(0.68, momentum=0.37, nesterov=True)
    else:
      kwargs["slow_step_size"] = 0.5
    for sync in FORMULATIONS:
      compiled = _compiled(lo.lookahead(optax.adam(1e-3), 5, sync=sync,
                                        **kwargs), params)
      rows.append(dict(option=name, formulation=sync, leaves=leaves,
                       bytes_ratio=_bytes(compiled) / base,
                       temp=compiled.memory_analysis().temp_size_in_bytes))
    log(f"  traffic: {name}")
  return rows


def markdown(rows: list, n_text: str) -> str:
  """One row per option, one column per formulation ("bytes vs adam, temp")."""
  by = {(r["option"], r["formulation"]): r for r in rows}
  header = ["option"] + [f"`{f}`: bytes vs adam (temp MB)"
                         for f in FORMULATIONS] + ["auto picks (1 device)"]
  lines = []
  for name, _ in OPTIONS:
    cells = [name]
    for f in FORMULATIONS:
      r = by[(name, f)]
      cells.append(f"{r['bytes_ratio']:.2f}x ({common.fmt_mb(r['temp'])})")
    cells.append("select" if name == "keep" else "loop")
    lines.append(cells)
  leaves = rows[0]["leaves"]
  return (f"{n_text} float32 params in {leaves} "
          f"{'leaf' if leaves == 1 else 'leaves'}, donated step.\n\n"
          + common.markdown_table(header, lines))


if __name__ == "__main__":
  rows_ = run()
  print(markdown(rows_, "1.0M"))
