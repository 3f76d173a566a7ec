"""The daemon's record parsing (daemon.fastrecords) against kafka-python's own, record for
record, on batches built by kafka-python's writer, and on the real broker."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka.consumer.fetcher import Fetcher
from kafka.errors import CorruptRecordError
from kafka.record.default_records import DefaultRecordBatchBuilder
from kafka.record.memory_records import MemoryRecords
from kafka.structs import TopicPartition

from daemon.fastrecords import FastPartitionRecords, parse_records_fast

TP = TopicPartition("in", 3)

_RECORD = st.fixed_dictionaries({
    "ts_step": st.integers(-3000, 10**9),  # deltas of one and of many varint bytes, negative too
    "offset_gap": st.sampled_from([1, 1, 1, 2, 70, 20000]),  # compacted logs leave gaps
    "key": st.one_of(st.none(), st.binary(max_size=200)),
    "value": st.one_of(st.none(), st.binary(max_size=300)),
    "headers": st.lists(st.tuples(st.text(max_size=8), st.one_of(st.none(), st.binary(max_size=20))), max_size=3),
})


def _batch_bytes(records, base_offset=0, compression=0, log_append_time=False) -> bytes:
    b = DefaultRecordBatchBuilder(magic=2, compression_type=compression, is_transactional=0, producer_id=-1,
                                  producer_epoch=-1, base_sequence=-1, batch_size=1 << 30)
    ts, delta = 1_767_225_600_000, 0
    for r in records:
        ts += r["ts_step"]
        b.append(delta, timestamp=ts, key=r["key"], value=r["value"], headers=r["headers"])
        delta += r["offset_gap"]
    data = bytearray(b.build())
    data[0:8] = base_offset.to_bytes(8, "big")
    if log_append_time:  # the broker stamps append time: attributes bit 3, CRC over attributes on
        from kafka.record.util import calc_crc32c

        data[22] |= 0x08
        data[17:21] = calc_crc32c(memoryview(data)[21:]).to_bytes(4, "big")
    return bytes(data)


def _read(cls, data: bytes, fetch_offset: int = 0):
    """Every record a PartitionRecords of ``cls`` returns, then its counters after the drain."""
    pr = cls(fetch_offset, TP, MemoryRecords(data))
    out = []
    while pr:  # until the generator drains it (several takes: it is resumed between them)
        out += pr.take(7)
    return out, (pr.records_read, pr.bytes_read, pr.next_fetch_offset, pr.leader_epoch, bool(pr))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(_RECORD, min_size=1, max_size=12), min_size=1, max_size=3), st.integers(0, 30),
       st.booleans())
def test_records_equal_kafka_pythons(batches, skip, log_append_time):
    """Several batches back to back, a fetch offset inside the first, create or append time:
    the same ConsumerRecords (offsets, timestamps, keys, values, headers, sizes) and the same
    position and counters as kafka-python's parser."""
    data, base = b"", 5
    for records in batches:
        data += _batch_bytes(records, base, log_append_time=log_append_time)
        base += sum(r["offset_gap"] for r in records) + 1
    fetch_offset = 5 + skip
    want = _read(Fetcher.PartitionRecords, data, fetch_offset)
    got = _read(FastPartitionRecords, data, fetch_offset)
    assert got == want


def test_compressed_batches_take_kafka_pythons_loop():
    records = [{"ts_step": 5, "offset_gap": 1, "key": b"k%d" % i, "value": b"v" * i, "headers": []}
               for i in range(20)]
    data = _batch_bytes(records, 10, compression=1) + _batch_bytes(records, 40)  # gzip, then plain
    got, want = _read(FastPartitionRecords, data), _read(Fetcher.PartitionRecords, data)
    assert got == want and len(got[0]) == 40


def test_a_record_that_does_not_add_up_is_corrupt():
    records = [{"ts_step": 1, "offset_gap": 1, "key": b"k", "value": b"value", "headers": []}] * 3
    data = bytearray(_batch_bytes(records))
    data[61] += 2  # the first record's length varint (after the 61-byte batch header): one byte too long (zigzag)
    pr = FastPartitionRecords(0, TP, MemoryRecords(bytes(data)), check_crcs=False)
    with pytest.raises(CorruptRecordError, match="Invalid record size"):
        pr.take(10)


