"""When contract may run. Pure.

After an expand, two versions share the schema: the new one and every older one that can still
take traffic. Contract removes what the older ones need, so it must wait until none of them can
take traffic again: no environment running an older version may be active, shifting, draining or
in standby (a rollback to a standby environment is one weights change away). Once it is
decommissioned, contract may run.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Sequence

from ..model import Deployment, DeploymentStatus as S

LIVE = (S.ACTIVE, S.SHIFTING, S.DRAINING, S.STANDBY)


@dataclass(frozen=True)
class Blocker:
    deployment: Deployment

    def describe(self) -> str:
        d = self.deployment
        until = ""
        if d.status in (S.DRAINING, S.STANDBY) and d.deadline is not None:
            phase = "standby_until" if d.status is S.STANDBY else "drain_until"
            until = f", {phase} {datetime.fromtimestamp(d.deadline, tz=timezone.utc).isoformat()}"
        return f"environment {d.environment.value} runs {d.id} ({d.version}, {d.status.value}{until})"


def _seq(d: Deployment) -> int:
    return int(d.id.rsplit("-", 1)[1])


def contract_blockers(records: Sequence[Deployment], expanded_by: str | None = None) -> list[Blocker]:
    """Records of one service that may need the old schema and can still take traffic.

    ``expanded_by`` is the deployment that applied the expand files (recorded in the database).
    Every live record older than it blocks. Without it, the newest live record is taken as the
    new version and every other live record blocks.
    """
    live = [r for r in records if r.status in LIVE]
    if not live:
        return []
    if expanded_by is not None:
        newer = [r for r in records if r.id == expanded_by]
        if newer:
            cut = _seq(newer[0])
            return [Blocker(r) for r in sorted(live, key=_seq) if _seq(r) < cut]
    newest = max(live, key=_seq)
    return [Blocker(r) for r in sorted(live, key=_seq) if r is not newest]


def refusal(service: str, blockers: Sequence[Blocker]) -> str:
    return (
        f"contract refused for {service}: " + "; ".join(b.describe() for b in blockers)
        + ". A rollback to it needs the old schema; contract can run once it is decommissioned "
        f"(POST /v1/deployments/<id>/decommission ends standby early)"
    )
