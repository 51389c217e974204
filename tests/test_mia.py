"""Membership attacks (SPEC.md 5.4, 5.5): each checked against an independent, naive re-computation
written here, or against numbers worked out by hand."""

import io

import numpy as np
import pytest
from matplotlib.figure import Figure
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import roc_auc_score, roc_curve

from oneshui_jax.mia import loss_attack, per_person, rmia, roc

# --------------------------------------------------------------------------- loss attack (5.4)


def _direct_loss_attack(retain, val, forget, test):
    """SPEC 5.4 written out with scikit-learn, independently of the module."""
    x_tr = np.r_[retain, val].reshape(-1, 1)
    y_tr = np.r_[[1] * len(retain), [0] * len(val)]
    x_te = np.r_[forget, test].reshape(-1, 1)
    y_te = np.r_[[1] * len(forget), [0] * len(test)]
    rows, best = [], {"acc": 0, "auc": 0, "index": None}
    for n in [20, 50, 100]:
        for crit in ["gini", "entropy"]:
            rf = RandomForestClassifier(n_estimators=n, criterion=crit, n_jobs=1, random_state=0)
            rf.fit(x_tr, y_tr)
            auc = roc_auc_score(y_te, rf.predict_proba(x_te)[:, 1]) * 100
            acc = (1 - rf.predict(np.reshape(forget, (-1, 1))).mean()) * 100
            rows.append((n, crit, auc, acc))
            if acc > best["acc"]:
                best = {"acc": acc, "auc": auc, "index": len(rows) - 1}
    return rows, best


def test_loss_attack_equals_direct_sklearn_and_later_strictly_better_config_wins():
    rng = np.random.default_rng(1)
    retain, val = rng.gamma(1.0, 0.5, 60), rng.gamma(1.5, 0.6, 60)
    forget, test = rng.gamma(1.2, 0.55, 10), rng.gamma(1.5, 0.6, 30)
    rows, best = _direct_loss_attack(retain, val, forget, test)
    accs = [r[3] for r in rows]
    # The data must exercise the selection: a later config strictly beats the first, and the
    # winning accuracy is reached again later (strict > keeps the first of those).
    assert best["index"] > 0 and accs.count(max(accs)) > 1

    out = loss_attack.attack(retain, val, forget, test)
    assert [(g["n_estimators"], g["criterion"]) for g in out["grid"]] == [r[:2] for r in rows]
    np.testing.assert_allclose([g["auc"] for g in out["grid"]], [r[2] for r in rows])
    np.testing.assert_allclose([g["acc"] for g in out["grid"]], accs)
    chosen = rows[best["index"]]
    assert (out["n_estimators"], out["criterion"]) == chosen[:2]
    assert out["acc"] == pytest.approx(best["acc"]) and out["auc"] == pytest.approx(best["auc"])
    # The ROC points are the chosen forest's.
    rf = RandomForestClassifier(n_estimators=chosen[0], criterion=chosen[1], random_state=0)
    rf.fit(np.r_[retain, val].reshape(-1, 1), np.r_[[1] * 60, [0] * 60])
    fpr, tpr, _ = roc_curve(np.r_[[1] * 10, [0] * 30],
                            rf.predict_proba(np.r_[forget, test].reshape(-1, 1))[:, 1])
    np.testing.assert_allclose(out["fpr"], fpr)
    np.testing.assert_allclose(out["tpr"], tpr)


def test_loss_attack_equal_accuracies_keep_the_first_config():
    rng = np.random.default_rng(0)
    retain, val = rng.uniform(0, 1, 40), rng.uniform(5, 6, 40)
    forget, test = rng.uniform(5, 6, 8), rng.uniform(5, 6, 8)  # forget looks unseen: acc 100
    out = loss_attack.attack(retain, val, forget, test)
    assert [g["acc"] for g in out["grid"]] == [100.0] * 6
    assert (out["n_estimators"], out["criterion"]) == (20, "gini")


