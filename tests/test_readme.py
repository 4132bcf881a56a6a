"""Every Python example in the README runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_examples() -> None:
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("code", EXAMPLES, ids=[f"example-{i}" for i in range(len(EXAMPLES))])
def test_readme_example_runs(code: str, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(code)
    out = subprocess.run(
        [sys.executable, "-W", "error", str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr


def test_the_first_example_has_a_main_guard() -> None:
    """Needed under spawn and forkserver (the default from Python 3.14 on)."""
    assert 'if __name__ == "__main__":' in EXAMPLES[0]


def test_the_first_example_runs_under_spawn(tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    prelude = "import multiprocessing\nmultiprocessing.set_start_method('spawn', force=True)\n"
    script.write_text(prelude + EXAMPLES[0])
    out = subprocess.run(
        [sys.executable, "-W", "error", str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
