"""The one exception tree of the control plane.

    BlueGreenError
     ├── ValidationError      bad input: a value the user gave is malformed or out of range (HTTP 400)
     ├── NotFoundError        a named service, environment, deployment or proxy does not exist (HTTP 404)
     ├── ConflictError        the request is valid but contradicts current state (HTTP 409)
     │    ├── RevisionConflict   a compare-and-set lost a race; callers normally retry (store layer)
     │    └── NotLeader          a fenced workflow write of a replica that is no longer the leader
     ├── ConfigError          the control plane's own configuration file is wrong (refuse to start)
     ├── StoreError           the state backend failed (disk full, I/O, corruption, state file in use by
     │                          another process); the message starts with the cause; nothing was changed (HTTP 503)
     └── MigrationError       a migration set is malformed, fails lint, or failed to apply
          └── ContractBlocked    contract refused: an environment that may need the old schema is still live

Lower-layer errors (sqlite3, yaml, grpc) are translated at the boundary with ``raise ... from exc``.
HTTP and exit-code mapping happens only at the edges (admin, cli).
"""

from __future__ import annotations


class BlueGreenError(Exception):
    """Base of every error this package raises on purpose."""


class ValidationError(BlueGreenError):
    """Input is malformed or out of range. The message names the field and the problem."""


class NotFoundError(BlueGreenError):
    """A named object does not exist."""


class ConflictError(BlueGreenError):
    """The request is well-formed but not allowed in the current state."""


class RevisionConflict(ConflictError):
    """A compare-and-set found a different revision than expected: someone else wrote first."""


class NotLeader(ConflictError):
    """A fenced write failed: this replica lost the leadership (another one runs the workflow)."""


class ConfigError(BlueGreenError):
    """The control plane's configuration is invalid; the process must not start with it."""


class StoreError(BlueGreenError):
    """The state backend failed. The operation did not change stored state."""


class MigrationError(BlueGreenError):
    """A migration set is malformed, fails lint, or could not be applied (the database keeps
    every file that was applied before the failing one, each recorded)."""


class ContractBlocked(MigrationError, ConflictError):
    """Contract refused: an environment running a version that may need the old schema is
    active, draining or in standby, so a rollback to it is still possible (HTTP 409)."""
