"""The skip marks of tests that need monoscope's C kernels (`monoscope.native`)."""

from __future__ import annotations

import os
import shutil

import pytest

_NO_CC = ("no C compiler (cc or $CC) on this machine, so the C kernels cannot be built here and the PyTorch fallback "
          "runs instead (apt-get install gcc to test the kernels too)")
_OFF = ("MONOSCOPE_NATIVE=0 in the environment turns the C kernels off, so the PyTorch path runs instead: unset it to "
        "test the kernels")
_has_cc = shutil.which(os.environ.get("CC") or "cc") is not None
_on = os.environ.get("MONOSCOPE_NATIVE", "").strip() != "0"

needs_cc = pytest.mark.skipif(not _has_cc, reason=_NO_CC)
"""For tests that build the kernels (and may turn them off themselves)."""
needs_native = pytest.mark.skipif(not (_has_cc and _on), reason=_NO_CC if not _has_cc else _OFF)
"""For tests of what only the kernels do."""
