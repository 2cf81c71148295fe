"""What a compiled training step sends: its collectives, read from the HLO.

`communication_report` compiles the user's whole step (loss, gradient,
update) and reads every collective op (all-reduce, all-gather, all-to-all,
reduce-scatter, collective-permute, ...) from the optimized HLO, with the
bytes of its operands on one replica and the bytes one replica sends with
ring algorithms, and where it sits: in the entry computation (every step),
in a conditional (the steps that take that branch: `diloco`'s fragment
syncs) or in a loop body (once per iteration).

The HLO parsing helpers here (`parse_hlo`, `operand_bytes`, `ring_bytes`,
`bytes_by_conditional`) are also what `benchmarks/communication.py` uses.
"""

import re
from typing import Any, NamedTuple, Optional

import numpy as np

_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_CALLS = re.compile(
    r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)"
    r"=%?([\w.\-]+)")
_CALL_LISTS = re.compile(
    r"\b(?:branch_computations|called_computations|calls)=\{([^}]*)\}")
COLLECTIVE = re.compile(
    r"\s(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all|"
    r"collective-broadcast|ragged-all-to-all)(-start)?\(")
_TYPE = re.compile(r"\b(pred|[suf]\d+|bf16|f8e\w+)\[([\d,]*)\]")


def parse_hlo(text: str) -> tuple[dict, str]:
  """The computations of an HLO module: `({name: lines}, entry name)`."""
  computations, entry, name = {}, None, None
  for line in text.splitlines():
    match = _HEADER.match(line)
    if match and name is None:
      name = match.group(2)
      computations[name] = []
      if match.group(1):
        entry = name
    elif line.strip() == "}" and name is not None:
      name = None
    elif name is not None:
      computations[name].append(line)
  if entry is None:
    raise ValueError("no ENTRY computation in this HLO text.")
  return computations, entry


def callees(lines: list) -> set:
  """The computations that the instructions `lines` call."""
  out = set()
  for line in lines:
    out.update(_CALLS.findall(line))
    for names in _CALL_LISTS.findall(line):
      out.update(n.strip().lstrip("%") for n in names.split(",") if n.strip())
  return out


def reachable(computations: dict, start: str, skip: Any = ()) -> set:
  """The computations reachable from `start` (not entering `skip`)."""
  seen, todo = set(), [start]
  while todo:
    name = todo.pop()
    if name in seen or name in skip or name not in computations:
      continue
    seen.add(name)
    todo.extend(callees(computations[name]))
  return seen


def collectives(computations: dict, names: Any) -> list:
  """`(op, computation)` for each collective op in the computations `names`."""
  return [(m.group(1), name) for name in sorted(names)
          for line in computations[name] for m in COLLECTIVE.finditer(line)]


def _width(kind: str) -> int:
  """Bytes per element of an HLO element type (`f32`, `bf16`, `u8`, ...)."""
  if kind == "pred" or kind.startswith("f8"):
    return 1
  return int(kind.lstrip("bfsu")) // 8


def _type_bytes(text: str) -> int:
  """The bytes of the array types written in `text`."""
  return sum(_width(kind) * int(np.prod([int(d) for d in dims.split(",") if d]))
             for kind, dims in _TYPE.findall(text))


def _group_size(line: str) -> int:
  iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)
  if iota:
    return int(iota.group(2))
  groups = re.search(r"replica_groups=\{\{([^}]*)\}", line)
  return len(groups.group(1).split(",")) if groups else 1


def operand_bytes(line: str) -> int:
  """The operand bytes (one replica's) of one collective instruction."""
  op = COLLECTIVE.search(line).group(1)
  result = _type_bytes(line.split("=", 1)[1].split(op, 1)[0])
  if op == "all-gather":
    return result // _group_size(line)
  if op == "reduce-scatter":
    return result * _group_size(line)
  return result


def ring_bytes(line: str) -> float:
  """The bytes one replica sends for one collective with ring algorithms.

  With M replicas and operand bytes b: an all-reduce sends 2 (M - 1) / M b
  (a reduce-scatter, then an all-gather), an all-to-all and a
  reduce-scatter (M - 1) / M b, an all-gather (of a shard of b bytes)
  (M - 1) b, a collective-permute b.
  """
  op = COLLECTIVE.search(line).group(1)
  b, m = operand_bytes(line), _group_size(line)
  factor = {"all-reduce": 2 * (m - 1) / m, "all-to-all": (m - 1) / m,
            "reduce-scatter": (m - 1) / m, "all-gather": m - 1}
  return b * factor.get(op, 1.0)


