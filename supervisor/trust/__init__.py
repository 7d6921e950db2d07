"""Whether a tool call may run, and the record of what ran.

    gate.py          TrustGate (policy, then approvals, each decision audited), PolicyWatcher,
                     ApprovalWaits, and Trust, the bundle the process shell builds once
    approvals.py     asks waiting for a person, and the grants an approval leaves
    audit.py         the append-only, hash-chained audit log
    audit_verify.py  checking that log
    policy/          the policy file, its rules and decisions
"""
