"""What results files record about where they were measured."""
import re
import subprocess
from pathlib import Path

import pytest

from zo_runtime import sysinfo

ROOT = Path(__file__).resolve().parent.parent


def test_source_commit_names_this_checkout():
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    got = sysinfo.source_commit()
    assert re.fullmatch(re.escape(head) + r"(-dirty)?", got), (got, head)


def test_peak_rss_is_positive_here():
    assert sysinfo.peak_rss_mb() > 0
