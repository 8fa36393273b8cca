"""Observers of a shard: what watches its state changes without deciding anything.

The core (ps/shard.py) calls every observer, under its lock, at each event: a worker registered
or retired, a pull served from an older version, an update about to change a version's values,
the version moved, a worker's push applied, a push processed, clocks moved, a restore. An
observer that needs none of them inherits the no-op. The update log, the controlled-staleness
age counters and the clock-gap tracker are observers; so are the read views that keep past
values (ps/views.py), since they must see every update.
"""
from __future__ import annotations

from collections.abc import Mapping

from asyncps.ps.history import AgeCounters


class ShardObserver:
    """No-op base: override the events you need. Called with the shard's lock held: be quick."""

    def registered(self, worker: int, retire: bool, version: int) -> None: ...

    def served(self, worker: int, served_version: int, current_version: int, requested_age: int) -> None: ...

    def updating(self, version: int, variables: Mapping) -> None: ...

    def updated(self, version: int, variables: Mapping) -> None: ...

    def applied(self, worker: int, read_version: int) -> None: ...

    def pushed(self, worker: int, seq: int, read_version: int, result: str, version: int, had_read: bool) -> None: ...

    def clocks_moved(self, workers: Mapping) -> None: ...

    def restored(self, version: int) -> None: ...


class Observers(ShardObserver):
    """Fans every event out to a list of observers, in order."""

    def __init__(self, observers=()):
        self.all: list[ShardObserver] = list(observers)

    def add(self, observer: ShardObserver) -> ShardObserver:
        self.all.append(observer)
        return observer

    def registered(self, *a) -> None:
        for o in self.all:
            o.registered(*a)

    def served(self, *a) -> None:
        for o in self.all:
            o.served(*a)

    def updating(self, *a) -> None:
        for o in self.all:
            o.updating(*a)

    def updated(self, *a) -> None:
        for o in self.all:
            o.updated(*a)

    def applied(self, *a) -> None:
        for o in self.all:
            o.applied(*a)

    def pushed(self, *a) -> None:
        for o in self.all:
            o.pushed(*a)

    def clocks_moved(self, *a) -> None:
        for o in self.all:
            o.clocks_moved(*a)

    def restored(self, *a) -> None:
        for o in self.all:
            o.restored(*a)


class UpdateLogObserver(ShardObserver):
    """Writes every state change to the shard's update log (common/update_log.py), for replay."""

    def __init__(self, log):
        self.log = log

    def registered(self, worker: int, retire: bool, version: int) -> None:
        self.log.register(worker, retire, version)

    def pushed(self, worker: int, seq: int, read_version: int, result: str, version: int, had_read: bool) -> None:
        self.log.push(worker, seq, read_version, result, version, had_read)

    def restored(self, version: int) -> None:
        self.log.restore(version)


class AgeObserver(ShardObserver):
    """Controlled staleness: per worker, the ages its pulls were served and its applied pushes
    had (ps/history.py AgeCounters)."""

    def __init__(self):
        self.ages: dict[int, AgeCounters] = {}

    def served(self, worker: int, served_version: int, current_version: int, requested_age: int) -> None:
        self.ages.setdefault(worker, AgeCounters()).pulled(served_version, current_version - served_version,
                                                           requested_age)

    def applied(self, worker: int, read_version: int) -> None:
        if worker in self.ages:
            self.ages[worker].applied(read_version)

    def restored(self, version: int) -> None:
        for ages in self.ages.values():
            ages.pending = None

    def stats(self, worker: int) -> dict:
        return self.ages[worker].stats() if worker in self.ages else {}


class ClockGap(ShardObserver):
    """The largest gap between the clocks of the fastest and the slowest active registered
    worker after any push (how far ssp let them drift; async has no bound)."""

    def __init__(self):
        self.max = 0

    def clocks_moved(self, workers: Mapping) -> None:
        clocks = [w.clock for w in workers.values() if w.active]
        if len(clocks) > 1:
            self.max = max(self.max, max(clocks) - min(clocks))
