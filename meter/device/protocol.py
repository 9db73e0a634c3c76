"""
The device's UDP socket.
"""

from __future__ import annotations

from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from meter import wire
from meter.device.metrics import DeviceMetrics
from meter.device.sender import DaySender


class DeviceProtocol(DatagramProtocol):
    """
    The device's UDP socket: sends datagrams to the gateway, sealed with the
    device's key, and hands the gateway's acknowledgements to the current
    L{DaySender} once their tag verifies.  Datagrams from any other address
    are ignored.
    """

    log = Logger()
    #: No "Starting/Stopping protocol <object at 0x...>" lines: an object's
    #: address says nothing to an operator.
    noisy = False

    def __init__(self, gateway: tuple[str, int], key: bytes, metrics: DeviceMetrics | None = None):
        #: The gateway's (host, port): the only address answers are taken from.
        self.gateway = gateway
        self._key = key
        self.sender: DaySender | None = None
        self.metrics = metrics if metrics is not None else DeviceMetrics()

    def send(self, datagram: bytes) -> None:
        self.transport.write(wire.seal(datagram, self._key), self.gateway)

    def datagramReceived(self, data: bytes, addr):
        if (addr[0], addr[1]) != self.gateway:
            self.metrics.foreign_datagrams += 1
            return
        try:
            message = wire.decode(wire.unseal(data, self._key), max_size=wire.MAX_DATAGRAM)
        except wire.WireError as e:
            self.metrics.refused_datagrams += 1
            self.log.warn("refused a datagram from the gateway: {error}", error=str(e))
            return
        if isinstance(message, wire.DayAck) and self.sender is not None:
            self.sender.ack_received(message)
