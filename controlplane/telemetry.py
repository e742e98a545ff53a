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
they use: they are in ``protos/`` and compiled by ``protos/generate.py`` (grpcio-tools) into
``controlplane/_protos/``, whose Node is xds-protos' own ``envoy.config.core.v3.Node``.

Which reports are believed
--------------------------
With mTLS on the xDS port, a report counts only if the metrics stream's client certificate is
that of an open ADS stream of the node it names, and only for clusters of that node's fleet
(``fleet/telemetry_auth.py``); anything else is dropped and counted
(``bluegreen_telemetry_dropped_total{reason}``: ``unauthenticated``, ``node_mismatch``,
``foreign_cluster``). Implausible figures are dropped too, whatever the transport: negative or
non-finite values, metrics timestamped more than ``MAX_CLOCK_SKEW_SECONDS`` ahead of our
clock, and increments above ``MAX_REQUESTS_PER_SECOND`` times the seconds since the node's
previous report (``negative_value``, ``malformed``, ``future_timestamp``, ``absurd_rate``).
Without mTLS every well-formed, plausible report is believed, as anything on the network can
reach the port.

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
deserializer (:func:`decode_stream_message`) parses the whole message with the compiled class
(upb) and keeps the three families above; this runs on the event loop, so for large fleets
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
from typing import Any, AsyncIterator, Callable, Container, Iterable, Iterator, Mapping

import grpc

from ._protos.envoy.service.metrics.v3 import metrics_service_pb2
from ._protos.io.prometheus.client import metrics_pb2
from .xds.peer import PeerIdentity, StreamLimiter

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
# Message classes: compiled from protos/ (see protos/generate.py)
# --------------------------------------------------------------------------------------------

StreamMetricsMessage = metrics_service_pb2.StreamMetricsMessage
StreamMetricsResponse = metrics_service_pb2.StreamMetricsResponse
MetricFamily = metrics_pb2.MetricFamily
Metric = metrics_pb2.Metric
METRIC_TYPE = metrics_pb2.MetricType.DESCRIPTOR

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


def parse_families(families: Iterable[Any], *, not_after_ms: float | None = None,
                   dropped: dict[str, int] | None = None) -> dict[str, ClusterReport]:
    """Per cluster name, the figures in ``families`` (``io.prometheus.client.MetricFamily``
    messages as Envoy sends them with ``emit_tags_as_labels``). Other stats are skipped.

    Implausible metrics are left out and counted in ``dropped`` by reason: a value that is
    negative (``negative_value``) or not finite (``malformed``), or a ``timestamp_ms`` later
    than ``not_after_ms`` (``future_timestamp``)."""
    found: dict[str, dict[str, Any]] = {}
    for family in families:
        name = family.name
        if name not in _WANTED:
            continue
        for metric in family.metric:
            cluster = _label(metric, CLUSTER_LABELS)
            if cluster is None:
                continue
            if not_after_ms is not None and metric.timestamp_ms > not_after_ms:
                _count(dropped, "future_timestamp")
                continue
            entry = found.setdefault(cluster, {})
            if name == REQUESTS_METRIC or name == CODE_CLASS_METRIC:
                if name == CODE_CLASS_METRIC and _label(metric, CODE_CLASS_LABELS) != "5":
                    continue
                value = _scalar(metric)
                problem = _implausible(value)
                if problem is not None:
                    _count(dropped, problem)
                    continue
                key = "requests" if name == REQUESTS_METRIC else "errors"
                entry[key] = entry.get(key, 0.0) + value
            elif metric.HasField("histogram"):
                problem = _implausible(metric.histogram.sample_sum)
                if problem is not None:
                    _count(dropped, problem)
                    continue
                histogram = _histogram(metric)
                if histogram is not None:
                    entry["latency"] = entry.get("latency", EMPTY_HISTOGRAM) + histogram
    return {cluster: ClusterReport(**entry) for cluster, entry in found.items()}


def _implausible(value: float) -> str | None:
    if not math.isfinite(value):
        return "malformed"
    if value < 0:
        return "negative_value"
    return None


def _count(dropped: dict[str, int] | None, reason: str, n: int = 1) -> None:
    if dropped is not None:
        dropped[reason] = dropped.get(reason, 0) + n


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


def decode_stream_message(data: bytes) -> Received:
    """Deserialize a ``StreamMetricsMessage`` (the compiled class; raises DecodeError if
    malformed) and keep the families the sink reads."""
    return Received.from_message(StreamMetricsMessage.FromString(data))


# --------------------------------------------------------------------------------------------
# Aggregation (pure; the clock is injected)
# --------------------------------------------------------------------------------------------


# Who may report what: (node id claimed, the stream's transport identity) -> (drop reason or
# None, the cluster names the node may report or None for any). See fleet/telemetry_auth.py.
Authorizer = Callable[[str, "PeerIdentity | None"], tuple["str | None", "Container[str] | None"]]

