"""Text that people type into the server (holiday names, departments) and that later reaches
screens and the audit log: what may not be in it."""

from __future__ import annotations

import unicodedata
from typing import Final

UNPRINTABLE_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
"""Control, formatting (bidirectional overrides), surrogate and line-breaking characters."""


def has_unprintable(text: str) -> bool:
    """Whether `text` holds a character that could rewrite a terminal or disguise a record."""
    return any(unicodedata.category(c) in UNPRINTABLE_CATEGORIES for c in text)
