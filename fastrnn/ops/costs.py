"""Static cost of one time step, per program, for each kernel of a plan: what a change to a kernel
or a plan costs, judged on the CPU before a GPU confirms it (``explain`` and
``bench/kernel_resources.py`` report it next to the compiled figures: registers, spills,
tensor-core instruction kind).

The model, per kernel, per program, per step of the sequence:

* ``smem_read_bytes``: bytes the tensor-core products read from shared memory (each dot operand
  staged there once per batch chunk; tf32x3 keeps two copies of an fp32 operand);
* ``l2_read_bytes`` / ``l2_write_bytes``: bytes read from and written to global memory (L2 for
  what other programs of the step wrote: the exchanged state; DRAM-backed for the rest), at the
  tile's padded sizes, masks ignored;
* ``barriers``: grid barriers the programs of a group meet at (cooperative) or kernel boundaries
  that stand in for them (stepwise: one per launch);
* ``launches``: kernel launches of this kernel per step (persistent and cooperative: 0, the whole
  sequence is one launch).

Activations saved for the backward are counted as written in training (``save``). Each entry
states its model in one line (``model``).
"""

from __future__ import annotations

import triton

from .. import _modes
from .select import Plan, Problem, block, operand_copies


def _cooperative(problem: Problem, plan: Plan, cfg, forward: bool, save: bool) -> dict:
    from .cooperative import BLOCK_N

    isz, acc = problem.itemsize, 8 if problem.itemsize == 8 else 4
    G, U, K, BT = problem.G, cfg.block_h, cfg.block_k, cfg.block_b
    chunks = triton.cdiv(BT, BLOCK_N)
    copies = operand_copies(problem)
    nj = plan.grid[0]
    nsave = _modes.NUM_SAVED[problem.mode]
    lstm = problem.mode == _modes.LSTM
    rows = cfg.gates * U
    if forward:
        smem = (rows * K + K * BLOCK_N) * isz * copies * chunks
        read = BT * problem.H * isz + BT * G * U * isz + (BT * U * acc if lstm else 0)
        write = 2 * BT * U * isz + (BT * U * acc if lstm else 0)
        if save:
            write += BT * nsave * U * isz + (BT * U * acc if lstm else 0)
        model = (f"W slice [{rows}x{K}] + h chunk [{K}x{BLOCK_N}] from shared memory per chunk "
                 f"({chunks}); reads the group's h ({BT}x{problem.H}) and its units' input "
                 "projections; writes y and the exchanged h (and the saved gates)")
    else:
        smem = (rows * K + rows * BLOCK_N) * isz * copies * chunks
        read = nj * BT * U * isz + BT * U * isz + BT * nsave * U * isz + BT * U * isz \
            + (2 * BT * U * acc if lstm else 0)
        write = BT * G * U * isz + BT * K * isz + (BT * U * acc if lstm else 0) + BT * U * acc
        model = (f"W slice [{rows}x{K}] + its gate gradients [{rows}x{BLOCK_N}] from shared "
                 f"memory per chunk ({chunks}); reads every program's partial product for its "
                 f"units ({nj}x{BT}x{U}, the layer's dtype), its dy, saved gates and state; "
                 f"writes its gate gradients, its partial product for every unit ({BT}x{K}) and "
                 "carried dh/dc")
    return dict(smem_read_bytes=smem, l2_read_bytes=read, l2_write_bytes=write,
                barriers=1 if nj > 1 else 0, launches=plan.launches_per_step[0 if forward else 1],
                model=model)


