"""The SPS table the causal/async policies use without --sps: profiled once per machine and setup,
cached on disk, re-profiled when the cached one is too short or unreadable."""

from __future__ import annotations

import os

from test_engine_helpers import tiny_target

from dspark_native import runtime


def test_profiled_once_then_read_from_the_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DSPARK_NATIVE_CACHE", str(tmp_path))
    target = tiny_target(32, seed=1, layers=2)
    t1 = runtime.cached_sps_table(target, 6, model_name="tiny")
    err = capsys.readouterr().err
    assert "[sps] profiling" in err and len(t1.sps) >= 6
    files = [f for f in os.listdir(tmp_path) if f.startswith("sps-")]
    assert len(files) == 1
    t2 = runtime.cached_sps_table(target, 4, model_name="tiny")
    assert "[sps] profiling" not in capsys.readouterr().err, "a table that covers the need is reused"
    assert t2.sps == t1.sps
    # another model name is another key; a longer need re-profiles
    runtime.cached_sps_table(target, 4, model_name="other")
    assert "[sps] profiling" in capsys.readouterr().err
    runtime.cached_sps_table(target, 12, model_name="tiny")
    assert "[sps] profiling" in capsys.readouterr().err
    # a corrupt cache file is profiled again, not an error
    for f in os.listdir(tmp_path):
        (tmp_path / f).write_text("{not json")
    t3 = runtime.cached_sps_table(target, 4, model_name="tiny")
    assert len(t3.sps) >= 4
