"""benchmarks/launch_override.py: LINATTN_LAUNCH strings change the launch settings they name, and only those."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from benchmarks import launch_override  # noqa: E402
from linattn.ops.gated_delta_rule import triton as delta  # noqa: E402
from linattn.ops.gla import triton as gla  # noqa: E402


def test_overrides_reach_the_launch_tables(monkeypatch):
    monkeypatch.setattr(gla, "_launch", gla._launch)  # restored after the test, as are the two below
    monkeypatch.setitem(delta.NUM_WARPS, "forward", delta.NUM_WARPS["forward"])
    monkeypatch.setitem(delta.LOWP_DOTS, "forward", delta.LOWP_DOTS["forward"])
    before = gla._launch(torch.bfloat16, 128, 128)
    applied = launch_override.apply(
        "gla.intra.BK=64; gla.dqkg.num_warps=8;gated_delta_rule.NUM_WARPS.forward=8;"
        "gated_delta_rule.LOWP_DOTS.forward=1"
    )
    assert applied == [
        "gla.intra.BK=64",
        "gla.dqkg.num_warps=8",
        "gated_delta_rule.NUM_WARPS.forward=8",
        "gated_delta_rule.LOWP_DOTS.forward=1",
    ]
    after = gla._launch(torch.bfloat16, 128, 128)
    assert (after["intra"]["BK"], after["dqkg"]["num_warps"]) == (64, 8)
    assert {n: c for n, c in after.items() if n not in ("intra", "dqkg")} == {
        n: c for n, c in before.items() if n not in ("intra", "dqkg")
    }
    assert delta.NUM_WARPS["forward"] == 8 and delta.LOWP_DOTS["forward"] is True


@pytest.mark.parametrize(
    "spec, match",
    [
        ("gla.intra.BK", "expected"),
        ("gla.intra.BK=x", "expected"),
        ("NUM_WARPS=4", "expected"),
        ("gated_delta_rule.NUM_WARPS.nope=4", "no entry 'nope'"),
        ("gated_delta_rule.SEGMENT_HEADS=0", "is a table .*gated_plain.*SEGMENT_HEADS.gated_plain=<int>"),
    ],
)
def test_bad_strings_raise_naming_the_variable(spec, match):
    with pytest.raises(ValueError, match=f"LINATTN_LAUNCH: .*{match}"):
        launch_override.apply(spec)


def test_unknown_gla_kernel_raises_when_the_table_is_built(monkeypatch):
    monkeypatch.setattr(gla, "_launch", gla._launch)
    launch_override.apply("gla.nope.BK=16")
    with pytest.raises(ValueError, match="no kernel 'nope'"):
        gla._launch(torch.bfloat16, 128, 128)
