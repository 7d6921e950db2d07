"""Tools, trust policy, approvals and the audit log, end to end: the real CLI,
supervisor, sandbox process and confined children; scripted models make the
model's side deterministic.

The gate's rules (asks, denials, timeouts, grants with uses, trust flags,
policy reloads) are tested in-process in test_trust_inprocess.py; here each
capability runs once through the real processes and the real walls.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path

import pytest

from tests.e2e_support import BASTION, Bastion, approve_when_asked, events_of, run_json
from tests.scripted import script
from tests.scripted import tool_call as call

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    path = tmp_path / "ws"
    path.mkdir()
    (path / "notes.txt").write_text("hello from the workspace\n")
    return path


def test_read_only_file_tools_run_in_the_sandbox(shared_bastion: Bastion, workspace: Path, tmp_path: Path) -> None:
    model = script(tmp_path, call("read_file", path="notes.txt"), "It says hello.")
    code, lines = run_json(shared_bastion, "run", "read it", "--model", model, "--tools", "files", cwd=workspace)
    assert code == 0
    end = events_of(lines, "tool_end")[0]
    assert end["ok"] is True and end["content"] == "hello from the workspace\n"
    assert events_of(lines, "tool_decision")[0]["decision"] == "allow"


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
    approve_when_asked(bastion, session="w")
    runner.join(120)
    assert result["code"] == 0
    lines = result["lines"]
    asked = events_of(lines, "approval_required")[0]
    assert asked["tool"] == "write_file" and json.loads(asked["arguments"])["path"] == "out.txt"
    assert events_of(lines, "tool_decision")[0]["decision"] == "allow"
    assert (workspace / "out.txt").read_text() == "written by the model\n"


def test_policy_show_and_the_shipped_cases_pass(shared_bastion: Bastion) -> None:
    shown = shared_bastion("policy", "show")
    assert shown.returncode == 0 and "default_policy.toml" in shown.stdout and "deny" in shown.stdout
    tested = shared_bastion("policy", "test", str(ROOT / "configs" / "default_policy_cases.toml"))
    assert tested.returncode == 0, tested.stdout
    assert " 0 failed" in tested.stdout


def test_tools_run_goes_through_the_same_gate_and_sandbox(shared_bastion: Bastion, workspace: Path) -> None:
    ok = subprocess.run([BASTION, "tools", "run", "read_file", "--args", '{"path": "notes.txt"}'], cwd=workspace,
                        env=shared_bastion.env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and ok.stdout == "hello from the workspace\n"
    escape = subprocess.run([BASTION, "tools", "run", "read_file", "--args", '{"path": "../../etc/passwd"}'],
                            cwd=workspace, env=shared_bastion.env, capture_output=True, text=True, timeout=120)
    assert escape.returncode == 1 and "outside the workspace" in escape.stderr
    shell = subprocess.run([BASTION, "tools", "run", "shell", "--args", '{"command": "ls -n; cat notes.txt"}',
                            "--allow-shell"], cwd=workspace, env=shared_bastion.env, capture_output=True, text=True,
                           timeout=120)
    assert shell.returncode == 0, shell.stderr
    assert shell.stdout.endswith("hello from the workspace\n")
    owner = next(line.split()[2] for line in shell.stdout.splitlines() if line.endswith("notes.txt"))
    assert owner != "0"  # the call ran as an unprivileged uid (the workspace is mapped to it)
    denied = subprocess.run([BASTION, "tools", "run", "shell", "--args", '{"command": "ls; curl http://x"}',
                             "--allow-shell"], cwd=workspace, env=shared_bastion.env, capture_output=True, text=True,
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


def test_doctor_reports_each_layer(shared_bastion: Bastion) -> None:
    code, (diagnosis,) = shared_bastion.json("doctor")
    assert code == 0
    layers = {layer["name"]: layer for layer in diagnosis["confinement"]["layers"]}
    for always in ("fresh_process", "clean_environment", "rlimits", "uid_drop", "no_new_privs"):
        assert layers[always]["active"], layers[always]
    assert all(layer["active"] or layer["fix"] for layer in layers.values())
    if os.environ.get("CI") == "true":
        # CI installs what the strong level needs: a missing layer fails instead of skipping.
        missing = [name for name, layer in layers.items() if not layer["active"]]
        assert diagnosis["confinement"]["level"] == "strong", missing


@pytest.mark.real_model
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
