"""Opaque list cursors. A cursor is the position after which the next page starts; clients
only pass it back, so its encoding can change without breaking them."""

from __future__ import annotations

import base64
import binascii

PREFIX = "v1:"


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"{PREFIX}{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int | None:
    """The position, or None for a string this API did not hand out."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    digits = text.removeprefix(PREFIX)
    if not text.startswith(PREFIX) or not (digits.isascii() and digits.isdigit()):
        return None
    seq = int(digits)
    return seq if 0 < seq < 2**63 else None
