"""The demo world's identity model: determinism, ranges, and the voice-face links it claims."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from s2f.demo.identity import (
    AGE_RANGE,
    EYE_COLORS,
    ORIGIN_LANGUAGE,
    ORIGINS,
    TIMBRES,
    VTL_RANGE_CM,
    Identity,
    clip_variation,
    generate_identities,
    manifest_text,
    read_manifest,
    write_manifest,
)
from s2f.demo.render import ClipVariation, FaceAppearance


@pytest.fixture(scope="module")
def population() -> list[Identity]:
    return generate_identities(600, seed=3)


def test_manifest_is_byte_identical_per_seed_and_differs_across_seeds():
    first = manifest_text(generate_identities(40, seed=11))
    assert first == manifest_text(generate_identities(40, seed=11))
    assert first != manifest_text(generate_identities(40, seed=12))
    # Each identity has its own stream: a shorter world is a prefix of a longer one.
    assert manifest_text(generate_identities(10, seed=11)) == "".join(first.splitlines(True)[:10])


def test_manifest_round_trip(tmp_path: Path):
    identities = generate_identities(25, seed=5)
    path = write_manifest(identities, tmp_path / "world" / "identities.jsonl")
    assert read_manifest(path) == identities
    assert path.read_bytes() == manifest_text(read_manifest(path)).encode()


def test_missing_manifest_names_the_file(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
        read_manifest(tmp_path / "nothing.jsonl")


def test_attributes_respect_their_ranges(population: list[Identity]):
    espeak_lang = Path(__import__("espeakng_loader").get_data_path()) / "lang"
    voices = {path.name for path in espeak_lang.rglob("*") if path.is_file()}
    appearance_fields = {field.name for field in dataclasses.fields(FaceAppearance)}
    for identity in population:
        assert identity.gender in ("female", "male")
        assert AGE_RANGE[0] <= identity.age <= AGE_RANGE[1]
        assert identity.age_decade == identity.age - identity.age % 10
        assert identity.origin in ORIGINS
        assert identity.native_language == ORIGIN_LANGUAGE[identity.origin]
        assert identity.language in voices
        assert VTL_RANGE_CM[0] <= identity.vocal_tract_length <= VTL_RANGE_CM[1]
        assert 60.0 < identity.f0_hz < 350.0
        assert 120.0 <= identity.speaking_rate <= 230.0
        assert identity.voice_quality["timbre"] in TIMBRES
        assert 0.0 <= identity.voice_quality["breathiness"] <= 1.0
        appearance = identity.appearance
        assert set(appearance) == appearance_fields
        FaceAppearance(**appearance)
        for name in appearance_fields - {"hair_style", "hair_color", "eye_color"}:
            assert 0.0 <= appearance[name] <= 1.0, name
        for name in ("hair_color", "eye_color"):
            assert len(appearance[name]) == 3 and all(0.0 <= c <= 1.0 for c in appearance[name])
        assert appearance["hair_style"] in range(5)
        if identity.gender == "female":
            assert appearance["beard"] == 0.0


def test_every_origin_mixes_in_speakers_of_other_languages(population: list[Identity]):
    for origin in ORIGINS:
        group = [identity for identity in population if identity.origin == origin]
        other = [identity for identity in group if identity.speaks_other_language]
        assert 0.05 < len(other) / len(group) < 0.3, origin
        assert {identity.language for identity in other} <= set(ORIGIN_LANGUAGE.values()) - {
            ORIGIN_LANGUAGE[origin]
        }


def _column(identities: list[Identity], get) -> np.ndarray:
    return np.array([get(identity) for identity in identities], dtype=float)


def test_voice_links_hold_in_the_population(population: list[Identity]):
    females = [i for i in population if i.gender == "female"]
    males = [i for i in population if i.gender == "male"]
    assert _column(females, lambda i: i.f0_hz).mean() > 1.4 * _column(males, lambda i: i.f0_hz).mean()
    assert _column(males, lambda i: i.vocal_tract_length).mean() > _column(
        females, lambda i: i.vocal_tract_length
    ).mean() + 1.5
    for group in (females, males):
        size = _column(group, lambda i: i.appearance["face_width"] + i.appearance["jaw_width"])
        vtl = _column(group, lambda i: i.vocal_tract_length)
        assert np.corrcoef(size, vtl)[0, 1] > 0.5
    # Female F0 falls with age, male F0 much less.
    for group, low, high in ((females, -0.7, -0.2), (males, -0.3, 0.1)):
        slope = np.polyfit(_column(group, lambda i: i.age), _column(group, lambda i: i.f0_hz), 1)[0]
        assert low < slope < high
    skin = {o: _column([i for i in population if i.origin == o],
                       lambda i: i.appearance["skin_tone"]).mean() for o in ORIGINS}
    assert skin["east_african"] > skin["south_asian"] > skin["north_european"]
    eyes = {o: _column([i for i in population if i.origin == o],
                       lambda i: i.appearance["eye_height"]).mean() for o in ORIGINS}
    assert max(eyes.values()) - eyes["east_asian"] > 0.25 and eyes["east_asian"] == min(eyes.values())
    # Light eyes (nearest palette colour green, blue or grey) are mostly north European.
    def light(rgb) -> bool:
        return int(np.argmin(np.linalg.norm(np.subtract(EYE_COLORS, rgb), axis=1))) >= 3
    light_eyes = {o: np.mean([light(i.appearance["eye_color"]) for i in population if i.origin == o])
                  for o in ORIGINS}
    assert light_eyes["north_european"] > 0.5 > 0.2 > light_eyes["south_european"]
    assert light_eyes["east_african"] == light_eyes["east_asian"] == 0.0
    assert any(i.appearance["beard"] > 0 for i in males)
    assert any(i.appearance["beard"] == 0 for i in males)
    # Looks that read as gender: long hair, makeup, thinner brows for women.
    long_hair = {g: np.mean([i.appearance["hair_style"] == 3 for i in group])
                 for g, group in (("female", females), ("male", males))}
    assert long_hair["female"] > 0.35 and long_hair["male"] == 0
    assert all(i.appearance["makeup"] == 0 for i in males) and any(i.appearance["makeup"] > 0 for i in females)
    brows = {g: _column(group, lambda i: i.appearance["brow_thickness"]).mean()
             for g, group in (("female", females), ("male", males))}
    assert brows["male"] - brows["female"] > 0.2


def test_idiosyncratic_traits_carry_no_voice_information(population: list[Identity]):
    f0 = _column(population, lambda i: i.f0_hz)
    vtl = _column(population, lambda i: i.vocal_tract_length)
    for name in ("eye_spacing", "lip_thickness"):
        trait = _column(population, lambda i: i.appearance[name])
        assert abs(np.corrcoef(trait, f0)[0, 1]) < 0.12, name
        assert abs(np.corrcoef(trait, vtl)[0, 1]) < 0.12, name


def test_clip_variation_is_deterministic_and_renderable():
    identity = generate_identities(2, seed=0)[1]
    first = clip_variation(identity, 0, seed=4)
    assert first == clip_variation(identity, 0, seed=4)
    assert first != clip_variation(identity, 1, seed=4)
    assert set(first) == {field.name for field in dataclasses.fields(ClipVariation)}
    ClipVariation(**first)
    for index in range(50):
        variation = clip_variation(identity, index, seed=4)
        assert abs(variation["yaw_deg"]) <= 30 and 0.45 <= variation["scale"] <= 0.65
        assert all(0.0 <= c <= 1.0 for c in variation["center"])
