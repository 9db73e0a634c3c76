"""
A daemon's Prometheus registry: the role's collector, the process's
metrics and C{meter_build_info}, in a registry of the daemon's own (not
C{prometheus_client}'s global one, which anything imported could fill).

And the few shapes a role's collector builds its families with, from the
plain values its metrics objects hold.
"""

from __future__ import annotations

from importlib import metadata
from typing import Mapping

from prometheus_client import CollectorRegistry, Info, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from meter.monitoring.histogram import Histogram


def version() -> str:
    try:
        return metadata.version("meter")
    except metadata.PackageNotFoundError:
        return "unknown"


def registry(collector) -> CollectorRegistry:
    """
    A registry of C{collector} (the role's), the process's CPU, memory and
    descriptors, the platform (C{python_info}) and C{meter_build_info}.
    """
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    Info("meter_build", "The meter version this daemon runs.", registry=registry).info({"version": version()})
    registry.register(collector)
    return registry


def counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def counters(name: str, documentation: str, label: str, values: Mapping[str, float]) -> CounterMetricFamily:
    """
    One counter family with a sample per C{label} value, every value of
    C{values} (zeros too: a series that appears only once it is non-zero
    breaks C{rate()} and C{increase()} over its first event).
    """
    family = CounterMetricFamily(name, documentation, labels=[label])
    for key, value in values.items():
        family.add_metric([key], value)
    return family


def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def histogram(name: str, documentation: str, observed: Histogram) -> HistogramMetricFamily:
    buckets = [(floatToGoString(bound), count) for bound, count in observed.cumulative()]
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=observed.sum)

