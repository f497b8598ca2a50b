"""Config loading and validation: defaults, a full file, and the messages for mistakes."""

from pathlib import Path

import pytest
import yaml

from moltbotd import config
from moltbotd.config import (
    DEFAULT_SOCKET,
    Config,
    ConfigError,
    ModelConfig,
    Overrides,
    RestartSettings,
    SessionSettings,
    WorkerSettings,
    load,
    parse_model_yaml,
    parse_overrides,
    with_overrides,
)

ROOT = Path(__file__).resolve().parent.parent

FULL = """\
socket: /tmp/molt/molt.sock
socket_mode: "0600"
models_dir: /srv/models
log_format: json
log_level: WARNING
log_ring_size: 500
max_frame_bytes: 16MiB
max_inflight_per_connection: 64
drain_timeout: 2m
workers:
  start_timeout: 45s
  stop_timeout: 500ms
  restart:
    backoff: 1s
    backoff_max: 1m
    max_failures: 3
    stable_after: 20s
defaults:
  device: cpu
  intra_op_threads: 4
  inter_op_threads: 2
  graph_optimization: basic
models:
  demo:
    version: v2.0
    intra_op_threads: 8
    graph_optimization: extended
  iris:
    version: v1
  plain:
"""


def write(tmp_path: Path, text: str, name: str = "moltbotd.yaml") -> Path:
    file = tmp_path / name
    file.write_text(text)
    return file


def load_error(tmp_path: Path, text: str) -> tuple[str, Path]:
    file = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(file)
    return str(info.value), file


def test_load_none_gives_defaults():
    cfg = load(None)
    assert cfg == Config()
    assert cfg.socket == DEFAULT_SOCKET
    assert cfg.socket_mode == 0o666
    assert cfg.models_dir == Path("/var/lib/moltbot/models")
    assert cfg.log_format == "text"
    assert cfg.log_level == "info"
    assert cfg.log_ring_size == 10000
    assert cfg.max_frame_bytes == 64 * 2**20
    assert cfg.drain_timeout == 30.0
    assert cfg.workers == WorkerSettings()
    assert cfg.workers.restart == RestartSettings()
    assert cfg.workers.restart.max_failures == 5
    assert cfg.defaults == SessionSettings()
    assert cfg.models == {}


@pytest.mark.parametrize("text", ["", "# only a comment\n", "workers:\ndefaults:\nmodels:\n"])
def test_empty_file_and_empty_sections_give_defaults(tmp_path, text):
    assert load(write(tmp_path, text)) == Config()


def test_full_file_loads(tmp_path):
    cfg = load(write(tmp_path, FULL))
    assert cfg.socket == Path("/tmp/molt/molt.sock")
    assert cfg.socket_mode == 0o600
    assert cfg.models_dir == Path("/srv/models")
    assert cfg.log_format == "json"
    assert cfg.log_level == "warning"
    assert cfg.log_ring_size == 500
    assert cfg.max_frame_bytes == 16 * 2**20
    assert cfg.max_inflight_per_connection == 64
    assert cfg.drain_timeout == 120.0
    assert cfg.workers.start_timeout == 45.0
    assert cfg.workers.stop_timeout == 0.5
    assert cfg.workers.restart == RestartSettings(
        backoff=1.0, backoff_max=60.0, max_failures=3, stable_after=20.0
    )
    assert cfg.defaults == SessionSettings("cpu", 4, 2, "basic")
    assert cfg.models == {
        "demo": ModelConfig(
            "v2.0", Overrides({"intra_op_threads": 8, "graph_optimization": "extended"})
        ),
        "iris": ModelConfig("v1"),
        "plain": ModelConfig(None),
    }


def test_config_is_immutable(tmp_path):
    cfg = load(write(tmp_path, FULL))
    with pytest.raises(AttributeError):
        cfg.log_level = "debug"  # type: ignore[misc]


def test_a_partial_section_keeps_the_other_defaults(tmp_path):
    cfg = load(write(tmp_path, "workers:\n  restart:\n    max_failures: 9\n"))
    assert cfg.workers.restart.max_failures == 9
    assert cfg.workers.restart.backoff == RestartSettings().backoff
    assert cfg.workers.start_timeout == WorkerSettings().start_timeout


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    folder = tmp_path / "etc" / "moltbot"
    folder.mkdir(parents=True)
    file = write(folder, "socket: run/molt.sock\nmodels_dir: ../models\n")
    cfg = load(file)
    assert cfg.socket == folder / "run" / "molt.sock"
    assert cfg.models_dir == folder / ".." / "models"
    assert cfg.socket.is_absolute()


