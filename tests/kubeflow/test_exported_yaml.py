"""The compiled YAMLs committed at the top of the repository (components/, pipelines/) are what the code compiles
today, byte for byte, and load with kfp. Regenerate them with `.venv/bin/rlhf pipeline export`."""

# No `from __future__ import annotations`: kfp reads the replacement component's annotations as types.
from pathlib import Path

import pytest
from kfp import components

from rlhf.pipelines.rlhf_pipeline import COMPONENTS_DIR, PIPELINES_DIR, export
from rlhf.steps import SECTIONS, STEP_NAMES, STEPS

KNOBS = {f"{step.name}_{key}" for step in STEPS for key in step.knobs}

REPO = Path(__file__).resolve().parents[2]


def stale_files(fresh: Path) -> list[str]:
    """The committed files that differ from (or are missing in, or are absent from) a fresh export in `fresh`."""

    def files(root: Path) -> dict[str, bytes]:
        return {
            path.relative_to(root).as_posix(): path.read_bytes()
            for folder in (COMPONENTS_DIR, PIPELINES_DIR)
            for path in sorted((root / folder).glob("*.yaml"))
        }

    committed, regenerated = files(REPO), files(fresh)
    return sorted(
        name for name in committed.keys() | regenerated.keys() if committed.get(name) != regenerated.get(name)
    )


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("export")
    export(REPO, output)
    return output


def test_committed_yamls_are_what_the_code_compiles(fresh: Path) -> None:
    stale = stale_files(fresh)
    assert not stale, f"stale compiled YAML: {', '.join(stale)}; regenerate with `.venv/bin/rlhf pipeline export`"


def test_every_step_has_a_component_and_every_file_loads_with_kfp() -> None:
    names = {path.stem for path in (REPO / COMPONENTS_DIR).glob("*.yaml")}
    assert names == {*STEP_NAMES, "close_pipeline_run"}
    pipelines = {path.stem for path in (REPO / PIPELINES_DIR).glob("*.yaml")}
    assert pipelines == {"rlhf_pipeline", *(path.stem for path in (REPO / "recipes").glob("*.yaml"))}
    for path in sorted((REPO / COMPONENTS_DIR).glob("*.yaml")):
        assert components.load_component_from_file(str(path)).name.replace("-", "_") == path.stem
    for path in sorted((REPO / PIPELINES_DIR).glob("*.yaml")):
        inputs = set(components.load_component_from_file(str(path)).component_spec.inputs)
        assert inputs == {*SECTIONS, "data_source", *KNOBS}
    sft = components.load_component_from_file(str(REPO / COMPONENTS_DIR / "sft.yaml")).component_spec
    assert set(sft.inputs) == {"params", "learning_rate", "epochs", "kfp_run_id", "dataset", "base_model"}
    assert set(sft.outputs) == {"model", "metrics"}


def test_a_changed_component_signature_makes_the_committed_yaml_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the freshness test catches: a new input on the sft component, not regenerated."""
    from kfp.dsl import Dataset, Input, Metrics, Model, Output

    from rlhf.components import definitions

    def sft(
        params: dict,
        learning_rate: float,
        epochs: float,
        kfp_run_id: str,
        dataset: Input[Dataset],
        base_model: Input[Model],
        model: Output[Model],
        metrics: Output[Metrics],
        seed: int = 0,
    ):
        from rlhf.components import steps

        steps.sft(
            section=params,
            data_dir=dataset.path,
            base_dir=base_model.path,
            model_dir=model.path,
            metrics_artifact=metrics,
            kfp_run_id=kfp_run_id,
            learning_rate=learning_rate,
            epochs=epochs,
        )

    monkeypatch.setattr(definitions, "sft", sft)
    export(REPO, tmp_path)
    stale = stale_files(tmp_path)
    # the component and every pipeline that embeds it
    assert stale == [
        "components/sft.yaml",
        *sorted(f"pipelines/{path.name}" for path in (REPO / PIPELINES_DIR).glob("*.yaml")),
    ]
