"""The worker's heartbeat against a real Chief service: it learns of the stop promptly while its
steps stand still (a push held at a frozen shard), and beats only every interval while they move."""
import threading

import pytest

from asyncps.chief.membership import Membership
from asyncps.chief.servicer import ChiefServicer
from asyncps.protos import chief_pb2_grpc
from asyncps.protos.serving import RoleServer
from asyncps.worker.chief_client import ChiefClient, Heartbeat, StallWatch

LONG_INTERVAL = 600.0  # the plain beat never comes within a test: only the stalled beat can


@pytest.fixture
def chief():
    membership, stop, started = Membership(1, timeout=3600), threading.Event(), threading.Event()
    server = RoleServer("chief", "127.0.0.1", 0, ("asyncps.Chief",))
    chief_pb2_grpc.add_ChiefServicer_to_server(
        ChiefServicer(membership, stop, [], 0, lambda: 0, started=started), server.server)
    port = server.start()
    client = ChiefClient(f"127.0.0.1:{port}", timeout=30)
    yield client, stop, started
    client.close()
    server.stop(grace=None)


def test_a_worker_whose_steps_stand_still_learns_of_the_stop_without_waiting_an_interval(chief):
    client, stop, started = chief
    index = client.register().worker_index
    started.set()  # step 0 has passed
    beat = Heartbeat(client, index, lambda: 7, interval=LONG_INTERVAL, give_up=3600)
    beat.started.set()
    beat.start()
    stop.set()  # the chief stops the run; the worker's step stays at 7 (held at the shard)
    assert beat.stop.wait(60), "the stop was not seen: a stalled worker beat only every interval"
    assert beat.reason == "the chief asked to stop"


def test_a_worker_not_yet_started_does_not_count_as_stalled(chief):
    client, stop, _ = chief
    index = client.register().worker_index
    looks, looked_enough = [0], threading.Event()

    def step() -> int:  # the heartbeat thread reads the counter at every look (every 50 ms)
        looks[0] += 1
        if looks[0] >= 20:  # well past StallWatch's 0.1 s: a started worker would have beaten
            looked_enough.set()
        return 0

    beat = Heartbeat(client, index, step, interval=LONG_INTERVAL, give_up=3600)
    stop.set()
    beat.start()  # loading its data: no stalled beats before the start barrier
    assert looked_enough.wait(60)
    assert not beat.stop.is_set()  # it never asked the chief, so it never heard the stop
    beat.finish("test over")


def test_stall_watch_follows_the_counters_own_pace():
    watch = StallWatch(floor=0.1)
    now = 0.0
    for step in range(1, 51):  # a step every 10 ms: moving
        now += 0.01
        assert not watch.seen(step, now)
    assert not watch.seen(50, now + 0.09)  # under the floor
    assert watch.seen(50, now + 0.11)  # over it: stalled
    slow = StallWatch(floor=0.1)
    now = 0.0
    for step in range(1, 11):  # a step every second (a big model)
        now += 1.0
        assert not slow.seen(step, now)
    assert not slow.seen(10, now + 2.0)  # between two slow steps: not stalled
    assert slow.seen(10, now + 3.5)  # three mean steps without one: stalled
