"""
A New Perspective on Shampoo's Preconditioner. Morwani*, Shapira*, Vyas, Malach, Kakade, Janson. ICLR 2025.
arXiv 2406.17748. Official code: none (the idea is used in SOAP, github.com/nikhilvyas/SOAP).

Finding: Shampoo's statistics L = E[G G^T], R = E[G^T G] are exactly ONE power-iteration step from the
identity toward the optimal Kronecker approximation of H (Gauss-Newton or full-matrix Adagrad), so
"Shampoo^2" L (x) R is nearly optimal while Shampoo's implied (L (x) R)^{1/2} is clearly worse; with
mini-batch gradients, real labels degrade the approximation of H_GN more than labels sampled from the model.
Measured (quick, 3 seeds, 133 s, one CPU thread): cos with H_GN optimal 0.894, Shampoo^2 0.893, Shampoo 0.733.

    python shampoo.py --preset smoke       # seconds (what pytest runs)
    python shampoo.py                      # quick on CPU: 32x32 layer, 3 seeds
    python shampoo.py --device cuda        # full: the 128x128 layer (H has 16384^2 entries)
No torchrun: the matrices are the point, not throughput (it says so in one line).

Glossary (ours -> paper):
    G, g = vec(G)   one layer's gradient (m x n) and its row-major vectorisation
    H_gn / H_ada    Gauss-Newton matrix (Fisher, labels from the model) / full-matrix Adagrad sum g g^T
    rearrange(H)    Van Loan's R(H), (m^2 x n^2); its top singular pair is the optimal A (x) B
    shampoo2        L (x) R / Tr H, one power step from (I, I);  shampoo: L^{1/2} (x) R^{1/2}
    cos             <H, H_hat>_F / (|H|_F |H_hat|_F), the paper's similarity metric
    exponent e      Shampoo step L^{-1/e} G R^{-1/e}: 4 original, 2 the paper's Shampoo^2 rule
Does not include: the paper's datasets and networks (MNIST-2, CIFAR-5M/ResNet-18, ImageNet/ConvNeXt-T:
we use teacher-labelled Gaussian data and an MLP), CNN layers, blocking, distributed Shampoo, SOAP.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import common  # first: it reports a missing package in one line

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, jacrev, vmap

NAME = "shampoo"
OPTIMIZERS = ("sgd", "adamw", "shampoo", "shampoo2")
APPROX = ("optimal", "shampoo2", "power2", "power5", "shampoo", "kfac", "diagonal", "identity")

# -----------------------------------------------------------------------------
# Config


@dataclass
class Config(common.BaseConfig):
    # Part A: the approximation study (float64)
    dim: int = 16                   # input dimension of the teacher-labelled Gaussian data
    classes: int = 8                # number of classes (2 mimics the paper's MNIST-2)
    teacher_hidden: int = 64        # teacher MLP width
    teacher_scale: float = 3.0      # teacher logits are multiplied by this before sampling labels
    hidden: int = 32                # student MLP width; the studied layer is hidden x hidden (<= 128)
    n_train: int = 4096             # training examples
    n_pool: int = 1024              # training inputs (a fixed subset) on which H_GN and the label study are
                                    # computed, as the paper does; the same number of held-out inputs gives
                                    # the extra held-out rows
    steps: int = 2000               # Adam steps on the student
    batch: int = 64                 # student batch size
    lr: float = 1e-3                # student Adam learning rate
    checkpoints: tuple[int, ...] = (0, 100, 500, 1000, 2000)  # steps at which the matrices are analysed
    power_iters: int = 100          # power-iteration steps for the optimal Kronecker approximation
    batch_sizes: tuple[int, ...] = (1, 16, 256)  # batch sizes B of the batch-gradient study (<= n_pool)
    n_batches: int = 100            # batches summed for each batch-gradient estimate
    chunk: int = 256                # examples per vmap chunk of per-example Jacobians
    # Part B: Shampoo vs SGD / AdamW on an ill-conditioned task (float32)
    b_dim: int = 32                 # input dimension
    b_classes: int = 10             # classes
    b_hidden: int = 128             # MLP width (two hidden layers)
    b_cond: float = 1e4             # condition number of the input covariance (>= 1)
    b_teacher_gain: float = 0.5     # teacher pre-activation gain (small: nearly linear labels; large: harder)
    b_train: int = 8192             # training examples
    b_val: int = 2048               # validation examples: each optimizer's lr is chosen on their loss
    b_test: int = 4096              # test examples (reported, never used to choose)
    b_steps: int = 1000             # optimizer steps per run
    b_batch: int = 128              # batch size
    optimizers: tuple[str, ...] = OPTIMIZERS  # optimizers to compare: sgd, adamw, shampoo, shampoo2
    sgd_lrs: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0)        # lr grid for SGD (momentum 0.9)
    adam_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2)    # lr grid for AdamW and both Shampoos
    weight_decay: float = 0.0       # decoupled weight decay, same for AdamW and Shampoo
    update_freq: int = 10           # Shampoo: recompute the inverse roots every this many steps
    shampoo_eps: float = 1e-6       # Shampoo: eps relative to the largest eigenvalue of L or R

    POSITIVE = ("dim", "teacher_hidden", "hidden", "n_train", "n_pool", "steps", "power_iters", "n_batches",
                "chunk", "b_dim", "b_hidden", "b_train", "b_val", "b_test", "b_steps", "update_freq")

    def __post_init__(self):
        if self.classes < 2 or self.b_classes < 2:
            raise ValueError("--classes and --b-classes need at least 2 classes")
        if self.hidden > 128:
            raise ValueError(f"--hidden {self.hidden}: the full H has hidden^4 entries; keep hidden <= 128")
        if max(self.checkpoints) > self.steps:
            raise ValueError(f"--checkpoints must lie in [0, steps={self.steps}]")
        if max(self.checkpoints) < 1:
            raise ValueError("--checkpoints needs a step after 0 (H_Ada sums the gradients of past steps)")
        if min(self.batch_sizes) < 1 or max(self.batch_sizes) > self.n_pool:
            raise ValueError(f"--batch-sizes must lie in [1, n_pool={self.n_pool}]")
        bad = [o for o in self.optimizers if o not in OPTIMIZERS]
        if bad:
            raise ValueError(f"--optimizers: unknown {bad}; choose from {', '.join(OPTIMIZERS)}")
        if self.b_cond < 1:
            raise ValueError("--b-cond must be >= 1")
        if self.compile:
            raise ValueError("--compile does not apply: the cost here is eigh and einsum on small matrices, "
                             "not a network torch.compile could fuse")
        self.checkpoints = tuple(sorted(set(self.checkpoints)))


PRESETS = {
    "smoke": dict(hidden=8, n_train=512, n_pool=64, steps=100, checkpoints=(0, 100), batch_sizes=(1, 16),
                  n_batches=20, power_iters=30, b_dim=16, b_hidden=32, b_train=1024, b_val=256, b_test=512,
                  b_steps=50, optimizers=("adamw", "shampoo2"), adam_lrs=(3e-3, 1e-2)),
    "quick": dict(seeds=3),
    "full": dict(dim=32, classes=10, teacher_hidden=128, hidden=128, n_train=32768, n_pool=2048, chunk=64,
                 steps=10000, batch=128, checkpoints=(0, 100, 500, 1000, 2000, 4000, 7000, 10000),
                 batch_sizes=(1, 16, 256), n_batches=500, b_dim=64, b_hidden=256, b_train=32768,
                 b_val=4096, b_test=8192, b_steps=2000, b_batch=256, seeds=3),
}


def matrix_device(device) -> torch.device:
    """Where the float64 matrix study runs: the device itself, or the CPU on Apple GPUs (MPS has no float64)."""
    device = torch.device(device)
    return torch.device("cpu") if device.type == "mps" else device

# -----------------------------------------------------------------------------
# Data


def make_teacher_data(n, dim, classes, teacher_hidden, scale, gen):
    """x ~ N(0, I_dim); y ~ softmax(scale * teacher(x)) with teacher = Linear-Tanh-Linear (random, fixed by gen).

    One example (dim=4, classes=3): x = [0.31, -1.20, 0.05, 0.88], teacher logits*3 = [2.1, -0.4, 0.7],
    y = 0 with probability 0.75 (labels are sampled, so the Bayes error is not zero).
    Returns x (n, dim), y (n,).
    """
    W1 = torch.randn(dim, teacher_hidden, generator=gen) / math.sqrt(dim)
    W2 = torch.randn(teacher_hidden, classes, generator=gen) / math.sqrt(teacher_hidden)
    x = torch.randn(n, dim, generator=gen)
    logits = scale * torch.tanh(x @ W1) @ W2                                  # (n, classes)
    y = torch.multinomial(F.softmax(logits, -1), 1, generator=gen).squeeze(1)  # (n,)
    return x, y


def make_illcond_data(n, dim, classes, cond, gain, gen):
    """Ill-conditioned inputs x = U diag(s) z, z ~ N(0, I), s log-spaced from 1 to 1/sqrt(cond)
    (so Cov(x) has condition number cond), U a random rotation; label = argmax of a random tanh-MLP
    teacher applied to the well-conditioned latent z, so every direction of x matters.

    One example (dim=3, cond=100): z = [0.5, -1.0, 0.2], s = [1, 0.32, 0.1], x = U [0.5, -0.32, 0.02], y = 7.
    Returns x (n, dim), y (n,).
    """
    U, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen))
    s = torch.logspace(0, -0.5 * math.log10(cond), dim)
    W1 = torch.randn(dim, 4 * dim, generator=gen) / math.sqrt(dim)
    W2 = torch.randn(4 * dim, classes, generator=gen) / math.sqrt(4 * dim)
    z = torch.randn(n, dim, generator=gen)
    x = (z * s) @ U.T                                                          # (n, dim)
    y = (torch.tanh(gain * z @ W1) @ W2).argmax(-1)                              # (n,)
    return x, y

# -----------------------------------------------------------------------------
# Kronecker utilities (copyable): rearrangement, power iteration, cosines, matrix powers


class MLP(nn.Sequential):
    """Linear-ReLU-...-Linear. sizes=(16, 32, 32, 8): layers 0, 2, 4 are Linear; '2.weight' is 32x32."""

    def __init__(self, sizes):
        layers = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
        super().__init__(*layers)


def rearrange(H, m, n):
    """Van Loan's R(H): (mn, mn) -> (m^2, n^2) with R(H)[(i,k),(j,l)] = H[(i,j),(k,l)], so that
    |H - A (x) B|_F = |R(H) - vec(A) vec(B)^T|_F for row-major vec."""
    return H.reshape(m, n, m, n).permute(0, 2, 1, 3).reshape(m * m, n * n)


def kron_cos(RH, normH, A, B):
    """cos(H, A (x) B) without forming the Kronecker product: <H, A(x)B> = vec(A)^T R(H) vec(B),
    |A (x) B| = |A| |B|."""
    return float(A.reshape(-1) @ RH @ B.reshape(-1) / (normH * A.norm() * B.norm()))


def kron_relerr(RH, normH, A, B, c):
    """|H - c A(x)B|_F / |H|_F, again without forming A (x) B."""
    inner = A.reshape(-1) @ RH @ B.reshape(-1)
    sq = normH ** 2 - 2 * c * inner + (c * A.norm() * B.norm()) ** 2
    return float(sq.clamp(min=0).sqrt() / normH)


def power_iteration(RH, m, n, iters, keep=()):
    """Top singular pair of R(H) by power iteration from (vec(I_m), vec(I_n)):
    (u, v) <- (R(H) v, R(H)^T u), normalised. Step 1 gives exactly (vec(L), vec(R)) -- Shampoo^2.
    Returns (A, B) after `iters` steps and {k: (A_k, B_k)} for k in keep."""
    u = torch.eye(m, dtype=RH.dtype, device=RH.device).reshape(-1)
    v = torch.eye(n, dtype=RH.dtype, device=RH.device).reshape(-1)
    kept = {}
    for k in range(1, iters + 1):
        u, v = RH @ v, RH.T @ u          # vec(A) <- R(H) vec(B), vec(B) <- R(H)^T vec(A)
        u, v = u / u.norm(), v / v.norm()
        if k in keep:
            kept[k] = (u.reshape(m, m), v.reshape(n, n))
    return u.reshape(m, m), v.reshape(n, n), kept


def psd_pow(M, p):
    """M^p for symmetric PSD M via eigh (negative round-off eigenvalues clamped to 0)."""
    w, Q = torch.linalg.eigh(M)
    return (Q * w.clamp(min=0) ** p) @ Q.T


def cos_sim(H, Hhat):
    """The paper's metric: Frobenius cosine similarity (scale-invariant)."""
    return float((H * Hhat).sum() / (H.norm() * Hhat.norm()))

