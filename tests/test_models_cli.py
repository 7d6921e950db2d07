"""`bastion models add`: the table it writes is one the registry reads as the same remote model,
and what it refuses it refuses before touching config.toml."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from bastion.client.cli import app
from bastion.protocol import HomeLayout
from bastion.protocol.remote import RemoteEndpoint, RemoteEngine, RemoteMode
from bastion.supervisor.models.registry import ModelRegistry


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HomeLayout:
    monkeypatch.setenv("BASTION_HOME", str(tmp_path / "home"))
    return HomeLayout.from_env()


def add(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["models", "add", *args])
    return result.exit_code, result.output


def test_an_added_remote_model_is_what_the_registry_reads(home: HomeLayout) -> None:
    home.root.mkdir(parents=True)
    home.config_file.write_text('# my settings\ndefault = "smollm2-135m"\n')
    assert add("gpu", "--url", "http://gpu-box:8080")[0] == 0
    assert add("lms", "--engine", "openai", "--url", "http://laptop:1234", "--mode", "chat")[0] == 0
    code, output = add("qwen", "--engine", "ollama", "--url", "http://10.0.0.2:11434", "--model", "qwen3:8b",
                       "--api-key-env", "QWEN_KEY", "--n-ctx", "8192", "--parallel", "2")  # fmt: skip
    assert code == 0 and "bastion doctor" in output
    text = home.config_file.read_text()
    assert text.startswith("# my settings\n") and "QWEN_KEY" in text
    registry = ModelRegistry.load(home)
    lms = registry.lookup("lms").source
    assert isinstance(lms, RemoteEndpoint) and lms.mode is RemoteMode.CHAT
    assert registry.lookup("gpu").source == RemoteEndpoint(engine=RemoteEngine.LLAMA_SERVER, url="http://gpu-box:8080")
    qwen = registry.lookup("qwen")
    assert qwen.source == RemoteEndpoint(engine=RemoteEngine.OLLAMA, url="http://10.0.0.2:11434", model="qwen3:8b",
                                         api_key_env="QWEN_KEY")  # fmt: skip
    assert (qwen.n_ctx, qwen.parallel) == (8192, 2)


@pytest.mark.parametrize(("args", "says"), [
    (("x", "--url", "gpu-box:8080"), "http:// or https://"),
    (("x", "--engine", "ollama", "--url", "http://h:1"), "needs --model"),
    (("x", "--url", "http://h:1", "--api-key-env", "A", "--api-key-file", "/k"), "not both"),
    (("../x", "--url", "http://h:1"), "a model name is"),
    (("x", "--url", "http://h:1", "--model", "qwen\n[models.evil]"), "control characters"),
    (("x", "--url", "http://admin:pw@h:1"), "credentials do not belong"),
])  # fmt: skip
def test_a_wrong_remote_is_refused_and_nothing_is_written(home: HomeLayout, args: tuple[str, ...], says: str) -> None:
    code, output = add(*args)
    assert code == 2 and says in output
    assert not home.config_file.exists()


def test_a_name_already_in_the_file_is_not_rewritten(home: HomeLayout) -> None:
    assert add("gpu", "--url", "http://a:1")[0] == 0
    before = home.config_file.read_text()
    code, output = add("gpu", "--url", "http://b:2")
    assert code == 2 and "already has [models.gpu]" in output and home.config_file.read_text() == before
