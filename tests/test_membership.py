"""Worker membership: indices at registration, heartbeats, deaths, rejoining."""
import pytest

from asyncps.chief.membership import Membership, MembershipFull


class FakeClock:
    """A clock the test moves by hand (time itself, not a mock of any asyncps part)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_indices_are_handed_out_in_order_and_registration_is_idempotent():
    m = Membership(2, timeout=5)
    assert m.register("a", 1).index == 0
    assert m.register("b", 2).index == 1
    assert m.register("a", 1).index == 0  # a retried Register
    with pytest.raises(MembershipFull, match="all 2 worker slots"):
        m.register("c", 3)


def test_preferred_index_is_granted_when_its_slot_is_free():
    m = Membership(3, timeout=5)
    assert m.register("a", 1, preferred=2).index == 2  # launch slot 2: worker2.log is worker 2's
    assert m.register("b", 2, preferred=2).index == 0  # taken: the lowest free one
    assert m.register("a", 1, preferred=1).index == 2  # a retried Register keeps its slot


def test_silent_worker_is_declared_dead_and_its_index_reused():
    clock, events = FakeClock(), []
    m = Membership(2, timeout=5, on_event=lambda kind, member: events.append((kind, member.index)), clock=clock)
    m.register("a", 1)
    m.register("b", 2)
    clock.now = 3
    assert m.heartbeat(1, step=7) is not None
    clock.now = 6
    assert [d.index for d in m.reap()] == [0]
    assert m.heartbeat(0, step=1) is None  # the dead worker must register again
    assert m.register("a", 99).index == 0  # a restarted worker gets the free slot: same data shard
    assert ("worker_dead", 0) in events and m.deaths == 1 and m.joins == 3


def test_a_worker_silent_after_the_stop_exited_it_did_not_die():
    """Once the run is stopping, a worker that goes quiet was told to stop: counted as an exit, so
    report.json's deaths agree with the worker_dead rows (there are none in a clean run)."""
    clock, events, stopping = FakeClock(), [], [False]
    m = Membership(2, timeout=5, on_event=lambda kind, member: events.append((kind, member.index)), clock=clock,
                   gone=lambda member: False, stopping=lambda: stopping[0])
    m.register("a", 1)
    m.register("b", 2)
    stopping[0] = True
    clock.now = 6
    assert [d.index for d in m.reap()] == [0, 1]
    assert events[-2:] == [("worker_exited", 0), ("worker_exited", 1)] and m.deaths == 0 and m.exits == 2
