"""Who is training: worker indices handed out at registration, heartbeats, deaths.

A worker's state moves ALIVE -> DEAD (silent for longer than the timeout, or, on the chief's
own host, its process is gone) and an index whose worker is DEAD may be handed to a new process:
a restarted worker rejoins with the same index and so reads the same data shard. Registration is
idempotent per (hostname, pid). A heartbeat for an index this chief never handed out (the chief
was restarted while its workers lived on) adopts that worker into the free slot.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable


def process_gone(member: "Member") -> bool:
    """True when `member` ran on this host and its process no longer exists (SIGKILLed, crashed).

    Only the launcher's case (every process on one host) is decided here; on other hosts the
    heartbeat timeout decides. A zombie counts as alive until its parent reaps it.
    """
    if member.pid <= 0 or member.hostname != socket.gethostname():
        return False
    try:
        os.kill(member.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class MembershipFull(Exception):
    """Every worker index is held by a live worker."""


@dataclass
class Member:
    index: int
    hostname: str
    pid: int
    last_seen: float
    step: int = 0
    alive: bool = True
    ready: bool = False  # data loaded, waiting at (or past) the start barrier
    registered_at: float = field(default_factory=time.time)


class Membership:
    """Thread-safe table of worker slots; `on_event(kind, member)` hears joins, deaths and exits.

    A worker that goes silent while `stopping()` is true was told to stop: that is an exit
    ("worker_exited", counted in `exits`), not a death ("worker_dead", counted in `deaths`)."""

    def __init__(self, num_workers: int, timeout: float, on_event: Callable[[str, Member], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, gone: Callable[[Member], bool] = process_gone,
                 stopping: Callable[[], bool] = lambda: False):
        self.num_workers, self.timeout, self.clock, self.gone = num_workers, timeout, clock, gone
        self.stopping = stopping
        self._slots: dict[int, Member] = {}
        self._lock = threading.Lock()
        self._on_event = on_event or (lambda kind, member: None)
        self.joins = 0
        self.deaths = 0
        self.exits = 0

    def register(self, hostname: str, pid: int, preferred: int | None = None) -> Member:
        """The slot of (hostname, pid), else `preferred` if free or dead, else the lowest free or dead one."""
        with self._lock:
            for member in self._slots.values():
                if member.alive and (member.hostname, member.pid) == (hostname, pid):
                    member.last_seen = self.clock()
                    return member
            free = [i for i in range(self.num_workers) if i not in self._slots or not self._slots[i].alive]
            if not free:
                raise MembershipFull(f"all {self.num_workers} worker slots are held by live workers")
            member = Member(preferred if preferred in free else free[0], hostname, pid, self.clock())
            self._slots[member.index] = member
            self.joins += 1
        self._on_event("worker_joined", member)
        return member

    def heartbeat(self, index: int, step: int, ready: bool = False) -> Member | None:
        """Records a heartbeat; None if `index` is out of range or its worker was declared dead.

        An index never handed out by this chief is adopted (see the module docstring).
        """
        adopted = None
        with self._lock:
            member = self._slots.get(index)
            if member is None and 0 <= index < self.num_workers:
                member = adopted = self._slots[index] = Member(index, "adopted", 0, self.clock())
                self.joins += 1
            if member is None or not member.alive:
                return None
            member.last_seen, member.step = self.clock(), step
            member.ready = member.ready or ready
        if adopted is not None:
            self._on_event("worker_adopted", adopted)
        return member

    def reap(self) -> list[Member]:
        """Declares dead every worker silent for longer than the timeout; returns them."""
        now = self.clock()
        with self._lock:
            dead = [m for m in self._slots.values() if m.alive and (now - m.last_seen > self.timeout or self.gone(m))]
            for member in dead:
                member.alive = False
            kind = "worker_exited" if self.stopping() else "worker_dead"
            if kind == "worker_dead":
                self.deaths += len(dead)
            else:
                self.exits += len(dead)
        for member in dead:
            self._on_event(kind, member)
        return dead

    def alive(self) -> list[Member]:
        with self._lock:
            return [m for m in self._slots.values() if m.alive]
