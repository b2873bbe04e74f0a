"""Stop strings over streamed text: cut at the first match, hold back a possible start of one.

Text that might turn out to begin a stop string is not emitted until the next tokens settle
it, so a client never sees part of a stop string that then disappears.
"""

from __future__ import annotations

from collections.abc import Sequence


def split_at_stop(pending: str, stops: Sequence[str]) -> tuple[str, str, bool]:
    """pending: text not yet emitted -> (emit now, hold back, stopped).

    When a stop string occurs, everything before its earliest occurrence is emitted and the
    rest dropped. Otherwise the longest suffix that is a proper prefix of a stop string is held.
    """
    earliest = -1
    for stop in stops:
        i = pending.find(stop)
        if i != -1 and (earliest == -1 or i < earliest):
            earliest = i
    if earliest != -1:
        return pending[:earliest], "", True
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(pending)), hold, -1):
            if pending.endswith(stop[:k]):
                hold = k
                break
    return pending[: len(pending) - hold], pending[len(pending) - hold:], False
