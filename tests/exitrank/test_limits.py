"""The contract's id rule (exitrank.limits), one for both services: valid ids pass, each kind of bad id is
named, and the retriever wraps the same phrase in its own InvalidArgument."""

from __future__ import annotations

import pytest

from exitrank.limits import MAX_ID_BYTES, id_problem
from retriever_svc.errors import InvalidArgument
from retriever_svc.records import check_id


@pytest.mark.parametrize("value", ["u1", "é" * (MAX_ID_BYTES // 2), "x" * MAX_ID_BYTES, "item with spaces"])
def test_valid_ids_pass(value):
    assert id_problem(value) is None
    assert check_id("user_id", value) == value


@pytest.mark.parametrize(("value", "phrase"), [
    ("", "non-empty string"),
    (None, "non-empty string"),
    (7, "non-empty string"),
    ("x" * (MAX_ID_BYTES + 1), f"at most {MAX_ID_BYTES} bytes"),
    ("é" * (MAX_ID_BYTES // 2 + 1), f"at most {MAX_ID_BYTES} bytes"),
    ("a\nb", "control characters"),
    ("a\x00b", "control characters"),
    ("a\ud800b", "unpaired surrogates"),
])
def test_bad_ids_are_named(value, phrase):
    problem = id_problem(value)
    assert problem is not None and phrase in problem
    with pytest.raises(InvalidArgument) as caught:
        check_id("item_ids[2]", value)
    assert caught.value.field == "item_ids[2]" and caught.value.message == problem
