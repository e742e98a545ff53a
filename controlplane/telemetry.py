"""Traffic figures per Envoy cluster (= service environment), measured by Envoy itself and
streamed to the control plane: request count, 5xx count and upstream latency histogram.

Decision: Envoy's metrics service stat sink
-------------------------------------------
Every proxy runs the ``envoy.stat_sinks.metrics_service`` sink (see ``envoy/bootstrap.yaml``),
which streams its stats over gRPC (``envoy.service.metrics.v3.MetricsService/StreamMetrics``)
to the control plane, on the same ``bluegreen_xds`` cluster it already uses for ADS. Chosen
over the alternatives because:

* it is push: the control plane needs no route to the proxies' admin ports (polling
  ``/stats`` would need every proxy's admin port reachable, and a poller that scales with the
  fleet), and no Prometheus server;
* it scales with the fleet like ADS does: one long-lived stream per proxy, one message per
  flush interval;
* it carries latency histograms; LRS (load reporting, whose protos xds-protos has) carries
  request and error counts but no latency.

xds-protos has neither the metrics service protos nor the Prometheus ``client_model`` protos
they use, and this project has no protoc build step, so the message classes are built at
runtime from hand-written descriptors, wire-compatible with upstream (same packages, message
names, field numbers and types). Only the fields we read are declared; the others (exemplars,
native/sparse histogram buckets, created timestamps) survive as unknown fields and are ignored.
If a message already exists in the default descriptor pool (e.g. a later xds-protos ships
it), that one is used.

What Envoy 1.40 sends (observed with the bootstrap's config)
------------------------------------------------------------
* The first message of a stream carries ``identifier.node``; later ones do not. Every flush
  (``stats_flush_interval``, 1 s by default here) is one message with every *used* stat (a
  cluster's stats appear once it has seen traffic; unused ones are skipped), also when they
  did not change. One extra flush is sent when Envoy shuts down.
* With ``emit_tags_as_labels: true`` the tags become labels and the names lose them; label
  names keep Envoy's dots. We read:

  - ``cluster.upstream_rq_completed`` COUNTER, label ``envoy.cluster_name``: requests that got
    a response, including the 503/504 Envoy generates for connect failures and timeouts (one
    per downstream request, retries are not counted again);
  - ``cluster.upstream_rq_xx`` COUNTER, labels ``envoy.cluster_name`` and
    ``envoy.response_code_class`` (``"2"``, ``"5"``, ...): we take class ``"5"``;
  - ``cluster.upstream_rq_time`` HISTOGRAM, label ``envoy.cluster_name``, milliseconds, Envoy's
    default bounds 0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, ... 3600000, no +Inf
    bucket (``sample_count`` includes values above the last bound). Only requests that got an
    upstream response are in it, so Envoy's own 503/504s are counted but not timed.

  (``cluster.external.*`` / ``cluster.internal.*`` / ``cluster.upstream_rq`` with
  ``envoy.response_code`` split the same requests further and are ignored.)
* ``report_counters_as_deltas: true``: counter values are the increase since the previous flush
  (0 when unchanged). Envoy latches them at every flush whether or not the stream is up, so
  increments flushed while the stream is down (control plane restarting) are lost; the first
  message of a new stream holds only the latest flush interval. With ``false`` they are totals
  since Envoy started (:class:`MetricsSink` handles both: ``counters_as_deltas``).
* Histograms (``histogram_emit_mode: HISTOGRAM``) cover only the flush interval in *both*
  counter modes (Envoy's interval statistics): ``sample_count`` and each bucket's
  ``cumulative_count`` count the samples of that interval (cumulative over the buckets, as
  Prometheus defines it, not over time). They are summed as they arrive.

Aggregation model
-----------------
The sink turns every report into non-negative increments and adds them to monotonic totals per
(node id, cluster). ``snapshot()`` copies those totals (cheap: the values are immutable and
shared); ``since(snapshot, cluster)`` subtracts it from the current totals (or from a later
snapshot) and sums over the proxies. So proxies reporting at different moments need no
alignment: each report counts in the window during which it arrived, which blurs a window's
edges by up to one flush interval per proxy. In cumulative mode a counter that goes down means
Envoy restarted, and the new value is the increment; the first report of a node the sink has
never seen only sets the baseline (its history since Envoy started is not attributed to any
window). Totals of proxies gone for longer than ``retention`` are dropped.

p99 (any quantile) from the merged histogram of the window, the way Prometheus'
``histogram_quantile`` does it: find the bucket holding the rank ``q * count`` and interpolate
linearly between its lower and upper bound (the first bucket's lower bound is 0). A rank beyond
the last finite bound (the +Inf bucket) yields that bound, a lower bound of the truth. Histograms
with different bounds merge on the union of bounds, each reading its cumulative count at the
largest own bound not above the merged bound (an underestimate, so quantiles err high).

Cost: Envoy sends every used stat every flush, about 3 KB per used cluster (the first message
of a stream, with all gauges and histograms, 70-80 KB for a small config). The handler's
deserializer (:func:`decode_stream_message`) scans the message's top-level fields and parses
only the three families above; the whole receive path then takes about 30 us per cluster with
traffic per flush (6 ms for a proxy with 200 busy clusters), on the event loop. For large fleets
raise ``stats_flush_seconds`` in the bootstrap. A control plane without this service answers
UNIMPLEMENTED: Envoy retries at every flush, logs nothing at info level, and ADS is unaffected.

The gRPC handler (:func:`add_metrics_service`) is a thin shell; parsing and aggregation are
pure and take a clock, so they are unit-tested without processes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterable, Iterator, Mapping

import grpc
from envoy.config.core.v3 import base_pb2  # noqa: F401  (puts base.proto into the default pool)
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

log = logging.getLogger(__name__)

SERVICE_NAME = "envoy.service.metrics.v3.MetricsService"
METHOD_NAME = "StreamMetrics"

REQUESTS_METRIC = "cluster.upstream_rq_completed"
CODE_CLASS_METRIC = "cluster.upstream_rq_xx"
LATENCY_METRIC = "cluster.upstream_rq_time"
CLUSTER_LABELS = ("envoy.cluster_name", "envoy_cluster_name")
CODE_CLASS_LABELS = ("envoy.response_code_class", "envoy_response_code_class")
_WANTED = frozenset((REQUESTS_METRIC, CODE_CLASS_METRIC, LATENCY_METRIC))

# --------------------------------------------------------------------------------------------
# Message classes, built at runtime
# --------------------------------------------------------------------------------------------

_PROMETHEUS_PACKAGE = "io.prometheus.client"
_PROMETHEUS_FILE = "io/prometheus/client/metrics.proto"
_METRICS_PACKAGE = "envoy.service.metrics.v3"
_METRICS_FILE = "envoy/service/metrics/v3/metrics_service.proto"
_NODE_FILE = "envoy/config/core/v3/base.proto"

_F = descriptor_pb2.FieldDescriptorProto
_OPTIONAL, _REPEATED = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED
_SCALARS = {"string": _F.TYPE_STRING, "double": _F.TYPE_DOUBLE, "uint64": _F.TYPE_UINT64, "int64": _F.TYPE_INT64}


def _message(file: descriptor_pb2.FileDescriptorProto | descriptor_pb2.DescriptorProto, name: str,
             fields: Iterable[tuple[str, int, str, bool]] = (), *, nested: bool = False) -> descriptor_pb2.DescriptorProto:
    """Add message ``name`` with ``(field name, number, type, repeated)`` fields; a type that is
    not a scalar name is a fully qualified message or enum name (with the leading dot)."""
    container = file.nested_type if nested else file.message_type  # type: ignore[union-attr]
    message = container.add(name=name)
    for field_name, number, type_name, repeated in fields:
        f = message.field.add(name=field_name, number=number, label=_REPEATED if repeated else _OPTIONAL)
        if type_name in _SCALARS:
            f.type = _SCALARS[type_name]
        elif type_name.endswith("MetricType"):
            f.type, f.type_name = _F.TYPE_ENUM, type_name
        else:
            f.type, f.type_name = _F.TYPE_MESSAGE, type_name
    return message


def prometheus_file() -> descriptor_pb2.FileDescriptorProto:
    """``io/prometheus/client/metrics.proto`` (prometheus/client_model), the fields Envoy fills."""
    p = "." + _PROMETHEUS_PACKAGE + "."
    file = descriptor_pb2.FileDescriptorProto(name=_PROMETHEUS_FILE, package=_PROMETHEUS_PACKAGE, syntax="proto2")
    enum = file.enum_type.add(name="MetricType")
    for number, name in enumerate(("COUNTER", "GAUGE", "SUMMARY", "UNTYPED", "HISTOGRAM", "GAUGE_HISTOGRAM")):
        enum.value.add(name=name, number=number)
    _message(file, "LabelPair", [("name", 1, "string", False), ("value", 2, "string", False)])
    _message(file, "Gauge", [("value", 1, "double", False)])
    _message(file, "Counter", [("value", 1, "double", False)])
    _message(file, "Quantile", [("quantile", 1, "double", False), ("value", 2, "double", False)])
    _message(file, "Summary", [("sample_count", 1, "uint64", False), ("sample_sum", 2, "double", False),
                               ("quantile", 3, p + "Quantile", True)])
    _message(file, "Untyped", [("value", 1, "double", False)])
    _message(file, "Histogram", [("sample_count", 1, "uint64", False), ("sample_count_float", 9, "double", False),
                                 ("sample_sum", 2, "double", False), ("bucket", 3, p + "Bucket", True)])
    _message(file, "Bucket", [("cumulative_count", 1, "uint64", False), ("cumulative_count_float", 4, "double", False),
                              ("upper_bound", 2, "double", False)])
    _message(file, "Metric", [("label", 1, p + "LabelPair", True), ("gauge", 2, p + "Gauge", False),
                              ("counter", 3, p + "Counter", False), ("summary", 4, p + "Summary", False),
                              ("untyped", 5, p + "Untyped", False), ("histogram", 7, p + "Histogram", False),
                              ("timestamp_ms", 6, "int64", False)])
    _message(file, "MetricFamily", [("name", 1, "string", False), ("help", 2, "string", False),
                                    ("type", 3, p + "MetricType", False), ("metric", 4, p + "Metric", True)])
    return file


def metrics_service_file(prometheus_file_name: str = _PROMETHEUS_FILE) -> descriptor_pb2.FileDescriptorProto:
    """``envoy/service/metrics/v3/metrics_service.proto`` (without its validation annotations)."""
    m = "." + _METRICS_PACKAGE + "."
    file = descriptor_pb2.FileDescriptorProto(name=_METRICS_FILE, package=_METRICS_PACKAGE, syntax="proto3",
                                              dependency=[_NODE_FILE, prometheus_file_name])
    _message(file, "StreamMetricsResponse")
    message = _message(file, "StreamMetricsMessage", [
        ("identifier", 1, m + "StreamMetricsMessage.Identifier", False),
        ("envoy_metrics", 2, "." + _PROMETHEUS_PACKAGE + ".MetricFamily", True),
    ])
    _message(message, "Identifier", [("node", 1, ".envoy.config.core.v3.Node", False)], nested=True)
    service = file.service.add(name="MetricsService")
    service.method.add(name=METHOD_NAME, input_type=m + "StreamMetricsMessage", output_type=m + "StreamMetricsResponse",
                       client_streaming=True)
    return file


def _ensure_messages(pool: Any) -> None:
    """Add our files to ``pool`` unless it already defines their messages."""
    try:
        family = pool.FindMessageTypeByName(_PROMETHEUS_PACKAGE + ".MetricFamily")
    except KeyError:
        pool.AddSerializedFile(prometheus_file().SerializeToString())
        family = pool.FindMessageTypeByName(_PROMETHEUS_PACKAGE + ".MetricFamily")
    try:
        pool.FindMessageTypeByName(_METRICS_PACKAGE + ".StreamMetricsMessage")
    except KeyError:
        pool.AddSerializedFile(metrics_service_file(family.file.name).SerializeToString())


def _class(name: str) -> Any:
    return message_factory.GetMessageClass(descriptor_pool.Default().FindMessageTypeByName(name))


_ensure_messages(descriptor_pool.Default())
StreamMetricsMessage: Any = _class(_METRICS_PACKAGE + ".StreamMetricsMessage")
StreamMetricsResponse: Any = _class(_METRICS_PACKAGE + ".StreamMetricsResponse")
MetricFamily: Any = _class(_PROMETHEUS_PACKAGE + ".MetricFamily")
Metric: Any = _class(_PROMETHEUS_PACKAGE + ".Metric")
METRIC_TYPE: Any = descriptor_pool.Default().FindEnumTypeByName(_PROMETHEUS_PACKAGE + ".MetricType")

# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Histogram:
    """Prometheus-style: ``cumulative[i]`` samples were <= ``bounds[i]`` (ascending); ``count``
    is all samples, including those above the last bound; ``total`` their sum."""

    bounds: tuple[float, ...] = ()
    cumulative: tuple[int, ...] = ()
    count: int = 0
    total: float = 0.0

    def __post_init__(self) -> None:
        if len(self.bounds) != len(self.cumulative):
            raise ValueError("bounds and cumulative counts differ in length")

    def __add__(self, other: Histogram) -> Histogram:
        if not other.count and not any(other.cumulative):
            return self
        if not self.count and not any(self.cumulative):
            return other
        if self.bounds == other.bounds:
            bounds = self.bounds
            cumulative = tuple(a + b for a, b in zip(self.cumulative, other.cumulative))
        else:
            bounds = tuple(sorted(set(self.bounds) | set(other.bounds)))
            cumulative = tuple(self._at(b) + other._at(b) for b in bounds)
        return Histogram(bounds, cumulative, self.count + other.count, self.total + other.total)

    def __sub__(self, other: Histogram) -> Histogram:
        """The samples added since ``other`` (an earlier state of the same totals)."""
        if self.bounds == other.bounds:
            cumulative = tuple(max(0, a - b) for a, b in zip(self.cumulative, other.cumulative))
        else:
            cumulative = tuple(max(0, c - other._at(b)) for b, c in zip(self.bounds, self.cumulative))
        return Histogram(self.bounds, cumulative, max(0, self.count - other.count), max(0.0, self.total - other.total))

    def _at(self, bound: float) -> int:
        """Samples <= ``bound`` as far as our bounds tell (those at the largest bound <= it)."""
        value = 0
        for b, c in zip(self.bounds, self.cumulative):
            if b > bound:
                break
            value = c
        return value

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile (0 <= q <= 1), interpolated linearly within its bucket; None if
        there are no samples. See the module docstring."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be within [0, 1], got {q}")
        count = max(self.count, self.cumulative[-1] if self.cumulative else 0)
        if count <= 0:
            return None
        rank = q * count
        lower, below = 0.0, 0
        for bound, cumulative in zip(self.bounds, self.cumulative):
            if cumulative >= rank and cumulative > below:
                return lower + (bound - lower) * (rank - below) / (cumulative - below)
            lower, below = bound, cumulative
        return self.bounds[-1] if self.bounds else None  # in the +Inf bucket

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None


EMPTY_HISTOGRAM = Histogram()


@dataclass(frozen=True)
class ClusterReport:
    """What one message says about one cluster (increments or totals, depending on the mode).
    None: the message did not carry that stat."""

    requests: float | None = None
    errors: float | None = None
    latency: Histogram | None = None


@dataclass(frozen=True)
class Totals:
    """Monotonic sums of one proxy's increments for one cluster, and when it last reported."""

    requests: int = 0
    errors: int = 0
    latency: Histogram = EMPTY_HISTOGRAM
    last_seq: int = 0  # the sink's message sequence number of the latest report
    last_at: float = 0.0


