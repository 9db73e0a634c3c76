# The twistd dropin of the meter suite: each plugin names the module holding
# its Options and makeService, imported only when that plugin is run.
from twisted.application.service import ServiceMaker

meter_cloud = ServiceMaker(
    "meter-cloud", "meter.cloud.tap", "meter cloud: stores and prints the readings gateways forward", "meter-cloud"
)
meter_gateway = ServiceMaker(
    "meter-gateway", "meter.gateway.tap", "meter gateway: collects devices' days over UDP, forwards to the cloud", "meter-gateway"
)
meter_device = ServiceMaker(
    "meter-device", "meter.device.tap", "meter device: sends its previous day's readings to the gateway", "meter-device"
)
