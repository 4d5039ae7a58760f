"""The WebRTC framing and reassembly without any I/O (overlay.transport.chunks)."""

from __future__ import annotations

import secrets

import pytest

from overlay.transport.chunks import (
    CHUNK_HEADER,
    CHUNK_SIZE,
    FRAME_LEN,
    MIN_RATE,
    Assembly,
    ChunkError,
    ChunkFlag,
    ChunkHeader,
    begin_transfer,
    chunk_count,
    control_chunk,
    control_reason,
    iter_chunks,
    max_transfer_len,
    transfer_cap,
)
from overlay.wire import Limits

LIMITS = Limits(max_total_bytes=1_000_000, max_header_bytes=4096, max_arrays=8)


def split(message: bytes) -> tuple[ChunkHeader, memoryview]:
    return ChunkHeader.unpack(message), memoryview(message)[CHUNK_HEADER.size :]


def frames_of(sizes: list[int]) -> list[bytes]:
    return [secrets.token_bytes(n) for n in sizes]


def assemble(messages: list[bytes]) -> Assembly:
    head, data = split(messages[0])
    assembly = begin_transfer(head, LIMITS, now=0.0)
    done = assembly.add(head, data, now=0.0)
    for message in messages[1:]:
        assert not done
        done = assembly.add(*split(message), now=1.0)
    assert done and assembly.complete
    return assembly


@pytest.mark.parametrize("sizes", [[10], [0, 0], [CHUNK_SIZE - 16], [CHUNK_SIZE, 1],
                                   [3 * CHUNK_SIZE + 5, 7, 0, 70_000]])
def test_round_trip_and_the_buffer_is_preallocated(sizes: list[int]) -> None:
    frames = frames_of(sizes)
    messages = list(iter_chunks(7, frames, ChunkFlag.REPLY))
    total = FRAME_LEN * len(frames) + sum(sizes)
    assert len(messages) == chunk_count(total)
    assert all(len(m) == CHUNK_HEADER.size + CHUNK_SIZE for m in messages[:-1])
    head, _ = split(messages[0])
    assert (head.transfer_id, head.frame_count, head.total_len, head.is_reply) == (
        7, len(frames), total, True)
    assembly = begin_transfer(head, LIMITS, now=0.0)
    assert len(assembly.buf) == total  # the whole transfer, before any data is in
    buffer = assembly.buf
    for message in messages:
        assembly.add(*split(message), now=0.0)
    assert assembly.buf is buffer  # written in place, never grown or copied
    assert [bytes(f) for f in assembly.frames()] == frames


def test_out_of_order_duplicate_and_wrong_size_chunks_are_refused() -> None:
    messages = list(iter_chunks(1, frames_of([3 * CHUNK_SIZE])))
    head, data = split(messages[0])
    assembly = begin_transfer(head, LIMITS, now=0.0)
    assembly.add(head, data, now=0.0)
    with pytest.raises(ChunkError, match="out of sequence") as exc:
        assembly.add(*split(messages[0]), now=0.0)  # a duplicate
    assert exc.value.reason == "bad_chunk"
    with pytest.raises(ChunkError, match="out of sequence"):
        assembly.add(*split(messages[2]), now=0.0)  # one skipped
    head1, data1 = split(messages[1])
    with pytest.raises(ChunkError, match="want"):
        assembly.add(head1, data1[:-1], now=0.0)  # short
    other = ChunkHeader(1, 0, 1, 1, head.count, head.frame_count, head.total_len + 1)
    with pytest.raises(ChunkError, match="out of sequence"):
        assembly.add(other, data1, now=0.0)  # another transfer's shape
    assert assembly.add(head1, data1, now=0.0) is False  # the right one still fits


@pytest.mark.parametrize(("head", "reason"), [
    (ChunkHeader(1, 0, 1, 2, 5, 1, 5 * CHUNK_SIZE), "bad_chunk"),  # starts midway
    (ChunkHeader(1, 0, 1, 0, 2**24, 1, 2**40), "too_large"),  # claims a terabyte
    (ChunkHeader(1, 0, 1, 0, 1, 12, 200), "too_many_parts"),
    (ChunkHeader(1, 0, 1, 0, 1, 0, 0), "too_many_parts"),  # no frame at all
    (ChunkHeader(1, 0, 1, 0, 7, 1, 100), "bad_chunk"),  # count does not fit the size
    (ChunkHeader(1, 0, 1, 0, 1, 4, 16), "bad_chunk"),  # smaller than its frame table
])
def test_a_first_chunk_is_refused_before_anything_is_allocated(head: ChunkHeader,
                                                               reason: str) -> None:
    with pytest.raises(ChunkError) as exc:
        begin_transfer(head, LIMITS, now=0.0)
    assert exc.value.reason == reason


def test_the_largest_transfer_the_limits_allow_is_accepted() -> None:
    total = max_transfer_len(LIMITS)
    head = ChunkHeader(1, 0, 9, 0, chunk_count(total), 1, total)
    assert len(begin_transfer(head, LIMITS, now=0.0).buf) == total
    bigger = ChunkHeader(1, 0, 9, 0, chunk_count(total + 1), 1, total + 1)
    with pytest.raises(ChunkError, match="too_large"):
        begin_transfer(bigger, LIMITS, now=0.0)


def test_frame_lengths_that_do_not_add_up_are_refused() -> None:
    messages = list(iter_chunks(3, frames_of([100, 50])))
    head, data = split(messages[0])
    forged = bytearray(data)
    forged[:FRAME_LEN] = (120).to_bytes(FRAME_LEN, "big")
    assembly = begin_transfer(head, LIMITS, now=0.0)
    assert assembly.add(head, memoryview(bytes(forged)), now=0.0)
    with pytest.raises(ChunkError) as exc:
        assembly.frames()
    assert exc.value.reason == "bad_frames"


def test_garbage_headers_and_control_chunks() -> None:
    with pytest.raises(ChunkError, match="shorter"):
        ChunkHeader.unpack(b"xx")
    with pytest.raises(ChunkError, match="version"):
        ChunkHeader.unpack(b"\x09" + bytes(CHUNK_HEADER.size - 1))
    with pytest.raises(ChunkError, match="flags"):
        ChunkHeader.unpack(ChunkHeader(1, 0x40, 0, 0, 1, 1, 8).pack())
    reject = control_chunk(ChunkFlag.REJECT, 5, "too_large")
    head = ChunkHeader.unpack(reject)
    assert head.flags == ChunkFlag.REJECT and head.transfer_id == 5
    assert control_reason(reject) == "too_large"


def test_deadlines_follow_progress_and_grow_with_the_size() -> None:
    assembly = assemble(list(iter_chunks(1, frames_of([10]))))
    assert assembly.started == 0.0 and assembly.last == 0.0
    assert assembly.deadline(chunk_idle_timeout=3, min_rate=1000) == 3
    assert assembly.overdue(2.9, 3, 1000) is None
    idle = assembly.overdue(3.0, 3, 1000)
    assert idle is not None and idle.reason == "chunk_timeout"
    # a transfer that keeps moving is kept until it falls below min_rate on average
    cap = transfer_cap(assembly.total_len, 3, 1000)
    assert cap == 12 + assembly.total_len / 1000
    assembly.last = cap - 1
    assert assembly.overdue(cap - 0.5, 3, 1000) is None
    late = assembly.overdue(cap, 3, 1000)
    assert late is not None and late.reason == "too_slow"
    # the bound grows with the size: 45 MB at the default rate get most of an hour
    assert transfer_cap(45_000_000, 15) > 45_000_000 / MIN_RATE
    assembly.free()
    assert len(assembly.buf) == 0