@dataclass(frozen=True)
class Snapshot:
    """The sink's totals at one moment; pass it to :meth:`MetricsSink.since`."""

    seq: int
    taken_at: float
    totals: Mapping[str, Mapping[str, Totals]]  # cluster -> node id -> totals (do not mutate)


@dataclass(frozen=True)
class WindowStats(Mapping[str, Any]):
    """One cluster (or several, merged) between two snapshots, over all proxies.

    ``error_rate`` is ``errors / requests`` (None without requests); ``p99_ms`` is the
    interpolated 99th percentile of upstream latency (None without timed requests);
    ``proxies`` are the node ids that reported these clusters during the window (with or
    without traffic). Also a read-only mapping of :meth:`as_dict`'s JSON-ready keys
    (``dict(stats)``, ``stats["error_rate"]``)."""

    clusters: tuple[str, ...]
    requests: int
    errors: int
    latency: Histogram
    proxies: tuple[str, ...]
    seconds: float

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    @property
    def p99_ms(self) -> float | None:
        return self.latency.quantile(0.99)

    def quantile_ms(self, q: float) -> float | None:
        return self.latency.quantile(q)

    @property
    def requests_per_second(self) -> float | None:
        return self.requests / self.seconds if self.seconds > 0 else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "clusters": list(self.clusters),
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": self.error_rate,
            "p99_ms": self.p99_ms,
            "mean_ms": self.latency.mean,
            "proxies": list(self.proxies),
            "seconds": self.seconds,
        }

    def __getitem__(self, key: str) -> Any:
        return self.as_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(_WINDOW_KEYS)

    def __len__(self) -> int:
        return len(_WINDOW_KEYS)


