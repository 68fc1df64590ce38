
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


def test_a_manifest_cannot_point_outside_or_leave_files_unlisted(tmp_path):
    """A manifest is data from disk: its version must be its files' hash (``../x`` would name a path
    outside releases/), its paths stay inside, and every file the services would load is listed."""
    import json

    manifest = _make(tmp_path)
    path = tmp_path / "manifest.json"
    for edit, expected in ((lambda m: m.update(version="../x"), "not the hash of its files"),
                           (lambda m: m["files"].update({"../outside.bin": "0" * 64}), "stay inside"),
                           (lambda m: m["files"].update({"/etc/passwd": "0" * 64}), "stay inside")):
        edited = json.loads(json.dumps(manifest))
        edit(edited)
        path.write_text(json.dumps(edited))
        with pytest.raises(ManifestError, match=expected):
            verify_manifest(tmp_path)
    path.write_text(json.dumps(manifest))
    verify_manifest(tmp_path)
    (tmp_path / "ranker" / "extra.safetensors").write_bytes(b"dropped in later")
    with pytest.raises(ManifestError, match="ranker/extra.safetensors is not in the manifest"):
        verify_manifest(tmp_path, subdir="ranker")
    verify_manifest(tmp_path, subdir="gcn")  # another subtree: not what that service loads
    (tmp_path / "ranker" / ".staging-tmp").write_bytes(b"hidden")  # hidden names are not artifacts
    (tmp_path / "ranker" / "extra.safetensors").unlink()
    verify_manifest(tmp_path)
