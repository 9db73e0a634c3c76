"""
Several cloud nodes behind one gateway (C{[gateway] cloud} as a list): the
gateway connects to one node at a time and, when that node cannot be
reached, its connection is lost or it stops acknowledging, moves to the
next node of the list, round robin.

The nodes share one database (PostgreSQL), which stores a reading once
whichever node it reaches, so the batches a node never acknowledged are
simply sent again to the next one (the uplink re-sends its window on every
new connection) and nothing is doubled.

The wait before the next attempt grows only once a whole round of the
list failed: with N nodes, the wait after the F-th failure in a row is the
wait one node would get after ceil(F / N) failures.  A node that is down
therefore costs the first wait of the backoff (under a second, with its
jitter) before the next node is tried, while a cloud whose every node is
down is retried no more often than a single node would be.
"""

from __future__ import annotations

from typing import Sequence

from twisted.internet.interfaces import IStreamClientEndpoint
from zope.interface import implementer


class CloudNodes:
    """
    The cloud nodes' addresses (C{HOST:PORT} texts) in the order of
    C{[gateway] cloud}, and the position of the one the gateway connects to
    now (or tries next).
    """

    def __init__(self, addresses: Sequence[str]):
        if not addresses:
            raise ValueError("at least one cloud node is needed")
        self.addresses = tuple(addresses)
        #: Index in L{addresses} of the node connected to, or tried next.
        self.position = 0

    def __len__(self) -> int:
        return len(self.addresses)

    @property
    def current(self) -> str:
        return self.addresses[self.position]

    def describe(self, position: int | None = None) -> str:
        """
        The node at C{position} (default: the current one) for a log line:
        its address, and with several nodes which of them it is
        (C{127.0.0.1:8002 (node 2 of 3)}).
        """
        position = self.position if position is None else position
        return self.addresses[position] + self.which(position)

    def which(self, position: int | None = None) -> str:
        """
        With several nodes, which of them is at C{position} (default: the
        current one), as C{" (node 2 of 3)"}; with one, C{""}.
        """
        if len(self.addresses) == 1:
            return ""
        position = self.position if position is None else position
        return f" (node {position + 1} of {len(self.addresses)})"

    def advance(self) -> int:
        """
        Move to the next node, round robin; its position.
        """
        self.position = (self.position + 1) % len(self.addresses)
        return self.position

    def rounds(self, failures: int) -> int:
        """
        The rounds of the list that C{failures} failed attempts in a row
        started: the step of the backoff they have reached.
        """
        return -(-failures // len(self.addresses))


@implementer(IStreamClientEndpoint)
class NodeEndpoint:
    """
    Connects to the current node of C{nodes}: C{endpoints} holds one
    endpoint per node, in the same order.
    """

    def __init__(self, nodes: CloudNodes, endpoints: Sequence):
        if len(endpoints) != len(nodes):
            raise ValueError(f"{len(endpoints)} endpoints for {len(nodes)} nodes")
        self._nodes = nodes
        self._endpoints = tuple(endpoints)

    def connect(self, factory):
        return self._endpoints[self._nodes.position].connect(factory)