_WINDOW_KEYS = ("clusters", "requests", "errors", "error_rate", "p99_ms", "mean_ms", "proxies", "seconds")


# --------------------------------------------------------------------------------------------
# Parsing (pure)
# --------------------------------------------------------------------------------------------


def _label(metric: Any, names: tuple[str, ...]) -> str | None:
    for pair in metric.label:
        if pair.name in names:
            return str(pair.value)
    return None


def _scalar(metric: Any) -> float:
    if metric.HasField("counter"):
        return float(metric.counter.value)
    if metric.HasField("untyped"):
        return float(metric.untyped.value)
    return float(metric.gauge.value)


_GOOD_BOUNDS: dict[tuple[float, ...], bool] = {}  # bounds seen -> ascending and finite (there are few)


def _histogram(metric: Any) -> Histogram | None:
    """The histogram of ``metric``; None if it holds no samples (most of them, most of the time)."""
    h = metric.histogram
    as_float = h.sample_count_float > 0
    count = int(h.sample_count_float) if as_float else h.sample_count
    if not count:
        return None
    buckets = h.bucket
    bounds = tuple([b.upper_bound for b in buckets])
    if as_float:
        cumulative = tuple([int(b.cumulative_count_float) for b in buckets])
    else:
        cumulative = tuple([b.cumulative_count for b in buckets])
    good = _GOOD_BOUNDS.get(bounds)
    if good is None:
        good = all(a < b for a, b in zip(bounds, bounds[1:])) and all(math.isfinite(b) for b in bounds)
        if len(_GOOD_BOUNDS) < 64:
            _GOOD_BOUNDS[bounds] = good
    if not good:  # unsorted, or with a +Inf bucket: sort, drop the infinite bound
        pairs = sorted((b, c) for b, c in zip(bounds, cumulative) if math.isfinite(b))
        bounds, cumulative = tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
    return Histogram(bounds, cumulative, count, h.sample_sum)


