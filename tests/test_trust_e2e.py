"""Tools, trust policy, approvals and the audit log, end to end: the real CLI,
supervisor, sandbox process and confined children; scripted models make the
model's side deterministic."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import msgspec
import pytest

from tests.conftest import BASTION, Bastion
from tests.test_agent_e2e import call, script
from tests.test_cli_e2e import events_of

pytestmark = pytest.mark.model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    path = tmp_path / "ws"
    path.mkdir()
    (path / "notes.txt").write_text("hello from the workspace\n")
    return path


def run_json(bastion: Bastion, *args: str, cwd: Path) -> tuple[int, list[dict]]:
    done = subprocess.run([BASTION, *args, "--json"], cwd=cwd, env=bastion.env, capture_output=True, text=True,
                          timeout=240, stdin=subprocess.DEVNULL)
    return done.returncode, [msgspec.json.decode(line) for line in done.stdout.splitlines() if line.strip()]


def test_read_only_file_tools_run_in_the_sandbox(bastion: Bastion, workspace: Path, tmp_path: Path) -> None:
    model = script(tmp_path, call("read_file", path="notes.txt"), "It says hello.")
    code, lines = run_json(bastion, "run", "read it", "--model", model, "--tools", "files", cwd=workspace)
    assert code == 0
    end = events_of(lines, "tool_end")[0]
    assert end["ok"] is True and end["content"] == "hello from the workspace\n"
    assert events_of(lines, "tool_decision")[0]["decision"] == "allow"


def test_write_tools_are_not_offered_without_allow_write(bastion: Bastion, workspace: Path, tmp_path: Path) -> None:
    denied = subprocess.run([BASTION, "run", "x", "--model", script(tmp_path, "x"), "--tools", "write_file"],
                            cwd=workspace, env=bastion.env, capture_output=True, text=True, timeout=120)
    assert denied.returncode == 2 and "--allow-write" in denied.stderr
    # With only the read tools, a write attempt by the model is an unknown tool: nothing is written.
    model = script(tmp_path, call("write_file", path="out.txt", content="x"), "ok", "ok")
    code, lines = run_json(bastion, "run", "write", "--model", model, "--tools", "files", cwd=workspace)
    assert not (workspace / "out.txt").exists()
    assert any("write_file" in w["message"] for w in events_of(lines, "warning"))
    shell = subprocess.run([BASTION, "run", "x", "--model", script(tmp_path, "x"), "--tools", "shell"],
                           cwd=workspace, env=bastion.env, capture_output=True, text=True, timeout=120)
    assert shell.returncode == 2 and "--allow-shell" in shell.stderr


def approve_when_asked(bastion: Bastion, lines_so_far: list[dict], *, deny: bool = False, uses: int = 1,
                       session: str | None = None) -> None:
    """Answer the first approval request from another client, as a user in another terminal would."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        _, listing = bastion.json("approvals")
        if listing and listing[0]["approvals"]:
            approval_id = listing[0]["approvals"][0]["approval_id"]
            if session is not None:
                _, (sessions,) = bastion.json("sessions", "list")
                states = {s["name"]: s["state"] for s in sessions["sessions"]}
                assert states[session] == "waiting_for_approval"
            verb = ["deny", approval_id] if deny else ["approve", approval_id, "--uses", str(uses)]
            assert bastion(*verb).returncode == 0
            return
        time.sleep(0.2)
    raise AssertionError("no approval was requested")


def test_a_write_asks_and_an_approval_from_another_client_lets_it_run(
    bastion: Bastion, workspace: Path, tmp_path: Path
) -> None:
    model = script(tmp_path, call("write_file", path="out.txt", content="written by the model\n"), "Done.")
    result: dict = {}

    def run() -> None:
        result["code"], result["lines"] = run_json(bastion, "run", "write it", "--model", model, "--tools",
                                                   "files", "--allow-write", "--session", "w", cwd=workspace)

    runner = threading.Thread(target=run)
    runner.start()
    approve_when_asked(bastion, [], session="w")
    runner.join(120)
    assert result["code"] == 0
    lines = result["lines"]
    asked = events_of(lines, "approval_required")[0]
    assert asked["tool"] == "write_file" and json.loads(asked["arguments"])["path"] == "out.txt"
    assert events_of(lines, "tool_decision")[0]["decision"] == "allow"
    assert (workspace / "out.txt").read_text() == "written by the model\n"


