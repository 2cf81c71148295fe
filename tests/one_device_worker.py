"""What a single-device user gets: run with one CPU device (no XLA_FLAGS).

Started once by tests/test_formulations.py (a Python and JAX start is costly,
so one process does all the single-device work):

1. Building every option starts no JAX backend: a multi-host program builds
   its optimizer before `jax.distributed.initialize`, which must come first.
2. `sync="auto"` on one CPU device: which formulation it picks for each
   option (found by lowering: its program is the very one of the formulation
   it picks), and its run through the main trajectories (the defaults,
   reset, pullback, rollback with NaNs, SNOO, slow_dtype) against the
   explicit `sync="select"` one step at a time from the same state, to a few
   ulps, with each run's own bitwise promises.

Prints one JSON line: {"built": n, "processes": n, "devices": n,
"picked": {option: [formulation, ...]}, "steps": {option: n}}; a failed
check raises (non-zero exit, the traceback on stderr).
"""

import json
import pathlib
import socket
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import optax

import lookahead_optax as lo


def build_every_option():
  inner = optax.adam(1e-3)
  built = [
      lo.lookahead(inner),
      lo.lookahead(inner, 4, 0.3, inner_state="reset"),
      lo.lookahead(inner, 4, 0.3, inner_state="pullback"),
      lo.lookahead(inner, 4, on_nonfinite="rollback"),
      lo.lookahead(inner, 4, slow_dtype=jnp.float32),
      lo.lookahead(inner, 4, optax.linear_schedule(0.1, 0.9, 10)),
      lo.diloco(inner, 4, "data"),
      lo.lookahead(lo.lazy(inner), 4, rows_per_step={"embed": 8}),
      lo.snoo(inner), lo.snoo(inner, on_nonfinite="rollback"),
      lo.ranger(1e-3),
      lo.lazy(inner, mask={"embed": True}),
  ]
  for sync in ("select", "cond", "loop"):
    built.append(lo.lookahead(inner, 3, sync=sync, inner_state="reset"))
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=1,
                             process_id=0)
  params = {"w": jnp.ones(3)}
  built[1].update(params, built[1].init(params), params)
  return len(built)


def auto_against_select():
  from tests import test_formulations as f  # the same problems and checks
  from tests._helpers import jitted_step
  options = {"defaults": {}}
  options.update({name: f.CONFIGS[name] for name in (
      "reset", "pullback", "rollback", "snoo", "slow_dtype")})
  options["slow_dtype-reset"] = dict(f.CONFIGS["slow_dtype"],
                                     inner_state="reset")
  picked, steps = {}, {}
  for name, kwargs in options.items():
    params, grads = f.params_and_grads(kwargs)
    txs = {sync: f.make_tx(kwargs, sync)
           for sync in ("auto",) + f.SYNCS}
    state = txs["auto"].init(params)
    text = {sync: jitted_step(tx).lower(params, state, grads[0]).as_text()
            for sync, tx in txs.items()}
    picked[name] = [s for s in f.SYNCS if text[s] == text["auto"]]
    select = jitted_step(txs["select"])
    # Where auto's program is select's, it is compiled once (the steps below
    # then agree trivially: the same program from the same state).
    auto = select if "select" in picked[name] else jitted_step(txs["auto"])
    p, s = params, state
    for t, g in enumerate(grads):
      before = jax.device_get((p, s))
      want = jax.device_get(select(p, s, g))
      p, s = auto(p, s, g)
      got = jax.device_get((p, s))
      f.assert_step_within_ulps(got, want, before, 2,
                                f"{name} auto vs select step {t + 1}")
      f.check_own_invariants(kwargs, t, *got, f"{name} auto")
    steps[name] = len(grads)
  return picked, steps


if __name__ == "__main__":
  built = build_every_option()
  assert jax.device_count() == 1, jax.devices()
  picked, steps = auto_against_select()
  print(json.dumps(dict(built=built, processes=jax.process_count(),
                        devices=jax.device_count(), picked=picked,
                        steps=steps)))