def parse_families(families: Iterable[Any]) -> dict[str, ClusterReport]:
    """Per cluster name, the figures in ``families`` (``io.prometheus.client.MetricFamily``
    messages as Envoy sends them with ``emit_tags_as_labels``). Other stats are skipped."""
    found: dict[str, dict[str, Any]] = {}
    for family in families:
        name = family.name
        if name not in _WANTED:
            continue
        for metric in family.metric:
            cluster = _label(metric, CLUSTER_LABELS)
            if cluster is None:
                continue
            entry = found.setdefault(cluster, {})
            if name == REQUESTS_METRIC:
                entry["requests"] = entry.get("requests", 0.0) + _scalar(metric)
            elif name == CODE_CLASS_METRIC:
                if _label(metric, CODE_CLASS_LABELS) == "5":
                    entry["errors"] = entry.get("errors", 0.0) + _scalar(metric)
            elif metric.HasField("histogram"):
                histogram = _histogram(metric)
                if histogram is not None:
                    entry["latency"] = entry.get("latency", EMPTY_HISTOGRAM) + histogram
    return {cluster: ClusterReport(**entry) for cluster, entry in found.items()}


@dataclass(frozen=True)
class Received:
    """A ``StreamMetricsMessage`` reduced to what the sink uses: the node id (first message of a
    stream only) and the metric families it reads."""

    node_id: str | None
    families: tuple[Any, ...]

    @classmethod
    def from_message(cls, message: Any) -> Received:
        node_id = message.identifier.node.id if message.HasField("identifier") else ""
        return cls(node_id or None, tuple(f for f in message.envoy_metrics if f.name in _WANTED))


