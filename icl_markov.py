"""
The Evolution of Statistical Induction Heads: In-Context Learning Markov Chains
Ezra Edelman*, Nikolaos Tsilivis*, Benjamin L. Edelman, Eran Malach, Surbhi Goel. NeurIPS 2024.
arXiv:2402.11004. Official code: github.com/EzraEdelman/Evolution-of-Statistical-Induction-Heads

Finding: a two-layer attention-only transformer trained on Markov chains whose transition matrix is
drawn afresh for every sequence (ICL-MC) learns in phases: it first predicts uniformly, then sits on a
plateau where it copies the in-context *unigram* statistics, then drops abruptly to the Bayes-optimal
in-context *bigram* predictor. The drop coincides with layer 1 becoming a previous-token head (the
"statistical induction head"). Making unigrams useless (doubly-stochastic chains) removes the plateau
and speeds the bigram phase up; extra unigram (i.i.d.) data delays it.
The quick preset (k=2, T=100; ~5 min on one CPU core) prints one line per evaluation (KL(true||model),
KL(strategy||model) for uniform / unigram / bigram, previous-token attention), the phase summary line,
and a table beside the paper's claims. Measured (seed 0, lr 1e-3): uniform@0 -> unigram@100 ->
bigram@600, final KL(true||model) 0.021 (Bayes bigram 0.009, unigram 0.087), previous-token attention
0.05 -> 0.74; with k=3, doubly-stochastic training reaches the bigram phase at step 400 versus 900 for
standard training, and a 75%-unigram mixture stays on the unigram plateau for all 1500 steps.

Run:
    python icl_markov.py --preset smoke        # seconds, what pytest runs
    python icl_markov.py                       # quick on CPU (full on CUDA)
    python icl_markov.py --device cuda         # full: official config, 5 seeds, priors, trigrams, minimal model
    python icl_markov.py --seeds 3             # any preset over several seeds (reports seeds_transitioned)

Glossary (ours -> paper):
    k            number of states k;  T: sequence length (block_size 100)
    n            order of the chain: n=2 is ICL-MC (bigram), n=3 the trigram generalisation
    P            transition matrix (k^(n-1) rows, one per context of the last n-1 tokens), rows ~ Dir(1)
    strategy m   add-one in-context m-gram: m=0 uniform, 1 unigram, 2 bigram (= Bayes under Dir(1)), 3 trigram
    kl_true_*    KL(P_true(.|x_T) || .) at the last position, the paper's "test loss" (KL-div loss)
    kl_<m>_model KL(strategy_m || model), the paper's "distance to candidate strategies" (Fig. 1 right)
    rel          Shaw-style relative position vectors r_{i-j} (the official `wpe` inside each layer)
    MinimalModel the theory section's model: layer-1 attention softmax(v_{i-j}), layer-2 linear attention W

Deviations: quick uses lr 1e-3 (official 5e-4 did not transition within 2000 steps for seed 0 in the
spec's prototype); the data-distribution experiment uses k=3 as the official mixture plot does (k=2
doubly-stochastic matrices have one free parameter); the minimal model's layer 1 is causal (the
official `min_model.py` discards its `masked_fill`, so its layer 1 sees the future).
Does not include: the paper's theory (gradient-flow analysis), 4-gram / tetragram runs, MLP variants,
the sweep over mixture fractions, the official 200-snapshot pipeline (we evaluate during training).
The full preset is unmeasured. A CPU check of the trigram run (k=2, d=32, lr 1e-3, seed 0) went
uniform@0 -> unigram@250 -> bigram@750 and was still on the bigram stage at step 4000 (KL(true||model)
0.098 = KL(true||bigram), trigram reference 0.019), so full runs it for 10000 steps; the final trigram
stage is not verified here.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

PRIORS = ("dirichlet", "doubly", "unigram", "mix")
STRATEGY_NAMES = ("uniform", "unigram", "bigram", "trigram", "4-gram", "5-gram")

# -----------------------------------------------------------------------------
# Config


@dataclass
class Config(common.BaseConfig):
    # task
    k: int = 2                      # number of states (vocabulary size); no special tokens
    T: int = 100                    # input length (block_size); each chain has T+1 tokens
    prior: str = "dirichlet"        # training prior of the main run: dirichlet | doubly | unigram | mix
    mix_p: float = 0.75             # "mix" prior: probability a chain is unigram (else doubly-stochastic)
    # model (official Relative_Transformer, attention only)
    n_layer: int = 2                # attention layers
    d_model: int = 16               # width per (n-1): 16 for bigrams, 32 for the trigram run
    dropout: float = 0.1            # embedding, relative-position, attention and residual dropout
    # optimisation (official: AdamW, constant lr, no clipping)
    lr: float = 1e-3                # AdamW learning rate (official 5e-4; see notes in the spec)
    weight_decay: float = 0.1       # on Linear weights only (not LayerNorm, not embeddings)
    betas: tuple[float, ...] = (0.9, 0.95)  # AdamW betas
    batch: int = 64                 # chains per step
    iters: int = 1500               # training steps of the main run
    eval_every: int = 100           # evaluate every this many steps (and at step 0)
    n_test: int = 2048              # fixed test chains (standard ICL-MC) scored at the last position
    # experiment 2: training prior, tested on standard ICL-MC (the official mixture plot uses k=3)
    compare_priors: tuple[str, ...] = ("dirichlet", "doubly", "mix")  # training priors to compare
    compare_k: int = 3              # states in experiment 2 (k=2 doubly-stochastic chains are degenerate:
                                    # one free parameter, P = [[u, 1-u], [1-u, u]])
    compare_iters: int = 1500       # step budget of each run of experiment 2
    compare_stop: bool = True       # stop a run at its transition (saves time; its curve ends there)
    # experiment 3: trigrams (n=3, n-1=2 heads in layer 1)
    trigram_iters: int = 0          # 0 = skip
    trigram_lr: float = 1e-3        # AdamW lr of the trigram run
    # extra: the minimal model (theory section), SGD
    minimal_iters: int = 0          # 0 = skip
    minimal_lr_w: float = 1e-2      # SGD lr of W (official notebook 1e-2)
    minimal_lr_v: float = 1.0       # SGD lr of v (hard-coded 1 in the official code)
    minimal_batch: int = 128        # chains per SGD step

    def __post_init__(self):
        if self.k < 2 or self.compare_k < 2:
            raise ValueError(f"k={self.k}, compare_k={self.compare_k}: need at least 2 states")
        if self.T < 4:
            raise ValueError(f"T={self.T}: sequences need at least 4 tokens")
        for p in (self.prior, *self.compare_priors):
            if p not in PRIORS:
                raise ValueError(f"unknown prior '{p}' (choose from {', '.join(PRIORS)})")
        if not 0.0 <= self.mix_p <= 1.0:
            raise ValueError(f"mix_p={self.mix_p} must be in [0, 1]")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        for name in ("n_layer", "d_model", "batch", "iters", "eval_every", "n_test", "minimal_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.d_model % 2:
            raise ValueError(f"d_model={self.d_model} must be even (the trigram run splits it over 2 heads)")
        if len(self.betas) != 2:
            raise ValueError("betas needs two values, e.g. --betas 0.9,0.95")


PRESETS = {
    "smoke": dict(T=32, batch=16, iters=60, eval_every=30, n_test=256, compare_priors=("dirichlet", "doubly"),
                  compare_k=2, compare_iters=30, trigram_iters=20, minimal_iters=20, minimal_batch=16),
    "quick": dict(lr=1e-3, iters=1500, eval_every=100, n_test=2048, compare_priors=("dirichlet", "doubly", "mix"),
                  compare_iters=1500),
    # official config (lr 5e-4, batch 64, dropout 0.1) run longer, 5 seeds, all experiments; unmeasured
    "full": dict(lr=5e-4, iters=4000, eval_every=50, n_test=4096, seeds=5, compare_priors=("dirichlet", "doubly", "mix"),
                 compare_iters=4000, compare_stop=False, trigram_iters=10000, minimal_iters=2000),
}

# -----------------------------------------------------------------------------
# Data: ICL-MC and its n-gram generalisation


def dirichlet1(shape, gen) -> torch.Tensor:
    """Rows uniform on the simplex: Dir(1,...,1) = normalised Exp(1) draws."""
    e = -torch.log(torch.rand(shape, generator=gen).clamp_min(1e-12))
    return e / e.sum(-1, keepdim=True)


def doubly_stochastic(B, k, gen) -> torch.Tensor:
    """(B, k, k) matrices whose rows and columns sum to 1.

    k <= 4: exactly uniform on the Birkhoff polytope (official method): fill the top-left (k-1)x(k-1)
    block with U[0,1], complete the last row/column, reject if any entry of the completion is < 0.
    k >= 5: Sinkhorn-normalised Dir(1) rows (not uniform; the official code does this for k >= 6).
    """
    if k > 4:
        P = dirichlet1((B, k, k), gen)
        for _ in range(200):
            P = P / P.sum(-2, keepdim=True)
            P = P / P.sum(-1, keepdim=True)
        return P
    out = []
    while sum(len(o) for o in out) < B:
        A = torch.rand((4 * B + 16, k - 1, k - 1), generator=gen)
        M = torch.zeros(len(A), k, k)
        M[:, :-1, :-1] = A
        M[:, :-1, -1] = 1 - A.sum(-1)                 # last column completes the rows
        M[:, -1, :] = 1 - M[:, :-1, :].sum(-2)        # last row completes the columns
        out.append(M[(M >= 0).flatten(1).all(-1)])
    return torch.cat(out)[:B]


def sample_transition_matrices(B, k, n=2, prior="dirichlet", gen=None, mix_p=0.5) -> torch.Tensor:
    """(B, k^(n-1), k) row-stochastic P, one per chain. Row c is the next-token law after context c."""
    if prior == "dirichlet":
        return dirichlet1((B, k ** (n - 1), k), gen)
    if n != 2:
        raise ValueError(f"prior '{prior}' is defined for bigram chains (n=2) only")
    if prior == "doubly":
        return doubly_stochastic(B, k, gen)
    uni = dirichlet1((B, 1, k), gen).expand(B, k, k).contiguous()   # every row the same p: i.i.d. tokens
    if prior == "unigram":
        return uni
    if prior == "mix":
        is_uni = torch.rand(B, generator=gen) < mix_p
        return torch.where(is_uni[:, None, None], uni, doubly_stochastic(B, k, gen))
    raise ValueError(f"unknown prior '{prior}'")


def lifted_chain(P: torch.Tensor) -> torch.Tensor:
    """(B, S, k) n-gram table -> (B, S, S) chain on contexts, S = k^(n-1).

    A context is the last n-1 tokens, index sum_j w_j k^j with w_0 the oldest (little-endian, as the
    official `multi_symbol_convert`). After token j the context s becomes s // k + j * k^(n-2).
    """
    B, S, k = P.shape
    s = torch.arange(S)
    nxt = s[:, None] // k + torch.arange(k)[None, :] * (S // k)   # (S, k)
    L = torch.zeros(B, S, S, dtype=P.dtype)
    L.scatter_add_(2, nxt.expand(B, S, k), P)
    return L


def stationary(L: torch.Tensor) -> torch.Tensor:
    """(B, S, S) row-stochastic -> (B, S) pi with pi L = pi, sum pi = 1 (exact linear solve).

    (The official utils.stationary_distribution returns the uniform vector for k < 5: P^16 averaged
    over the wrong axis. We use the real pi, as the paper intends.)
    """
    B, S, _ = L.shape
    A = L.double().transpose(1, 2) - torch.eye(S, dtype=torch.float64)  # (L^T - I) pi = 0
    A[:, -1, :] = 1.0                                                  # replace one equation by sum = 1
    b = torch.zeros(B, S, dtype=torch.float64)
    b[:, -1] = 1.0
    pi = torch.linalg.solve(A, b).clamp_min(0)
    return (pi / pi.sum(-1, keepdim=True)).to(L.dtype)


def sample_chains(P: torch.Tensor, length: int, gen=None) -> torch.Tensor:
    """Run each chain for `length` tokens; the first n-1 from the stationary law of the lifted chain.

    Batched inverse-CDF sampling: next = #{j : cumsum(P[ctx])_j < u}. Returns (B, length) long.
    """
    B, S, k = P.shape
    n1 = round(math.log(S, k))                                          # n - 1
    cdf = P.cumsum(-1)                                                  # (B, S, k)
    u = torch.rand(B, length, generator=gen)
    pi_cdf = stationary(lifted_chain(P)).cumsum(-1)                     # (B, S)
    ctx = (pi_cdf < u[:, :1]).sum(-1).clamp(max=S - 1)                  # (B,) first context
    x = torch.empty(B, length, dtype=torch.long)
    for j in range(n1):                                                 # decode its n-1 digits
        x[:, j] = (ctx // k ** j) % k
    rows = torch.arange(B)
    for t in range(n1, length):
        c = cdf[rows, ctx]                                              # (B, k)
        tok = (c < u[:, t:t + 1]).sum(-1).clamp(max=k - 1)              # (B,)
        x[:, t] = tok
        ctx = ctx // k + tok * (S // k)
    return x


def sample_icl_mc(B, T, k, n=2, prior="dirichlet", gen=None, mix_p=0.5):
    """B fresh chains of T+1 tokens and their transition tables.

    Example (k=2, n=2, T=8): P = [[0.9, 0.1], [0.3, 0.7]] (row = current state), pi = (0.75, 0.25);
        x = 0 0 0 0 1 1 1 0 0    -> model input x[:-1] = 0 0 0 0 1 1 1 0, targets x[1:] = 0 0 0 1 1 1 0 0
    Returns x (B, T+1) long, P (B, k^(n-1), k).
    """
    P = sample_transition_matrices(B, k, n, prior, gen, mix_p)
    return sample_chains(P, T + 1, gen), P


def context_index(x: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """Index of the last n-1 tokens of each row of x (B, T) -> (B,)."""
    if n == 1:
        return torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    w = x[:, -(n - 1):]
    return (w * (k ** torch.arange(n - 1, device=x.device))).sum(-1)

# -----------------------------------------------------------------------------
# Reference strategies and metrics (last position)


def ngram_strategy(x: torch.Tensor, k: int, m: int, alpha: float = 1.0) -> torch.Tensor:
    """Add-alpha in-context m-gram prediction of the token after x (B, T) -> (B, k).

    m=0 uniform; m=1 unigram (count_j + 1)/(T + k); m=2 bigram: counts of transitions out of the last
    token, (count(x_T -> j) + 1)/(count(x_T -> .) + k) -- the Dir(1) posterior mean, i.e. Bayes-optimal.
    Example: x = 0 1 0 1 0, m=2: 0->1 twice, 0->0 never -> (1/4, 3/4).
    """
    B, T = x.shape
    if m == 0:
        return torch.full((B, k), 1.0 / k, device=x.device)
    win = x.unfold(1, m, 1)                                   # (B, T-m+1, m): x[t:t+m]
    ctx, nxt = win[..., :-1], win[..., -1]
    last = x[:, T - m + 1:]                                   # (B, m-1) the current context
    match = (ctx == last[:, None, :]).all(-1)                 # (B, T-m+1); all True for m=1
    counts = (F.one_hot(nxt, k) * match[..., None]).sum(1).float()   # (B, k)
    return (counts + alpha) / (counts.sum(-1, keepdim=True) + k * alpha)


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(p || q) for (B, k) distributions."""
    return (torch.xlogy(p, p) - p * torch.log(q.clamp_min(1e-30))).sum(-1).mean()


