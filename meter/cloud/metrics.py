"""
What the cloud counts, in one object: the store, the protocol and the
admission of strangers each add to it; the log renders it as logfmt.
"""

from __future__ import annotations

from collections import Counter

import attrs


@attrs.define
class CloudMetrics:
    """
    The cloud's counts since it started.  Each is a plain attribute, so an
    increment costs what a local variable's does.
    """

    #: Batches committed and acknowledged C{ok}.
    batches: int = 0
    #: Readings stored by those batches for the first time.
    readings_new: int = 0
    #: Readings of those batches already stored (a batch sent again).
    readings_duplicate: int = 0

    #: Failed steps of any kind (the sum of the C{*_failures} below but
    #: L{accept_failures}), as L{meter.retry.Failures} counts them.
    transaction_failures: int = 0
    #: Batches whose commit failed: refused, so the gateway sends them again.
    store_failures: int = 0
    #: Batches committed whose console lines could not be written.
    console_failures: int = 0
    #: Batches whose acknowledgement could not be made or written, a fault
    #: of the cloud's own after the store answered: the connection is
    #: closed, so the gateway sends the batch again, and its readings are
    #: counted as duplicates if they were stored.
    answer_failures: int = 0

    #: Lines refused, by the code of the refusal (L{meter.wire.WireError}'s
    #: C{code}; C{size} also for a line over the length limit).
    refused: Counter[str] = attrs.field(factory=Counter)
    #: Valid messages of a kind a cloud never takes.
    unexpected: int = 0

    #: Connections closed for silence: a gateway past the idle timeout, or
    #: a plain-text stranger without a valid line in that time.
    idle_timeouts: int = 0
    #: TLS strangers closed for not completing the handshake in time.
    handshake_timeouts: int = 0
    #: Strangers closed, oldest first, to make room for newer ones.
    unauthenticated_evicted: int = 0
    #: Strangers that failed (their handshake, a line) or were closed by
    #: their peer.
    unauthenticated_failed: int = 0
    #: Connections refused at the connection limit, every one authenticated.
    connections_refused: int = 0
    #: Connections the listener could not accept (no descriptor left) or
    #: closed at once to recover.
    accept_failures: int = 0

    def stored(self, new: int, duplicate: int) -> None:
        """
        A batch was committed: C{new} of its readings stored, C{duplicate}
        stored before.
        """
        self.batches += 1
        self.readings_new += new
        self.readings_duplicate += duplicate

    # meter.retry.Failures counts each step's failures in a counter it is
    # given by name (shared with the gateway), through item access.

    def __getitem__(self, name: str) -> int:
        return getattr(self, name)

    def __setitem__(self, name: str, value: int) -> None:
        setattr(self, name, value)

    def logfmt(self) -> str:
        """
        Every count as logfmt C{key=value} pairs, in the order of the
        fields; the refusals as C{refused_<code>}, by code.
        """
        pairs = []
        for field in attrs.fields(type(self)):
            value = getattr(self, field.name)
            if isinstance(value, Counter):
                pairs.extend(f"{field.name}_{key}={count}" for key, count in sorted(value.items()))
            else:
                pairs.append(f"{field.name}={value}")
        return " ".join(pairs)

    __str__ = logfmt
