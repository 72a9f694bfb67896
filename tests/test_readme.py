"""The README's Python example runs as written."""
from __future__ import annotations

import re
from pathlib import Path


def test_readme_python_example_runs(capsys):
  readme = (Path(__file__).parents[1] / "README.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
  assert len(blocks) == 1
  exec(compile(blocks[0], "README.md", "exec"), {})
  printed = capsys.readouterr().out
  assert "ndcg@10" in printed