def make_test_set(cfg, n, seed, n_test=None):
    """Fixed standard ICL-MC test chains with everything the metrics need precomputed."""
    g = torch.Generator().manual_seed(seed)
    x, P = sample_icl_mc(n_test or cfg.n_test, cfg.T, cfg.k, n, "dirichlet", g)
    inp = x[:, :-1]                                                      # (N, T) the model sees this
    p_true = P[torch.arange(len(P)), context_index(inp, cfg.k, n)]      # (N, k) law of token T+1
    strat = [ngram_strategy(inp, cfg.k, m) for m in range(n + 1)]       # uniform .. n-gram
    return dict(x=inp, p_true=p_true, strat=strat, n=n,
                kl_true_strategy=[kl(p_true, s).item() for s in strat])


@torch.no_grad()
def evaluate(model, test, device, chunk=512) -> dict:
    """KL(true||model), KL(strategy_m||model) and the layer-1 attention mass at distance 1 and 2."""
    model.eval()
    qs, d1, d2 = [], [], []
    for i in range(0, len(test["x"]), chunk):
        xb = test["x"][i:i + chunk].to(device)
        logits, _, attn = model(xb, return_attn=True)
        qs.append(F.softmax(logits[:, -1].float(), -1).cpu())
        a = attn[0].float() if attn else None                           # (B, H, T, T) layer 1
        if a is not None:
            d1.append(a.diagonal(-1, -2, -1).mean((0, 2)).cpu())        # (H,) mass on x_{i-1}
            d2.append(a.diagonal(-2, -2, -1).mean((0, 2)).cpu())        # (H,) mass on x_{i-2}
    q = torch.cat(qs)
    out = {"kl_true_model": kl(test["p_true"], q).item()}
    for m, s in enumerate(test["strat"]):
        out[f"kl_{STRATEGY_NAMES[m]}_model"] = kl(s, q).item()
    if d1:
        d1, d2 = torch.stack(d1).mean(0), torch.stack(d2).mean(0)
        out["prev_token_attn"] = d1.max().item()                         # best previous-token head
        if len(d1) > 1:
            out["prev2_token_attn"] = d2.max().item()                    # best distance-2 head
    return out