def test_absolute_paths_stay(tmp_path):
    cfg = load(write(tmp_path, "models_dir: /opt/models\n"))
    assert cfg.models_dir == Path("/opt/models")


def test_missing_config_file(tmp_path):
    file = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as info:
        load(file)
    assert str(info.value).startswith(f"{file}: cannot read the config file")


def test_unknown_top_level_key(tmp_path):
    message, file = load_error(tmp_path, "log_level: info\nsockets: /x\n")
    assert message.startswith(f"{file}: ")
    assert "sockets: unknown setting" in message
    assert "known here: " in message
    assert "socket, socket_mode" in message


def test_unknown_nested_key(tmp_path):
    message, file = load_error(tmp_path, "workers:\n  restart:\n    bogus: 1\n")
    assert message.startswith(f"{file}: workers.restart.bogus: unknown setting")
    assert "known here: backoff, backoff_max, max_failures, stable_after" in message


def test_unknown_key_under_models_entry(tmp_path):
    message, file = load_error(tmp_path, "models:\n  demo:\n    threads: 2\n")
    assert message.startswith(f"{file}: models.demo.threads: unknown setting")
    assert "intra_op_threads" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("defaults:\n  intra_op_threads: two\n",
         "defaults.intra_op_threads: expected an integer from 1 to 256 or auto, got 'two'"),
        ("models:\n  mlp:\n    spinning: maybe\n",
         "models.mlp.spinning: expected true or false, got 'maybe'"),
        ("workers:\n  stop_timeout: soon\n",
         "workers.stop_timeout: expected a duration such as 30s, 500ms, 2m or 1h, got 'soon'"),
        ("max_frame_bytes: 12 parsecs\n",
         "max_frame_bytes: expected a size such as 512KiB, 64MiB or 4GiB, got '12 parsecs'"),
        ("log_format: xml\n", "log_format: expected one of text, json, got 'xml'"),
        ("models:\n  demo:\n    device: tpu\n",
         "models.demo.device: expected one of cpu, cuda, got 'tpu'"),
        ("workers: 5\n", "workers: expected a mapping of settings, got 5"),
        ("models:\n  - demo\n", "models: expected a mapping of settings, got ['demo']"),
        ("models:\n  demo: v2.0\n", "models.demo: expected a mapping of settings, got 'v2.0'"),
        ("socket: ''\n", "socket: expected a path, got ''"),
    ],
    ids=["wrong-type", "boolean-in-model", "duration", "size", "choice", "choice-in-model",
         "section", "models", "model-entry", "empty-path"],
)  # fmt: skip
def test_error_messages_name_file_key_and_expectation(tmp_path, text, expected):
    message, file = load_error(tmp_path, text)
    assert message == f"{file}: {expected}"


@pytest.mark.parametrize(
    ("text", "part"),
    [
        ("log_ring_size: 5\n", "log_ring_size: expected an integer from 100 to 10000000, got 5"),
        ("log_ring_size: true\n", "log_ring_size: expected an integer from 100 to 10000000"),
        ("log_ring_size: 1000.0\n", "log_ring_size: expected an integer from 100 to 10000000"),
    ],
    ids=["out-of-range", "bool", "float"],
)
def test_integer_settings(tmp_path, text, part):
    message, file = load_error(tmp_path, text)
    assert message.startswith(f"{file}: {part}")


def test_negative_duration(tmp_path):
    message, _ = load_error(tmp_path, "drain_timeout: -3\n")
    assert "drain_timeout: expected a duration" in message
    assert "negative number -3" in message


def test_choice_is_case_insensitive(tmp_path):
    cfg = load(write(tmp_path, "defaults:\n  device: CUDA\n"))
    assert cfg.defaults.device == "cuda"


def test_invalid_yaml_names_the_line(tmp_path):
    message, file = load_error(tmp_path, "log_level: info\nsocket: x\n  bad: : y\n")
    assert message.startswith(f"{file}: not valid YAML at line 3, column ")
    assert "mapping values are not allowed here" in message


def test_invalid_yaml_unclosed_bracket(tmp_path):
    message, file = load_error(tmp_path, "workers:\n  restart: [1, 2\n")
    assert message.startswith(f"{file}: not valid YAML at line ")


@pytest.mark.parametrize("text", ["- a\n- b\n", "just text\n", "42\n"])
def test_top_level_not_a_mapping(tmp_path, text):
    message, file = load_error(tmp_path, text)
    assert message.startswith(f"{file}: the top level: expected a mapping of settings, got ")


