"""Session-wide fixtures: one real 3-member etcd cluster shared by every test that needs etcd
(started on first use, so a run without etcd tests never starts it)."""

from __future__ import annotations

from typing import Iterator

import pytest

from tests.etcd import EtcdCluster, run_etcd_cluster


@pytest.fixture(scope="session")
def etcd_cluster_session() -> Iterator[EtcdCluster]:
    with run_etcd_cluster(3) as cluster:
        yield cluster


@pytest.fixture
def etcd(etcd_cluster_session: EtcdCluster) -> EtcdCluster:
    """The shared cluster, every member running and healthy (a test that stopped one restarts it)."""
    etcd_cluster_session.ensure_all_running()
    return etcd_cluster_session