def phase_of(res: dict, n: int) -> str:
    """Name of the strategy closest to the model (the paper shades its Fig. 1 by this argmin)."""
    return min(STRATEGY_NAMES[:n + 1], key=lambda s: res[f"kl_{s}_model"])


def phases(evals, n) -> list:
    """[(phase, first step)] each time the closest strategy changes."""
    out = []
    for step, res in evals:
        ph = phase_of(res, n)
        if not out or out[-1][0] != ph:
            out.append((ph, step))
    return out


def transition_iter(evals, lo="unigram", hi="bigram"):
    """First evaluated step where KL(hi||model) < KL(lo||model); None if never."""
    for step, res in evals:
        if res[f"kl_{hi}_model"] < res[f"kl_{lo}_model"]:
            return step
    return None

# -----------------------------------------------------------------------------
# Models


class RelAttention(nn.Module):
    """Pre-norm causal self-attention with Shaw-style relative positions, plus its residual.

    score_ij = (q_i . k_j + q_i . r_{i-j}) / sqrt(hd) for j <= i; r is a (T+1, d) table whose last row
    is the padding row the future pairs point at (masked anyway). Dropout on the gathered r vectors
    (one mask per (i, j) pair), on the attention weights and on the residual branch, as the official code.
    """

    def __init__(self, d, n_head, block_size, dropout=0.0):
        super().__init__()
        assert d % n_head == 0
        self.n_head = n_head
        self.ln = nn.LayerNorm(d)
        self.Q = nn.Linear(d, d, bias=False)
        self.K = nn.Linear(d, d, bias=False)
        self.V = nn.Linear(d, d, bias=False)
        self.c_proj = nn.Linear(d, d, bias=False)
        self.rel = nn.Embedding(block_size + 1, d, padding_idx=block_size)
        dist = torch.arange(block_size)[:, None] - torch.arange(block_size)[None, :]   # i - j
        self.register_buffer("rel_idx", torch.where(dist >= 0, dist, block_size), persistent=False)
        self.rel_drop, self.attn_drop, self.resid_drop = (nn.Dropout(dropout) for _ in range(3))

    def forward(self, x, return_attn=False):
        B, T, C = x.shape
        H, hd = self.n_head, C // self.n_head
        h = self.ln(x)
        q, k, v = (m(h).view(B, T, H, hd).transpose(1, 2) for m in (self.Q, self.K, self.V))  # (B, H, T, hd)
        r = self.rel_drop(self.rel(self.rel_idx[:T, :T])).view(T, T, H, hd)                    # (T, T, H, hd)
        att = (q @ k.transpose(-2, -1) + torch.einsum("bhie,ijhe->bhij", q, r)) / math.sqrt(hd)  # (B, H, T, T)
        att = att.masked_fill(self.rel_idx[:T, :T] == self.rel.padding_idx, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = self.attn_drop(att) @ v                                                             # (B, H, T, hd)
        x = x + self.resid_drop(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))               # (B, T, C)
        return x, (att if return_attn else None)


