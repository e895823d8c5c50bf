"""Property: whatever descriptor tables a guest writes, the data plane completes (or stops
the queue) without writing anywhere but the guest's own writable buffers and the used ring,
and never outside the mapped arena (the arena is fenced by PROT_NONE pages)."""

from __future__ import annotations

import random
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from csi_vduse._native import lib
from tests.unit.fakeguest import DESC, INDIRECT, IOVA_BASE, NEXT, WRITE, Device, FakeGuest

NUM = 8
TABLES = 2
TABLE_LEN = 6
DATA_LEN = 16384

flags = st.sampled_from([0, NEXT, WRITE, NEXT | WRITE, INDIRECT, INDIRECT | NEXT, INDIRECT | WRITE])
lengths = st.one_of(
    st.just(0), st.integers(1, 64), st.integers(1, DATA_LEN), st.integers(0, 2**32 - 1)
)


@st.composite
def scenario(draw: st.DrawFn) -> dict[str, object]:
    guest = FakeGuest(num=NUM, pages=16)
    tables = [guest.arena.alloc(16 * TABLE_LEN) for _ in range(TABLES)]
    data = guest.arena.alloc(DATA_LEN, 4096)
    addrs = st.one_of(
        st.integers(0, 2**64 - 1),
        st.integers(data - 64, data + DATA_LEN + 64),
        st.sampled_from(tables),
    )
    desc = st.tuples(addrs, lengths, flags, st.integers(0, NUM + 2))
    main = draw(st.lists(desc, min_size=NUM, max_size=NUM))
    indirect = [draw(st.lists(desc, min_size=TABLE_LEN, max_size=TABLE_LEN)) for _ in tables]
    heads = draw(st.lists(st.integers(0, NUM), min_size=1, max_size=NUM))
    seed = draw(st.integers(0, 2**32 - 1))
    return {"guest": guest, "tables": tables, "data": data, "main": main,
            "indirect": indirect, "heads": heads, "seed": seed}  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario())
def test_random_descriptor_tables_stay_in_bounds(s: dict[str, object]) -> None:
    guest: FakeGuest = s["guest"]  # type: ignore[assignment]
    data: int = s["data"]  # type: ignore[assignment]
    main: list[tuple[int, int, int, int]] = s["main"]  # type: ignore[assignment]
    indirect: list[list[tuple[int, int, int, int]]] = s["indirect"]  # type: ignore[assignment]
    tables: list[int] = s["tables"]  # type: ignore[assignment]
    heads: list[int] = s["heads"]  # type: ignore[assignment]
    rng = random.Random(s["seed"])  # type: ignore[arg-type]

    # Plausible request headers sprinkled through the data zone, random bytes elsewhere.
    zone = bytearray(rng.randbytes(DATA_LEN))
    for off in range(0, DATA_LEN, 512):
        kind = rng.choice([0, 1, 4, 8, 11, 13, 77])
        struct.pack_into("<IIQ", zone, off, kind, 0, rng.choice([0, 1, 7, 2047, 2**40]))
    guest.arena.write(data, bytes(zone))
    for i, d in enumerate(main):
        guest.set_desc(i, *d)
    for table, entries in zip(tables, indirect, strict=True):
        for k, d in enumerate(entries):
            guest.arena.write(table + 16 * k, DESC.pack(*d))
    for h in heads:
        guest.publish(h)

    dev = Device(guest, size=1 << 20)
    before = guest.arena.snapshot()
    result = dev.process()
    after = guest.arena.snapshot()

    used = guest.reap()
    assert [u[0] for u in used] == heads[: len(used)]
    if result >= 0:
        assert len(used) == len(heads)
    elif dev.broken == lib.DP_BROKEN_RING:
        assert heads[len(used)] >= NUM
    else:
        assert dev.broken == lib.DP_BROKEN_NO_STATUS
        assert dev.q.vq.broken_head == heads[len(used)]

    allowed = set(range(guest.used - IOVA_BASE, guest.used - IOVA_BASE + 6 + 8 * NUM))
    for addr, length, fl, _ in main + [d for t in indirect for d in t]:
        if fl & WRITE and not fl & INDIRECT:
            lo = max(addr - IOVA_BASE, 0)
            hi = min(addr - IOVA_BASE + length, guest.arena.size)
            allowed.update(range(lo, hi))
    changed = [i for i in range(len(after)) if after[i] != before[i]]
    assert all(i in allowed for i in changed)
    for _, used_len in used:
        assert used_len <= DATA_LEN + 1
