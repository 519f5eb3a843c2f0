"""Engines by name: ``model.backend`` picks the engine; an unknown name stops start-up clearly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from streamer.config import ConfigError, ModelConfig
from streamer.inference.registry import BACKENDS, create_engine, engine_factory


def test_the_default_backend_is_transformers_and_is_registered() -> None:
    """A config that names no backend gets transformers, which the registry knows."""
    assert ModelConfig().backend == "transformers"
    assert engine_factory("transformers") is BACKENDS["transformers"]


def test_an_unknown_backend_is_a_config_error_naming_the_field() -> None:
    """create_engine refuses a backend nobody registered, naming model.backend and the known ones."""
    with pytest.raises(ConfigError, match=r"model\.backend: unknown engine 'vllm' \(known: openai, transformers\)"):
        create_engine(ModelConfig(backend="vllm"))


def test_choosing_a_backend_imports_no_engine() -> None:
    """Importing the registry and looking a backend up leaves torch unimported (the CLI checks it early)."""
    code = (
        "import sys, streamer.inference.registry as r; r.engine_factory('transformers'); print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_serve_with_an_unknown_backend_exits_2_before_loading_anything(tmp_path: Path) -> None:
    """`streamer serve` stops at once with exit code 2 and the field's name."""
    config = tmp_path / "bad.yaml"
    config.write_text("sources: [{name: cam, url: demo}]\nmodel: {backend: nope}\n")
    done = subprocess.run(
        [sys.executable, "-m", "streamer.cli", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "model.backend: unknown engine 'nope'" in done.stderr


def test_an_engine_that_overrides_neither_generate_nor_generate_batch_says_so() -> None:
    """generate and generate_batch default to each other: an engine with neither fails clearly, not by recursion."""
    from streamer.inference.engine import Engine, GenerationRequest

    class Nothing(Engine):
        model_id = "nothing"

    request = GenerationRequest(frames=[], question="?", max_new_tokens=1, sample_fps=1.0)
    with pytest.raises(NotImplementedError, match="Nothing overrides neither generate nor generate_batch"):
        Nothing().generate(request, lambda piece: None, lambda: False)
    with pytest.raises(NotImplementedError):
        Nothing().generate_batch([request], [lambda piece: None], [lambda: False])