def _cooperative_proj(problem: Problem, plan: Plan, cfg, forward: bool, save: bool) -> dict:
    """LSTM with proj_size (ops/cooperative_proj.py), for a program that owns state rows (the
    busiest): two phases and two barriers per step."""
    from .cooperative import BLOCK_N

    isz, acc = problem.itemsize, 8 if problem.itemsize == 8 else 4
    H, P, U, K, BT = problem.H, problem.P, cfg.block_h, cfg.block_k, cfg.block_b
    R = block(H)
    chunks = triton.cdiv(BT, BLOCK_N)
    copies = operand_copies(problem)
    nj = plan.grid[0]
    if forward:
        smem = ((4 * U * K + K * BLOCK_N) + (U * R + R * BLOCK_N)) * isz * copies * chunks
        read = BT * P * isz + BT * 4 * U * isz + BT * U * acc + BT * R * isz + U * R * isz \
            + BT * U * isz
        write = BT * U * isz + BT * U * acc + 2 * BT * U * isz
        if save:
            write += BT * 4 * U * isz + BT * U * acc
        model = (f"A: W slice [{4 * U}x{K}] + h chunk [{K}x{BLOCK_N}] from shared memory per "
                 f"chunk ({chunks}), reads the group's h ({BT}x{P}) and its units' input "
                 f"projections, writes r and c; B: W_hr's rows [{U}x{R}] (L1 after the first "
                 f"step) times every unit's r ({BT}x{R}), writes y and h of its state rows")
    else:
        smem = ((4 * U * K + 4 * U * BLOCK_N) + (U * K + K * BLOCK_N)) * isz * copies * chunks
        read = nj * BT * U * isz + BT * U * acc + BT * U * isz \
            + BT * K * isz + U * K * isz + BT * U * acc + BT * 4 * U * isz + 2 * BT * U * acc
        write = BT * U * isz * 2 + BT * U * acc \
            + BT * 4 * U * isz + BT * U * acc + BT * K * isz
        model = (f"1: reads every program's partial product for its state rows ({nj}x{BT}x{U}, "
                 "the layer's dtype) and its dy, writes dh (to L2 and dhp) and the carried dh; "
                 f"2: W_hr's columns [{K}x{U}] (L1 after the first step) times the group's dh "
                 f"({BT}x{K}), the saved gates and cell, W slice [{4 * U}x{K}] + gate gradients "
                 f"from shared memory per chunk ({chunks}), writes its gate gradients, its "
                 f"partial product ({BT}x{K}) and dc")
    return dict(smem_read_bytes=smem, l2_read_bytes=read, l2_write_bytes=write,
                barriers=2 if nj > 1 else 0, launches=plan.launches_per_step[0 if forward else 1],
                model=model)


def _persistent(problem: Problem, plan: Plan, cfg, forward: bool, save: bool) -> dict:
    isz, acc = problem.itemsize, 8 if problem.itemsize == 8 else 4
    G, bh, bp, BB = problem.G, cfg.block_h, cfg.block_k, cfg.block_b
    copies = operand_copies(problem)
    weights = G * bh * bp + (bh * bp if problem.has_proj else 0)
    nsave = _modes.NUM_SAVED[problem.mode]
    lstm = problem.mode == _modes.LSTM
    smem = (weights + BB * (bp + bh)) * isz * copies
    if forward:
        read = BB * G * bh * isz
        write = BB * bp * isz + ((BB * nsave * bh * isz + (BB * bh * acc if lstm else 0))
                                 if save else 0)
        model = (f"all of W_hh [{G * bh}x{bp}] (and W_hr) and the state tile from shared memory; "
                 "reads the input projections of its rows; writes y (and the saved gates)")
    else:
        read = BB * bp * isz * 2 + BB * nsave * bh * isz + (BB * bh * acc if lstm else 0)
        write = BB * G * bh * isz * (2 if problem.mode == _modes.GRU else 1)
        model = (f"all of W_hh [{G * bh}x{bp}] and the gradient tile from shared memory; reads "
                 "dy, the previous state and the saved gates of its rows; writes their gate "
                 "gradients")
    return dict(smem_read_bytes=smem, l2_read_bytes=read, l2_write_bytes=write, barriers=0,
                launches=0, model=model)


