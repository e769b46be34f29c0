"""The skip mark of tests that need monoscope's C kernels built (`monoscope.native`)."""

from __future__ import annotations

import os
import shutil

import pytest

needs_cc = pytest.mark.skipif(
    shutil.which(os.environ.get("CC") or "cc") is None,
    reason="no C compiler (cc or $CC) on this machine, so the C kernels cannot be built here and the PyTorch "
           "fallback runs instead (apt-get install gcc to test the kernels too)")
