"""params.yaml loading: every bad key, type, range or override fails fast with a message naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf.config import ConfigError, Params, config_hash, flatten, load_params


def params_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_valid_file_and_defaults(tmp_path: Path) -> None:
    params = load_params(params_file(tmp_path, "sft:\n  learning_rate: 0.001\n  lora:\n    r: 4\n"))
    assert params.sft.learning_rate == 0.001
    assert params.sft.lora.r == 4
    assert params.reward == Params().reward


def test_project_params_file_is_valid() -> None:
    path = Path(__file__).resolve().parents[1] / "params.yaml"
    if not path.is_file():
        pytest.skip("no params.yaml in the project yet")
    assert isinstance(load_params(path), Params)


def test_missing_params_file_is_an_error_unless_defaults_are_asked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run from a folder without params.yaml, a stage refuses to start rather than use built-in defaults that differ
    from the shipped file (kl_coef 0.05 against 0.1) without a word."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ConfigError,
        match=rf"^params\.yaml: params file not found in {tmp_path}; pass --params FILE, "
        r"or --defaults for the built-in defaults$",
    ):
        load_params()
    assert load_params(defaults=True) == Params()
    assert load_params(None) == Params()


@pytest.mark.parametrize("text", ["", "# every section commented out\n", "null\n"])
def test_empty_params_file_is_an_error_unless_defaults_are_asked_for(tmp_path: Path, text: str) -> None:
    path = params_file(tmp_path, text)
    with pytest.raises(ConfigError, match=r"params\.yaml: empty; pass --params FILE, or --defaults"):
        load_params(path)
    assert load_params(path, defaults=True) == Params()


def test_missing_section_is_an_error_for_the_commands_that_read_it(tmp_path: Path) -> None:
    path = params_file(tmp_path, "sft:\n  epochs: 2\n")
    assert load_params(path, sections=("sft",)).sft.epochs == 2
    with pytest.raises(ConfigError, match=r"params\.yaml: no ppo section; add it, or pass --defaults"):
        load_params(path, sections=("sft", "ppo"))
    with pytest.raises(ConfigError, match=r"no ppo, gates sections; add them"):
        load_params(path, sections=("ppo", "gates"))
    assert load_params(path, sections=("ppo",), defaults=True).ppo == Params().ppo


def test_missing_named_params_file_fails(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"custom\.yaml: params file not found"):
        load_params(tmp_path / "custom.yaml")


@pytest.mark.parametrize(
    ("text", "key", "detail"),
    [
        ("sft:\n  learnig_rate: 0.1\n", "sft.learnig_rate", "unknown key"),
        ("sftt:\n  epochs: 1\n", "sftt", "unknown key"),
        ("sft:\n  learning_rate: fast\n", "sft.learning_rate", "'fast'"),
        ("sft:\n  learning_rate: 2\n", "sft.learning_rate", "less than or equal to 1"),
        ("sft:\n  epochs: 0\n", "sft.epochs", "greater than 0"),
        ("sft:\n  lora:\n    r: 0\n", "sft.lora.r", "greater than or equal to 1"),
        ("sft:\n  lr_scheduler: cosin\n", "sft.lr_scheduler", "'cosin'"),
        ("reward:\n  batch_size: [1, 2]\n", "reward.batch_size", "valid integer"),
    ],
)
def test_bad_value_in_file_names_key(text: str, key: str, detail: str, tmp_path: Path) -> None:
    path = params_file(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_params(path)
    message = str(error.value)
    assert message.startswith(f"{path}: {key}: ")
    assert detail in message


def test_cross_field_check_names_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"pretrain\.architecture: .*divisible by n_head"):
        load_params(params_file(tmp_path, "pretrain:\n  architecture:\n    n_embd: 130\n    n_head: 4\n"))


def test_several_problems_are_counted(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\(and 1 more\)"):
        load_params(params_file(tmp_path, "sft:\n  epochs: 0\n  batch_size: 0\n"))


def test_invalid_yaml_names_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"params\.yaml:3: not valid YAML"):
        load_params(params_file(tmp_path, "sft:\n  epochs: 1\n  bad: a: b\n"))


def test_top_level_must_be_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_params(params_file(tmp_path, "- sft\n- reward\n"))


def test_set_override_parses_yaml_values(tmp_path: Path) -> None:
    path = params_file(tmp_path, "sft:\n  epochs: 3\n")
    params = load_params(path, ["sft.epochs=2", "pretrain.base_model=gpt2", "sft.lora.enabled=true"])
    assert params.sft.epochs == 2.0 and isinstance(params.sft.epochs, float)
    assert params.pretrain.base_model == "gpt2"
    assert params.sft.lora.enabled is True
    # The file itself is not changed by overrides, and later overrides win.
    assert load_params(path).sft.epochs == 3.0
    assert load_params(path, ["sft.epochs=2", "sft.epochs=5"]).sft.epochs == 5.0


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("sft.learning_rate", r"--set 'sft\.learning_rate': expected section\.key=value"),
        ("=3", r"--set '=3': expected section\.key=value"),
        ("sft.learning_rate.x=1", r"--set sft\.learning_rate\.x=?.*'learning_rate' is a value, not a section"),
        ("sft.learning_rate=abc", r"with --set overrides: sft\.learning_rate: .*'abc'"),
        ("sft.learning_rate=5", r"with --set overrides: sft\.learning_rate: .*less than or equal to 1"),
        ("sft.no_such_key=1", r"with --set overrides: sft\.no_such_key: unknown key"),
    ],
)
def test_bad_override_names_key(override: str, pattern: str, tmp_path: Path) -> None:
    path = params_file(tmp_path, "sft:\n  learning_rate: 0.001\n")
    with pytest.raises(ConfigError, match=pattern):
        load_params(path, [override])


def test_override_null_and_skip_rule(tmp_path: Path) -> None:
    path = params_file(tmp_path, "pretrain:\n  base_model: gpt2\n  enabled: false\n")
    assert load_params(path).pretrain.enabled is False
    with pytest.raises(ConfigError, match=r"pretrain: .*needs base_model"):
        load_params(path, ["pretrain.base_model=null"])


def test_flatten_and_hash() -> None:
    params = Params()
    flat = flatten(params.sft, "sft")
    assert flat["sft.learning_rate"] == params.sft.learning_rate
    assert flat["sft.lora.r"] == params.sft.lora.r
    changed = load_params(None, ["sft.learning_rate=0.001"])
    assert config_hash(params.sft) == config_hash(Params().sft)
    assert config_hash(changed.sft) != config_hash(params.sft)


@pytest.mark.parametrize(
    "override",
    [
        "gates.output_dir=s3://bucket/gates",
        "registry.output=s3://bucket/r.json",
        "gates.reward_metrics=s3://bucket/metrics/reward.json",
    ],
)
def test_metrics_and_verdict_files_must_be_local(override: str, tmp_path: Path) -> None:
    """Models and datasets may live on s3://; the small files DVC and the gates read may not, and the error says
    which key and why."""
    section, _, rest = override.partition(".")
    key = rest.split("=")[0]
    with pytest.raises(
        ConfigError,
        match=rf"^defaults with --set overrides: {section}: .*{key}: metrics, verdicts "
        r"and registry records are local files",
    ):
        load_params(None, [override])
    assert load_params(None, ["sft.output_dir=s3://bucket/models/sft"]).sft.output_dir == "s3://bucket/models/sft"
