"""Interoperability with the two common SAE toolkits: SAELens and EleutherAI's sparsify.

    sae = load_any("path/to/sae")                     # monoscope, SAELens or sparsify folder, detected
    convert("runs/x/sae", to="saelens", out="export/x")  # -> Path; also "sparsify" and "monoscope"

Every conversion keeps the raw-scale behaviour: the peer's own encode on raw activations gives the
same feature activations as monoscope's `encode_raw`, and the same reconstructions. What a format
cannot represent faithfully (a ReLU SAE for sparsify, a per-token layer norm from SAELens, ...) is
an `InteropError` (a `MonoscopeError`) naming the field and why; nothing falls back silently.
Neither peer package is imported: the formats are read and written directly.
"""

from monoscope.interop.common import InteropError, RawSAE
from monoscope.interop.convert import FORMATS, convert, convert_sae, detect_format, load_any
from monoscope.interop.saelens import read_saelens, write_saelens
from monoscope.interop.sparsify import read_sparsify, write_sparsify

__all__ = [
    "FORMATS",
    "InteropError",
    "RawSAE",
    "convert",
    "convert_sae",
    "detect_format",
    "load_any",
    "read_saelens",
    "read_sparsify",
    "write_saelens",
    "write_sparsify",
]