def test_a_denied_call_becomes_a_result_the_model_sees(bastion: Bastion, workspace: Path, tmp_path: Path) -> None:
    model = script(tmp_path, call("write_file", path="out.txt", content="x"), "Understood, not written.")
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(zip(("code", "lines"), run_json(
        bastion, "run", "write", "--model", model, "--tools", "files", "--allow-write", cwd=workspace))))
    runner.start()
    approve_when_asked(bastion, [], deny=True)
    runner.join(120)
    assert result["code"] == 0  # the run goes on after a denial
    lines = result["lines"]
    assert events_of(lines, "tool_decision")[0]["decision"] == "deny"
    assert events_of(lines, "tool_end")[0]["ok"] is False
    assert not (workspace / "out.txt").exists()
    assert "".join(e["text"] for e in events_of(lines, "token")).endswith("Understood, not written.")


def test_an_unanswered_approval_times_out_as_a_deny(bastion: Bastion, workspace: Path, tmp_path: Path) -> None:
    model = script(tmp_path, call("write_file", path="out.txt", content="x"), "ok")
    code, lines = run_json(bastion, "run", "write", "--model", model, "--tools", "files", "--allow-write",
                           "--approval-timeout", "2", cwd=workspace)
    assert code == 0
    decision = events_of(lines, "tool_decision")[0]
    assert decision["decision"] == "deny" and "no answer in time" in decision["reason"]
    assert not (workspace / "out.txt").exists()


def test_an_approval_with_uses_covers_identical_calls_only(bastion: Bastion, workspace: Path, tmp_path: Path) -> None:
    same = call("write_file", path="a.txt", content="same\n")
    model = script(tmp_path, same, same, call("write_file", path="a.txt", content="different\n"), "done")
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(zip(("code", "lines"), run_json(
        bastion, "run", "write", "--model", model, "--tools", "files", "--allow-write", "--approval-timeout", "3",
        cwd=workspace))))
    runner.start()
    approve_when_asked(bastion, [], uses=2)
    runner.join(120)
    decisions = [(d["decision"], d["reason"]) for d in events_of(result["lines"], "tool_decision")]
    assert decisions[0][0] == "allow" and decisions[1][0] == "allow" and "approved earlier" in decisions[1][1]
    assert decisions[2][0] == "deny"  # different arguments need a new approval; nobody answered
    assert (workspace / "a.txt").read_text() == "same\n"


def test_policy_show_and_the_shipped_cases_pass(bastion: Bastion) -> None:
    shown = bastion("policy", "show")
    assert shown.returncode == 0 and "default_policy.toml" in shown.stdout and "deny" in shown.stdout
    tested = bastion("policy", "test", str(ROOT / "configs" / "default_policy_cases.toml"))
    assert tested.returncode == 0, tested.stdout
    assert " 0 failed" in tested.stdout


def test_a_policy_edit_takes_effect_and_a_failing_case_fails(bastion: Bastion, tmp_path: Path) -> None:
    bastion.home.mkdir(parents=True, exist_ok=True)
    (bastion.home / "policy.toml").write_text('default = "deny"\n')
    cases = tmp_path / "cases.toml"
    cases.write_text('[[cases]]\nname = "reads are allowed"\ntool = "read_file"\nexpect = "allow"\n'
                     '[cases.arguments]\npath = "x.txt"\n')
    tested = bastion("policy", "test", str(cases))
    assert tested.returncode == 1 and "FAIL" in tested.stdout
    (bastion.home / "policy.toml").write_text('default = "bogus"\n')
    broken = bastion("policy", "show")
    assert broken.returncode == 2 and "policy.toml:1" in broken.stderr


