"""
What the gateway needs of its spool: the intake writes chunks and rounds
into it, the uplink takes batches out of it.  L{meter.gateway.spool.Spool}
keeps it in a SQLite file; L{meter.testing.MemorySpool} keeps it in memory
for tests, and tests/contracts/test_spool.py proves the two alike.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class ISpool(Interface):
    """
    The durable spool of readings acknowledged to devices and not yet to
    the cloud.

    Every operation returns a Deferred that fires only once its change is
    committed (durable), and not in the call: work submitted in one reactor
    turn is committed together in a later one, so the intake can submit a
    burst of chunks and answer each device once its chunk is safe.  A
    failed commit changes nothing and fails the operation's Deferred.
    """

    depth = Attribute(
        "The number of readings the spool holds for the cloud (committed, not yet removed or set aside): "
        "what the gateway's spool limit is measured against."
    )

    removed = Attribute(
        "The number of readings that have left the spool since it was opened (removed as stored by the cloud, "
        "or set aside): the rate room is made at, for the hints given while the spool is full."
    )

    def add_chunk(chunk, now, round_closed=False, digest=None):
        """
        Record C{chunk}'s (a L{meter.wire.DayChunk}) message id with its
        content digest and its readings, and its day's round where the spool
        has none: opened at C{now}, or closed at C{now} if C{round_closed}.
        The digest is C{digest} if given (a caller that has the chunk's
        bytes has it already), else the chunk's
        L{meter.gateway.spool.chunk_digest}.
        Fires with how many readings were new to the spool: all of the
        chunk's, or 0 if a chunk with its message id is spooled already.
        """

    def close_round(day, now, most=None):
        """
        Close C{day}'s round at C{now} (a round closed already keeps its
        time): its readings may leave.  A round the spool does not hold is
        added closed.  Makes ready the day's chunks not ready yet, as
        L{days_ready} does: every one, or C{most} of them (closing again
        makes the next ones ready).  Fires with how many readings became
        ready.
        """

    def devices_ready(devices):
        """
        Make ready the chunks spooled for each C{(device_id, day)} of
        C{devices} (a device's transfer is complete: with C{[gateway]
        forward = "device"} its day need not wait for its round).  Fires
        with how many readings became ready.
        """

    def days_ready(days, most=None):
        """
        Make ready the chunks spooled for the days C{days} (dates) not
        ready yet, their rounds open or not: a full spool forwards what
        it holds rather than refuse every device until the rounds close.
        Every one, or C{most} of them: the earliest day's first, by device,
        then as spooled.  Fires with how many readings became ready.
        """

    def take_batch(limit, after=0):
        """
        Fires with the L{meter.gateway.spool.SpooledBatch} readings of the
        ready chunks (those of closed rounds, and those made ready by
        L{devices_ready}) placed after C{after} in the order they became
        ready (a batch's C{last} is its own last place): whole chunks up to
        C{limit} readings (a larger chunk goes alone), a device and minute
        at most once.  They stay in the spool.
        """

    def remove(seqs):
        """
        Remove the chunks with sequence numbers C{seqs} (the cloud stored
        them); fires with how many readings went.
        """

    def set_aside(seqs, reason, now):
        """
        Move the chunks with sequence numbers C{seqs} out of the way (the
        cloud refused them for good), kept with C{reason}; fires with how
        many readings left the spool's depth.
        """

    def forget_before(before):
        """
        Drop the message ids of every device and day whose last chunk
        arrived before C{before}, and the rounds closed before it that hold
        no readings any more.  Fires with None.
        """

    def recover():
        """
        Fires with the L{meter.gateway.spool.Recovered} state the spool
        holds: what a gateway starting on it resumes from.
        """
