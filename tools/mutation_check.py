"""Mutation check: do the tests fail when the science breaks?

Each entry of ``MUTATIONS`` is a meaningful one-line bug (a sign flipped, a mask ignored, the last
instead of the best parameters, ...) and the tests that must catch it. For each, the tool copies
the package, its tests and configs to a temporary folder, applies the mutation there (the working
tree is never touched), runs those tests against the copy and reports the mutant ``killed`` (the
tests failed) or ``SURVIVED``. A mutation whose text is no longer found exactly once in its file
is ``stale``: update the list when the code moves. Before the mutants, the union of the listed
tests runs once on the unmutated copy and must pass, so a kill means something; a mutant is
``killed`` only when a test fails (an import or collection error is reported as ``error``).

    python tools/mutation_check.py               # all mutations
    python tools/mutation_check.py --list        # names, files and tests
    python tools/mutation_check.py --only fit_returns_last_params --only inner_step_sign

Exit status 0 when every mutant is killed, 1 otherwise. Prints a table and writes JSON to
``--json`` (default ``bench_out/mutation_check.json``). Not part of CI (minutes); run it before
resolving an issue that touches a listed file, and add a mutation for every new method.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COPIED = ("oneshui_jax", "tests", "configs", "launch", "pyproject.toml")


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest arguments: files, node ids, "-k EXPR"
    why: str = ""


T_OBJ = "tests/test_objectives.py"
T_LOOP = "tests/test_training_loop.py"
T_DIAG = "tests/test_meta_diagnostics.py"
T_MU = "tests/test_meta_unlearn.py"

MUTATIONS = (
    # -- the nine planted bugs that motivated the check --------------------------------------
    Mutation("masked_mean_ignores_mask", "oneshui_jax/losses.py",
             "    return jnp.sum(jnp.where(mask, values, 0)) / count",
             "    return jnp.mean(values)",
             (T_OBJ, f"{T_LOOP}::test_train_loss_is_the_mean_over_valid_rows_only"),
             "padded rows count in every loss"),
    Mutation("map_does_not_skip_labels_without_positives", "oneshui_jax/metrics.py",
             "    return float(np.nanmean(aps) * 100.0)",
             "    return float(np.mean(aps) * 100.0)",
             ("tests/test_metrics.py", T_OBJ), "labels without positives make mAP NaN"),
    Mutation("warmup_off_by_one", "oneshui_jax/optim.py",
             "        return base_lr * step / (warmup_steps + 1e-8)",
             "        return base_lr * (step + 1) / (warmup_steps + 1e-8)",
             ("tests/test_metrics.py", T_LOOP), "the first batch no longer runs at lr 0"),
    Mutation("same_shuffle_every_epoch", "oneshui_jax/data/pipeline.py",
             "        rng = np.random.default_rng([self.seed, epoch])",
             "        rng = np.random.default_rng([self.seed, 0])",
             ("tests/test_pipeline.py",), "every epoch sees the same order"),
    Mutation("reversed_forget_identity_walk", "oneshui_jax/splits.py",
             "    for identity in ids:",
             "    for identity in reversed(ids):",
             ("tests/test_splits.py",), "other people are forgotten than the reference's"),
    Mutation("fit_ignores_warmup_epochs", "oneshui_jax/train.py",
             "epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs)",
             "epochs=cfg.epochs)",
             (T_LOOP,), "config.train.warmup_epochs has no effect"),
    Mutation("fit_returns_last_params", "oneshui_jax/train.py",
             '    best_params, best_epoch = arrays["best_params"], meta["best_epoch"]',
             '    best_params, best_epoch = params, meta["best_epoch"]',
             (T_LOOP,), "the last instead of the best-by-validation parameters"),
    Mutation("inner_step_sign", "oneshui_jax/unlearn/meta_unlearn/core.py",
             "    return jax.tree.map(lambda p, g: p - meta_lr * g, theta, grads)",
             "    return jax.tree.map(lambda p, g: p + meta_lr * g, theta, grads)",
             (T_OBJ, T_MU), "MetaUnlearn's inner step ascends its learned loss"),
    Mutation("batch_map_mean_not_nanmean", "oneshui_jax/losses.py",
             "    return jnp.nanmean(aps)",
             "    return jnp.mean(aps)",
             (T_OBJ, "-k", "batch_map"), "the in-graph mAP is NaN with a label without positives"),
    # -- one or more per method ------------------------------------------------------------------
    Mutation("meta_unlearn_meta_step_ascends", "oneshui_jax/unlearn/meta_unlearn/core.py",
             "    return jax.tree.map(lambda p, u: p - lr * u, phi, updates), opt_state",
             "    return jax.tree.map(lambda p, u: p + lr * u, phi, updates), opt_state",
             (f"{T_MU}::test_meta_training_learns_a_step_that_unlearns_a_planted_request",),
             "meta-training climbs the outer objective"),
    Mutation("meta_unlearn_line_search_picks_the_worst",
             "oneshui_jax/unlearn/meta_unlearn/training.py",
             "    best = float(scales[meta_diagnostics.choose_scale(scales, mean)])",
             "    best = float(scales[meta_diagnostics.choose_scale(scales, -mean)])",
             (f"{T_DIAG}::test_line_search_picks_the_best_of_its_candidates_on_a_planted_objective",),
             "the line search keeps the step length with the highest outer objective"),
    Mutation("meta_unlearn_meta_trains_on_held_out_people",
             "oneshui_jax/unlearn/meta_unlearn/training.py",
             "    stream = request_stream(data, cfg, train_pool)",
             "    stream = request_stream(data, cfg, None)",
             (f"{T_DIAG}::test_held_out_requests_diagnose_and_search_and_averaged_updates_resume",),
             "the held-out identities of the diagnostics take part in meta-training"),
    Mutation("meta_unlearn_normalize_ignores_relative_step",
             "oneshui_jax/unlearn/meta_unlearn/core.py",
             "        return cfg.relative_step * safe_norm(theta) / safe_norm(grads)",
             "        return cfg.meta_lr * safe_norm(theta) / safe_norm(grads)",
             (f"{T_DIAG}::test_normalize_gives_the_step_its_relative_size_times_the_factor",),
             "step_control=normalize ignores relative_step"),
    Mutation("meta_unlearn_ignores_forget_epochs", "oneshui_jax/unlearn/meta_unlearn/core.py",
             "    for _ in range(forget_epochs):",
             "    for _ in range(1):",
             (f"{T_MU}::test_inner_step_is_one_gradient_step_on_the_learned_loss",),
             "config.meta_unlearn.forget_epochs has no effect"),
    Mutation("meta_unlearn_rev_loses_its_gradient", "oneshui_jax/losses.py",
             "        a_uv = weighted_loss(task, u_v, y_v, m_v, use_accs)  # keeps its gradient",
             "        a_uv = weighted_loss(task, jax.lax.stop_gradient(u_v), y_v, m_v, use_accs)",
             (T_OBJ,), "loss_type 'rev' no longer differentiates through u_v"),
    Mutation("meta_unlearn_use_accs_sign", "oneshui_jax/losses.py",
             "        loss = loss * (1.0 - jax.lax.stop_gradient(batch_accuracy(",
             "        loss = loss * (1.0 + jax.lax.stop_gradient(batch_accuracy(",
             (T_OBJ,), "use_accs weighs by 1 + acc"),
    Mutation("meta_unlearn_scrub_kl_reversed", "oneshui_jax/losses.py",
             "    return masked_mean(jnp.exp(log_q) * (log_q - log_p), mask)",
             "    return masked_mean(jnp.exp(log_p) * (log_p - log_q), mask)",
             (T_OBJ,), "KL(student || teacher) instead of F.kl_div's KL(teacher || student)"),
    Mutation("meta_unlearn_uniform_batch_weights", "oneshui_jax/unlearn/meta_unlearn/core.py",
             "    return sizes / jnp.maximum(jnp.sum(sizes), 1.0)",
             "    return jnp.ones_like(sizes) / sizes.shape[0]",
             (T_OBJ, "-k", "weights"), "a partial outer batch weighs as a full one"),
    Mutation("smooth_l1_threshold", "oneshui_jax/losses.py",
             "        return jnp.where(jnp.abs(d) < 1.0, 0.5 * d * d, jnp.abs(d) - 0.5)",
             "        return jnp.where(jnp.abs(d) < 2.0, 0.5 * d * d, jnp.abs(d) - 0.5)",
             (T_OBJ, "-k", "distance"), "smooth L1 with beta 2"),
    Mutation("support_ascent_descends", "oneshui_jax/unlearn/support_ascent.py",
             "    return jax.tree.map(lambda p, g: p + alpha.astype(p.dtype) * g, params, grads)",
             "    return jax.tree.map(lambda p, g: p - alpha.astype(p.dtype) * g, params, grads)",
             (T_OBJ, "-k", "support_ascent"), "support_ascent fine-tunes on the portraits"),
    Mutation("support_ascent_selects_the_worst_alpha", "oneshui_jax/unlearn/support_ascent.py",
             "    return int(order[np.argmin(np.asarray(mean_losses)[order])])",
             "    return int(order[np.argmax(np.asarray(mean_losses)[order])])",
             ("tests/test_method_api.py::"
              "test_support_ascent_chooses_the_lowest_objective_and_the_shorter_step_on_ties",),
             "the step size with the highest selection objective"),
    Mutation("ssd_beta_not_clipped_at_one", "oneshui_jax/unlearn/ssd.py",
             "        beta = jnp.minimum((i_d * dampening_constant) / jnp.where(mask, i_f, 1.0), "
             "1.0)",
             "        beta = (i_d * dampening_constant) / jnp.where(mask, i_f, 1.0)",
             ("tests/test_ssd.py::"
              "test_unlearn_dampens_where_support_importance_exceeds_alpha_times_train",),
             "SSD scales selected parameters up where λ I_D > I_f"),
    Mutation("lipschitz_grads_never_accumulate", "oneshui_jax/unlearn/lipschitz.py",
             "    total = jax.tree.map(lambda a, g: jnp.where(zero_grad, g, a + g), accumulated, "
             "grads)",
             "    total = grads",
             ("tests/test_lipschitz.py::test_gradients_accumulate_across_batches_unless_zeroed",),
             "the reference's missing zero_grad (Q21) silently fixed"),
    Mutation("pgu_gradient_not_projected", "oneshui_jax/unlearn/pgu.py",
             '    return (g - jnp.einsum("ij,jo->io", p, g, precision=_HIGHEST))'
             '.reshape(grad.shape)',
             "    return g.reshape(grad.shape)",
             ("tests/test_pgu.py", "-k", "orthogonal"),
             "PGU's updates move into the retained input subspace (plain gradient descent)"),
    Mutation("scrub_max_step_descends", "oneshui_jax/unlearn/scrub.py",
             '    return -distill_kl(cfg.kl, s, t, cfg.temperature, batch["mask"])',
             '    return distill_kl(cfg.kl, s, t, cfg.temperature, batch["mask"])',
             ("tests/test_scrub.py::test_max_step_ascends_the_kl_with_the_clipped_gradient",),
             "SCRUB's max-steps pull the student towards the teacher on the forget set"),
    Mutation("scrub_max_step_unclipped", "oneshui_jax/unlearn/scrub.py",
             "    grads, norm = clip_grad_norm(grads, MAX_GRAD_NORM)",
             "    norm = optax.global_norm(grads)",
             ("tests/test_scrub.py::test_max_step_ascends_the_kl_with_the_clipped_gradient",),
             "SCRUB's max-steps are not clipped to gradient norm 1.0"),
    Mutation("bad_teacher_forget_rows_use_the_original", "oneshui_jax/unlearn/bad_teacher.py",
             "    return (s * scrub.teacher_probs(kind, dumb_logits)",
             "    return (s * scrub.teacher_probs(kind, smart_logits)",
             ("tests/test_bad_teacher.py",),
             "Bad Teacher distils the original model on the forget rows too (no bad teacher)"),
    # -- evaluation and the data-access contract -------------------------------------------------
    Mutation("evaluate_counts_padding", "oneshui_jax/train.py",
             "        logits.append(out_logits[mask])",
             "        logits.append(out_logits)",
             (f"{T_LOOP}::test_evaluate_ignores_padded_rows_and_averages_batch_means",),
             "padded rows enter the split metric"),
    Mutation("evaluate_loss_over_examples", "oneshui_jax/train.py",
             '        "loss": float(np.mean(batch_means)),',
             '        "loss": float(np.mean(np.concatenate(losses))),',
             (f"{T_LOOP}::test_evaluate_ignores_padded_rows_and_averages_batch_means",),
             "the split loss is not the reference's mean of batch means (Q28)"),
    Mutation("tow_without_absolute_value", "oneshui_jax/metrics.py",
             "        out *= 1.0 - abs(metrics[split] - retrain[split]) / 100.0",
             "        out *= 1.0 - (metrics[split] - retrain[split]) / 100.0",
             ("tests/test_metrics.py",), "ToW rewards being below the oracle"),
    Mutation("reuse_ignores_stage_settings", "oneshui_jax/study/reuse.py",
             "        settings_name: _settings_part(settings),",
             "        settings_name: {},",
             ("tests/test_study.py::test_checkpoint_with_other_hyperparameters_is_refused",),
             "a finished stage is reused after its hyper-parameters changed"),
    Mutation("guarded_source_grants_everything", "oneshui_jax/unlearn/api.py",
             "        if not 0 <= int(index) < len(self._source) or not self._allowed[int(index)]:",
             "        if not 0 <= int(index) < len(self._source):",
             ("tests/test_method_api.py::test_guarded_source_refuses_what_was_not_granted",),
             "a method may read images its ACCESS does not grant"),
    # -- fidelity to the reference's numerics (issue 27) -----------------------------------
    Mutation("vit_stream_in_bf16", "oneshui_jax/models/vit.py",
             "        stream = jnp.promote_types(x.dtype, self.cls_token[...].dtype)",
             "        stream = x.dtype",
             ("tests/test_vit.py::test_bfloat16_follows_autocast",),
             "under bf16 compute the residual stream is bf16, not autocast's float32"),
    Mutation("timm_init_truncated_at_two_std", "oneshui_jax/models/vit.py",
             "        return jnp.clip(std * jax.random.normal(key, shape, jnp.float32), a, b)"
             ".astype(dtype)",
             "        return jnp.clip(std * jax.random.normal(key, shape, jnp.float32), -2 * std, "
             "2 * std).astype(dtype)",
             ("tests/test_vit.py::test_init_follows_timm",),
             "fresh weights truncated at 2 std, not at timm's +-2 in absolute units"),
    Mutation("map_ignores_bf16_scores", "oneshui_jax/metrics.py",
             "    scores = sigmoid_scores(logits, score_dtype)",
             "    scores = sigmoid_scores(logits)",
             ("tests/test_metrics.py::test_map_on_bf16_rounded_scores_is_the_reference_q4",),
             "the mAP scores float sigmoids where the reference rounds them to bf16 (Q4)"),
    Mutation("real_data_evaluates_at_256", "oneshui_jax/config_lib.py",
             "    data.eval_batch_size = 32",
             "    data.eval_batch_size = 256",
             ("tests/test_configs.py::test_real_config_values",),
             "the real-data configs evaluate at another batch than the reference's 32"),
    Mutation("rmia_without_selection_reports_the_first_point", "oneshui_jax/study/privacy.py",
             "    best = rmia.best(grid)",
             "    best = rmia.best(grid) or grid[0]",
             ("tests/test_privacy.py::"
              "test_rmia_without_any_point_above_zero_tpr_reports_the_reference_zeros",),
             "RMIA reports a point the reference never selects instead of its AUC 0 and TPR 0"),
    # -- scale-out (oneshui_jax/sharding.py) -------------------------------------------------
    Mutation("process_rows_ignore_the_process", "oneshui_jax/data/pipeline.py",
             "        return batch * cfg.batch_size + index * local + row",
             "        return batch * cfg.batch_size + row",
             ("tests/test_sharding.py::test_process_rows_put_together_the_global_batches",),
             "every process of a multi-host run reads the first rows of each batch"),
    Mutation("fit_does_not_split_the_batch", "oneshui_jax/train.py",
             "            batch = sharding.shard_batch(host, process_rows=process_rows)",
             "            batch = host",
             ("tests/test_sharding.py::test_eight_devices_train_and_meta_train_like_one",),
             "training on a mesh runs every batch replicated (no data parallelism)"),
    Mutation("metadata_written_by_every_process", "oneshui_jax/checkpoints/metadata.py",
             "    if sharding.is_primary():  # one writer on a multi-host run",
             "    if True:",
             ("tests/test_sharding.py::test_two_processes_train_like_one_and_write_each_file_once",),
             "every process of a multi-host run writes metadata.json"),
    Mutation("interrupt_check_does_nothing", "oneshui_jax/interrupts.py",
             "    if _pending is not None:\n        raise Interrupted(_pending)",
             "    if False:\n        raise Interrupted(_pending)",
             ("tests/test_interrupts.py",),
             "a Ctrl-C swallowed by a finaliser is lost: the stage trains to its end"),
    Mutation("os_error_keeps_no_path", "oneshui_jax/files.py",
             "        if e.filename is None and e.errno:",
             "        if e.filename is not None and e.errno:",
             ("tests/test_disk_errors.py",),
             "a full disk is reported without the path it could not write"),
    Mutation("report_written_file_by_file", "oneshui_jax/files.py",
             "    except BaseException:\n        for tmp, _ in fileset.pending:",
             "    except BaseException:\n        for tmp, _ in []:",
             ("tests/test_disk_errors.py",),
             "a report cut short by a full disk leaves its temporary files behind"),
    Mutation("nan_loss_of_a_method_ignored", "oneshui_jax/errors.py",
             "        if value is not None and not math.isfinite(value):",
             "        if value is not None and math.isinf(value):",
             ("tests/test_lipschitz.py", "-k", "nan"),
             "a method whose loss is NaN hands back NaN parameters"),
    Mutation("sixteen_bit_clipped_not_scaled", "oneshui_jax/data/images.py",
             "        return _grey((values.astype(np.int64) + 128) // 257)",
             "        return _grey(np.minimum(values, 255))",
             ("tests/test_images.py",),
             "a 16-bit portrait is served as an all-white square"),
    Mutation("report_averages_other_method_settings", "oneshui_jax/report/records.py",
             "            if (same_n or _shared(name)) and sa.get(name, absent) != "
             "sb.get(name, absent)]",
             "            if _shared(name) and sa.get(name, absent) != sb.get(name, absent)]",
             ("tests/test_report.py::test_report_refuses_studies_of_other_settings",),
             "report averages two seeds of a study whose methods ran at other settings"),
    Mutation("differences_colours_follow_the_cycle", "oneshui_jax/report/plots.py",
             "            ax.plot(entry[\"mean\"], y, \"o\", color=colors[key[1]])",
             "            ax.plot(entry[\"mean\"], y, \"o\", color=f\"C{y % 10}\")",
             ("tests/test_report.py::test_a_method_has_one_colour_in_every_plot_and_panel",),
             "a method takes another colour in another plot"),
    Mutation("open_lower_bound_taken_as_closed", "oneshui_jax/ranges.py",
             "        if self.low is not None and (value <= self.low if self.low_open "
             "else value < self.low):",
             "        if self.low is not None and (value < self.low if self.low_open "
             "else value < self.low):",
             ("tests/test_settings_ranges.py::"
              "test_range_kinds_accept_their_edges_and_nothing_outside",),
             "a learning rate or batch size of 0 passes the up-front check (the study then "
             "trains at lr 0 or never ends an epoch)"),
    Mutation("chained_request_checks_the_wrong_hash", "oneshui_jax/serve/request.py",
             '    after, recorded = receipt.get("params_hash_after"), '
             'metadata.get("params_hash")',
             '    after, recorded = receipt.get("params_hash_before"), '
             'metadata.get("source_params_hash")',
             ("tests/test_data_integrity.py",),
             "a request chained on an altered parent is served"),
)

def copy_tree(dest: str) -> None:
    for name in COPIED:
        src = os.path.join(REPO, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(dest, name),
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, os.path.join(dest, name))


def environment(root: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("ONESHUI_SHARED_DATA", os.path.join(REPO, "..", "shared", "data"))
    env["ONESHUI_SHARED_DATA"] = os.path.abspath(env["ONESHUI_SHARED_DATA"])
    return env


def run_tests(root: str, tests: tuple[str, ...], timeout: float) -> tuple[str, float, str]:
    """``(outcome, seconds, detail)``: passed | failed (a test failed; detail names the first) |
    error (collection, import or usage error: the mutant broke the tests, not a test caught
    it; detail is the last output line) | timeout."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-rf", "-p", "no:cacheprovider",
           "-o", "addopts=", *tests]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=root, env=environment(root), capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - start, ""
    seconds = time.perf_counter() - start
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    if proc.returncode == 0:
        return "passed", seconds, lines[-1] if lines else ""
    failed = [line[len("FAILED "):] for line in lines if line.startswith("FAILED ")]
    if proc.returncode == 1 and failed:
        return "failed", seconds, failed[0].split(" - ")[0]
    return "error", seconds, lines[-1] if lines else f"exit status {proc.returncode}"


