"""The shell parser: which simple commands a command line would run, and what it cannot read."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.supervisor.trust.policy.shell_facts import OpaqueReason, Redirection, RedirectKind
from bastion.supervisor.trust.policy.shell_words import MAX_DEPTH, parse_command
from bastion.supervisor.trust.policy.shell_wrappers import XARGS_INPUT

# (spec, command line, argv of every simple command in the order found)
SPLITS = [
    ("one_command", "ls -la", [["ls", "-la"]]),
    ("semicolon_separates", "ls; rm -rf /", [["ls"], ["rm", "-rf", "/"]]),
    ("and_or_pipe_background", "a && b || c | d & e", [["a"], ["b"], ["c"], ["d"], ["e"]]),
    ("pipe_with_stderr", "make |& tee log", [["make"], ["tee", "log"]]),
    ("newline_separates", "ls\nrm x", [["ls"], ["rm", "x"]]),
    ("line_continuation_joins", "r\\\nm -rf /", [["rm", "-rf", "/"]]),
    ("comment_hides_the_rest", "echo a#b # ; rm -rf /", [["echo", "a#b"]]),
    ("single_quotes_are_text", "echo '$(rm -rf /)' 'a;b'", [["echo", "$(rm -rf /)", "a;b"]]),
    ("quoted_semicolon_is_a_word", "echo ';' \\;", [["echo", ";", ";"]]),
    ("quotes_in_the_command_name_are_removed", '"r"m -rf /; \\rm x', [["rm", "-rf", "/"], ["rm", "x"]]),
    ("dollar_paren_is_parsed", "echo $(rm -rf ~)", [["rm", "-rf", "~"], ["echo", "$(rm -rf ~)"]]),
    ("dollar_paren_in_double_quotes_is_parsed", 'echo "x $(id -u) y"', [["id", "-u"], ["echo", "x $(id -u) y"]]),
    ("nested_substitutions", "echo $(cat $(ls))", [["ls"], ["cat", "$(ls)"], ["echo", "$(cat $(ls))"]]),
    ("substitution_with_a_quoted_paren", "echo $(echo ')')", [["echo", ")"], ["echo", "$(echo ')')"]]),
    ("backticks_are_parsed", "echo `rm -rf /`", [["rm", "-rf", "/"], ["echo", "`rm -rf /`"]]),
    ("process_substitution_is_parsed", "diff <(ls a) >(tee b)",
     [["ls", "a"], ["tee", "b"], ["diff", "<(ls a)", ">(tee b)"]]),
    ("subshell_and_group", "(cd x; ls) && { cat y; }", [["cd", "x"], ["ls"], ["cat", "y"]]),
    ("if_and_while_bodies", "if ls; then rm a; else rm b; fi; while true; do rm c; done",
     [["ls"], ["rm", "a"], ["rm", "b"], ["true"], ["rm", "c"]]),
    ("bash_c_payload", "bash -c 'rm -rf /'", [["rm", "-rf", "/"]]),
    ("bash_options_before_c", "bash -euo pipefail -c 'ls; rm x'", [["ls"], ["rm", "x"]]),
    ("clustered_c", "sh -ec 'rm x'", [["rm", "x"]]),
    ("nested_shells", "bash -c \"sh -c 'rm -rf /'\"", [["rm", "-rf", "/"]]),
    ("shell_without_c_is_itself", "bash script.sh", [["bash", "script.sh"]]),
    ("env_unwrapped", "env rm -rf /", [["rm", "-rf", "/"]]),
    ("env_options_unwrapped", "env -i -u HOME rm x", [["rm", "x"]]),
    ("timeout_unwrapped", "timeout 5 rm -rf /", [["rm", "-rf", "/"]]),
    ("timeout_options_unwrapped", "timeout -s KILL --kill-after=1 5 rm x", [["rm", "x"]]),
    ("stacked_wrappers", "nohup nice -n 5 ionice -c3 stdbuf -oL time -p command rm x", [["rm", "x"]]),
    ("nice_numeric", "nice -10 rm x", [["rm", "x"]]),
    ("exec_unwrapped", "exec rm x", [["rm", "x"]]),
    ("busybox_unwrapped", "busybox rm -rf /", [["rm", "-rf", "/"]]),
    ("wrapper_by_path", "/usr/bin/env rm x", [["rm", "x"]]),
    ("sudo_is_kept_and_unwrapped", "sudo -u root rm x", [["sudo", "-u", "root", "rm", "x"], ["rm", "x"]]),
    ("sudo_shell_mode", "sudo -s rm -rf /", [["sudo", "-s", "rm", "-rf", "/"], ["rm", "-rf", "/"]]),
    ("chroot_runs_its_command", "chroot /mnt rm x", [["chroot", "/mnt", "rm", "x"], ["rm", "x"]]),
    ("command_v_runs_nothing", "command -v rm", [["command", "-v", "rm"]]),
    ("bare_exec_runs_nothing", "exec 3>&1", []),
    ("xargs_runs_its_command", "ls | xargs -0 -n1 rm -f", [["ls"], ["xargs", "-0", "-n1", "rm", "-f"], ["rm", "-f"]]),
    ("xargs_into_a_shell", "xargs -I{} sh -c 'cat {}'",
     [["xargs", "-I{}", "sh", "-c", "cat {}"], ["sh", "-c", "cat {}"], ["cat", "{}"]]),
    ("find_exec", "find . -exec rm {} \\;", [["find", ".", "-exec", "rm", "{}", ";"], ["rm", "{}"]]),
    ("find_execdir_plus", "find . -execdir wc -l {} + -print",
     [["find", ".", "-execdir", "wc", "-l", "{}", "+", "-print"], ["wc", "-l", "{}"]]),
    ("find_two_execs", "find . -exec a {} \\; -ok b {} \\;",
     [["find", ".", "-exec", "a", "{}", ";", "-ok", "b", "{}", ";"], ["a", "{}"], ["b", "{}"]]),
    ("assignments_are_stripped", "A=1 B='x y' ls", [["ls"]]),
    ("function_body_is_parsed", "f() { rm -rf /; }; f", [["f"], ["rm", "-rf", "/"], ["f"]]),
]


@pytest.mark.parametrize(("command", "expected"), [c[1:] for c in SPLITS], ids=[c[0] for c in SPLITS])
def test_simple_commands_found(command: str, expected: list[list[str]]) -> None:
    parsed = parse_command(command)
    assert [list(c.argv) for c in parsed.commands if c.argv] == expected


CLEAR = ["ls -la", "echo '$(x)'", "bash -c 'ls'", "find . -exec wc {} +", "a | b && c", "ls 2>&1 >/dev/null"]


@pytest.mark.parametrize("command", CLEAR)
def test_ordinary_commands_are_not_opaque(command: str) -> None:
    assert parse_command(command).opaque == ()


# (spec, command line, a reason it must report)
OPAQUE = [
    ("unclosed_single_quote", "ls 'src", OpaqueReason.UNBALANCED),
    ("unclosed_double_quote", 'ls "src', OpaqueReason.UNBALANCED),
    ("unclosed_substitution", "echo $(ls", OpaqueReason.UNBALANCED),
    ("unclosed_backtick", "echo `ls", OpaqueReason.UNBALANCED),
    ("stray_paren", "ls )", OpaqueReason.UNBALANCED),
    ("heredoc", "cat <<EOF\nx\nEOF", OpaqueReason.HEREDOC),
    ("eval", "eval ls", OpaqueReason.CODE_IN_STRING),
    ("trap", "trap 'rm x' EXIT", OpaqueReason.CODE_IN_STRING),
    ("alias", "alias ls='rm -rf /'", OpaqueReason.CODE_IN_STRING),
    ("source", "source ./env.sh", OpaqueReason.SOURCE),
    ("dot", ". ./env.sh", OpaqueReason.SOURCE),
    ("variable_command_name", "$CMD -rf /", OpaqueReason.DYNAMIC_COMMAND),
    ("substituted_command_name", "$(echo rm) -rf /", OpaqueReason.DYNAMIC_COMMAND),
    ("globbed_command_name", "/bin/r? -rf /", OpaqueReason.DYNAMIC_COMMAND),
    ("brace_expanded_command_name", "{rm,-rf,/}", OpaqueReason.DYNAMIC_COMMAND),
    ("dynamic_c_script", 'sh -c "$X"', OpaqueReason.DYNAMIC_PAYLOAD),
    ("for_loop", "for f in *; do cat $f; done", OpaqueReason.UNSUPPORTED_SYNTAX),
    ("case", "case x in a) ls;; esac", OpaqueReason.UNSUPPORTED_SYNTAX),
    ("double_brackets", "[[ -f x ]]", OpaqueReason.UNSUPPORTED_SYNTAX),
    ("arithmetic_command", "((x++))", OpaqueReason.UNSUPPORTED_SYNTAX),
    ("arithmetic_expansion", "echo $((1+2))", OpaqueReason.UNSUPPORTED_SYNTAX),
    ("fancy_parameter_expansion", "echo ${x@P}", OpaqueReason.UNSUPPORTED_SYNTAX),
    ("ansi_c_quoting", "$'\\x72m' -rf /", OpaqueReason.UNSUPPORTED_SYNTAX),
    ("function_definition", "f() { ls; }", OpaqueReason.UNSUPPORTED_SYNTAX),
    ("array_assignment", "a=(1 2)", OpaqueReason.UNSUPPORTED_SYNTAX),
    ("env_split_string", "env -S 'rm -rf /'", OpaqueReason.UNKNOWN_OPTION),
    ("unknown_wrapper_option", "timeout --frobnicate 5 rm x", OpaqueReason.UNKNOWN_OPTION),
    ("too_long", "ls " + "a" * 70_000, OpaqueReason.TOO_COMPLEX),
    ("too_deep", "echo " + "$(" * (MAX_DEPTH + 2) + "ls" + ")" * (MAX_DEPTH + 2), OpaqueReason.TOO_COMPLEX),
]


@pytest.mark.parametrize(("command", "reason"), [c[1:] for c in OPAQUE], ids=[c[0] for c in OPAQUE])
def test_unreadable_parts_are_opaque(command: str, reason: OpaqueReason) -> None:
    parsed = parse_command(command)
    assert parsed.is_opaque
    assert reason in {o.reason for o in parsed.opaque}


def test_parsing_goes_on_past_an_opaque_part() -> None:
    parsed = parse_command("for i in 1; do rm -rf /; done")
    assert ("rm", "-rf", "/") in [c.argv for c in parsed.commands]
    parsed = parse_command("cat <<EOF\n$(rm -rf /)\nEOF")
    assert ("rm", "-rf", "/") in [c.argv for c in parsed.commands]


def test_arithmetic_still_yields_its_substitutions() -> None:
    parsed = parse_command("echo $((1 + $(rm -rf /)))")
    assert ("rm", "-rf", "/") in [c.argv for c in parsed.commands]
    assert ("1",) not in [c.argv for c in parsed.commands]


def test_parameter_default_still_yields_its_substitution() -> None:
    parsed = parse_command("echo ${x:-$(rm z)}")
    assert [c.argv for c in parsed.commands] == [("rm", "z"), ("echo", "${x:-$(rm z)}")]


def test_expansions_are_runtime_words() -> None:
    parsed = parse_command('cat "$HOME/x" $(ls) `pwd` ${Y} plain')
    assert parsed.commands[-1].runtime_words == ("$HOME/x", "$(ls)", "`pwd`", "${Y}")


def test_a_literal_dollar_is_not_runtime() -> None:
    assert parse_command("echo $ '$X' a$").commands[0].runtime_words == ()


def test_argument_globs_are_not_runtime() -> None:
    assert parse_command("wc -l src/*.py").commands[0].runtime_words == ()


def test_xargs_input_is_a_runtime_word_of_its_command() -> None:
    rm = parse_command("xargs rm").commands[-1]
    assert rm.argv == ("rm",)
    assert rm.runtime_words == (XARGS_INPUT,)


def test_assignments_are_kept_with_their_command() -> None:
    parsed = parse_command("PATH=.:$PATH ls; env GIT_DIR=x git status; X=1")
    assert [(c.argv, c.assignments) for c in parsed.commands] == [
        (("ls",), ("PATH=.:$PATH",)),
        (("git", "status"), ("GIT_DIR=x",)),
        ((), ("X=1",)),
    ]


def test_a_shell_with_assignments_is_kept_itself() -> None:
    parsed = parse_command("BASH_ENV=./evil bash -c ls")
    assert [(c.argv, c.assignments) for c in parsed.commands] == [
        (("bash", "-c", "ls"), ("BASH_ENV=./evil",)),
        (("ls",), ()),
    ]


def test_a_quoted_name_is_not_an_assignment() -> None:
    assert parse_command('"A"=1 ls').commands[0].argv == ("A=1", "ls")


def test_redirections_are_collected() -> None:
    parsed = parse_command("cat < in.txt > out.txt 2>> err.log &> all.log; ls >| f <> rw")
    assert [(r.kind, r.target) for r in parsed.redirections] == [
        (RedirectKind.READ, "in.txt"),
        (RedirectKind.WRITE, "out.txt"),
        (RedirectKind.WRITE, "err.log"),
        (RedirectKind.WRITE, "all.log"),
        (RedirectKind.WRITE, "f"),
        (RedirectKind.WRITE, "rw"),
    ]


def test_descriptor_duplication_is_not_a_file() -> None:
    assert parse_command("ls 2>&1 >&2 <&0 3>&-").redirections == ()


def test_redirection_to_a_word_after_ampersand_is_a_file() -> None:
    assert parse_command("ls >&out.txt").redirections == (Redirection(kind=RedirectKind.WRITE, target="out.txt"),)


def test_redirections_inside_substitutions_and_scripts_are_collected() -> None:
    parsed = parse_command("echo $(ls > a) && bash -c 'cat > .git/config'")
    assert [r.target for r in parsed.redirections] == ["a", ".git/config"]


def test_runtime_and_home_redirection_targets_are_marked() -> None:
    parsed = parse_command("ls > $OUT > ~/x > '~/y' > *.txt")
    assert [(r.target, r.runtime, r.from_home) for r in parsed.redirections] == [
        ("$OUT", True, False),
        ("~/x", False, True),
        ("~/y", False, False),
        ("*.txt", True, False),
    ]


def test_wrapper_options_that_write_files_are_redirections() -> None:
    parsed = parse_command("time -o t.txt ls; find . -fprint f.txt -fprintf g.txt %p")
    assert [r.target for r in parsed.redirections] == ["t.txt", "f.txt", "g.txt"]


def test_cd_is_noted() -> None:
    assert parse_command("cd src && ls").changes_directory
    assert parse_command("(pushd x)").changes_directory
    assert not parse_command("ls cd").changes_directory


def test_here_string_is_not_a_file_but_its_substitution_runs() -> None:
    parsed = parse_command("cat <<< $(rm x)")
    assert parsed.redirections == ()
    assert ("rm", "x") in [c.argv for c in parsed.commands]
    assert not parsed.is_opaque


def test_empty_command_has_no_parts() -> None:
    parsed = parse_command("  # nothing\n")
    assert parsed.commands == () and parsed.opaque == ()


_PIECES = st.sampled_from([*"ab ;&|()<>$`'\"\\{}[]*?~#=\n-", "bash -c ", "$(", "$((", "${", "find . -exec ",
                           "xargs ", "env ", "<<", "2>&1", "rm", "<(", "sudo -s "])


@settings(max_examples=3000, deadline=None)
@given(st.lists(_PIECES, max_size=40).map("".join))
def test_any_text_parses_without_raising(command: str) -> None:
    parsed = parse_command(command)
    assert all(isinstance(c.argv, tuple) for c in parsed.commands)


@pytest.mark.parametrize("command", ["( " * 5000, "$(" * 5000, "<(" * 5000, "`" * 5000, "{ " * 5000 + "ls"])
def test_deep_nesting_is_bounded(command: str) -> None:
    parse_command(command)
