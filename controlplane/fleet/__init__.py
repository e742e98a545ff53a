"""The fleet layer: follows the store, builds one snapshot per fleet, hands it to the xDS
server, and tracks which proxy holds what.

    store ──watch──► Publisher ──► SnapshotBuilder ──snapshots──► xds.SnapshotCache
                                                                        │ callbacks
                                          Convergence (+ metrics) ◄─────┘
"""

from .builder import SnapshotBuilder, fleet_resolver, service_version
from .convergence import Convergence, FleetProgress
from .publisher import Publisher

__all__ = ["Convergence", "FleetProgress", "Publisher", "SnapshotBuilder", "fleet_resolver", "service_version"]
