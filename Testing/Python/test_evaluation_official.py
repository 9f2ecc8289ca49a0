"""``multiturnseg eval --dump`` on every golden case, against the official code's numbers."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

pytest.importorskip("torch")

from MultiTurnSegLib.cli import main  # noqa: E402

CASES = ("single", "chain3")


@pytest.fixture(scope="module")
def dumps(tmp_path_factory, fixture_cases_dir, tiny_model_json):
    out = tmp_path_factory.mktemp("eval")
    results = {}
    for case in CASES:
        folder = fixture_cases_dir / case
        dump, metrics = out / f"{case}.npz", out / f"{case}.json"
        rc = main(["eval", str(folder / "eval.json"), "--dataset-dir", str(folder), "--model", str(tiny_model_json),
                   "--device", "cpu", "--dump", str(dump), "--metrics", str(metrics), "--no-progress"])
        assert rc == 0
        results[case] = (np.load(dump), json.loads(metrics.read_text()), folder)
    return results


@pytest.mark.parametrize("case", CASES)
def test_dump_matches_expected_npz(dumps, case):
    got, _, folder = dumps[case]
    exp = np.load(folder / "expected.npz")
    assert sorted(got.files) == sorted(exp.files)
    for key in exp.files:
        a, b = exp[key], got[key]
        assert a.shape == b.shape and a.dtype == b.dtype, (key, a.shape, b.shape, a.dtype, b.dtype)
        if a.dtype.kind == "f":
            assert np.array_equal(np.isnan(a), np.isnan(b)), f"NaN pattern of {key}"
    for key in ("input_ids", "seg_token_positions", "image_size_hw", "sam_resize_hw", "input_round_ind",
                "input_ref_slot", "jcm_ran", "jcm_refined", "referenced", "fallback", "mask_area"):
        np.testing.assert_array_equal(got[key], exp[key], err_msg=key)
    tolerances = {
        "jcm_score": 1e-5, "seg_embedding": 1e-4, "llm_hidden_before_seg": 1e-4, "sam_text_embed": 1e-4,
        "low_res_logits": 2e-4, "logits": 2e-4, "images_clip": 1e-5, "clip_image_features": 1e-5,
        "sam_image_embedding": 1e-4, "crop_features": 1e-5, "box_features": 1e-5, "ref_crop": 1e-5,
        "init_ref_crops": 1e-5, "ref_box": 1e-7, "ref_box_f64": 1e-12, "init_ref_boxes": 1e-12,
    }
    for key, tol in tolerances.items():
        np.testing.assert_allclose(got[key], exp[key], rtol=0, atol=tol, equal_nan=True, err_msg=key)
    sure = np.abs(exp["logits"]) >= 2e-4
    assert np.array_equal(got["mask"][sure], exp["mask"][sure])


@pytest.mark.parametrize("case", CASES)
def test_metrics_match_official_printout(dumps, case):
    _, metrics, folder = dumps[case]
    text = (folder / "expected.md").read_text()
    printed = dict((k, float(v)) for k, v in re.findall(r"(\w+_(?:round_\d+|all))=([0-9.]+)", text))
    assert printed, "expected.md lists the official metrics"
    names = metrics["official_names"]
    assert set(printed) == set(names)
    for key, value in printed.items():
        assert names[key] == pytest.approx(value, abs=1e-4), key
    assert metrics["n_samples"] == 1 and metrics["jcm_policy"] == "referenced"
    assert len(metrics["samples"][0]["rounds"]) == len(metrics["rounds"])


def test_multi_sample_dump_names_and_jcm_policies(tmp_path, fixture_cases_dir, tiny_model_json):
    from MultiTurnSegLib.cli.eval_cmd import dump_path
    from MultiTurnSegLib.engine import MediRoundEngine
    from MultiTurnSegLib.evaluation import load_official_json, run_official_evaluation

    assert dump_path("a/out.npz", 3, 1).name == "out.npz"
    assert dump_path("a/out.npz", 3, 12).name == "out_0003.npz"
    assert dump_path("a/dumps", 3, 12).as_posix() == "a/dumps/sample_0003.npz"
    folder = fixture_cases_dir / "chain3"
    data = json.loads((folder / "eval.json").read_text())
    two = tmp_path / "two.json"
    two.write_text(json.dumps(data + data))
    rc = main(["eval", str(two), "--dataset-dir", str(folder), "--model", str(tiny_model_json), "--device", "cpu",
               "--jcm-policy", "always", "--dump", str(tmp_path / "always" / "out.npz"), "--no-progress"])
    assert rc == 0
    assert sorted(p.name for p in (tmp_path / "always").iterdir()) == ["out_0000.npz", "out_0001.npz"]
    d = np.load(tmp_path / "always" / "out_0001.npz")
    assert d["jcm_ran"].tolist() == [True, True, True] and not np.isnan(d["jcm_score"]).any()
    engine = MediRoundEngine.from_model_json(tiny_model_json, device="cpu")
    res = run_official_evaluation(engine, load_official_json(two, folder), jcm_policy="off", progress=False)
    assert all(s.jcm_scores == [None, None, None] for s in res.samples)
    assert res.metrics["overall"]["n"] == 6 and len(res.metrics["rounds"]) == 3


def test_eval_errors_are_reported(tmp_path, tiny_model_json, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"task": "segmentation", "conversations": [{"from": "human", "value": "no image"}]}]')
    assert main(["eval", str(bad), "--model", str(tiny_model_json), "--device", "cpu"]) == 2
    assert "even" in capsys.readouterr().err
