"""The tool sandbox process (not built yet).

It will own running shell and file tools for the supervisor in confined child
processes: a fresh launcher per call, rlimits, a scrubbed environment, a
workspace jail, an unprivileged uid, and bubblewrap/Landlock/seccomp where the
kernel offers them. It will talk to the supervisor over ZeroMQ with the
`ToSandbox`/`FromSandbox` messages of `bastion.protocol`, and import nothing
of the supervisor, the workers or the CLI.
"""