_WANTED_BYTES = frozenset(name.encode() for name in _WANTED)
_Identifier: Any = _class(_METRICS_PACKAGE + ".StreamMetricsMessage.Identifier")


class _WireError(Exception):
    pass


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise _WireError
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _skip(data: bytes, pos: int, wire_type: int) -> int:
    if wire_type == 0:
        return _varint(data, pos)[1]
    if wire_type == 1:
        return pos + 8
    if wire_type == 2:
        length, pos = _varint(data, pos)
        return pos + length
    if wire_type == 5:
        return pos + 4
    raise _WireError  # groups: not used by these protos


def _family_name(data: bytes, start: int, end: int) -> bytes | None:
    pos = start
    while pos < end:
        tag, pos = _varint(data, pos)
        if tag == 0x0A:  # field 1 (name), length-delimited; Envoy writes it first
            length, pos = _varint(data, pos)
            return data[pos:pos + length]
        pos = _skip(data, pos, tag & 7)
    return None


def decode_stream_message(data: bytes) -> Received:
    """Deserialize a ``StreamMetricsMessage``, fully parsing only the families the sink reads.

    Envoy sends every used stat each flush (about 3 KB per used cluster and flush), nearly all
    of them of no interest here; scanning the top-level fields and parsing three families keeps
    the event loop's cost per message small. Falls back to a full parse on anything unexpected.
    """
    try:
        node_id: str | None = None
        families = []
        pos, end = 0, len(data)
        while pos < end:
            tag, pos = _varint(data, pos)
            if tag == 0x12 or tag == 0x0A:  # envoy_metrics (2) / identifier (1), length-delimited
                length, pos = _varint(data, pos)
                if pos + length > end:
                    raise _WireError
                if tag == 0x12:
                    if _family_name(data, pos, pos + length) in _WANTED_BYTES:
                        families.append(MetricFamily.FromString(data[pos:pos + length]))
                else:
                    node_id = _Identifier.FromString(data[pos:pos + length]).node.id or None
                pos += length
            else:
                pos = _skip(data, pos, tag & 7)
        if pos != end:
            raise _WireError
        return Received(node_id, tuple(families))
    except _WireError:
        return Received.from_message(StreamMetricsMessage.FromString(data))  # raises DecodeError if malformed