def test_installed_on_the_daemons_consumer_and_only_without_deserializers(monkeypatch):
    from kafka import KafkaConsumer
    from kafka.serializer import Deserializer

    class Text(Deserializer):
        def deserialize(self, topic, headers, data):
            return data.decode()

    plain = KafkaConsumer(bootstrap_servers="127.0.0.1:9", api_version=(2, 5))
    decoding = KafkaConsumer(bootstrap_servers="127.0.0.1:9", api_version=(2, 5), value_deserializer=Text())
    try:
        assert parse_records_fast(plain) and plain._fetcher.PartitionRecords is FastPartitionRecords
        assert not parse_records_fast(decoding) and decoding._fetcher.PartitionRecords is Fetcher.PartitionRecords
        assert not parse_records_fast(object())
        other = KafkaConsumer(bootstrap_servers="127.0.0.1:9", api_version=(2, 5))
        try:  # another kafka-python: its own parser (the copied generator may not match it)
            monkeypatch.setattr("kafka.__version__", "3.0.13")
            assert not parse_records_fast(other) and other._fetcher.PartitionRecords is Fetcher.PartitionRecords
        finally:
            other.close()
    finally:
        plain.close()
        decoding.close()


def _kafka_python_read(bootstrap: str, topic: str, n: int, fast: bool) -> list:
    from kafka import KafkaConsumer
    from kafka import TopicPartition as KTP

    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                      max_partition_fetch_bytes=2048)  # small fetches: many responses, partial batches
    try:
        if fast:
            assert parse_records_fast(c)
        parts = [KTP(topic, p) for p in sorted(c.partitions_for_topic(topic))]
        c.assign(parts)
        c.seek_to_beginning(*parts)
        out = []
        while len(out) < n:
            for recs in c.poll(timeout_ms=2000).values():
                out += [(r.partition, r.offset, r.timestamp, r.key, r.value, r.headers, r.serialized_key_size,
                         r.serialized_value_size, r.serialized_header_size) for r in recs]
        return sorted(out)
    finally:
        c.close()


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_records_from_the_broker_equal_kafka_pythons_and_librdkafkas(kafka_broker, compression):
    """Records produced by librdkafka (keys, null keys and values, headers; plain or gzip
    batches) read back through the real broker: the fast parser returns what kafka-python's
    does, and what librdkafka reads."""
    from confluent_kafka import Producer

    from tests.daemon_support import create_topic, read_topic, unique

    topic = unique("records")
    create_topic(kafka_broker.bootstrap, topic, 2)
    p = Producer({"bootstrap.servers": kafka_broker.bootstrap, "linger.ms": 20,
                  "compression.type": compression or "none"})
    n = 300
    for i in range(n):
        headers = [("h", b"%d" % i), ("empty", None)] if i % 7 == 0 else None
        p.produce(topic, key=None if i % 5 == 0 else b"k%d" % (i % 13), value=None if i % 11 == 0 else b"v" * (i % 150),
                  partition=i % 2, headers=headers)
    assert p.flush(20) == 0
    fast = _kafka_python_read(kafka_broker.bootstrap, topic, n, fast=True)
    assert fast == _kafka_python_read(kafka_broker.bootstrap, topic, n, fast=False)
    want = sorted((part, off, key, value, headers) for key, value, headers, part, off in
                  read_topic(kafka_broker.bootstrap, topic, expect=n))
    assert [(r[0], r[1], r[3], r[4], dict(r[5])) for r in fast] == want


def test_the_changelog_reader_of_the_kafka_python_client_parses_fast(kafka_broker, tmp_path):
    from daemon.config import load_config
    from daemon.loop import Daemon

    cfg = load_config(env={}, validate=False, overrides=dict(
        bootstrap=kafka_broker.bootstrap, input="in", alerts="alerts", group="g", state_dir=str(tmp_path),
        producer_client="kafka-python", state_store="changelog"))
    consumer = Daemon(cfg)._plain_consumer()
    try:
        assert consumer._fetcher.PartitionRecords is FastPartitionRecords
    finally:
        consumer.close()
