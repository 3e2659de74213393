"""
Repeat After Me: Transformers are Better than State Space Models at Copying
Samy Jelassi, David Brandfonbrener, Sham M. Kakade, Eran Malach. ICML 2024. arXiv:2402.01032
Official code: github.com/sjelassi/transformers_ssm_copy (synthetic_exps/)

Finding: a transformer learns to copy a random string from far fewer examples than a state-space
model or LSTM, and with Hard-ALiBi attention it copies strings several times longer than any it was
trained on, while NoPE, the LSTM and Mamba fail just past (or before) the training length. A fixed
-size state cannot hold an arbitrary string (Thm 2.7); an n-gram "hash" lookup can (Thm 2.3).

The quick preset (CPU, about 8 minutes, one thread) trains Hard-ALiBi and NoPE transformers (same
size, same steps: only the positional scheme differs), an LSTM and a pure-PyTorch Mamba on strings of
length 1..20, one example per row, and prints string-level exact-match copy accuracy at lengths
10..100, the steps each needed to reach 90% at length 20, the suffix-key n-gram lookup table, and the
hash-copy oracle's failure rate against the birthday bound. The prefix-key lookup (where the paper
finds GSSMs do well) needs more steps than the quick budget: it runs in the full preset.
Packing (`--pack N`, the official layout) is off in every preset, to fit the quick budget. Measured
for Hard-ALiBi at 1500 steps on CPU: packed rows of 128 tokens (batch 16, ~88 strings/step) took 1.7x
the time of one string per row (batch 32) and generalised further (L60 0.87 vs 0.73, L100 0.59 vs
0.37); `--pack 128 --batch 16` reproduces it.

    python copying.py --preset smoke             # seconds (what pytest runs)
    python copying.py                            # quick on CPU, full on CUDA
    python copying.py --device cuda              # full preset: train <= 50, test to 1000
    python copying.py --bench-scan               # Mamba parallel vs sequential scan timings only
    torchrun --standalone --nproc_per_node=2 copying.py --preset smoke --device cpu

Glossary (ours -> paper):
    hard_alibi   T_hard_alibi: the first heads see only their last w tokens (w = 1..4 here), others NoPE
    nope/alibi   T_nope / T_alibi           mamba  the GSSM (selective SSM, Gu & Dao 2023)
    L            string length; the copy task is "$x|x." and only "x." is scored
    n / ngram    the n-gram size of the hash-based copy construction and the lookup key
    p_rep        probability that some n-gram repeats in x; the construction fails only then

Does not include: the pretrained Pythia/Mamba experiments (§4: C4, SQuAD, phone book need hub
weights), the paper's 160M-parameter models, RoPE in the default runs (available as --models rope).
Evaluation is teacher-forced, as in the official code: for string exact match that equals greedy
decoding; the char accuracy after a first mistake is scored given the correct prefix.
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

TRANSFORMERS = ("nope", "learned", "alibi", "hard_alibi", "rope")
MODELS = TRANSFORMERS + ("lstm", "mamba")
TASKS = ("copy", "prefix_ngram", "suffix_ngram")

# -----------------------------------------------------------------------------
# Config


@dataclass
class Config(common.BaseConfig):
    models: tuple[str, ...] = ("hard_alibi", "nope", "lstm", "mamba")  # copy-task models (see MODELS)
    vocab: int = 26                 # alphabet size D (letters a..z)
    train_min_len: int = 1          # training string lengths ~ U{min..max}
    train_max_len: int = 20
    eval_lens: tuple[int, ...] = (10, 20, 30, 40, 60, 100)  # copy test lengths
    eval_n: int = 100               # test strings per length
    batch: int = 32                 # global batch (rows)
    pack: int = 0                   # 0: one example per row; N: official packing into rows of N tokens
    lr: float = 2e-3
    warmup: int = 100
    t_dim: int = 128                # transformer width / layers / heads
    t_layers: int = 2
    t_heads: int = 8
    t_windows: tuple[int, ...] = (1, 2, 3, 4, 0, 0, 0, 0)  # Hard-ALiBi window per head (0 = NoPE head)
    t_steps: int = 1500
    t_init: str = "fan_in"          # fan_in (PyTorch default) or gpt2 (N(0, 0.02)): gpt2 learns copying
                                    # several times slower at d=128 (0.6 vs 0.998 char acc at L20, 600 steps)
    lstm_dim: int = 256
    lstm_layers: int = 1
    lstm_steps: int = 1000
    mamba_dim: int = 128
    mamba_layers: int = 2
    mamba_state: int = 8            # N (d_state)
    mamba_steps: int = 500
    scan: str = "auto"              # Mamba scan: auto | sequential | parallel
    target_len: int = 20            # steps_to_90 is measured at this length ...
    eval_every: int = 100           # ... checking every this many steps (0 = skip)
    lookup_models: tuple[str, ...] = ("hard_alibi", "lstm")  # n-gram lookup runs ('' = skip)
    lookup_tasks: tuple[str, ...] = ("suffix_ngram",)  # prefix_ngram needs more steps than quick has
    ngram: int = 3                  # lookup key length
    answer_len: int = 5             # tokens after the key to output
    lookup_max_len: int = 30        # lookup training strings ~ U{ngram+answer_len+2 .. this}
    lookup_eval_lens: tuple[int, ...] = (20, 30, 50, 100)
    lookup_steps: int = 600
    hash_len: int = 100             # string length for the hash-copy oracle
    hash_ns: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
    hash_trials: int = 2000
    bench_scan: bool = False        # only time the Mamba scans (L = 64, 512, 2048) and exit

    def __post_init__(self):
        bad = [m for m in tuple(self.models) + tuple(self.lookup_models) if m and m not in MODELS]
        if bad:
            raise ValueError(f"unknown model(s) {bad}; choose from {', '.join(MODELS)}")
        if [t for t in self.lookup_tasks if t and t not in TASKS[1:]]:
            raise ValueError(f"lookup_tasks must be among {TASKS[1:]}")
        if not 1 <= self.vocab <= 26:
            raise ValueError("vocab must be in 1..26 (letters a..z)")
        if not 1 <= self.train_min_len <= self.train_max_len:
            raise ValueError("need 1 <= train_min_len <= train_max_len")
        if min(self.eval_lens, default=1) < 1 or self.eval_n < 1 or self.batch < 1:
            raise ValueError("eval lengths, eval_n and batch must be positive")
        if self.pack and self.pack < 2 * self.train_max_len + 3:
            raise ValueError(f"--pack {self.pack} cannot hold one example of length {self.train_max_len}")
        if self.t_dim % self.t_heads or len(self.t_windows) != self.t_heads:
            raise ValueError("t_dim must divide by t_heads and t_windows needs one entry per head")
        if self.scan not in ("auto", "sequential", "parallel"):
            raise ValueError("scan must be auto, sequential or parallel")
        if self.lookup_models and self.lookup_max_len < self.ngram + self.answer_len + 2:
            raise ValueError("lookup_max_len must exceed ngram + answer_len + 1")


PRESETS = {
    "smoke": dict(models=("hard_alibi", "lstm", "mamba"), vocab=10, t_dim=64, t_heads=4, t_windows=(1, 2, 0, 0),
                  t_steps=300, lstm_dim=32, lstm_steps=60, mamba_dim=32, mamba_layers=1, mamba_state=4,
                  mamba_steps=30, train_min_len=2, train_max_len=8, batch=16, eval_lens=(8, 16), eval_n=32,
                  target_len=8, eval_every=50, lookup_models=("hard_alibi",), lookup_tasks=("suffix_ngram",),
                  lookup_max_len=14, lookup_eval_lens=(14,), lookup_steps=30, hash_trials=200, warmup=10, lr=3e-3),
    "quick": dict(),
    "full": dict(models=("hard_alibi", "alibi", "nope", "lstm", "mamba"), train_min_len=5, train_max_len=50,
                 eval_lens=(50, 100, 200, 400, 700, 1000), eval_n=128, batch=64, lr=3e-4, warmup=300,
                 t_dim=384, t_layers=6, t_heads=8, t_steps=10000, lstm_dim=768, lstm_layers=2,
                 lstm_steps=10000, mamba_dim=384, mamba_layers=12, mamba_state=16, mamba_steps=10000,
                 target_len=50, eval_every=250, lookup_models=("hard_alibi", "nope", "lstm", "mamba"),
                 lookup_tasks=("suffix_ngram", "prefix_ngram"),
                 lookup_steps=4000, lookup_eval_lens=(30, 50, 75, 100), hash_len=300),
}

# -----------------------------------------------------------------------------
# Data: tokens a..z then $ (BOS) | (separator) . (EOS) * (PAD), as in the official code


def make_tokenizer(vocab: int = 26) -> common.Tokenizer:
    return common.Tokenizer([chr(ord("a") + i) for i in range(vocab)] + ["$", "|", ".", "*"])


def concat_ragged(parts, pad_id: int, width: int | None = None):
    """Concatenate per-row ragged segments. parts: [(tokens (B, W), lengths (B,), scored)].

    Returns ids (B, T) right-padded and a bool mask of the scored tokens.
    """
    B = parts[0][0].shape[0]
    dev = parts[0][0].device
    total = sum(p[1] for p in parts)
    T = width or int(total.max())
    ids = torch.full((B, T), pad_id, dtype=torch.long, device=dev)
    scored = torch.zeros((B, T), dtype=torch.bool, device=dev)
    off = torch.zeros(B, dtype=torch.long, device=dev)
    for toks, lens, is_scored in parts:
        cols = torch.arange(toks.shape[1], device=dev)
        keep = cols[None, :] < lens[:, None]
        rows, c = keep.nonzero(as_tuple=True)
        ids[rows, off[rows] + c] = toks[rows, c]
        scored[rows, off[rows] + c] = is_scored
        off = off + lens
    return ids, scored


def _const(B, tok, dev):
    return torch.full((B, 1), tok, dtype=torch.long, device=dev), torch.ones(B, dtype=torch.long, device=dev)


def sample_unique_ngram_starts(x, lens, vocab, n, after, gen, tries=10):
    """For each row, a start t of an n-gram that occurs exactly once in x[:len], with t + n + after <= len.

    Rows with no such n-gram are resampled (the official code retries 10 times too). Returns (x, t).
    """
    dev = x.device
    npos = x.shape[1] - n + 1
    for _ in range(tries):
        h = ngram_hashes(x, n)                                           # (B, npos)
        valid = torch.arange(npos, device=dev)[None, :] <= (lens[:, None] - n)
        same = (h[:, :, None] == h[:, None, :]) & valid[:, None, :] & valid[:, :, None]
        unique = same.sum(-1) == 1
        cand = unique & (torch.arange(npos, device=dev)[None, :] <= (lens[:, None] - n - after))
        ok = cand.any(1)
        if bool(ok.all()):
            break
        fresh = torch.randint(0, vocab, x.shape, generator=gen, device="cpu").to(dev)
        x = torch.where(ok[:, None], x, fresh)
    score = torch.rand(cand.shape, generator=gen).to(dev).masked_fill(~cand, -1.0)
    return x, score.argmax(1)


def make_examples(task, lens, vocab, gen, ngram=3, answer_len=5, tok=None):
    """A batch of task strings, one per row (ids (B, T), scored-token mask (B, T)).

        copy          $ x | x .          e.g. $ a b c | a b c .     scored: a b c .
        prefix_ngram  $ g | x | y .      g an n-gram of x, y the answer_len tokens after g in x
        suffix_ngram  $ x | g y .        scored: y .   (g itself is not scored)
    """
    tok = tok or make_tokenizer(vocab)
    B = lens.shape[0]
    dev = lens.device
    W = int(lens.max())
    x = torch.randint(0, vocab, (B, W), generator=gen).to(dev)
    bos, sep, eos = (_const(B, tok[c], dev) for c in "$|.")
    if task == "copy":
        parts = [(*bos, False), (x, lens, False), (*sep, False), (x, lens, True), (*eos, True)]
        return concat_ragged(parts, tok["*"])
    x, t = sample_unique_ngram_starts(x, lens, vocab, ngram, answer_len, gen)
    ar = torch.arange(max(ngram, answer_len), device=dev)
    g = x.gather(1, (t[:, None] + ar[None, :ngram]))
    y = x.gather(1, (t[:, None] + ngram + ar[None, :answer_len]))
    nl, al = torch.full_like(lens, ngram), torch.full_like(lens, answer_len)
    if task == "prefix_ngram":
        parts = [(*bos, False), (g, nl, False), (*sep, False), (x, lens, False), (*sep, False),
                 (y, al, True), (*eos, True)]
    else:
        parts = [(*bos, False), (x, lens, False), (*sep, False), (g, nl, False), (y, al, True), (*eos, True)]
    return concat_ragged(parts, tok["*"])


def to_lm_batch(ids, scored):
    """(input, target) for next-token training; targets outside the scored tokens are -100."""
    tgt = ids[:, 1:].masked_fill(~scored[:, 1:], -100)
    return ids[:, :-1], tgt


def training_batch(task, cfg: Config, gen, device, max_len=None):
    """One global batch: one example per row, or official packing when cfg.pack > 0."""
    lo = cfg.train_min_len if task == "copy" else cfg.ngram + cfg.answer_len + 2
    hi = max_len or cfg.train_max_len
    if not cfg.pack:
        lens = torch.randint(lo, hi + 1, (cfg.batch,), generator=gen).to(device)
        return to_lm_batch(*make_examples(task, lens, cfg.vocab, gen, cfg.ngram, cfg.answer_len))
    return to_lm_batch(*packed_rows(task, cfg, gen, device, lo, hi))


def packed_rows(task, cfg: Config, gen, device, lo, hi):
    """Official CopyDataset packing: examples back to back until cfg.pack tokens; the example that
    overflows is cut and its loss mask zeroed."""
    per_row = cfg.pack // (2 * lo + 3) + 1
    B = cfg.batch
    lens = torch.randint(lo, hi + 1, (B * per_row,), generator=gen).to(device)
    ex, sc = make_examples(task, lens, cfg.vocab, gen, cfg.ngram, cfg.answer_len)
    ex_len = (ex != make_tokenizer(cfg.vocab)["*"]).sum(1).view(B, per_row)
    ex, sc = ex.view(B, per_row, -1), sc.view(B, per_row, -1)
    off = ex_len.cumsum(1) - ex_len                                      # (B, K)
    cols = torch.arange(ex.shape[-1], device=device)
    pos = off[..., None] + cols                                          # (B, K, Te)
    inside = (cols < ex_len[..., None]) & (pos < cfg.pack)
    fits = (off + ex_len <= cfg.pack)[..., None]
    ids = torch.full((B, cfg.pack), make_tokenizer(cfg.vocab)["*"], dtype=torch.long, device=device)
    scored = torch.zeros((B, cfg.pack), dtype=torch.bool, device=device)
    b, k, c = inside.nonzero(as_tuple=True)
    ids[b, pos[b, k, c]] = ex[b, k, c]
    scored[b, pos[b, k, c]] = (sc & fits)[b, k, c]
    return ids, scored

# -----------------------------------------------------------------------------
# Models: every one maps idx (B, T) -> (logits, loss) like common.GPT


def make_transformer(pos, cfg: Config, block_size: int) -> common.GPT:
    windows = cfg.t_windows if pos == "hard_alibi" else ()
    gcfg = common.GPTConfig(vocab_size=cfg.vocab + 4, block_size=block_size, n_layer=cfg.t_layers,
                            n_head=cfg.t_heads, n_embd=cfg.t_dim, pos=pos, hard_windows=windows,
                            tie_weights=False, init=cfg.t_init)
    return common.GPT(gcfg)


class LSTMLM(nn.Module):
    """Embedding -> nn.LSTM -> linear head (official models/lstm.py, without its no-op init)."""

    def __init__(self, vocab_size, d, layers):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, d)
        self.lstm = nn.LSTM(d, d, num_layers=layers, batch_first=True)
        self.head = nn.Linear(d, vocab_size)

    def forward(self, idx, targets=None, loss_mask=None):
        h, _ = self.lstm(self.emb(idx))                                  # (B, T, d)
        logits = self.head(h)
        loss = None if targets is None else common.masked_cross_entropy(logits, targets, loss_mask)
        return logits, loss


def selective_scan_sequential(dA, dBx, C):
    """h_t = exp(dA_t) * h_{t-1} + dBx_t ;  y_t = <C_t, h_t>.   dA, dBx: (B, T, E, N), C: (B, T, N)."""
    h = torch.zeros_like(dBx[:, 0])                                      # (B, E, N)
    ys = []
    for a, u, c in zip(dA.exp().unbind(1), dBx.unbind(1), C.unbind(1)):  # unbind: no per-step zero grads
        h = a * h + u
        ys.append((h * c[:, None, :]).sum(-1))                           # (B, E)
    return torch.stack(ys, 1)                                            # (B, T, E)


def selective_scan_parallel(dA, dBx, C):
    """The same recurrence by a Hillis-Steele scan: log2(T) steps of (a, b) o (a', b') = (aa', a'b + b').

    Decay products stay in (0, 1], so it is as stable as the sequential loop.
    """
    a, b = dA.exp(), dBx
    T = a.shape[1]
    shift = 1
    while shift < T:
        a_prev = F.pad(a[:, :-shift], (0, 0, 0, 0, shift, 0), value=1.0)  # identity element (1, 0)
        b_prev = F.pad(b[:, :-shift], (0, 0, 0, 0, shift, 0), value=0.0)
        b = a * b_prev + b
        a = a * a_prev
        shift *= 2
    return (b * C[:, :, None, :]).sum(-1)                                # (B, T, E)


class MambaBlock(nn.Module):
    """Mamba's selective SSM block (Gu & Dao 2023), pure PyTorch; see johnma2006/mamba-minimal.

    Official implementation: state-spaces/mamba, mamba_ssm/modules/mamba_simple.py.
    E = expand*d inner channels, N = d_state, R = dt_rank.
    """

    def __init__(self, d, d_state=16, expand=2, d_conv=4, scan="auto"):
        super().__init__()
        E, self.R, self.N = expand * d, math.ceil(d / 16), d_state
        self.scan = scan
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
        """u (B, T, E) after conv+SiLU -> discretised (dA, dBx, C)."""
        dt, Bm, Cm = self.x_proj(u).split([self.R, self.N, self.N], -1)
        dt = F.softplus(self.dt_proj(dt))                                # (B, T, E)  Delta
        A = -self.A_log.exp()                                            # (E, N)
        dA = dt[..., None] * A                                           # (B, T, E, N)  Delta*A (ZOH)
        dBx = dt[..., None] * Bm[:, :, None, :] * u[..., None]           # (B, T, E, N)  Delta*B*x
        return dA, dBx, Cm

    def forward(self, x):
        T = x.shape[1]
        u, z = self.in_proj(x).chunk(2, -1)                              # (B, T, E) each
        u = F.silu(self.conv(u.transpose(1, 2))[..., :T].transpose(1, 2))  # causal: drop the right pad
        dA, dBx, Cm = self.ssm_inputs(u)
        scan = self.scan
        if scan == "auto":  # measured (see --bench-scan): parallel wins on GPU, sequential on CPU
            scan = "parallel" if x.is_cuda else "sequential"
        y = (selective_scan_parallel if scan == "parallel" else selective_scan_sequential)(dA, dBx, Cm)
        y = y + u * self.D
        return self.out_proj(y * F.silu(z))

    def step(self, x, state):
        """One token. x (B, d); state = (conv window (B, E, d_conv-1), h (B, E, N))."""
        conv_buf, h = state
        u, z = self.in_proj(x).chunk(2, -1)                              # (B, E)
        window = torch.cat([conv_buf, u[..., None]], -1)                 # (B, E, d_conv)
        u = F.silu((window * self.conv.weight[:, 0]).sum(-1) + self.conv.bias)
        dA, dBx, Cm = self.ssm_inputs(u[:, None])
        h = dA[:, 0].exp() * h + dBx[:, 0]
        y = (h * Cm[:, 0, None, :]).sum(-1) + u * self.D
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

    def forward(self, idx, targets=None, loss_mask=None):
        x = self.emb(idx)
        for norm, layer in zip(self.norms, self.layers):
            x = x + layer(norm(x))
        logits = self.norm_f(x) @ self.emb.weight.T
        loss = None if targets is None else common.masked_cross_entropy(logits, targets, loss_mask)
        return logits, loss

    def init_state(self, B, device):
        out = []
        for layer in self.layers:
            E = layer.D.shape[0]
            out.append((torch.zeros(B, E, layer.conv.kernel_size[0] - 1, device=device),
                        torch.zeros(B, E, layer.N, device=device)))
        return out

    def step(self, tok, state):
        """Recurrent inference: tok (B,) -> logits (B, V), new state. O(1) memory in the length."""
        x = self.emb(tok)
        new = []
        for norm, layer, s in zip(self.norms, self.layers, state):
            y, s = layer.step(norm(x), s)
            x = x + y
            new.append(s)
        return self.norm_f(x) @ self.emb.weight.T, new


def build_model(name, cfg: Config, block_size=256):
    V = cfg.vocab + 4
    if name in TRANSFORMERS:
        return make_transformer(name, cfg, block_size)
    if name == "lstm":
        return LSTMLM(V, cfg.lstm_dim, cfg.lstm_layers)
    return MambaLM(V, cfg.mamba_dim, cfg.mamba_layers, cfg.mamba_state, cfg.scan)


def steps_for(name, cfg: Config):
    return {"lstm": cfg.lstm_steps, "mamba": cfg.mamba_steps}.get(name, cfg.t_steps)

# -----------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model, task, L, n, cfg: Config, gen, device, batch=None):
    """Teacher-forced argmax at every scored position (the official test_utils). Returns
    string accuracy (every answer char right, '.' excluded) and char accuracy."""
    model.eval()
    tok = make_tokenizer(cfg.vocab)
    strings, chars, total = 0.0, 0.0, 0
    batch = batch or max(1, min(128, 32768 // L))  # bounds Mamba's (B, T, E, N) tensors at long L
    for start in range(0, n, batch):
        b = min(batch, n - start)
        lens = torch.full((b,), L, dtype=torch.long, device=device)
        ids, scored = make_examples(task, lens, cfg.vocab, gen, cfg.ngram, cfg.answer_len, tok)
        inp, tgt = to_lm_batch(ids, scored)
        with common.autocast(device):
            pred = model(inp)[0].argmax(-1)
        answer = (tgt != -100) & (tgt != tok["."])
        right = (pred == tgt) | ~answer
        strings += right.all(1).float().sum().item()
        chars += ((pred == tgt) & answer).sum().item() / max(1, answer.sum().item()) * b
        total += b
    return {"string_acc": strings / total, "char_acc": chars / total}


@torch.no_grad()
def greedy_answer(model, ids, scored):
    """Greedy autoregressive decoding of the scored span (slow reference for the tests)."""
    out = ids.clone()
    start = int(scored.float().argmax(1).min())
    for t in range(start, ids.shape[1]):
        nxt = model(out[:, :t])[0][:, -1].argmax(-1)
        out[:, t] = torch.where(scored[:, t], nxt, out[:, t])
    return out

# -----------------------------------------------------------------------------
# Theory: the hash-based copy construction and the memory lower bound


def ngram_hashes(x, n):
    """(B, L) -> (B, L-n+1) integer code of each n-gram x[t:t+n] (base 64: exact for ids < 64, n <= 10)."""
    npos = x.shape[1] - n + 1
    h = torch.zeros(x.shape[0], npos, dtype=torch.long, device=x.device)
    for i in range(n):
        h = h * 64 + x[:, i:i + npos]
    return h


def ngram_copy_oracle(x, n):
    """Copy x by the paper's n-gram lookup (Thm 2.3): after the first n tokens (anchored at '$'),
    output the token that followed the *first* earlier occurrence of the last n tokens written.

    Returns the copies (B, L). Wrong only when the looked-up n-gram occurs more than once in x.
    """
    B, L = x.shape
    if n >= L:
        return x.clone()
    h = ngram_hashes(x, n)                                               # (B, L-n+1)
    key = h[:, :L - n]                                                   # key for output i = h[i-n]
    match = key[:, :, None] == key[:, None, :]                           # (B, L-n, L-n) query, candidate
    first = match.float().argmax(-1)                                     # first occurrence of each key
    return torch.cat([x[:, :n], x.gather(1, first + n)], 1)


def has_repeated_ngram(x, n):
    """(B, L) -> (B,) bool: some n-gram occurs twice in the row (p_rep is its mean over uniform x)."""
    h = ngram_hashes(x, n).sort(1).values
    return (h[:, 1:] == h[:, :-1]).any(1)


def ngram_bound(L, D, n):
    """Lemma 2.4: p_rep < L^2 D^-n."""
    return L ** 2 / D ** n


def gssm_error_lower_bound(state_bits, L, D):
    """Thm 2.7: a GSSM with 2^bits states errs on copying with prob > 1 - |S| / D^L."""
    return max(0.0, 1.0 - 2.0 ** (state_bits - L * math.log2(D)))


def state_bits(model) -> int:
    """Bits in the recurrent state at fp32 (loose: a float carries < 32 useful bits)."""
    if isinstance(model, MambaLM):
        return sum(l.D.shape[0] * (l.N + l.conv.kernel_size[0] - 1) * 32 for l in model.layers)
    if isinstance(model, LSTMLM):
        return 2 * model.lstm.num_layers * model.lstm.hidden_size * 32
    return -1


def hash_copy_table(cfg: Config, gen):
    out = {}
    x = torch.randint(0, cfg.vocab, (cfg.hash_trials, cfg.hash_len), generator=gen)
    for n in cfg.hash_ns:  # p_rep on the same strings, so fail <= p_rep holds string by string
        p_rep = has_repeated_ngram(x, n).float().mean().item()
        acc = (ngram_copy_oracle(x, n) == x).all(1).float().mean().item()
        out[n] = (acc, p_rep, ngram_bound(cfg.hash_len, cfg.vocab, n))
    return out

# -----------------------------------------------------------------------------
# Benchmark: parallel vs sequential scan


def bench_scans(device, lengths=(64, 512, 2048), B=8, E=256, N=16, reps=3):
    out = {}
    for L in lengths:
        g = torch.Generator().manual_seed(0)
        dA = (-torch.rand(B, L, E, N, generator=g)).to(device)
        dBx = torch.randn(B, L, E, N, generator=g).to(device)
        C = torch.randn(B, L, N, generator=g).to(device)
        for name, fn in (("sequential", selective_scan_sequential), ("parallel", selective_scan_parallel)):
            fn(dA, dBx, C)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(reps):
                fn(dA, dBx, C)
            if device.type == "cuda":
                torch.cuda.synchronize()
            out[f"scan_ms/{name}/L{L}"] = 1000 * (time.perf_counter() - t0) / reps
    rows = [[L, out[f"scan_ms/sequential/L{L}"], out[f"scan_ms/parallel/L{L}"]] for L in lengths]
    common.print_table(rows, ["L", "sequential ms", "parallel ms"],
                       f"Mamba selective scan, forward, B={B} E={E} N={N} on {device}")
    return out

# -----------------------------------------------------------------------------
# Experiments

PAPER_NOTE = {"hard_alibi": "~1.0 to L1000 (Fig 1b)", "nope": "decays past train len", "alibi": "decays past train len",
              "lstm": "~0 past train len", "mamba": "~0 past train len"}


def train_model(name, task, cfg: Config, device, max_len, eval_fn=None, eval_every=0):
    common.set_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    T_max = 2 * max(max(cfg.eval_lens), max(cfg.lookup_eval_lens, default=0)) + cfg.ngram + cfg.answer_len + 8
    model = build_model(name, cfg, block_size=max(T_max, cfg.pack)).to(device)
    steps = steps_for(name, cfg) if task == "copy" else cfg.lookup_steps
    hist = common.train(model, lambda step: training_batch(task, cfg, gen, device, max_len), steps=steps,
                        lr=cfg.lr, warmup=min(cfg.warmup, steps // 5), schedule="linear", device=device,
                        weight_decay=0.1, compile=cfg.compile, eval_fn=eval_fn, eval_every=eval_every,
                        desc=f"{name}:{task}", cfg=cfg)
    return model, hist


def run(cfg: Config) -> dict:
    """Train, evaluate, print the tables, write results/copying.json; --seeds N adds mean +- std."""
    if cfg.seeds <= 1:
        return run_one(cfg)
    t_start = time.time()
    per_seed = lambda c: run_one(dataclasses.replace(c, seeds=1, out=os.path.join(cfg.out, f"seed{c.seed}")))
    metrics = common.over_seeds(cfg, per_seed)
    if common.is_main():
        rows = [[name] + [f"{metrics[f'copy_acc/{name}/L{L}']:.3f} +- {metrics[f'copy_acc/{name}/L{L}/std']:.3f}"
                          for L in cfg.eval_lens] for name in cfg.models]
        common.print_table(rows, ["model"] + [f"L{L}" for L in cfg.eval_lens],
                           f"Copy: string exact match, mean +- std over {cfg.seeds} seeds")
        common.save_results("copying", cfg, metrics, {}, time.time() - t_start)
    return metrics


def run_one(cfg: Config) -> dict:
    t_start = time.time()
    device = common.setup_ddp(torch.device(cfg.device))
    common.set_threads(cfg.threads, device)
    metrics, history = {}, {}
    if cfg.bench_scan:
        metrics = bench_scans(device)
        common.save_results("copying_scan_bench", cfg, metrics, wall_time_s=time.time() - t_start)
        return metrics

    # 1+2. copy: length generalisation and sample efficiency (steps to 90% at target_len)
    rows = []
    for name in cfg.models:
        egen = torch.Generator().manual_seed(cfg.seed + 999)
        curve = []

        def probe(model, step, name=name, curve=curve):
            acc = evaluate(model, "copy", cfg.target_len, min(cfg.eval_n, 100), cfg, egen, device)["string_acc"]
            curve.append((step, acc))
            return {f"acc@L{cfg.target_len}": acc}

        t0 = time.time()
        model, hist = train_model(name, "copy", cfg, device, cfg.train_max_len, probe, cfg.eval_every)
        train_s = time.time() - t0
        if not common.is_main():
            continue
        reached = [s for s, a in curve if a >= 0.9]
        metrics[f"steps_to_90/{name}"] = reached[0] if reached else None
        metrics[f"params/{name}"] = common.count_params(model)
        metrics[f"train_s/{name}"] = train_s
        history[f"copy/{name}"] = {"loss": hist["loss"], "step": hist["step"], "acc_curve": curve}
        row = [name, metrics[f"params/{name}"], steps_for(name, cfg), round(train_s)]
        gen = torch.Generator().manual_seed(cfg.seed + 12345)
        for L in cfg.eval_lens:
            r = evaluate(model, "copy", L, cfg.eval_n, cfg, gen, device)
            metrics[f"copy_acc/{name}/L{L}"] = r["string_acc"]
            metrics[f"copy_char_acc/{name}/L{L}"] = r["char_acc"]
            row.append(r["string_acc"])
        s90 = metrics[f"steps_to_90/{name}"]
        row += [s90 if s90 is not None else f"not in {steps_for(name, cfg)}", PAPER_NOTE.get(name, "")]
        rows.append(row)
    if common.is_main():
        common.print_table(rows, ["model", "params", "steps", "train s"] + [f"L{L}" for L in cfg.eval_lens]
                           + [f"steps to 90% @L{cfg.target_len}", "paper"],
                           f"Copy: string exact match, trained on L in {cfg.train_min_len}..{cfg.train_max_len} "
                           f"({'packed ' + str(cfg.pack) if cfg.pack else 'one example per row'}), "
                           f"{cfg.eval_n} strings per length")

    # 3. n-gram lookup with the key before (prefix) or after (suffix) the string
    for task in [t for t in cfg.lookup_tasks if t]:
        rows = []
        for name in [m for m in cfg.lookup_models if m]:
            model, _ = train_model(name, task, cfg, device, cfg.lookup_max_len)
            if not common.is_main():
                continue
            gen = torch.Generator().manual_seed(cfg.seed + 777)
            row = [name]
            for L in cfg.lookup_eval_lens:
                acc = evaluate(model, task, L, cfg.eval_n, cfg, gen, device)["string_acc"]
                metrics[f"lookup_acc/{task}/{name}/L{L}"] = acc
                row.append(acc)
            rows.append(row + [("transformer >> GSSM" if task == "suffix_ngram" else "GSSM fine, Hard-ALiBi best")])
        if common.is_main() and rows:
            common.print_table(rows, ["model"] + [f"L{L}" for L in cfg.lookup_eval_lens] + ["paper (Fig 4)"],
                               f"{task} (n={cfg.ngram}, answer {cfg.answer_len} tokens), trained on L <= "
                               f"{cfg.lookup_max_len}: string exact match")

    # 4. theory: the hash-based copy construction vs the birthday bound
    if common.is_main():
        table = hash_copy_table(cfg, torch.Generator().manual_seed(cfg.seed + 5))
        rows = []
        for n, (acc, prep, bound) in table.items():
            metrics[f"hash_copy_acc/n{n}"] = acc
            metrics[f"p_rep/n{n}"] = prep
            rows.append([n, acc, 1 - acc, prep, min(1.0, bound)])
        common.print_table(rows, ["n", "hash-copy acc", "fail rate", "p_rep (same strings)", "bound L^2 D^-n"],
                           f"n-gram hash copy oracle on uniform strings, L={cfg.hash_len}, D={cfg.vocab} "
                           f"(fails only if an n-gram repeats: fail <= p_rep <= bound)")
        curves = {name: ([int(L) for L in cfg.eval_lens], [metrics[f"copy_acc/{name}/L{L}"] for L in cfg.eval_lens])
                  for name in cfg.models}
        common.plot("copying", curves, cfg.out, xlabel="string length", ylabel="string exact match",
                    title="copy: length generalisation", shade=(cfg.train_min_len, cfg.train_max_len))
        common.save_results("copying", cfg, metrics, history, time.time() - t_start)
    common.cleanup_ddp()
    return metrics


def main():
    run(common.parse_args(Config, PRESETS))


if __name__ == "__main__":
    main()