def test_loss_attack_all_zero_accuracy_reports_zero_auc():
    rng = np.random.default_rng(1)
    retain, val = rng.uniform(0, 1, 40), rng.uniform(5, 6, 40)
    forget, test = rng.uniform(0, 1, 8), rng.uniform(5, 6, 8)  # every forget sample a "member"
    out = loss_attack.attack(retain, val, forget, test)
    assert all(g["acc"] == 0 for g in out["grid"]) and all(g["auc"] > 0 for g in out["grid"])
    assert out["acc"] == 0 and out["auc"] == 0
    assert out["n_estimators"] is None and out["criterion"] is None and out["fpr"] is None


def test_loss_attack_rejects_bad_input():
    with pytest.raises(ValueError, match="val_losses is empty"):
        loss_attack.attack([1.0, 2.0], [], [1.0], [2.0])
    with pytest.raises(ValueError, match="forget_losses must be 1-D"):
        loss_attack.attack([1.0, 2.0], [3.0], [[1.0]], [2.0])


# --------------------------------------------------------------------------- RMIA (5.5)


def _torch_mode_cpu(values):
    """torch.mode's CPU rule, written out: sort ascending, walk the runs of equal values, replace
    the mode only on a strictly longer run (so of equally frequent values the smallest wins)."""
    s = sorted(values)
    mode, best, run = None, 0, 0
    for i, v in enumerate(s):
        run += 1
        if i == len(s) - 1 or s[i] != s[i + 1]:
            if run > best:
                mode, best = v, run
            run = 0
    return mode


def _naive_rmia(z_in, z_avg, f_in, f_avg, v_in, v_avg, ties=None):
    """SPEC 5.5 element by element in float32, one (x, z, pass) at a time."""
    f32 = np.float32
    passes, n_z = z_in.shape
    xs = [(f_in, f_avg, i) for i in range(f_in.shape[1])] + [
        (v_in, v_avg, i) for i in range(v_in.shape[1])]
    labels = [1] * f_in.shape[1] + [0] * v_in.shape[1]
    grid = []
    for gamma in [1, 2, 4, 8]:
        for a in [0.2, 0.3, 0.5, 1]:
            c1, c0 = f32((1 + a) / 2), f32((1 - a) / 2)
            scores = []
            for x_in, x_avg, i in xs:
                hits = 0
                for j in range(n_z):
                    votes = []
                    for p in range(passes):
                        z_ratio = f32(1) / (z_in[p, j] / z_avg[p, j]) / (c1 * z_avg[p, j] + c0)
                        x_ratio = (x_in[p, i] / x_avg[p, i]) / (c1 * x_avg[p, i] + c0)
                        votes.append(bool(x_ratio * z_ratio > gamma))
                    if ties is not None and 2 * sum(votes) == passes:
                        ties.append(votes)
                    hits += int(_torch_mode_cpu(votes))
                scores.append(-hits / n_z)
            fpr, tpr, _ = roc_curve(labels, scores)
            grid.append({"gamma": gamma, "a": a, "auc": roc_auc_score(labels, scores),
                         "tpr": np.interp(1e-4, fpr, tpr), "scores": scores})
    return grid


def _losses(rng, passes, n):
    return rng.exponential(1.0, (passes, n)).astype(np.float32) + np.float32(0.05)


@pytest.mark.parametrize("passes", [3, 8])
def test_rmia_grid_equals_naive_spec_formula(passes):
    rng = np.random.default_rng(passes)
    arrays = [_losses(rng, passes, n) for n in (50, 50, 7, 7, 9, 9)]
    ties = []
    expected = _naive_rmia(*arrays, ties=ties)
    if passes == 8:
        assert ties  # the random data contains 4-4 votes, so the tie rule is exercised
    got = rmia.score_grid(*arrays)
    assert [(g["gamma"], g["a"]) for g in got] == [(e["gamma"], e["a"]) for e in expected]
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_array_equal(g["scores"], e["scores"])
        assert g["auc"] == e["auc"] and g["tpr_at_1e-4"] == e["tpr"]
    # The scores differ across the grid (the check is not trivially met by constant scores).
    assert len({tuple(e["scores"]) for e in expected}) > 4


