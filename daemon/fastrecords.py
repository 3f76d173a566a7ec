"""Record parsing for the daemon's consumer without kafka-python's per-record Python calls.

kafka-python parses every record of a fetch in pure Python: per record a ``DefaultRecord``
object, seven ``decode_varint`` calls, property reads, two deserializer calls and a header
size sum, then the ``ConsumerRecord``. That was three quarters of the daemon's loop on a
backlog (profiled), and the same share of the raw reader it is compared with. For an
uncompressed record batch of message format v2 (what producers send unless they compress)
:class:`FastPartitionRecords` reads the records in one loop with the varints inlined and
builds the same ``ConsumerRecord`` tuples: 6.6-7.3 -> 2.5-2.6 us per record of a
5000-record batch (``PartitionRecords.take``, measured here). Every other batch
(compressed, older formats) and a consumer with deserializers take kafka-python's own code;
the batch-level work (CRC check, transactions, control batches, positions) is kafka-python's
generator, copied from the pinned 3.0.12 with only the record loop replaced.

:func:`parse_records_fast` installs it on one consumer after checking that the pinned
kafka-python's names are there; otherwise the consumer stays as it is.
"""

from __future__ import annotations

import kafka
from kafka.consumer.fetcher import ConsumerRecord, Fetcher
from kafka.errors import CorruptRecordError
from kafka.protocol.consumer import IsolationLevel
from kafka.record.default_records import DefaultRecordBatch
from kafka.record.util import decode_varint

__all__ = ["FastPartitionRecords", "parse_records_fast", "batch_records", "WRITTEN_FOR"]

#: The kafka-python version whose record generator :class:`FastPartitionRecords` copies.
WRITTEN_FOR = "3.0.12"

_BATCH_NAMES = ("_buffer", "_pos", "_num_records", "base_offset", "first_timestamp", "max_timestamp",
                "timestamp_type", "compression_type", "magic", "leader_epoch", "validate_crc")


def parse_records_fast(consumer) -> bool:
    """Make ``consumer``'s fetcher parse plain v2 batches with :func:`batch_records`; False
    (and the consumer unchanged) when it is not the kafka-python this module was written for
    (:data:`WRITTEN_FOR`: the generator below is a copy of that version's)."""
    fetcher = getattr(consumer, "_fetcher", None)
    base = getattr(fetcher, "PartitionRecords", None)
    if kafka.__version__ != WRITTEN_FOR or base is not Fetcher.PartitionRecords \
            or not hasattr(base, "_unpack_records") or not all(hasattr(DefaultRecordBatch, n) for n in _BATCH_NAMES):
        return False
    if fetcher.config.get("key_deserializer") or fetcher.config.get("value_deserializer"):
        return False  # the daemon reads bytes; a deserializer keeps kafka-python's loop
    fetcher.PartitionRecords = FastPartitionRecords
    return True


def batch_records(tp, batch, leader_epoch: int) -> tuple[list, list]:
    """The ``ConsumerRecord`` s of an uncompressed v2 ``batch`` (not a control batch) as
    kafka-python builds them without deserializers, and the bytes it counts as read for each.

    Mirrors ``DefaultRecordBatch._read_msg``: a varint of one byte (and the lengths and
    deltas of two) is decoded inline, longer ones by kafka-python's ``decode_varint``; a
    record whose fields do not add up to its length, a negative header count or key size,
    and bytes left after the last record raise
    ``CorruptRecordError`` as kafka-python does (before any record of the batch is returned;
    kafka-python returns those before the bad one first)."""
    buf, pos = batch._buffer, batch._pos
    base, topic, partition = batch.base_offset, tp.topic, tp.partition
    ts_type = batch.timestamp_type
    append_time = batch.max_timestamp if ts_type == DefaultRecordBatch.LOG_APPEND_TIME else None
    first_ts = batch.first_timestamp
    out, sizes = [], []
    add, size = out.append, sizes.append
    # The varint decode is written out for each field on purpose: a Python call per field is
    # the cost this loop exists to remove (kafka-python makes seven per record).
    for _ in range(batch._num_records):
        v = buf[pos]
        if not v & 0x80:
            length, pos = (v >> 1) ^ -(v & 1), pos + 1
        elif not buf[pos + 1] & 0x80:  # two bytes: deltas within a batch, records of 64-8191 bytes
            v = (v & 0x7f) | (buf[pos + 1] << 7)
            length, pos = (v >> 1) ^ -(v & 1), pos + 2
        else:
            length, pos = decode_varint(buf, pos)
        start = pos
        if buf[pos] & 0x80:  # attributes: unused
            _, pos = decode_varint(buf, pos)
        else:
            pos += 1
        v = buf[pos]
        if not v & 0x80:
            ts_delta, pos = (v >> 1) ^ -(v & 1), pos + 1
        elif not buf[pos + 1] & 0x80:  # two bytes: deltas within a batch, records of 64-8191 bytes
            v = (v & 0x7f) | (buf[pos + 1] << 7)
            ts_delta, pos = (v >> 1) ^ -(v & 1), pos + 2
        else:
            ts_delta, pos = decode_varint(buf, pos)
        v = buf[pos]
        if not v & 0x80:
            offset_delta, pos = (v >> 1) ^ -(v & 1), pos + 1
        elif not buf[pos + 1] & 0x80:  # two bytes: deltas within a batch, records of 64-8191 bytes
            v = (v & 0x7f) | (buf[pos + 1] << 7)
            offset_delta, pos = (v >> 1) ^ -(v & 1), pos + 2
        else:
            offset_delta, pos = decode_varint(buf, pos)
        v = buf[pos]
        if v & 0x80:
            key_len, pos = decode_varint(buf, pos)
        else:
            key_len, pos = (v >> 1) ^ -(v & 1), pos + 1
        if key_len >= 0:
            key = bytes(buf[pos:pos + key_len])
            pos += key_len
        else:
            key = None
        v = buf[pos]
        if not v & 0x80:
            value_len, pos = (v >> 1) ^ -(v & 1), pos + 1
        elif not buf[pos + 1] & 0x80:  # two bytes: deltas within a batch, records of 64-8191 bytes
            v = (v & 0x7f) | (buf[pos + 1] << 7)
            value_len, pos = (v >> 1) ^ -(v & 1), pos + 2
        else:
            value_len, pos = decode_varint(buf, pos)
        if value_len >= 0:
            value = bytes(buf[pos:pos + value_len])
            pos += value_len
        else:
            value = None
        if buf[pos] == 0:  # no headers (zigzag 0), the common case
            pos += 1
            headers: list = []
            header_size = -1
        else:
            headers, pos = _headers(buf, pos)
            header_size = sum(len(k.encode("utf-8")) + (len(v) if v is not None else 0) for k, v in headers) \
                if headers else -1
        if pos - start != length:
            raise CorruptRecordError(f"Invalid record size: expected to read {length} bytes in record "
                                     f"payload, but instead read {pos - start}")
        size(length)
        add(ConsumerRecord(topic, partition, leader_epoch, base + offset_delta,
                           first_ts + ts_delta if append_time is None else append_time, ts_type,
                           key, value, headers, None, key_len if key is not None else -1,
                           value_len if value is not None else -1, header_size))
    if pos != len(buf):
        raise CorruptRecordError(f"{len(buf) - pos} unconsumed bytes after all records consumed")
    return out, sizes


