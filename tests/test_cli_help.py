"""What the commands say about themselves: ./dev's help is its header comment."""

from __future__ import annotations

import itertools
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_dev_help_is_the_scripts_header_comment_and_nothing_else() -> None:
    after_shebang = (ROOT / "dev").read_text().splitlines()[1:]
    header = [line[1:].removeprefix(" ") for line in itertools.takewhile(lambda x: x.startswith("#"), after_shebang)]
    assert len(header) >= 5
    result = subprocess.run([str(ROOT / "dev"), "help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == header
    assert "set -euo pipefail" not in result.stdout
    unknown = subprocess.run([str(ROOT / "dev"), "no-such-command"], capture_output=True, text=True, timeout=30)
    assert unknown.returncode == 2
    assert unknown.stdout.splitlines() == header
