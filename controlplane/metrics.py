"""Prometheus metrics. One registry per control-plane instance (tests run several in a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .typeurls import PUSH_ORDER

# From sub-millisecond (one push on loopback) to the seconds a slow fleet might take.
CONVERGENCE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.traffic_weight = Gauge(
            "bluegreen_traffic_weight", "Share of production traffic (percent) routed to an environment",
            ["service", "environment"], registry=r,
        )
        self.connected_proxies = Gauge(
            "bluegreen_xds_connected_proxies", "ADS streams open, per fleet", ["fleet"], registry=r
        )
        self.converged_proxies = Gauge(
            "bluegreen_xds_converged_proxies", "ADS streams holding the fleet's current configuration", ["fleet"], registry=r
        )
        self.lagging_proxies = Gauge(
            "bluegreen_xds_lagging_proxies",
            "Connected proxies that have not converged within the grace period (lagging_after_seconds); gates do not wait for them",
            ["fleet"], registry=r,
        )
        self.responses = Counter(
            "bluegreen_xds_responses_total", "xDS responses sent", ["type_url"], registry=r
        )
        self.response_bytes = Counter(
            "bluegreen_xds_response_bytes_total", "Bytes of xDS responses sent", ["type_url"], registry=r
        )
        self.nacks = Counter(
            "bluegreen_xds_nacks_total", "xDS responses rejected (NACKed) by a proxy", ["type_url"], registry=r
        )
        for type_url in PUSH_ORDER:  # at 0 from the start: the first NACK is an increase alerts can see
            self.nacks.labels(type_url)
            self.responses.labels(type_url)
            self.response_bytes.labels(type_url)
        self.proxy_rejecting = Gauge(
            "bluegreen_xds_proxy_rejected_config",
            "1 while a proxy's last answer for a type was a NACK not yet followed by an ACK",
            ["node_id", "fleet", "type_url"], registry=r,
        )
        self.convergence = Histogram(
            "bluegreen_convergence_seconds",
            "From a change accepted by the control plane to the last connected proxy of the fleet ACKing it",
            ["fleet"], buckets=CONVERGENCE_BUCKETS, registry=r,
        )
        self.leader = Gauge("bluegreen_leader", "1 on the replica that runs the deployment workflow (the leader)", registry=r)
        self.replicas = Gauge("bluegreen_replicas", "Control-plane replicas registered in the store (1 without etcd)", registry=r)
        self.fleet_proxies = Gauge(
            "bluegreen_fleet_proxies", "Proxies of the fleet connected to any replica (with etcd; shared through it)", ["fleet"], registry=r
        )
        self.fleet_converged_proxies = Gauge(
            "bluegreen_fleet_converged_proxies", "Proxies of the fleet, on any replica, holding their replica's current configuration (with etcd)",
            ["fleet"], registry=r,
        )
        self.generation = Gauge(
            "bluegreen_snapshot_generation", "Store revision of the configuration published to a fleet", ["fleet"], registry=r
        )
        self.snapshot_build = Histogram(
            "bluegreen_snapshot_build_seconds", "Time to build and serialize all fleets' snapshots after a change",
            buckets=CONVERGENCE_BUCKETS, registry=r,
        )
        self.deployment_phase = Gauge(
            "bluegreen_deployment_phase", "1 for the phase the service's deployment is in (idle when none runs)",
            ["service", "phase"], registry=r,
        )
        self.deployments = Counter(
            "bluegreen_deployments_total", "Deployments that ended, by result (succeeded, failed, rolled_back)",
            ["service", "result"], registry=r,
        )
        self.rollbacks = Counter(
            "bluegreen_rollbacks_total", "Rollbacks of deployments, by who decided (automatic analysis or api)",
            ["service", "reason"], registry=r,
        )
        self.cutover = Histogram(
            "bluegreen_cutover_seconds", "From the start of a deployment's shift to every proxy holding 100 % on the new environment",
            ["service"], buckets=CONVERGENCE_BUCKETS + (60.0, 300.0, 900.0, 3600.0), registry=r,
        )
        self.analysis_error_rate = Gauge(
            "bluegreen_analysis_error_rate", "5xx share of the environment's requests in the last analysis interval",
            ["service", "environment"], registry=r,
        )
        self.analysis_p99_ms = Gauge(
            "bluegreen_analysis_p99_ms", "p99 upstream latency (ms) of the environment in the last analysis interval",
            ["service", "environment"], registry=r,
        )
        self.streams_refused = Counter(
            "bluegreen_xds_streams_refused_total",
            "gRPC streams (ADS and metrics) refused: fleet_not_allowed (certificate identity not in the fleet's "
            "identities), streams_total or streams_per_identity (caps)",
            ["reason"], registry=r,
        )
        self.telemetry_dropped = Counter(
            "bluegreen_telemetry_dropped_total",
            "Metrics-service reports (or parts) not used for analysis, by reason: unauthenticated, node_mismatch, "
            "foreign_cluster, future_timestamp, absurd_rate, negative_value, malformed",
            ["reason"], registry=r,
        )
        self.notifications = Counter(
            "bluegreen_notifications_total",
            "Deployment event notifications (webhooks) sent, by result: delivered (2xx) or failed (an attempt; retried)",
            ["result"], registry=r,
        )
        for result in ("delivered", "failed"):
            self.notifications.labels(result)
        self.endpoint_source_errors = Counter(
            "bluegreen_endpoint_source_errors_total",
            "Endpoint source rounds that failed (unreadable or invalid file, DNS lookup failed); the last good endpoints stay",
            ["source"], registry=r,
        )
        self.endpoint_source_updates = Counter(
            "bluegreen_endpoint_source_updates_total",
            "Endpoint sets an endpoint source wrote to the store (a changed set of endpoints)", ["source"], registry=r,
        )
        self.scale_hook_calls = Counter(
            "bluegreen_scale_hook_calls_total",
            "Scale hook calls (webhooks and commands) of deployments' capacity guard, by result: ok or failed",
            ["result"], registry=r,
        )
        for result in ("ok", "failed"):
            self.scale_hook_calls.labels(result)
        self.workers_ready = Gauge(
            "bluegreen_xds_workers_ready", "xDS worker processes serving on the xDS port (docs/workers.md; 0 without workers)",
            registry=r,
        )
        self.worker_restarts = Counter(
            "bluegreen_xds_worker_restarts_total", "xDS worker processes restarted after they died (docs/workers.md)", registry=r,
        )
        self.notifications_pending = Gauge(
            "bluegreen_notifications_pending", "Notifications in the outbox, not yet delivered", registry=r,
        )
