"""daemon.fastpoll: kafka-python's poll without its needless waits on the I/O thread, on the real broker."""

from __future__ import annotations

import threading
import time

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from daemon.fastpoll import send_fetches_without_waiting
from tests.daemon_support import create_topic, unique


def _consumer(bootstrap: str, topic: str, patched: bool):
    """A group-less consumer of partition 0 with small fetches (many fetch rounds), and a
    count of the fetch requests sent through kafka-python's blocking hand-off."""
    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                      fetch_max_wait_ms=100, max_partition_fetch_bytes=2048)
    state = send_fetches_without_waiting(c) if patched else None
    fetcher = c._fetcher
    run, blocking = fetcher._manager.run, []

    def counting_run(coro, *args):
        if coro == fetcher._send_fetches_async:
            blocking.append(coro)
        return run(coro, *args)

    fetcher._manager.run = counting_run
    c.assign([TopicPartition(topic, 0)])
    c.seek_to_beginning()
    return c, state, blocking


def _read(c, n: int) -> tuple[list[bytes], int]:
    got, polls, deadline = [], 0, time.monotonic() + 60
    while len(got) < n:
        assert time.monotonic() < deadline, f"read {len(got)} of {n} records"
        for records in c.poll(timeout_ms=1000, max_records=37).values():
            got += [r.value for r in records]
        polls += 1
    return got, polls


def test_patched_consumer_reads_every_record_once_in_order_without_blocking_sends(kafka_broker):
    topic = unique("fastpoll")
    create_topic(kafka_broker.bootstrap, topic, 1)
    p = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap)
    sent = [f"{i:05d}".encode() * 8 for i in range(3000)]  # 40 bytes: ~40 records per fetch
    for v in sent:
        p.send(topic, value=v, partition=0)
    p.flush()
    p.close()
    reads = {}
    for patched in (False, True):
        c, state, blocking = _consumer(kafka_broker.bootstrap, topic, patched)
        try:
            got, polls = _read(c, len(sent))
        finally:
            c.close()
        assert got == sent  # all, once, in order
        reads[patched] = (len(blocking), polls, state)
    plain_blocking, plain_polls, _ = reads[False]
    fast_blocking, fast_polls, state = reads[True]
    assert state is not None
    # kafka-python blocks on a send each time its buffer runs dry (dozens of fetch rounds
    # here); patched, only the first fetch (nothing in flight, nothing to return) blocks.
    assert plain_blocking >= 20, reads
    assert fast_blocking <= 2, reads


def test_patched_poll_still_waits_for_and_returns_a_record_produced_during_it(kafka_broker):
    topic = unique("fastpoll-wait")
    create_topic(kafka_broker.bootstrap, topic, 1)
    c, state, _ = _consumer(kafka_broker.bootstrap, topic, True)
    p = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap)
    try:
        assert c.poll(timeout_ms=300) == {}  # empty topic: fetches in flight, nothing read
        late = threading.Timer(0.5, lambda: p.send(topic, value=b"late", partition=0).get(timeout=10))
        late.start()
        t0 = time.monotonic()
        got = []
        while not got and time.monotonic() - t0 < 20:
            got = [r.value for rs in c.poll(timeout_ms=20_000).values() for r in rs]
        late.join()
        assert got == [b"late"]
        # The poll returned because the record came, not because its 20 s ran out.
        assert time.monotonic() - t0 < 10
        assert state.drained_records
    finally:
        p.close()
        c.close()


def test_a_consumer_without_the_pinned_internals_is_left_alone():
    class Other:
        pass

    other = Other()
    assert send_fetches_without_waiting(other) is None
    assert vars(other) == {}