class AttnOnlyTransformer(nn.Module):
    """The official `Relative_Transformer`: embeddings, n_layer RelAttention (heads_first_layer heads in
    layer 1, one head after), ln_f, lm_head. No MLP, no absolute positions. 5440 parameters for k=2."""

    def __init__(self, k, block_size, d=16, n_layer=2, heads_first_layer=1, dropout=0.1):
        super().__init__()
        self.wte = nn.Embedding(k, d)
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList([RelAttention(d, heads_first_layer if i == 0 else 1, block_size, dropout)
                                     for i in range(n_layer)])
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, k, bias=False)
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                nn.init.normal_(mod.weight, 0.0, 0.02)
        for layer in self.layers:
            nn.init.normal_(layer.c_proj.weight, 0.0, 0.01)

    def forward(self, idx, targets=None, return_attn=False):
        x = self.drop(self.wte(idx))                        # (B, T, d)
        attns = []
        for layer in self.layers:
            x, a = layer(x, return_attn)
            attns.append(a)
        logits = self.lm_head(self.ln_f(x))                 # (B, T, k)
        loss = None if targets is None else F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return (logits, loss, attns) if return_attn else (logits, loss)


class MinimalModel(nn.Module):
    """The theory section's model, with a causal layer 1.

    layer 1: a_ij = softmax_{j<=i}(v_{i-j}),  h_i = sum_j a_ij e_{x_j}           (positional only)
    layer 2: logits_t = sum_{j<=t} (e_{x_t}^T W h_j) e_{x_j}                      (linear attention)
    With v peaked at distance 1 and W = c I the logits are c x (in-context bigram counts from x_t).
    """

    def __init__(self, k, block_size):
        super().__init__()
        self.k = k
        self.v = nn.Parameter(torch.zeros(block_size))          # v[d]: layer-1 logit for distance d
        self.W = nn.Parameter(torch.full((k, k), 0.01))
        dist = torch.arange(block_size)[:, None] - torch.arange(block_size)[None, :]
        self.register_buffer("dist", dist, persistent=False)

    def layer1(self, e):
        T = e.shape[1]
        dist = self.dist[:T, :T]
        a = self.v[dist.clamp(min=0)].masked_fill(dist < 0, float("-inf")).softmax(-1)   # (T, T)
        return a @ e, a                                                                     # (B, T, k)

    def forward(self, idx, targets=None, return_attn=False):
        e = F.one_hot(idx, self.k).float()                       # (B, T, k)
        h, a = self.layer1(e)
        s = (e @ self.W @ h.transpose(1, 2)).tril()              # (B, T, T): e_t^T W h_j for j <= t
        logits = s @ e                                           # (B, T, k)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        if return_attn:
            return logits, loss, [a.expand(idx.shape[0], 1, -1, -1)]
        return logits, loss

