"""
Each datagram's kernel receive time (C{SO_TIMESTAMPNS}, read with
C{recvmsg}): how long it waited in the socket's queue, for the gateway's
load shedding, and when an acknowledgement really arrived, for loadgen's
latencies while the load generator is busy.
"""

from __future__ import annotations

import errno
import socket
import struct
import sys

from twisted.internet import udp
from twisted.python import log as legacy_log

#: Linux's socket option and control message for a datagram's kernel receive
#: time (a struct timespec); the socket module does not name them.
SO_TIMESTAMPNS = 35
_TIMESPEC = struct.Struct("@ll")
_AGAIN = {errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR}


class StampedPort(udp.Port):
    """
    A UDP port that tells each datagram's kernel receive time (Unix
    seconds, or None where the kernel gave none) to L{arrival} while its
    protocol's C{datagramReceived} runs, and None after: by default as the
    protocol's C{arrived}.  C{recvmsg} with the timestamp costs about a
    microsecond more a datagram than C{recvfrom} (docs/performance.md).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._ancillary = socket.CMSG_SPACE(_TIMESPEC.size)

    def arrival(self, arrived: float | None) -> None:
        self.protocol.arrived = arrived

    def createInternetSocket(self):
        sock = super().createInternetSocket()
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        return sock

    def doRead(self):
        # udp.Port.doRead, with recvmsg for the timestamp.
        read = 0
        while read < self.maxThroughput:
            try:
                data, ancillary, _, addr = self.socket.recvmsg(self.maxPacketSize, self._ancillary)
            except OSError as e:
                if e.args[0] in _AGAIN or e.args[0] == errno.ECONNREFUSED:
                    return
                raise
            read += len(data)
            arrived = None
            for level, kind, value in ancillary:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(value) >= _TIMESPEC.size:
                    seconds, nanoseconds = _TIMESPEC.unpack_from(value)
                    arrived = seconds + nanoseconds * 1e-9
            self.arrival(arrived)
            try:
                self.protocol.datagramReceived(data, addr[:2])
            except BaseException:
                legacy_log.err()
            finally:
                self.arrival(None)


def stamps_available(reactor) -> bool:
    """
    Whether a L{StampedPort} can run on C{reactor}.
    """
    return sys.platform == "linux" and hasattr(reactor, "addReader") and hasattr(socket.socket, "recvmsg")