def check_isolated(root: str) -> None:
    """The copy, not the installed working tree, must be what the tests import."""
    out = subprocess.run([sys.executable, "-c", "import oneshui_jax; print(oneshui_jax.__file__)"],
                         cwd=root, env=environment(root), capture_output=True, text=True,
                         check=True).stdout.strip()
    if not os.path.realpath(out).startswith(os.path.realpath(root)):
        raise SystemExit(f"error: the tests would import {out}, not the copy in {root}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="run only this mutation (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--no_baseline", action="store_true",
                        help="skip the run of the unmutated tests")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per mutant")
    parser.add_argument("--jobs", type=int, default=2,
                        help="mutants tested at once, each in its own copy (and the baseline's "
                             "pytest-xdist workers)")
    parser.add_argument("--json", default=os.path.join(REPO, "bench_out", "mutation_check.json"))
    args = parser.parse_args(argv)

    names = {m.name for m in MUTATIONS}
    unknown = sorted(set(args.only) - names)
    if unknown:
        parser.error(f"unknown mutation(s) {unknown}; --list shows the names")
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.name:44s} {m.path:40s} {' '.join(m.tests)}\n    {m.why}")
        return 0

    with tempfile.TemporaryDirectory(prefix="mutation_check_") as tmp:
        roots = [os.path.join(tmp, f"copy{k}") for k in range(max(args.jobs, 1))]
        for root in roots:
            os.makedirs(root)
            copy_tree(root)
        check_isolated(roots[0])
        if not args.no_baseline:
            union = tuple(dict.fromkeys(t for m in chosen for t in _paths(m.tests)))
            workers = ("-n", str(args.jobs), "--dist", "loadfile") if args.jobs > 1 else ()
            outcome, seconds, tail = run_tests(roots[0], (*workers, *union), args.timeout * 2)
            print(f"baseline (unmutated, {len(union)} test selections): {outcome} in "
                  f"{seconds:.0f} s", flush=True)
            if outcome != "passed":
                print(f"error: the unmutated tests do not pass ({tail}); fix them first",
                      file=sys.stderr)
                return 1
        free: queue.Queue[str] = queue.Queue()
        for root in roots:
            free.put(root)

        def one(m: Mutation) -> dict:
            root = free.get()
            try:
                return check(root, m, args.timeout)
            finally:
                free.put(root)

        with concurrent.futures.ThreadPoolExecutor(len(roots)) as pool:
            futures = [pool.submit(one, m) for m in chosen]
            for future in concurrent.futures.as_completed(futures):
                r = future.result()
                print(f"  {r['result']:8s} {r['name']:42s} {r['seconds']:6.1f} s  {r['detail']}",
                      flush=True)
        order = {m.name: k for k, m in enumerate(chosen)}
        results = sorted((f.result() for f in futures), key=lambda r: order[r["name"]])

    print()
    print("| mutation | file | result | caught by | seconds |")
    print("|---|---|---|---|---:|")
    for r in results:
        print(f"| {r['name']} | {r['path']} | {r['result']} | {r['detail']} | "
              f"{r['seconds']:.1f} |")
    bad = [r for r in results if r["result"] != "killed"]
    print(f"\n{len(results) - len(bad)} of {len(results)} mutants killed"
          + (f"; not killed: {', '.join(r['name'] for r in bad)}" if bad else ""))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    tmp = args.json + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"results": results}, f, indent=2)
    os.replace(tmp, args.json)
    return 1 if bad else 0