def _stepwise(problem: Problem, plan: Plan, cfg, save: bool) -> dict:
    isz = problem.itemsize
    G, H, P, BB, bc = problem.G, problem.H, problem.P, cfg.block_b, cfg.block_h
    copies = operand_copies(problem)
    name = cfg.kernel
    if name == "_recurrence_fwd_step_kernel":
        k, operands, extra_read = P, G, BB * G * bc * isz
        extra_write = BB * bc * isz * (1 + (_modes.NUM_SAVED[problem.mode] if save else 0))
    elif name == "_projection_step_kernel":
        k, operands, extra_read, extra_write = H, 1, 0, BB * bc * isz
    elif name == "_recurrence_bwd_step_dh_kernel":
        k, operands, extra_read, extra_write = H, G, BB * bc * isz, BB * bc * 4
    else:  # _recurrence_bwd_step_gates_kernel
        k, operands = P, 1 if problem.has_proj else 0
        extra_read = BB * bc * (4 + isz * (1 + _modes.NUM_SAVED[problem.mode]))
        extra_write = BB * G * bc * isz
    k = block(k)
    weights = operands * bc * k * isz            # this program's weight tile, from L2 each step
    state = BB * k * isz if operands else 0      # the previous step's state (or gradients)
    return dict(smem_read_bytes=(weights + state) * copies, l2_read_bytes=weights + state +
                extra_read, l2_write_bytes=extra_write, barriers=1, launches=1,
                model=(f"one launch per step: its weight tile [{operands}x{bc}x{k}] and the "
                       f"state [{BB}x{k}] from L2 through shared memory; the kernel boundary is "
                       "the barrier" if operands else "one launch per step, no product: "
                       "pointwise gate gradients from L2; the kernel boundary is the barrier"))


def _layer_norm(problem: Problem, plan: Plan, cfg, forward: bool, save: bool) -> dict:
    """LayerNorm layers (ops/layernorm.py): a program owns whole rows and streams W_hh."""
    isz, acc = problem.itemsize, 8 if problem.itemsize == 8 else 4
    G, H, BB, bh, bk = problem.G, problem.H, cfg.block_b, cfg.block_h, cfg.block_k
    copies = operand_copies(problem)
    lstm = problem.mode == _modes.LSTM
    Hp, Kp = triton.cdiv(H, bh) * bh, triton.cdiv(H, bk) * bk
    weights = G * Hp * Kp * isz                       # all of W_hh, tile by tile
    state = triton.cdiv(H, bh) * BB * Kp * isz        # the state (or dq) per unit chunk
    row = BB * G * Hp * acc                           # one scratch row of the batch tile
    if forward:
        read = weights + state + BB * G * Hp * isz + 3 * row + (3 * BB * Hp * acc if lstm else 0)
        write = row + BB * Hp * isz + (BB * Hp * acc if lstm else 0)
        if save:
            write += BB * 4 * Hp * isz + row + (BB * Hp * acc if lstm else 0)
        model = (f"all of W_hh [{G * Hp}x{Kp}] streamed from L2 through shared memory in "
                 f"{bh}x{bk} tiles, the state per unit chunk; the products through a scratch row "
                 "(written once, read three times), the cell state (LSTM) twice more; "
                 "barriers inside the program only")
    else:
        read = weights + state + BB * Hp * isz + BB * 4 * Hp * isz + 3 * row \
            + (4 * BB * Hp * acc if lstm else 0)
        write = BB * G * Hp * isz * (3 if not lstm else 2) + row + 2 * BB * Hp * acc
        model = (f"all of W_hh [{G * Hp}x{Kp}] streamed from L2 for dq @ W_hh; dy, the saved "
                 "gates, normalised products and statistics of its rows; writes the gate "
                 "gradients and dq; barriers inside the program only")
    return dict(smem_read_bytes=(weights + state) * copies, l2_read_bytes=read,
                l2_write_bytes=write, barriers=1 if plan.strategy == "stepwise" else 0,
                launches=plan.launches_per_step[0 if forward else 1], model=model)


