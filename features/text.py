"""What an id or a name may hold: shared by the input schemas and the segment catalogues.

>>> shows_nothing("\\u200b \\ufeff"), shows_nothing("c\\u200b1")
(True, False)
>>> CONTROL.search("a\\u202eb") is not None, CONTROL.search("kund\\u00e9") is None
(True, True)
"""

from __future__ import annotations

import re

#: Control characters (C0, DEL, C1), the Unicode line and paragraph separators, and the
#: bidirectional embeddings, overrides and isolates: an id holding one breaks log lines and
#: line-based tools downstream, or shows its text in another order than it has (U+202E).
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
#: What shows nothing: Unicode's whitespace and the default-ignorable characters that
#: appear in text (zero-width space and joiners, the byte order mark, soft hyphen,
#: variation selectors, Hangul fillers). A text made only of these looks blank.
BLANK = ("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\xad\u034f\u061c\u115f\u1160"
         "\u1680\u17b4\u17b5\u180b\u180c\u180d\u180e\u180f"
         + "".join(map(chr, range(0x2000, 0x2010)))
         + "\u2028\u2029\u202f\u205f\u2060\u2061\u2062\u2063\u2064\u3000\u3164"
         + "".join(map(chr, range(0xFE00, 0xFE10))) + "\ufeff\uffa0")


def shows_nothing(text: str) -> bool:
    """Whether ``text`` is empty or made only of whitespace and invisible characters."""
    return not text.strip(BLANK)
