"""`bastion COMMAND` runs an app built with that one command (typer builds every command's
parameters before it runs one); help, groups and unknown names get the whole app."""

from __future__ import annotations

from typer.testing import CliRunner

from bastion.client import cli


def test_a_top_level_command_gets_an_app_of_its_own() -> None:
    one = cli._app_for(["status", "--json"])
    assert one is not cli.app and [info.callback for info in one.registered_commands] == [cli.status]
    assert cli._app_for(["run", "hello"]).registered_commands[0].callback is cli.run


def test_help_groups_and_unknown_names_get_the_whole_app() -> None:
    for args in ([], ["--help"], ["sessions", "list"], ["tools", "list"], ["no-such-command"]):
        assert cli._app_for(args) is cli.app, args


def test_the_one_command_app_parses_and_complains_as_the_whole_app_does() -> None:
    runner = CliRunner()
    for args in (["status", "--bogus"], ["load"], ["status", "--help"]):
        alone = runner.invoke(cli._app_for(args), args)
        whole = runner.invoke(cli.app, args)
        assert (alone.exit_code, alone.output) == (whole.exit_code, whole.output), args