# -----------------------------------------------------------------------------
# Training runs


def fmt_eval(step, res, n):
    parts = [f"KL(true||m) {res['kl_true_model']:.4f}"] + \
            [f"{STRATEGY_NAMES[m]} {res[f'kl_{STRATEGY_NAMES[m]}_model']:.4f}" for m in range(n + 1)]
    if "prev_token_attn" in res:
        parts.append(f"attn@1 {res['prev_token_attn']:.3f}")
    if "prev2_token_attn" in res:
        parts.append(f"attn@2 {res['prev2_token_attn']:.3f}")
    return f"  step {step:5d} | " + " | ".join(parts) + f" | {phase_of(res, n)}"


def train_transformer(cfg, test, *, prior, n=2, iters, lr, seed, tag, stop_at_transition=False):
    """Train the attention-only transformer on `prior` chains; evaluate on the standard test set."""
    device = torch.device(cfg.device)
    torch.manual_seed(seed)
    model = AttnOnlyTransformer(cfg.k, cfg.T, cfg.d_model * (n - 1), cfg.n_layer, n - 1, cfg.dropout).to(device)
    gen = torch.Generator().manual_seed(seed + 1)

    def get_batch(step):
        x, _ = sample_icl_mc(cfg.batch, cfg.T, cfg.k, n, prior, gen, cfg.mix_p)
        x = x.to(device)
        return x[:, :-1], x[:, 1:]

    evals = []

    def eval_fn(m, step):
        res = evaluate(m, test, device)
        evals.append((step, res))
        common.print0(fmt_eval(step, res, n))
        hit = res["kl_bigram_model"] < res["kl_unigram_model"] if n == 2 else \
            res["kl_trigram_model"] < res["kl_bigram_model"]
        return {"stop": int(stop_at_transition and hit)}

    common.print0(f"[{tag}] prior={prior} n={n} k={cfg.k} T={cfg.T} lr={lr} iters={iters} "
                  f"params={common.count_params(model)}")
    eval_fn(model, 0)
    # official trainer: AdamW, constant lr, no warmup, no clipping; no decay on LayerNorm or embeddings
    opt = common.configure_adamw(model, lr, cfg.weight_decay, tuple(cfg.betas), no_decay=("wte.weight", "rel.weight"))
    hist = common.train(model, get_batch, steps=iters, lr=lr, device=device, warmup=0, schedule="constant",
                        grad_clip=0.0, optimizer=opt, eval_fn=eval_fn, eval_every=cfg.eval_every,
                        compile=cfg.compile, desc=tag, log_every=10, quiet=True)
    return model, evals, {"step": hist["step"], "loss": hist["loss"], "time_s": hist["time_s"]}