# --------------------------------------------------------------------------------------------
# Aggregation (pure; the clock is injected)
# --------------------------------------------------------------------------------------------


@dataclass
class _Stream:
    stream_id: int
    peer: str
    opened_at: float
    node_id: str | None = None
    messages: int = 0


@dataclass
class _Node:
    streams: set[int] = field(default_factory=set)
    last_at: float = 0.0
    last_seq: int = 0
    raw: dict[str, tuple[float, float]] = field(default_factory=dict)  # cumulative mode: last counter values


class MetricsSink:
    """Receives the metrics streams of all proxies and answers "what happened on cluster X
    between two moments, across all proxies" (see the module docstring).

    ``counters_as_deltas`` must match the proxies' ``report_counters_as_deltas``. In cumulative
    mode node ids must be unique per Envoy process (two live Envoys with one id would look like
    restarts); in delta mode their figures simply add up.
    Not thread-safe: use it from the event loop that runs the gRPC server."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, counters_as_deltas: bool = True,
                 retention: float = 3600.0) -> None:
        self._clock = clock
        self.counters_as_deltas = counters_as_deltas
        self.retention = retention
        self._ids = itertools.count(1)
        self._seq = 0
        self._streams: dict[int, _Stream] = {}
        self._nodes: dict[str, _Node] = {}
        self._totals: dict[str, dict[str, Totals]] = {}  # cluster -> node id -> totals
        self._next_prune = clock() + retention
        self._waiters: list[asyncio.Future[None]] = []

    # -- streams (called by the gRPC handler) ------------------------------------------------

    def open_stream(self, peer: str = "") -> int:
        stream_id = next(self._ids)
        self._streams[stream_id] = _Stream(stream_id, peer, self._clock())
        return stream_id

    def receive(self, stream_id: int, message: Any) -> None:
        """One message of stream ``stream_id``: a :class:`Received` or a ``StreamMetricsMessage``."""
        if not isinstance(message, Received):
            message = Received.from_message(message)
        stream = self._streams[stream_id]
        stream.messages += 1
        if message.node_id:
            node_id = message.node_id
            if stream.node_id is not None and stream.node_id != node_id and stream.node_id in self._nodes:
                self._nodes[stream.node_id].streams.discard(stream_id)
            stream.node_id = node_id
            self._nodes.setdefault(node_id, _Node()).streams.add(stream_id)
        if stream.node_id is None:
            # Envoy identifies itself in the first message; without it we cannot tell proxies apart.
            stream.node_id = f"unidentified:{stream.peer or '?'}:{stream_id}"
            log.warning("metrics stream %s from %s did not identify its node", stream_id, stream.peer)
            self._nodes.setdefault(stream.node_id, _Node()).streams.add(stream_id)
        self.record(stream.node_id, parse_families(message.families))

    def close_stream(self, stream_id: int) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is not None and stream.node_id is not None and stream.node_id in self._nodes:
            self._nodes[stream.node_id].streams.discard(stream_id)

    # -- the core ------------------------------------------------------------------------------

    def record(self, node_id: str, reports: Mapping[str, ClusterReport]) -> None:
        """Add one flush of ``node_id`` (per cluster) to the totals."""
        now = self._clock()
        self._seq += 1
        node = self._nodes.get(node_id)
        if node is None:
            node = self._nodes[node_id] = _Node()
        first_sight = node.last_seq == 0
        node.last_at, node.last_seq = now, self._seq
        for cluster, report in reports.items():
            requests, errors = self._increments(node, cluster, report, first_sight)
            per_node = self._totals.setdefault(cluster, {})
            old = per_node.get(node_id) or Totals()
            latency = old.latency + report.latency if report.latency is not None else old.latency
            per_node[node_id] = Totals(old.requests + requests, old.errors + errors, latency, self._seq, now)
        if now >= self._next_prune:
            self.prune()
        self._wake()

    def _increments(self, node: _Node, cluster: str, report: ClusterReport, first_sight: bool) -> tuple[int, int]:
        if self.counters_as_deltas:
            return max(0, round(report.requests or 0)), max(0, round(report.errors or 0))
        previous = node.raw.get(cluster)
        current = (
            report.requests if report.requests is not None else (previous[0] if previous else 0.0),
            report.errors if report.errors is not None else (previous[1] if previous else 0.0),
        )
        node.raw[cluster] = current
        if previous is None:
            # A cluster new to a node we know started from zero since its last report; a node
            # we have never seen brings its whole history, which belongs to no window.
            return (0, 0) if first_sight else (round(current[0]), round(current[1]))
        if current[0] < previous[0] or current[1] < previous[1]:
            return round(current[0]), round(current[1])  # went down: Envoy restarted
        return round(current[0] - previous[0]), round(current[1] - previous[1])

    def prune(self) -> None:
        """Forget proxies without an open stream that have not reported for ``retention`` s."""
        now = self._clock()
        self._next_prune = now + self.retention / 10
        gone = {n for n, node in self._nodes.items() if not node.streams and now - node.last_at > self.retention}
        if not gone:
            return
        for node_id in gone:
            del self._nodes[node_id]
        for cluster in list(self._totals):
            per_node = {n: t for n, t in self._totals[cluster].items() if n not in gone}
            if per_node:
                self._totals[cluster] = per_node
            else:
                del self._totals[cluster]

    # -- queries -----------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        return Snapshot(self._seq, self._clock(), {c: dict(per_node) for c, per_node in self._totals.items()})

    def since(self, start: Snapshot, cluster: str, *, until: Snapshot | None = None) -> WindowStats:
        """Figures of ``cluster`` from ``start`` to ``until`` (default: now), all proxies."""
        return self.since_many(start, (cluster,), until=until)

    def since_many(self, start: Snapshot, clusters: Iterable[str], *, until: Snapshot | None = None) -> WindowStats:
        """Like :meth:`since`, with the figures of several clusters added up."""
        end_totals: Mapping[str, Mapping[str, Totals]] = until.totals if until is not None else self._totals
        end_at = until.taken_at if until is not None else self._clock()
        names = tuple(dict.fromkeys(clusters))
        requests = errors = 0
        latency = EMPTY_HISTOGRAM
        proxies: set[str] = set()
        for cluster in names:
            before = start.totals.get(cluster, {})
            for node_id, now in end_totals.get(cluster, {}).items():
                then = before.get(node_id)
                if then is not None and now.last_seq == then.last_seq:
                    continue
                proxies.add(node_id)
                if then is None or now.requests < then.requests or now.errors < then.errors or now.latency.count < then.latency.count:
                    then = Totals()  # new since the snapshot, or forgotten and back: all of it is new
                requests += now.requests - then.requests
                errors += now.errors - then.errors
                latency = latency + (now.latency - then.latency)
        return WindowStats(names, requests, errors, latency, tuple(sorted(proxies)), max(0.0, end_at - start.taken_at))

    def window(self, start: Snapshot, clusters: Iterable[str], *, until: Snapshot | None = None) -> dict[str, WindowStats]:
        """:meth:`since` for each of ``clusters``."""
        return {c: self.since(start, c, until=until) for c in clusters}

    def clusters(self) -> list[str]:
        return sorted(self._totals)

    def connected(self) -> dict[str, int]:
        """Node id -> open metrics streams, for proxies with at least one."""
        return {n: len(node.streams) for n, node in self._nodes.items() if node.streams}

    def reported_since(self, start: Snapshot) -> set[str]:
        """Node ids that sent at least one message after ``start`` was taken."""
        return {n for n, node in self._nodes.items() if node.last_seq > start.seq}

    async def wait_reports(self, start: Snapshot, timeout: float) -> set[str]:
        """Wait until every proxy with an open stream has reported after ``start`` (so the
        figures include everything each proxy counted until then); return the node ids still
        missing when ``timeout`` s ran out (empty: all reported)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            missing = set(self.connected()) - self.reported_since(start)
            remaining = deadline - loop.time()
            if not missing or remaining <= 0:
                return missing
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait({waiter}, timeout=remaining)
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


# --------------------------------------------------------------------------------------------
# gRPC
# --------------------------------------------------------------------------------------------


def add_metrics_service(server: grpc.aio.Server, sink: MetricsSink) -> None:
    """Serve ``envoy.service.metrics.v3.MetricsService/StreamMetrics`` into ``sink``."""

    async def stream_metrics(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        stream_id = sink.open_stream(context.peer())
        failed = False
        try:
            async for message in requests:
                try:
                    sink.receive(stream_id, message)
                except Exception:  # a bad message must not end the stream (nor the process)
                    if not failed:
                        log.exception("metrics stream %s: cannot use a message (further errors not logged)", stream_id)
                    failed = True
        finally:
            sink.close_stream(stream_id)
        return StreamMetricsResponse()

    handler = grpc.stream_unary_rpc_method_handler(
        stream_metrics,
        request_deserializer=decode_stream_message,
        response_serializer=StreamMetricsResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, {METHOD_NAME: handler}),))
