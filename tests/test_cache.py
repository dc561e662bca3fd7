import torch

from cgd_defense.harness.cache import Cache


def test_hit_miss_and_invalidation_on_spec_change(tmp_path):
    cache = Cache(tmp_path)
    calls = []

    def compute(v):
        calls.append(v)
        return {"x": torch.full((3,), float(v))}

    a = cache.get_or_compute("stage", {"lr": 0.1}, lambda: compute(1))
    b = cache.get_or_compute("stage", {"lr": 0.1}, lambda: compute(2))
    c = cache.get_or_compute("stage", {"lr": 0.2}, lambda: compute(3))
    assert calls == [1, 3]
    assert torch.equal(a["x"], b["x"]) and c["x"][0] == 3
    assert len(cache.hits) == 1 and len(cache.misses) == 2


def test_corrupted_entry_is_detected_and_recomputed(tmp_path):
    cache = Cache(tmp_path)
    cache.get_or_compute("stage", {"k": 1}, lambda: {"x": torch.ones(100)})
    path = cache.path("stage", cache.key("stage", {"k": 1}))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    out = cache.get_or_compute("stage", {"k": 1}, lambda: {"x": torch.zeros(100)})
    assert out["x"].sum() == 0  # recomputed, the flipped byte was not trusted
    assert cache.get_or_compute("stage", {"k": 1}, lambda: {"x": torch.ones(100)})["x"].sum() == 0


def test_truncated_entry_is_recomputed(tmp_path):
    cache = Cache(tmp_path)
    cache.get_or_compute("s", {"k": 2}, lambda: {"x": torch.ones(10)})
    path = cache.path("s", cache.key("s", {"k": 2}))
    path.write_bytes(path.read_bytes()[:20])
    assert cache.get_or_compute("s", {"k": 2}, lambda: {"x": torch.full((10,), 7.0)})["x"][0] == 7


def test_no_temporary_files_left(tmp_path):
    cache = Cache(tmp_path)
    cache.get_or_compute("s", {"k": 3}, lambda: {"x": torch.ones(2)})
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
