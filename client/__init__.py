"""The bastion CLI: a client of the supervisor."""