# Plausibility bounds. A proxy serving more than this many requests per second (per cluster)
# is not one we run: such a figure is a forgery or a bug, and must not decide a rollback.
MAX_REQUESTS_PER_SECOND = 10_000_000
# How far a metric's timestamp may be ahead of our clock (clock skew between hosts).
MAX_CLOCK_SKEW_SECONDS = 60.0


@dataclass
class _Stream:
    stream_id: int
    peer: str
    opened_at: float
    node_id: str | None = None
    messages: int = 0
    identity: PeerIdentity | None = None


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
                 retention: float = 3600.0, wall_clock: Callable[[], float] = time.time,
                 authorize: Authorizer | None = None, on_dropped: Callable[[str, int], None] | None = None) -> None:
        """``authorize`` decides which node's reports each stream may make (None: all);
        ``on_dropped(reason, n)`` is told of every report part left out (see :attr:`dropped`)."""
        self._clock = clock
        self._wall_clock = wall_clock
        self._authorize = authorize
        self._on_dropped = on_dropped
        self.dropped: dict[str, int] = {}  # reason -> report parts left out (see _drop)
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

    def open_stream(self, peer: str = "", identity: PeerIdentity | None = None) -> int:
        """A new metrics stream from gRPC peer ``peer``, whose transport identity is ``identity``."""
        stream_id = next(self._ids)
        self._streams[stream_id] = _Stream(stream_id, peer, self._clock(), identity=identity)
        return stream_id

    def receive(self, stream_id: int, message: Any) -> None:
        """One message of stream ``stream_id``: a :class:`Received` or a ``StreamMetricsMessage``.

        With an authorizer, a message for a node the stream may not speak for is dropped whole
        (reason from the authorizer), and clusters outside the node's allowed set are left out
        (``foreign_cluster``); implausible figures are left out too (see :meth:`record`)."""
        if not isinstance(message, Received):
            message = Received.from_message(message)
        stream = self._streams[stream_id]
        stream.messages += 1
        allowed: Container[str] | None = None
        if self._authorize is not None:
            refused, allowed = self._authorize(message.node_id or stream.node_id or "", stream.identity)
            if refused is not None:
                self._drop(refused)
                return
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
        dropped: dict[str, int] = {}
        not_after_ms = (self._wall_clock() + MAX_CLOCK_SKEW_SECONDS) * 1000
        reports = parse_families(message.families, not_after_ms=not_after_ms, dropped=dropped)
        if allowed is not None:
            foreign = [cluster for cluster in reports if cluster not in allowed]
            for cluster in foreign:
                del reports[cluster]
            _count(dropped, "foreign_cluster", len(foreign)) if foreign else None
        for reason, n in dropped.items():
            self._drop(reason, n)
        self.record(stream.node_id, reports)

    def _drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n
        if self._on_dropped is not None:
            self._on_dropped(reason, n)

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
        # The most a proxy can have served since its previous report (at least 1 s of it).
        ceiling = MAX_REQUESTS_PER_SECOND * max(1.0, now - node.last_at if not first_sight else 1.0)
        node.last_at, node.last_seq = now, self._seq
        for cluster, report in reports.items():
            requests, errors = self._increments(node, cluster, report, first_sight)
            if max(requests, errors, report.latency.count if report.latency is not None else 0) > ceiling:
                self._drop("absurd_rate")
                continue
            per_node = self._totals.setdefault(cluster, {})
            old = per_node.get(node_id) or Totals()
            latency = old.latency + report.latency if report.latency is not None else old.latency
            per_node[node_id] = Totals(old.requests + requests, old.errors + errors, latency, self._seq, now)
        if now >= self._next_prune:
            self.prune()
        self._wake()

    def _increments(self, node: _Node, cluster: str, report: ClusterReport, first_sight: bool) -> tuple[int, int]:
        """Non-negative increments: parsing left out negative values; in cumulative mode a
        counter that went down (Envoy restarted) restarts the baseline at its new value."""
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


def add_metrics_service(server: grpc.aio.Server, sink: MetricsSink, limiter: StreamLimiter | None = None) -> None:
    """Serve ``envoy.service.metrics.v3.MetricsService/StreamMetrics`` into ``sink``. Streams
    count against ``limiter`` (shared with ADS): beyond a cap, RESOURCE_EXHAUSTED."""

    async def stream_metrics(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        identity = PeerIdentity.from_context(context)
        if limiter is not None:
            refusal = limiter.acquire(identity)
            if refusal is not None:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
        try:
            return await consume(requests, identity, context)
        finally:
            if limiter is not None:
                limiter.release(identity)

    async def consume(requests: AsyncIterator[Any], identity: PeerIdentity, context: grpc.aio.ServicerContext) -> Any:
        stream_id = sink.open_stream(context.peer(), identity)
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
