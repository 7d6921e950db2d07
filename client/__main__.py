"""`python -m bastion.client` is the `bastion` command."""

from bastion.client.cli import main

main()
