"""Search an SAE's features: by text (`text.py`), by label or explanation (`labels.py`), by contrasting two
sets of texts or a concept pack (`contrast.py`, `packs.py`), by decoder neighbours, and across languages
(`multilingual.py`). `monoscope search` (`cli.py`) is the command over these."""

from monoscope.search.text import FeatureHit, Searcher, TextResult

__all__ = ["FeatureHit", "Searcher", "TextResult"]