def bytes_by_conditional(text: str, measure: Any = None
                         ) -> tuple[list, int]:
  """Collective bytes per conditional of the entry, and outside them.

  Returns `(per_conditional, outside)`: for each conditional instruction of
  the entry computation, the bytes of the collectives its branches reach
  (the larger branch), and the bytes of collectives reached otherwise.
  `measure` maps a collective's line to its bytes: `operand_bytes` (None,
  the default) or `ring_bytes`.
  """
  return _by_conditional(*parse_hlo(text),
                         operand_bytes if measure is None else measure)


def _by_conditional(computations: dict, entry: str, measure: Any
                    ) -> tuple[list, int]:
  """`bytes_by_conditional` of a parsed module."""

  def bytes_in(names):
    return sum(measure(line) for name in names
               for line in computations[name] if COLLECTIVE.search(line))

  per_cond, branches = [], set()
  for line in computations[entry]:
    if " conditional(" not in line:
      continue
    names = sorted(callees([line]))
    branches.update(names)
    per_cond.append(max(bytes_in(reachable(computations, n)) for n in names))
  outside = bytes_in(reachable(computations, entry, skip=branches))
  return per_cond, outside


class Collective(NamedTuple):
  """One collective op of a compiled step.

  Attributes:
    op: the HLO op, e.g. `"all-reduce"`, `"all-to-all"`.
    operand_bytes: the bytes of its operands on one replica.
    ring_bytes: the bytes one replica sends with ring algorithms.
    where: `"step"` (the entry computation: every step), `"conditional"`
      or `"loop"` (a loop body, once per iteration).
  """

  op: str
  operand_bytes: int
  ring_bytes: float
  where: str


class CommunicationReport(NamedTuple):
  """The collectives of a compiled step, and what they add up to.

  Attributes:
    collectives: every `Collective` of the step.
    every_step: the bytes (operands, one replica) of the collectives that
      run at every step: those outside any conditional and loop.
    per_conditional: for each conditional of the entry computation, the
      bytes of the collectives its larger branch reaches.
    largest_step: `every_step` plus the largest conditional's bytes (a
      step that takes one conditional, as `diloco` takes one fragment's).
    per_period: with `sync_period`, the bytes of `sync_period` steps when
      each conditional is taken once in them (`diloco`'s fragments): else
      None.
    seconds_largest_step: with `link_bytes_per_s`, the time the largest
      step's ring bytes need on that link; else None.
    hidden: with `link_bytes_per_s` and `step_seconds`, whether that time
      fits in the step's compute and every collective is outside any
      conditional (so a backend may schedule it alongside the compute);
      else None.
  """

  collectives: tuple
  every_step: int
  per_conditional: tuple
  largest_step: int
  per_period: Optional[int]
  seconds_largest_step: Optional[float]
  hidden: Optional[bool]

  def table(self) -> str:
    """The report as a Markdown table of the collectives and the totals."""
    rows = ["| collective | operand bytes | ring bytes | where |",
            "|---|---|---|---|"]
    rows += [f"| {c.op} | {c.operand_bytes:,} | {c.ring_bytes:,.0f} | "
             f"{c.where} |" for c in self.collectives]
    totals = [f"every step: {self.every_step:,} B",
              f"largest step: {self.largest_step:,} B"]
    if self.per_period is not None:
      totals.append(f"per sync period: {self.per_period:,} B")
    if self.seconds_largest_step is not None:
      totals.append(f"largest step on the link: "
                    f"{self.seconds_largest_step * 1e3:.3g} ms")
    if self.hidden is not None:
      totals.append("hidden behind the compute: "
                    + ("yes" if self.hidden else "no"))
    return "\n".join(rows) + "\n\n" + "; ".join(totals) + "."


def _places(computations: dict, entry: str) -> dict:
  """Each computation's place: "step", "conditional" or "loop"."""
  branches, bodies = set(), set()
  for lines in computations.values():
    for line in lines:
      if " conditional(" in line:
        branches.update(callees([line]))
      elif " while(" in line:
        bodies.update(callees([line]))
  place = {name: "step" for name in reachable(computations, entry,
                                              skip=branches | bodies)}
  for kind, starts in (("loop", bodies), ("conditional", branches)):
    for start in starts:
      for name in reachable(computations, start):
        place.setdefault(name, kind)
  return place


