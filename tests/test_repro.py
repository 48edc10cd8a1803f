"""fastcl repro: each experiment end to end at --smoke size, and the verdicts computed from numbers."""

from __future__ import annotations

import copy
import json

import pytest

pytest.importorskip("sklearn")

from fastcl.repro import EXPERIMENTS, load, main, run_experiment  # noqa: E402
from fastcl.repro.common import (  # noqa: E402
    FAILS,
    HOLDS,
    INCONCLUSIVE,
    collapsed_dimensions,
    compare_close,
    compare_seeds,
    slope,
)


def test_compare_seeds_both_ways():
    assert compare_seeds([1.0, 2.0], [3.0, 4.0], "<") == HOLDS
    assert compare_seeds([3.0, 4.0], [1.0, 2.0], "<") == FAILS
    assert compare_seeds([3.0, 4.0], [1.0, 2.0], ">") == HOLDS
    assert compare_seeds([1.0, 9.0], [2.0, 3.0], ">") == INCONCLUSIVE  # mean agrees, seed 0 does not
    assert compare_seeds([1.0], [1.0], "<") == FAILS  # a tie is not an improvement
    with pytest.raises(ValueError, match="relation"):
        compare_seeds([1.0], [2.0], "<=")
    with pytest.raises(ValueError, match="equal length"):
        compare_seeds([1.0], [2.0, 3.0], "<")


def test_compare_close_slope_and_collapse_count():
    assert compare_close([0.90], [0.92], tolerance=0.03) == HOLDS
    assert compare_close([0.88], [0.92], tolerance=0.03) == FAILS
    assert slope([1.0, 2.0, 4.0], [3.0, 5.0, 9.0]) == pytest.approx(2.0)
    assert collapsed_dimensions([2.0, 1.0, 1.9e-4, 0.0]) == 2
    assert collapsed_dimensions([2.0, 1.0, 2.1e-4]) == 0


def _verdicts(name: str, results: dict, config: dict) -> dict[str, str]:
    return {c.key: c.verdict for c in load(name).claims(results, config)}


def _toy(collapsed: int, alignment: float = 0.5) -> dict:
    return {"collapsed": collapsed, "collapsed_init": 0, "alignment": alignment, "alignment_init": 0.2}


def _image(rank: float, probe: float) -> dict:
    return {"effective_rank": rank, "probe": probe}


def test_directclr_verdicts_follow_the_numbers():
    config = {"seeds": [0, 1]}
    results = {
        "toys": {
            "strong": [_toy(8), _toy(7)],
            "weak": [_toy(0), _toy(0)],
            "depth": {"1": [_toy(0), _toy(1)], "2": [_toy(5, 0.6), _toy(6, 0.7)]},
        },
        "image": {
            "SimCLR, no projector": [_image(3.0, 0.80), _image(4.0, 0.82)],
            "SimCLR + MLP projector": [_image(9.0, 0.90), _image(8.0, 0.91)],
            "DirectCLR": [_image(7.0, 0.88), _image(6.0, 0.87)],
        },
    }
    assert set(_verdicts("directclr", results, config).values()) == {HOLDS}
    flipped = copy.deepcopy(results)
    flipped["toys"]["strong"], flipped["toys"]["weak"] = results["toys"]["weak"], results["toys"]["strong"]
    flipped["toys"]["depth"] = {"1": results["toys"]["depth"]["2"], "2": [_toy(0, 0.1), _toy(1, 0.1)]}
    flipped["image"]["SimCLR, no projector"] = [_image(20.0, 0.95), _image(20.0, 0.95)]
    assert set(_verdicts("directclr", flipped, config).values()) == {FAILS}