def test_rmia_chunking_does_not_change_results():
    rng = np.random.default_rng(11)
    arrays = [_losses(rng, 8, n) for n in (40, 40, 6, 6, 11, 11)]
    whole = rmia.score_grid(*arrays, rows=10_000)
    for kwargs in ({"rows": 1}, {"rows": 5}, {"max_elements": 3 * 40}, {}):
        part = rmia.score_grid(*arrays, **kwargs)
        for w, p in zip(whole, part, strict=True):
            np.testing.assert_array_equal(w["scores"], p["scores"])
            assert (w["auc"], w["tpr_at_1e-4"]) == (p["auc"], p["tpr_at_1e-4"])
            np.testing.assert_array_equal(w["fpr"], p["fpr"])


def test_rmia_chunk_size_bounds_memory():
    assert rmia.chunk_rows(200_000) * 200_000 <= rmia.MAX_ELEMENTS
    assert rmia.chunk_rows(200_000) >= 1 and rmia.chunk_rows(10**9) == 1
    assert rmia.chunk_rows(50, max_elements=1000) == 20


def test_rmia_four_four_vote_is_false():
    # a = 1 makes s(u) = u_avg; with every *_avg = 1 and z_in = 1 the ratio is x_in, so at γ = 1 a
    # pass votes True iff x_in > 1.
    hi, lo = 2.0, 0.5
    f_in = np.array([[hi] * 4 + [lo] * 4,  # 4-4, True votes first
                     [lo] * 4 + [hi] * 4,  # 4-4, True votes last
                     [hi] * 5 + [lo] * 3]).T  # 5-3
    v_in = np.array([[lo, hi] * 4, [hi] * 3 + [lo] * 5]).T  # 4-4 interleaved, 3-5
    z = np.ones((8, 2))
    grid = rmia.score_grid(z, z, f_in, np.ones_like(f_in), v_in, np.ones_like(v_in))
    entry = next(g for g in grid if g["gamma"] == 1 and g["a"] == 1)
    np.testing.assert_array_equal(entry["scores"], [0, 0, -1, 0, 0])
    assert _torch_mode_cpu([True] * 4 + [False] * 4) is False  # the rule the test encodes


def test_rmia_best_strictly_greater_first_wins_and_none_without_positive_tpr():
    grid = [{"tpr_at_1e-4": t, "k": k} for k, t in enumerate([0.0, 0.3, 0.3, 0.5, 0.5, 0.1])]
    assert rmia.best(grid) is grid[3]
    assert rmia.best(grid[:3]) is grid[1]
    assert rmia.best([{"tpr_at_1e-4": 0.0}, {"tpr_at_1e-4": 0.0}]) is None


def test_rmia_rejects_inconsistent_passes():
    rng = np.random.default_rng(0)
    z, f, v = _losses(rng, 8, 10), _losses(rng, 8, 3), _losses(rng, 8, 4)
    with pytest.raises(ValueError, match="same number of passes"):
        rmia.score_grid(z, z, f, f, v[:7], v[:7])
    with pytest.raises(ValueError, match="forget_in .* and forget_avg .* differ"):
        rmia.score_grid(z, z, f, f[:, :2], v, v)


