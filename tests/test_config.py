from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from streamer.config import (
    DEMO_CONFIG,
    ConfigError,
    Settings,
    apply_overrides,
    load_settings,
    parse_settings,
    source_kind,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", ["demo.yaml", "webcam.yaml", "rtsp.yaml"])
def test_example_configs_load(name: str) -> None:
    settings = load_settings(CONFIGS / name)
    assert isinstance(settings, Settings) and settings.sources


def test_demo_yaml_is_the_built_in_demo_config() -> None:
    assert load_settings(CONFIGS / "demo.yaml") == parse_settings(DEMO_CONFIG)


def test_webcam_config_uses_the_hub_model() -> None:
    s = load_settings(CONFIGS / "webcam.yaml")
    assert s.model.id == "Qwen/Qwen2-VL-2B-Instruct"
    assert s.sources[0].kind == "webcam"


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("demo", "demo"),
        ("0", "webcam"),
        ("/dev/video2", "webcam"),
        ("rtsp://user:pw@10.0.0.1/stream", "rtsp"),
        ("http://example/stream.m3u8", "rtsp"),
        ("videos/clip.mp4", "file"),
        ("file:///tmp/clip.mp4", "file"),
        ("push", "push"),
    ],
)
def test_source_kind(url: str, kind: str) -> None:
    assert source_kind(url) == kind


def test_invalid_field_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"sources": [{"name": "cam", "url": "demo", "sample_fps": -1}]}))
    with pytest.raises(ConfigError) as info:
        load_settings(bad)
    assert "sources.0.sample_fps" in str(info.value)
    assert str(bad) in str(info.value)


def test_unknown_key_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"model\.frame_count"):
        parse_settings({"sources": [{"name": "a", "url": "demo"}], "model": {"frame_count": 8}})


def test_duplicate_source_names_refused() -> None:
    with pytest.raises(ConfigError, match="repeated: a"):
        parse_settings({"sources": [{"name": "a", "url": "demo"}, {"name": "a", "url": "0"}]})


def test_min_pixels_above_max_refused() -> None:
    with pytest.raises(ConfigError, match="min_pixels"):
        parse_settings({"sources": [{"name": "a", "url": "demo"}], "model": {"min_pixels": 10**6, "max_pixels": 10**5}})


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.yaml")
    (tmp_path / "x.yaml").write_text("sources: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(tmp_path / "x.yaml")
    (tmp_path / "y.yaml").write_text("- a list")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(tmp_path / "y.yaml")


def test_flags_override_the_file() -> None:
    s = apply_overrides(
        DEMO_CONFIG,
        sources=["demo=clip.mp4", "door=rtsp://cam/1"],
        model="some/model",
        host="0.0.0.0",
        port=9000,
        tokens=["s3cret"],
    )
    assert [(x.name, x.url) for x in s.sources] == [("demo", "clip.mp4"), ("door", "rtsp://cam/1")]
    assert s.sources[0].max_side == 448  # the rest of the replaced source's settings stay
    assert s.model.id == "some/model" and s.model.frames == 8
    assert (s.server.host, s.server.port) == ("0.0.0.0", 9000)
    assert [t.get_secret_value() for t in s.server.tokens] == ["s3cret"]
    assert "s3cret" not in repr(s)  # tokens stay out of logs and reprs
    assert DEMO_CONFIG["sources"][0]["url"] == "demo"  # the built-in config is not mutated


def test_bad_flag_values() -> None:
    with pytest.raises(ConfigError, match="NAME=URL"):
        apply_overrides(DEMO_CONFIG, sources=["just-a-url"])
    with pytest.raises(ConfigError, match=r"server\.port"):
        apply_overrides(DEMO_CONFIG, port=70000)
    with pytest.raises(ConfigError, match="sources"):
        apply_overrides(DEMO_CONFIG, sources=["bad name!=demo"])


@pytest.mark.parametrize(
    "section",
    [
        {"sources": [{"name": "a", "url": "demo", "backoff_initial_s": 10, "backoff_max_s": 5}]},
        {
            "sources": [{"name": "a", "url": "demo"}],
            "model": {"backend": "openai", "base_url": "http://127.0.0.1:1/v1", "backend_backoff_s": 60},
        },
        {
            "sources": [{"name": "a", "url": "demo"}],
            "events": {"webhooks": [{"url": "http://127.0.0.1:1/h", "backoff_initial_s": 600, "backoff_max_s": 60}]},
        },
    ],
    ids=["source", "remote-engine", "webhook"],
)
def test_a_backoff_whose_first_wait_exceeds_its_longest_is_refused(section: dict) -> None:
    """Sources, the remote engine and webhooks alike: first wait above the longest is a config error naming both."""
    with pytest.raises(ConfigError, match="must not exceed"):
        parse_settings(section)