def test_foster_verdicts_follow_the_numbers():
    config = {"seeds": [0, 1], "averaging": (1, 4), "gp_lambda": 0.01}

    def arm(condvar, mse_1, mse_4):
        return [
            {"condvar_repr": condvar + 0.01 * i, "probe_mse": {"1": mse_1, "4": mse_4 - 0.001 * i}} for i in range(2)
        ]

    results = {"arms": {"no penalty": arm(0.5, 0.05, 0.04), "penalty λ = 0.01": arm(0.2, 0.045, 0.03)}}
    assert set(_verdicts("foster", results, config).values()) == {HOLDS}
    worse = {"arms": {"no penalty": arm(0.2, 0.03, 0.04), "penalty λ = 0.01": arm(0.5, 0.045, 0.05)}}
    assert set(_verdicts("foster", worse, config).values()) == {FAILS}


def test_xue_verdicts_follow_the_numbers():
    config = {"seeds": [0, 1], "p_drop": 0.8, "kappa": 1.05}

    def runs(h, z):
        return [{"probe_h": h, "probe_z": z}, {"probe_h": h + 0.01, "probe_z": z}]

    results = {"heads": {"MLP projector": runs(0.80, 0.60), "fixed reweighting head": runs(0.78, 0.78)}}
    assert _verdicts("xue", results, config) == {
        "pre_projection_beats_post_projection": HOLDS,
        "reweighting_head_close_to_mlp": HOLDS,
    }
    results = {"heads": {"MLP projector": runs(0.60, 0.80), "fixed reweighting head": runs(0.50, 0.50)}}
    assert _verdicts("xue", results, config) == {
        "pre_projection_beats_post_projection": FAILS,
        "reweighting_head_close_to_mlp": FAILS,
    }


def test_cosentino_verdicts_follow_the_numbers():
    config = {"seeds": [0], "strengths": (0.5, 1.0)}

    def point(cos_h, cos_z, rank_h, rank_z):
        return [{"cosine_h": cos_h, "cosine_z": cos_z, "effective_rank_h": rank_h, "effective_rank_z": rank_z}]

    holds = {"runs": {"0.5": point(0.5, 0.6, 20.0, 10.0), "1.0": point(0.55, 0.9, 19.0, 4.0)}}
    assert set(_verdicts("cosentino", holds, config).values()) == {HOLDS}
    fails = {"runs": {"0.5": point(0.5, 0.6, 20.0, 10.0), "1.0": point(0.9, 0.62, 5.0, 9.5)}}
    assert set(_verdicts("cosentino", fails, config).values()) == {FAILS}


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_smoke_run_writes_files_and_verdicts_from_its_numbers(name, tmp_path):
    record = run_experiment(name, "smoke", tmp_path, device="cpu", progress=False)
    out = tmp_path / name
    stored = json.loads((out / "results.json").read_text())
    assert stored["size"] == "smoke" and stored["config"]["seeds"] and stored["environment"]["versions"]["torch"]
    assert stored["claims"] and all(c["verdict"] in (HOLDS, FAILS, INCONCLUSIVE) for c in stored["claims"])
    # the stored verdicts are what the claim functions compute from the stored numbers
    recomputed = {c.key: c.verdict for c in load(name).claims(stored["results"], stored["config"])}
    assert recomputed == {c["key"]: c["verdict"] for c in stored["claims"]}
    markdown = (out / "results.md").read_text()
    assert "| ---" not in markdown and "|---|" in markdown and all(c["statement"] in markdown for c in stored["claims"])
    assert record["figures"] and all((out / figure).stat().st_size > 0 for figure in record["figures"])


def test_cli_list_and_bad_name(capsys):
    assert main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in EXPERIMENTS)
    with pytest.raises(SystemExit) as error:
        main(["nonexistent", "--smoke"])
    assert error.value.code == 2


def test_full_image_run_without_data_dir_fails_before_training(tmp_path):
    with pytest.raises(SystemExit) as error:
        main(["cosentino", "--full", "--out", str(tmp_path), "--no-progress"])
    assert error.value.code == 2 and not (tmp_path / "cosentino").exists()
