"""Compile policy: the auto decision, its record and the cache folder (no compilation here)."""

import json

import torch

from otherview import compiling

KLEIN_4B = {"attention_head_dim": 128, "num_attention_heads": 24, "num_layers": 5, "num_single_layers": 20,
            "mlp_ratio": 3.0, "joint_attention_dim": 7680, "in_channels": 128}
LAYOUT = {"unit_width": 16, "n_sites": 25}


def _cuda():
    return torch.device("cuda")


def test_cache_root_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("OTHERVIEW_CACHE", str(tmp_path / "ov"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    assert compiling.cache_root() == tmp_path / "ov"
    folder = compiling.use_cache_dir()
    assert folder == tmp_path / "ov" / "inductor" and folder.is_dir()
    import os

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compiling.use_cache_dir() == tmp_path / "mine"  # the user's choice is kept


def test_auto_decides_from_work_and_cache_state(monkeypatch, tmp_path):
    monkeypatch.setenv("OTHERVIEW_CACHE", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setattr(compiling, "compile_key", lambda *a: {"k": a[1], "b": a[2]})  # no CUDA query here
    # The plantain run (60 passes, one evaluation each, 8704 tokens): ~10 s eager, ~3 s to save.
    small = compiling.decide("auto", _cuda(), KLEIN_4B, 20, 8704, 60, LAYOUT)
    assert not small.compile and small.cache_state == "cold" and "cold compile costs" in small.reason
    assert 8 < small.estimate["eager_probe_s"] < 14
    big = compiling.decide("auto", _cuda(), KLEIN_4B, 20, 8704, 2000, LAYOUT)
    assert big.compile and "saves" in big.reason
    # Once a key has compiled here (its marker says how long a warm compile took), auto uses that.
    clock = compiling.BatchClock()
    clock.times = [4.0, 2.5, 2.5]
    small.compile = True
    clock.finish(small)
    assert small.compile_seconds == 1.5
    (tmp_path / "inductor" / "x").write_text("")  # torch's cache is not empty
    again = compiling.decide("auto", _cuda(), KLEIN_4B, 20, 8704, 60, LAYOUT)
    assert again.cache_state == "warm" and again.key == small.key
    assert again.estimate["compile_cost_s"] == compiling.WARM_COMPILE_S  # no warm time measured yet
    clock = compiling.BatchClock()
    clock.times = [3.5, 2.5, 2.5]
    again.compile = True
    clock.finish(again)
    third = compiling.decide("auto", _cuda(), KLEIN_4B, 20, 8704, 60, LAYOUT)
    assert third.estimate["compile_cost_s"] == 1.0 and third.compile
    json.dumps(third.record())  # goes into the manifest as it is


def test_off_and_cpu_never_compile(monkeypatch, tmp_path):
    monkeypatch.setenv("OTHERVIEW_CACHE", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    off = compiling.decide("off", _cuda(), KLEIN_4B, 20, 8704, 10**6, LAYOUT)
    assert not off.compile and off.reason == "runtime.compile = 'off'"
    cpu = compiling.decide("auto", torch.device("cpu"), KLEIN_4B, 20, 8704, 10**6, LAYOUT)
    assert not cpu.compile and "cpu" in cpu.reason
    assert compiling.decide("on", torch.device("cpu"), KLEIN_4B, 2, 8704, 1, LAYOUT).compile


def test_backends_checked_without_dynamo_are_torchs_own():
    """checks names these backends known without listing torch's (which imports every backend module)."""
    import torch._dynamo

    from otherview.checks import TORCH_COMPILE_BACKENDS

    assert set(TORCH_COMPILE_BACKENDS) <= set(torch._dynamo.list_backends(exclude_tags=()))