def test_canonical_rmia_equals_naive_formula():
    rng = np.random.default_rng(5)
    p = [rng.uniform(0.05, 1.0, (3, n)) for n in (12, 12, 4, 4, 5, 5)]
    z_in, z_ref, f_in, f_ref, v_in, v_ref = p
    labels = [1] * 4 + [0] * 5
    for scale_z in (False, True):
        got = rmia.score_grid_canonical(*p, scale_z=scale_z)
        k = 0
        for gamma in [1, 2, 4, 8]:
            for a in [0.2, 0.3, 0.5, 1]:
                scores = []
                for x_in, x_ref, i in [(f_in, f_ref, i) for i in range(4)] + [
                        (v_in, v_ref, i) for i in range(5)]:
                    hits = 0
                    for j in range(12):
                        votes = []
                        for q in range(3):
                            p_x = (1 + a) / 2 * x_ref[q, i] + (1 - a) / 2
                            p_z = (1 + a) / 2 * z_ref[q, j] + (1 - a) / 2 if scale_z \
                                else z_ref[q, j]
                            votes.append(
                                bool((x_in[q, i] / p_x) * (p_z / z_in[q, j]) > gamma))
                        hits += int(_torch_mode_cpu(votes))
                    scores.append(hits / 12)
                assert (got[k]["gamma"], got[k]["a"]) == (gamma, a)
                np.testing.assert_allclose(got[k]["scores"], scores)
                assert got[k]["auc"] == pytest.approx(roc_auc_score(labels, scores))
                k += 1