def _layer_norm_coop(problem: Problem, plan: Plan, cfg, forward: bool, save: bool) -> dict:
    """LayerNorm layers, cooperative (ops/layernorm_coop.py): W_hh sliced, statistics reduced
    across programs."""
    from .cooperative import BLOCK_N, _gates_padded

    isz, acc = problem.itemsize, 8 if problem.itemsize == 8 else 4
    G, H, U, K, BT = problem.G, problem.H, cfg.block_h, cfg.block_k, cfg.block_b
    chunks = triton.cdiv(BT, BLOCK_N)
    copies = operand_copies(problem)
    nj = plan.grid[0]
    lstm = problem.mode == _modes.LSTM
    parts = BT * nj * 2 * acc                 # every program's partial statistics of the rows
    if forward:
        rows = _gates_padded(G) * U
        smem = (rows * K + K * BLOCK_N) * isz * copies * chunks
        state = 2 * BT * H * acc + parts if lstm else BT * H * isz   # c' and o, or h
        read = state + parts + BT * G * U * (acc + isz) + (BT * U * acc if lstm else BT * U * isz)
        write = 2 * BT * 2 * acc + BT * G * U * acc + BT * U * isz \
            + (2 * BT * U * acc if lstm else 0)
        if save:
            write += BT * 4 * U * isz + BT * G * U * acc + (BT * U * acc if lstm else 0)
        model = (f"W slice [{rows}x{K}] + state chunk [{K}x{BLOCK_N}] from shared memory per "
                 f"chunk ({chunks}); reads the group's exchanged "
                 f"{'c and o (every program forms h)' if lstm else 'h'} and every program's "
                 "partial statistics; writes its products, partials, cell and y")
        barriers = 2
    else:
        smem = (G * U * K + G * K * BLOCK_N) * isz * copies * chunks
        read = 2 * BT * G * H * acc + parts + BT * U * isz * 6 + (parts + BT * U * acc * 3
                                                                  if lstm else 0)
        write = BT * G * U * (isz * (2 if lstm else 3) + acc) + BT * 2 * acc \
            + BT * U * acc * (3 if lstm else 1)
        model = (f"W columns [{G}x{U}x{K}] + dq [{G}x{K}x{BLOCK_N}] from shared memory per chunk "
                 f"({chunks}); reads the group's exchanged e and saved normalised products (dq "
                 "of every unit formed on the way in), every program's partial sums, its units' "
                 "dy and saved activations; writes its e, partials, dq, gate gradients")
        barriers = 2 if lstm else 1
    return dict(smem_read_bytes=smem, l2_read_bytes=read, l2_write_bytes=write,
                barriers=barriers if nj > 1 else 0,
                launches=plan.launches_per_step[0 if forward else 1], model=model)


def per_step(problem: Problem, plan: Plan, save: bool = True) -> dict:
    """{kernel name: the static cost of one step of it, per program} for ``plan``."""
    out = {}
    for cfg in plan.kernels:
        forward = "_fwd_" in cfg.kernel or cfg.kernel == "_projection_step_kernel"
        if cfg.kernel.startswith("_ln_") and plan.strategy == "cooperative":
            out[cfg.kernel] = _layer_norm_coop(problem, plan, cfg, forward, save)
        elif cfg.kernel.startswith("_ln_"):
            out[cfg.kernel] = _layer_norm(problem, plan, cfg, forward, save)
        elif cfg.kernel.startswith("_lstmp_"):
            out[cfg.kernel] = _cooperative_proj(problem, plan, cfg, forward, save)
        elif plan.strategy == "cooperative":
            out[cfg.kernel] = _cooperative(problem, plan, cfg, forward, save)
        elif plan.strategy == "persistent":
            out[cfg.kernel] = _persistent(problem, plan, cfg, forward, save)
        else:
            out[cfg.kernel] = _stepwise(problem, plan, cfg, save)
    return out
