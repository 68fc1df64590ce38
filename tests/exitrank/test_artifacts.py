
import pytest

from exitrank.artifacts import ManifestError, read_manifest, verify_manifest, write_manifest


def _make(tmp_path):
    (tmp_path / "gcn").mkdir()
    (tmp_path / "gcn" / "a.bin").write_bytes(b"\x00" * 100)
    (tmp_path / "ranker").mkdir()
    (tmp_path / "ranker" / "b.json").write_text('{"x": 1}')
    return write_manifest(tmp_path, config={"preset": "tiny"}, data_hash="abc", metrics={"auc": 0.7})


def test_round_trip_and_version_is_content_addressed(tmp_path):
    manifest = _make(tmp_path)
    assert set(manifest["files"]) == {"gcn/a.bin", "ranker/b.json"}
    assert verify_manifest(tmp_path)["version"] == manifest["version"]
    again = write_manifest(tmp_path, config={}, data_hash="abc", metrics={})
    assert again["version"] == manifest["version"]
    (tmp_path / "ranker" / "b.json").write_text('{"x": 2}')
    changed = write_manifest(tmp_path, config={}, data_hash="abc", metrics={})
    assert changed["version"] != manifest["version"]


def test_truncated_file_is_refused_naming_it(tmp_path):
    _make(tmp_path)
    (tmp_path / "gcn" / "a.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(ManifestError, match="gcn/a.bin"):
        verify_manifest(tmp_path)
    # a check limited to the ranker's files still passes
    verify_manifest(tmp_path, subdir="ranker")


def test_missing_file_and_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="missing"):
        read_manifest(tmp_path)
    _make(tmp_path)
    (tmp_path / "ranker" / "b.json").unlink()
    with pytest.raises(ManifestError, match="missing"):
        verify_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(tmp_path)
