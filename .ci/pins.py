"""Prints the declared minimum versions of pyproject.toml as `==` pins.

Usage: python .ci/pins.py [EXTRA ...]

One requirement a line: `project.dependencies` and the named extras, each
`name>=X` turned into `name==X`, so the CI's minimum-versions step installs
exactly the floors that pyproject.toml claims. Every requirement must be a
plain `name>=X` (optionally `name[extra]>=X`); anything else (no floor, an
upper bound, a marker) fails loudly, as does one package with two different
floors in two places.
"""

import pathlib
import re
import sys
import tomllib

PYPROJECT = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"
_FLOOR = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?P<extras>\[[A-Za-z0-9_,.-]+\])?"
    r"\s*>=\s*(?P<version>[0-9][A-Za-z0-9.]*)$")


def _normalize(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def pins(extras=(), pyproject=PYPROJECT) -> list:
  """The `name==floor` pins of the dependencies and the given extras."""
  with open(pyproject, "rb") as f:
    project = tomllib.load(f)["project"]
  optional = project.get("optional-dependencies", {})
  requirements = [("dependencies", r) for r in project["dependencies"]]
  for extra in extras:
    if extra not in optional:
      raise SystemExit(f"pins.py: no extra {extra!r} in {pyproject} "
                       f"(has {sorted(optional)})")
    requirements += [(f"extra {extra!r}", r) for r in optional[extra]]
  floors, out = {}, []
  for where, requirement in requirements:
    match = _FLOOR.match(requirement.strip())
    if match is None:
      raise SystemExit(
          f"pins.py: {where}: {requirement!r} is not of the form 'name>=X'; "
          "every requirement needs a tested floor (CI installs it)")
    key = _normalize(match["name"])
    if key in floors:
      if floors[key] != match["version"]:
        raise SystemExit(
            f"pins.py: {match['name']} has two floors, {floors[key]} and "
            f"{match['version']}; declare one")
      continue
    floors[key] = match["version"]
    out.append(f"{match['name']}{match['extras'] or ''}=={match['version']}")
  return out


if __name__ == "__main__":
  print("\n".join(pins(sys.argv[1:])))
