"""Planted bugs the suite must catch: each mutation edits one snippet of a temporary copy of the
project and runs the tests named for it there; they must fail.

    python -m tests.mutations            # every mutation
    python -m tests.mutations NAME ...   # some (names below)

``tests/test_mutations.py`` runs each one in the suite (CI). A mutation whose snippet is not found
exactly once is an error, not a pass: when the code moves, the mutation moves with it. Add one for
every bug a test was written to catch, with the few tests that catch it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COPIED = ("fastrnn", "tests", "bench", "conftest.py", "pyproject.toml")


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    path: str           # relative to the project root
    old: str            # found exactly once
    new: str
    tests: tuple        # pytest node ids, at least one of which must fail
    why: str = ""


MUTATIONS = (
    Mutation(
        "forced-cooperative-runs-persistent", "fastrnn/ops/recurrence.py",
        "                       strategy or dispatch.forced_strategy() or None)",
        "                       {'cooperative': 'persistent'}.get(\n"
        "                           strategy or dispatch.forced_strategy(),\n"
        "                           strategy or dispatch.forced_strategy()) or None)",
        ("tests/ops/test_recurrence.py::test_op_batch_first_layout[cooperative]",
         "tests/test_parity.py::test_nan_propagates_like_torch[cooperative-gru]"),
        "a forced strategy must be the one that runs"),
    Mutation(
        "persistent-forward-launches-twice", "fastrnn/ops/persistent.py",
        "def forward(a: ForwardArgs, the_plan: Plan) -> None:\n"
        "    cfg = the_plan.config(\"_recurrence_fwd_persistent_kernel\")\n",
        "def forward(a: ForwardArgs, the_plan: Plan) -> None:\n"
        "    _forward_once(a, the_plan)\n"
        "    _forward_once(a, the_plan)\n\n\n"
        "def _forward_once(a: ForwardArgs, the_plan: Plan) -> None:\n"
        "    cfg = the_plan.config(\"_recurrence_fwd_persistent_kernel\")\n",
        ("tests/test_explain.py::test_explain_matches_what_the_layer_launches[GRU-persistent-1]",
         "tests/test_func.py::test_vmap_of_a_layer_is_one_launch[GRU]"),
        "launches are counted where they happen, not reported by the strategy"),
    Mutation(
        "stepwise-backward-extra-dh-launch", "fastrnn/ops/stepwise.py",
        "    step_dh(b.T)  # dh0\n",
        "    step_dh(b.T)  # dh0\n    step_dh(b.T)\n",
        ("tests/ops/test_recurrence.py::test_backward_runs_the_strategy_the_forward_ran"
         "[outside the block]",
         "tests/test_explain.py::test_explain_matches_what_the_layer_launches[RNN-stepwise-3]"),
        "launches are counted where they happen"),
    Mutation(
        "explain-misstates-stepwise-launches", "fastrnn/ops/stepwise.py",
        "                launches_fixed=(0, 1))",
        "                launches_fixed=(0, 2))",
        ("tests/test_explain.py::test_explain_matches_what_the_layer_launches[RNN-stepwise-3]",),
        "explain's figures are checked against counted launches"),
    Mutation(
        "fp16-routed-to-torch-nn", "fastrnn/modules.py",
        "        if not kernels:\n            if (resets is not None",
        "        if not kernels or data.dtype == torch.float16:\n"
        "            if (resets is not None",
        ("tests/test_parity.py::test_fp16_error_within_2x_of_torch[persistent-lstm]",
         "tests/test_ecosystem.py::test_dtype_moves[half]"),
        "dtype tests prove the kernels ran"),
    Mutation(
        "fp64-routed-to-torch-nn", "fastrnn/modules.py",
        "        if not kernels:\n            if (resets is not None",
        "        if not kernels or data.dtype == torch.float64:\n"
        "            if (resets is not None",
        ("tests/test_modules.py::test_double_runs_through_kernels",
         "tests/test_ecosystem.py::test_dtype_moves[double]"),
        "fp64 tests prove the kernels ran"),
    Mutation(
        "leak-256KiB-per-call", "fastrnn/modules.py",
        "        self._update_flat_weights()\n        is_lstm = self.mode == \"LSTM\"\n",
        "        self._update_flat_weights()\n"
        "        globals()['_LEAK'] = torch.cat([globals().get('_LEAK', torch.empty(0)),\n"
        "                                        torch.ones(65536)])\n"
        "        is_lstm = self.mode == \"LSTM\"\n",
        ("tests/test_reliability.py::test_training_loop_holds_steady_memory[GRU]",),
        "the steady-memory test measures bytes on the CPU too"),
    Mutation(
        "bias-gradient-off-by-1-percent", "fastrnn/ops/recurrence.py",
        "                grads[2] = done(g.sum(dim=1))",
        "                grads[2] = done(g.sum(dim=1)) * 1.01",
        ("tests/test_func.py::test_per_sample_gradients_equal_a_loop_of_single_samples",
         "tests/test_func.py::test_ensemble_through_stack_module_state_equals_a_loop"),
        "torch.func tests compare with torch.nn, not with fastrnn"),
    Mutation(
        "reference-gru-bias", "fastrnn/reference.py",
        "            hn = hn + b_hn\n",
        "            hn = hn + 1.01 * b_hn\n",
        ("tests/test_reference.py::test_reference_matches_torch_nn_fp64[gru-1-False-False-True]",),
        "the op tests' oracle is checked against torch.nn"),
    Mutation(
        "stepwise-specialises-on-the-step", "fastrnn/ops/stepwise.py",
        "@triton.jit(do_not_specialize=[\"s\"])  # one compiled kernel for every step\n"
        "def _recurrence_fwd_step_kernel(",
        "@triton.jit\ndef _recurrence_fwd_step_kernel(",
        ("tests/ops/test_strategies.py::test_stepwise_kernels_never_specialise_on_the_step",),
        "a GPU would bake the first launch's step into the kernel the fast launcher reuses"),
    Mutation(
        "empty-hidden-size-reaches-a-kernel", "fastrnn/ops/recurrence.py",
        "    return T == 0 or B == 0 or w_hh.numel() == 0\n",
        "    return T == 0 or B == 0\n",
        ("tests/test_cells.py::test_empty_cells_match_torch_and_launch_nothing[I5-H0-B3-lstm]",),
        "LSTMCell(4, 0) must give torch.nn's empty results, not reach a kernel"),
    Mutation(
        "gpu-run-always-exits-0", "bench/gpu_run.sh",
        "    exit 1\n",
        "    exit 0\n",
        ("tests/test_gpu_run.py::test_a_failed_stage_exits_nonzero_and_names_it_after_the_rest_ran",),
        "a failed GPU stage is visible to whatever runs the script"),
    Mutation(
        "reverse-direction-reset-one-step-late", "fastrnn/ops/_jit.py",
        "    t_in = (step_time(s, i_d, T) + i_d).to(tl.int64)\n",
        "    t_in = step_time(s, i_d, T).to(tl.int64)\n",
        ("tests/test_beyond.py::test_resets_states_and_clip_match_the_reference"
         "[lstm-persistent-True]",),
        "the reverse direction is cut where the episode starts, not one step later"),
    Mutation(
        "reset-gradient-not-collected", "fastrnn/ops/persistent.py",
        "            dh0_acc += tl.where(start, dh_c, 0.0)\n",
        "",
        ("tests/test_beyond.py::test_each_feature_alone[persistent-resets]",),
        "the initial state's gradient collects from every step it entered"),
    Mutation(
        "cooperative-clip-misses-dc", "fastrnn/ops/cooperative.py",
        "                    dc = tl.where(has_q, clamp_grad(dc, clip, CLIP), dc)\n",
        "                    dc = dc\n",
        ("tests/test_beyond.py::test_each_feature_alone[cooperative-clip]",),
        "an LSTM's clip clamps dc as well as dh"),
    Mutation(
        "stepwise-drops-the-cell-states-gradient", "fastrnn/ops/stepwise.py",
        "            dc += tl.load(dcell_ptr + p_row * H + o_h[None, :], mask=m_bh, other=0.0)"
        ".to(ACC)\n",
        "            dc += 0.0\n",
        ("tests/test_beyond.py::test_resets_states_and_clip_match_the_reference"
         "[lstm-stepwise-False]",),
        "return_states' c_all is differentiable"),
    Mutation(
        "weight-gradient-ignores-resets", "fastrnn/ops/recurrence.py",
        "                prev = rows(_previous_states(y, h0, resets, rmask).reshape(T, B, D * P),\n",
        "                prev = rows(_previous_states(y, h0, None, rmask).reshape(T, B, D * P),\n",
        ("tests/test_beyond.py::test_each_feature_alone[stepwise-resets]",),
        "dW_hh multiplies the state each step started from: h0 at an episode start"),
    Mutation(
        "stepwise-dh-forgets-the-recurrent-mask", "fastrnn/ops/stepwise.py",
        "        acc = acc * tl.load(rm_ptr + (i_d * B + ob64)[:, None] * P + o_p[None, :], "
        "mask=m_bp,\n",
        "        acc = acc * 1 + 0 * tl.load(rm_ptr + (i_d * B + ob64)[:, None] * P + "
        "o_p[None, :], mask=m_bp,\n",
        ("tests/test_dropout_options.py::test_each_option_alone_packed[stepwise-recurrent]",),
        "the recurrent gradient passes back through the dropout mask"),
    Mutation(
        "cooperative-forward-forgets-the-recurrent-mask", "fastrnn/ops/cooperative.py",
        "        h = h * tl.load(rm_ptr + rm_rows",
        "        h = h + 0 * tl.load(rm_ptr + rm_rows",
        ("tests/test_dropout_options.py::test_cooperative_recurrent_dropout_with_many_programs"
         "[gru]",),
        "every program's product sees the masked state"),
    Mutation(
        "weight-gradient-ignores-the-recurrent-mask", "fastrnn/ops/recurrence.py",
        "                prev = rows(_previous_states(y, h0, resets, rmask).reshape(T, B, D * P),\n",
        "                prev = rows(_previous_states(y, h0, resets).reshape(T, B, D * P),\n",
        ("tests/test_dropout_options.py::test_each_option_alone_packed[persistent-recurrent]",),
        "dW_hh multiplies the state the product saw: mask * h"),
    Mutation(
        "zoneout-backward-sends-all-of-dh-to-the-cell", "fastrnn/ops/_jit.py",
        "    return g - to_prev, to_prev\n",
        "    return g, to_prev\n",
        ("tests/test_dropout_options.py::test_zoneout_matches_the_reference[gru-persistent]",),
        "zoneout splits dh between the previous state (d) and the cell's new one (1 - d)"),
    Mutation(
        "stepwise-lstm-differentiates-the-zoned-cell", "fastrnn/ops/stepwise.py",
        "            c_t = lstm_new_cell(s0, s1, s2, c_prev)\n",
        "            c_t = c_t\n",
        ("tests/test_dropout_options.py::test_zoneout_matches_the_reference[lstm-stepwise]",),
        "h~ = o tanh(c~) uses the cell's own new state, not the zoned one"),
    Mutation(
        "weight-dropout-mask-dropped", "fastrnn/functional.py",
        "            w_hh = w_hh * wmask.to(dtype)\n",
        "            w_hh = w_hh + 0 * wmask.to(dtype)\n",
        ("tests/test_awd_lstm.py::test_awd_lstm_language_model_trains_like_its_cell_loop_twin",),
        "weight_dropout masks W_hh, as AWD-LSTM's WeightDrop does"),
    Mutation(
        "layernorm-cell-bias-dropped", "fastrnn/ops/layernorm.py",
        "h_new = o * act_tanh(gc * c_hat + bc, FAST)",
        "h_new = o * act_tanh(gc * c_hat, FAST)",
        ("tests/test_layernorm.py::test_matches_the_reference[lstm-persistent-padded]",),
        "LN_c's bias is part of h' = o * tanh(LN_c(c'))"),
    Mutation(
        "layernorm-backward-mean-term-dropped", "fastrnn/ops/layernorm.py",
        "store_gates(dq_ptr + p_row * GH + o_u[None, :], rstd * (v0 - e1 - n0 * e2),",
        "store_gates(dq_ptr + p_row * GH + o_u[None, :], rstd * (v0 - n0 * e2),",
        ("tests/test_layernorm.py::test_matches_the_reference[gru-persistent-padded]",),
        "LN_h's backward subtracts the mean of the scaled gradient"),
    Mutation(
        "layernorm-variance-of-last-chunk-only", "fastrnn/ops/layernorm.py",
        "            q_var += _gate_sum(n0 * n0, n1 * n1, n2 * n2, n3 * n3, m_bu, G)",
        "            q_var = _gate_sum(n0 * n0, n1 * n1, n2 * n2, n3 * n3, m_bu, G)",
        ("tests/test_layernorm.py::test_unit_chunks_and_batch_tiles[gru]",),
        "the statistics sum over every unit chunk of a row"),
    Mutation(
        "layernorm-stepwise-runs-in-one-launch", "fastrnn/ops/layernorm.py",
        "    return [(s, s + 1) for s in range(T)] if stepped else [(0, T)]",
        "    return [(0, T)]",
        ("tests/test_layernorm.py::test_matches_the_reference[gru-stepwise-padded]",),
        "a forced strategy must be the one that runs: launches counted"),
    Mutation(
        "layernorm-gru-hidden-n-bias-outside-r", "fastrnn/functional.py",
        "        shift = torch.cat([outer[:, :2 * H] + inner[:, :2 * H], outer[:, 2 * H:]], "
        "dim=-1)",
        "        shift = outer + inner",
        ("tests/test_layernorm.py::test_matches_the_reference[gru-persistent-padded]",),
        "GRU: LN_h's n bias and b_hn sit inside r * (.)"),
    Mutation(
        "layernorm-coop-variance-without-the-between-programs-term",
        "fastrnn/ops/layernorm_coop.py",
        "    return mean, (tl.sum(m2_j, 0) + tl.sum(n_j * d * d, 0)) / (PER_UNIT * H)",
        "    return mean, tl.sum(m2_j, 0) / (PER_UNIT * H)",
        ("tests/test_layernorm.py::test_cooperative_reduces_across_programs[gru-padded-3]",),
        "Chan's combination adds n_j (mean_j - mean)^2 of every program's partial"),
    Mutation(
        "cooperative-groups-all-start-at-row-0", "fastrnn/ops/cooperative.py",
        "    b_lo = i_bt * BT\n",
        "    b_lo = i_bt * 0\n",
        ("tests/test_layernorm.py::test_cooperative_batch_groups[gru]",),
        "each batch group owns its rows (every cooperative kernel's _group)"),
    Mutation(
        "layernorm-coop-own-dq-not-stored", "fastrnn/ops/layernorm_coop.py",
        "                if k > 0:  # the own units' dq, for dW_hh",
        "                if k < 0:  # the own units' dq, for dW_hh",
        ("tests/test_layernorm.py::test_gradcheck_through_the_kernels[gru-cooperative]",),
        "dW_hh is the whole-sequence GEMM of the dq every owner writes"),
    Mutation(
        "layernorm-coop-backward-reads-the-slot-it-writes", "fastrnn/ops/layernorm_coop.py",
        "                slot = (k + 1) % 2",
        "                slot = k % 2",
        ("tests/test_layernorm.py::test_cooperative_reduces_across_programs[lstm-padded-3]",),
        "e is double-buffered: step k reads what step k-1 exchanged"),
    Mutation(
        "cooperative-backward-sums-one-program-too-few", "fastrnn/ops/cooperative.py",
        "                m_p = ((j + o_js) < NJ)[:, None, None] & m_un[None, :, :]",
        "                m_p = ((j + o_js) < NJ - 1)[:, None, None] & m_un[None, :, :]",
        ("tests/ops/test_recurrence.py::test_cooperative_with_many_programs_per_group"
         "[2-16-4-False-lstm]",),
        "dh of a unit sums the partial products of every program of its group"),
    Mutation(
        "cooperative-backward-column-tiles-overlap", "fastrnn/ops/cooperative.py",
        "                    tl.store(p_p + 3 * KC, _tile_partial(a3, b3,",
        "                    tl.store(p_p + 2 * KC, _tile_partial(a3, b3,",
        ("tests/ops/test_recurrence.py::test_cooperative_with_many_programs_per_group"
         "[2-16-4-False-lstm]",),
        "each column tile of the partial product lands at its own columns"),
    Mutation(
        "cooperative-backward-stacks-gates-out-of-order", "fastrnn/ops/_jit.py",
        "        t = tl.join(tl.join(q0, q2), tl.join(q1, q3))",
        "        t = tl.join(tl.join(q0, q1), tl.join(q2, q3))",
        ("tests/ops/test_recurrence.py::test_cooperative_with_many_programs_per_group"
         "[1-16-1-True-lstm]",),
        "the stacked gate gradients' rows line up with the slice's stacked weight rows"),
    Mutation(
        "cooperative-backward-partials-in-fp8", "fastrnn/ops/cooperative.py",
        "                tl.store(p_p, _tile_partial(a0, b0, dga, dgb, GP, PRECISION).to(P_DTYPE),",
        "                tl.store(p_p, _tile_partial(a0, b0, dga, dgb, GP, PRECISION)"
        ".to(tl.float8e5).to(P_DTYPE),",
        ("tests/ops/test_recurrence.py::test_cooperative_half_precision_partials_cost_no_accuracy"
         "[LSTM]",),
        "the partial products are exchanged at the layer's precision, no narrower"),
    Mutation(
        "cooperative-unpadded-gru-loses-the-n-rows", "fastrnn/ops/cooperative.py",
        "                q2 = acc_b.to(ACC)\n",
        "                q2 = q0\n",
        ("tests/ops/test_recurrence.py::test_cooperative_with_many_programs_per_group"
         "[2-16-4-False-gru]",),
        "GRU's unpadded slice: the n gate's rows are a product of their own"),
    Mutation(
        "cooperative-forward-reads-a-column-tile-twice", "fastrnn/ops/cooperative.py",
        "                h = _state_tile(hbuf_ptr, rows, rm_ptr, rm_rows, o_c + 3 * KC, m_n, H,",
        "                h = _state_tile(hbuf_ptr, rows, rm_ptr, rm_rows, o_c + 2 * KC, m_n, H,",
        ("tests/ops/test_recurrence.py::test_cooperative_with_many_programs_per_group"
         "[2-16-4-False-lstm]",),
        "the forward's product takes each column tile of the state once"),
    Mutation(
        "projection-forward-skips-a-partial-owner", "fastrnn/ops/cooperative_proj.py",
        "        elif i_j * BLOCK_H < P:",
        "        elif (i_j + 1) * BLOCK_H <= P:",
        ("tests/ops/test_recurrence.py::test_cooperative_projection_with_many_programs"
         "[1-16-1-40-20]",),
        "the program whose state rows pass P still owns the ones below it"),
    Mutation(
        "projection-backward-sums-one-program-too-few", "fastrnn/ops/cooperative_proj.py",
        "                        m_j = ((j + o_js) < NJ)[:, None, None]",
        "                        m_j = ((j + o_js) < NJ - 1)[:, None, None]",
        ("tests/ops/test_recurrence.py::test_cooperative_projection_with_many_programs"
         "[1-16-1-40-20]",),
        "dh of a state row sums the partial products of every program of its group"),
    Mutation(
        "projection-dhp-ignores-lengths", "fastrnn/ops/cooperative_proj.py",
        "                                 tl.where(act, dh, 0.0).to(dhp_ptr.dtype.element_ty),",
        "                                 dh.to(dhp_ptr.dtype.element_ty),",
        ("tests/ops/test_recurrence.py::test_cooperative_projection_with_many_programs"
         "[1-16-1-40-20]",),
        "rows past their length took no step: no gradient of W_hr from them"),
    Mutation(
        "projection-reset-keeps-the-state", "fastrnn/ops/cooperative_proj.py",
        "                    h_next = tl.where(start, tl.load(h0_ptr + state, mask=m_pn,",
        "                    h_next = tl.where(start & False, tl.load(h0_ptr + state, mask=m_pn,",
        ("tests/test_beyond.py::test_cooperative_resets_with_many_programs_per_group"
         "[lstm_proj]",),
        "an episode start brings back the initial projected state"),
    Mutation(
        "projection-streams-one-chunk-too-few", "fastrnn/ops/cooperative_proj.py",
        "    for k0 in range(0, K, DR_K):",
        "    for k0 in range(0, K - 1 - (K - 1) % DR_K, DR_K):",
        ("tests/ops/test_recurrence.py::test_cooperative_projection_with_many_programs"
         "[1-16-1-40-20]",),
        "W_hr's streamed product covers every column (DR_K at a time)"),
    Mutation(
        "projection-partials-in-fp8", "fastrnn/ops/cooperative_proj.py",
        "                    tl.store(p_p, _tile_partial(a0, a0, dga, dga, 4, PRECISION).to(P_DTYPE),",
        "                    tl.store(p_p, _tile_partial(a0, a0, dga, dga, 4, PRECISION)"
        ".to(tl.float8e5).to(P_DTYPE),",
        ("tests/ops/test_recurrence.py::test_cooperative_half_precision_partials_cost_no_accuracy"
         "[LSTMP]",),
        "the partial products are exchanged at the layer's precision, no narrower"),
)

BY_NAME = {m.name: m for m in MUTATIONS}


def _copy_project(dest: str) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for entry in COPIED:
        src = os.path.join(ROOT, entry)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(dest, entry), ignore=ignore)
        else:
            shutil.copy2(src, os.path.join(dest, entry))


def plant(m: Mutation, dest: str) -> None:
    """Copy the project to ``dest`` and apply ``m`` there."""
    _copy_project(dest)
    path = os.path.join(dest, m.path)
    with open(path) as f:
        text = f.read()
    count = text.count(m.old)
    if count != 1:
        raise LookupError(f"mutation {m.name!r}: its snippet occurs {count} times in {m.path} "
                          "(expected once): update the mutation with the code")
    with open(path, "w") as f:
        f.write(text.replace(m.old, m.new))


def check(m: Mutation, timeout: float = 600) -> tuple[bool, str]:
    """(caught, pytest's output): whether the named tests fail with ``m`` planted."""
    with tempfile.TemporaryDirectory(prefix=f"fastrnn-mutant-{m.name}-") as dest:
        plant(m, dest)
        env = {**os.environ, "PYTHONPATH": dest, "PYTHONDONTWRITEBYTECODE": "1"}
        env.pop("PYTEST_XDIST_WORKER", None)
        env.pop("PYTEST_CURRENT_TEST", None)
        # One process: it first checks that the fastrnn it imports is the mutant copy (exit
        # status 99 if not), then runs pytest (a second interpreter would import torch again).
        args = ["-q", "-p", "no:cacheprovider", "-p", "no:randomly", "-o", "addopts=", *m.tests]
        code = (f"import fastrnn, sys\n"
                f"if not fastrnn.__file__.startswith({dest!r}): sys.exit(99)\n"
                f"import pytest\nsys.exit(pytest.main({args!r}))")
        proc = subprocess.run([sys.executable, "-c", code], cwd=dest, env=env,
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode == 99:
            raise RuntimeError(f"the mutant copy in {dest} is not the fastrnn that imports")
        out = proc.stdout + proc.stderr
        # 1: tests ran and some failed. Anything else (no tests collected, usage or collection
        # errors, interrupted) proves nothing.
        return proc.returncode == 1 and " failed" in out, out


def main(argv: list[str]) -> int:
    names = argv or [m.name for m in MUTATIONS]
    survived = []
    for name in names:
        caught, out = check(BY_NAME[name])
        print(f"{'caught  ' if caught else 'SURVIVED'} {name}", flush=True)
        if not caught:
            survived.append(name)
            print(out[-3000:])
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
