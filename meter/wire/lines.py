"""
The TCP hop's framing: messages as C{\\n}-ended lines, read and written as
Twisted's C{LineOnlyReceiver} does, and Nagle's algorithm turned off.
"""

from __future__ import annotations

from twisted.protocols.basic import LineOnlyReceiver

from meter.wire.messages import MAX_LINE


class LineProtocol(LineOnlyReceiver):
    """
    A connection of C{\\n}-ended lines of up to C{MAX_LENGTH} bytes: a
    C{LineOnlyReceiver} whose C{dataReceived} keeps the pieces of a line
    apart until its end arrives.

    Subclasses define C{lineReceived}.  C{lineLengthExceeded} closes the
    connection, as C{LineOnlyReceiver}'s does; one that does not must not
    expect the rest of the line: the bytes held so far are dropped, so the
    rest would arrive as a line of its own.
    """

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE

    #: The pieces of a line begun but not ended yet, and their length.
    _pieces: list[bytes]
    _held = 0

    def dataReceived(self, data: bytes) -> None:
        # Why not LineOnlyReceiver's own: it joins its buffer to each piece
        # of data and splits the whole again, so a line arriving in many
        # pieces is copied and scanned once a piece (a batch of 5,000
        # readings, ~230 kB in ~8 pieces, about eight times;
        # docs/performance.md has the measure).  Here a line's pieces are
        # kept apart and joined once, when its end arrives.  The delimiter
        # is one byte, so it cannot be cut between two pieces.
        delimiter = self.delimiter
        start = 0
        while True:
            end = data.find(delimiter, start)
            if end < 0:
                break
            line = data[start:end]
            if self._held:
                self._pieces.append(line)
                line = b"".join(self._pieces)
                self._pieces, self._held = [], 0
            # As LineOnlyReceiver: a line that closed the connection ends
            # the reading of the rest.
            if self.transport.disconnecting:
                return
            if len(line) > self.MAX_LENGTH:
                self.lineLengthExceeded(line)
                return
            self.lineReceived(line)
            start = end + 1
        if start < len(data):
            if not self._held:
                self._pieces = []
            self._pieces.append(data[start:])
            self._held += len(data) - start
            if self._held > self.MAX_LENGTH:
                line = b"".join(self._pieces)
                self._pieces, self._held = [], 0
                self.lineLengthExceeded(line)


def without_nagle(transport) -> None:
    """
    Turn Nagle's algorithm off on the TCP connection under C{transport}, if
    it is one (a TLS transport passes the call on to the connection under
    it; a test's fake transport has none).

    Why: with it on, the last, partial segment of a line waits until the
    peer acknowledges the segments before it, and the peer holds that
    acknowledgement back (up to 40 ms) while it waits for the rest of the
    line: each batch, and each BATCHACK written while another is still
    unacknowledged, stalls.  Both sides write whole lines at once, so no
    stream of small packets follows (docs/performance.md has the measure).
    """
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        set_no_delay(True)
