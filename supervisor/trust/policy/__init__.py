"""Trust policy: whether a tool call is allowed, denied or needs a person to approve it.

Owns the policy file format, its loading and validation (`loader.py`), the
decision semantics (`engine.py`), the shell command parser that lets policy
see every command a line would run (`shell_words.py`, `shell_wrappers.py`),
and policy test cases (`cases.py`). It decides only: it runs nothing, asks no
one and records nothing (approvals and the audit log are the supervisor's).

    policy = Policy.for_home(layout)            # or Policy.load(path)
    verdict = policy.decide(ShellArgs(command="ls | wc -l"), workspace=ws)
    verdict.decision, verdict.reason, verdict.rule   # ALLOW, "...", "default_policy.toml:33"
"""

from bastion.supervisor.errors import PolicyError
from bastion.supervisor.trust.policy.cases import CaseResult, load_cases, policy_call, run_cases
from bastion.supervisor.trust.policy.engine import Policy
from bastion.supervisor.trust.policy.loader import load_policy
from bastion.supervisor.trust.policy.model import (
    NamedToolCall,
    PartDecision,
    PolicyCall,
    PolicyDecision,
    PolicySpec,
    Rule,
    Source,
)
from bastion.supervisor.trust.policy.shell_words import parse_command

__all__ = [
    "CaseResult",
    "NamedToolCall",
    "PartDecision",
    "Policy",
    "PolicyCall",
    "PolicyDecision",
    "PolicyError",
    "PolicySpec",
    "Rule",
    "Source",
    "load_cases",
    "load_policy",
    "parse_command",
    "policy_call",
    "run_cases",
]
