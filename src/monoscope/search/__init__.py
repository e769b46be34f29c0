"""Search an SAE's features: by text (`text.py`), by label or explanation (`labels.py`), by contrasting two
sets of texts or a concept pack (`contrast.py`, `packs.py`), by decoder neighbours, across languages
(`multilingual.py`) and by attribution to a target token (`attribution.py`). `monoscope search` (`cli.py`)
is the command over these.

    from monoscope.search import Searcher, contrast, search_labels, load_pack, contrast_pack, multilingual_search
    s = Searcher.open("runs/default/sae")
    s.search_text("import numpy as np").hits
    contrast_pack(s, load_pack("sycophancy")).hits
"""

from monoscope.search.attribution import AttributionHit, AttributionResult, search_attribution
from monoscope.search.contrast import ContrastResult, contrast, neighbours
from monoscope.search.labels import search_labels
from monoscope.search.multilingual import MultilingualResult, multilingual_search, parallel_concepts
from monoscope.search.packs import Pack, contrast_pack, list_packs, load_pack
from monoscope.search.text import FeatureHit, Searcher, SearchError, TextResult

__all__ = ["AttributionHit", "AttributionResult",
           "ContrastResult", "FeatureHit", "MultilingualResult", "Pack", "SearchError", "Searcher", "TextResult",
           "contrast", "contrast_pack", "list_packs", "load_pack", "multilingual_search", "neighbours",
           "parallel_concepts", "search_attribution", "search_labels"]
