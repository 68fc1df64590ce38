"""The contract's id rule (exitrank.limits), one for both services: valid ids pass, each kind of bad id is
named, and the retriever wraps the same phrase in its own InvalidArgument."""

from __future__ import annotations

import pytest

from exitrank.limits import MAX_ID_BYTES, id_problem, version_problem
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
    ("u{0}", "'{' or '}'"),  # a hash tag: the id would choose its Redis Cluster slot
    ("item}", "'{' or '}'"),
    ("a\u202eb", "format characters"),  # right-to-left override
    ("ab\u200d", "format characters"),  # zero-width joiner
    ("\ufeffa", "format characters"),  # byte order mark
    ("x" * 4_000_000, f"at most {MAX_ID_BYTES} bytes"),
])
def test_bad_ids_are_named(value, phrase):
    problem = id_problem(value)
    assert problem is not None and phrase in problem
    with pytest.raises(InvalidArgument) as caught:
        check_id("item_ids[2]", value)
    assert caught.value.field == "item_ids[2]" and caught.value.message == problem


@pytest.mark.parametrize("value", ["", "gcn-1a2b3c4d5e6f", "v9", "emb.2024-01-01:7", "x" * 64])
def test_valid_embedding_versions_pass(value):
    assert version_problem(value) is None


@pytest.mark.parametrize(("value", "phrase"), [
    ("x" * 65, "at most 64 characters"), ("../gcn-1", "only letters, digits"), ("gcn 1", "only letters"),
    ("-gcn", "starting with a letter or digit"), ("gcn-1\n", "only letters"), (7, "must be a string"),
])
def test_bad_embedding_versions_are_named(value, phrase):
    problem = version_problem(value)
    assert problem is not None and phrase in problem
