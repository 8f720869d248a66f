"""The two Triton kernels of the multi-tensor Adai step (host side: :mod:`_multi_tensor`).

Each kernel runs over a whole bucket (one device and dtype) in a single launch, like torch's
``multi_tensor_apply``: program ``c`` reads row ``c`` of a chunk table, ``(tensor index, first
element)``, then that tensor's row of a tensor table, ``(data pointers..., numel, step row)``,
and sweeps ``CHUNK`` elements of it in blocks of ``BLOCK``. The data pointers are raw addresses
(int64) cast to typed pointers, so one launch reaches every tensor whatever their number.

Coefficients come from a float64 ``scalars`` tensor (Triton would pass Python floats as float32):
the hyperparameters at the indices below, then ``1 - beta2**step`` of each distinct step count.
Arithmetic is in the state's precision (float32 for 16-bit parameters), coefficients formed in
float64 on the host. Clamps propagate NaN like ``torch.clamp``. Nothing is atomic: pass 1 writes
one float64 partial sum per chunk and the host adds them in order, so results are bitwise
reproducible (a resumed run continues bit for bit).
"""

from __future__ import annotations

import triton
import triton.language as tl

# Layout of ``scalars`` (float64); the bias corrections ``1 - beta2**step`` follow at HYPER_COUNT + row.
SIGN = tl.constexpr(0)
L2 = tl.constexpr(1)
BETA2 = tl.constexpr(2)
ONE_MINUS_BETA2 = tl.constexpr(3)
BETA0 = tl.constexpr(4)
MAX_BETA1 = tl.constexpr(5)
DECAY = tl.constexpr(6)
NEG_STEP_SCALE = tl.constexpr(7)
EXPONENT = tl.constexpr(8)
DAMPENING = tl.constexpr(9)
HYPER_COUNT = tl.constexpr(10)


@triton.jit
def to_param_dtype(x, P_TYPE: tl.constexpr):
    """``x`` (float32 or float64) in the parameter's dtype, rounded to nearest even like torch.

    bfloat16 is rounded by hand, as ``c10::BFloat16`` does it: Triton's CPU interpreter would
    truncate, and the tests run there. NaN stays NaN.
    """
    if P_TYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = tl.where(x == x, bits, 0x7FC00000)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(P_TYPE)


@triton.jit
def chunk_of(tensors, chunks, COLUMNS: tl.constexpr):
    """This program's chunk: its tensor's row in the tensor table, and its first element."""
    c = tl.program_id(0)
    return tensors + COLUMNS * tl.load(chunks + 2 * c), tl.load(chunks + 2 * c + 1)


@triton.jit
def operand(row, column, TYPE: tl.constexpr):
    """The typed pointer stored (as an int64 address) in ``column`` of a tensor-table row."""
    return tl.load(row + column).to(tl.pointer_type(TYPE))


