"""Everything the supervisor keeps for trust, built once in the process shell:
the policy (reloaded on change), approvals, the audit log, the tool sandbox,
and the table of runs waiting for an approval. `gate()` makes the per-run
`TrustGate` out of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bastion.supervisor.approvals import ApprovalStore
from bastion.supervisor.audit import AuditLog
from bastion.supervisor.runs import ActiveRun
from bastion.supervisor.sandboxes import SandboxPool
from bastion.supervisor.trust_gate import ApprovalWaits, PolicyWatcher, TrustGate


@dataclass(frozen=True)
class Trust:
    policies: PolicyWatcher
    approvals: ApprovalStore
    waits: ApprovalWaits
    audit: AuditLog
    sandboxes: SandboxPool

    def gate(self, run: ActiveRun, session: str, workspace: str | None, approval_timeout_s: float) -> TrustGate:
        return TrustGate(
            policies=self.policies, approvals=self.approvals, waits=self.waits, audit=self.audit, run=run,
            session=session, workspace=Path(workspace) if workspace else None,
            sandbox_level=lambda: self.sandboxes.report.level if self.sandboxes.report else None,
            approval_timeout_s=approval_timeout_s,
        )  # fmt: skip
