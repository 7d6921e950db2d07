"""The policy's one exception: a policy or cases file that cannot be used.

    SupervisorError
    └── PolicyError      a policy/cases file is unreadable, invalid, or includes itself

Its message starts with `file:line` whenever the line is known, because the
person reading it is about to open that file.
"""

from __future__ import annotations

from bastion.protocol import ErrorCode
from bastion.supervisor.errors import SupervisorError


class PolicyError(SupervisorError):
    code = ErrorCode.INVALID_REQUEST