def _headers(buf, pos: int) -> tuple[list, int]:
    count, pos = decode_varint(buf, pos)
    if count < 0:
        raise CorruptRecordError(f"Found invalid number of record headers {count}")
    headers = []
    for _ in range(count):
        key_len, pos = decode_varint(buf, pos)
        if key_len < 0:
            raise CorruptRecordError(f"Invalid negative header key size {key_len}")
        key = buf[pos:pos + key_len].decode("utf-8")
        pos += key_len
        value_len, pos = decode_varint(buf, pos)
        if value_len >= 0:
            value = bytes(buf[pos:pos + value_len])
            pos += value_len
        else:
            value = None
        headers.append((key, value))
    return headers, pos


class FastPartitionRecords(Fetcher.PartitionRecords):
    """kafka-python's ``PartitionRecords`` whose plain v2 batches go through
    :func:`batch_records` (see the module docstring)."""

    def _unpack_records(self, tp, records, key_deserializer, value_deserializer):
        # kafka-python 3.0.12's generator; only the record loop of a plain v2 batch differs.
        try:
            batch = records.next_batch()
            last_batch = None
            while batch is not None:
                last_batch = batch
                if self.check_crcs and not batch.validate_crc():
                    raise CorruptRecordError(
                        "Record batch for partition %s at offset %s failed crc check" % (
                            self.topic_partition, batch.base_offset))
                if batch.magic == 2:
                    self.leader_epoch = batch.leader_epoch
                    if self.isolation_level == IsolationLevel.READ_COMMITTED and batch.has_producer_id():
                        self._consume_aborted_transactions_up_to(batch.last_offset)
                        producer_id = batch.producer_id
                        if self._contains_abort_marker(batch):
                            self.aborted_producer_ids.discard(producer_id)
                        elif self._is_batch_aborted(batch):
                            self.next_fetch_offset = batch.next_offset
                            batch = records.next_batch()
                            continue
                    if batch.is_control_batch:
                        self.next_fetch_offset = batch.next_offset
                        batch = records.next_batch()
                        continue
                if batch.magic == 2 and batch.compression_type == DefaultRecordBatch.CODEC_NONE:
                    batch._maybe_uncompress()  # marks it read, as iterating it would
                    for record, nbytes in zip(*batch_records(tp, batch, self.leader_epoch)):
                        self.records_read += 1
                        self.bytes_read += nbytes
                        self.next_fetch_offset = record.offset + 1
                        yield record
                else:
                    yield from self._records_of(tp, batch, key_deserializer, value_deserializer)
                batch = records.next_batch()
            else:
                if last_batch and last_batch.magic == 2:
                    self.next_fetch_offset = last_batch.next_offset
                self.drain()
        except StopIteration:  # as kafka-python: a generator must not leak it
            raise RuntimeError("StopIteration raised unpacking messageset") from None

    def _records_of(self, tp, batch, key_deserializer, value_deserializer):
        """kafka-python's record loop, for every other batch."""
        for record in batch:
            if self.check_crcs and not record.validate_crc():
                raise CorruptRecordError("Record for partition %s at offset %s failed crc check" % (
                    self.topic_partition, record.offset))
            key_size = len(record.key) if record.key is not None else -1
            value_size = len(record.value) if record.value is not None else -1
            key = self._deserialize(key_deserializer, tp.topic, record.headers, record.key)
            value = self._deserialize(value_deserializer, tp.topic, record.headers, record.value)
            headers = record.headers
            header_size = sum(len(h_key.encode("utf-8")) + (len(h_val) if h_val is not None else 0)
                              for h_key, h_val in headers) if headers else -1
            self.records_read += 1
            self.bytes_read += record.size_in_bytes
            self.next_fetch_offset = record.offset + 1
            yield ConsumerRecord(tp.topic, tp.partition, self.leader_epoch, record.offset, record.timestamp,
                                 record.timestamp_type, key, value, record.headers, record.checksum,
                                 key_size, value_size, header_size)
