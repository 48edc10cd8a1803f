"""fastcl repro: gates and verdicts, each experiment's claims from synthetic numbers, each experiment end to
end at --smoke size, and every committed verdict recomputed from the committed numbers."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest

pytest.importorskip("sklearn")

from fastcl.repro import EXPERIMENTS, load, main, render_doc, run_experiment  # noqa: E402
from fastcl.repro.common import (  # noqa: E402
    FAILS,
    HOLDS,
    INCONCLUSIVE,
    LOSS_GATE,
    SMOKE_NOTE,
    UNTESTABLE,
    VERDICTS,
    chance_loss,
    gate_passed,
    judge,
    loss_gate,
    probe_gate,
    slope,
)

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "docs" / "repro"


def test_judge_every_verdict_and_its_edges():
    assert judge([0.2, 0.3, 0.25], margin=0.1, gate_ok=True) == HOLDS
    assert judge([0.2, 0.3, 0.25], margin=0.1, gate_ok=False) == UNTESTABLE  # the gate overrides any effect
    assert judge([0.05, 0.06, 0.07], margin=0.1, gate_ok=True) == INCONCLUSIVE  # every seed, but below margin
    assert judge([0.5, -0.01, 0.5], margin=0.1, gate_ok=True) == INCONCLUSIVE  # one seed disagrees
    assert judge([-0.2, 0.1, -0.1], margin=0.1, gate_ok=True) == FAILS
    assert judge([0.0, 0.0, 0.0], margin=0.0, gate_ok=True) == FAILS  # no effect is not an effect
    with pytest.raises(ValueError, match="margin"):
        judge([1.0], margin=-1.0, gate_ok=True)
    with pytest.raises(ValueError, match="one value per seed"):
        judge([], margin=0.1, gate_ok=True)


def test_chance_loss_is_the_loss_of_a_collapsed_model():
    import torch

    from fastcl.functional import info_nce, nt_xent

    n = 37
    constant = torch.ones(n, 8, dtype=torch.float64)  # every embedding equal: uniform logits
    assert float(nt_xent(constant, constant.clone(), 0.1)) == pytest.approx(chance_loss("ntxent", n), rel=1e-9)
    assert float(info_nce(constant, constant.clone(), 0.1)) == pytest.approx(chance_loss("infonce", n), rel=1e-9)
    assert chance_loss("ntxent", 128) == pytest.approx(math.log(255))
    with pytest.raises(ValueError, match="loss"):
        chance_loss("siglip", 8)


def test_loss_and_probe_gates_and_their_recomputation():
    trained = loss_gate({"a": ([3.0, 3.2], 5.0), "b": ([4.4, 4.5], 5.0)})  # limit 0.9 x 5 = 4.5
    assert trained["passed"] and trained["arms"]["b"]["limit"] == pytest.approx(LOSS_GATE * 5.0)
    at_chance = loss_gate({"a": ([3.0, 3.2], 5.0), "b": ([4.4, 4.51], 5.0)})
    assert not at_chance["passed"] and not at_chance["arms"]["b"]["passed"]
    # accuracy: beat chance and the random-init encoder by the margin, on the seed mean
    assert probe_gate({"x": ([0.80, 0.84], [0.70, 0.72])}, 0.1, 0.05, True)["passed"]
    assert not probe_gate({"x": ([0.80, 0.84], [0.78, 0.80])}, 0.1, 0.05, True)["passed"]  # init is as good
    assert not probe_gate({"x": ([0.12, 0.13], [0.0, 0.0])}, 0.1, 0.05, True)["passed"]  # at chance
    # MSE: lower is better
    assert probe_gate({"x": ([0.02, 0.03], [0.06, 0.06])}, 1 / 12, 0.005, False)["passed"]
    assert not probe_gate({"x": ([0.08, 0.085], [0.02, 0.02])}, 1 / 12, 0.005, False)["passed"]
    for losses in (trained, at_chance):
        for probe in (None, probe_gate({"x": ([0.80, 0.84], [0.78, 0.80])}, 0.1, 0.05, True)):
            stored = {"passed": None, "loss": losses, **({"probe": probe} if probe else {})}
            assert gate_passed(stored) == (losses["passed"] and (probe is None or probe["passed"]))


def _swap_chance(results: dict) -> dict:
    """The same numbers with every arm's final loss at its chance level."""
    results = copy.deepcopy(results)

    def walk(node):
        if isinstance(node, dict):
            if "loss" in node and "chance" in node:
                node["loss"] = node["chance"]
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(results)
    return results