def test_subsample_per_pass_and_once():
    passes, n_z, n_v = 4, 30, 12
    z_in = np.arange(passes)[:, None] * 1000 + np.arange(n_z)[None, :]
    v_in = np.arange(passes)[:, None] * 1000 + np.arange(n_v)[None, :]
    z_avg, v_avg = z_in + 0.5, v_in + 0.5
    rng = np.random.default_rng(0)
    zi, za, vi, va = rmia.subsample(z_in, z_avg, v_in, v_avg, n_z=10, n_val=5, rng=rng)
    assert zi.shape == za.shape == (passes, 10) and vi.shape == va.shape == (passes, 5)
    np.testing.assert_array_equal(zi // 1000, np.arange(passes)[:, None] + 0 * zi)  # own pass
    np.testing.assert_array_equal(za, zi + 0.5)  # same draw for *_in and *_avg
    np.testing.assert_array_equal(va, vi + 0.5)
    for x in (zi, vi):
        assert all(len(set(row % 1000)) == row.size for row in x)  # without replacement
    assert any(set(vi[0] % 1000) != set(vi[p] % 1000) for p in range(1, passes))  # Q6
    zi, _, vi, _ = rmia.subsample(z_in, z_avg, v_in, v_avg, n_z=10, n_val=5, rng=rng,
                                  per_pass=False)
    assert all((vi[p] % 1000 == vi[0] % 1000).all() for p in range(passes))
    assert all((zi[p] % 1000 == zi[0] % 1000).all() for p in range(passes))
    with pytest.raises(ValueError, match="cannot draw"):
        rmia.subsample(z_in, z_avg, v_in, v_avg, n_z=31, n_val=5, rng=rng)


# --------------------------------------------------------------------------- per person

# Integer scores so that means and ties are exact. Members m1..m4, non-members n1..n5; "x" is in
# neither group. Person-level scores:
#   mean: members 9, 7, 5, 2   non-members 7, 4, 3, 1, 0
#   max:  members 9, 9, 5, 3   non-members 7, 4, 3, 2, 0
_IMAGES = [("m2", 9), ("n4", 0), ("m1", 9), ("x", 100), ("m4", 3), ("n1", 7), ("m3", 5),
           ("n2", 4), ("m2", 5), ("n3", 3), ("n4", 2), ("m4", 1), ("n5", 0)]
_MEMBERS, _NONMEMBERS = ["m1", "m2", "m3", "m4"], ["n1", "n2", "n3", "n4", "n5"]


def test_per_person_hand_computed():
    ids, scores = zip(*_IMAGES, strict=True)
    out = per_person.attack(np.array(scores, float), list(ids), _MEMBERS, set(_NONMEMBERS))
    assert (out["n_members"], out["n_nonmembers"], out["n_images_ignored"]) == (4, 5, 1)
    # mean: of the 20 (member, non-member) pairs, 15 are ordered right and one (7, 7) is tied:
    # AUC = 15.5 / 20. ROC: (0, 0) (0, 1/4) (1/5, 1/2) ...; the tie makes a diagonal step, so
    # TPR at FPR 1% = 1/4 + 1/4 * (0.01 / 0.2) and at 10% = 1/4 + 1/4 * 0.5.
    mean = out["mean"]
    assert mean["auc"] == pytest.approx(15.5 / 20)
    assert mean["tpr_at_fpr_1pct"] == pytest.approx(0.2625)
    assert mean["tpr_at_fpr_10pct"] == pytest.approx(0.375)
    np.testing.assert_allclose(mean["member_scores"], [9, 7, 5, 2])
    np.testing.assert_allclose(sorted(mean["nonmember_scores"]), [0, 1, 3, 4, 7])  # a set
    # max: 5 + 5 + 4 + (2 + 1/2 for the tie 3 = 3) = 16.5 of 20; ROC (0, 1/2) then (1/5, 1/2):
    # TPR 1/2 at both FPRs.
    mx = out["max"]
    assert mx["auc"] == pytest.approx(16.5 / 20)
    assert mx["tpr_at_fpr_1pct"] == pytest.approx(0.5)
    assert mx["tpr_at_fpr_10pct"] == pytest.approx(0.5)
    np.testing.assert_allclose(mx["member_scores"], [9, 9, 5, 3])


def test_per_person_errors():
    ids, scores = zip(*_IMAGES, strict=True)
    with pytest.raises(ValueError, match="differ in length"):
        per_person.attack(scores[:-1], ids, _MEMBERS, _NONMEMBERS)
    with pytest.raises(ValueError, match="member_identities is empty"):
        per_person.attack(scores, ids, [], _NONMEMBERS)
    with pytest.raises(ValueError, match="nonmember_identities is empty"):
        per_person.attack(scores, ids, _MEMBERS, [])
    with pytest.raises(ValueError, match=r"both groups: \['m3'\]"):
        per_person.attack(scores, ids, _MEMBERS, _NONMEMBERS + ["m3"])
    with pytest.raises(ValueError, match=r"without any image: \['n9'\]"):
        per_person.attack(scores, ids, _MEMBERS, _NONMEMBERS + ["n9"])
    with pytest.raises(ValueError, match="NaN"):
        per_person.attack([np.nan, *scores[1:]], ids, _MEMBERS, _NONMEMBERS)


# --------------------------------------------------------------------------- ROC figure


def test_roc_figure_panels_lines_log_axis_and_auc_legend():
    fpr, tpr = np.array([0.0, 0.001, 0.1, 1.0]), np.array([0.0, 0.2, 0.6, 1.0])
    curves = {"pretrain": {"rmia": (fpr, tpr, 0.8123), "loss": (fpr, tpr, 0.61)},
              "meta_unlearn": {"rmia": (fpr, tpr ** 2, 0.55)}}
    fig = roc.roc_figure(curves)
    assert isinstance(fig, Figure)
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes] == ["rmia", "loss"]
    for ax, n_methods in zip(axes, (2, 1), strict=True):
        assert ax.get_xscale() == "log"
        lines = ax.get_lines()
        assert len(lines) == n_methods + 1  # one per method + the chance diagonal
        diagonal = lines[-1]
        np.testing.assert_allclose(diagonal.get_xdata(), diagonal.get_ydata())
        assert min(min(line.get_xdata()) for line in lines) >= roc.FPR_FLOOR
    legend = [t.get_text() for t in axes[0].get_legend().get_texts()]
    assert any("pretrain" in t and "0.812" in t for t in legend)
    assert any("meta_unlearn" in t and "0.550" in t for t in legend)
    assert any("0.610" in t for t in (t.get_text() for t in axes[1].get_legend().get_texts()))
    fig.savefig(io.BytesIO(), format="png")  # draws without pyplot


