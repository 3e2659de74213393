"""
The Evolution of Statistical Induction Heads: In-Context Learning Markov Chains
Ezra Edelman*, Nikolaos Tsilivis*, Benjamin L. Edelman, Eran Malach, Surbhi Goel. NeurIPS 2024. arXiv:2402.11004
Official code: github.com/EzraEdelman/Evolution-of-Statistical-Induction-Heads

Finding: a 2-layer attention-only transformer trained on Markov chains whose transition matrix is drawn
afresh for every sequence (ICL-MC) predicts uniformly, then sits on a plateau copying in-context unigram
statistics, then drops abruptly to the Bayes-optimal in-context bigram predictor, as layer 1 becomes a
previous-token head (the statistical induction head). In the minimal model the 2nd layer learns first.
Measured (quick, seeds 0-2, 423 s on 1 CPU thread): unigram from step 27 ± 1, bigram from 358 ± 37, final
KL(true||model) 0.0191 ± 0.0006 (Bayes 0.0095, unigram 0.0870); minimal model W half-way at step 24, v at 346.
    python icl_markov.py --preset smoke        # seconds (what pytest runs)
    python icl_markov.py                       # quick on CPU (full on CUDA)
    python icl_markov.py --device cuda         # full: official lr 5e-4, mixture sweep, trigrams
    python icl_markov.py --seeds 3             # mean +- std over seeds 0, 1, 2
    torchrun --standalone --nproc_per_node=2 icl_markov.py --preset smoke --device cpu
Glossary (ours -> paper):
    k, T, n       states k; sequence length (block_size 100); chain order (n=2 ICL-MC, n=3 trigrams)
    strategy m    add-one in-context m-gram: uniform, unigram, bigram (= Bayes under Dir(1)), trigram
    kl_true       KL(P_true(.|x_T) || model) at the last position: the paper's "test loss"
    kl_to_model   KL(strategy || model): "distance to candidate strategies" (Fig. 1 right)
    rel           Shaw-style relative position vectors r_{i-j} (the official per-layer `wpe`)
    MinimalModel  the theory model: layer 1 softmax(v_{i-j}) over positions, layer 2 linear attention W
    mix p         training chains: a fraction p unigram (i.i.d.), the rest doubly stochastic
Does not include: the gradient-flow theory, 4-grams, MLP variants, the 200-snapshot pipeline (we evaluate
during training). Our minimal model's layer 1 is causal (the official one sees the future).
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass

import common  # first: it reports a missing package in one line

import torch
import torch.nn as nn
import torch.nn.functional as F

NAME = "icl_markov"
PRIORS = ("dirichlet", "doubly", "unigram", "mix")
STRATEGY_NAMES = ("uniform", "unigram", "bigram", "trigram")

# -----------------------------------------------------------------------------
# Config


@dataclass
class Config(common.BaseConfig):
    # task
    k: int = 2                      # states (vocabulary size), >= 2; no special tokens
    T: int = 100                    # input length (block_size), >= 4; each chain has T+1 tokens
    prior: str = "dirichlet"        # main run's training prior: dirichlet | doubly | unigram | mix
    test_seed: int = 10_000         # seed of the fixed test chains (choices were made on other seeds)
    n_test: int = 2048              # fixed standard ICL-MC test chains, scored at the last position
    # model (the official Relative_Transformer: attention only, relative positions only)
    n_layer: int = 2                # attention layers
    d_model: int = 16               # width per (n-1): 16 for bigrams, 32 for the trigram run
    dropout: float = 0.1            # in [0, 1): on embeddings, relative vectors, attention and residual
    # optimisation (official trainer: AdamW, constant lr, no clipping)
    lr: float = 2e-3                # AdamW learning rate (official 5e-4; 2e-3 halves the plateau on CPU)
    weight_decay: float = 0.1       # on Linear weights only (not LayerNorm, not embeddings)
    betas: tuple[float, ...] = (0.9, 0.95)  # AdamW betas, two values in [0, 1)
    batch: int = 64                 # chains per step (global batch; torchrun splits it)
    iters: int = 800                # steps of the main run
    eval_every: int = 50            # evaluate every this many steps (and at step 0 and the end)
    # experiment 2: unigram data mixed into doubly-stochastic training chains, tested on standard ICL-MC
    mix_k: int = 3                  # states in experiment 2 (k=2 doubly-stochastic chains are symmetric)
    mix_fracs: tuple[float, ...] = (0.0, 0.5)  # unigram fractions p in [0, 1); 0 = purely doubly stochastic;
                                    # empty: skip experiment 2
    mix_ds_iters: int = 800         # steps at p=0; fraction p gets mix_ds_iters/(1-p) steps, so every run
                                    # has the same number of doubly-stochastic chains (the official scaling)
    mix_standard: bool = False      # also train on the standard (Dirichlet) prior with mix_k states
    mix_stop: bool = True           # stop each run of experiment 2 once it is past its bigram transition
    # experiment 3: trigrams (n=3, 2 heads in layer 1)
    trigram_iters: int = 0          # steps of the trigram run; 0 = skip
    trigram_lr: float = 1e-3        # its AdamW learning rate
    # experiment 4: the minimal model (SGD)
    minimal_iters: int = 600        # SGD steps; 0 = skip
    minimal_lr_w: float = 0.02      # SGD lr of W (layer 2; official notebook 1e-2)
    minimal_lr_v: float = 1.0       # SGD lr of v (layer 1; hard-coded 1 in the official code)
    minimal_batch: int = 64         # chains per SGD step (global batch)

    POSITIVE = ("k", "T", "n_test", "n_layer", "d_model", "batch", "iters", "eval_every", "mix_k",
                "mix_ds_iters", "minimal_batch")
    GLOBAL_BATCH = ("batch", "minimal_batch")
    MAY_BE_EMPTY = ("mix_fracs",)   # --mix-fracs , skips experiment 2

    def __post_init__(self):
        if self.k < 2 or self.mix_k < 2:
            raise ValueError(f"--k {self.k} / --mix-k {self.mix_k}: need at least 2 states")
        if self.T < 4:
            raise ValueError(f"--T {self.T}: chains need at least 4 tokens")
        if self.prior not in PRIORS:
            raise ValueError(f"--prior {self.prior}: choose one of {', '.join(PRIORS)}")
        if not all(0.0 <= p < 1.0 for p in self.mix_fracs):
            raise ValueError(f"--mix-fracs {self.mix_fracs}: each fraction must be in [0, 1)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--dropout {self.dropout} must be in [0, 1)")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"--betas {self.betas}: two values in [0, 1), e.g. 0.9,0.95")


PRESETS = {
    # T=32, lr 5e-3, seed 100: the bigram phase arrives by step ~150 (~2 s), so the smoke test can assert it
    # (the plateau length varies by seed: seed 0 is still on it at step 240)
    "smoke": dict(seed=100, T=32, n_test=256, batch=64, iters=240, eval_every=20, lr=5e-3, mix_fracs=(0.0, 0.5),
                  mix_ds_iters=40, trigram_iters=20, minimal_iters=60, minimal_batch=32),
    "quick": dict(seeds=3),
    # official lr 5e-4, the whole mixture sweep and the trigram hierarchy; sized for one H100/H200 (unmeasured)
    "full": dict(lr=5e-4, iters=3000, seeds=5, n_test=4096, mix_fracs=(0.0, 0.25, 0.5, 0.75),
                 mix_ds_iters=1500, mix_standard=True, mix_stop=False, trigram_iters=8000, minimal_iters=1500),
}

# -----------------------------------------------------------------------------
# Data: ICL-MC and its n-gram generalisation


def dirichlet1(shape, gen) -> torch.Tensor:
    """Rows uniform on the simplex: Dir(1,...,1) = normalised Exp(1) draws."""
    e = -torch.log(torch.rand(shape, generator=gen).clamp_min(1e-12))
    return e / e.sum(-1, keepdim=True)


def doubly_stochastic(B, k, gen) -> torch.Tensor:
    """(B, k, k) matrices whose rows and columns sum to 1 (uniform stationary law: unigrams are useless).

    k <= 4: uniform on the Birkhoff polytope (official method): fill the top-left (k-1)x(k-1) block with
    U[0,1], complete the last row and column, reject if an entry is < 0. k >= 5: Sinkhorn on Dir(1) rows.
    """
    if k > 4:
        P = dirichlet1((B, k, k), gen)
        for _ in range(200):
            P = P / P.sum(-2, keepdim=True)
            P = P / P.sum(-1, keepdim=True)
        return P
    out, have = [], 0
    while have < B:
        A = torch.rand((4 * B + 16, k - 1, k - 1), generator=gen)
        M = torch.zeros(len(A), k, k)
        M[:, :-1, :-1] = A
        M[:, :-1, -1] = 1 - A.sum(-1)                 # last column completes the rows
        M[:, -1, :] = 1 - M[:, :-1, :].sum(-2)        # last row completes the columns
        out.append(M[(M >= 0).flatten(1).all(-1)])
        have += len(out[-1])
    return torch.cat(out)[:B]


def sample_transition_matrices(B, k, n=2, prior="dirichlet", gen=None, mix_p=0.5) -> torch.Tensor:
    """(B, k^(n-1), k) row-stochastic P, one per chain; row c is the next-token law after context c.

    mix: exactly round(mix_p * B) chains of the batch are unigram (every row the same p ~ Dir(1), i.e.
    i.i.d. tokens), the others doubly stochastic.
    """
    if prior == "dirichlet":
        return dirichlet1((B, k ** (n - 1), k), gen)
    if n != 2:
        raise ValueError(f"prior '{prior}' is defined for bigram chains (n=2) only")
    if prior == "doubly":
        return doubly_stochastic(B, k, gen)
    uni = dirichlet1((B, 1, k), gen).expand(B, k, k).contiguous()
    if prior == "unigram":
        return uni
    if prior == "mix":
        is_uni = torch.randperm(B, generator=gen) < round(mix_p * B)
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

    (The official utils.stationary_distribution returns the uniform vector for k < 5; we use the real pi.)
    """
    B, S, _ = L.shape
    A = L.double().transpose(1, 2) - torch.eye(S, dtype=torch.float64)  # (L^T - I) pi = 0
    A[:, -1, :] = 1.0                                                  # one equation becomes sum = 1
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
    for j in range(n1):                                                 # its n-1 digits
        x[:, j] = (ctx // k ** j) % k
    rows = torch.arange(B)
    for t in range(n1, length):
        tok = (cdf[rows, ctx] < u[:, t:t + 1]).sum(-1).clamp(max=k - 1)  # (B,)
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


def chain_stream(batch, T, k, n, prior, gen, device, mix_p=0.5, chunk=32):
    """Endless (input, target) global batches of fresh chains, sampled `chunk` batches at a time (the
    sampler's per-token loop costs the same for 64 chains as for 2048)."""
    while True:
        x, _ = sample_icl_mc(batch * chunk, T, k, n, prior, gen, mix_p)
        for xb in x.to(device).split(batch):
            yield xb[:, :-1], xb[:, 1:]


def context_index(x: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """Index of the last n-1 tokens (n >= 2) of each row of x (B, T) -> (B,)."""
    return (x[:, -(n - 1):] * (k ** torch.arange(n - 1, device=x.device))).sum(-1)

# -----------------------------------------------------------------------------
# Model


class RelAttention(nn.Module):
    """Pre-norm causal self-attention with Shaw-style relative positions, plus its residual branch.

    score_ij = (q_i . k_j + q_i . r_{i-j}) / sqrt(hd) for j <= i. r is a (T+1, d) table whose last row
    is the padding row that future pairs point at (masked anyway). Dropout on the gathered r vectors (one
    mask per (i, j) pair), on the attention weights and on the residual branch, as the official code.
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
        att = att.masked_fill(self.rel_idx[:T, :T] == self.rel.padding_idx, float("-inf")).softmax(-1)
        y = self.attn_drop(att) @ v                                                             # (B, H, T, hd)
        x = x + self.resid_drop(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))               # (B, T, C)
        return x, (att if return_attn else None)


class AttnOnlyTransformer(nn.Module):
    """The official `Relative_Transformer`: embeddings, n_layer RelAttention (heads_first_layer heads in
    layer 1, one after), ln_f, lm_head. No MLP, no absolute positions. 5440 parameters for k=2, T=100."""

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

    def forward(self, idx, return_attn=False):
        x = self.drop(self.wte(idx))                        # (B, T, d)
        attns = []
        for layer in self.layers:
            x, a = layer(x, return_attn)
            attns.append(a)
        return self.lm_head(self.ln_f(x)), attns            # (B, T, k), per-layer (B, H, T, T) or None


class MinimalModel(nn.Module):
    """The theory section's model (with a causal layer 1).

    layer 1: a_ij = softmax_{j<=i}(v_{i-j}),  h_i = sum_j a_ij e_{x_j}           (positions only)
    layer 2: logits_t = sum_{j<=t} (e_{x_t}^T W h_j) e_{x_j}                      (linear attention)
    With v peaked at distance 1 and W = c I the logits are c x (in-context bigram counts from x_t).
    Init (official): v = 0 (uniform attention: unigram-like), every entry of W = 0.01.
    """

    def __init__(self, k, block_size):
        super().__init__()
        self.k = k
        self.v = nn.Parameter(torch.zeros(block_size))          # v[d]: layer-1 logit of distance d
        self.W = nn.Parameter(torch.full((k, k), 0.01))
        dist = torch.arange(block_size)[:, None] - torch.arange(block_size)[None, :]
        self.register_buffer("dist", dist, persistent=False)

    def layer1(self, e):
        T = e.shape[1]
        dist = self.dist[:T, :T]
        a = self.v[dist.clamp(min=0)].masked_fill(dist < 0, float("-inf")).softmax(-1)   # (T, T)
        return a @ e, a                                                                     # (B, T, k)

    def forward(self, idx, return_attn=False):
        e = F.one_hot(idx, self.k).float()                       # (B, T, k)
        h, a = self.layer1(e)
        s = (e @ self.W @ h.transpose(1, 2)).tril()              # (B, T, T): e_t^T W h_j for j <= t
        attn = [a.expand(idx.shape[0], 1, -1, -1)] if return_attn else [None]
        return s @ e, attn                                       # (B, T, k)


def make_transformer(cfg, k, n, seed):
    torch.manual_seed(seed)
    return AttnOnlyTransformer(k, cfg.T, cfg.d_model * (n - 1), cfg.n_layer, n - 1, cfg.dropout).to(cfg.device)

# -----------------------------------------------------------------------------
# Training: one loop for the transformer (AdamW) and the minimal model (SGD)


def train(model, opt, cfg, stream, steps, desc, eval_fn=None, stop_fn=None, every=None):
    """The official trainer: constant lr (no warmup, no decay), no gradient clipping, next-token CE on
    all T positions. The global batch from `stream` is split over torchrun ranks (token-weighted loss).
    At step 0, every `every` (default cfg.eval_every) steps and at the end rank 0 calls eval_fn(model, step); when
    stop_fn(evals so far) says so, every rank stops. Returns {"evals": [(step, dict)]}."""
    device, every = torch.device(cfg.device), every or cfg.eval_every
    fwd = common.wrap_ddp(model, device)
    fwd = torch.compile(fwd) if cfg.compile else fwd
    hist, t0 = {"evals": []}, time.time()
    bar = common.progress(range(steps + 1), desc)
    for step in bar:
        if eval_fn and (step % every == 0 or step == steps):
            res = eval_fn(model, step) if common.is_main() else {}
            hist["evals"].append((step, res))
            if common.broadcast_flag(bool(stop_fn and common.is_main() and stop_fn(hist["evals"])), device):
                break
        if step == steps:
            break
        inp, tgt = common.shard(*next(stream))                   # this rank's rows of the global batch
        model.train()
        with common.autocast(device):
            logits = fwd(inp)[0]
            loss = common.token_mean(*common.cross_entropy_sum(logits, tgt))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0:
            bar.set_postfix_str(common.step_log(step + 1, steps, t0, loss=common.global_mean(loss)))
    return hist


def adamw(model, lr, cfg):
    """Official optimizer: AdamW, decay on Linear weights only (not LayerNorm, token or relative embeddings)."""
    return common.configure_adamw(model, lr, cfg.weight_decay, tuple(cfg.betas), no_decay=("wte.weight", "rel.weight"))

# -----------------------------------------------------------------------------
# Evaluation: reference strategies and the metrics (last position)


def ngram_strategy(x: torch.Tensor, k: int, m: int, alpha: float = 1.0) -> torch.Tensor:
    """Add-alpha in-context m-gram prediction of the token after x (B, T) -> (B, k).

    m=0 uniform; m=1 unigram (count_j + 1)/(T + k); m=2 bigram: counts of transitions out of the last
    token, (count(x_T -> j) + 1)/(count(x_T -> .) + k), the Dir(1) posterior mean (Bayes-optimal).
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
    """Mean over rows of KL(p || q) = sum_j p_j log(p_j / q_j) for (B, k) distributions."""
    return (torch.xlogy(p, p) - p * torch.log(q.clamp_min(1e-30))).sum(-1).mean()


def make_test_set(k, T, n, n_test, seed):
    """Fixed standard ICL-MC test chains with everything the metrics need precomputed."""
    g = torch.Generator().manual_seed(seed)
    x, P = sample_icl_mc(n_test, T, k, n, "dirichlet", g)
    inp = x[:, :-1]                                                      # (N, T) the model sees this
    p_true = P[torch.arange(len(P)), context_index(inp, k, n)]          # (N, k) law of token T+1
    strat = [ngram_strategy(inp, k, m) for m in range(n + 1)]           # uniform .. n-gram
    return dict(x=inp, p_true=p_true, strat=strat, n=n, kl_true_strategy=[kl(p_true, s).item() for s in strat])


@torch.no_grad()
def evaluate(model, test, device, chunk=1024) -> dict:
    """KL(true||model), KL(strategy_m||model) at the last position, and layer 1's attention mass on the
    previous token (distance 1) and at distance 2, averaged over positions, best head."""
    model.eval()
    qs, d1, d2 = [], [], []
    for i in range(0, len(test["x"]), chunk):
        logits, attns = model(test["x"][i:i + chunk].to(device), return_attn=True)
        qs.append(F.softmax(logits[:, -1].float(), -1).cpu())
        a = attns[0].float()                                            # (B, H, T, T) layer 1
        d1.append(a.diagonal(-1, -2, -1).mean((0, 2)).cpu())            # (H,) mass on x_{i-1}
        d2.append(a.diagonal(-2, -2, -1).mean((0, 2)).cpu())            # (H,) mass on x_{i-2}
    q = torch.cat(qs)
    out = {"kl_true_model": kl(test["p_true"], q).item()}
    for m, s in enumerate(test["strat"]):
        out[f"kl_{STRATEGY_NAMES[m]}_model"] = kl(s, q).item()
    out["prev_token_attn"] = torch.stack(d1).mean(0).max().item()
    out["prev2_token_attn"] = torch.stack(d2).mean(0).max().item()
    return out


def crossing(evals, lo, hi):
    """Step at which KL(hi||model) first drops below KL(lo||model), interpolated linearly between the
    two evaluations around it; None if it never does."""
    prev = None
    for step, res in evals:
        d = res[f"kl_{hi}_model"] - res[f"kl_{lo}_model"]
        if d < 0:
            if prev is None:
                return float(step)
            s0, d0 = prev
            return s0 + (step - s0) * d0 / (d0 - d)
        prev = (step, d)
    return None


def fmt_eval(step, res, n):
    """One log line; 'closest' is the strategy nearest the model (the paper shades Fig. 1 by it)."""
    names = STRATEGY_NAMES[:n + 1]
    parts = [f"KL(true||m) {res['kl_true_model']:.4f}"] + [f"{s} {res[f'kl_{s}_model']:.4f}" for s in names]
    closest = min(names, key=lambda s: res[f"kl_{s}_model"])
    return f"  step {step:5d} | " + " | ".join(parts) + f" | attn@1 {res['prev_token_attn']:.3f} | closest: {closest}"


def train_transformer(cfg, test, k, n, prior, steps, lr, seed, desc, mix_p=0.5, stop_after=None, verbose=False):
    """A fresh transformer trained on `prior` chains and evaluated on the standard test chains `test`.
    stop_after: stop once the (n-1)-gram -> n-gram crossing lies this many steps back (None: never)."""
    model = make_transformer(cfg, k, n, seed)
    stream = chain_stream(cfg.batch, cfg.T, k, n, prior, torch.Generator().manual_seed(seed + 1), cfg.device, mix_p)

    def eval_fn(m, step):
        res = evaluate(m, test, cfg.device)
        if verbose:
            common.print0(fmt_eval(step, res, n))
        return res

    lo, hi = STRATEGY_NAMES[n - 1], STRATEGY_NAMES[n]
    stop = None if stop_after is None else (
        lambda ev: (c := crossing(ev, lo, hi)) is not None and ev[-1][0] - c >= stop_after)
    return model, train(model, adamw(model, lr, cfg), cfg, stream, steps, desc, eval_fn, stop)

# -----------------------------------------------------------------------------
# Experiments: one per claim; each returns (metrics, curves for the figure)


def exp_phases(cfg, test, seed):
    """Claim 1 + mechanism: uniform -> unigram plateau -> abrupt drop to the bigram (Bayes) predictor, while
    layer 1 becomes a previous-token head."""
    model, hist = train_transformer(cfg, test, cfg.k, 2, cfg.prior, cfg.iters, cfg.lr, seed,
                                    f"main k={cfg.k} seed {seed}", verbose=True)
    if not common.is_main():
        return {}, None
    ev, ref, fin = hist["evals"], test["kl_true_strategy"], hist["evals"][-1][1]
    uni, bi = crossing(ev, "uniform", "unigram"), crossing(ev, "unigram", "bigram")
    before = [r["prev_token_attn"] for s, r in ev if bi is None or s < bi]
    m = {common.mkey("kl_true", s, "ref"): ref[i] for i, s in enumerate(STRATEGY_NAMES[:3])}
    m.update({common.mkey("kl_to_model", s, "final"): fin[f"kl_{s}_model"] for s in STRATEGY_NAMES[:3]})
    m.update({"kl_true/transformer/final": fin["kl_true_model"],
              "phase_step/unigram/main": math.nan if uni is None else uni,
              "phase_step/bigram/main": math.nan if bi is None else bi,
              "reached/bigram/main": float(bi is not None),
              "prev_token_attn/main/before": max(before), "prev_token_attn/main/final": fin["prev_token_attn"],
              "n_params/transformer/main": common.count_params(model)})
    return m, ev


def exp_mixture(cfg, seed):
    """Claim 2: unigram (i.i.d.) chains mixed into doubly-stochastic ones delay the bigram solution. Fraction p
    trains mix_ds_iters/(1-p) steps, so every run sees the same number of doubly-stochastic (DS) chains;
    the transition is then compared at equal DS chains and, from the same runs, at equal steps."""
    test = make_test_set(cfg.mix_k, cfg.T, 2, cfg.n_test, cfg.test_seed + 1)
    plan = [("standard", "dirichlet", 0.0)] if cfg.mix_standard else []
    plan += [(f"p{p:g}", "mix", p) for p in cfg.mix_fracs]
    m, curves = {}, {}
    for name, prior, p in plan:
        steps = math.ceil(cfg.mix_ds_iters / (1 - p))
        _, hist = train_transformer(cfg, test, cfg.mix_k, 2, prior, steps, cfg.lr, seed, f"k={cfg.mix_k} {name}",
                                    mix_p=p, stop_after=cfg.eval_every if cfg.mix_stop else None)
        if not common.is_main():
            continue
        ev = hist["evals"]
        t = crossing(ev, "unigram", "bigram")
        ds = 0.0 if prior == "dirichlet" else 1 - p                    # fraction of DS chains in a batch
        m[common.mkey("transition_step", "mix", name)] = math.nan if t is None else t
        m[common.mkey("reached", "mix", name)] = float(t is not None)
        if ds:
            m[common.mkey("transition_ds_kseq", "mix", name)] = math.nan if t is None else t * cfg.batch * ds / 1000
        curves[name] = (p, ds, ev)
    for name in (nm for nm in curves if "p0" in curves and nm not in ("p0", "standard")):   # delay vs p = 0
        for f in ("step", "ds_kseq"):
            m[common.mkey(f"delay_{f}", "mix", name)] = (m[common.mkey(f"transition_{f}", "mix", name)]
                                                         - m[common.mkey(f"transition_{f}", "mix", "p0")])
    return m, (curves, test["kl_true_strategy"])


def exp_trigram(cfg, seed):
    """Claim 3 (n-grams): on trigram chains the model passes uniform -> unigram -> bigram -> trigram."""
    test = make_test_set(cfg.k, cfg.T, 3, cfg.n_test, cfg.test_seed + 2)
    _, hist = train_transformer(cfg, test, cfg.k, 3, "dirichlet", cfg.trigram_iters, cfg.trigram_lr, seed,
                                f"trigram k={cfg.k}")
    if not common.is_main():
        return {}, None
    ev, ref = hist["evals"], test["kl_true_strategy"]
    m = {common.mkey("kl_true", s, "trigram_ref"): ref[i] for i, s in enumerate(STRATEGY_NAMES)}
    m["kl_true/transformer/trigram_final"] = ev[-1][1]["kl_true_model"]
    for lo, hi in zip(STRATEGY_NAMES, STRATEGY_NAMES[1:]):
        c = crossing(ev, lo, hi)
        m[common.mkey("phase_step", hi, "trigram")] = math.nan if c is None else c
    return m, (ev, ref)


def half_rise(steps, ys):
    """Step (interpolated) at which ys first covers half of its change from the first to the last value."""
    target = ys[0] + 0.5 * (ys[-1] - ys[0])
    sign = 1.0 if ys[-1] >= ys[0] else -1.0
    for i in range(1, len(ys)):
        if sign * (ys[i] - target) >= 0:
            a, b = ys[i - 1], ys[i]
            return steps[i - 1] + (steps[i] - steps[i - 1]) * ((target - a) / (b - a) if b != a else 1.0)
    return math.nan


def diag_gap(W: torch.Tensor) -> float:
    """Mean diagonal minus mean off-diagonal entry of a (k, k) matrix: how far layer 2 is along c * I."""
    k = W.shape[0]
    return (W.diag().mean() - (W.sum() - W.diag().sum()) / (k * (k - 1))).item()


def exp_minimal(cfg, test, seed):
    """Claim 4 (theory): in the minimal model the 2nd layer (W, diagonal gap) moves before the 1st (v: attention
    on the previous token); the gradient to v grows with how diagonal W already is."""
    torch.manual_seed(seed)
    model = MinimalModel(cfg.k, cfg.T).to(cfg.device)
    opt = torch.optim.SGD([{"params": [model.W], "lr": cfg.minimal_lr_w}, {"params": [model.v], "lr": cfg.minimal_lr_v}])
    stream = chain_stream(cfg.minimal_batch, cfg.T, cfg.k, 2, "dirichlet", torch.Generator().manual_seed(seed + 2), cfg.device)

    def eval_fn(mdl, step):
        res = evaluate(mdl, test, cfg.device)
        res["W_gap"] = diag_gap(mdl.W.detach())
        return res

    hist = train(model, opt, cfg, stream, cfg.minimal_iters, f"minimal seed {seed}", eval_fn,
                 every=max(1, cfg.eval_every // 2))   # layer 2 moves within the first few dozen steps
    if not common.is_main():
        return {}, None
    ev = hist["evals"]
    steps = [s for s, _ in ev]
    hw = half_rise(steps, [r["W_gap"] for _, r in ev])
    hv = half_rise(steps, [r["prev_token_attn"] for _, r in ev])
    bi = crossing(ev, "unigram", "bigram")
    m = {"half_rise_step/minimal/W": hw, "half_rise_step/minimal/v": hv, "order/minimal/W_first": float(hw < hv),
         "kl_true/minimal/final": ev[-1][1]["kl_true_model"],
         "phase_step/bigram/minimal": math.nan if bi is None else bi}
    return m, ev

# -----------------------------------------------------------------------------
# Run: every experiment for one seed, then over seeds: tables, JSON, figure


def run_seed(cfg):
    t0, timings, curves = time.time(), {}, {}
    stages = common.Stages({"main": cfg.iters, "mixture": sum(cfg.mix_ds_iters / (1 - p) for p in cfg.mix_fracs) * 0.6,
                            "trigram": 2 * cfg.trigram_iters, "minimal": cfg.minimal_iters / 4})
    test = make_test_set(cfg.k, cfg.T, 2, cfg.n_test, cfg.test_seed)
    metrics = {}
    for name, fn, on in (("main", lambda: exp_phases(cfg, test, cfg.seed), True),
                         ("mixture", lambda: exp_mixture(cfg, cfg.seed), bool(cfg.mix_fracs)),
                         ("trigram", lambda: exp_trigram(cfg, cfg.seed), cfg.trigram_iters > 0),
                         ("minimal", lambda: exp_minimal(cfg, test, cfg.seed), cfg.minimal_iters > 0)):
        if on:
            with stages(name):
                t = time.time()
                m, curves[name] = fn()
                metrics.update(m)
                timings[name] = round(time.time() - t, 1)
    timings["seed_total"] = round(time.time() - t0, 1)
    return metrics, {"curves": curves, "timings": timings}


def verdict(runs, key, unit, digits=0):
    """'+329 +- 546 steps (95% CI, 3 seeds): no clear difference' for a per-seed delay (Student-t interval)."""
    vals = [r[key] for r in runs.per_seed if key in r and not math.isnan(r[key])]
    m, s = common.mean_std(vals) if vals else (math.nan, math.nan)
    if len(vals) < 2:
        return f"{common.fmt(m, digits)} {unit} (one seed or no transition: no interval)"
    t = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26}   # by seeds (df + 1)
    h = t.get(len(vals), 2.0 if len(vals) < 30 else 1.96) * s / math.sqrt(len(vals))
    word = "later" if m - h > 0 else "earlier" if m + h < 0 else "no clear difference"
    return f"{m:+.{digits}f} +- {h:.{digits}f} {unit} (95% CI, {len(runs.seeds)} seeds): {word}"


def print_tables(cfg, runs):
    c, mean, n = runs.cell, runs.mean, len(runs.seeds)
    rows = [["KL(true||model), final", "ends near the bigram line", c("kl_true/transformer/final", 4)],
            ["KL(true||bigram): Bayes reference", "-", c("kl_true/bigram/ref", 4)],
            ["KL(true||unigram): plateau reference", "-", c("kl_true/unigram/ref", 4)],
            ["KL(bigram||model), final", "-> 0", c("kl_to_model/bigram/final", 4)],
            ["KL(unigram||model), final", "-", c("kl_to_model/unigram/final", 4)],
            ["unigram phase from step", "after a uniform start", c("phase_step/unigram/main", 0)],
            ["bigram phase from step", f"abrupt; ~1000 (64k chains) at lr 5e-4", c("phase_step/bigram/main", 0)],
            ["seeds reaching the bigram phase", "-", f"{mean['reached/bigram/main'] * n:.0f}/{n}"],
            ["layer-1 attention on x_(t-1), before -> final", "diffuse -> peaked",
             f"{c('prev_token_attn/main/before')} -> {c('prev_token_attn/main/final')}"]]
    common.print_table(rows, [f"quantity (k={cfg.k}, T={cfg.T}, lr {cfg.lr:g}, {n} seed(s))", "paper", "ours"],
                       f"{NAME} ({cfg.preset}): phases of in-context learning of Markov chains")
    if cfg.mix_fracs:
        rows = []
        for name in (["standard"] if cfg.mix_standard else []) + [f"p{p:g}" for p in cfg.mix_fracs]:
            p = 0.0 if name == "standard" else float(name[1:])
            rows.append([name if name == "standard" else f"p={p:g}", math.ceil(cfg.mix_ds_iters / (1 - p)),
                         c(common.mkey("transition_step", "mix", name), 0),
                         c(common.mkey("transition_ds_kseq", "mix", name), 1),
                         f"{mean[common.mkey('reached', 'mix', name)] * n:.0f}/{n}"])
        common.print_table(rows, ["training chains (p = unigram fraction)", "steps", "transition step",
                                  "DS chains at transition (k)", "reached"],
                           f"mixture (k={cfg.mix_k}), tested on standard ICL-MC; paper: more unigram data, later bigrams")
        for name in [f"p{p:g}" for p in cfg.mix_fracs if p > 0 and 0.0 in cfg.mix_fracs]:
            common.print0(f"{name} vs p0: at equal steps {verdict(runs, common.mkey('delay_step', 'mix', name), 'steps')}; "
                          f"at equal DS chains {verdict(runs, common.mkey('delay_ds_kseq', 'mix', name), 'k chains', 1)}")
    if cfg.minimal_iters:
        rows = [["layer 2 (W diagonal gap) half-way, step", c("half_rise_step/minimal/W", 0)],
                ["layer 1 (v: attention on x_(t-1)) half-way, step", c("half_rise_step/minimal/v", 0)],
                ["seeds where layer 2 moves first", f"{mean['order/minimal/W_first'] * n:.0f}/{n}"],
                ["bigram phase from step", c("phase_step/bigram/minimal", 0)],
                ["KL(true||model), final", c("kl_true/minimal/final", 4)]]
        common.print_table(rows, [f"minimal model, SGD lr_W {cfg.minimal_lr_w:g}, lr_v {cfg.minimal_lr_v:g}",
                                  "ours"], "minimal model (paper: the second layer learns first)")
    if cfg.trigram_iters:
        rows = [[f"{s} stage from step", c(common.mkey("phase_step", s, "trigram"), 0),
                 c(common.mkey("kl_true", s, "trigram_ref"), 4)] for s in STRATEGY_NAMES[1:]]
        rows.append(["model, final", "-", c("kl_true/transformer/trigram_final", 4)])
        common.print_table(rows, ["trigram chains (n=3)", "step", "KL(true||.)"],
                           "trigrams (paper: uniform -> unigram -> bigram -> trigram)")


def plot_figure(cfg, runs):
    """Six panels: (a) phases of the main run, mean +- std over seeds, phase steps as mean +- std; (b) layer-1
    previous-token attention; (c, d) the mixture runs against doubly-stochastic chains seen and against
    steps; (e) the minimal model's two layers; (f) the trigram hierarchy. Saved after the JSON."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the figure (pip install matplotlib)")
        return None
    fig, axs = plt.subplots(2, 3, figsize=(16, 8.5))
    seeds = [e["curves"] for e in runs.extras]

    def band(ax, evals_per_seed, key, label, color=None, norm=False, **kw):
        n = min(len(ev) for ev in evals_per_seed)
        xs = [s for s, _ in evals_per_seed[0][:n]]
        ys = torch.tensor([[r[key] for _, r in ev[:n]] for ev in evals_per_seed])   # (seeds, evals)
        if norm:   # progress: 0 at the start, 1 at the end of each seed's run
            ys = (ys - ys[:, :1]) / (ys[:, -1:] - ys[:, :1]).abs().clamp_min(1e-12)
        mu, sd = ys.mean(0), ys.std(0) if len(ys) > 1 else torch.zeros(n)
        line, = ax.plot(xs, mu, label=label, color=color, **kw)
        ax.fill_between(xs, mu - sd, mu + sd, color=line.get_color(), alpha=0.2)

    def phase_lines(ax, keys_colors):
        for key, color, label in keys_colors:
            vals = [r[key] for r in runs.per_seed if key in r and not math.isnan(r[key])]
            if vals:
                m, s = common.mean_std(vals)
                ax.axvline(m, color=color, ls="--", lw=1, label=f"{label} {m:.0f} +- {s:.0f}")
                ax.axvspan(m - s, m + s, color=color, alpha=0.1)

    ax = axs[0, 0]
    main = [c["main"] for c in seeds]
    for i, s in enumerate(STRATEGY_NAMES[:3]):
        band(ax, main, f"kl_{s}_model", f"KL({s}||model)", f"C{i}")
    band(ax, main, "kl_true_model", "KL(true||model)", "k", lw=2)
    ax.axhline(runs.mean["kl_true/bigram/ref"], color="C2", ls=":", lw=1, label="KL(true||bigram) (Bayes)")
    phase_lines(ax, [("phase_step/unigram/main", "C1", "unigram from"), ("phase_step/bigram/main", "C2", "bigram from")])
    ax.set(title=f"(a) phases, k={cfg.k}, {len(seeds)} seed(s) (mean +- std)", xlabel="step", ylabel="KL", yscale="log")
    ax = axs[0, 1]
    band(ax, main, "prev_token_attn", "distance 1 (previous token)")
    band(ax, main, "prev2_token_attn", "distance 2")
    phase_lines(ax, [("phase_step/bigram/main", "C2", "bigram from")])
    ax.set(title="(b) layer-1 attention mass by distance", xlabel="step", ylim=(0, 1))
    for ax, axis in ((axs[0, 2], "ds"), (axs[1, 0], "step")):
        for j, c in enumerate(s["mixture"] for s in seeds if s.get("mixture")):
            curves, ref = c
            for i, (name, (p, ds, ev)) in enumerate(curves.items()):
                if axis == "ds" and not ds:
                    continue
                xs = [st * (cfg.batch * ds / 1000 if axis == "ds" else 1) for st, _ in ev]
                ax.plot(xs, [r["kl_true_model"] for _, r in ev], color=f"C{i}", lw=1, label=name if j == 0 else None)
            if j == 0:
                ax.axhline(ref[1], color="grey", ls="--", lw=0.8, label="unigram strategy")
                ax.axhline(ref[2], color="grey", ls=":", lw=0.8, label="bigram (Bayes)")
        ax.set(title=f"({'c' if axis == 'ds' else 'd'}) mixture, k={cfg.mix_k}: one line per seed",
               xlabel="doubly-stochastic training chains (thousands)" if axis == "ds" else "step",
               ylabel="KL(true||model) on standard ICL-MC", yscale="log")
    ax = axs[1, 1]
    if all(s.get("minimal") for s in seeds):
        band(ax, [s["minimal"] for s in seeds], "W_gap", "layer 2: W diagonal - off-diagonal", norm=True)
        band(ax, [s["minimal"] for s in seeds], "prev_token_attn", "layer 1: attention on x_(t-1)", norm=True)
        phase_lines(ax, [("half_rise_step/minimal/W", "C0", "W half-way"), ("half_rise_step/minimal/v", "C1", "v half-way")])
    ax.set(title="(e) minimal model: progress of each layer (0 = init, 1 = end)", xlabel="SGD step")
    ax = axs[1, 2]
    if all(s.get("trigram") for s in seeds):
        ev, ref = seeds[0]["trigram"]
        for i, s in enumerate(STRATEGY_NAMES):
            ax.plot([st for st, _ in ev], [r[f"kl_{s}_model"] for _, r in ev], color=f"C{i}", label=f"KL({s}||model)")
        ax.plot([st for st, _ in ev], [r["kl_true_model"] for _, r in ev], "k", lw=2, label="KL(true||model)")
        ax.set(yscale="log")
    else:
        ax.text(0.5, 0.5, "trigram run: full preset\n(--trigram-iters > 0)", ha="center", va="center")
    ax.set(title=f"(f) trigram chains, seed {runs.seeds[0]}: stage-wise hierarchy", xlabel="step")
    for ax in axs.flat:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(cfg.out, f"{NAME}.png")
    fd, tmp = tempfile.mkstemp(dir=cfg.out, prefix=f".{NAME}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    plt.close(fig)
    common.print0(f"wrote {path}")
    return path


def run(cfg) -> common.SeedRuns:
    t0 = time.time()
    runs = common.over_seeds(cfg, run_seed, NAME)
    if not common.is_main():
        return runs
    print_tables(cfg, runs)
    timings = {k: sum(e["timings"].get(k, 0.0) for e in runs.extras) / len(runs.extras) for k in runs.extras[0]["timings"]}
    history = {f"seed{s}": e["curves"] for s, e in zip(runs.seeds, runs.extras)}
    info = {"metrics": "phase_step/<s>/<run>: step where KL(s||model) first drops below the previous strategy's "
                       "(interpolated between evaluations; nan = never); *_ds_kseq: thousands of doubly-stochastic "
                       "training chains; delay_*: p run minus p=0 run, same seed",
            "timings": "seconds per seed"}
    common.save_results(NAME, cfg, runs, history=history, info=info, timings=timings, wall_time_s=round(time.time() - t0, 1))
    plot_figure(cfg, runs)
    common.print0(f"wall time {time.time() - t0:.1f} s")
    return runs


def main():
    cfg = common.parse_args(Config, PRESETS)
    with common.session(cfg):
        run(cfg)


if __name__ == "__main__":
    main()