@triton.jit
def vhat_sum_kernel(tensors, chunks, scalars, partials, G_TYPE: tl.constexpr, S_TYPE: tl.constexpr,
                    P_TYPE: tl.constexpr, USE_L2: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """Pass 1: ``partials[c] = sum(v_new) / (1 - beta2**step)`` over chunk ``c``; writes nothing else.

    Tensor table columns: ``g, v, p, numel, step row`` (``p`` is read for L2 decay only).
    """
    c = tl.program_id(0)
    row, start = chunk_of(tensors, chunks, 5)
    g_ptr = operand(row, 0, G_TYPE)
    v_ptr = operand(row, 1, S_TYPE)
    p_ptr = operand(row, 2, P_TYPE)
    numel = tl.load(row + 3)
    bias2 = tl.load(scalars + HYPER_COUNT + tl.load(row + 4))
    sign = tl.load(scalars + SIGN).to(S_TYPE)
    l2 = tl.load(scalars + L2).to(S_TYPE)
    beta2 = tl.load(scalars + BETA2).to(S_TYPE)
    one_minus_beta2 = tl.load(scalars + ONE_MINUS_BETA2).to(S_TYPE)
    total = tl.zeros([BLOCK], dtype=tl.float64)
    for block in range(0, tl.minimum(CHUNK, numel - start), BLOCK):  # a short tensor's chunk: fewer blocks
        offsets = start + block + tl.arange(0, BLOCK)
        mask = offsets < numel
        g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(S_TYPE) * sign
        if USE_L2:
            g = g + l2 * tl.load(p_ptr + offsets, mask=mask, other=0.0).to(S_TYPE)
        v = tl.load(v_ptr + offsets, mask=mask, other=0.0) * beta2 + one_minus_beta2 * (g * g)
        total += v.to(tl.float64)
    tl.store(partials + c, tl.sum(total, axis=0) / bias2)


@triton.jit
def inertia_update_kernel(tensors, chunks, scalars, vbar_ptr, found_inf, G_TYPE: tl.constexpr,
                          S_TYPE: tl.constexpr, P_TYPE: tl.constexpr, USE_L2: tl.constexpr, DAMPED: tl.constexpr,
                          HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """Pass 2: new ``v``, ``beta1``, ``P``, ``m`` and ``p`` of chunk ``c``, in place; never writes ``g``.

    Tensor table columns: ``p, g, m, v, P, numel, step row``. With ``HAS_FOUND_INF``, a nonzero
    ``found_inf[0]`` masks every load and store: the step changes nothing.
    """
    row, start = chunk_of(tensors, chunks, 7)
    p_ptr = operand(row, 0, P_TYPE)
    g_ptr = operand(row, 1, G_TYPE)
    m_ptr = operand(row, 2, S_TYPE)
    v_ptr = operand(row, 3, S_TYPE)
    prod_ptr = operand(row, 4, S_TYPE)
    numel = tl.load(row + 5)
    if HAS_FOUND_INF:
        numel = tl.where(tl.load(found_inf) == 0, numel, 0)
    bias2 = tl.load(scalars + HYPER_COUNT + tl.load(row + 6)).to(S_TYPE)
    vbar = tl.load(vbar_ptr).to(S_TYPE)
    sign = tl.load(scalars + SIGN).to(S_TYPE)
    l2 = tl.load(scalars + L2).to(S_TYPE)
    beta2 = tl.load(scalars + BETA2).to(S_TYPE)
    one_minus_beta2 = tl.load(scalars + ONE_MINUS_BETA2).to(S_TYPE)
    beta0 = tl.load(scalars + BETA0).to(S_TYPE)
    max_beta1 = tl.load(scalars + MAX_BETA1).to(S_TYPE)
    decay = tl.load(scalars + DECAY).to(S_TYPE)
    neg_step_scale = tl.load(scalars + NEG_STEP_SCALE).to(S_TYPE)
    exponent = tl.load(scalars + EXPONENT).to(S_TYPE)
    dampening = tl.load(scalars + DAMPENING).to(S_TYPE)
    for block in range(0, tl.minimum(CHUNK, numel - start), BLOCK):  # a short tensor's chunk: fewer blocks
        offsets = start + block + tl.arange(0, BLOCK)
        mask = offsets < numel
        p = tl.load(p_ptr + offsets, mask=mask, other=0.0).to(S_TYPE)
        g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(S_TYPE) * sign
        if USE_L2:
            g = g + l2 * p
        v = tl.load(v_ptr + offsets, mask=mask, other=0.0) * beta2 + one_minus_beta2 * (g * g)
        ratio = v / bias2 / vbar
        if DAMPED:
            ratio = tl.exp(tl.log(ratio) * exponent)  # ratio >= 0; log(0) = -inf gives 0
        beta1 = tl.minimum(tl.maximum(1.0 - beta0 * ratio, 0.0, propagate_nan=tl.PropagateNan.ALL), max_beta1,
                           propagate_nan=tl.PropagateNan.ALL)
        prod = tl.load(prod_ptr + offsets, mask=mask, other=1.0) * beta1
        weight = 1.0 - beta1
        if DAMPED:
            weight = tl.exp(tl.log(weight) * dampening)
        m = beta1 * tl.load(m_ptr + offsets, mask=mask, other=0.0) + weight * g
        update = m / (1.0 - prod) * neg_step_scale
        # Rounded to the parameter's dtype as the eager paths do: decay, then the update, then the sum.
        decayed = to_param_dtype(p * decay, P_TYPE).to(S_TYPE)
        new_p = decayed + to_param_dtype(update, P_TYPE).to(S_TYPE)
        tl.store(v_ptr + offsets, v, mask=mask)
        tl.store(m_ptr + offsets, m, mask=mask)
        tl.store(prod_ptr + offsets, prod, mask=mask)
        tl.store(p_ptr + offsets, to_param_dtype(new_p, P_TYPE), mask=mask)