def test_the_fixed_point_is_read_off_the_grid_and_chosen_by_no_label():
    """``rmia.at_point``: the grid entry of (γ, a) with its TPR at 1% FPR by ``np.interp``;
    ``privacy.fixed_point`` takes the config's point whatever the TPRs (the labels) say, while
    the reference's ``best`` follows them; a point off the grid and a malformed setting are one
    error each."""
    import ml_collections

    from oneshui_jax.errors import ConfigError
    from oneshui_jax.study import privacy, validate

    rng = np.random.default_rng(0)
    grid = []
    for gamma in rmia.GAMMAS:
        for a in rmia.AS:
            fpr = np.sort(np.r_[0.0, rng.random(5), 1.0])
            tpr = np.maximum.accumulate(np.clip(fpr + rng.random(7) * 0.3, 0, 1))
            grid.append({"gamma": gamma, "a": a, "auc": rng.random(), rmia.TPR_KEY: rng.random(),
                         "fpr": fpr, "tpr": tpr})
    entry = rmia.at_point(grid, 2, 0.5)
    assert (entry["gamma"], entry["a"]) == (2, 0.5)
    assert entry["tpr_at_1pct"] == pytest.approx(np.interp(0.01, entry["fpr"], entry["tpr"]))
    with pytest.raises(ValueError, match=r"\(gamma, a\) = \(3, 0.5\) is not a point"):
        rmia.at_point(grid, 3, 0.5)
    config = ml_collections.ConfigDict({"mia": {"rmia_point": (2, 0.5)}})
    fixed = privacy.fixed_point(config, grid)["rmia_fixed"]
    # Other labels: another point has the best TPR, so the reference's selection moves to it;
    # the fixed point does not.
    relabelled = [dict(g, **{rmia.TPR_KEY: 1.0 if (g["gamma"], g["a"]) == (8, 0.2) else 0.1})
                  for g in grid]
    assert (rmia.best(relabelled)["gamma"], rmia.best(relabelled)["a"]) == (8, 0.2)
    assert privacy.fixed_point(config, relabelled)["rmia_fixed"] == fixed
    assert fixed["auc"] == pytest.approx(100 * entry["auc"])
    assert privacy.fixed_point(ml_collections.ConfigDict({"mia": {"rmia_point": ()}}), grid) == {}
    study_config = small_config_for_validation()
    study_config.mia.rmia_point = (3, 0.5)
    with pytest.raises(ConfigError, match=r"config.mia.rmia_point is \(3, 0.5\); expected"):
        validate.validate_config(study_config)


def small_config_for_validation():
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs"))
    import synthfaces

    return synthfaces.get_config("runlocal=True")


def test_the_held_out_selection_takes_the_highest_auc_and_reads_no_forget_row(monkeypatch):
    """``privacy.select_on_held_out``: the grid point with the highest AUC on the held-out
    request (the first of equal ones), from the z, held-out and val signals alone."""
    import types

    import ml_collections

    from oneshui_jax.study import privacy

    seen = {}

    def fake_grid(z_in, z_avg, x_in, x_avg, v_in, v_avg):
        seen["members"] = x_in.shape
        fpr, tpr = np.array([0.0, 0.5, 1.0]), np.array([0.0, 0.8, 1.0])
        return [{"gamma": g, "a": a, "auc": auc, "fpr": fpr, "tpr": tpr}
                for (g, a), auc in zip([(1, 0.2), (2, 0.2), (2, 0.5), (4, 1)],
                                       [0.50, 0.61, 0.61, 0.55], strict=True)]

    monkeypatch.setattr(rmia, "score_grid", fake_grid)
    ctx = types.SimpleNamespace(config=ml_collections.ConfigDict({"mia": {}}))
    signals = {k: np.ones((2, n)) for k, n in (("z", 30), ("held_out", 7), ("val", 11))}
    chosen = privacy.select_on_held_out(ctx, signals, signals)  # no "forget" key at all
    assert (chosen["gamma"], chosen["a"], chosen["auc"]) == (2, 0.2, pytest.approx(61.0))
    assert chosen["tpr_at_1pct"] == pytest.approx(100 * 0.8 * 0.01 / 0.5)
    assert (chosen["members"], chosen["nonmembers"], seen["members"]) == (7, 11, (2, 7))