def check(root: str, m: Mutation, timeout: float) -> dict:
    """Applies ``m`` in the copy ``root``, runs its tests, restores the file: the result row."""
    path = os.path.join(root, m.path)
    with open(path) as f:
        original = f.read()
    count = original.count(m.old)
    if count != 1:
        return {**_row(m), "result": "stale", "seconds": 0.0,
                "detail": f"text found {count} times"}
    with open(path, "w") as f:
        f.write(original.replace(m.old, m.new))
    try:
        outcome, seconds, detail = run_tests(root, m.tests, timeout)
    finally:
        with open(path, "w") as f:
            f.write(original)
    result = {"passed": "SURVIVED", "failed": "killed", "timeout": "killed",
              "error": "error"}[outcome]
    return {**_row(m), "result": result, "seconds": round(seconds, 1),
            "detail": "timeout" if outcome == "timeout" else detail}


def _paths(tests: tuple[str, ...]) -> tuple[str, ...]:
    """The test files and node ids of a selection (``-k`` expressions dropped: the baseline
    runs the whole files)."""
    out, skip = [], False
    for t in tests:
        if skip:
            skip = False
        elif t == "-k":
            skip = True
        else:
            out.append(t)
    return tuple(out)


def _row(m: Mutation) -> dict:
    return {"name": m.name, "path": m.path, "tests": list(m.tests), "why": m.why}


if __name__ == "__main__":
    sys.exit(main())
