"""Keep Python's cyclic garbage collector off the serving path.

A loaded process holds millions of long-lived objects (a tokenizer, a model's modules, a
gateway's imports). Every full collection walks all of them: 100-200 ms, every few seconds
under load, during which every stream of the process stalls at once (seen as the whole p99
inter-token latency of a gateway relaying 500 streams). Objects that exist once start-up is
done are moved out of the collector's view; what serving allocates is still collected.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)


def freeze_heap() -> None:
    """Collect once, then exclude every object alive now from later collections (call when
    start-up is done: the model and tokenizers loaded, the servers listening)."""
    gc.collect()
    gc.freeze()
    log.debug("froze %d start-up objects out of garbage collection", gc.get_freeze_count())