def train_minimal(cfg, test, seed):
    """SGD on the minimal model with separate learning rates for W and v (official: lr_v = 1)."""
    torch.manual_seed(seed)
    model = MinimalModel(cfg.k, cfg.T)
    opt = torch.optim.SGD([{"params": [model.W], "lr": cfg.minimal_lr_w},
                           {"params": [model.v], "lr": cfg.minimal_lr_v}])
    gen = torch.Generator().manual_seed(seed + 2)
    every = max(1, cfg.minimal_iters // 10)
    evals, traj = [], []
    common.print0(f"[minimal] k={cfg.k} T={cfg.T} SGD lr_W={cfg.minimal_lr_w} lr_v={cfg.minimal_lr_v} "
                  f"iters={cfg.minimal_iters}")
    for step in range(cfg.minimal_iters + 1):
        if step % every == 0 or step == cfg.minimal_iters:
            res = evaluate(model, test, "cpu")
            evals.append((step, res))
            Wd = model.W.detach()
            traj.append(dict(step=step, W_diag=Wd.diag().mean().item(),
                             W_offdiag=((Wd.sum() - Wd.diag().sum()) / max(1, cfg.k * (cfg.k - 1))).item(),
                             v0=model.v[0].item(), v1=model.v[1].item()))
            common.print0(fmt_eval(step, res, 2) + f" | W diag-off {traj[-1]['W_diag'] - traj[-1]['W_offdiag']:.3f}"
                          f" | v1-v0 {traj[-1]['v1'] - traj[-1]['v0']:.3f}")
        if step == cfg.minimal_iters:
            break
        x, _ = sample_icl_mc(cfg.minimal_batch, cfg.T, cfg.k, 2, "dirichlet", gen)
        model.train()
        loss = model(x[:, :-1], x[:, 1:])[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return evals, traj

# -----------------------------------------------------------------------------
# Figure


def plot_figure(path, main, ref, runs: dict, ref_c, tri=None, minimal=None):
    """Four panels: (1) KL(strategy||model) over training of the main run, (2) KL(true||model) per
    training prior, (3) the trigram hierarchy (or the minimal model), (4) layer-1 previous-token
    attention. One figure with panels instead of common.plot's single axes, so the four experiments
    sit side by side. Missing matplotlib is one printed line."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the figure (pip install matplotlib)")
        return None
    fig, axs = plt.subplots(2, 2, figsize=(11, 7.5))

    def curves(ax, evals, n, title):
        xs = [s for s, _ in evals]
        for m in range(n + 1):
            name = STRATEGY_NAMES[m]
            ax.plot(xs, [r[f"kl_{name}_model"] for _, r in evals], marker="o", ms=3, label=f"KL({name}||model)")
        ax.plot(xs, [r["kl_true_model"] for _, r in evals], "k-", lw=2, label="KL(true||model)")
        ax.set(title=title, xlabel="step", ylabel="KL", yscale="log")
        ax.legend(fontsize=7)

    curves(axs[0, 0], main, 2, "1. phases; dashed: KL(true||unigram), KL(true||bigram)")
    for m, c in ((1, "C1"), (2, "C2")):
        axs[0, 0].axhline(ref[m], color=c, ls="--", lw=0.8)
    ax = axs[0, 1]
    for prior, ev in runs.items():
        ax.plot([s for s, _ in ev], [r["kl_true_model"] for _, r in ev], marker="o", ms=3, label=f"trained on {prior}")
    ax.axhline(ref_c[1], color="grey", ls="--", lw=0.8, label="unigram strategy")
    ax.axhline(ref_c[2], color="grey", ls=":", lw=0.8, label="bigram (Bayes)")
    ax.set(title="2. training prior, tested on standard ICL-MC", xlabel="step", ylabel="KL(true||model)", yscale="log")
    ax.legend(fontsize=7)
    if tri:
        curves(axs[1, 0], tri, 3, "3. trigram chains (n=3, 2 heads in layer 1)")
    elif minimal:
        curves(axs[1, 0], minimal, 2, "minimal model (SGD)")
    else:   # no trigram run in this preset: show experiment 2's distance to the bigram strategy
        ax = axs[1, 0]
        for prior, ev in runs.items():
            ax.plot([s for s, _ in ev], [r["kl_bigram_model"] for _, r in ev], marker="o", ms=3, label=f"trained on {prior}")
        ax.set(title="2b. KL(bigram||model) per training prior (trigrams: full preset)", xlabel="step", yscale="log")
        ax.legend(fontsize=7)
    ax = axs[1, 1]
    ax.plot([s for s, _ in main], [r["prev_token_attn"] for _, r in main], marker="o", ms=3, label="main run")
    if tri:
        ax.plot([s for s, _ in tri], [r["prev_token_attn"] for _, r in tri], ls=":", label="trigram: distance 1")
        ax.plot([s for s, _ in tri], [r["prev2_token_attn"] for _, r in tri], ls=":", label="trigram: distance 2")
    ax.set(title="4. layer-1 attention mass on the previous token", xlabel="step", ylim=(0, 1))
    ax.legend(fontsize=7)
    for a in axs.flat:
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    common.print0(f"wrote {path}")
    return path

# -----------------------------------------------------------------------------
# Main experiment


def run(cfg) -> dict:
    t0 = time.time()
    common.set_threads(cfg.threads, cfg.device)
    device = torch.device(cfg.device)
    test = make_test_set(cfg, 2, cfg.seed + 10_000)
    ref = test["kl_true_strategy"]
    common.print0(f"test set: {cfg.n_test} standard ICL-MC chains, k={cfg.k}, T={cfg.T}; "
                  f"KL(true||uniform) {ref[0]:.4f}, KL(true||unigram) {ref[1]:.4f}, KL(true||bigram) {ref[2]:.4f}")
    history = {}

    # 1 + 4. phases and the mechanism, over seeds
    seed_runs = []
    for i in range(max(1, cfg.seeds)):
        seed = cfg.seed + i
        model, evals, hist = train_transformer(cfg, test, prior=cfg.prior, iters=cfg.iters, lr=cfg.lr,
                                               seed=seed, tag=f"main seed {seed}")
        seed_runs.append(evals)
        history[f"main/seed{seed}"] = {"evals": evals, **hist}
        ph = phases(evals, 2)
        fin = evals[-1][1]
        common.print0(f"phases: " + " -> ".join(f"{p}@{s}" for p, s in ph) +
                      f" ; final KL(true||model)={fin['kl_true_model']:.4f} "
                      f"(bigram-optimal {ref[2]:.4f}, unigram {ref[1]:.4f}) ; "
                      f"transition_iter={transition_iter(evals)}")
    main = seed_runs[0]
    fin = main[-1][1]
    tr = transition_iter(main)
    before = [r["prev_token_attn"] for s, r in main if tr is None or s < tr]
    metrics = {
        "kl_true_model_final": fin["kl_true_model"],
        "kl_bigram_model_final": fin["kl_bigram_model"],
        "kl_unigram_model_final": fin["kl_unigram_model"],
        "kl_uniform_model_final": fin["kl_uniform_model"],
        "kl_true_bigram": ref[2], "kl_true_unigram": ref[1], "kl_true_uniform": ref[0],
        "transition_iter": tr,
        "transition_sequences": None if tr is None else tr * cfg.batch,
        "prev_token_attn_final": fin["prev_token_attn"],
        "prev_token_attn_before": max(before) if before else None,   # highest value before the transition
        "phases": " -> ".join(f"{p}@{s}" for p, s in phases(main, 2)),
        "n_params": common.count_params(model),
    }
    if cfg.seeds > 1:   # finals become means over seeds (std under '<key>/std'); per-seed lists kept
        trs = [transition_iter(ev) for ev in seed_runs]
        done = [t for t in trs if t is not None]
        for key in ("kl_true_model", "kl_bigram_model", "kl_unigram_model", "kl_uniform_model", "prev_token_attn"):
            vals = [ev[-1][1][key] for ev in seed_runs]
            mu = sum(vals) / len(vals)
            metrics[f"{key}_final"] = mu
            metrics[f"{key}_final/std"] = (sum((v - mu) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5
            metrics[f"{key}_final/seeds"] = vals
        metrics.update({"seeds_transitioned": len(done), "seeds_total": len(trs), "transition_iters": trs,
                        "transition_iter": sum(done) / len(done) if done else None})
        metrics["transition_sequences"] = None if not done else metrics["transition_iter"] * cfg.batch

    # 2. the training distribution, every run tested on standard ICL-MC with compare_k states
    runs, ref_c = {}, ref
    if cfg.compare_priors:
        ccfg = dataclasses.replace(cfg, k=cfg.compare_k)
        reuse = cfg.compare_k == cfg.k and cfg.prior == "dirichlet"
        test_c = test if reuse else make_test_set(ccfg, 2, cfg.seed + 30_000)
        ref_c = test_c["kl_true_strategy"]
        common.print0(f"experiment 2: training prior (k={cfg.compare_k}), tested on standard ICL-MC; "
                      f"KL(true||unigram) {ref_c[1]:.4f}, KL(true||bigram) {ref_c[2]:.4f}")
        for prior in cfg.compare_priors:
            if prior == "dirichlet" and reuse:
                runs[prior] = main
                continue
            _, evals, hist = train_transformer(ccfg, test_c, prior=prior, iters=cfg.compare_iters, lr=cfg.lr,
                                               seed=cfg.seed, tag=f"prior {prior} k={cfg.compare_k}",
                                               stop_at_transition=cfg.compare_stop)
            runs[prior] = evals
            history[f"prior/{prior}"] = {"evals": evals, **hist}
        for prior, evals in runs.items():
            metrics[f"transition_iter/{prior}"] = transition_iter(evals)
            metrics[f"phases/{prior}"] = " -> ".join(f"{p}@{s}" for p, s in phases(evals, 2))

    # 3. trigrams
    tri, tri_ref = None, None
    if cfg.trigram_iters > 0:
        test3 = make_test_set(cfg, 3, cfg.seed + 20_000)
        tri_ref = test3["kl_true_strategy"]
        common.print0("trigram test set: " + ", ".join(f"KL(true||{STRATEGY_NAMES[m]}) {v:.4f}" for m, v in enumerate(tri_ref)))
        _, tri, hist = train_transformer(cfg, test3, prior="dirichlet", n=3, iters=cfg.trigram_iters,
                                         lr=cfg.trigram_lr, seed=cfg.seed, tag="trigram")
        history["trigram"] = {"evals": tri, **hist}
        ph3 = phases(tri, 3)
        common.print0("trigram phases: " + " -> ".join(f"{p}@{s}" for p, s in ph3))
        metrics.update({"trigram_phases": " -> ".join(f"{p}@{s}" for p, s in ph3),
                        "trigram_kl_true_model_final": tri[-1][1]["kl_true_model"],
                        "trigram_kl_true_trigram": tri_ref[3], "trigram_kl_true_bigram": tri_ref[2],
                        "trigram_transition_iter": transition_iter(tri, "bigram", "trigram")})

    # extra: the minimal model
    mini = None
    if cfg.minimal_iters > 0:
        mini, traj = train_minimal(cfg, test, cfg.seed)
        history["minimal"] = {"evals": mini, "trajectory": traj}
        metrics.update({"minimal_kl_true_model_final": mini[-1][1]["kl_true_model"],
                        "minimal_transition_iter": transition_iter(mini)})

    # headline table
    def ours(key):   # mean +- std over seeds when there are several
        if cfg.seeds > 1:
            return common.mean_std(metrics[f"{key}_final/seeds"])
        return metrics[f"{key}_final"]

    rows = [
        ["KL(true||model), final", "ends near the bigram line", ours("kl_true_model")],
        ["KL(true||bigram), Bayes reference", "-", ref[2]],
        ["KL(true||unigram), plateau reference", "-", ref[1]],
        ["KL(bigram||model), final", "-> 0", ours("kl_bigram_model")],
        ["KL(unigram||model), final", "-", ours("kl_unigram_model")],
        ["transition (sequences seen)", "bigram phase by ~64k (notebook, lr 5e-4)",
         metrics["transition_sequences"] if cfg.seeds == 1 else f"{common.fmt(metrics['transition_sequences'])} (mean)"],
        ["layer-1 attn on previous token, before -> final", "diffuse -> peaked at 1",
         f"{common.fmt(metrics['prev_token_attn_before'])} -> {fin['prev_token_attn']:.3f}" +
         (" (seed 0)" if cfg.seeds > 1 else "")],
    ]
    paper_prior = {"doubly": "earlier, no unigram plateau", "dirichlet": "reference", "unigram": "later",
                   "mix": "later (more unigram data)"}
    for prior in runs:
        t = metrics[f"transition_iter/{prior}"]
        cap = cfg.iters if runs[prior] is main else cfg.compare_iters
        rows.append([f"k={cfg.compare_k}: transition step, trained on {prior}" +
                     (f" (p_unigram={cfg.mix_p})" if prior == "mix" else ""),
                     paper_prior[prior], f"{t if t is not None else f'none by {cap}'} ({metrics[f'phases/{prior}']})"])
    if cfg.seeds > 1:
        rows.append(["seeds that transitioned", "-", f"{metrics['seeds_transitioned']}/{metrics['seeds_total']}"])
    if tri:
        rows.append(["trigram phases", "uniform -> unigram -> bigram -> trigram", metrics["trigram_phases"]])
    if mini:
        rows.append(["minimal model KL(true||model), final", "-", metrics["minimal_kl_true_model_final"]])
    common.print_table(rows, ["quantity (k=%d, T=%d, last position)" % (cfg.k, cfg.T), "paper", "ours"],
                       title=f"icl_markov ({cfg.preset}): statistical induction heads on in-context Markov chains")
    wall = time.time() - t0
    common.print0(f"wall time {wall:.1f} s")
    common.save_results("icl_markov", cfg, metrics, history, wall)
    plot_figure(os.path.join(cfg.out, "icl_markov.png"), main, ref, runs, ref_c, tri, mini)
    return metrics


def main():
    run(common.parse_args(Config, PRESETS))


if __name__ == "__main__":
    main()
