"""monoscope: sparse-autoencoder features of open language models, from activations to steering."""

from monoscope.errors import MonoscopeError

__version__ = "0.1.0"

__all__ = ["MonoscopeError", "__version__"]
