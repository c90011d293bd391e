"""Reading JSON that anyone with access to Redis or the queue may have written."""

from __future__ import annotations

import json
from typing import Any


def loads(text: str | bytes) -> Any:
    """``json.loads`` whose every failure is a ValueError, input nested past the parser's depth included: ``json``
    raises RecursionError there, which a ValueError handler misses (one ``'[' * 100000`` in the queue stopped the
    worker)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