@pytest.mark.parametrize("model", ["bad name", "-leading", "a/b", "x" * 65])
def test_bad_model_name_under_models(tmp_path, model):
    message, file = load_error(tmp_path, f"models:\n  '{model}':\n    version: v1\n")
    assert message.startswith(f"{file}: models: model name {model!r}: expected a name of ")
    assert "1-64 letters, digits" in message


def test_bad_version_name_under_models(tmp_path):
    message, file = load_error(tmp_path, "models:\n  demo:\n    version: 'v 2'\n")
    assert message.startswith(f"{file}: models.demo.version: expected a name of ")
    assert "'v 2'" in message


@pytest.mark.parametrize("mode", ["0660", "0600", "660"])
def test_socket_mode_quoted_octal(tmp_path, mode):
    cfg = load(write(tmp_path, f'socket_mode: "{mode}"\n'))
    assert cfg.socket_mode == int(mode, 8)


@pytest.mark.parametrize(
    ("raw", "shown"),
    [("0660", "432"), ("660", "660"), ('"0668"', "'0668'"), ('"rw-rw----"', "'rw-rw----'")],
    ids=["unquoted-octal", "unquoted-decimal", "bad-digit", "symbolic"],
)
def test_socket_mode_must_be_quoted_octal(tmp_path, raw, shown):
    message, file = load_error(tmp_path, f"socket_mode: {raw}\n")
    assert message == (
        f'{file}: socket_mode: expected an octal file mode in quotes such as "0660", got {shown}'
    )


# --- session settings --------------------------------------------------------------------


def test_session_settings_precedence(tmp_path):
    cfg = load(
        write(
            tmp_path,
            "defaults:\n  intra_op_threads: 2\n  inter_op_threads: 3\n  device: cpu\n"
            "models:\n  demo:\n    intra_op_threads: 8\n",
        )
    )
    model_yaml = Overrides({"intra_op_threads": 4, "graph_optimization": "basic"})
    settings = cfg.session_settings("demo", model_yaml)
    assert settings == SessionSettings(
        device="cpu",  # defaults
        intra_op_threads=8,  # models.demo wins over model.yaml
        inter_op_threads=3,  # defaults, untouched by the others
        graph_optimization="basic",  # model.yaml wins over defaults
    )
    # another model gets model.yaml over defaults, and no override
    other = cfg.session_settings("iris", model_yaml)
    assert other.intra_op_threads == 4
    assert other.graph_optimization == "basic"
    # no model.yaml: defaults, then the override
    assert cfg.session_settings("demo", Overrides()).intra_op_threads == 8
    assert cfg.session_settings("iris", Overrides()) == cfg.defaults


def test_session_settings_does_not_change_the_config():
    cfg = Config()
    cfg.session_settings("demo", Overrides({"intra_op_threads": 7}))
    assert cfg.defaults == SessionSettings()


def test_parse_model_yaml(tmp_path):
    file = write(tmp_path, "intra_op_threads: 2\ndevice: CPU\n", "model.yaml")
    assert parse_model_yaml(file) == Overrides({"intra_op_threads": 2, "device": "cpu"})
    assert parse_model_yaml(write(tmp_path, "", "empty.yaml")) == Overrides()


@pytest.mark.parametrize(
    ("text", "part"),
    [
        ("threads: 2\n", ": threads: unknown setting"),
        ("version: v1\n", ": version: unknown setting"),
        ("device: tpu\n", ": device: expected one of cpu, cuda, got 'tpu'"),
        ("intra_op_threads: 0\n", ": intra_op_threads: expected an integer from 1 to 256 or auto"),
        ("- 1\n", ": the top level: expected a mapping of settings"),
        ("device: [cpu\n", ": not valid YAML at line "),
    ],
    ids=["unknown", "version", "choice", "range", "not-a-map", "yaml"],
)
def test_parse_model_yaml_errors_name_the_file(tmp_path, text, part):
    folder = tmp_path / "demo" / "v1.0"
    folder.mkdir(parents=True)
    file = write(folder, text, "model.yaml")
    with pytest.raises(ConfigError) as info:
        parse_model_yaml(file)
    assert str(info.value).startswith(f"{file}{part}")


def test_parse_model_yaml_missing_file(tmp_path):
    file = tmp_path / "model.yaml"
    with pytest.raises(ConfigError) as info:
        parse_model_yaml(file)
    assert str(info.value).startswith(f"{file}: cannot read")


def test_parse_overrides_with_prefix():
    with pytest.raises(ConfigError) as info:
        parse_overrides({"device": 1}, "where.yaml", "models.x.")
    assert str(info.value) == "where.yaml: models.x.device: expected one of cpu, cuda, got 1"
    assert parse_overrides(None, "where.yaml") == Overrides()


