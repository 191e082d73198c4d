"""The Redis key layout (DESIGN.md section 5), checked against exact strings."""

from __future__ import annotations

import pytest

from feature_store.errors import FeatureStoreError, InvalidKeyPartError
from feature_store.keys import COUNTERS_TS_FIELD, TS_FIELD, KeySpace, check_part


def test_default_layout_exact_strings() -> None:
    keys = KeySpace()
    assert keys.user_features("u42") == "mtl:feat:user:u42"
    assert keys.item_features("i7") == "mtl:feat:item:i7"
    assert keys.features("user", "u42") == "mtl:feat:user:u42"
    assert keys.features("item", "i7") == "mtl:feat:item:i7"
    assert keys.item_counters("i7") == "mtl:cnt:item:i7"
    assert keys.model_blob("ple", 3) == "mtl:model:ple:v:3"
    assert keys.model_meta("ple", 3) == "mtl:model:ple:meta:3"
    assert keys.model_latest("ple") == "mtl:model:ple:latest"
    assert keys.model_versions("ple") == "mtl:model:ple:versions"
    assert keys.model_seq("ple") == "mtl:model:ple:seq"
    assert keys.model_updates("ple") == "mtl:model:ple:updates"
    assert keys.health("learner") == "mtl:health:learner"


def test_custom_namespace_prefixes_every_key() -> None:
    keys = KeySpace(namespace="t0a1b2c3d4:")
    assert keys.user_features("u1") == "t0a1b2c3d4:feat:user:u1"
    assert keys.model_blob("mmoe", 12) == "t0a1b2c3d4:model:mmoe:v:12"
    assert keys.model_updates("mmoe") == "t0a1b2c3d4:model:mmoe:updates"
    assert KeySpace(namespace="prod:mtl:").health("scorer") == "prod:mtl:health:scorer"


def test_metadata_field_names() -> None:
    assert TS_FIELD == "_ts"
    assert COUNTERS_TS_FIELD == "_ts:counters"


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "a:b",
        "a b",
        "tab\there",
        "new\nline",
        "glob*",
        "what?",
        "[x]",
        "{tag}",
        "back\\slash",
        "nul\x00",
    ],
)
def test_ids_that_would_break_the_layout_are_rejected(bad: str) -> None:
    keys = KeySpace()
    for build in (keys.user_features, keys.item_features, keys.item_counters, keys.health):
        with pytest.raises(InvalidKeyPartError):
            build(bad)
    with pytest.raises(InvalidKeyPartError):
        keys.model_latest(bad)


def test_id_length_limit_is_in_utf8_bytes_and_configurable() -> None:
    keys = KeySpace(max_part_bytes=8)
    assert keys.user_features("a" * 8) == "mtl:feat:user:aaaaaaaa"
    with pytest.raises(InvalidKeyPartError, match="9 bytes"):
        keys.user_features("a" * 9)
    # 'ü' is two bytes in UTF-8: 4 of them fill the limit, 5 exceed it
    assert keys.item_features("ü" * 4) == "mtl:feat:item:" + "ü" * 4
    with pytest.raises(InvalidKeyPartError):
        keys.item_features("ü" * 5)
    assert check_part("x" * 256) == "x" * 256
    with pytest.raises(InvalidKeyPartError):
        check_part("x" * 257)


def test_non_string_ids_and_unknown_entities_are_rejected() -> None:
    keys = KeySpace()
    with pytest.raises(InvalidKeyPartError, match="must be a str"):
        keys.user_features(42)  # type: ignore[arg-type]  # the runtime check is under test
    with pytest.raises(InvalidKeyPartError, match="entity"):
        keys.features("shop", "s1")  # type: ignore[arg-type]  # the runtime check is under test


@pytest.mark.parametrize("bad", [0, -1, True, "3", 2.0])
def test_versions_must_be_positive_ints(bad: object) -> None:
    with pytest.raises(InvalidKeyPartError):
        KeySpace().model_blob("ple", bad)  # type: ignore[arg-type]  # runtime check under test


@pytest.mark.parametrize("bad", ["", "mtl", ":", "a b:", "a::", "{x}:"])
def test_namespaces_must_end_with_a_colon_and_hold_valid_parts(bad: str) -> None:
    with pytest.raises(InvalidKeyPartError):
        KeySpace(namespace=bad)


def test_errors_are_value_errors_of_the_package() -> None:
    with pytest.raises(ValueError) as caught:
        KeySpace().user_features("")
    assert isinstance(caught.value, FeatureStoreError)
