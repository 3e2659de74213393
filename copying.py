"""
Repeat After Me: Transformers are Better than State Space Models at Copying
Jelassi, Brandfonbrener, Kakade, Malach. ICML 2024. arXiv:2402.01032
Official code: github.com/sjelassi/transformers_ssm_copy (synthetic_exps/)

Finding: a transformer learns to copy random strings from far fewer examples than a fixed-state model
(LSTM, Mamba), and with Hard-ALiBi it copies strings longer than any it saw; a fixed state cannot hold
an arbitrary string (Thm 2.7), an n-gram lookup can (Thm 2.3).
Measured (quick, one CPU thread, 1553 s for seeds 0-2): examples to 90% exact at L20: Hard-ALiBi 26.7k +- 6.7k,
NoPE 114.7k +- 8.1k, LSTM/Mamba not in 51.2k (Mamba 209k +- 16k with --steps 12800); at L40 Hard-ALiBi 0.53, others 0.

    python copying.py --preset smoke                 # seconds (what pytest runs)
    python copying.py                                # quick on CPU, full on CUDA
    python copying.py --device cuda                  # full: packed rows, train L <= 50, test to 1000
    python copying.py --seeds 3                      # mean +- std over seeds 0, 1, 2
    torchrun --standalone --nproc_per_node=2 copying.py --preset smoke --device cpu

Glossary (ours -> paper):
    hard_alibi  T_hard_alibi: windowed heads see their last w tokens (windows 1..4), the rest NoPE
    nope/alibi  T_nope / T_alibi        lstm, mamba  the GSSMs (mamba: selective SSM, Gu & Dao 2023)
    L, D        string length, alphabet size; the task is "$x|x." and only "x." is scored
    examples    training strings seen (Fig. 1a's x axis); exact match = string-level accuracy
    state bits  the GSSM's state at fp32; Thm 2.7 allows copying only while L*log2(D) <= bits
Does not include: the pretrained Pythia/Mamba experiments (C4, SQuAD, phone book need hub weights),
160M-parameter models, the duplicate-n-gram study. Evaluation is teacher-forced (official code): for
exact match that equals greedy decoding; char accuracy after a first error is scored on the true prefix.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import common  # first: it reports a missing package in one line

import torch
import torch.nn as nn
import torch.nn.functional as F

NAME = "copying"
TRANSFORMERS = ("nope", "learned", "alibi", "hard_alibi", "rope")
MODELS = TRANSFORMERS + ("lstm", "mamba")
LOOKUPS = ("prefix_ngram", "suffix_ngram")

# -----------------------------------------------------------------------------
# Config


@dataclass
class Config(common.BaseConfig):
    models: tuple[str, ...] = ("hard_alibi", "nope", "lstm", "mamba")  # copy models: nope | learned |
    # alibi | hard_alibi | rope | lstm | mamba
    vocab: int = 26                 # alphabet size D, 1..26 (letters a..z)
    train_min_len: int = 1          # training string lengths L ~ U{train_min_len..train_max_len}
    train_max_len: int = 20         # longest training length; exact match here is the in-distribution score
    eval_lens: tuple[int, ...] = (10, 20, 30, 40, 60, 100)  # copy test lengths
    eval_n: int = 100               # test strings per length
    val_n: int = 100                # validation strings (length train_max_len) per training probe
    eval_every: int = 50            # probe validation exact match every this many steps
    stop_acc: float = 0.9           # a model stops training once the probe reaches this (> 1: never)
    steps: int = 1600               # step budget of Hard-ALiBi, LSTM and Mamba (same batch: same examples)
    fit_steps: int = 4000           # step budget of the other transformers (nope, alibi, ...): they train
    # until they fit train_max_len too, so that length generalisation is read on a fitted model (3200 left
    # NoPE short of 90% validation exact match at seed 1)
    batch: int = 32                 # global batch in rows (split over torchrun processes)
    pack: int = 0                   # 0: one example per row, one length per batch (1.6x faster on CPU than
    # padded mixed lengths, as sample-efficient); N: official packing into rows of N tokens
    lr: float = 2e-3                # AdamW peak learning rate (linear warmup, linear decay to 0)
    fit_lr: float = 3e-3            # peak lr of the other transformers (nope, alibi, ...); 3e-3: NoPE hit
    # 90% validation exact match after 88.0k examples vs 92.8k at 2e-3 (seed 0, 3200-step schedule)
    warmup: int = 100               # warmup steps
    weight_decay: float = 0.1       # AdamW decay on matrices (not norms, biases, A_log, D)
    grad_clip: float = 1.0          # gradient norm clip
    t_dim: int = 128                # transformer width
    t_layers: int = 2               # transformer depth
    t_heads: int = 8                # attention heads
    t_windows: tuple[int, ...] = (1, 2, 3, 4, 0, 0, 0, 0)  # Hard-ALiBi window per head (0 = a NoPE head)
    nope_dim: int = 96              # NoPE width and depth (0: as t_dim / t_layers): a NoPE model must find
    nope_layers: int = 4            # positions from the causal mask; 4 layers at the same parameter count
    t_init: str = "fan_in"          # fan_in (PyTorch's default) | gpt2 (N(0, 0.02): much slower at d=128)
    lstm_dim: int = 224             # LSTM width (224: the transformer's parameter count)
    lstm_layers: int = 1            # LSTM depth
    mamba_dim: int = 176            # Mamba width d (inner width 2d); 176: the transformer's parameter count
    mamba_layers: int = 2           # Mamba depth
    mamba_state: int = 8            # Mamba d_state N
    scan: str = "auto"              # Mamba scan: auto (parallel on CUDA, sequential on CPU) | sequential |
    # parallel
    lookup_models: tuple[str, ...] = ("hard_alibi", "lstm", "mamba")  # n-gram lookup models (empty: skip)
    lookup_tasks: tuple[str, ...] = ("suffix_ngram",)  # suffix_ngram ($x|gy.) | prefix_ngram ($g|x|y.)
    ngram: int = 3                  # lookup key length n
    answer_len: int = 5             # tokens after the key to output
    lookup_max_len: int = 30        # lookup training strings ~ U{ngram+answer_len+2 .. lookup_max_len}
    lookup_eval_lens: tuple[int, ...] = (20, 30, 50, 100)  # lookup test lengths
    lookup_steps: int = 400         # training steps of each lookup model
    hash_len: int = 100             # string length for the hash-copy oracle (Thm 2.3)
    hash_ns: tuple[int, ...] = (1, 2, 3, 4, 5, 6)  # n-gram sizes for the oracle
    hash_trials: int = 2000         # random strings for the oracle
    bench_scan: bool = False        # only time the two Mamba scans (L = 64, 512, 2048) and exit

    POSITIVE = ("vocab", "train_min_len", "train_max_len", "eval_n", "val_n", "steps", "fit_steps", "t_dim",
                "t_layers", "t_heads", "lstm_dim", "lstm_layers", "mamba_dim", "mamba_layers", "mamba_state",
                "ngram", "answer_len", "lookup_steps", "hash_len", "hash_trials", "eval_lens", "lookup_eval_lens",
                "hash_ns")
    MAY_BE_EMPTY = ("lookup_models", "lookup_tasks")
    GLOBAL_BATCH = ("batch",)

    def __post_init__(self):
        self.models, self.lookup_models = tuple(self.models), tuple(m for m in self.lookup_models if m)
        self.lookup_tasks = tuple(t for t in self.lookup_tasks if t)
        bad = [m for m in self.models + self.lookup_models if m not in MODELS]
        if bad or not self.models:
            raise ValueError(f"unknown or no model(s) {bad}; choose from {', '.join(MODELS)}")
        if [t for t in self.lookup_tasks if t not in LOOKUPS]:
            raise ValueError(f"--lookup-tasks must be among {', '.join(LOOKUPS)}")
        if not 1 <= self.vocab <= 26:
            raise ValueError("--vocab must be in 1..26 (letters a..z)")
        if self.train_min_len > self.train_max_len:
            raise ValueError("--train-min-len must be <= --train-max-len")
        if self.pack and self.pack < 2 * self.train_max_len + 3:
            raise ValueError(f"--pack {self.pack} cannot hold one example of length {self.train_max_len}")
        for dim, heads in ((self.t_dim, self.t_heads), (self.nope_dim or self.t_dim, self.t_heads)):
            if dim % heads:
                raise ValueError(f"transformer width {dim} is not divisible by --t-heads {self.t_heads}")
        if len(self.t_windows) != self.t_heads:
            raise ValueError("--t-windows needs one entry per head")
        if self.scan not in ("auto", "sequential", "parallel"):
            raise ValueError("--scan must be auto, sequential or parallel")
        if self.t_init not in ("fan_in", "gpt2"):
            raise ValueError("--t-init must be fan_in or gpt2")
        if self.lookup_models and self.lookup_tasks and self.lookup_max_len < self.ngram + self.answer_len + 2:
            raise ValueError("--lookup-max-len must be >= ngram + answer_len + 2")


PRESETS = {
    "smoke": dict(vocab=10, train_min_len=2, train_max_len=8, eval_lens=(4, 8, 16), eval_n=32, val_n=32,
                  eval_every=50, steps=200, fit_steps=200, batch=16, lr=1e-2, fit_lr=1e-2, warmup=10, t_dim=64,
                  t_heads=4, t_windows=(1, 2, 0, 0), nope_dim=64, nope_layers=2, lstm_dim=64, mamba_dim=64,
                  mamba_layers=1, mamba_state=4, lookup_models=("hard_alibi", "mamba"), lookup_max_len=14,
                  lookup_eval_lens=(14,), lookup_steps=20, hash_trials=200),
    "quick": dict(),
    "full": dict(models=("hard_alibi", "alibi", "nope", "lstm", "mamba"), train_min_len=5, train_max_len=50,
                 eval_lens=(50, 100, 200, 400, 700, 1000), eval_n=128, val_n=128, eval_every=100, steps=4000,
                 fit_steps=4000, stop_acc=0.99, pack=220, batch=32, lr=5e-4, fit_lr=5e-4, warmup=200, t_dim=256,
                 t_layers=4, nope_dim=0, nope_layers=0, lstm_dim=512, lstm_layers=2, mamba_dim=256, mamba_layers=4,
                 mamba_state=16, lookup_models=("hard_alibi", "lstm", "mamba"),
                 lookup_tasks=("suffix_ngram", "prefix_ngram"), lookup_steps=2000, lookup_eval_lens=(30, 50, 75, 100),
                 hash_len=300),
}

# -----------------------------------------------------------------------------
# Data: tokens a..z then $ (BOS) | (separator) . (EOS) * (PAD), as in the official code


def make_tokenizer(vocab: int = 26) -> common.Tokenizer:
    return common.Tokenizer([chr(ord("a") + i) for i in range(vocab)] + ["$", "|", ".", "*"])


def concat_ragged(parts, pad_id: int):
    """Concatenate per-row ragged segments. parts: [(tokens (B, W), lengths (B,), scored: bool)].

    Returns ids (B, T) right-padded with pad_id and a bool mask of the scored tokens (B, T).
    """
    B, dev = parts[0][0].shape[0], parts[0][0].device
    T = int(sum(p[1] for p in parts).max())
    ids = torch.full((B, T), pad_id, dtype=torch.long, device=dev)
    scored = torch.zeros((B, T), dtype=torch.bool, device=dev)
    off = torch.zeros(B, dtype=torch.long, device=dev)
    for toks, lens, is_scored in parts:
        rows, c = (torch.arange(toks.shape[1], device=dev)[None, :] < lens[:, None]).nonzero(as_tuple=True)
        ids[rows, off[rows] + c] = toks[rows, c]
        scored[rows, off[rows] + c] = is_scored
        off = off + lens
    return ids, scored


def ngram_hashes(x, n):
    """(B, L) -> (B, L-n+1) integer code of each n-gram x[t:t+n] (base 64: exact for ids < 64, n <= 10)."""
    npos = x.shape[1] - n + 1
    h = torch.zeros(x.shape[0], npos, dtype=torch.long, device=x.device)
    for i in range(n):
        h = h * 64 + x[:, i:i + npos]
    return h


def sample_unique_ngram_starts(x, lens, vocab, n, after, gen, tries=10):
    """For each row, the start t of an n-gram occurring exactly once in x[:len], with t + n + after <= len.

    Rows without one are resampled (the official code retries 10 times too). Returns (x, t).
    """
    dev, npos = x.device, x.shape[1] - n + 1
    at = torch.arange(npos, device=dev)[None, :]
    for _ in range(tries):
        h = ngram_hashes(x, n)                                           # (B, npos)
        valid = at <= (lens[:, None] - n)
        unique = ((h[:, :, None] == h[:, None, :]) & valid[:, None, :] & valid[:, :, None]).sum(-1) == 1
        cand = unique & (at <= (lens[:, None] - n - after))
        ok = cand.any(1)
        if bool(ok.all()):
            break
        x = torch.where(ok[:, None], x, torch.randint(0, vocab, x.shape, generator=gen).to(dev))
    score = torch.rand(cand.shape, generator=gen).to(dev).masked_fill(~cand, -1.0)
    return x, score.argmax(1)


def make_examples(task, lens, vocab, gen, ngram=3, answer_len=5):
    """A batch of task strings, one per row: ids (B, T) and the scored-token mask (B, T).

        copy          $ x | x .          e.g. $ a b c | a b c .     scored: a b c .
        prefix_ngram  $ g | x | y .      g an n-gram of x, y the answer_len tokens after g in x
        suffix_ngram  $ x | g y .        scored: y .   (g itself is not scored)
    """
    tok = make_tokenizer(vocab)
    B, dev = lens.shape[0], lens.device
    x = torch.randint(0, vocab, (B, int(lens.max())), generator=gen).to(dev)
    one = torch.ones(B, dtype=torch.long, device=dev)
    bos, sep, eos = ((torch.full((B, 1), tok[c], device=dev), one) for c in "$|.")
    if task == "copy":
        return concat_ragged([(*bos, False), (x, lens, False), (*sep, False), (x, lens, True), (*eos, True)],
                             tok["*"])
    x, t = sample_unique_ngram_starts(x, lens, vocab, ngram, answer_len, gen)
    ar = torch.arange(max(ngram, answer_len), device=dev)
    g = x.gather(1, t[:, None] + ar[None, :ngram])
    y = x.gather(1, t[:, None] + ngram + ar[None, :answer_len])
    gl, yl = one * ngram, one * answer_len
    if task == "prefix_ngram":
        parts = [(*bos, False), (g, gl, False), (*sep, False), (x, lens, False), (*sep, False), (y, yl, True)]
    else:
        parts = [(*bos, False), (x, lens, False), (*sep, False), (g, gl, False), (y, yl, True)]
    return concat_ragged(parts + [(*eos, True)], tok["*"])


def pack_rows(ids, scored, rows, width, pad_id):
    """Official CopyDataset layout: examples (one per row of ids) laid back to back into `rows` rows of
    `width` tokens; the example that overflows a row is cut and its loss mask zeroed."""
    K = ids.shape[0] // rows
    ex_len = (ids != pad_id).sum(1).view(rows, K)
    ex, sc = ids.view(rows, K, -1), scored.view(rows, K, -1)
    off = ex_len.cumsum(1) - ex_len                                      # (rows, K) start of each example
    cols = torch.arange(ex.shape[-1], device=ids.device)
    pos = off[..., None] + cols                                          # (rows, K, Te)
    inside = (cols < ex_len[..., None]) & (pos < width)
    fits = (off + ex_len <= width)[..., None]
    out = torch.full((rows, width), pad_id, dtype=torch.long, device=ids.device)
    out_sc = torch.zeros((rows, width), dtype=torch.bool, device=ids.device)
    b, k, c = inside.nonzero(as_tuple=True)
    out[b, pos[b, k, c]] = ex[b, k, c]
    out_sc[b, pos[b, k, c]] = (sc & fits)[b, k, c]
    return out, out_sc


def to_lm_batch(ids, scored):
    """(input, target) for next-token training; targets outside the scored tokens are -100."""
    return ids[:, :-1], ids[:, 1:].masked_fill(~scored[:, 1:], -100)


def training_batch(task, cfg: Config, gen, device):
    """One global batch (input, target). Unpacked: one example per row, one length L ~ U{lo..hi} for the
    whole batch (no padding; the length distribution is unchanged). cfg.pack > 0: official packing."""
    lo = cfg.train_min_len if task == "copy" else cfg.ngram + cfg.answer_len + 2
    hi = cfg.train_max_len if task == "copy" else cfg.lookup_max_len
    if cfg.pack:
        per_row = cfg.pack // (2 * lo + 3) + 1                           # enough examples to fill a row
        lens = torch.randint(lo, hi + 1, (cfg.batch * per_row,), generator=gen).to(device)
    else:
        lens = torch.randint(lo, hi + 1, (1,), generator=gen).to(device).expand(cfg.batch)
    ids, scored = make_examples(task, lens, cfg.vocab, gen, cfg.ngram, cfg.answer_len)
    if cfg.pack:
        ids, scored = pack_rows(ids, scored, cfg.batch, cfg.pack, make_tokenizer(cfg.vocab)["*"])
    return to_lm_batch(ids, scored)

# -----------------------------------------------------------------------------
# Models: idx (B, T) -> logits (B, T, V). Transformers are common.GPT (attention: common.CausalSelfAttention).


class LSTMLM(nn.Module):
    """Embedding -> nn.LSTM -> linear head (official models/lstm.py, without its no-op init)."""

    def __init__(self, vocab_size, d, layers):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, d)
        self.lstm = nn.LSTM(d, d, num_layers=layers, batch_first=True)
        self.head = nn.Linear(d, vocab_size)

    def forward(self, idx):
        return self.head(self.lstm(self.emb(idx))[0])                   # (B, T, V)


def selective_scan_sequential(u, delta, A, B, C):
    """The selective SSM (Mamba's S6) one token at a time, the state h kept as (batch, N, E):
        h_t = exp(delta_t A) * h_{t-1} + delta_t B_t u_t ;  y_t = C_t h_t
    u, delta: (B, T, E); A: (E, N); B, C: (B, T, N) -> y (B, T, E). Discretising inside the loop keeps every
    tensor a cache-sized (B, N, E) slice: a quick Mamba training step takes 76 ms on one CPU thread, 115 ms
    when the (B, T, E, N) tensors are built first."""
    At, h, ys = A.T, u.new_zeros(u.shape[0], A.shape[1], A.shape[0]), []  # At (N, E), h (B, N, E)
    for u_t, d_t, B_t, C_t in zip(u.unbind(1), delta.unbind(1), B.unbind(1), C.unbind(1)):  # unbind: no
        h = torch.exp(d_t[:, None, :] * At) * h + B_t[:, :, None] * (d_t * u_t)[:, None, :]  # per-step zero grads
        ys.append((C_t[:, None, :] @ h).squeeze(1))                      # (B, E)
    return torch.stack(ys, 1)                                            # (B, T, E)


def selective_scan_parallel(u, delta, A, B, C):
    """The same recurrence by a Hillis-Steele scan over (B, T, E, N) tensors: log2(T) steps of
    (a, b) o (a', b') = (aa', a'b + b'). Decay products stay in (0, 1], so it is as stable as the loop."""
    a = torch.exp(delta[..., None] * A)                                  # (B, T, E, N)  A_bar = exp(Delta A)
    b = (delta * u)[..., None] * B[:, :, None, :]                        # (B, T, E, N)  B_bar x = Delta B x
    shift = 1
    while shift < a.shape[1]:
        a_prev = F.pad(a[:, :-shift], (0, 0, 0, 0, shift, 0), value=1.0)  # identity element (1, 0)
        b_prev = F.pad(b[:, :-shift], (0, 0, 0, 0, shift, 0), value=0.0)
        b, a, shift = a * b_prev + b, a * a_prev, shift * 2
    return (b * C[:, :, None, :]).sum(-1)                                # (B, T, E)


class MambaBlock(nn.Module):
    """Mamba's selective SSM block (Gu & Dao 2023), pure PyTorch; see johnma2006/mamba-minimal.

    Official implementation: state-spaces/mamba, mamba_ssm/modules/mamba_simple.py.
    d model width, E = expand*d inner channels, N = d_state, R = dt_rank = ceil(d/16).
    forward(x (B, T, d)) -> (B, T, d); step(x (B, d), state) -> (y (B, d), state) for recurrent decoding.
    """

    def __init__(self, d, d_state=16, expand=2, d_conv=4, scan="auto"):
        super().__init__()
        E, self.R, self.N, self.scan = expand * d, math.ceil(d / 16), d_state, scan
        self.in_proj = nn.Linear(d, 2 * E, bias=False)
        self.conv = nn.Conv1d(E, E, d_conv, groups=E, padding=d_conv - 1)
        self.x_proj = nn.Linear(E, self.R + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.R, E)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1).float()).repeat(E, 1))  # (E, N)
        self.D = nn.Parameter(torch.ones(E))
        self.out_proj = nn.Linear(E, d, bias=False)
        dt = torch.exp(torch.rand(E) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        with torch.no_grad():  # dt_proj bias = softplus^-1(dt), dt log-uniform in [1e-3, 0.1]
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def ssm_inputs(self, u):
        """u (B, T, E) after conv + SiLU -> the scan's inputs (u, Delta (B, T, E), A (E, N), B, C (B, T, N))."""
        dt, Bm, Cm = self.x_proj(u).split([self.R, self.N, self.N], -1)
        return u, F.softplus(self.dt_proj(dt)), -self.A_log.exp(), Bm, Cm  # Delta = softplus(dt_proj(.)) > 0

    def forward(self, x):
        T = x.shape[1]
        u, z = self.in_proj(x).chunk(2, -1)                              # (B, T, E) each
        u = F.silu(self.conv(u.transpose(1, 2))[..., :T].transpose(1, 2))  # causal: drop the right pad
        scan = self.scan if self.scan != "auto" else ("parallel" if x.is_cuda else "sequential")
        y = (selective_scan_parallel if scan == "parallel" else selective_scan_sequential)(*self.ssm_inputs(u))
        y = y + u * self.D                                               # y = C h + D x
        return self.out_proj(y * F.silu(z))                              # gated by SiLU(z)

    def step(self, x, state):
        """One token. x (B, d); state = (conv window (B, E, d_conv-1), h (B, E, N))."""
        conv_buf, h = state
        u, z = self.in_proj(x).chunk(2, -1)                              # (B, E)
        window = torch.cat([conv_buf, u[..., None]], -1)                 # (B, E, d_conv)
        u = F.silu((window * self.conv.weight[:, 0]).sum(-1) + self.conv.bias)
        _, delta, A, Bm, Cm = self.ssm_inputs(u[:, None])
        delta, Bm, Cm = delta[:, 0], Bm[:, 0], Cm[:, 0]                  # (B, E), (B, N), (B, N)
        h = torch.exp(delta[..., None] * A) * h + (delta * u)[..., None] * Bm[:, None, :]  # (B, E, N)
        y = (h @ Cm[..., None]).squeeze(-1) + u * self.D
        return self.out_proj(y * F.silu(z)), (window[..., 1:], h)


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class MambaLM(nn.Module):
    """Embedding -> [x + Mamba(RMSNorm(x))] * layers -> RMSNorm -> tied head (MambaLMHeadModel)."""

    def __init__(self, vocab_size, d, layers, d_state, scan="auto"):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, d)
        nn.init.normal_(self.emb.weight, std=0.02)  # as mamba_ssm; N(0, 1) gives huge tied logits
        self.norms = nn.ModuleList([RMSNorm(d) for _ in range(layers)])
        self.layers = nn.ModuleList([MambaBlock(d, d_state, scan=scan) for _ in range(layers)])
        self.norm_f = RMSNorm(d)

    def forward(self, idx):
        x = self.emb(idx)
        for norm, layer in zip(self.norms, self.layers):
            x = x + layer(norm(x))
        return self.norm_f(x) @ self.emb.weight.T                        # (B, T, V)

    def init_state(self, B, device):
        return [(torch.zeros(B, l.D.shape[0], l.conv.kernel_size[0] - 1, device=device),
                 torch.zeros(B, l.D.shape[0], l.N, device=device)) for l in self.layers]

    def step(self, tok, state):
        """Recurrent inference: tok (B,) -> logits (B, V), new state. O(1) memory in the length."""
        x, new = self.emb(tok), []
        for norm, layer, s in zip(self.norms, self.layers, state):
            y, s = layer.step(norm(x), s)
            x = x + y
            new.append(s)
        return self.norm_f(x) @ self.emb.weight.T, new