def test_tools_run_goes_through_the_same_gate_and_sandbox(bastion: Bastion, workspace: Path) -> None:
    ok = subprocess.run([BASTION, "tools", "run", "read_file", "--args", '{"path": "notes.txt"}'], cwd=workspace,
                        env=bastion.env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and ok.stdout == "hello from the workspace\n"
    escape = subprocess.run([BASTION, "tools", "run", "read_file", "--args", '{"path": "../../etc/passwd"}'],
                            cwd=workspace, env=bastion.env, capture_output=True, text=True, timeout=120)
    assert escape.returncode == 1 and "outside the workspace" in escape.stderr
    shell = subprocess.run([BASTION, "tools", "run", "shell", "--args", '{"command": "ls -n; cat notes.txt"}',
                            "--allow-shell"], cwd=workspace, env=bastion.env, capture_output=True, text=True,
                           timeout=120)
    assert shell.returncode == 0, shell.stderr
    assert shell.stdout.endswith("hello from the workspace\n")
    owner = next(line.split()[2] for line in shell.stdout.splitlines() if line.endswith("notes.txt"))
    assert owner != "0"  # the call ran as an unprivileged uid (the workspace is mapped to it)
    denied = subprocess.run([BASTION, "tools", "run", "shell", "--args", '{"command": "ls; curl http://x"}',
                             "--allow-shell"], cwd=workspace, env=bastion.env, capture_output=True, text=True,
                            timeout=120)
    assert denied.returncode == 1 and "curl" in denied.stderr


def test_the_audit_log_records_every_decision_and_detects_tampering(
    bastion: Bastion, workspace: Path, tmp_path: Path
) -> None:
    model = script(tmp_path, call("read_file", path="notes.txt"), call("calculator", expression="2+2"), "done")
    code, _ = run_json(bastion, "run", "go", "--model", model, "--tools", "files,calculator", cwd=workspace)
    assert code == 0
    verified = bastion("audit", "verify")
    assert verified.returncode == 0 and "intact" in verified.stdout
    log = bastion.home / "audit.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["kind"] for r in records] == ["decision", "execution", "decision", "execution"]
    assert "notes.txt" not in log.read_text()  # digests and lengths, never the arguments themselves
    lines = log.read_text().splitlines()
    lines[1] = lines[1].replace('"ok":true', '"ok":false')
    log.write_text("\n".join(lines) + "\n")
    tampered = bastion("audit", "verify")
    assert tampered.returncode == 1 and "line 2" in tampered.stdout


def test_doctor_reports_each_layer(bastion: Bastion) -> None:
    code, (diagnosis,) = bastion.json("doctor")
    assert code == 0
    layers = {layer["name"]: layer for layer in diagnosis["confinement"]["layers"]}
    for always in ("fresh_process", "clean_environment", "rlimits", "uid_drop", "no_new_privs"):
        assert layers[always]["active"], layers[always]
    assert all(layer["active"] or layer["fix"] for layer in layers.values())
    if os.environ.get("CI") == "true":
        # CI installs what the strong level needs: a missing layer fails instead of skipping.
        missing = [name for name, layer in layers.items() if not layer["active"]]
        assert diagnosis["confinement"]["level"] == "strong", missing


def test_the_real_model_writes_a_file_only_with_allow_write(bastion: Bastion, tmp_path: Path) -> None:
    workspace = tmp_path / "real"
    workspace.mkdir()
    bastion.home.mkdir(parents=True, exist_ok=True)
    # Writes are allowed without asking here, so the run needs no second client. (Deny beats ask
    # beats allow, so this policy does not include the default's `ask` for writes.)
    (bastion.home / "policy.toml").write_text('[[rules]]\ndecision = "allow"\ntools = ["write_file"]\npaths = ["**"]\n')
    prompt = 'Save the text "hi there" to the file hello.txt using the write_file tool.'
    args = ("run", prompt, "--tools", "write_file", "--temperature", "0", "--max-iterations", "2",
            "--max-tokens", "80", "--approval-timeout", "5")  # fmt: skip
    without = subprocess.run([BASTION, *args], cwd=workspace, env=bastion.env, capture_output=True, text=True,
                             timeout=240)
    assert without.returncode == 2 and "--allow-write" in without.stderr
    assert not (workspace / "hello.txt").exists()
    code, lines = run_json(bastion, *args, "--allow-write", cwd=workspace)
    assert lines[-1]["type"] == "run_end"
    calls = events_of(lines, "tool_call")
    assert calls and calls[0]["name"] == "write_file"
    assert events_of(lines, "tool_end")[0]["ok"] is True
    assert (workspace / "hello.txt").read_text() == "hi there"


def test_chat_asks_inline_and_a_yes_lets_the_write_run(bastion: Bastion, workspace: Path, tmp_path: Path) -> None:
    model = script(tmp_path, call("write_file", path="chat.txt", content="from chat\n"), "Saved.")
    done = subprocess.run([BASTION, "chat", "--model", model, "--tools", "files", "--allow-write"],
                          input="please save it\ny\n/exit\n", cwd=workspace, env=bastion.env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "needs approval" in done.stderr
    assert (workspace / "chat.txt").read_text() == "from chat\n"