def test_with_overrides_ignores_none():
    cfg = with_overrides(Config(), log_level="debug", socket=None)
    assert cfg.log_level == "debug"
    assert cfg.socket == DEFAULT_SOCKET


# --- the reference -----------------------------------------------------------------------


def test_reference_markdown_lists_every_setting():
    table = config.reference_markdown()
    for key in (
        "socket",
        "socket_mode",
        "workers.restart.backoff",
        "workers.start_timeout",
        "defaults.intra_op_threads",
        "models.NAME.device",
        "models.NAME.version",
    ):
        assert f"| `{key}` |" in table
    assert "| `socket_mode` | octal mode" in table


def test_reference_defaults_load_back_as_the_defaults(tmp_path):
    """Each default as the table shows it, written into a config file, gives that default."""
    rows = [row.split(" | ") for row in config.reference_markdown().splitlines()[2:]]
    checked = 0
    for cells in rows:
        key, shown = cells[0].strip("| `"), cells[2]
        if key.startswith("models."):
            continue
        assert shown.startswith("`")
        assert shown.endswith("`")
        data: dict = {}
        node = data
        *sections, last = key.split(".")
        for part in sections:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(shown[1:-1])
        file = write(tmp_path, yaml.safe_dump(data))
        loaded, default = load(file), Config()
        for part in key.split("."):
            loaded, default = getattr(loaded, part), getattr(default, part)
        assert loaded == default, f"{key}: the table shows {shown}"
        checked += 1
    assert checked >= 19  # every setting outside models:


def test_configuration_doc_contains_the_generated_reference():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert config.reference_markdown() in doc


# --- versions: state_dir, canary, on_demand, samples ----------------------------------------


def test_version_settings_load(tmp_path):
    text = ("state_dir: state\non_demand_idle: 90s\ncanary:\n"
            "  max_error_rate: 5%\n  window: 30s\n  min_requests: 3\n"
            "models:\n  demo:\n    on_demand: true\n    version: v1\n")  # fmt: skip
    cfg = load(write(tmp_path, text))
    assert cfg.state_dir == tmp_path / "state"
    assert cfg.on_demand_idle == 90.0
    assert (cfg.canary.max_error_rate, cfg.canary.window, cfg.canary.min_requests) == (0.05, 30, 3)
    assert cfg.models["demo"] == ModelConfig("v1", Overrides(), on_demand=True)
    assert Config().models.get("demo", ModelConfig()).on_demand is False


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("canary:\n  max_error_rate: 0%\n",
         "canary.max_error_rate: expected a share such as 20% or 0.2, above 0% and at most"
         " 100%, got '0%'"),
        ("canary:\n  max_error_rate: 1.5\n", "canary.max_error_rate: expected a share"),
        ("canary:\n  max_error_rate: lots\n", "canary.max_error_rate: expected a share"),
        ("canary:\n  max_error_rate: true\n", "canary.max_error_rate: expected a share"),
        ("models:\n  demo:\n    on_demand: yes please\n",
         "models.demo.on_demand: expected true or false, got 'yes please'"),
        ("models:\n  demo:\n    samples: []\n", "models.demo.samples: unknown setting"),
    ],
    ids=["zero-share", "above-one", "text", "bool-share", "on-demand", "samples-not-here"],
)  # fmt: skip
def test_version_settings_errors(tmp_path, text, expected):
    message, file = load_error(tmp_path, text)
    assert message.startswith(f"{file}: {expected}")


def test_model_yaml_samples(tmp_path):
    file = write(tmp_path, "samples:\n  - {x: [[1, 2, 3, 4]]}\n  - {x: [[0, 0, 0, 0]]}\n"
                           "intra_op_threads: 2\n", "model.yaml")  # fmt: skip
    parsed = parse_model_yaml(file)
    assert parsed.samples == ({"x": [[1, 2, 3, 4]]}, {"x": [[0, 0, 0, 0]]})
    assert parsed.session == {"intra_op_threads": 2}


@pytest.mark.parametrize("samples", ["{x: 1}", "[1, 2]", "[{}]", "[{1: [1]}]"])
def test_model_yaml_samples_must_be_maps_of_inputs(tmp_path, samples):
    file = write(tmp_path, f"samples: {samples}\n", "model.yaml")
    with pytest.raises(ConfigError) as info:
        parse_model_yaml(file)
    assert str(info.value).startswith(
        f"{file}: samples: expected a list of maps from input name to a value (nested lists)"
    )