def build_model(name, cfg: Config, block_size=256) -> nn.Module:
    V = cfg.vocab + 4
    if name == "lstm":
        return LSTMLM(V, cfg.lstm_dim, cfg.lstm_layers)
    if name == "mamba":
        return MambaLM(V, cfg.mamba_dim, cfg.mamba_layers, cfg.mamba_state, cfg.scan)
    nope = name == "nope"
    dim, layers = (cfg.nope_dim or cfg.t_dim, cfg.nope_layers or cfg.t_layers) if nope else (cfg.t_dim, cfg.t_layers)
    windows = cfg.t_windows if name == "hard_alibi" else ()
    return common.GPT(common.GPTConfig(vocab_size=V, block_size=block_size, n_layer=layers, n_head=cfg.t_heads,
                                       n_embd=dim, pos=name, hard_windows=windows, tie_weights=False,
                                       init=cfg.t_init))


def logits_of(model, idx):
    """(B, T, V) logits of any of our models (common.GPT returns (logits, loss))."""
    out = model(idx)
    return out[0] if isinstance(out, tuple) else out


def state_bits(model) -> int:
    """Bits in a GSSM's recurrent state at fp32 (-1 for a transformer, whose KV cache grows with L)."""
    if isinstance(model, MambaLM):
        return sum(l.D.shape[0] * (l.N + l.conv.kernel_size[0] - 1) * 32 for l in model.layers)
    if isinstance(model, LSTMLM):
        return 2 * model.lstm.num_layers * model.lstm.hidden_size * 32      # h and c
    return -1

