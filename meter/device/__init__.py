"""
A soil meter: once a day it sends the previous day's readings from its
survey file to the gateway over UDP, each chunk confirmable.

L{sender} holds the retransmission logic (L{DaySender}), L{protocol} the
UDP socket (L{DeviceProtocol}), L{survey} the survey files, L{delivery} one
day's send, L{schedule} when to send which day, L{metrics} what the device
counts, and L{tap} the twistd plugin that wires them.
"""

from meter.device.delivery import SurveyDelivery
from meter.device.metrics import DeviceMetrics
from meter.device.protocol import DeviceProtocol
from meter.device.schedule import RETRY_AFTER, DailySchedule, next_send, offset_for, previous_day
from meter.device.sender import DaySender, DeliveryFailed, Retransmission
from meter.device.survey import SurveyError, load_survey, parse_survey, survey_path

__all__ = [
    "RETRY_AFTER",
    "DailySchedule",
    "DaySender",
    "DeliveryFailed",
    "DeviceMetrics",
    "DeviceProtocol",
    "Retransmission",
    "SurveyDelivery",
    "SurveyError",
    "load_survey",
    "next_send",
    "offset_for",
    "parse_survey",
    "previous_day",
    "survey_path",
]
