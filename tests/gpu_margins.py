"""How far a row's sampling and gate decisions sit from a float-rounding boundary (issue 13, item 5).

On a GPU the Triton kernels compute exp/log with the fast approximate instructions (ex2.approx /
lg2.approx: about 2 ulp) and Triton contracts a * b + c into fused multiply-adds by default
(Triton 3.9: TRITON_DEFAULT_FP_FUSION unset = enabled), while the torch reference rounds every
operation and uses the accurate CUDA math library; the sums also run in other orders. Those change a
statistic (p_top, entropy, s + g, a nucleus mass) by about 1e-6 relative. An exact-equality GPU test
of tokens or states therefore holds only for rows whose decisions are farther than that from a
boundary. These helpers measure that distance on the CPU in float64, so the GPU tests can assert
exact equality on rows with margin > FAST_MATH_TOL (a stated tolerance, 100x the expected error) and
leave out, explicitly and counted, the rows within it (random rows essentially never are).
"""
import torch

from nudgefast.kernels.nudge_gate import GATE_TOP_PROB
from nudgefast.kernels.rng import gumbel_ref
from nudgefast.kernels.sample import SAMPLE_GREEDY, SAMPLE_NUCLEUS

FAST_MATH_TOL = 1e-4  # relative distance from a decision boundary below which a row is not compared exactly


def _nucleus_above(p: torch.Tensor) -> torch.Tensor:
    """float64 [B, V]: for each token, the probability mass of the strictly more probable tokens."""
    asc, _ = p.sort(dim=1)
    upto = asc.cumsum(dim=1)
    n_le = torch.searchsorted(asc, p, right=True)  # tokens <= p_i
    return upto[:, -1:] - upto.gather(1, n_le - 1)


def sample_margins(x: torch.Tensor, seed, step, stream: int, inv_temp, top_p, mode) -> torch.Tensor:
    """float64 [B]: the relative distance of each row's draw from a rounding boundary (inf: none).

    Greedy rows compare the logits themselves (no arithmetic): inf. Sampled rows: the gap between the
    best and second-best s + g (relative to max(1, |best|)), over the nucleus; a nucleus row whose
    draw changes when the tokens within FAST_MATH_TOL of the top_p boundary flip gets margin 0."""
    x = x.detach().double().cpu()
    B, V = x.shape
    seed, step = seed.cpu().reshape(-1, 1), step.cpu().reshape(-1, 1)
    inv_temp, top_p, mode = inv_temp.cpu().double(), top_p.cpu().double(), mode.cpu()
    s = x * inv_temp.reshape(-1, 1)
    g = gumbel_ref(seed, step, stream, torch.arange(V)).double()
    v = s + g
    p = torch.softmax(s, dim=1)
    above = _nucleus_above(p)
    nucleus = (mode == SAMPLE_NUCLEUS).reshape(-1, 1)
    tol = FAST_MATH_TOL * top_p.reshape(-1, 1)
    strict = torch.where(nucleus, above < top_p.reshape(-1, 1) - tol, True)  # kept even if rounding moves
    loose = torch.where(nucleus, above < top_p.reshape(-1, 1) + tol, True)
    best_strict = v.masked_fill(~strict, float("-inf")).argmax(dim=1)
    v_loose = v.masked_fill(~loose, float("-inf"))
    top2 = v_loose.topk(min(2, V), dim=1).values
    gap = (top2[:, 0] - top2[:, -1]) / top2[:, 0].abs().clamp_min(1.0) if V > 1 else torch.full((B,), float("inf"))
    margin = torch.where(best_strict == v_loose.argmax(dim=1), gap, 0.0)
    return torch.where(mode == SAMPLE_GREEDY, float("inf"), margin)


def gate_margins(base_logits: torch.Tensor, gate, threshold) -> torch.Tensor:
    """float64 [B]: |statistic - threshold| / max(1, |threshold|) for each row's gate (float64 reference)."""
    x = base_logits.detach().double().cpu()
    p = torch.softmax(x, dim=1)
    p_top = p.max(dim=1).values
    entropy = -torch.where(p > 0, p * p.log(), 0.0).sum(dim=1)
    thr = threshold.detach().double().cpu()
    stat = torch.where(gate.cpu() == GATE_TOP_PROB, p_top, entropy)
    return (stat - thr).abs() / thr.abs().clamp_min(1.0)
