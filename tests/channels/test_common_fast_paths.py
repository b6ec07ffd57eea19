"""The hot-path helpers of channels.common keep the plain semantics they were optimised from."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from channels.common import opt, opt_str, to_e164

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["a", "b", "0"]), inner, max_size=3)
    ),
    max_leaves=8,
)
paths = st.lists(st.sampled_from(["a", "b", "0"]) | st.integers(-3, 3), max_size=3)


def reference_opt(obj: Any, *path: str | int) -> Any:
    for step in path:
        if isinstance(step, int):
            if not isinstance(obj, list) or not -len(obj) <= step < len(obj):
                return None
            obj = obj[step]
        else:
            if not isinstance(obj, dict):
                return None
            obj = obj.get(step)
        if obj is None:
            return None
    return obj


def reference_opt_str(obj: Any, *path: str | int) -> str | None:
    value = reference_opt(obj, *path)
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return str(value)
    return value if isinstance(value, str) and value != "" else None


@given(json_values, paths)
def test_opt_and_opt_str_match_the_reference(obj: Any, path: list[str | int]) -> None:
    assert opt(obj, *path) == reference_opt(obj, *path)
    assert opt_str(obj, *path) == reference_opt_str(obj, *path)


def test_to_e164_cache_gives_the_same_answer_each_time() -> None:
    for _ in range(3):
        assert to_e164(" 030 1234567 ", "DE") == "+49301234567"
        assert to_e164("030 1234567", "US") == "+10301234567"  # the region is part of the key
        assert to_e164("pchero", "DE") == "pchero"
        assert to_e164("   ", "DE") is None
