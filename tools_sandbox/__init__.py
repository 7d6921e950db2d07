"""The tool sandbox process: runs shell and file tools for the supervisor, confined.

One sandbox process connects to the supervisor's tools ROUTER (see
protocol/sandbox_wire.py). Each tool call runs in a fresh, confined child
process: a new session and PID namespace, an allow-list environment, rlimits,
a wall-clock timeout, capped output, an unprivileged uid when started as root,
no network, and Landlock, seccomp and bubblewrap where the kernel offers them.
What is active is measured at startup (`confine.probe`) and reported to the
supervisor; a call that needs a stronger level than the machine offers is
refused, never run with less confinement silently.

    proc.py / __main__.py   process shell: socket, heartbeats, one thread per call
    dispatch.py             a RunTool → the right tool, through the launcher
    confine/                the launcher and its layers, the probe
    shell_tool.py           the shell tool
    file_tools/             read/write/edit file, list_dir, glob, grep (race-free paths)

It imports `bastion.protocol` and never the supervisor, workers or the CLI.
"""
