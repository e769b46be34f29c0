"""The .po reader (Babel's parser): what GNU gettext writes, including plurals, contexts, continuations and fuzzy
flags; malformed lines are errors naming file and line."""

from __future__ import annotations

import pytest

from monoscope.corpus import CorpusError
from monoscope.corpus.po import parse_po

PO = r"""# Translation header comment
msgid ""
msgstr ""
"Content-Type: text/plain; charset=UTF-8\n"
"Plural-Forms: nplurals=2; plural=(n != 1);\n"

#: views.py:10
msgid "Hello"
msgstr "Hallo"

#, fuzzy
msgid "Maybe"
msgstr "Vielleicht"

msgctxt "month name"
msgid "May"
msgstr "Mai"

msgid "One file"
msgid_plural "%(n)s files"
msgstr[0] "Eine Datei"
msgstr[1] "%(n)s Dateien"
#: next entry without a blank line
msgid ""
"A long "
"message"
msgstr ""
"Eine lange\n"
"Nachricht mit \"Zitat\" und \\ und \t"

msgid "Untranslated"
msgstr ""

#~ msgid "Obsolete"
#~ msgstr "Veraltet"
"""


def test_parses_entries() -> None:
    entries = parse_po(PO)
    assert [e.msgid for e in entries] == [  # the header (empty msgid) is left out
        "Hello",
        "Maybe",
        "May",
        "One file",
        "A long message",
        "Untranslated",
    ]
    by_id = {e.msgid: e for e in entries}
    assert by_id["Hello"].translated == ["Hallo"] and not by_id["Hello"].fuzzy
    assert by_id["Maybe"].fuzzy
    assert by_id["May"].msgctxt == "month name"
    assert by_id["One file"].msgid_plural == "%(n)s files"
    assert by_id["One file"].translated == ["Eine Datei", "%(n)s Dateien"]
    assert by_id["A long message"].msgstr == ['Eine lange\nNachricht mit "Zitat" und \\ und \t']
    assert by_id["Untranslated"].translated == []


def test_malformed_line_names_file_and_line() -> None:
    with pytest.raises(CorpusError, match=r"^x\.po line 2: Unknown or misformatted keyword \('msgstrr \"b\"'\): fix"):
        parse_po('msgid "a"\nmsgstrr "b"\n', "x.po")
    with pytest.raises(CorpusError, match=r"^x\.po line 1: Got line starting with \" but not in msgid"):
        parse_po('"orphan"\n', "x.po")


def test_extra_plural_forms_are_dropped_quietly(capsys: pytest.CaptureFixture[str]) -> None:
    """Some of Django's catalogues hold more msgstr[N] than their Plural-Forms says (all empty there): Babel keeps
    `nplurals` forms and complains on stdout; here nothing is printed."""
    text = PO.replace('msgstr[1] "%(n)s Dateien"', 'msgstr[1] "%(n)s Dateien"\nmsgstr[2] "%(n)s Dateien (viele)"')
    by_id = {e.msgid: e for e in parse_po(text)}
    assert by_id["One file"].translated == ["Eine Datei", "%(n)s Dateien"]
    assert capsys.readouterr().out == ""
