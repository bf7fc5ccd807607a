import threading

import pytest

from mocd_train.atomic import atomic_dir, atomic_write_text


def test_a_failed_write_leaves_the_old_folder_and_no_temporary(tmp_path):
    final = tmp_path / "model"
    with atomic_dir(final) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("killed mid-save")
    assert (final / "weights").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    with atomic_dir(final) as tmp:  # a complete second write replaces the first
        (tmp / "weights").write_text("v2")
    assert (final / "weights").read_text() == "v2" and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_concurrent_writers_never_share_a_temporary_name(tmp_path):
    errors = []

    def write(i):
        try:
            for _ in range(20):
                atomic_write_text(tmp_path / "shared.json", f"{i}" * 1000)
                with atomic_dir(tmp_path / "folder") as tmp:
                    (tmp / "x").write_text(str(i))
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    text = (tmp_path / "shared.json").read_text()
    assert len(set(text)) == 1 and len(text) == 1000  # one writer's whole file
    assert errors == []
    assert (tmp_path / "folder" / "x").read_text().isdigit()
