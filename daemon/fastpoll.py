"""Cross-thread round trips that kafka-python 3's group poll makes and the daemon does not need.

kafka-python 3 runs its network on an I/O thread. Several steps of ``KafkaConsumer.poll``
hand a coroutine to that thread and block until it has run: a wake-up through a socket, a
switch to the I/O thread (which must get a core and the GIL) and back. On a loaded host each
costs from tens of microseconds to tens of milliseconds (traced under load: p50 1.6 ms, p99
22 ms per turn for the fetch hand-off), and it sits on every alert's path. Two of them do
no work the poll's caller needs to wait for:

- the group coordinator check, when the coordinator is known and connected;
- the next fetch request, when the poll already has records to return (the request only
  needs to be sent, not waited for) or when every partition's broker already has a fetch in
  flight (the request would send nothing).

Each patch applies to one consumer object, checks that the pinned kafka-python's private
names are there, and leaves the consumer unchanged otherwise. Everything else (waiting for
records, rebalances, offsets) stays kafka-python's own code.
"""

from __future__ import annotations


def skip_known_coordinator_round_trip(consumer) -> None:
    """When the coordinator is known and connected, answer kafka-python's per-poll "is the
    coordinator ready?" on the calling thread; otherwise (not yet found, disconnected, or a
    kafka-python without these attributes) ask the I/O thread as before."""
    coord = getattr(consumer, "_coordinator", None)
    client = getattr(coord, "_client", None)
    ensure = getattr(coord, "ensure_coordinator_ready", None)
    if ensure is None or not hasattr(coord, "coordinator_id") or not hasattr(client, "is_disconnected"):
        return

    def ensure_coordinator_ready(timeout_ms=None):
        node = coord.coordinator_id
        if node is not None and not client.is_disconnected(node):
            return True
        return ensure(timeout_ms=timeout_ms)

    coord.ensure_coordinator_ready = ensure_coordinator_ready


_FETCHER_NAMES = ("fetched_records", "send_fetches", "_send_fetches_async", "_fetch_futures",
                  "_nodes_with_pending_fetch_requests", "_fetchable_partitions", "_select_read_replica")


class FetchState:
    """What the patched fetcher did since its last drain of buffered records."""

    __slots__ = ("drained_records", "sent_after_drain")

    def __init__(self) -> None:
        self.drained_records = False
        self.sent_after_drain = False


def send_fetches_without_waiting(consumer) -> FetchState | None:
    """kafka-python's ``Fetcher.fetch_records`` (one per poll) drains the buffered records,
    then sends the next fetch requests through a blocking hand-off to the I/O thread. After
    the patch that hand-off is:

    - not waited for when the drain returned records: the poll returns them at once and
      looks at no fetch future, so the request is queued on the I/O thread and the poll goes;
    - skipped when every fetchable partition's broker has a fetch in flight and no completed
      fetch future is left to clean up: the I/O thread would send nothing and change nothing;
    - kafka-python's own blocking call otherwise (the poll is about to wait on the futures
      that call registers, or a metadata update is due).

    Returns the patched fetcher's :class:`FetchState` (``sent_after_drain``: the last poll
    queued the next request after taking its records), or None when the consumer is not the
    pinned kafka-python's and stays unpatched."""
    fetcher = getattr(consumer, "_fetcher", None)
    manager = getattr(fetcher, "_manager", None)
    if not hasattr(manager, "call_soon") or not all(hasattr(fetcher, n) for n in _FETCHER_NAMES):
        return None
    drain, blocking_send = fetcher.fetched_records, fetcher.send_fetches
    state = FetchState()

    def fetched_records(*args, **kwargs):
        records, partial = drain(*args, **kwargs)
        state.drained_records, state.sent_after_drain = bool(records), False
        return records, partial

    def send_fetches():
        state.sent_after_drain = True
        if state.drained_records:
            manager.call_soon(fetcher._send_fetches_async)
            return []
        if _all_fetches_in_flight(fetcher):
            return []
        return blocking_send()

    fetcher.fetched_records = fetched_records
    fetcher.send_fetches = send_fetches
    return state


def _all_fetches_in_flight(fetcher) -> bool:
    """Would ``_send_fetches_async`` do nothing? True when no completed fetch future waits to be
    cleaned and every fetchable partition's node already has a fetch request in flight (a
    partition without a leader maps to None, never in flight: the real call asks for metadata)."""
    if any(f.is_done for f in list(fetcher._fetch_futures)):
        return False
    pending = fetcher._nodes_with_pending_fetch_requests
    return all(fetcher._select_read_replica(tp) in pending for tp in fetcher._fetchable_partitions())
