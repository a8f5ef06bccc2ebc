"""Which sites take part in each DiLoCo exchange when sites may die, stall and come back (torchft's design).

With --sites.drop_after S > 0 every site is its own job (one process, or its own torchrun), and the sites meet
at a c10d TCPStore (--sites.store; `lmforge train --nproc` hosts it for the sites it starts). Exchanges are
numbered 1, 2, ... in the same order on every site, and an exchange may take several attempts. For each attempt,
the first rank of every site writes `<attempt>/at/<site>` and waits until every site of its last exchange has
arrived too, or S seconds have passed since it arrived itself (at a site's first exchange, which also absorbs
the sites' start-up, at least STARTUP_S). Then it proposes the sites present as the members; the store's
compare-and-set keeps the first proposal, so every site reads the same list. Site 0 is never left out: it keeps
the run's records and checkpoints, so the others wait for it as long as it lives (when it dies, its store goes
with it and they stop). A site that arrives after the list is fixed is not a member and tries the next exchange.
A site that is catching up (started again, or left out of an exchange) announces itself as joining: it waits for
the others and never proposes; if the run ends first, it ends too (RunEnded).

The members then open a Gloo process group of their own for that attempt, under the attempt's prefix of the
store: a fresh group each time, so a member that died in an old group cannot hang a new one. If a member dies
during the exchange, the collective fails on every other member, and they try again without it.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass

import torch.distributed as dist

from lmforge.errors import ConfigError, LmforgeError

POLL_S = 0.005  # how often a waiting site looks at the store (each look is one round trip to it)
STARTUP_S = 120.0  # the least a site's first exchange waits for the others: they may still be starting up


class RunEnded(LmforgeError):
    """A site tried to rejoin a run that site 0 has already closed: nothing is left for it to do."""


@dataclass(frozen=True)
class Members:
    """The sites in one attempt of one exchange, in site order; `index` is this site's rank among them."""
    key: str  # the attempt's prefix in the store
    sites: tuple[int, ...]
    index: int


def parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--sites.store must be HOST:PORT, got {address!r}")
    return host, int(port)


def connect(address: str, host_it: bool, timeout_s: float = 300.0) -> dist.TCPStore:
    """The store the sites meet at; `host_it` serves it from this process (the others connect to it)."""
    if not address:
        raise ConfigError("--sites.drop_after needs --sites.store HOST:PORT (where site 0 serves the store); "
                          "`lmforge train --nproc N --sites K` sets it for sites on this machine")
    host, port = parse_address(address)
    try:
        return dist.TCPStore(host, port, is_master=host_it, wait_for_workers=False,
                             timeout=datetime.timedelta(seconds=timeout_s), use_libuv=True)
    except (RuntimeError, OSError) as e:  # DistNetworkError is a RuntimeError
        raise LmforgeError(f"cannot reach the sites' store at {address} ({str(e).splitlines()[0]}); start site 0 "
                           f"first, or check --sites.store") from e


class Quorum:
    """One site's view of the membership: `agree` fixes the members of an attempt, `group` opens their group."""

    def __init__(self, store: dist.TCPStore, site: int, count: int, drop_after: float,
                 startup_s: float = STARTUP_S):
        self.store, self.site, self.count, self.drop_after = store, site, count, drop_after
        self.expected = set(range(count))  # the sites this one waits for: those of its last exchange
        self.patience = max(drop_after, startup_s)  # seconds to wait for the others; drop_after after the first

    def latest(self) -> int:
        """The last exchange that some site completed (0 before the first)."""
        return int(self.store.add("latest", 0))

    def completed(self, exchange: int) -> None:
        current = self.latest()
        while current < exchange:  # a monotonic maximum through compare-and-set
            seen = self.store.compare_set("latest", str(current), str(exchange)).decode()
            current = int(seen) if seen != str(exchange) else exchange

    def started_before(self, local_rank: int) -> bool:
        """Whether this rank of this site already trained in this run (this process is a restart: catch up)."""
        return self.store.add(f"starts/{self.site}/{local_rank}", 1) > 1

    def finished(self) -> None:
        """This site has trained its last step: nobody waits for it any more."""
        self.store.set(f"done/{self.site}", "1")

    def close(self, timeout_s: float) -> None:
        """Site 0 at the end of the run: wait (at most timeout_s) for the sites of the last exchange to finish,
        so the store they use outlives them, and tell any site still trying to rejoin that the run is over."""
        self.finished()
        deadline = time.monotonic() + timeout_s
        while self.expected - self._done() and time.monotonic() < deadline:
            time.sleep(POLL_S)
        self.store.set("closed", "1")

    def agree(self, exchange: int, attempt: int, joining: bool) -> Members:
        """The members of this attempt; this site is among them unless it came too late (index -1)."""
        try:
            return self._agree(exchange, attempt, joining)
        except dist.DistError as e:  # the store went away: site 0 has ended
            raise LmforgeError(f"site {self.site} lost the sites' store ({str(e).splitlines()[0]}); site 0, which "
                               f"serves it, has ended") from e

    def _agree(self, exchange: int, attempt: int, joining: bool) -> Members:
        key = f"x{exchange}.{attempt}"
        self.store.set(f"{key}/at/{self.site}", "join" if joining else "train")
        arrived = time.monotonic()
        while True:
            if self.store.check([f"{key}/members"]):
                break
            present = {s for s in range(self.count) if self.store.check([f"{key}/at/{s}"])}
            done = self._done()
            waiting_for = self.expected - present - done
            site0 = 0 in present or 0 in done  # never go on without site 0 while it trains
            if not joining and site0 and (not waiting_for or time.monotonic() - arrived > self.patience):
                proposal = ",".join(str(s) for s in sorted(present))
                self.store.compare_set(f"{key}/members", "", proposal)
                break
            if joining and self.store.check(["closed"]):
                raise RunEnded(f"site {self.site} did not rejoin: the run had ended")
            time.sleep(POLL_S)
        sites = tuple(int(s) for s in self.store.get(f"{key}/members").decode().split(","))
        if self.site in sites:
            self.expected, self.patience = set(sites), self.drop_after
        return Members(key, sites, sites.index(self.site) if self.site in sites else -1)

    def group(self, members: Members, local_rank: int, timeout_s: float) -> dist.ProcessGroup:
        """Gloo group of rank `local_rank` of every member site (each site's ranks pair up with their peers)."""
        prefixed = dist.PrefixStore(f"{members.key}/pg{local_rank}/", self.store)
        return dist.ProcessGroupGloo(prefixed, members.index, len(members.sites),
                                     datetime.timedelta(seconds=timeout_s))

    def _done(self) -> set[int]:
        return {s for s in range(self.count) if self.store.check([f"done/{s}"])}