def _verdicts(name: str, results: dict, config: dict) -> dict[str, str]:
    return {c.key: c.verdict for c in load(name).claims(results, config)}


def _toy(cliff=0.0, small_init=-4.0, small_early=-1.0, small_end=-0.5, alignment=0.9, loss=0.5):
    spectrum = lambda small: [1.0] * 12 + [10**small] * 4  # noqa: E731
    return {
        "cliff": cliff,
        "spectrum_init": spectrum(small_init),
        "spectrum_early": spectrum(small_early),
        "spectrum": spectrum(small_end),
        "alignment": alignment,
        "alignment_init": 0.25,
        "loss": loss,
        "chance": math.log(128),
    }


def _image(rank, probe, probe_init=0.7, loss=3.0):
    return {"effective_rank": rank, "probe": probe, "probe_init": probe_init, "loss": loss, "chance": math.log(255)}


def test_directclr_verdicts_follow_the_numbers():
    config = {"seeds": [0, 1, 2], "early_step": 100, "labels_per_class": 5}
    seeds = range(3)
    results = {
        "toys": {
            "strong": [_toy(cliff=-1.2 - 0.01 * i) for i in seeds],
            "weak": [_toy(cliff=-0.05) for _ in seeds],
            "depth": {
                "1": [_toy(small_early=-1.0, small_end=-0.2) for _ in seeds],
                "2": [_toy(small_early=-3.5, small_end=-1.0 - 0.1 * i) for i in seeds],
            },
            "aligned": [_toy(alignment=0.85 + 0.01 * i) for i in seeds],
        },
        "image": {
            "SimCLR, no projector": [_image(8.0, 0.80) for _ in seeds],
            "SimCLR + MLP projector": [_image(12.0, 0.84 + 0.01 * i) for i in seeds],
            "DirectCLR": [_image(15.0, 0.86) for _ in seeds],
        },
    }
    assert set(_verdicts("directclr", results, config).values()) == {HOLDS}
    flipped = copy.deepcopy(results)
    toys = flipped["toys"]
    toys["strong"], toys["weak"] = results["toys"]["weak"], results["toys"]["strong"]
    toys["depth"] = {"1": results["toys"]["depth"]["2"], "2": results["toys"]["depth"]["1"]}
    toys["aligned"] = [_toy(alignment=0.4) for _ in seeds]
    flipped["image"]["SimCLR, no projector"] = [_image(20.0, 0.90) for _ in seeds]
    assert set(_verdicts("directclr", flipped, config).values()) == {FAILS}
    assert set(_verdicts("directclr", _swap_chance(results), config).values()) == {UNTESTABLE}
    # a probe random init already saturates cannot show anything, whatever the arms' losses
    saturated = copy.deepcopy(results)
    for runs in saturated["image"].values():
        for r in runs:
            r["probe_init"] = 0.99
    verdicts = _verdicts("directclr", saturated, config)
    assert {v for k, v in verdicts.items() if "probe" in k} == {UNTESTABLE}
    assert {v for k, v in verdicts.items() if "probe" not in k} == {HOLDS}


def test_foster_verdicts_follow_the_numbers():
    config = {"seeds": [0, 1, 2], "averaging": (1, 16), "gp_lambda": 0.01}

    def arm(ratio, mse_1, mse_16, loss=4.0):
        return [
            {
                "ratio_repr": ratio + 0.01 * i,
                "probe_mse": {"1": mse_1, "16": mse_16 - 0.001 * i},
                "loss": loss,
                "chance": 5.5,
            }
            for i in range(3)
        ]

    init = [{"probe_mse": {"1": 0.06, "16": 0.05}} for _ in range(3)]
    results = {"arms": {"no penalty": arm(0.5, 0.05, 0.04), "penalty λ = 0.01": arm(0.2, 0.045, 0.03)}, "init": init}
    assert set(_verdicts("foster", results, config).values()) == {HOLDS}
    worse = {"arms": {"no penalty": arm(0.2, 0.025, 0.03), "penalty λ = 0.01": arm(0.5, 0.02, 0.035)}, "init": init}
    assert set(_verdicts("foster", worse, config).values()) == {FAILS}
    assert set(_verdicts("foster", _swap_chance(results), config).values()) == {UNTESTABLE}