def _compiled_text(step: Any, args: tuple) -> str:
  lower = getattr(step, "lower", None)
  if not callable(lower):
    raise TypeError(
        "`step` must be a jitted function (`jax.jit(f)` or `jax.pmap(f)`): "
        "the report compiles it and reads its HLO; got "
        f"{type(step).__name__}.")
  return lower(*args).compile().as_text()


def report_of_text(text: str, sync_period: Optional[int] = None,
                   link_bytes_per_s: Optional[float] = None,
                   step_seconds: Optional[float] = None
                   ) -> CommunicationReport:
  """`communication_report` of an optimized HLO module's text."""
  computations, entry = parse_hlo(text)
  place = _places(computations, entry)
  found = tuple(
      Collective(COLLECTIVE.search(line).group(1), operand_bytes(line),
                 ring_bytes(line), place.get(name, "step"))
      for name in sorted(computations) for line in computations[name]
      if COLLECTIVE.search(line))
  per_cond, _ = _by_conditional(computations, entry, operand_bytes)
  every = sum(c.operand_bytes for c in found if c.where == "step")
  largest = every + max(per_cond, default=0)
  per_period = (None if sync_period is None
                else every * sync_period + sum(per_cond))
  seconds = hidden = None
  if link_bytes_per_s is not None:
    ring_cond, _ = _by_conditional(computations, entry, ring_bytes)
    ring_every = sum(c.ring_bytes for c in found if c.where == "step")
    seconds = (ring_every + max(ring_cond, default=0)) / link_bytes_per_s
    if step_seconds is not None:
      hidden = seconds <= step_seconds and not per_cond
  return CommunicationReport(found, every, tuple(per_cond), largest,
                             per_period, seconds, hidden)


def _check_positive(name: str, value: Any, integer: bool = False) -> None:
  kinds = (int, np.integer) if integer else (int, float, np.integer,
                                             np.floating)
  if value is None:
    return
  if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
    kind = "an integer" if integer else "a number"
    raise ValueError(f"`{name}` must be {kind} > 0 or None, got {value!r}.")


def communication_report(step: Any, *args: Any,
                         sync_period: Optional[int] = None,
                         link_bytes_per_s: Optional[float] = None,
                         step_seconds: Optional[float] = None
                         ) -> CommunicationReport:
  """What a training step sends over the replicas' links, from its HLO.

  Compiles `step(*args)` (nothing runs) and reads every collective of the
  optimized program: its operand bytes on one replica, the bytes a ring
  algorithm sends, and where it sits. Collectives in the entry computation
  run at every step; those in a conditional only on the steps that take
  it (`diloco` puts each fragment's sync in one, taken once per
  `sync_period` steps); those in a loop body once per iteration.

  Args:
    step: the jitted training step (`jax.jit(f)` or `jax.pmap(f)`).
    *args: its arguments (arrays, or `jax.ShapeDtypeStruct`s).
    sync_period: with it, `per_period` counts `sync_period` steps, each
      conditional taken once.
    link_bytes_per_s: a link's bandwidth, for the time the largest step's
      ring bytes need.
    step_seconds: the step's compute time, to say whether that time hides
      behind it.

  Returns:
    A `CommunicationReport`; its `table()` is Markdown.

  Raises:
    TypeError: if `step` is not a jitted function.
    ValueError: if `sync_period`, `link_bytes_per_s` or `step_seconds` is
      not positive.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import lookahead_optax as lo
    >>> mean = jax.pmap(lambda g: jax.lax.pmean(g, "data"), axis_name="data",
    ...                 devices=jax.devices()[:2])
    >>> report = lo.communication_report(mean, jnp.ones((2, 1000)))
    >>> print(report.every_step, report.collectives[0].op)
    4000 all-reduce
  """
  _check_positive("sync_period", sync_period, integer=True)
  _check_positive("link_bytes_per_s", link_bytes_per_s)
  _check_positive("step_seconds", step_seconds)
  return report_of_text(_compiled_text(step, args), sync_period,
                        link_bytes_per_s, step_seconds)
