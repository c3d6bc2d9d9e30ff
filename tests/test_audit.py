"""The audit: its JSON has the documented shape, its numbers are those of the library ops, its metrics mean what
they say on cases with known answers; and Hedgehog's distillation lowers its distance to softmax."""

from __future__ import annotations

import json
import math

import pytest
import torch

from linattn import audit, ops
from linattn.cli import main
from linattn.feature_maps import FavorPlus, Hedgehog, fit_hedgehog, kernel_attention, softmax_attention_weights


def test_cli_json_has_the_documented_shape_and_the_plot_is_written(tmp_path, capsys):
    out, png = tmp_path / "out.json", tmp_path / "out.png"
    argv = [
        "audit",
        "--mechanism",
        "performer",
        "--features",
        "8,16,32",
        "--seq-len",
        "48",
        "--head-dim",
        "8",
        "--temperature",
        "0.25",
        "--seeds",
        "2",
        "--json",
        str(out),
        "--plot",
        str(png),
    ]
    assert main(argv) == 0
    assert "performer" in capsys.readouterr().out
    result = json.loads(out.read_text())
    for key, kind in (("mechanism", str), ("head_dim", int), ("seq_len", int), ("temperature", float), ("sweep", list)):
        assert isinstance(result[key], kind), key
    assert (result["mechanism"], result["head_dim"], result["seq_len"], result["temperature"]) == (
        "performer",
        8,
        48,
        0.25,
    )
    assert [row["m"] for row in result["sweep"]] == [8, 16, 32]
    for row in result["sweep"]:
        assert isinstance(row["m"], int)
        for key in ("rel_err_mean", "rel_err_std", "tv_mean"):
            assert isinstance(row[key], float) and math.isfinite(row[key]), key
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_numbers_match_the_library_functions(tmp_path):
    out = tmp_path / "out.json"
    assert (
        main(
            [
                "audit",
                "--mechanism",
                "performer",
                "--features",
                "16",
                "--seq-len",
                "40",
                "--head-dim",
                "8",
                "--temperature",
                "0.5",
                "--seeds",
                "2",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    row = json.loads(out.read_text())["sweep"][0]
    # the same computation by hand, through the public ops
    q, k, v = audit.draw_inputs(8, 40, 0.5, seed=0)
    exact, _ = ops.softmax_attn(q, k, v, causal=False)
    P = torch.softmax(torch.einsum("bthk,bshk->bhts", q, k) * 8**-0.5, -1)
    errs, tvs = [], []
    for seed in (0, 1):
        phi = FavorPlus(8, 16, seed=audit.FEATURE_SEED_OFFSET + seed)
        o, _ = ops.linear_attn(q, k, v, feature_map=phi, normalize=True, causal=False)
        errs.append(((o - exact).norm(dim=-1) / exact.norm(dim=-1)).mean().item())
        A = kernel_attention(phi, q, k, eps=1e-6, scale=8**-0.5)
        tvs.append(0.5 * (A - P).abs().sum(-1).mean().item())
    mean = sum(errs) / 2
    assert row["rel_err_mean"] == pytest.approx(mean, rel=1e-12)
    assert row["rel_err_std"] == pytest.approx(abs(errs[0] - errs[1]) / 2, rel=1e-9)
    assert row["tv_mean"] == pytest.approx(sum(tvs) / 2, rel=1e-12)


def test_cli_refuses_causal_linformer_with_the_reason(capsys):
    argv = ["audit", "--mechanism", "linformer", "--features", "8", "--seq-len", "32", "--head-dim", "8", "--causal"]
    assert main(argv) == 2
    assert "future" in capsys.readouterr().err


def test_cli_reads_a_tensor_file(tmp_path):
    q, k, v = audit.draw_inputs(8, 24, 0.25, seed=3, dtype=torch.float32)
    path = tmp_path / "qkv.pt"
    torch.save({"q": q[0, :, 0], "k": k[0, :, 0], "v": v[0, :, 0]}, path)  # [T, D] tensors
    out = tmp_path / "out.json"
    assert main(["audit", "--mechanism", "taylor", "--input", str(path), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["seq_len"] == 24 and result["head_dim"] == 8
    assert result["temperature"] == pytest.approx(audit.logit_std(q, k), rel=1e-6)


@pytest.mark.parametrize("rows", [1, 3])
def test_cli_fits_on_held_out_inputs(tmp_path, rows):
    """favor++ and hedgehog are never fitted on the tokens they are measured on: one row splits its tokens,
    several rows split the rows."""
    q, k, v = audit.draw_inputs(8, 30, 0.5, seed=3, dtype=torch.float32)
    q, k, v = (x.expand(rows, -1, -1, -1).contiguous() for x in (q, k, v))
    path, out = tmp_path / "qkv.pt", tmp_path / "out.json"
    torch.save({"q": q, "k": k, "v": v}, path)
    argv = ["audit", "--mechanism", "hedgehog", "--features", "8", "--seeds", "1", "--hedgehog-steps", "2"]
    assert main([*argv, "--input", str(path), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    if rows == 1:
        expected = 15, "fitted on tokens [0, 15), audited on tokens [15, 30)"
    else:
        expected = 30, "fitted on rows [0, 1), audited on rows [1, 3)"
    assert (result["seq_len"], result["calibration"]) == expected


def test_sweep_never_fits_on_what_it_measures():
    """Without calibration inputs, favor++ fits half the rows and is measured on the other half."""
    q, k, v = audit.draw_inputs(8, 16, 0.5, seed=2, heads=1)
    q, k, v = (torch.cat([x, x.flip(1)]) for x in (q, k, v))  # two rows
    result = audit.sweep("favor++", q, k, v, [8], seeds=1)
    assert result["calibration"] == "fitted on rows [0, 1), audited on rows [1, 2)"
    assert "calibration" not in audit.sweep("performer", q, k, v, [8], seeds=1)


def test_hold_out_parts_are_disjoint():
    q, k, v = audit.draw_inputs(4, 9, 0.5, seed=0)
    (fq, fk), (aq, ak, av), _ = audit.hold_out(q, k, v)
    assert fq.shape[1] + aq.shape[1] == 9 and torch.equal(torch.cat([fq, aq], 1), q)
    assert torch.equal(torch.cat([fk, ak], 1), k) and torch.equal(av, v[:, 4:])
    with pytest.raises(ValueError, match="T >= 2"):
        audit.hold_out(q[:, :1], k[:, :1], v[:, :1])


def test_cli_calibration_file(tmp_path, capsys):
    q, k, v = audit.draw_inputs(8, 20, 0.5, seed=3, dtype=torch.float32)
    cq, ck, cv = audit.draw_inputs(8, 20, 0.5, seed=4, dtype=torch.float32)
    path, cal, out = tmp_path / "qkv.pt", tmp_path / "cal.pt", tmp_path / "out.json"
    torch.save({"q": q, "k": k, "v": v}, path)
    torch.save({"q": cq, "k": ck, "v": cv}, cal)
    argv = ["audit", "--mechanism", "favor++", "--features", "8", "--seeds", "1", "--input", str(path)]
    assert main([*argv, "--calibration", str(cal), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["seq_len"] == 20 and result["calibration"] == str(cal)
    assert main(["audit", "--mechanism", "favor++", "--calibration", str(cal)]) == 2
    assert "--calibration needs --input" in capsys.readouterr().err


@pytest.mark.parametrize("mechanism", sorted(audit.MECHANISMS))
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_implied_attention_reproduces_the_output(mechanism, causal):
    if causal and mechanism == "linformer":
        pytest.skip("linformer has no causal form (refusal tested above)")
    q, k, v = audit.draw_inputs(8, 20, 0.5, seed=0, heads=2)
    mech = audit.build(
        mechanism, 8, 0, head_dim=8, heads=2, seq_len=20, causal=causal, calibration=(q, k), hedgehog_steps=5
    )
    o = mech.run(q, k, v)
    A = mech.attention(q, k)
    torch.testing.assert_close(torch.einsum("bhts,bshv->bthv", A, v), o, rtol=1e-9, atol=1e-10)


def test_metrics_on_known_cases():
    q, k, v = audit.draw_inputs(8, 30, 1.0, seed=0)
    exact, P = audit.exact_attention(q, k, v, causal=True)
    same = audit.row_metrics(exact, exact, P, P, causal=True, topk=4)
    assert same["rel_err"].max() == 0 and same["tv"].max() == 0
    assert (same["topk_overlap"] == 1).all()
    torch.testing.assert_close(same["outside_mass"], same["exact_outside_mass"])
    assert same["outside_mass"][..., :4].abs().max() < 1e-12  # rows with <= 4 visible keys: nothing outside
    uniform = torch.ones_like(P).tril() / torch.arange(1, 31, dtype=P.dtype).view(30, 1)
    o_uniform = torch.einsum("bhts,bshv->bthv", uniform, v)
    m = audit.row_metrics(o_uniform, exact, uniform, P, causal=True, topk=4)
    assert m["rel_err"].mean().item() == pytest.approx(audit.uniform_rel_err(v, exact, causal=True), rel=1e-12)


def test_fit_slope_recovers_a_power_law():
    ms = [16, 32, 64, 128]
    assert audit.fit_slope(ms, [3.0 * m**-0.5 for m in ms]) == pytest.approx(-0.5)
    assert audit.fit_slope([16], [1.0]) is None


def test_linformer_sampled_projection_is_exact_at_k_equal_n():
    q, k, v = audit.draw_inputs(8, 32, 0.5, seed=0)
    result = audit.sweep("linformer", q, k, v, [8, 32], seeds=2, projection="sample")
    assert result["sweep"][-1]["rel_err_mean"] < 1e-12 and result["sweep"][-1]["tv_mean"] < 1e-12
    assert result["sweep"][0]["rel_err_mean"] > 1e-3


def test_bad_arguments():
    q, k, v = audit.draw_inputs(8, 16, 0.5)
    with pytest.raises(ValueError, match="mechanism"):
        audit.sweep("flash", q, k, v, [8])
    with pytest.raises(ValueError, match="temperature"):
        audit.draw_inputs(8, 16, 0.0)
    with pytest.raises(ValueError, match="seeds"):
        audit.sweep("performer", q, k, v, [8], seeds=[])


# ---------------------------------------------------------------------------------------------------------- Hedgehog


def test_hedgehog_distillation_lowers_distance_to_softmax():
    # train on one draw, measure on another from the same distribution
    q, k, _ = audit.draw_inputs(16, 48, 1.0, seed=0, dtype=torch.float32)
    q2, k2, _ = audit.draw_inputs(16, 48, 1.0, seed=1, dtype=torch.float32)
    phi = Hedgehog(16, 1, feature_dim=16, seed=0)

    def tv():
        with torch.no_grad():
            A, P = kernel_attention(phi, q2, k2), softmax_attention_weights(q2, k2)
            return 0.5 * (A - P).abs().sum(-1).mean().item()

    before = tv()
    losses = fit_hedgehog(phi, q, k, steps=300, lr=1e-2)
    after = tv()
    assert losses[-1] < losses[0]
    assert after < before, (before, after)