# -----------------------------------------------------------------------------
# Per-example gradients and the matrices of the paper


def class_grads(model, name, x, chunk=256):
    """Gradients of CE(model(x_i), c) w.r.t. parameter `name` for every example i and class c.
    Returns G (N, C, m, n) and p (N, C) = softmax(model(x)).
    dCE_c/dW = sum_k (p_k - [k=c]) dz_k/dW, with dz/dW from vmap(jacrev) (exact, no label sampling)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    W = params.pop(name)

    def logits_one(w, xi):
        return functional_call(model, {**params, name: w}, (xi[None],))[0]   # (C,)

    jac = vmap(jacrev(logits_one), in_dims=(None, 0))
    Gs, ps = [], []
    for i in range(0, len(x), chunk):
        xb = x[i:i + chunk]
        J = jac(W, xb)                                                     # (b, C, m, n) dz_k/dW
        with torch.no_grad():
            p = F.softmax(model(xb), -1)                                   # (b, C)
        Gs.append(torch.einsum("bk,bkij->bij", p, J)[:, None] - J)         # (b, C, m, n)
        ps.append(p)
    return torch.cat(Gs), torch.cat(ps)


def layer_input(model, name, x):
    """Input activations a (N, n) of the Linear layer that owns parameter `name` (for K-FAC)."""
    mod = model.get_submodule(name.rsplit(".", 1)[0])
    got = []
    h = mod.register_forward_hook(lambda m, inp, out: got.append(inp[0].detach()))
    with torch.no_grad():
        model(x)
    h.remove()
    return got[0]


def gn_matrices(G, p, a):
    """Exact H_GN = sum_{i,c} (p_ic / N) g_ic g_ic^T, its Shampoo factors L, R and K-FAC factors.
    G (N, C, m, n), p (N, C), a (N, n) -> dict of H (mn, mn), L (m, m), R (n, n), kfac_A, kfac_B."""
    N, C, m, n = G.shape
    w = (p / N).reshape(-1)                                                # (N*C,)
    Gf = G.reshape(N * C, m, n)
    g = Gf.reshape(N * C, m * n) * w.sqrt()[:, None]
    H = g.T @ g                                                            # H_GN = E_x E_{c~p}[g g^T]
    L = torch.einsum("r,rij,rkj->ik", w, Gf, Gf)                           # E[G G^T]
    R = torch.einsum("r,rji,rjk->ik", w, Gf, Gf)                           # E[G^T G]
    # K-FAC: G = delta a^T for a linear layer, so delta = G a / |a|^2
    ar = a.repeat_interleave(C, 0)                                         # (N*C, n)
    delta = torch.einsum("rij,rj->ri", Gf, ar) / (ar * ar).sum(1, keepdim=True).clamp(min=1e-30)
    kA = torch.einsum("r,ri,rk->ik", w, delta, delta)                      # E[delta delta^T]
    kB = a.T @ a / N                                                       # E[a a^T]
    return dict(H=H, L=L, R=R, kfac_A=kA, kfac_B=kB)


def ada_matrices(grads):
    """Full-matrix Adagrad H_ada = sum_s g_s g_s^T and Shampoo's L = sum G G^T, R = sum G^T G.
    grads: (T, m, n) batch gradients of the steps so far."""
    T, m, n = grads.shape
    g = grads.reshape(T, m * n)
    return dict(H=g.T @ g, L=torch.einsum("sij,skj->ik", grads, grads),
                R=torch.einsum("sji,sjk->ik", grads, grads))


def approx_report(mats, power_iters, kfac=False):
    """cos(H, .) for every approximation of the paper, plus the identity check
    |R(H) vec(I) - vec(L)| (one power-iteration step == Shampoo's statistics)."""
    H, L, R = mats["H"], mats["L"], mats["R"]
    m, n = L.shape[0], R.shape[0]
    RH, nH = rearrange(H, m, n), H.norm()
    A, B, kept = power_iteration(RH, m, n, power_iters, keep=(2, 5))
    trH = torch.trace(H)
    out = {"optimal": kron_cos(RH, nH, A, B),
           "shampoo2": kron_cos(RH, nH, L, R),                             # H ~ L (x) R / Tr H
           "shampoo": kron_cos(RH, nH, psd_pow(L, 0.5), psd_pow(R, 0.5)),  # H ~ (L (x) R)^{1/2}
           "diagonal": float(torch.diagonal(H).norm() / nH),
           "identity": float(trH / (nH * math.sqrt(m * n)))}
    for k, (Ak, Bk) in kept.items():
        out[f"power{k}"] = kron_cos(RH, nH, Ak, Bk)
    if kfac:
        out["kfac"] = kron_cos(RH, nH, mats["kfac_A"], mats["kfac_B"])
    out["relerr_shampoo2"] = kron_relerr(RH, nH, L, R, 1 / trH)            # at Shampoo^2's own scale 1/Tr H
    eye_m = torch.eye(m, dtype=H.dtype, device=H.device).reshape(-1)
    eye_n = torch.eye(n, dtype=H.dtype, device=H.device).reshape(-1)
    gap_l = (RH @ eye_n - L.reshape(-1)).norm() / L.norm()                # R(H) vec(I_n) = vec(L)
    gap_r = (RH.T @ eye_m - R.reshape(-1)).norm() / R.norm()              # R(H)^T vec(I_m) = vec(R)
    out["power_iter_gap"] = float(max(gap_l, gap_r))
    return out


def batch_label_study(G, p, y, H, batch_sizes, n_batches, gen):
    """Paper Sec. 4: Shampoo^2 factors from mini-batch gradients G_B = mean_{i in B} G_{i, y_i}, with labels
    y_i drawn afresh from the model for each batch (E[G_B G_B^T] = E[G G^T] / B: unbiased up to scale) or
    the real labels (the empirical Fisher: adds (1 - 1/B) E[G] E[G]^T). G (N, C, m, n), p (N, C), y (N,).
    Returns {f"{labels}_B{b}": cos(H_GN, L_B (x) R_B)} with L_B = sum G_B G_B^T over n_batches batches."""
    N, C, m, n = G.shape
    RH, nH = rearrange(H, m, n), H.norm()
    out = {}
    for b in batch_sizes:
        idx = torch.rand(n_batches, N, generator=gen).argsort(1)[:, :b]   # (n_batches, b), no repeats
        labels = {"sampled": torch.multinomial(p.float().cpu()[idx.reshape(-1)], 1, generator=gen).reshape(idx.shape),
                  "real": y.cpu()[idx]}
        idx = idx.to(G.device)
        chunk = max(1, 2 ** 24 // (b * m * n))                            # batches gathered at once
        for lab, yb in labels.items():
            yb = yb.to(G.device)
            LB, RB = G.new_zeros(m, m), G.new_zeros(n, n)
            for s in range(0, n_batches, chunk):
                GB = G[idx[s:s + chunk], yb[s:s + chunk]].mean(1)          # (chunk, m, n) G_B
                LB += torch.einsum("sij,skj->ik", GB, GB)
                RB += torch.einsum("sji,sjk->ik", GB, GB)
            out[f"{lab}_B{b}"] = kron_cos(RH, nH, LB, RB)
    return out

# -----------------------------------------------------------------------------
# A readable Shampoo optimizer


def inv_root(M, e, eps):
    """(M + eps * lambda_max * I)^{-1/e} via eigh in float64 (negative round-off clamped to 0)."""
    w, Q = torch.linalg.eigh(M.double())
    w = w.clamp(min=0)
    w = w + eps * w.max().clamp(min=1e-30)
    return ((Q * w ** (-1.0 / e)) @ Q.T).to(M.dtype)


class Shampoo(torch.optim.Optimizer):
    """Shampoo for 2-D parameters, Adam for the rest.

    G: gradient, M: its Adam first moment. L = b2 L + (1-b2) G G^T, R = b2 R + (1-b2) G^T G (bias-corrected).
    Every `update_freq` steps from `start_step`: Li = L^{-1/e}, Ri = R^{-1/e} (eps relative to lambda_max).
    Direction D = Li M_hat Ri (before start_step: Li = Ri = I); with graft='adam', D is rescaled to the
    Frobenius norm of Adam's direction for that parameter (Adam sets the step size, Shampoo the direction).
    exponent=4 is Gupta et al.'s L^{-1/4} G R^{-1/4}; exponent=2 is the paper's L^{-1/2} G R^{-1/2}.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, adam_eps=1e-8, update_freq=10,
                 start_step=None, exponent=4, graft="adam", weight_decay=0.0):
        if graft not in ("adam", "none"):
            raise ValueError(f"graft must be 'adam' or 'none', not {graft!r}")
        start_step = update_freq if start_step is None else start_step
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, adam_eps=adam_eps, update_freq=update_freq,
                                      start_step=start_step, exponent=exponent, graft=graft,
                                      weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gr in self.param_groups:
            b1, b2 = gr["betas"]
            for p in gr["params"]:
                if p.grad is None:
                    continue
                g, st = p.grad, self.state[p]
                if not st:
                    st["step"] = 0
                    st["m"], st["v"] = torch.zeros_like(p), torch.zeros_like(p)
                    if p.dim() == 2:
                        m, n = p.shape
                        st["L"], st["R"] = p.new_zeros(m, m), p.new_zeros(n, n)
                        st["Li"], st["Ri"] = torch.eye(m, dtype=p.dtype, device=p.device), \
                            torch.eye(n, dtype=p.dtype, device=p.device)
                st["step"] += 1
                t = st["step"]
                st["m"].lerp_(g, 1 - b1)                                   # m = b1 m + (1-b1) g
                st["v"].mul_(b2).addcmul_(g, g, value=1 - b2)              # v = b2 v + (1-b2) g^2
                m_hat = st["m"] / (1 - b1 ** t)
                adam_dir = m_hat / ((st["v"] / (1 - b2 ** t)).sqrt() + gr["adam_eps"])
                if p.dim() != 2:
                    d = adam_dir
                else:
                    st["L"].mul_(b2).add_(g @ g.T, alpha=1 - b2)           # L = b2 L + (1-b2) G G^T
                    st["R"].mul_(b2).add_(g.T @ g, alpha=1 - b2)           # R = b2 R + (1-b2) G^T G
                    if t >= gr["start_step"] and (t - gr["start_step"]) % gr["update_freq"] == 0:
                        bc = 1 - b2 ** t
                        st["Li"] = inv_root(st["L"] / bc, gr["exponent"], gr["eps"])
                        st["Ri"] = inv_root(st["R"] / bc, gr["exponent"], gr["eps"])
                    d = st["Li"] @ m_hat @ st["Ri"]                        # L^{-1/e} M R^{-1/e}
                    if gr["graft"] == "adam":
                        d = d * (adam_dir.norm() / d.norm().clamp(min=1e-30))
                if gr["weight_decay"]:
                    p.mul_(1 - gr["lr"] * gr["weight_decay"])
                p.add_(d, alpha=-gr["lr"])
        return loss


def make_optimizer(name, params, lr, cfg):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=0.0)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    return Shampoo(params, lr=lr, eps=cfg.shampoo_eps, update_freq=cfg.update_freq,
                   exponent=4 if name == "shampoo" else 2, weight_decay=cfg.weight_decay)

# -----------------------------------------------------------------------------
# Training loops


def train_student(model, cfg, xtr, ytr, gen, at_checkpoint):
    """Part A: Adam on the student. At each checkpoint step, at_checkpoint(model, step, grads) analyses it;
    grads (step, m, n) are the batch gradients of the studied layer so far (H_Ada sums their outer products)."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    layer = model.get_parameter("2.weight")                               # the hidden x hidden layer
    grads = torch.zeros(cfg.steps, *layer.shape, dtype=torch.float64, device=layer.device)
    losses, t0 = [], time.time()
    bar = common.progress(range(cfg.steps + 1), "part A: student + analyses")
    for step in bar:
        if step in cfg.checkpoints:
            at_checkpoint(model, step, grads[:step])
        if step == cfg.steps:
            break
        idx = torch.randint(0, len(xtr), (cfg.batch,), generator=gen).to(xtr.device)
        loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads[step] = layer.grad.double()
        opt.step()
        if step % 50 == 0:
            losses.append(loss.item())
            bar.set_postfix_str(common.step_log(step + 1, cfg.steps, t0, loss=losses[-1]))
    return losses


def train_classifier(opt_name, lr, data, cfg, device):
    """Part B: one optimizer at one lr from the seed's shared init and batch order; returns its losses."""
    xtr, ytr, xval, yval, xte, yte = data
    torch.manual_seed(cfg.seed)                                            # same init for every optimizer
    gen = torch.Generator().manual_seed(cfg.seed + 1)                      # same batch order for every optimizer
    model = MLP((cfg.b_dim, cfg.b_hidden, cfg.b_hidden, cfg.b_classes)).to(device)
    opt = make_optimizer(opt_name, model.parameters(), lr, cfg)
    curve, t0 = [], time.time()
    for step in range(cfg.b_steps):
        idx = torch.randint(0, len(xtr), (cfg.b_batch,), generator=gen).to(device)
        loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == cfg.b_steps - 1:
            curve.append((step, loss.item()))
    if device.type == "cuda":
        torch.cuda.synchronize()
    ms = 1000 * (time.time() - t0) / cfg.b_steps
    with torch.no_grad():
        losses = [F.cross_entropy(model(x), y).item() for x, y in ((xtr, ytr), (xval, yval))]
        test_acc = (model(xte).argmax(-1) == yte).float().mean().item()
    finite = lambda v: v if math.isfinite(v) else float("inf")
    return dict(train_loss=finite(losses[0]), val_loss=finite(losses[1]), test_acc=test_acc, ms=ms, curve=curve)

# -----------------------------------------------------------------------------
# Experiments


def study_split(x, y, cfg):
    """(x_train, y_train, pools): the first n_train examples train the student; the matrices are computed
    on n_pool of those training inputs (the paper's setting) and on the n_pool held-out ones (an extra row)."""
    n, k = cfg.n_train, cfg.n_pool
    return x[:n], y[:n], {"train": (x[:k], y[:k]), "heldout": (x[n:n + k], y[n:n + k])}


def exp_approximation(cfg) -> dict:
    """Fig. 1 and Sec. 4: cos(H, approximation) over training, and the batch / label study, on training
    inputs (the paper's setting) with the held-out inputs as an extra row."""
    device, mdev = torch.device(cfg.device), matrix_device(cfg.device)
    gen = torch.Generator().manual_seed(cfg.seed)
    x, y = make_teacher_data(cfg.n_train + cfg.n_pool, cfg.dim, cfg.classes, cfg.teacher_hidden,
                             cfg.teacher_scale, gen)
    xtr, ytr, pools = study_split(x, y, cfg)
    xtr, ytr = xtr.to(device), ytr.to(device)
    torch.manual_seed(cfg.seed)
    model = MLP((cfg.dim, cfg.hidden, cfg.hidden, cfg.classes)).to(device)
    m, gaps = {}, []

    def at_checkpoint(model, step, grads):
        m64 = copy.deepcopy(model).to(mdev).double()
        for inputs, (xp, yp) in pools.items():
            xp = xp.to(mdev).double()
            G, p = class_grads(m64, "2.weight", xp, cfg.chunk)             # (N, C, m, n), (N, C)
            gn = gn_matrices(G, p, layer_input(m64, "2.weight", xp))
            lab = batch_label_study(G, p, yp, gn["H"], cfg.batch_sizes, cfg.n_batches,
                                    torch.Generator().manual_seed(cfg.seed + step))
            for k, v in lab.items():
                m[common.mkey("labels", inputs, k, f"step{step}")] = v
            if inputs == "train":
                reps = {"gn": approx_report(gn, cfg.power_iters, kfac=True)}
                if step:
                    reps["ada"] = approx_report(ada_matrices(grads.to(mdev)), cfg.power_iters)
                for mat, rep in reps.items():
                    gaps.append(rep.pop("power_iter_gap"))
                    m[common.mkey("relerr", mat, "shampoo2", f"step{step}")] = rep.pop("relerr_shampoo2")
                    m.update({common.mkey("cos", mat, k, f"step{step}"): v for k, v in rep.items()})
            del G, gn

    train_student(model, cfg, xtr, ytr, gen, at_checkpoint)
    for inputs in pools:  # the pre-registered summary of the label study: the mean over checkpoints
        for lab in ("real", "sampled"):
            for b in cfg.batch_sizes:
                vals = [m[common.mkey("labels", inputs, f"{lab}_B{b}", f"step{s}")] for s in cfg.checkpoints]
                m[common.mkey("labels", inputs, f"{lab}_B{b}", "mean")] = sum(vals) / len(vals)
    m["check/power_iter_gap"] = max(gaps)                                  # |R(H) vec(I) - vec(L)| / |L|
    return m


def choose_lr(by_lr: dict) -> float:
    """The lr whose run has the lowest validation loss (never the test numbers)."""
    return min(by_lr, key=lambda lr: by_lr[lr]["val_loss"])


def exp_optimizers(cfg):
    """Shampoo (e = 4 and 2, Adam-grafted) vs SGD and AdamW; each lr chosen on the validation loss."""
    device = torch.device(cfg.device)
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    n = (cfg.b_train, cfg.b_val, cfg.b_test)
    x, y = make_illcond_data(sum(n), cfg.b_dim, cfg.b_classes, cfg.b_cond, cfg.b_teacher_gain, gen)
    x, y = x.to(device), y.to(device)
    cut = [0, n[0], n[0] + n[1], sum(n)]
    data = sum(((x[a:b], y[a:b]) for a, b in zip(cut, cut[1:])), ())
    grid = [(o, lr) for o in cfg.optimizers for lr in (cfg.sgd_lrs if o == "sgd" else cfg.adam_lrs)]
    runs = {}
    for o, lr in common.progress(grid, "part B: optimizers x lrs"):
        runs[(o, lr)] = train_classifier(o, lr, data, cfg, device)
    m, extra = {}, {"best_lr": {}, "ms_per_step": {}, "curve": {}}
    for o in cfg.optimizers:
        lr = choose_lr({l: runs[(oo, l)] for oo, l in grid if oo == o})
        r = runs[(o, lr)]
        for k in ("train_loss", "val_loss", "test_acc"):
            m[common.mkey(k, o)] = r[k]
        extra["best_lr"][o], extra["ms_per_step"][o], extra["curve"][o] = lr, r["ms"], r["curve"]
    return m, extra


def run_seed(cfg):
    common.set_seed(cfg.seed)
    m = exp_approximation(cfg)
    m_opt, extra = exp_optimizers(cfg)
    return {**m, **m_opt}, extra

# -----------------------------------------------------------------------------
# run


PAPER_FIG1 = {"optimal": "upper bound", "shampoo2": "~ optimal (Fig. 1)", "shampoo": "clearly lower (Fig. 1)",
              "kfac": "-", "power2": "-", "power5": "-", "diagonal": "-", "identity": "-"}


def run(cfg) -> common.SeedRuns:
    t0 = time.time()
    runs = common.over_seeds(cfg, run_seed, NAME)
    ck, last, cell = cfg.checkpoints, cfg.checkpoints[-1], runs.cell
    note = f"seed {cfg.seed}" if cfg.seeds == 1 else f"mean ± std over {cfg.seeds} seeds"
    rows = [[k, PAPER_FIG1[k], cell(f"cos/gn/{k}/step{last}"), cell(f"cos/ada/{k}/step{last}")] for k in APPROX]
    rows.append(["relerr shampoo2 at 1/Tr H", "-", cell(f"relerr/gn/shampoo2/step{last}"),
                 cell(f"relerr/ada/shampoo2/step{last}")])
    common.print_table(rows, ["approximation", "paper", "cos with H_GN", "cos with H_Ada"],
                       title=f"cos(H, approximation) at step {last}, {cfg.hidden}x{cfg.hidden} layer ({note})")
    rows = [[s] + [cell(f"cos/{mat}/{k}/step{s}") for mat in ("gn", "ada") for k in ("optimal", "shampoo2", "shampoo")]
            for s in ck]
    common.print_table(rows, ["step", "GN optimal", "GN shampoo2", "GN shampoo", "Ada optimal", "Ada shampoo2",
                              "Ada shampoo"], title="over training")
    labs = [f"{lab}_B{b}" for lab in ("sampled", "real") for b in cfg.batch_sizes]
    rows = [[inputs, s] + [cell(f"labels/{inputs}/{k}/" + (f"step{s}" if s != "mean" else s)) for k in labs]
            for inputs in ("train", "heldout") for s in list(ck) + ["mean"]]
    common.print_table(rows, ["inputs", "step"] + labs,
                       title="cos(H_GN, L_B (x) R_B) from mini-batch gradients: labels sampled from the model vs "
                             "real labels.\npaper (Fig. 3): real labels much worse with mini-batches on ImageNet "
                             "and MNIST-2, less so on CIFAR-5M")
    extras = runs.extras
    rows = [[o, ",".join(f"{e['best_lr'][o]:g}" for e in extras), cell(f"val_loss/{o}"), cell(f"train_loss/{o}"),
             cell(f"test_acc/{o}"), f"{sum(e['ms_per_step'][o] for e in extras) / len(extras):.1f}"]
            for o in cfg.optimizers]
    common.print_table(rows, ["optimizer", "lr per seed (on val)", "val loss", "train loss", "test acc", "ms/step"],
                       title=f"optimizers on the ill-conditioned task ({cfg.b_steps} steps; {note}; the paper "
                             f"has no optimizer benchmark)")
    mean = runs.mean
    gaps = {mat: (mean[f"cos/{mat}/optimal/step{last}"] - mean[f"cos/{mat}/shampoo2/step{last}"],
                  mean[f"cos/{mat}/shampoo2/step{last}"] - mean[f"cos/{mat}/shampoo/step{last}"]) for mat in ("gn", "ada")}
    ok = all(a < b for a, b in gaps.values())
    common.print0("finding: " + "; ".join(f"{mat}: optimal - shampoo2 = {a:.3f}, shampoo2 - shampoo = {b:.3f}"
                                          for mat, (a, b) in gaps.items())
                  + (" -> Shampoo^2 ~ optimal, Shampoo clearly lower" if ok else " -> NOT reproduced"))
    info = {"best_lr": [e["best_lr"] for e in extras], "matrix_device": str(matrix_device(cfg.device))}
    timings = {f"ms_per_step/{o}": sum(e["ms_per_step"][o] for e in extras) / len(extras) for o in cfg.optimizers}
    common.save_results(NAME, cfg, runs, info=info, timings=timings, wall_time_s=time.time() - t0)
    curves = {}
    for mat, lab in (("gn", "H_GN"), ("ada", "H_Ada")):
        for k in ("optimal", "shampoo2", "shampoo"):
            keys = [(s, f"cos/{mat}/{k}/step{s}") for s in ck if f"cos/{mat}/{k}/step{s}" in mean]
            curves[f"{lab} {k}"] = ([s for s, _ in keys], [mean[key] for _, key in keys],
                                    [runs.std[key] for _, key in keys] if runs.std else None)
    common.plot(NAME, curves, cfg.out, xlabel="training step", ylabel="cos(H, approximation)",
                title=f"Shampoo^2 = one power-iteration step ~ optimal ({note})")
    common.plot(f"{NAME}_optimizers", {f"{o} lr {extras[0]['best_lr'][o]:g}": tuple(zip(*extras[0]["curve"][o]))
                                       for o in cfg.optimizers},
                cfg.out, xlabel="step", ylabel="train loss (batch)", logy=True,
                title=f"ill-conditioned task, seed {cfg.seed}, lr chosen on validation")
    return runs


def main():
    cfg = common.parse_args(Config, PRESETS)
    with common.session(cfg, data_parallel=False):
        run(cfg)


if __name__ == "__main__":
    main()
