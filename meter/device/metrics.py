"""
What a device counts, in one object: its protocol and every L{DaySender} it
starts write into the same L{DeviceMetrics}, so the figures cover the
process's whole life.
"""

from __future__ import annotations

import attrs


@attrs.define
class DeviceMetrics:
    """
    The device's counters, each a plain attribute the code increments.

    The log renders them with L{logfmt}; the operations issue publishes the
    same object.
    """

    #: Chunks sent again because their acknowledgement did not come in time.
    retransmissions: int = 0
    #: Acknowledgements saying the gateway is alive but cannot take the
    #: chunk now (its spool is full, it is overloaded): the chunk waits for
    #: its next timer, or the whole day for the gateway's hint.
    busy_answers: int = 0
    #: Acknowledgements matching no chunk in flight (another transfer, a
    #: part already acknowledged or never sent).
    stray_acks: int = 0
    #: Datagrams from an address other than the gateway's, ignored.
    foreign_datagrams: int = 0
    #: Datagrams from the gateway's address that did not unseal with the
    #: device's key or did not decode.
    refused_datagrams: int = 0
    #: Days the gateway acknowledged in full.
    days_delivered: int = 0
    #: Attempts to send a day that failed (refused, unanswered, or an
    #: unreadable survey).
    days_failed: int = 0
    #: Busy answers carrying the gateway's retry-after hint: each paused
    #: the day's sending (counted in C{busy_answers} too).
    busy_hints: int = 0
    #: Chunks sent again when a pause on a hint ended: not retransmissions,
    #: they do not count against C{max_retransmit}.
    resent_after_busy: int = 0

    def logfmt(self) -> str:
        """
        Every counter as C{name=value}, space-separated, in the order above.
        """
        return " ".join(f"{field.name}={getattr(self, field.name)}" for field in attrs.fields(DeviceMetrics))