# -----------------------------------------------------------------------------
# Training: one loop for every model (transformers, LSTM, Mamba)


def train(model, cfg: Config, get_batch, steps, desc="train", probe=None):
    """AdamW, linear warmup + linear decay, masked next-token CE on the scored tokens (answer + EOS).

    get_batch(step) -> (input, target) of the global batch; torchrun ranks take their rows. Every
    cfg.eval_every steps rank 0 calls probe(model) -> {"acc": .., "stop": bool}; all ranks stop together.
    Returns the history: steps, examples seen, loss, and the probe's (examples, acc) curve.
    """
    device = torch.device(cfg.device)
    opt = common.configure_adamw(model, cfg.lr, cfg.weight_decay)
    fwd = common.wrap_ddp(model, device)
    fwd = torch.compile(fwd) if cfg.compile else fwd
    eos = make_tokenizer(cfg.vocab)["."]
    hist, seen, t0 = {"step": [], "loss": [], "curve": []}, 0, time.time()
    bar = common.progress(range(steps), desc)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = common.lr_at(step, steps, cfg.lr, min(cfg.warmup, steps // 5), "linear")
        inp, tgt = get_batch(step)
        seen += int((tgt == eos).sum())                                  # complete examples in the batch
        inp, tgt = common.shard(inp, tgt)                                # this rank's rows
        model.train()
        with common.autocast(device):
            loss = common.token_mean(*common.cross_entropy_sum(logits_of(fwd, inp), tgt))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            hist["step"].append(step + 1)
            hist["loss"].append(common.global_mean(loss))
            bar.set_postfix_str(common.step_log(step + 1, steps, t0, loss=hist["loss"][-1]))
        if probe and ((step + 1) % cfg.eval_every == 0 or step == steps - 1):
            res = probe(model) if common.is_main() else {}
            hist["curve"].append((seen, res.get("acc")))
            if common.broadcast_flag(res.get("stop", False)):
                break
    hist["examples"], hist["steps_run"] = seen, step + 1
    return hist

# -----------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model, task, L, n, cfg: Config, gen, device, batch=None):
    """Teacher-forced argmax at every scored position (the official test_utils) on n fresh strings of
    length L. Returns string accuracy (every answer char right, '.' excluded), char accuracy and the
    test loss (CE per scored token)."""
    model.eval()
    dot = make_tokenizer(cfg.vocab)["."]
    strings = chars = loss = 0.0
    batch = batch or max(1, min(128, 32768 // L))  # bounds Mamba's (B, T, E, N) tensors at long L
    for start in range(0, n, batch):
        b = min(batch, n - start)
        lens = torch.full((b,), L, dtype=torch.long, device=device)
        inp, tgt = to_lm_batch(*make_examples(task, lens, cfg.vocab, gen, cfg.ngram, cfg.answer_len))
        with common.autocast(device):
            logits = logits_of(model, inp)
        pred = logits.argmax(-1)
        loss += common.masked_cross_entropy(logits, tgt).item() * b
        answer = (tgt != -100) & (tgt != dot)
        strings += ((pred == tgt) | ~answer).all(1).float().sum().item()
        chars += (((pred == tgt) & answer).sum(1) / answer.sum(1).clamp(min=1)).sum().item()
    return {"string_acc": strings / n, "char_acc": chars / n, "loss": loss / n}


@torch.no_grad()
def greedy_answer(model, ids, scored):
    """Greedy autoregressive decoding of the scored span (slow reference for the tests)."""
    model.eval()
    out = ids.clone()
    for t in range(int(scored.float().argmax(1).min()), ids.shape[1]):
        nxt = logits_of(model, out[:, :t])[:, -1].argmax(-1)
        out[:, t] = torch.where(scored[:, t], nxt, out[:, t])
    return out


def examples_to(curve, level=0.9):
    """The first point of a probe curve [(examples seen, exact match)] at or above `level`; NaN if none."""
    return next((ex for ex, acc in curve if acc >= level), float("nan"))


def longest_copied(accs: dict, level=0.5) -> int:
    """The longest test length up to which every tested length is copied exactly with prob >= level
    (0 if the shortest already fails): where the model's copying collapses."""
    best = 0
    for L in sorted(accs):
        if accs[L] < level:
            break
        best = L
    return best

# -----------------------------------------------------------------------------
# Theory: the hash-based copy construction (Thm 2.3) and the memory lower bound (Thm 2.7)


def ngram_copy_oracle(x, n):
    """Copy x by the paper's n-gram lookup: after the first n tokens (anchored at '$'), output the
    token that followed the *first* earlier occurrence of the last n tokens written. (B, L) -> (B, L).
    Wrong only when the looked-up n-gram occurs more than once in x."""
    L = x.shape[1]
    if n >= L:
        return x.clone()
    key = ngram_hashes(x, n)[:, :L - n]                                  # key for output i = hash of x[i-n:i]
    first = (key[:, :, None] == key[:, None, :]).float().argmax(-1)      # first occurrence of each key
    return torch.cat([x[:, :n], x.gather(1, first + n)], 1)


def has_repeated_ngram(x, n):
    """(B, L) -> (B,) bool: some n-gram occurs twice in the row (p_rep is its mean over uniform x)."""
    h = ngram_hashes(x, n).sort(1).values
    return (h[:, 1:] == h[:, :-1]).any(1)


def ngram_bound(L, D, n):
    """Lemma 2.4: p_rep < L^2 D^-n."""
    return L ** 2 / D ** n


def gssm_error_lower_bound(bits, L, D):
    """Thm 2.7: a GSSM with 2^bits states errs on copying uniform x in D^L with prob > 1 - 2^bits / D^L."""
    return max(0.0, 1.0 - 2.0 ** (bits - L * math.log2(D)))


def bench_scans(device, lengths=(64, 512, 2048), B=8, E=256, N=16, reps=3) -> dict:
    """Forward time (ms) of the sequential and the parallel scan: why --scan auto picks what it picks."""
    out = {}
    for L in lengths:
        g = torch.Generator().manual_seed(0)
        args = [t.to(device) for t in (torch.randn(B, L, E, generator=g), torch.rand(B, L, E, generator=g),
                                       -torch.rand(E, N, generator=g), torch.randn(B, L, N, generator=g),
                                       torch.randn(B, L, N, generator=g))]
        for name, fn in (("sequential", selective_scan_sequential), ("parallel", selective_scan_parallel)):
            fn(*args)
            torch.cuda.synchronize() if device.type == "cuda" else None
            t0 = time.perf_counter()
            for _ in range(reps):
                fn(*args)
            torch.cuda.synchronize() if device.type == "cuda" else None
            out[common.mkey("scan_ms", name, f"L{L}")] = 1000 * (time.perf_counter() - t0) / reps
    return out

# -----------------------------------------------------------------------------
# Experiments (each returns {metric: number} and, where a figure needs them, curves)


def exp_copy(cfg: Config, device):
    """Fig. 1a + 1b: every model gets the same example budget and stops once its validation exact match
    at train_max_len reaches stop_acc; then exact match at every test length, and the state-size bound."""
    metrics, curves, timings = {}, {}, {}
    block = 2 * max(cfg.eval_lens + cfg.lookup_eval_lens) + cfg.ngram + cfg.answer_len + 8
    for name in cfg.models:
        common.set_seed(cfg.seed)
        model = build_model(name, cfg, max(block, cfg.pack)).to(device)
        gen, vgen = torch.Generator().manual_seed(cfg.seed + 1), torch.Generator().manual_seed(cfg.seed + 999)

        def probe(m):  # validation strings, never the test ones
            acc = evaluate(m, "copy", cfg.train_max_len, cfg.val_n, cfg, vgen, device)["string_acc"]
            return {"acc": acc, "stop": acc >= cfg.stop_acc}

        fit = name in TRANSFORMERS and name != "hard_alibi"
        run_cfg = dataclasses.replace(cfg, lr=cfg.fit_lr) if fit else cfg
        t0 = time.time()
        hist = train(model, run_cfg, lambda s: training_batch("copy", cfg, gen, device),
                     cfg.fit_steps if fit else cfg.steps, f"copy:{name}", probe)
        timings[f"train_s/{name}"] = time.time() - t0
        if not common.is_main():
            continue
        curves[name] = hist["curve"]
        metrics[common.mkey("examples_to_90", name)] = to90 = examples_to(hist["curve"], 0.9)
        metrics[common.mkey("reached_90", name)] = float(to90 == to90)
        metrics[common.mkey("examples", name)] = hist["examples"]
        metrics[common.mkey("params", name)] = common.count_params(model)
        tgen, accs = torch.Generator().manual_seed(cfg.seed + 12345), {}
        for L in cfg.eval_lens:
            r = evaluate(model, "copy", L, cfg.eval_n, cfg, tgen, device)
            accs[L] = metrics[common.mkey("copy_acc", name, f"L{L}")] = r["string_acc"]
            metrics[common.mkey("copy_char_acc", name, f"L{L}")] = r["char_acc"]
            metrics[common.mkey("copy_loss", name, f"L{L}")] = r["loss"]
        metrics[common.mkey("longest_copied", name)] = longest_copied(accs)
        if state_bits(model) > 0:
            metrics[common.mkey("state_bits", name)] = state_bits(model)
            metrics[common.mkey("bound_len", name)] = state_bits(model) / math.log2(cfg.vocab)
    return metrics, curves, timings


def exp_lookup(cfg: Config, device):
    """Fig. 4: n-gram lookup with the key after (suffix) or before (prefix) the string."""
    metrics = {}
    for task in cfg.lookup_tasks:
        for name in cfg.lookup_models:
            common.set_seed(cfg.seed)
            model = build_model(name, cfg, 2 * max(cfg.lookup_eval_lens) + 16).to(device)
            gen = torch.Generator().manual_seed(cfg.seed + 2)
            train(model, cfg, lambda s: training_batch(task, cfg, gen, device), cfg.lookup_steps, f"{task}:{name}")
            if common.is_main():
                tgen = torch.Generator().manual_seed(cfg.seed + 777)
                for L in cfg.lookup_eval_lens:
                    acc = evaluate(model, task, L, cfg.eval_n, cfg, tgen, device)["string_acc"]
                    metrics[common.mkey(f"{task}_acc", name, f"L{L}")] = acc
    return metrics


def exp_hash(cfg: Config):
    """Thm 2.3 / Lemma 2.4: the n-gram lookup copies exactly unless an n-gram repeats (p_rep < L^2 D^-n)."""
    gen = torch.Generator().manual_seed(cfg.seed + 5)
    x = torch.randint(0, cfg.vocab, (cfg.hash_trials, cfg.hash_len), generator=gen)
    metrics = {}
    for n in cfg.hash_ns:  # p_rep on the same strings, so fail <= p_rep holds string by string
        metrics[common.mkey("hash_copy_acc", f"n{n}")] = (ngram_copy_oracle(x, n) == x).all(1).double().mean().item()
        metrics[common.mkey("p_rep", f"n{n}")] = has_repeated_ngram(x, n).double().mean().item()
    return metrics


def run_seed(cfg: Config):
    device = torch.device(cfg.device)
    stages = common.Stages({"copy": 6, "lookup": 2 if cfg.lookup_models and cfg.lookup_tasks else 0, "hash": 0.01})
    with stages("copy"):
        metrics, curves, timings = exp_copy(cfg, device)
    common.save_results(NAME, cfg, metrics, info={"stage": "copy done"}, partial=True)
    with stages("lookup"):
        metrics.update(exp_lookup(cfg, device))
    with stages("hash"):
        metrics.update(exp_hash(cfg) if common.is_main() else {})
    return metrics, {"curves": curves, "timings": timings}

# -----------------------------------------------------------------------------
# Tables, results, figures

PAPER = {"hard_alibi": "~1.0 to L1000 (Fig 1b)", "nope": "fits, decays past train L", "alibi": "fits, decays",
         "lstm": "never learns (Fig 1a)", "mamba": "learns slowly, ~0 past train L"}


def print_tables(cfg: Config, runs: common.SeedRuns):
    m, n_seeds, Lt = runs.mean, len(runs.seeds), cfg.train_max_len
    seeds = f"mean ± std over {n_seeds} seeds" if n_seeds > 1 else f"seed {runs.seeds[0]}"
    ref = m.get(common.mkey("examples_to_90", "hard_alibi"), float("nan"))

    def to90(name):
        k = round(m.get(common.mkey("reached_90", name), 0) * n_seeds)
        budget = round(m.get(common.mkey("examples", name), 0))
        if k < n_seeds:
            return f"> {budget} ({k}/{n_seeds} seeds reached)" if k else f"> {budget}"
        key = common.mkey("examples_to_90", name)
        cell = f"{m[key]:.0f}" + (f" ± {runs.std[key]:.0f}" if key in runs.std else "")
        return cell + (f" ({m[key] / ref:.1f}x)" if ref == ref else "")

    rows = [[name, round(m.get(common.mkey("params", name), 0)), to90(name)]
            + [runs.cell(common.mkey("copy_acc", name, f"L{L}"), 2) for L in cfg.eval_lens] + [PAPER.get(name, "")]
            for name in cfg.models]
    common.print_table(rows, ["model", "params", f"examples to 90% @L{Lt}"] + [f"L{L}" + ("*" if L == Lt else "")
                       for L in cfg.eval_lens] + ["paper"],
                       f"Copy: string exact match ({seeds}; {cfg.eval_n} test strings per length; * = longest "
                       f"training length). Trained on L in {cfg.train_min_len}..{Lt}, "
                       f"{'packed rows of ' + str(cfg.pack) if cfg.pack else 'one example per row'}, "
                       f"budget {cfg.steps} steps x {cfg.batch} rows ({cfg.fit_steps} for other transformers than "
                       f"hard_alibi), stop at {cfg.stop_acc:.0%} validation exact match")
    gssm = lambda key: f"{m[key]:.0f}" if key in m else "grows with L (KV cache)"  # same for every seed
    rows = [[name, gssm(common.mkey("state_bits", name)), gssm(common.mkey("bound_len", name)),
             runs.cell(common.mkey("longest_copied", name), 0), runs.cell(common.mkey("copy_acc", name, f"L{Lt}"), 2)]
            for name in cfg.models]
    common.print_table(rows, ["model", "state bits (fp32)", "Thm 2.7: copying possible up to L = bits/log2 D",
                              "measured: exact match >= 0.5 up to L", f"exact match @L{Lt}"],
                       f"State size vs the copy lower bound (D = {cfg.vocab}, log2 D = {math.log2(cfg.vocab):.2f} "
                       "bits per token); 0 = collapses before the shortest test length")
    for task in cfg.lookup_tasks:
        rows = [[name] + [runs.cell(common.mkey(f"{task}_acc", name, f"L{L}"), 2) for L in cfg.lookup_eval_lens]
                + ["transformer >> GSSM" if task == "suffix_ngram" else "GSSM fine"] for name in cfg.lookup_models]
        common.print_table(rows, ["model"] + [f"L{L}" for L in cfg.lookup_eval_lens] + ["paper (Fig 4)"],
                           f"{task} (n={cfg.ngram}, answer {cfg.answer_len} tokens), trained on L <= "
                           f"{cfg.lookup_max_len} for {cfg.lookup_steps} steps: string exact match")
    rows = [[n, runs.cell(f"hash_copy_acc/n{n}"), runs.cell(f"p_rep/n{n}"),
             min(1.0, ngram_bound(cfg.hash_len, cfg.vocab, n))] for n in cfg.hash_ns]
    common.print_table(rows, ["n", "hash-copy exact match", "p_rep (same strings)", "bound L^2 D^-n"],
                       f"n-gram hash copy oracle, L={cfg.hash_len}, D={cfg.vocab}: fails only if an n-gram repeats")


def mean_curve(per_seed):
    """Mean (and std) over seeds of probe curves [(examples, acc)], up to the longest one: a seed that
    stopped (it reached stop_acc) keeps its last probe value, since its weights no longer change."""
    n = max(len(c) for c in per_seed)
    xs = [x for x, _ in max(per_seed, key=len)]                        # probes fall at the same examples
    stats = [common.mean_std([c[min(i, len(c) - 1)][1] for c in per_seed]) for i in range(n)]
    return xs, [s[0] for s in stats], [s[1] for s in stats] if len(per_seed) > 1 else None


def run(cfg: Config) -> common.SeedRuns:
    """Train, evaluate, print the tables, write results/copying.json and the figures."""
    t_start = time.time()
    if cfg.bench_scan:
        metrics = bench_scans(torch.device(cfg.device))
        rows = [[L, metrics[f"scan_ms/sequential/L{L}"], metrics[f"scan_ms/parallel/L{L}"]] for L in (64, 512, 2048)]
        common.print_table(rows, ["L", "sequential ms", "parallel ms"], f"Mamba scan forward (B=8 E=256 N=16), {cfg.device}")
        common.save_results(NAME + "_scan_bench", cfg, metrics, wall_time_s=time.time() - t_start)
        return metrics
    runs = common.over_seeds(cfg, run_seed, NAME)
    print_tables(cfg, runs)
    if not common.is_main():
        return runs
    curves = {name: mean_curve([e["curves"][name] for e in runs.extras]) for name in cfg.models}
    timings = {k: sum(e["timings"][k] for e in runs.extras) / len(runs.extras) for k in runs.extras[0]["timings"]}
    history = {f"probe/{name}": [e["curves"][name] for e in runs.extras] for name in cfg.models}
    info = {"probe": f"validation exact match at L={cfg.train_max_len} vs training examples seen, per seed",
            "metric_notes": "examples_to_90 is null where 90% was not reached within the budget (reached_90 = 0)"}
    common.save_results(NAME, cfg, runs, history=history, info=info, timings=timings,
                        wall_time_s=time.time() - t_start)
    common.plot(NAME, curves, cfg.out, xlabel="training examples seen", hline=0.9, title="copy: sample efficiency (Fig. 1a)",
                ylabel=f"exact match at L={cfg.train_max_len} (validation)")
    keys = {name: [common.mkey("copy_acc", name, f"L{L}") for L in cfg.eval_lens] for name in cfg.models}
    lens = {name: (list(cfg.eval_lens), [runs.mean[k] for k in ks], [runs.std[k] for k in ks] if runs.std else None)
            for name, ks in keys.items()}
    common.plot(NAME + "_lengths", lens, cfg.out, xlabel="string length", ylabel="exact match (test)",
                logx=max(cfg.eval_lens) >= 20 * min(cfg.eval_lens),
                title="copy: length generalisation (Fig. 1b)", shade=(cfg.train_min_len, cfg.train_max_len))
    return runs


def main():
    cfg = common.parse_args(Config, PRESETS)
    with common.session(cfg):
        run(cfg)


if __name__ == "__main__":
    main()
