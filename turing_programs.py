"""
Universal Length Generalization with Turing Programs
Kaiying Hou, David Brandfonbrener, Sham M. Kakade, Samy Jelassi, Eran Malach. ICML 2025. arXiv:2407.03310
Official code: none. Hard-ALiBi is from Jelassi et al. 2024 (sjelassi/transformers_ssm_copy), here
common.GPT(pos="hard_alibi"): heads 1..H/2 see only their last 1..H/2 tokens, the others are NoPE.

Finding: write the chain of thought as a Turing machine's run, one tape per line (a copy of the last
line with a few local edits), and a small transformer learns the algorithm exactly; the paper adds
100-digit numbers at 98% exact match after training on <= 50 digits (Hard-ALiBi).
Measured, addition, 3 seeds: quick (train n 1..5, 499 s/seed on 1 CPU thread) exact in dist 0.98 (NoPE 0.98),
at n=10 0 (per-token 0.76 vs 0.23); full (train 1..20, H200) exact at n=40 0.94 ± 0.03, NoPE 0, answer-only 0.

    python turing_programs.py --preset smoke        # seconds (what pytest runs)
    python turing_programs.py                       # quick on CPU (full on CUDA)
    python turing_programs.py --device cuda         # full: addition trained to 20 digits, tested at 40
    python turing_programs.py --runs none:hard_alibi  # the answer-only ablation (same data stream)
    python turing_programs.py --context tokens --runs tp:hard_alibi,plain:hard_alibi   # the paper's window
    torchrun --standalone --nproc_per_node=2 turing_programs.py --preset smoke --device cpu

Glossary (ours -> paper): tp = Turing Program, steps joined by "|" (<|SEP|>); a..j = the digit under a
head (operands units first; mulm: msb); N / C = carry 0 / 1; context steps = a token sees its own and the
previous step (ours), context tokens = the last W tokens (the paper's test window, 500); plain = a
scratchpad without copying; none = answer only; n = digits per operand (drawn independently in training).

Does not include: in-context SGD; the ~150M model, 50 -> 100 digits; the RASP construction; the paper's token
layout (Figs 2/4 are images; ours keeps every stated rule), vocabulary (24 tokens; ours adds N C = * #, TM symbols).
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import NamedTuple

import common  # first: it reports a missing package in one line

import torch
import torch.nn as nn

NAME = "turing_programs"

VOCAB = (["<pad>", "<bos>", "<eos>", "|"] + [str(d) for d in range(10)] + list("abcdefghij")
         + ["+", "=", "*", "#", "N", "C"] + [f"Q{i}" for i in range(8)] + [f"s{i}" for i in range(8)])
TOK = common.Tokenizer(VOCAB)
PAD, BOS, EOS, SEP = TOK["<pad>"], TOK["<bos>"], TOK["<eos>"], TOK["|"]
D0, L0, Q0, S0 = TOK["0"], TOK["a"], TOK["Q0"], TOK["s0"]      # digit d = D0+d, marked digit = L0+d
PLUS, EQ, TIMES, HASH, NOC, CAR = (TOK[t] for t in "+ = * # N C".split())
PROMPT, COPY, HEAD, STATE, DIGIT = -1, 0, 1, 2, 3              # category of each token (-1: not trained)
CATS = ("copy", "head", "state", "digit")
TASKS = ("add", "mul1", "mulm", "rtm", "rtm8")
FORMATS = ("tp", "plain", "none")
POS = ("hard_alibi", "nope", "alibi", "rope")

# -----------------------------------------------------------------------------
# Config


@dataclass
class Config(common.BaseConfig):
    task: str = "add"             # add | mul1 (n x 1) | mulm (n x mul_m) | rtm / rtm8 (random TM, 3 / 8 symbols)
    runs: tuple[str, ...] = ("tp:hard_alibi", "tp:nope")  # models as format:pos (the scratchpad ablation:
                                  # --runs none:hard_alibi, the same data stream in its own run)
                                  # (format tp|plain|none; pos hard_alibi|nope|alibi|rope);
                                  # plain/none exist for add; every run sees the same data stream
    train_min: int = 1            # shortest operand / tape length n in training
    train_max: int = 5            # longest n in training (each operand's length drawn independently)
    eval_lens: tuple[int, ...] = (5, 8, 10)  # test lengths n (both operands n digits): train max, 1.5x, 2x
    mul_m: int = 3                # digits of the second factor for mulm (paper: 3)
    digits: str = "lsb"           # add, mul1: operand digit order as written, lsb (least significant first:
                                  # heads move right, placing one is a lag-one copy) | msb (heads move left)
    n_layer: int = 4              # transformer blocks
    n_head: int = 4               # heads per block
    n_embd: int = 64              # model width
    hard_windows: tuple[int, ...] = ()  # Hard-ALiBi window per head (0 = NoPE head); empty: 1..H/2, rest NoPE
    init: str = "fan_in"          # fan_in: PyTorch default Linear init + N(0,1) embedding; gpt2: std 0.02
    block: int = 128              # training context T (tokens per row)
    context: str = "steps"        # steps: every token attends to its own and the previous TP step (line), in
                                  # every layer; tokens: the paper's test-time window of the last W tokens
    window: int = 0               # context=tokens: test window W (even; 0: = block); oldest W/2 dropped when full
    batch_size: int = 32          # rows per step (global: split over torchrun ranks)
    steps: int = 1500             # optimizer steps per model (seed 0, held-out n=7, Hard-ALiBi exact:
                                  # 900 steps 0.13, 1500 0.32, 1800 0.38; time grows with the steps)
    lr: float = 5e-3              # peak AdamW learning rate
    warmup: int = 100             # linear warmup steps, then cosine to 10%
    weight_decay: float = 0.1     # AdamW weight decay (official: 0.1)
    beta2: float = 0.98           # AdamW beta2
    grad_clip: float = 1.0        # gradient-norm clip
    eval_samples: int = 100       # test programs per length (and for the in-distribution score)
    eval_every: int = 250         # steps between progress evals (token accuracy in distribution); 0 = off
    log_every: int = 10           # steps between loss records
    rtm_seed: int = 12345         # seed of the one random Turing machine (random.Random)

    POSITIVE = ("train_min", "train_max", "mul_m", "n_layer", "n_head", "n_embd", "block", "steps",
                "eval_samples", "log_every")
    GLOBAL_BATCH = ("batch_size",)

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"unknown task '{self.task}' (choose {', '.join(TASKS)})")
        self.runs, self.eval_lens, self.hard_windows = tuple(self.runs), tuple(self.eval_lens), tuple(self.hard_windows)
        for r in self.runs:
            fmt, _, pos = r.partition(":")
            if fmt not in FORMATS or pos not in POS:
                raise ValueError(f"--runs: bad '{r}' (use format:pos, format in {FORMATS}, pos in {POS})")
            if fmt != "tp" and self.task != "add":
                raise ValueError(f"--runs: format '{fmt}' exists for task add only (use tp)")
            if self.task.startswith("rtm") and self.context == "steps":
                raise ValueError("--task rtm stops after n steps, a count two steps do not show: use --context tokens")
            if fmt == "plain" and self.context == "steps":
                raise ValueError("--runs: a plain scratchpad reads the prompt in every line: use --context tokens")
        if len(set(self.runs)) != len(self.runs):
            raise ValueError("--runs: each format:pos once")
        if self.train_min > self.train_max:
            raise ValueError("--train-min must be <= --train-max")
        if min(self.eval_lens) < 1:
            raise ValueError("--eval-lens must be >= 1")
        if self.task == "mulm" and self.mul_m > 9:
            raise ValueError("--mul-m must be in 1..9")
        if self.n_embd % self.n_head:
            raise ValueError(f"--n-embd {self.n_embd} is not divisible by --n-head {self.n_head}")
        if self.hard_windows and len(self.hard_windows) != self.n_head:
            raise ValueError("--hard-windows needs one entry per head")
        if self.init not in ("fan_in", "gpt2"):
            raise ValueError("--init must be fan_in or gpt2")
        if self.digits not in ("lsb", "msb"):
            raise ValueError("--digits must be lsb or msb")
        if self.context not in ("steps", "tokens"):
            raise ValueError("--context must be steps or tokens")
        if self.window % 2:
            raise ValueError("--window must be even")
        self.window = self.window or self.block
        longest = max(line_len(self.task, n, self.mul_m) for n in (*self.eval_lens, self.train_max))
        if self.context == "tokens" and longest > self.window // 2:
            raise ValueError(f"a line of the longest length has {longest} tokens > window/2 = "
                             f"{self.window // 2}: raise --window/--block or lower --eval-lens")


PRESETS = {
    "smoke": dict(train_max=3, eval_lens=(3, 5), n_layer=2, n_embd=32, block=64, batch_size=16, steps=60,
                  warmup=10, lr=1e-2, eval_samples=20, eval_every=30, runs=("tp:hard_alibi", "tp:nope")),
    "quick": dict(),
    # full (4.7M params, 4000 steps of 16k tokens a run): seeds 0-2 measured on an H200, one run a process with
    # 5-10 jobs sharing it, ~215 s a run; the 3 runs in one process were not timed alone (see README).
    "full": dict(runs=("tp:hard_alibi", "tp:nope", "none:hard_alibi"), train_max=20, eval_lens=(20, 30, 40),
                 n_layer=6, n_head=8, n_embd=256, block=256, batch_size=64, steps=4000, lr=1e-3, warmup=200,
                 eval_every=1000),
}

# -----------------------------------------------------------------------------
# Data: Turing Program traces, batched over examples (Python loops run over TM steps only)


class Seqs(NamedTuple):
    tok: torch.Tensor    # (B, L) token ids, right-padded with <pad>
    cat: torch.Tensor    # (B, L) category: -1 prompt / pad, 0 copy, 1 head, 2 state, 3 new digit
    valid: torch.Tensor  # (B, L) True on real tokens


def _assemble(pieces, B) -> Seqs:
    """pieces: (tokens, category[, valid]) with tokens / category a (B, k) tensor or an int and valid a
    (B, k) or (B, 1) bool tensor (default: all valid) -> one Seqs; each row's valid tokens are moved to
    its front (rows end in <pad>)."""
    toks, cats, valids = [], [], []
    for t, c, *v in pieces:
        t = torch.full((B, 1), t, dtype=torch.long) if isinstance(t, int) else t.long()
        toks.append(t)
        cats.append(torch.full_like(t, c) if isinstance(c, int) else c.long())
        valids.append(v[0].expand_as(t) if v else torch.ones_like(t, dtype=torch.bool))
    tok, cat, valid = torch.cat(toks, 1), torch.cat(cats, 1), torch.cat(valids, 1)
    if not valid.all():                                    # left-pack the real tokens of every row
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :int(valid.sum(1).max())]
        tok, cat, valid = (x.gather(1, order) for x in (tok, cat, valid))
    return Seqs(tok.masked_fill(~valid, PAD), cat.masked_fill(~valid, PROMPT).to(torch.int8), valid)


def _concat(seqs) -> Seqs:
    """Rows of several Seqs in one, right-padded to the longest."""
    L = max(s.tok.shape[1] for s in seqs)
    pad = lambda x, v: torch.cat([x, torch.full((len(x), L - x.shape[1]), v, dtype=x.dtype)], 1)
    return Seqs(*(torch.cat([pad(getattr(s, f), v) for s in seqs]) for f, v in
                  (("tok", PAD), ("cat", PROMPT), ("valid", False))))


def _marked(x, col):
    """Digits x (B, n) as tokens with the digit at column `col` written as a letter (a head)."""
    tok, cat = D0 + x, torch.full_like(x, COPY)
    if 0 <= col < x.shape[1]:
        tok[:, col], cat[:, col] = L0 + x[:, col], HEAD
    return tok, cat


def line_len(task, n, m=3) -> int:
    """Longest TP line (incl. separator) for operand / tape length n: the window must hold two lines."""
    return {"add": 3 * n + 4, "mul1": 2 * n + 6, "mulm": 2 * n + 2 * m + 6}.get(task, n + 4)


def addition(a, b, fmt="tp", la=None, lb=None, lsb=True) -> Seqs:
    """a + b; a: (B, na), b: (B, nb) digits, most significant first. la, lb: optional (B,) lengths per
    row (row i adds the last la[i] digits of a to the last lb[i] of b): one call for mixed lengths.
    lsb: operands are written least significant digit first (543 + 879 as 3 4 5 + 9 7 8), so the heads
    move right, in writing order: a head goes on the cell after the one that was a letter in the line
    above (a lag-one copy); msb-first (lsb=False) needs a look-ahead (the cell before the old letter).

    Turing Program (a 2-head TM; a line = carry state N/C, the sum digits so far, '=', the operands with
    the heads as letters; a head that has left its operand reads 0; the last line starts with the answer):
        <bos> 3 4 5 + 9 7 8 |
        N = d 4 5 + j 7 8 |            carry 0, no output yet, heads on the units
        C 2 = 3 e 5 + 9 h 8 |          3+9+0 = 12: carry 1, digit 2 (read from the last line), heads move
        C 2 2 = 3 4 f + 9 7 i |        4+7+1 = 12
        1 4 2 2 = 3 4 5 + 9 7 8 <eos>  5+8+1 = 14; answer = 1422 (most significant first)
    The state and new digit come first, so they are written before this line has any head letters:
    the only letters in the two-step context are then the ones they read.
    "plain" (no copying; one column per line: digits, carry in, sum digit):
        <bos> 3 4 5 + 9 7 8 | 3 9 N 2 | 4 7 C 2 | 5 8 C 4 | = 1 4 2 2 <eos>
    "none" (answer only): <bos> 3 4 5 + 9 7 8 | = 1 4 2 2 <eos>
    """
    B, N = len(a), max(a.shape[1], b.shape[1])
    la = torch.full((B,), a.shape[1]) if la is None else la
    lb = torch.full((B,), b.shape[1]) if lb is None else lb
    j = torch.arange(N)
    va, vb = j >= N - la[:, None], j >= N - lb[:, None]   # (B, N) which cells hold a digit
    a = torch.cat([a.new_zeros(B, N - a.shape[1]), a], 1) * va
    b = torch.cat([b.new_zeros(B, N - b.shape[1]), b], 1) * vb
    K = torch.maximum(la, lb)[:, None]                     # (B, 1) steps of row i
    carry, carries, sums = torch.zeros(B, dtype=torch.long), [], torch.zeros(B, N + 1, dtype=torch.long)
    for k in range(N):                                     # schoolbook, right to left (column k)
        carries.append(carry)
        t = a[:, N - 1 - k] + b[:, N - 1 - k] + carry      # s_k = (a_k + b_k + c_k) mod 10
        sums[:, N - k], carry = t % 10, t // 10            # c_{k+1} = floor(. / 10)
    sums[:, 0] = carry                                     # row i's final carry sits in column K_i
    wa, wb, wva, wvb = (x.flip(1) if lsb else x for x in (a, b, va, vb))  # operands as written
    head = lambda k: k if lsb else N - 1 - k               # column of the heads in step k, as written
    pieces = [(BOS, PROMPT), (D0 + wa, PROMPT, wva), (PLUS, PROMPT), (D0 + wb, PROMPT, wvb), (SEP, PROMPT)]
    if fmt == "tp":
        for k in range(N + 1):
            on, last = k <= K, k == K                      # (B, 1): row has a step k / it is its last
            state = torch.where(last[:, 0], D0 + sums[:, N - k], NOC + (CAR - NOC) * carries[min(k, N - 1)])
            pieces.append((state[:, None], STATE, on))
            if k:
                pieces += [(D0 + sums[:, N + 1 - k:N + 2 - k], DIGIT, on), (D0 + sums[:, N + 2 - k:], COPY, on)]
            (ta, ca), (tb, cb) = _marked(wa, head(k)), _marked(wb, head(k))
            pieces += [(EQ, COPY, on), (ta, ca, wva & on), (PLUS, COPY, on), (tb, cb, wvb & on),
                       (torch.where(last, EOS, SEP), COPY, on)]
    else:
        if fmt == "plain":
            for k in range(N):
                on, st = k < K, NOC + (CAR - NOC) * carries[k]
                pieces += [(D0 + a[:, N - 1 - k:N - k], COPY, on), (D0 + b[:, N - 1 - k:N - k], COPY, on),
                           (st[:, None], STATE, on), (D0 + sums[:, N - k:N + 1 - k], DIGIT, on), (SEP, COPY, on)]
        pieces += [(EQ, COPY), (D0 + sums, DIGIT, torch.arange(N + 1) >= N - K), (EOS, COPY)]
    return _assemble(pieces, B)


def mul1(a, d, lsb=True) -> Seqs:
    """n x 1 multiplication; a: (B, n) digits (most significant first), d: (B, 1). State = '#' + carry
    digit 0..8; same layout as addition's, a written units first when lsb (the head moves right):
        <bos> 9 2 7 4 * 8 | # 0 = j 2 7 4 * 8 | # 7 2 = 9 c 7 4 * 8 | # 2 3 2 = 9 2 h 4 * 8 |
        # 5 8 3 2 = 9 2 7 e * 8 | 3 7 8 3 2 = 9 2 7 4 * 8 <eos>           4729 x 8 = 37832
    """
    B, n = a.shape
    carry, carries, prod = torch.zeros(B, dtype=torch.long), [], a.new_zeros(B, n + 1)
    for k in range(n):
        carries.append(carry)
        t = a[:, n - 1 - k] * d[:, 0] + carry
        prod[:, n - k], carry = t % 10, t // 10
    prod[:, 0] = carry
    wa = a.flip(1) if lsb else a                           # a as written
    pieces = [(BOS, PROMPT), (D0 + wa, PROMPT), (TIMES, PROMPT), (D0 + d, PROMPT), (SEP, PROMPT)]
    for k in range(n + 1):
        if k < n:
            pieces += [(HASH, COPY), ((D0 + carries[k])[:, None], STATE)]
        else:
            pieces.append(((D0 + prod[:, 0])[:, None], STATE))
        if k:
            pieces += [(D0 + prod[:, n + 1 - k:n + 2 - k], DIGIT), (D0 + prod[:, n + 2 - k:], COPY)]
        ta, ca = _marked(wa, k if lsb else n - 1 - k)
        pieces += [(EQ, COPY), (ta, ca), (TIMES, COPY), (D0 + d, COPY), (EOS if k == n else SEP, COPY)]
    return _assemble(pieces, B)


def mulm(a, b) -> Seqs:
    """n x m multiplication with 3 heads (digit of a, digit of b, accumulator column); the accumulator
    has n+m digits; pass j adds a * b_j into it shifted by j, one TM step per line:
        <bos> 4 7 * 2 3 | 4 h * 2 d = # 0 0 0 0 a | e 7 * 2 d = # 2 0 0 a 1 | 4 7 * 2 d = # 1 0 a 4 1 |
        4 h * c 3 = # 0 0 1 e 1 | e 7 * c 3 = # 1 0 b 8 1 | 4 7 * c 3 = # 1 a 0 8 1 | 4 7 * 2 3 = 1 0 8 1 <eos>
    """
    (B, n), m = a.shape, b.shape[1]
    acc, carry, written = a.new_zeros(B, n + m), torch.zeros(B, dtype=torch.long), -1
    pieces = [(BOS, PROMPT), (D0 + a, PROMPT), (TIMES, PROMPT), (D0 + b, PROMPT), (SEP, PROMPT)]

    def acc_line(head_col):
        tok, cat = _marked(acc, n + m - 1 - head_col)
        if written >= 0 and written != head_col:
            cat[:, n + m - 1 - written] = DIGIT            # the cell the previous step wrote
        return tok, cat

    for j in range(m):
        for i in range(n + 1):
            ta, ca = _marked(a, n - 1 - i)
            tb, cb = _marked(b, m - 1 - j)
            pieces += [(ta, ca), (TIMES, COPY), (tb, cb), (EQ, COPY), (HASH, COPY),
                       ((D0 + carry)[:, None], STATE), acc_line(j + i), (SEP, COPY)]
            idx = n + m - 1 - (j + i)                      # accumulator column j+i (from the right)
            if i < n:
                t = a[:, n - 1 - i] * b[:, m - 1 - j] + acc[:, idx] + carry
                acc[:, idx], carry = t % 10, t // 10
            else:                                          # column j+n is still 0: no further carry
                acc[:, idx], carry = acc[:, idx] + carry, torch.zeros_like(carry)
            written = j + i
    tok, cat = _marked(acc, -1)
    cat[:, n + m - 1 - written] = DIGIT
    pieces += [(D0 + a, COPY), (TIMES, COPY), (D0 + b, COPY), (EQ, COPY), (tok, cat), (EOS, COPY)]
    return _assemble(pieces, B)


class TM:
    """A one-tape Turing machine: delta[q][s] = (q', s', move); symbol 0 is the blank.

    Conventions (ours): the head starts on cell 0 in state 0; moving left at cell 0 stays there;
    moving right off the tape appends a blank. A configuration is written Sipser-style with the
    state token just left of the head cell: s1 s1 Q2 s1 s2 = tape s1 s1 s1 s2, head on cell 2, state 2.
    """

    def __init__(self, delta):
        self.delta = [list(map(tuple, row)) for row in delta]
        self.n_states, self.n_syms = len(delta), len(delta[0])
        d = torch.tensor(self.delta, dtype=torch.long)    # (Q, K, 3)
        self.next_q, self.write, self.move = d[..., 0], d[..., 1], d[..., 2]

    @classmethod
    def random(cls, n_states, n_syms, rng):
        """rng: a random.Random. Every (q, s): q' uniform, s' uniform non-blank, move uniform in {L, R}."""
        return cls([[(rng.randrange(n_states), rng.randrange(1, n_syms), rng.choice((-1, 1)))
                     for _ in range(n_syms)] for _ in range(n_states)])

    def run(self, tape, steps):
        """Reference simulator on one tape (a list): returns [(state, head, tape copy)] of steps+1 configs."""
        tape, q, h = list(tape), 0, 0
        confs = [(q, h, list(tape))]
        for _ in range(steps):
            q, tape[h], mv = self.delta[q][tape[h]]
            h = max(0, h + mv)
            if h == len(tape):
                tape.append(0)
            confs.append((q, h, list(tape)))
        return confs

    def run_batch(self, inp, steps):
        """Batched simulator. inp: (B, n) symbols. Returns states, heads (B, steps+1), tapes
        (B, steps+1, width) and tape lengths (B, steps+1)."""
        B, n = inp.shape
        tape = torch.zeros(B, max(n, steps + 1), dtype=torch.long)
        tape[:, :n] = inp
        q, h, ln = torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long), torch.full((B,), n)
        ar = torch.arange(B)
        qs, hs, tapes, lens = [q], [h], [tape.clone()], [ln]
        for _ in range(steps):
            s = tape[ar, h]
            tape[ar, h] = self.write[q, s]                 # write, then move, then change state
            h = (h + self.move[q, s]).clamp(min=0)
            q = self.next_q[q, s]
            ln = torch.maximum(ln, h + 1)                  # right edge: a blank was appended
            qs.append(q), hs.append(h), tapes.append(tape.clone()), lens.append(ln)
        return torch.stack(qs, 1), torch.stack(hs, 1), torch.stack(tapes, 1), torch.stack(lens, 1)


def random_tm(tm: TM, inp) -> Seqs:
    """Turing Program of `tm` run for n steps on input (B, n) of non-blank symbols, e.g. (K=3):
        <bos> s2 s2 s1 | Q0 s2 s2 s1 | s1 Q3 s2 s1 | s1 s1 Q2 s1 | s1 s1 s2 Q1 s0 <eos>
    Lines can differ in length between examples (right-edge growth): rows are right-padded."""
    B, n = inp.shape
    qs, hs, tapes, lens = tm.run_batch(inp, n)
    width = tapes.shape[2]
    j = torch.arange(width + 1)
    pieces = [(BOS, PROMPT), (S0 + inp, PROMPT), (SEP, PROMPT)]
    for t in range(n + 1):
        h, tape = hs[:, t:t + 1], tapes[:, t]
        cell = torch.where(j < h, j, j - 1).clamp(0, width - 1)   # token j shows cell j (left of head) or j-1
        tok = torch.where(j == h, Q0 + qs[:, t:t + 1], S0 + tape.gather(1, cell.expand(B, -1)))
        cat = torch.where(j == h, STATE, COPY)
        if t:                                              # the cell written by the previous step
            hp = hs[:, t - 1:t]
            cat = torch.where(j == torch.where(hp < h, hp, hp + 1), DIGIT, cat)
        pieces += [(tok, cat, j <= lens[:, t:t + 1]), (EOS if t == n else SEP, COPY)]
    return _assemble(pieces, B)


class Task:
    """The configured task: lengths(count, lo, hi, gen) -> (count, k) operand lengths (addition draws
    each operand's length independently, as the paper does); sample(lens, count, gen, fmt) -> Seqs."""

    def __init__(self, name, mul_m=3, rtm_seed=12345, lsb=True):
        self.name, self.mul_m, self.lsb = name, mul_m, lsb
        self.tm = TM.random(4, 3 if name == "rtm" else 8, random.Random(rtm_seed)) if name.startswith("rtm") else None

    def lengths(self, count, lo, hi, gen):
        return torch.randint(lo, hi + 1, (count, 2 if self.name == "add" else 1), generator=gen)

    def at(self, n):                                       # the test case "length n": both operands n digits
        return (n, n) if self.name == "add" else (n,)

    def sample(self, lens, gen, fmt="tp") -> Seqs:
        """lens: (count, k) operand lengths, one row per program."""
        dig = lambda count, k: torch.randint(0, 10, (count, k), generator=gen)
        if self.name == "add":                             # mixed lengths in one batched call
            N = int(lens.max())
            return addition(dig(len(lens), N), dig(len(lens), N), fmt, lens[:, 0], lens[:, 1], self.lsb)
        out = []
        for n in lens[:, 0].unique().tolist():             # one group per length
            count = int((lens[:, 0] == n).sum())
            if self.name == "mul1":
                out.append(mul1(dig(count, n), dig(count, 1), self.lsb))
            elif self.name == "mulm":
                out.append(mulm(dig(count, n), dig(count, self.mul_m)))
            else:
                out.append(random_tm(self.tm, torch.randint(1, self.tm.n_syms, (count, n), generator=gen)))
        return _concat(out)


def parse_answer(tokens) -> str:
    """The answer of a trace (token strings or ids): in the last line, the side of '=' without an
    operator (arithmetic), or the whole last configuration (random TMs)."""
    toks = [VOCAB[t] if isinstance(t, int) else t for t in tokens]
    toks = toks[:toks.index("<eos>")] if "<eos>" in toks else toks
    last = toks[len(toks) - toks[::-1].index("|"):] if "|" in toks else toks
    if "=" in last:
        left, right = last[:last.index("=")], last[last.index("=") + 1:]
        return "".join(right if "+" in left or "*" in left or not left else left)
    return " ".join(last)


def parse_configs(tokens):
    """A random-TM trace (token strings or ids) back to the machine's run: [(state, head, tape)]."""
    toks = [VOCAB[t] if isinstance(t, int) else t for t in tokens]
    toks = [t for t in toks if t not in ("<bos>", "<pad>")]
    toks = toks[:toks.index("<eos>")] if "<eos>" in toks else toks
    lines = [line.split() for line in " ".join(toks).split("|")]
    confs = []
    for line in lines[1:]:                                 # lines[0] is the prompt
        h = next(i for i, t in enumerate(line) if t[0] == "Q")
        confs.append((int(line[h][1:]), h, [int(t[1:]) for t in line[:h] + line[h + 1:]]))
    return confs


def step_ids(tok):
    """(B, T) index of the step (line) of every token: a step starts at each '|' (which predicts the
    step's first token, so it belongs to it) and at <bos> (a new program)."""
    return ((tok == SEP) | (tok == BOS)).long().cumsum(1)


def step_mask(tok):
    """(B, T, T) bool, True where query i may attend to key j: j lies in i's step or the step before
    (causality is added by the attention itself). The prompt is the first step of a program."""
    ids = step_ids(tok)
    d = ids[:, :, None] - ids[:, None, :]
    return (d == 0) | (d == 1)


def stream_batch(task, fmt, B, T, lo, hi, gen, line_starts=False):
    """B training rows of T+1 tokens. Programs with lengths drawn by task.lengths are packed into one
    stream; row i starts inside program i (so late lines of long programs are trained) and runs on into
    the following programs: at a uniformly random token (windows start mid-sequence, as at test time),
    or with line_starts at a random step start ('|' or <bos>). Returns x, y (B, T) and the loss mask
    (B, T): 1 where the target is a program token (with line_starts: and x's step is not the row's
    first, which misses the step before it)."""
    lens = task.lengths(B + 8, lo, hi, gen)
    while True:                                           # enough programs behind the first B?
        tok, cat, valid = task.sample(lens, gen, fmt)
        n_tok = valid.sum(1)
        if int(n_tok[B:].sum()) >= T + 1:
            break
        lens = torch.cat([lens, task.lengths(B, lo, hi, gen)])
    stream, scat = tok[valid], cat[valid]                 # row-major: programs one after another
    starts = n_tok.cumsum(0) - n_tok
    off = starts[:B] + (torch.rand(B, generator=gen) * n_tok[:B]).long()
    if line_starts:                                       # move each offset back to the start of its step
        is_start = (stream == SEP) | (stream == BOS)
        off = torch.where(is_start, torch.arange(len(stream)), 0).cummax(0).values[off]
    idx = off[:, None] + torch.arange(T + 1)              # (B, T+1)
    rows, rcat = stream[idx], scat[idx]
    mask = (rcat[:, 1:] >= 0).float()
    if line_starts:
        ids = step_ids(rows[:, :-1])
        mask = mask * (ids > ids[:, :1])
    return rows[:, :-1], rows[:, 1:], mask

# -----------------------------------------------------------------------------
# Model: common.GPT with the positional scheme by name (Hard-ALiBi: heads 1..H/2 see their last
# 1..H/2 tokens, the others are NoPE, as in the official hard_alibi_model.py)


def build_model(cfg: Config, pos: str) -> common.GPT:
    gcfg = common.GPTConfig(vocab_size=len(VOCAB), block_size=cfg.block, n_layer=cfg.n_layer,
                            n_head=cfg.n_head, n_embd=cfg.n_embd, pos=pos, tie_weights=False,
                            hard_windows=cfg.hard_windows if pos == "hard_alibi" else (), init=cfg.init)
    model = common.GPT(gcfg)
    if cfg.init == "fan_in":  # a unit-scale embedding: std 0.02 made d=64 models learn ~3x slower
        nn.init.normal_(model.wte.weight, 0.0, 1.0)
    return model

# -----------------------------------------------------------------------------
# Training loop


def train(model, cfg: Config, get_batch, desc="train", eval_fn=None):
    """AdamW, warmup + cosine; next-token loss on program tokens only (the prompt is random);
    the global batch is split over torchrun ranks (token-weighted loss)."""
    device = torch.device(cfg.device)
    opt = common.configure_adamw(model, cfg.lr, cfg.weight_decay, betas=(0.9, cfg.beta2))
    fwd = common.wrap_ddp(model, device)
    fwd = torch.compile(fwd) if cfg.compile else fwd
    hist, t0 = {"step": [], "loss": [], "eval_step": [], "eval_tok": []}, time.time()
    bar = common.progress(range(cfg.steps), desc)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = common.lr_at(step, cfg.steps, cfg.lr, cfg.warmup)
        x, y, mask = common.shard(*get_batch(step))       # this rank's rows of the global batch
        amask = step_mask(x) if cfg.context == "steps" else None  # attend to this step and the last
        with common.autocast(device):
            logits = fwd(x, attn_mask=amask)[0]
            loss = common.token_mean(*common.cross_entropy_sum(logits, y, mask))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            hist["step"].append(step)
            hist["loss"].append(common.global_mean(loss))
            bar.set_postfix_str(common.step_log(step + 1, cfg.steps, t0, loss=hist["loss"][-1]))
        if eval_fn and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and common.is_main():
            hist["eval_step"].append(step + 1)            # rank 0 evaluates; nothing depends on it
            hist["eval_tok"].append(eval_fn(model))
            model.train()
    hist["time_s"] = time.time() - t0
    return hist

# -----------------------------------------------------------------------------
# Evaluation: exact match of the whole program under the test-time context


@torch.no_grad()
def predict(model, idx, W):
    """Teacher-forced argmax at every position of idx (B, L). W = 0: the step context (one forward with
    step_mask); W > 0: the paper's token window (strided_argmax). Either equals greedy decoding."""
    if W == 0:
        return model(idx, attn_mask=step_mask(idx))[0].argmax(-1)
    return strided_argmax(model, idx, W)


def crop_start(t: int, W: int) -> int:
    """First context token for predicting after position t: greedy decoding that keeps at most W tokens
    and drops the oldest W/2 whenever the context is full."""
    if t < W:
        return 0
    S = W // 2
    return (t // S - 1) * S


@torch.no_grad()
def strided_argmax(model, idx, W):
    """Teacher-forced argmax at every position t of idx (B, L), each seeing tokens [crop_start(t, W), t].
    Window [s, s+W) serves positions [s+W/2, s+W): about 2 forwards per W tokens. For a deterministic
    target this is exactly greedy decoding with that window (all right <=> the decoded program is right)."""
    B, L = idx.shape
    if L <= W:
        return model(idx)[0].argmax(-1)
    S = W // 2
    out = torch.empty(B, L, dtype=torch.long, device=idx.device)
    out[:, :W] = model(idx[:, :W])[0].argmax(-1)
    s = S
    while s + S < L:
        e = min(s + W, L)
        out[:, s + S:e] = model(idx[:, s:e])[0].argmax(-1)[:, S:]
        s += S
    return out


@torch.no_grad()
def greedy_decode(model, prompt, new_tokens, W):
    """Plain greedy decoding (the reference of the tests). prompt: (B, P). W > 0: crop to the token
    window and re-encode; W = 0: the step context, one token at a time with a KV cache."""
    idx, cache = prompt, model.new_cache()
    logits = model(idx, attn_mask=step_mask(idx), cache=cache)[0] if W == 0 else None
    for _ in range(new_tokens):
        if W:
            logits = model(idx[:, crop_start(idx.shape[1] - 1, W):])[0]
        nxt = logits[:, -1].argmax(-1)
        idx = torch.cat([idx, nxt[:, None]], 1)
        if W == 0:                                        # the new token's row of the step mask
            logits = model(idx[:, -1:], attn_mask=step_mask(idx)[:, -1:], cache=cache)[0]
    return idx


def score(pred, s: Seqs) -> dict:
    """[right, total] counts for one batch: whole programs ("exact"), program tokens ("tok") and tokens
    of each category. pred: (B, L) argmax at every position (pred[:, t] predicts token t+1)."""
    tgt, cat = s.tok[:, 1:], s.cat[:, 1:].long()
    scored = cat >= 0                                     # program tokens (pads and prompt are -1)
    ok = (pred[:, :-1].cpu() == tgt) | ~scored
    out = {"exact": [int(ok.all(1).sum()), len(tgt)], "tok": [int((ok & scored).sum()), int(scored.sum())]}
    for c, name in enumerate(CATS):
        out[name] = [int((ok & (cat == c)).sum()), int((cat == c).sum())]
    return out


@torch.no_grad()
def evaluate(model, task, fmt, lens, W, device, seed, bs=50) -> dict:
    """Exact match of the whole program and per-token accuracy (overall and by category) on fresh
    programs; lens: (num, k) operand lengths, one row per program."""
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    lens = lens[torch.argsort(lens.sum(1), stable=True)]  # similar lengths share a batch (less padding)
    tot = {name: [0, 0] for name in ("exact", "tok") + CATS}
    for chunk in lens.split(bs):
        s = task.sample(chunk, gen, fmt)
        rows = max(1, int(2e8 // s.tok.shape[1] ** 2))     # the (rows, H, L, L) attention bias must fit
        with common.autocast(device):
            pred = torch.cat([predict(model, t.to(device), W) for t in s.tok.split(rows)])
        part = score(pred, s)
        for name, (right, total) in part.items():
            tot[name][0] += right
            tot[name][1] += total
    return {name: right / total for name, (right, total) in tot.items() if total}

# -----------------------------------------------------------------------------
# Experiments


def train_and_test(cfg: Config, task: Task, fmt: str, pos: str) -> tuple[dict, dict]:
    """Train one model on `fmt` programs with positional scheme `pos`; test it in distribution and at
    every eval length. Every run of a seed sees the same data stream."""
    device = torch.device(cfg.device)
    common.set_seed(cfg.seed)
    model = build_model(cfg, pos).to(device)
    gen, buf = torch.Generator().manual_seed(cfg.seed), []

    def get_batch(step):  # 16 batches at a time: the per-line Python loop is then amortized
        if not buf:
            B = cfg.batch_size
            x, y, mask = stream_batch(task, fmt, 16 * B, cfg.block, cfg.train_min, cfg.train_max, gen,
                                      line_starts=cfg.context == "steps")
            buf.extend(zip(x.split(B), y.split(B), mask.split(B)))
        return tuple(t.to(device, non_blocking=True) for t in buf.pop(0))

    in_dist = task.lengths(cfg.eval_samples, cfg.train_min, cfg.train_max, torch.Generator().manual_seed(cfg.seed + 7))
    W = 0 if cfg.context == "steps" else cfg.window
    eval_fn = lambda m: evaluate(m, task, fmt, in_dist[:32], W, device, seed=cfg.seed + 999)["tok"]
    hist = train(model, cfg, get_batch, desc=f"{fmt}/{pos}", eval_fn=eval_fn)
    m, key = {}, (task.name, fmt, pos)
    if not common.is_main():
        return m, hist
    res = evaluate(model, task, fmt, in_dist, W, device, seed=cfg.seed + 1000)
    m[common.mkey("exact_in_dist", *key)] = res["exact"]
    m[common.mkey("token_acc_in_dist", *key)] = res["tok"]
    for n in cfg.eval_lens:
        lens = torch.tensor([task.at(n)] * cfg.eval_samples)
        res = evaluate(model, task, fmt, lens, W, device, seed=cfg.seed + 1000 + n)
        m[common.mkey("exact", *key, f"L{n}")] = res["exact"]
        m[common.mkey("token_acc", *key, f"L{n}")] = res["tok"]
        for c in CATS:
            if c in res and fmt == "tp":
                m[common.mkey("token_acc", *key, f"L{n}", c)] = res[c]
    tail = hist["loss"][-max(1, len(hist["loss"]) // 10):]
    m[common.mkey("final_loss", *key)] = sum(tail) / len(tail)  # mean over the last 10% of records
    m[common.mkey("params", *key)] = common.count_params(model)
    return m, hist


def exp_runs(cfg: Config) -> tuple[dict, dict, dict]:
    """Every format:pos of --runs on the same task and data: Hard-ALiBi vs other positional schemes
    (TP format), and the scratchpad ablation (the same Hard-ALiBi model on plain / answer-only data)."""
    task = Task(cfg.task, cfg.mul_m, cfg.rtm_seed, cfg.digits == "lsb")
    metrics, history, timings = {}, {}, {}
    for r in cfg.runs:
        fmt, _, pos = r.partition(":")
        m, hist = train_and_test(cfg, task, fmt, pos)
        metrics.update(m)
        timings[r] = hist.pop("time_s")
        history[r] = hist
        common.save_results(NAME, cfg, metrics, partial=True)
    return metrics, history, timings


def run_seed(cfg: Config):
    metrics, history, timings = exp_runs(cfg)
    return metrics, {"history": history, "timings": timings}


PAPER = {"add": "98% exact at 2x (50 -> 100 digits)", "mul1": "97% exact at 2x", "mulm": "97% exact at 2x",
         "rtm": "near-perfect at ~2x", "rtm8": "near-perfect at ~2x"}


def run(cfg: Config):
    t0 = time.time()
    runs = common.over_seeds(cfg, run_seed, NAME)
    wall = time.time() - t0
    if not common.is_main():                               # rank 0 evaluates, prints and writes
        return runs
    lens = list(cfg.eval_lens)
    rows, cat_rows = [], []
    for r in cfg.runs:
        fmt, _, pos = r.partition(":")
        key = (cfg.task, fmt, pos)
        rows.append([fmt, pos, runs.cell(common.mkey("exact_in_dist", *key))]
                    + [runs.cell(common.mkey("exact", *key, f"L{n}")) for n in lens]
                    + [runs.cell(common.mkey("token_acc", *key, f"L{n}")) for n in lens]
                    + [PAPER[cfg.task] if r == "tp:hard_alibi" else "-"])
        if fmt == "tp":
            cat_rows += [[pos, c] + [runs.cell(common.mkey("token_acc", *key, f"L{n}", c)) for n in lens] for c in CATS]
    common.print_table(rows, ["format", "pos", f"exact in dist ({cfg.train_min}..{cfg.train_max})"]
                       + [f"exact n={n}" for n in lens] + [f"token n={n}" for n in lens] + ["paper (tp:hard_alibi)"],
                       title=f"{cfg.task}: exact match of the whole program / per-token accuracy "
                             f"({len(runs.seeds)} seed(s), {cfg.eval_samples} programs per cell, context "
                             f"{cfg.context if cfg.context == 'steps' else f'{cfg.window} tokens'})")
    if cat_rows:                                          # tp runs only
        common.print_table(cat_rows, ["pos", "category"] + [f"n={n}" for n in lens],
                           title="Turing Program per-token accuracy by category")
    extra = runs.extras[0]
    common.save_results(NAME, cfg, runs, history=extra["history"], timings=extra["timings"], wall_time_s=wall,
                        info={"runs": list(cfg.runs), "paper": PAPER[cfg.task]})
    curves = {}
    for r in cfg.runs:
        fmt, _, pos = r.partition(":")
        keys = [common.mkey("exact", cfg.task, fmt, pos, f"L{n}") for n in lens]
        curves[r] = (lens, [runs.mean[k] for k in keys], [runs.std[k] for k in keys] if runs.std else None)
    common.plot(NAME, curves, out_dir=cfg.out, xlabel="n (digits per operand / tape length)",
                ylabel="exact match of the whole program", title=f"Turing Programs, {cfg.task}",
                shade=(cfg.train_min, cfg.train_max))
    print(f"wall time {wall:.0f} s")
    return runs


def main():
    cfg = common.parse_args(Config, PRESETS)
    with common.session(cfg):
        run(cfg)


if __name__ == "__main__":
    main()