def test_foster_gate_reads_the_contrastive_loss_alone():
    """The penalty arm's gate reads NT-Xent without λ·GP: ``_final_losses`` returns the float64 NT-Xent of
    the same views, and the penalty apart from it, and leaves the model (BatchNorm statistics) unchanged."""
    import torch

    from fastcl.data import SpirographSource
    from fastcl.models import ContrastiveModel
    from fastcl.repro import foster
    from fastcl.repro.common import build_encoder

    config = dict(foster.CONFIGS["smoke"], batch_size=24, loss_items=24, temperature=0.5)
    model = ContrastiveModel(build_encoder(config, 0), "mlp", config["proj_dim"]).double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    source = SpirographSource(32, 8, torch.device("cpu"), seed=3)
    source.generator.manual_seed(5)
    measured = foster._final_losses(model.float(), source, config)
    assert all(torch.equal(v.float(), model.state_dict()[k].float()) for k, v in before.items())

    source.generator.manual_seed(5)  # the same views: the NT-Xent formula in float64
    views = source.views(torch.arange(24))
    with torch.no_grad():
        _, z = model.double().train()(views.transpose(0, 1).reshape(-1, *views.shape[2:]).double())
    z = torch.nn.functional.normalize(z, dim=1)
    logits = z @ z.T / config["temperature"]
    logits.fill_diagonal_(float("-inf"))
    positive = torch.arange(48).roll(24)
    reference = float((logits.logsumexp(1) - logits[torch.arange(48), positive]).mean())
    assert measured["loss"] == pytest.approx(reference, rel=1e-4)
    assert measured["gp"] > 0


def test_xue_verdicts_follow_the_numbers():
    config = {"seeds": [0, 1, 2], "p_drops": (0.0, 0.5, 0.9), "kappa": 1.05}

    def runs(h, z, h_init=0.5):
        return [
            {"probe_h": h + 0.01 * i, "probe_z": z, "probe_h_init": h_init, "loss": 3.0, "chance": 5.5}
            for i in range(3)
        ]

    results = {
        "sweep": {"0.0": runs(0.90, 0.90), "0.5": runs(0.85, 0.75), "0.9": runs(0.80, 0.50)},
        "reweight": runs(0.79, 0.79),
    }
    assert set(_verdicts("xue", results, config).values()) == {HOLDS}
    results = {
        "sweep": {"0.0": runs(0.70, 0.50), "0.5": runs(0.75, 0.70), "0.9": runs(0.70, 0.80)},
        "reweight": runs(0.50, 0.50),
    }
    assert set(_verdicts("xue", results, config).values()) == {FAILS}
    at_chance = {"sweep": {p: runs(0.11, 0.10) for p in ("0.0", "0.5", "0.9")}, "reweight": runs(0.11, 0.10)}
    assert set(_verdicts("xue", at_chance, config).values()) == {UNTESTABLE}  # the digit probe sees nothing


