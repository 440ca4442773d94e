import pytest

from doppel.fsutil import atomic_directory, atomic_write_text


def test_failed_directory_write_leaves_nothing(tmp_path):
    final = tmp_path / "adapter"
    with pytest.raises(RuntimeError), atomic_directory(final) as tmp:
        (tmp / "adapter_config.json").write_text("{}")
        raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []


def test_directory_appears_whole_and_replace_swaps(tmp_path):
    final = tmp_path / "adapter"
    with atomic_directory(final) as tmp:
        (tmp / "a").write_text("1")
    with atomic_directory(final, replace=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in final.iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_atomic_write_text(tmp_path):
    target = tmp_path / "sub" / "samples.jsonl"
    atomic_write_text(target, "x\n")
    assert target.read_text() == "x\n"
    assert [p.name for p in target.parent.iterdir()] == ["samples.jsonl"]
