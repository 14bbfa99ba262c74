"""RE2 patterns for the names of a zone whose label below the apex lies in a range.

The router matches the lower-cased query name in presentation format, with
the trailing dot, escaped as dnspython writes it (``wire.name_to_text``): a
special character (``"().;\\@$``) as a backslash and the character, an octet
outside 0x21-0x7e as a backslash and three decimal digits, any other octet
as itself. A shard answers for the names whose label directly below the
apex lies in a range of labels in DNSSEC canonical order (RFC 4034, 6.1:
lower-cased octet strings compared as unsigned bytes, a prefix first); the
pattern written here matches a name's presentation exactly when that label
lies in the range, whatever its octets, and matches no name outside the zone.

How: the label's text is a sequence of tokens, one per octet, and the first
octet where a label differs from a bound decides; so the pattern for
``label >= low`` is "low's first token, then the rest >= low's rest; or a
greater first octet, then anything", and likewise for ``< high``. Only the
octets of the two bounds are spelled out: the patterns stay short.
"""
from __future__ import annotations

import dns.name

_SPECIAL = b'"().;\\@$'  # dnspython's escaped characters (dns.name._escaped)
_UPPER = range(0x41, 0x5B)  # never in a lower-cased name
_REST = r"(?:[^.\\]|\\.)*"  # the rest of a label, whatever its octets (the router's escapes keep "\." whole)
_LABEL = r"(?:[^.\\]|\\.)+"


def _plain(octet: int) -> bool:
    return 0x20 < octet < 0x7F and octet not in _SPECIAL


def _class_char(octet: int) -> str:
    char = chr(octet)
    return char if char.isalnum() else "\\" + char  # RE2 takes a backslash before any punctuation


def _char_class(octets: list[int]) -> str:
    if len(octets) == 1:
        return _class_char(octets[0])
    runs: list[str] = []
    start = prev = octets[0]
    for octet in octets[1:] + [-1]:
        if octet == prev + 1:
            prev = octet
            continue
        runs.append(_class_char(start) if start == prev else
                    _class_char(start) + ("" if prev == start + 1 else "-") + _class_char(prev))
        start = prev = octet
    return "[" + "".join(runs) + "]"


def _digits(low: int, high: int, width: int) -> str:
    """A pattern for the zero-padded decimal numbers low..high of ``width`` digits."""
    if width == 1:
        return str(low) if low == high else f"[{low}-{high}]"
    step = 10 ** (width - 1)
    top_low, top_high = divmod(low, step), divmod(high, step)
    if top_low[0] == top_high[0]:
        return f"{top_low[0]}{_digits(top_low[1], top_high[1], width - 1)}"
    parts = []
    first, last = top_low[0], top_high[0]
    if top_low[1]:  # a partial first decade
        parts.append(f"{first}{_digits(top_low[1], step - 1, width - 1)}")
        first += 1
    if top_high[1] != step - 1:  # a partial last one
        tail = f"{last}{_digits(0, top_high[1], width - 1)}"
        last -= 1
    else:
        tail = ""
    if first <= last:
        parts.append(f"{_digits(first, last, 1)}[0-9]{{{width - 1}}}" if width > 2 else
                     f"{_digits(first, last, 1)}[0-9]")
    if tail:
        parts.append(tail)
    return parts[0] if len(parts) == 1 else "(?:" + "|".join(parts) + ")"


def _runs(values: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for value in values:
        if runs and runs[-1][1] == value - 1:
            runs[-1] = (runs[-1][0], value)
        else:
            runs.append((value, value))
    return runs


def octets(low: int, high: int) -> str | None:
    """A pattern for the presentation of one octet in low..high (inclusive);
    None when no lower-cased octet is in the range."""
    values = [o for o in range(max(low, 0), min(high, 255) + 1) if o not in _UPPER]
    if not values:
        return None
    parts = []
    plain = [o for o in values if _plain(o)]
    if plain:
        parts.append(_char_class(plain))
    special = [o for o in values if o in _SPECIAL]
    if special:
        parts.append(r"\\" + _char_class(special))
    decimal = [o for o in values if not _plain(o) and o not in _SPECIAL]
    for start, end in _runs(decimal):
        parts.append(r"\\" + _digits(start, end, 3))
    return parts[0] if len(parts) == 1 else "(?:" + "|".join(parts) + ")"


def _one(octet: int) -> str:
    pattern = octets(octet, octet)
    if pattern is None:
        raise ValueError(f"a bound with an upper-case octet ({octet:#04x}): bounds are lower-cased labels")
    return pattern


def _either(*parts: str | None) -> str | None:
    kept = [p for p in parts if p is not None]
    if not kept:
        return None
    return kept[0] if len(kept) == 1 else "(?:" + "|".join(kept) + ")"


def _then(first: str | None, rest: str | None) -> str | None:
    return None if first is None or rest is None else first + rest


def _at_least(low: bytes) -> str:
    """The rest of a label (maybe empty) that is >= ``low``."""
    if not low:
        return _REST
    return _either(_then(_one(low[0]), _at_least(low[1:])),
                   _then(octets(low[0] + 1, 255), _REST)) or ""


def _below(high: bytes) -> str | None:
    """The rest of a label (maybe empty) that is < ``high``; None for nothing."""
    if not high:
        return None
    return _either("", _then(octets(0, high[0] - 1), _REST), _then(_one(high[0]), _below(high[1:])))


def _between(low: bytes, high: bytes | None) -> str | None:
    """The rest of a label that is >= ``low`` and < ``high`` (None: no upper bound)."""
    if high is None:
        return _at_least(low)
    if not low:
        return _below(high)
    if low[0] == high[0]:
        return _then(_one(low[0]), _between(low[1:], high[1:]))
    return _either(_then(_one(low[0]), _at_least(low[1:])),
                   _then(octets(low[0] + 1, high[0] - 1), _REST),
                   _then(_one(high[0]), _below(high[1:])))


def _escape(text: str) -> str:
    return "".join(c if c.isalnum() else "\\" + c for c in text)


def pattern(origin: dns.name.Name, low: bytes | None, high: bytes | None, apex: bool) -> str:
    """The names below ``origin`` whose first label under it is in [low, high)
    (None: unbounded), and ``origin`` itself when ``apex``."""
    if low is not None and high is not None and not low < high:
        raise ValueError(f"an empty range: {low!r} .. {high!r}")
    # The smallest label is one octet 0: a label is never empty.
    labels = _between(low or b"\x00", high)
    origin_text = origin.to_text().lower()
    suffix = "" if origin == dns.name.root else _escape(origin_text)
    names = None if labels is None else f"(?:{_LABEL}\\.)*{labels}\\.{suffix}"
    if not apex:
        return f"^{names}$" if names else ""
    if origin == dns.name.root:
        return f"^(?:\\.|{names})$" if names else r"^\.$"
    return f"^(?:(?:{_LABEL}\\.)*{labels}\\.)?{suffix}$" if labels is not None else f"^{suffix}$"