def test_cosentino_verdicts_follow_the_numbers():
    config = {"seeds": [0, 1, 2], "strengths": (0.25, 1.0), "labels_per_class": 5}

    def point(ratio_h, ratio_z, rank_h, rank_z, probe_h=0.85, probe_z=0.75):
        return [
            {
                "ratio_h": ratio_h,
                "ratio_z": ratio_z * (1 + 0.01 * i),
                "effective_rank_h": rank_h,
                "effective_rank_z": rank_z,
                "probe_h": probe_h,
                "probe_z": probe_z,
                "loss": 3.0,
                "chance": 5.5,
            }
            for i in range(3)
        ]

    init = [{"probe_h": 0.7, "probe_z": 0.65} for _ in range(3)]
    holds = {"runs": {"0.25": point(0.5, 0.5, 20.0, 10.0), "1.0": point(0.45, 0.1, 19.0, 4.0)}, "init": init}
    assert set(_verdicts("cosentino", holds, config).values()) == {HOLDS}
    fails = {
        "runs": {"0.25": point(0.5, 0.5, 20.0, 10.0, 0.7, 0.8), "1.0": point(0.1, 0.6, 5.0, 9.5, 0.7, 0.8)},
        "init": init,
    }
    assert set(_verdicts("cosentino", fails, config).values()) == {FAILS}
    assert set(_verdicts("cosentino", _swap_chance(holds), config).values()) == {UNTESTABLE}


def _check_record(name: str, stored: dict) -> None:
    """Every stored verdict is recomputed two ways from the stored numbers: by the experiment's claim
    function on ``results``, and from the claim's own effect, margin and gate numbers."""
    assert stored["claims"] and all(c["verdict"] in VERDICTS for c in stored["claims"])
    recomputed = [c.__dict__ for c in load(name).claims(stored["results"], stored["config"])]
    assert [(c["key"], c["verdict"]) for c in recomputed] == [(c["key"], c["verdict"]) for c in stored["claims"]]
    for mine, theirs in zip(recomputed, stored["claims"]):
        assert mine["effect"] == pytest.approx(theirs["effect"]) and mine["margin"] == theirs["margin"]
        assert mine["gate"]["passed"] == theirs["gate"]["passed"]
    for claim in stored["claims"]:
        assert len(claim["effect"]) >= 1 and claim["gate"]["passed"] == gate_passed(claim["gate"])
        assert claim["verdict"] == judge(claim["effect"], claim["margin"], gate_passed(claim["gate"]))
        if claim["verdict"] in (HOLDS, FAILS):  # no verdict with an arm at chance
            for arm in claim["gate"]["loss"]["arms"].values():
                assert max(arm["losses"]) <= LOSS_GATE * arm["chance"]


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_smoke_run_writes_files_and_verdicts_from_its_numbers(name, tmp_path):
    record = run_experiment(name, "smoke", tmp_path, device="cpu", progress=False)
    out = tmp_path / name
    stored = json.loads((out / "results.json").read_text())
    assert stored["size"] == "smoke" and stored["evidence"] is False and stored["config"]["seeds"]
    assert stored["environment"]["versions"]["torch"] and len(stored["environment"]["load_average"]) == 2
    _check_record(name, stored)
    markdown = (out / "results.md").read_text()
    assert SMOKE_NOTE in markdown  # a smoke run says its verdicts are not evidence
    assert "| ---" not in markdown and "|---|" in markdown and all(c["statement"] in markdown for c in stored["claims"])
    assert record["figures"] and all((out / figure).stat().st_size > 0 for figure in record["figures"])


def _committed() -> list[str]:
    return [
        name
        for name in sorted(EXPERIMENTS)
        if (COMMITTED / name / "results.json").is_file()
        and all("gate" in c for c in json.loads((COMMITTED / name / "results.json").read_text())["claims"])
    ]


@pytest.mark.parametrize("name", _committed())
def test_committed_verdicts_recompute_from_the_committed_numbers(name):
    stored = json.loads((COMMITTED / name / "results.json").read_text())
    assert stored["size"] == "quick" and stored["evidence"] is True
    _check_record(name, stored)


def test_docs_repro_md_is_regenerated_from_the_committed_results():
    doc = ROOT / "docs" / "repro.md"
    text = doc.read_text()
    assert render_doc(text, COMMITTED, doc.parent) == text, "run: fastcl repro --out docs/repro --doc docs/repro.md"


def test_render_doc_needs_its_markers(tmp_path):
    with pytest.raises(ValueError, match="generated section"):
        render_doc("no markers here", tmp_path, tmp_path)


def test_slope():
    assert slope([1.0, 2.0, 4.0], [3.0, 5.0, 9.0]) == pytest.approx(2.0)


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
