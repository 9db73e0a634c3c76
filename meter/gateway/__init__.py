"""
The gateway: takes devices' days over UDP, spools them durably, and forwards
each day's readings to the cloud over TCP once every expected device has
reported or the day's deadline has passed.

L{Intake} decides what a device's chunk gets; L{Uplink} moves spooled
readings to the cloud.  L{GatewayProtocol} and L{CloudClientProtocol} only
translate datagrams and lines into calls on them.  This module only
re-exports the public names of the package's modules.
"""

from meter.gateway.admission import DAY_EARLIEST, DAY_LATEST, DeviceDay, day_agrees, minute_bits, peer_host
from meter.gateway.intake import REMEMBER, Intake
from meter.gateway.protocol import CloudClientFactory, CloudClientProtocol, GatewayProtocol
from meter.gateway.reassembly import Transfer
from meter.gateway.rounds import Round
from meter.gateway.uplink import REFUSED_FOR_GOOD, BatchSender, Uplink, refused_for_good

__all__ = [
    "DAY_EARLIEST", "DAY_LATEST", "REFUSED_FOR_GOOD", "REMEMBER", "BatchSender", "CloudClientFactory",
    "CloudClientProtocol", "DeviceDay", "GatewayProtocol", "Intake", "Round", "Transfer", "Uplink", "day_agrees",
    "minute_bits", "peer_host", "refused_for_good",
]
