"""
The gateway's counters: one object for the whole role, which the intake,
the uplink and both protocols count into, and which the periodic stats line
renders as logfmt (C{key=value} pairs).

Counting is an attribute increment (C{metrics.datagrams += 1}) on a slotted
class: no string key is built or hashed on the per-datagram path.
"""

from __future__ import annotations

import attrs

from meter.monitoring.histogram import BATCH_ACK_SECONDS, Histogram


@attrs.define
class GatewayMetrics:
    """
    What the gateway counted since it started.  Every field is a count of
    events but L{batch_ack_seconds}, a histogram; the gauges (spool depth,
    transfers in reassembly) are read from their owners when the stats line
    is made (see L{render}) and when /metrics is scraped
    (L{meter.gateway.exposition}).
    """

    # -- the devices' side ----------------------------------------------------

    #: Datagrams received on the UDP port, whatever they held.
    datagrams: int = 0
    #: Datagrams dropped unanswered because their source was over its rate.
    dropped_flood: int = 0
    #: Datagrams dropped unanswered for want of an authentication tag.
    dropped_no_tag: int = 0
    #: Datagrams dropped unanswered: the device they claim has no key here.
    dropped_unknown_device: int = 0
    #: Datagrams dropped unanswered: their tag does not verify under the
    #: claimed device's key.
    dropped_bad_tag: int = 0
    #: Authentic datagrams the decoder refused, by the code its refusal
    #: starts with (docs/protocol.md): C{{"range": 2, ...}}.
    decoder_refused: dict[str, int] = attrs.Factory(dict)
    #: Authentic messages of a kind a gateway never takes (a ping, a batch).
    unexpected: int = 0
    #: Chunks acknowledged again without being stored again (their message id
    #: was committed, or was being committed).
    duplicates: int = 0
    #: Chunks committed to the spool.
    chunks: int = 0
    #: Readings new to the spool in the chunks committed.
    readings: int = 0
    #: Chunks whose answer could not be made or sent, a fault of the
    #: gateway's own after the intake took them: the device sends the chunk
    #: again, and is answered from the admission's record if it was stored.
    answer_failures: int = 0

    # -- the admission's refusals (each answered "bad" or "busy") ------------

    #: A device not in the fleet (code C{fleet}).
    unknown_device: int = 0
    #: A device naming another address than the fleet's (C{address}).
    wrong_address: int = 0
    #: A datagram from another address than its device's (C{source}).
    wrong_source: int = 0
    #: A chunk outside the replay window (C{replay}).
    refused_replay: int = 0
    #: A day that does not agree with the transfer's start (C{day}).
    refused_day: int = 0
    #: A chunk that changes its transfer's day or number of chunks (C{transfer}).
    inconsistent_chunks: int = 0
    #: A chunk past its device's daily bounds (C{limit}).
    refused_limit: int = 0
    #: A minute sent twice across the chunks of a transfer (C{minute}).
    refused_minute: int = 0
    #: A message id sent again with other content (C{conflict}).
    refused_conflict: int = 0
    #: A chunk that would take the spool past its limit (C{spool_full}, busy).
    refused_spool_full: int = 0
    #: A chunk refused before decoding, with too many commits waiting
    #: (C{overloaded}, busy).
    refused_overloaded: int = 0

    # -- load shedding (meter.gateway.shedding) --------------------------------

    #: Chunks of new transfers answered busy with a retry-after hint while
    #: the gateway shed load (C{shed}, busy).
    shed: int = 0
    #: Chunks of devices sent away that came back at their slot and were
    #: let in while the gateway still shed load.
    shed_returned: int = 0
    #: Times the gateway started shedding load.
    shed_episodes: int = 0

    # -- rounds and reassembly ------------------------------------------------

    #: Rounds closed, complete or at their deadline.
    rounds_closed: int = 0
    #: Rounds closed at their deadline with devices missing.
    rounds_incomplete: int = 0
    #: Devices whose whole day arrived after its round closed.
    late_devices: int = 0
    #: Times a full spool forwarded the open rounds' readings before they
    #: closed.
    rounds_released: int = 0
    #: Transfers given up while missing chunks (timeout, bound, or forgotten).
    expired_reassemblies: int = 0

    # -- the cloud's side -------------------------------------------------------

    #: Batches sent to the cloud.
    batches_sent: int = 0
    #: Batches the cloud acknowledged as stored.
    batches_acknowledged: int = 0
    #: Readings of those batches removed from the spool: delivered.
    readings_forwarded: int = 0
    #: Seconds from each of those batches sent to its acknowledgement, on
    #: the uplink's clock (one observation a batch; not in the stats line).
    batch_ack_seconds: Histogram = attrs.Factory(lambda: Histogram(BATCH_ACK_SECONDS))
    #: Batches in flight when their connection was lost, to be sent again.
    batches_resent: int = 0
    #: Batches the cloud refused for now (retried).
    batches_refused: int = 0
    #: Batches the cloud refused for good, set aside in the spool.
    batches_set_aside: int = 0
    #: Readings of the batches set aside.
    readings_set_aside: int = 0
    #: Acknowledgements of batches not in flight.
    stray_acks: int = 0
    #: Batches not acknowledged in time (the connection is then replaced).
    ack_timeouts: int = 0
    #: Connections to the cloud scheduled again (after a failure or a loss).
    cloud_retries: int = 0
    #: Moves to the next of several cloud nodes (after a failed attempt, a
    #: lost connection, a batch or a ping not answered).
    cloud_failovers: int = 0
    #: TLS handshakes with the cloud that did not complete in time.
    handshake_timeouts: int = 0
    #: Pings the cloud did not answer in time.
    heartbeat_failures: int = 0
    #: Lines from the cloud the decoder refused.
    refused_from_cloud: int = 0

    # -- the spool's transactions ---------------------------------------------

    #: Spool transactions that failed, whatever their step.
    transaction_failures: int = 0
    #: Chunks whose commit failed (answered busy).
    spool_failures: int = 0
    #: Closes of a round that failed (retried).
    close_failures: int = 0
    #: Forgettings of old message ids that failed (retried).
    forget_failures: int = 0
    #: Takings of a batch that failed (retried).
    take_failures: int = 0
    #: Removals of a delivered batch that failed (retried).
    remove_failures: int = 0
    #: Devices' days not made ready before their round closed (forward =
    #: "device"): they leave when the round closes.
    ready_failures: int = 0

    # -- for meter.retry.Failures, which counts a step's failures by name -------

    def __getitem__(self, name: str) -> int:
        return getattr(self, name)

    def __setitem__(self, name: str, value: int) -> None:
        setattr(self, name, value)

    # -- the stats line ---------------------------------------------------------

    @property
    def refused_busy(self) -> int:
        """
        Chunks answered busy for the spool: full, or its write failed.
        """
        return self.refused_spool_full + self.spool_failures

    @property
    def forwarding_retries(self) -> int:
        """
        Every way a batch had to go again: resent after a lost connection,
        not acknowledged in time, refused for now, or a reconnection.
        """
        return self.batches_resent + self.ack_timeouts + self.batches_refused + self.cloud_retries

    def counts(self) -> dict[str, int]:
        """
        Every count by its name, the decoder's refusals as
        C{decoder_refused_<code>}; the histograms are left to /metrics.
        """
        counts = {}
        for field in attrs.fields(GatewayMetrics):
            value = getattr(self, field.name)
            if isinstance(value, Histogram):
                continue
            if isinstance(value, dict):
                for code, count in sorted(value.items()):
                    counts[f"{field.name}_{code}"] = count
            else:
                counts[field.name] = value
        return counts


def render(gauges: dict[str, int], metrics: GatewayMetrics) -> str:
    """
    The gauges, two sums an operator looks for first (C{refused_busy},
    C{forwarding_retries}), then every count, as logfmt C{key=value} pairs.
    """
    pairs = {**gauges, "refused_busy": metrics.refused_busy, "forwarding_retries": metrics.forwarding_retries}
    pairs.update(metrics.counts())
    return " ".join(f"{key}={value}" for key, value in pairs.items())
