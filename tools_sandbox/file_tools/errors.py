"""The one exception of the file tools.

    FileToolError        a call that cannot be done (refused or failed); its
                         message is what the model reads in the ok=False envelope

Raised inside the tools and turned into an envelope by `run.run_file_tool`; it
never crosses the process boundary as an exception. Messages name paths as the
caller gave them or relative to the workspace, never a host path the workspace
does not already show (a symlink's target, for one).
"""

from __future__ import annotations


class FileToolError(Exception):
    """A file-tool call that was refused or failed; `str(error)` is for the model."""
