"""The feature page's fast paths give what the general ones give: contexts decoded per window (batched, from
the vocabulary's whole-token texts) and the token shading (a class per level, every text escaped)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from monoscope.features.tokens import Vocab
from monoscope.serve import views
from monoscope.serve.site import Site


def test_batched_contexts_equal_the_general_path(tiny_run: Path) -> None:
    site = Site(tiny_run)
    e = site.default
    fast_windows = windows = 0
    for fid in range(e.n_features):
        rec = e.db().packed_examples(fid)
        if rec is None:
            continue
        slow = [views.context(e, r["tokens"][: r["ntok"]].astype(np.int64), r["acts"][: r["nact"]],
                              int(r["position"]), float(r["act"]), 3.0) for r in rec]
        assert views._contexts(e, rec, 3.0) == slow
        windows += len(rec)
        fast_windows += sum(None not in [e.shown_tokens[i] for i in r["tokens"][: r["ntok"]]] for r in rec)
    assert windows > 500 and fast_windows > windows // 2  # most windows take the lookup path


def test_vocab_decode_fast_path_matches_joint_decoding() -> None:
    # "é" split over two tokens (0xC3, 0xA9): the joint decoder joins them; whole tokens take the lookup
    v = Vocab(["a", "Ã", "©", " b"], [b"a", b"\xc3", b"\xa9", b" b"])
    assert v.decode([0, 3]) == ["a", " b"]
    assert v.decode([0, 1, 2, 3]) == ["a", "", "é", " b"]  # the character on the token that completes it
    assert v.decode([0, -1]) == ["a", "<-1>"]
    assert v.whole == ["a", None, None, " b"]


def test_context_html_shades_and_escapes() -> None:
    c = {"act": 4.0, "position": 1, "tokens": ['<b x="1">', " & ", "z"], "acts": [0.0, 4.0, 0.39]}
    out = str(views.context_html(c, 4.0))
    assert out == ('<div class="ctx"><span class="act">4</span><span class="toks"><span class="tok">&lt;b x=&quot;1'
                   '&quot;&gt;</span><span class="tok s10 peak" title="4.0"> &amp; </span><span class="tok s1" '
                   'title="0.39">z</span></span></div>')
    # no scale (a feature without max_act): the window's own maximum
    assert 'class="tok s5"' in str(views.context_html({**c, "acts": [0.0, 4.0, 2.0]}, 0.0))


@pytest.mark.parametrize("a,level", [(0.01, 1), (1.0, 1), (1.01, 2), (9.99, 10), (10.0, 10), (25.0, 10)])
def test_shade_levels(a: float, level: int) -> None:
    c = {"act": a, "position": 0, "tokens": ["x"], "acts": [a]}
    assert f'class="tok s{level} peak"' in str(views.context_html(c, 10.0))
