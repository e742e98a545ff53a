"""Session-wide fixtures: one real 3-member etcd cluster shared by every test that needs etcd
(started on first use, so a run without etcd tests never starts it)."""

from __future__ import annotations

import os

# Before anything imports grpc: tests that run a grpc.aio server in this process (and start
# Envoy with the harness, whose preexec_fn makes Python fork rather than vfork) crashed the
# forked child in gRPC's fork handlers about one start in three ("Other threads are currently
# calling into gRPC, skipping fork() handlers", then SIGSEGV before exec). The child execs at
# once and needs no gRPC, so the handlers are off.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from typing import Iterator  # noqa: E402

import pytest  # noqa: E402

from tests.etcd import EtcdCluster, run_etcd_cluster  # noqa: E402


@pytest.fixture(scope="session")
def etcd_cluster_session() -> Iterator[EtcdCluster]:
    with run_etcd_cluster(3) as cluster:
        yield cluster


@pytest.fixture
def etcd(etcd_cluster_session: EtcdCluster) -> EtcdCluster:
    """The shared cluster, every member running and healthy (a test that stopped one restarts it)."""
    etcd_cluster_session.ensure_all_running()
    return etcd_cluster_session
