"""Prints the README's Quickstart commands, one a line, exactly as written.

Usage: python .ci/readme_commands.py [README.md]

The commands are the non-comment lines of the first ```bash block under the
"## Quickstart" heading. CI runs each of them, as written, in a fresh clone,
so the README and CI cannot drift apart. Fails loudly when the heading or the
block is missing, or the block does not hold exactly `EXPECTED` commands.
"""

import pathlib
import re
import sys

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
EXPECTED = 2  # set up + demo; set up + test suite


def quickstart_commands(text: str) -> list:
  """The shell commands of the Quickstart section's ```bash block."""
  section = re.search(r"^## Quickstart[ \t]*\n(.*?)(?=^## |\Z)", text,
                      flags=re.M | re.S)
  if section is None:
    raise SystemExit("readme_commands.py: no '## Quickstart' section in the "
                     "README")
  block = re.search(r"^```bash[ \t]*\n(.*?)^```[ \t]*$", section.group(1),
                    flags=re.M | re.S)
  if block is None:
    raise SystemExit("readme_commands.py: no ```bash block in the README's "
                     "Quickstart section")
  commands = [line.strip() for line in block.group(1).splitlines()
              if line.strip() and not line.lstrip().startswith("#")]
  for command in commands:
    if command.endswith("\\"):
      raise SystemExit("readme_commands.py: a Quickstart command continues "
                       f"on the next line (keep each on one line): {command}")
  if len(commands) != EXPECTED:
    raise SystemExit(
        f"readme_commands.py: the Quickstart block has {len(commands)} "
        f"commands, expected {EXPECTED}: {commands}")
  return commands


if __name__ == "__main__":
  path = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else README
  print("\n".join(quickstart_commands(path.read_text())))
