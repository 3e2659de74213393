"""
LoRA Soups: merging skill LoRAs by learnable concatenation (CAT), on a toy skill-composition task.

Paper: "LoRA Soups: Merging LoRAs for Practical Skill Composition Tasks", Akshara Prabhakar, Yuanzhi Li,
Karthik Narasimhan, Sham Kakade, Eran Malach, Samy Jelassi, 2024 (COLING 2025 Industry Track).
arXiv 2410.13025. Official implementation: https://github.com/aksh555/LoRA-Soups
(the CAT layer is learnable_lora/lora/layer.py; baselines use HF PEFT's add_weighted_adapter).

Finding: two LoRAs trained on two different skills can be merged into a model that does a *composite*
task neither was trained on. CAT keeps both adapters intact (a rank r1+r2 LoRA, no cross terms B_i A_j)
and learns one weight per adapter per module on 5% of the skill data; the paper reports it beats other
model merges by 43% and data mixing (one LoRA on both skills' data) by 12% on GSM-Hard.
The quick preset (a 0.4M-parameter GPT, d=128, trained here from scratch) prints, for two toy designs, the
exact-match accuracy of 13 methods on skill A, skill B and the composite, then the paper-vs-ours table:
  design A (composite = both skills inside one answer): CAT with the paper's free weights composes well
           above every other merge and both single LoRAs (seed 0: 0.907 vs 0.660 for the best other merge
           and <= 0.033 for a single LoRA). DATA-MIX also composes here (1.000): the maps are token-local;
  design B (composite = skill A's map in skill B's format, a pairing never in the skill data; the base's
           generic mixture also reverses strings behind '<', so skill B only teaches that '>' asks for it):
           DATA-MIX learns both skills but not the composite (0.120 at seed 0) and weight-space merges
           compose (TIES-dW 0.652, sum 0.510): the paper's "merging beats data mixing". CAT is not the best
           merge in design B (0.145): its weights are fit to the skill data, where the adapters conflict.
           Over seeds 0-4 (`--designs B --seeds 5`) the gap varies: best merge 0.652 / 0.290 / 0.175 / 0.217 /
           0.077 vs DATA-MIX 0.120 / 0.025 / 0.107 / 0.168 / 0.085 (clear at seeds 0-1, within noise at 2-3,
           lost at 4); merges compose only when skill B's reversal carries over to digits (a printed probe).
Width matters: at d=64 each LoRA learns its skill but every merge collapses (CAT 0.15, sum 0.06 on design A).

Run:
  python lora_cat.py --preset smoke      # seconds, what pytest runs
  python lora_cat.py                     # quick preset on CPU (about 5 minutes, one thread)
  python lora_cat.py --device cuda       # full preset: d=256, 4 layers, 5 seeds (about 25 min on an H100, estimated)

Glossary (ours -> paper):
  skill A / skill B          skill 1 (math) / skill 2 (code) data, one LoRA each (LoRA_1, LoRA_2)
  composite                  the target task (GSM-Hard: math solved in code)
  A_i, B_i, scaling          LoRA factors B_i A_i with scaling alpha/r (PEFT's lora_alpha / r)
  LoRALinear.w, mix="free"   the layer-wise alpha_1, alpha_2 of "W0 + alpha_1 B1A1 + alpha_2 B2A2" (paper's formula)
  LoRALinear.w, mix="softmax" lora_learnable_weights of the official code: softmax over adapters per module
  data_mix                   DATA-MIX: one LoRA on the union of both skills' data
  linear_ab / ties_ab / dare_ab   PEFT add_weighted_adapter combination_type linear / ties / dare_linear
                             (rules applied to the A and B factors separately: the baselines the paper ran)
  ties_dw / dare_dw          the same rules on the full task vectors Delta W_i = s B_i A_i (TIES/DARE papers)

Does not include: LLaMA-7B and the paper's real datasets (GSM-Hard, D&D/bio QA, reading comprehension,
prompt formats); LoraHub's gradient-free search; the MoE baseline; the official CAT details that need an
HF Trainer (validation split with load_best_model_at_end, loss on prompt tokens, random init of the
weights: we init free weights at 1 and softmax logits at 0); the 3-skill variant and the rank /
data-fraction sweeps suggested for a GPU run.
"""
from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# -----------------------------------------------------------------------------
# Config


@dataclass
class Config(common.BaseConfig):
    designs: tuple[str, ...] = ("A", "B")  # A: both skills in one answer; B: skill A's map in skill B's format
    # model (common.GPT, learned positions, pre-LN)
    n_embd: int = 128           # width d (d=64 works for each skill but the merges collapse: see README)
    n_layer: int = 2            # transformer blocks
    n_head: int = 4             # attention heads
    max_len: int = 6            # longest prompt / answer in design A (n in [2, max_len])
    max_len_b: int = 4          # the same in design B (short strings keep its skill LoRAs reliable and fast)
    batch: int = 64             # sequences per step (every phase)
    # base pretraining on the generic mixture (copying)
    pretrain_steps: int = 800   # AdamW steps
    pretrain_lr: float = 3e-3   # peak learning rate
    warmup: int = 50            # linear warmup steps for pretraining and LoRA training
    grad_clip: float = 0.0      # gradient-norm clip in every phase (0 = off)
    emb_std: float = 0.02       # init std of the token/position embeddings (common.GPT: 0.02)
    # skill LoRAs (design A uses rank/lora_steps, design B rank_b/lora_steps_b)
    rank: int = 4               # LoRA rank r in design A
    lora_steps: int = 400       # steps per skill LoRA in design A; DATA-MIX gets twice as many
    rank_b: int = 4             # LoRA rank r in design B
    lora_steps_b: int = 1000    # steps per skill LoRA in design B; DATA-MIX gets twice as many
    lora_lr_b: float = 5e-3     # LoRA learning rate in design B (skill LoRAs and DATA-MIX)
    lora_clip_b: float = 1.0    # gradient-norm clip of design B's LoRA training (0 = off)
    alpha_ratio: float = 2.0    # lora_alpha = alpha_ratio * r (paper: r=32, alpha=64)
    a_init: str = "peft"        # LoRA A init: peft (kaiming-uniform, what the paper ran) | normal (N(0, 1/in))
    lora_lr: float = 3e-3       # LoRA learning rate
    # CAT
    cat_frac: float = 0.05      # CAT trains on this fraction of the skill examples (paper: 5%)
    cat_lr: float = 5e-2        # learning rate of the per-module weights
    cat_epochs: int = 1         # passes over the fixed CAT pool (paper: 1 epoch)
    # merges (official eval: weights 1,1 and density 0.75)
    density: float = 0.75       # TIES / DARE keep-fraction
    # evaluation
    eval_n: int = 400           # held-out prompts per task (greedy exact match)

    def __post_init__(self):
        self.designs = tuple(d.upper() for d in self.designs)
        if not self.designs or any(d not in ("A", "B") for d in self.designs):
            raise ValueError(f"designs must be a subset of A,B (got {','.join(self.designs)})")
        if not 2 <= self.max_len <= 20 or not 2 <= self.max_len_b <= 20:
            raise ValueError("max_len and max_len_b must be in [2, 20]")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if min(self.n_layer, self.batch, self.rank, self.rank_b, self.pretrain_steps, self.lora_steps,
               self.lora_steps_b, self.eval_n) < 1:
            raise ValueError("sizes and step counts must be >= 1")
        if self.a_init not in ("peft", "normal"):
            raise ValueError(f"a_init must be peft or normal (got {self.a_init})")
        if self.cat_epochs < 1:
            raise ValueError("cat_epochs must be >= 1")
        if not 0 < self.cat_frac <= 1 or not 0 < self.density <= 1:
            raise ValueError("cat_frac and density must be in (0, 1]")
        if self.batch % 2:
            raise ValueError("batch must be even (mixed batches are half skill A, half skill B)")


PRESETS = {
    "smoke": dict(n_embd=32, n_layer=1, pretrain_steps=200, pretrain_lr=1e-2, lora_steps=150, lora_steps_b=150,
                  lora_lr=1e-2, lora_lr_b=1e-2, warmup=10, eval_n=64, cat_frac=0.1),
    "quick": dict(),
    "full": dict(n_embd=256, n_layer=4, n_head=8, batch=256, pretrain_steps=5000, warmup=200, rank=8,
                 lora_steps=1000, lora_steps_b=1000, pretrain_lr=1e-3, lora_lr=1e-3, lora_lr_b=2e-3, seeds=5),
}

# -----------------------------------------------------------------------------
# Data: vocabulary, the two skills and their composite (batched tensor code)

VOCAB = ["<pad>", "<bos>", ";", "=", ">"] + list("0123456789") + list("abcdefghij") + ["<"]
TOK = common.Tokenizer(VOCAB)
PAD, BOS, END, EQ, GT = range(5)
LT = VOCAB.index("<")            # design B's pretraining only: '<' asks the base to reverse
DIGITS = torch.arange(5, 15)
LETTERS = torch.arange(15, 25)
TASKS = ("skill_a", "skill_b", "composite")
PROBES = ("g_behind_gt", "reverse_digits")                              # design B only (see sample_task)


def skill_maps(seed_g: int = 123, seed_h: int = 456) -> torch.Tensor:
    """(V,) lookup table: digits -> g(digit), letters -> h(letter), other tokens -> themselves.
    g and h are fixed random permutations (the 'math' and 'code' skills of design A)."""
    table = torch.arange(len(VOCAB))
    for ids, seed in ((DIGITS, seed_g), (LETTERS, seed_h)):
        perm = ids.tolist()
        random.Random(seed).shuffle(perm)
        table[ids] = torch.tensor(perm)
    return table


def reverse_prefix(x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Reverse the first n[b] tokens of each row of x (B, L); the rest is left as is."""
    i = torch.arange(x.shape[1])[None]
    idx = torch.where(i < n[:, None], n[:, None] - 1 - i, i)
    return x.gather(1, idx)


def sample_task(design: str, task: str, B: int, gen: torch.Generator, maps: torch.Tensor, max_len: int = 6):
    """B examples of one task -> (prompt (B, L), answer (B, L), n (B,), sep (B,)); only the first n used.

    design A  skill_a  digits  `3 1 4 =` -> g(3) g(1) g(4)
              skill_b  letters `c a f =` -> h(c) h(a) h(f)
              composite        `3 c a 1 =` -> g(3) h(c) h(a) g(1)   (n//2 digits, shuffled among letters)
    design B  skill_a  digits  `3 1 4 =` -> g(3) g(1) g(4)
              skill_b  letters `c a f >` -> f a c                   (the '>' format reverses)
              composite        `3 1 4 >` -> g(4) g(1) g(3)           (g in the '>' format: never in the data)
              probes: g_behind_gt `3 1 4 >` -> g(3) g(1) g(4); reverse_digits `3 1 4 >` -> 4 1 3
    copy (pretraining, the generic mixture): digits and letters `x1..xn =` -> x1..xn. Design B's mixture
              is a third each of `x =` -> x, `x >` -> x and `x <` -> reverse(x): the base can already
              reverse any string, and skill B teaches that '>' now asks for it (a format skill).
    """
    L = max_len
    n = torch.randint(2, L + 1, (B,), generator=gen)
    dig = DIGITS[torch.randint(0, 10, (B, L), generator=gen)]
    let = LETTERS[torch.randint(0, 10, (B, L), generator=gen)]
    sep = torch.full((B,), EQ)
    if task == "copy":
        x = torch.cat([DIGITS, LETTERS])[torch.randint(0, 20, (B, L), generator=gen)]
        if design == "B":
            u = torch.rand(B, generator=gen)
            sep = torch.where(u < 1 / 3, EQ, torch.where(u < 2 / 3, GT, LT))
            return x, torch.where((sep == LT)[:, None], reverse_prefix(x, n), x), n, sep
        return x, x, n, sep
    if task == "skill_a":
        return dig, maps[dig], n, sep
    if task == "skill_b" and design == "A":
        return let, maps[let], n, sep
    if task == "skill_b":
        return let, reverse_prefix(let, n), n, torch.full((B,), GT)
    if task == "composite" and design == "A":
        # place n//2 digits at random positions among the first n, letters elsewhere
        keys = torch.rand(B, L, generator=gen).masked_fill(torch.arange(L)[None] >= n[:, None], 2.0)
        order = keys.argsort(1)                                          # slot k -> position order[k]
        is_dig = torch.zeros(B, L, dtype=torch.bool).scatter_(1, order, torch.arange(L)[None] < (n // 2)[:, None])
        x = torch.where(is_dig, dig, let)
        return x, maps[x], n, sep
    if task == "composite":
        return dig, reverse_prefix(maps[dig], n), n, torch.full((B,), GT)
    # transfer probes of design B: does each skill carry over to the other skill's inputs / format?
    if task == "g_behind_gt":                                           # skill A's map in the '>' format
        return dig, maps[dig], n, torch.full((B,), GT)
    if task == "reverse_digits":                                        # skill B's reversal on digits
        return dig, reverse_prefix(dig, n), n, torch.full((B,), GT)
    raise ValueError(f"unknown task '{task}'")


def to_sequences(prompt, answer, n, sep):
    """Lay out `<bos> x1..xn SEP y1..yn ;` <pad>... and return (inputs, targets) for next-token training;
    targets are -100 except on the answer tokens and the final ';'."""
    B, L = prompt.shape
    T = 2 * L + 3
    i = torch.arange(T)[None]                                            # (1, T)
    nn_ = n[:, None]                                                     # (B, 1)
    seq = torch.full((B, T), PAD)
    seq[:, 0] = BOS
    seq = torch.where((i >= 1) & (i <= nn_), prompt.gather(1, (i - 1).clamp(0, L - 1).expand(B, -1)), seq)
    seq = torch.where(i == nn_ + 1, sep[:, None], seq)
    in_ans = (i >= nn_ + 2) & (i <= 2 * nn_ + 1)
    seq = torch.where(in_ans, answer.gather(1, (i - nn_ - 2).clamp(0, L - 1).expand(B, -1)), seq)
    seq = torch.where(i == 2 * nn_ + 2, torch.full_like(seq, END), seq)
    tgt = seq[:, 1:].clone()
    tgt[~((i[:, 1:] >= nn_ + 2) & (i[:, 1:] <= 2 * nn_ + 2))] = -100
    return seq[:, :-1], tgt                                              # (B, T-1) each


def batch_fn(design, tasks, B, gen, maps, max_len, device):
    """get_batch(step) for common.train: equal shares of each task in every batch."""
    def get(step):
        parts = [to_sequences(*sample_task(design, t, B // len(tasks), gen, maps, max_len)) for t in tasks]
        return tuple(torch.cat(p).to(device) for p in zip(*parts))
    return get

# -----------------------------------------------------------------------------
# LoRA: a wrapper for nn.Linear holding one or more adapters, and CAT


class LoRALinear(nn.Module):
    """y = W0 x + sum_i c_i * s * B_i A_i x,  s = alpha / r  (W0 frozen).

    One adapter with c = 1 is plain LoRA (Hu et al. 2021). Several adapters with learned c are CAT:
      mix="free"    c = w, the paper's  W0 + a1 B1 A1 + a2 B2 A2  with layer-wise a_i (init 1)
      mix="softmax" c = softmax(w), the official code's lora_learnable_weights (init 0 -> uniform 0.5)
      mix="fixed"   c = w, not trained (single LoRA, task arithmetic)
    merge() folds Delta W into W0 (no inference overhead); unmerge() takes it back out.
    """

    def __init__(self, base: nn.Linear, n_adapters=1, r=4, alpha=8.0, mix="fixed", generator=None, a_init="peft"):
        super().__init__()
        if mix not in ("fixed", "free", "softmax"):
            raise ValueError(f"unknown mix '{mix}'")
        self.base, self.r, self.scaling, self.mix = base, r, alpha / r, mix
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        d_in, d_out, dev = base.in_features, base.out_features, base.weight.device
        # A_i ~ U(-1/sqrt(in), 1/sqrt(in)): PEFT's kaiming_uniform_(a=sqrt(5)); "normal": N(0, 1/in)
        def init_a():
            if a_init == "normal":
                return torch.randn(r, d_in, generator=generator) / math.sqrt(d_in)
            return (2 * torch.rand(r, d_in, generator=generator) - 1) / math.sqrt(d_in)
        self.A = nn.ParameterList([nn.Parameter(init_a().to(dev)) for _ in range(n_adapters)])  # (r, in)
        self.B = nn.ParameterList([nn.Parameter(torch.zeros(d_out, r, device=dev))
                                   for _ in range(n_adapters)])             # B_i = 0             (out, r)
        init = 0.0 if mix == "softmax" else 1.0
        self.w = nn.Parameter(torch.full((n_adapters,), init, device=dev), requires_grad=mix != "fixed")
        self.merged = False

    def coeffs(self) -> torch.Tensor:                                   # (n_adapters,)
        return torch.softmax(self.w, 0) if self.mix == "softmax" else self.w

    def delta_weight(self) -> torch.Tensor:                             # (out, in)
        c = self.coeffs()
        return sum(c[i] * self.scaling * (B @ A) for i, (A, B) in enumerate(zip(self.A, self.B)))

    def forward(self, x):                                               # (..., in) -> (..., out)
        y = self.base(x)
        if self.merged:
            return y
        c = self.coeffs()
        for i, (A, B) in enumerate(zip(self.A, self.B)):
            y = y + (c[i] * self.scaling) * F.linear(F.linear(x, A), B)  # c_i s B_i (A_i x)
        return y

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.base.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.weight -= self.delta_weight()
            self.merged = False


class SplitLinear(nn.Module):
    """The fused qkv projection of common.GPT as three nn.Linear (q, k, v), so each gets its own LoRA
    as in the paper (q_proj, k_proj, v_proj). Exactly the same function as the fused layer."""

    def __init__(self, fused: nn.Linear, names=("q", "k", "v")):
        super().__init__()
        n, d_in = len(names), fused.in_features
        self.names = names
        for j, name in enumerate(names):
            part = nn.Linear(d_in, fused.out_features // n, bias=fused.bias is not None).to(fused.weight.device)
            rows = slice(j * part.out_features, (j + 1) * part.out_features)
            part.weight.data.copy_(fused.weight.data[rows])
            if fused.bias is not None:
                part.bias.data.copy_(fused.bias.data[rows])
            setattr(self, name, part)

    def forward(self, x):
        return torch.cat([getattr(self, n)(x) for n in self.names], -1)


TARGETS = ("attn.qkv.q", "attn.qkv.k", "attn.qkv.v", "attn.proj", "mlp.fc", "mlp.proj")  # q k v o up down


def split_qkv(model: common.GPT) -> common.GPT:
    for block in model.blocks:
        block.attn.qkv = SplitLinear(block.attn.qkv)
    return model


def target_names(model) -> list:
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.split(".", 2)[-1] in TARGETS]


def add_lora(base_model, n_adapters=1, r=4, alpha=8.0, mix="fixed", loras=None, seed=0, a_init="peft"):
    """A copy of base_model with every target Linear wrapped in LoRALinear (base weights frozen).
    loras: optional list (one per adapter) of {module name: (A, B)} to load; they are then frozen."""
    model = copy.deepcopy(base_model)
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    for name in target_names(model):
        parent, attr = model.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
        lin = LoRALinear(getattr(parent, attr), n_adapters, r, alpha, mix, gen, a_init)
        if loras is not None:
            for i, lo in enumerate(loras):
                lin.A[i].data.copy_(lo[name][0])
                lin.B[i].data.copy_(lo[name][1])
                lin.A[i].requires_grad_(False)
                lin.B[i].requires_grad_(False)
        setattr(parent, attr, lin)
    return model


def lora_state(model) -> dict:
    """{module name: (A, B)} of a single-adapter LoRA model."""
    return {n: (m.A[0].detach().clone(), m.B[0].detach().clone())
            for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def with_delta(base_model, deltas: dict):
    """A copy of base_model with W <- W0 + Delta W for every module in deltas (a merged model)."""
    model = copy.deepcopy(base_model)
    with torch.no_grad():
        for name, dw in deltas.items():
            model.get_submodule(name).weight += dw.to(model.get_submodule(name).weight)
    return model

# -----------------------------------------------------------------------------
# Merge rules (PEFT merge_utils semantics) and the merges built from them


def magnitude_prune(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = int(density * numel) largest |entries| (ties: lower index first)."""
    if density >= 1:
        return t
    k = int(density * t.numel())
    keep = torch.argsort(t.abs().flatten(), descending=True, stable=True)[:k]
    mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    mask[keep] = 1
    return t * mask.view_as(t)


def random_prune(t: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
    """DARE: drop each entry with prob 1 - density and rescale the survivors by 1/density."""
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full(t.shape, density), generator=gen).to(t)
    return t * mask / density


def task_arithmetic(ts, weights):
    return sum(w * t for w, t in zip(weights, ts))                      # sum_i w_i t_i


def ties(ts, weights, density, gen=None):
    """TIES (Yadav et al. 2023) as PEFT codes it: trim by magnitude, elect the sign of sum_i t_i
    ('total'), then average the weighted entries that agree with it (disjoint mean)."""
    ts = torch.stack([magnitude_prune(t, density) for t in ts])         # (n, ...)
    agree = ts.sign() == torch.where(ts.sum(0) >= 0, 1.0, -1.0)          # majority-sign mask
    w = torch.as_tensor(weights, dtype=ts.dtype, device=ts.device).view(-1, *[1] * (ts.dim() - 1))
    return (w * ts * agree).sum(0) / agree.sum(0).clamp(min=1)


def dare_linear(ts, weights, density, gen):
    """DARE (Yu et al. 2023): random drop + rescale, then a weighted sum."""
    return task_arithmetic([random_prune(t, density, gen) for t in ts], weights)


RULES = {"linear": lambda ts, w, d, g: task_arithmetic(ts, w), "ties": ties, "dare": dare_linear}


def merge_ab(loras, weights, scaling, rule, density=1.0, gen=None) -> dict:
    """PEFT add_weighted_adapter: the rule acts on the A's and on the B's separately with weights
    sqrt(w_i s_i); the merged adapter has scale 1, so Delta W = B' A' (this brings cross terms B_i A_j)."""
    sw = [math.sqrt(w * scaling) for w in weights]
    out = {}
    for name in loras[0]:
        A = RULES[rule]([lo[name][0] for lo in loras], sw, density, gen)
        B = RULES[rule]([lo[name][1] for lo in loras], sw, density, gen)
        out[name] = B @ A
    return out


def merge_dw(loras, weights, scaling, rule, density=1.0, gen=None) -> dict:
    """The rule on the task vectors Delta W_i = s B_i A_i (the TIES/DARE papers' semantics)."""
    return {name: RULES[rule]([scaling * lo[name][1] @ lo[name][0] for lo in loras], weights, density, gen)
            for name in loras[0]}


def cat_delta(model) -> dict:
    """Delta W of every LoRALinear of a (CAT) model: sum_i c_i s B_i A_i, no cross terms."""
    return {n: m.delta_weight().detach() for n, m in model.named_modules() if isinstance(m, LoRALinear)}

# -----------------------------------------------------------------------------
# Evaluation


def make_eval_set(design, task, n_eval, gen, maps, max_len):
    """Held-out prompts grouped by length: list of (prompt ids (b, n+2), answer ids (b, n))."""
    x, y, n, sep = sample_task(design, task, n_eval, gen, maps, max_len)
    groups = []
    for k in range(2, max_len + 1):
        rows = n == k
        if rows.any():
            prompt = torch.cat([torch.full((int(rows.sum()), 1), BOS), x[rows, :k], sep[rows, None]], 1)
            groups.append((prompt, y[rows, :k]))
    return groups


@torch.no_grad()
def accuracy(model, groups, device) -> float:
    """Greedy exact match on the answer tokens."""
    model.eval()
    correct = total = 0
    for prompt, ans in groups:
        out = model.generate(prompt.to(device), ans.shape[1], greedy=True)[:, prompt.shape[1]:]
        correct += int((out.cpu() == ans).all(1).sum())
        total += len(ans)
    return correct / total

# -----------------------------------------------------------------------------
# One design: pretrain, skill LoRAs, DATA-MIX, CAT, merges, evaluation

METHODS = ["base", "lora_a", "lora_b", "data_mix", "sum", "uniform", "linear_ab", "ties_ab", "dare_ab",
           "ties_dw", "dare_dw", "cat_softmax", "cat_free"]
LABELS = {"base": "base model", "lora_a": "LoRA skill A only", "lora_b": "LoRA skill B only",
          "data_mix": "DATA-MIX (one LoRA, 100% data)", "sum": "task arithmetic (sum, w=1)",
          "uniform": "uniform average (w=0.5)", "linear_ab": "linear on A,B (PEFT)",
          "ties_ab": "TIES on A,B (PEFT)", "dare_ab": "DARE on A,B (PEFT)", "ties_dw": "TIES on dW",
          "dare_dw": "DARE on dW", "cat_softmax": "CAT softmax (official code)",
          "cat_free": "CAT free (paper formula)"}
MERGES = ["sum", "uniform", "linear_ab", "ties_ab", "dare_ab", "ties_dw", "dare_dw"]  # the non-CAT merges


def run_design(cfg: Config, design: str, seed: int, device) -> tuple[dict, dict]:
    if design == "A":
        r, skill_steps, lora_lr, lora_clip, max_len = cfg.rank, cfg.lora_steps, cfg.lora_lr, cfg.grad_clip, cfg.max_len
    else:
        r, skill_steps, lora_lr, lora_clip, max_len = cfg.rank_b, cfg.lora_steps_b, cfg.lora_lr_b, cfg.lora_clip_b, cfg.max_len_b
    alpha = cfg.alpha_ratio * r
    maps = skill_maps()
    gen = lambda k: torch.Generator().manual_seed(1000 * seed + k)     # data streams: 1 pretrain, 2 LoRA, 3 CAT, 7 eval
    train_kw = dict(device=device, schedule="cosine", min_lr_frac=0.0, weight_decay=0.0, betas=(0.9, 0.999),
                    grad_clip=cfg.grad_clip, compile=cfg.compile, quiet=cfg.preset == "smoke", log_every=25)
    batches = lambda tasks, g: batch_fn(design, tasks, cfg.batch, g, maps, max_len, device)
    hist, t0 = {}, time.time()

    # 1. base model pretrained on the generic mixture (copying)
    torch.manual_seed(seed)
    gcfg = common.GPTConfig(vocab_size=len(VOCAB), block_size=2 * max_len + 2, n_layer=cfg.n_layer,
                            n_head=cfg.n_head, n_embd=cfg.n_embd, pos="learned")
    base = common.GPT(gcfg)
    nn.init.normal_(base.wte.weight, 0.0, cfg.emb_std)
    nn.init.normal_(base.wpe.weight, 0.0, cfg.emb_std)
    base = base.to(device)
    hist["pretrain"] = common.train(base, batches(["copy"], gen(1)), steps=cfg.pretrain_steps, lr=cfg.pretrain_lr,
                                    warmup=cfg.warmup, desc=f"{design} pretrain", **train_kw)["loss"]
    base = split_qkv(base)

    # 2. one LoRA per skill, and DATA-MIX: one LoRA on the union, same examples per skill
    loras = {}
    for k, (name, tasks, steps) in enumerate((("lora_a", ["skill_a"], skill_steps), ("lora_b", ["skill_b"], skill_steps),
                                              ("data_mix", ["skill_a", "skill_b"], 2 * skill_steps))):
        m = add_lora(base, 1, r, alpha, seed=1000 * seed + 20 + k, a_init=cfg.a_init)  # each LoRA its own A init
        hist[name] = common.train(m, batches(tasks, gen(2)), steps=steps, lr=lora_lr, warmup=cfg.warmup,
                                  desc=f"{design} {name}", **{**train_kw, "grad_clip": lora_clip})["loss"]
        loras[name] = lora_state(m)
    pair, s = [loras["lora_a"], loras["lora_b"]], alpha / r

    # 3. CAT: both LoRAs frozen, one weight per adapter per module, trained on cat_frac of the skill data
    cat_steps = max(1, round(cfg.cat_frac * 2 * skill_steps))              # one pass over the CAT pool
    get = batches(["skill_a", "skill_b"], gen(3))
    pool = [get(i) for i in range(cat_steps)]                              # the fixed cat_frac of skill data
    steps = cat_steps * cfg.cat_epochs
    deltas, cat_info = {}, {}
    for mix in ("softmax", "free"):
        m = add_lora(base, 2, r, alpha, mix=mix, loras=pair)
        hist[f"cat_{mix}"] = common.train(m, lambda step: pool[step % cat_steps], steps=steps, lr=cfg.cat_lr,
                                          warmup=max(1, steps // 10), desc=f"{design} CAT-{mix}",
                                          **train_kw)["loss"]
        deltas[f"cat_{mix}"] = cat_delta(m)
        c = torch.stack([mod.coeffs().detach().cpu() for mod in m.modules() if isinstance(mod, LoRALinear)])
        cat_info[f"cat_{mix}"] = (float(c.min()), float(c.max()))

    # 4. the other merges (weights 1,1 and density as in the official eval; sum/uniform are task arithmetic)
    g_dare = torch.Generator().manual_seed(1000 * seed + 11)
    deltas.update({
        "base": {}, "lora_a": merge_dw(pair[:1], [1.0], s, "linear"), "lora_b": merge_dw(pair[1:], [1.0], s, "linear"),
        "data_mix": merge_dw([loras["data_mix"]], [1.0], s, "linear"),
        "sum": merge_dw(pair, [1.0, 1.0], s, "linear"), "uniform": merge_dw(pair, [0.5, 0.5], s, "linear"),
        "linear_ab": merge_ab(pair, [1.0, 1.0], s, "linear"),
        "ties_ab": merge_ab(pair, [1.0, 1.0], s, "ties", cfg.density),
        "dare_ab": merge_ab(pair, [1.0, 1.0], s, "dare", cfg.density, g_dare),
        "ties_dw": merge_dw(pair, [1.0, 1.0], s, "ties", cfg.density),
        "dare_dw": merge_dw(pair, [1.0, 1.0], s, "dare", cfg.density, g_dare)})

    # 5. evaluate every method as a merged model W0 + Delta W on the three tasks
    g_eval = gen(7)
    evals = {t: make_eval_set(design, t, cfg.eval_n, g_eval, maps, max_len) for t in TASKS}
    acc = {"base/copy": accuracy(base, make_eval_set(design, "copy", cfg.eval_n, g_eval, maps, max_len), device)}
    # design B's transfer probes: a merge composes only as far as each skill carries over
    probes = {t: make_eval_set(design, t, cfg.eval_n, g_eval, maps, max_len) for t in PROBES} if design == "B" else {}
    for meth in METHODS:
        model = with_delta(base, deltas[meth])
        for t in TASKS:
            acc[f"{meth}/{t}"] = accuracy(model, evals[t], device)
        if meth in ("lora_a", "lora_b", "data_mix"):
            for t, groups in probes.items():
                acc[f"{meth}/{t}"] = accuracy(model, groups, device)
    for k, (lo, hi) in cat_info.items():
        acc[f"{k}/weight_min"], acc[f"{k}/weight_max"] = lo, hi
    acc["time_s"] = time.time() - t0
    hist["acc"] = dict(acc)                                                # per-seed numbers in the JSON
    return acc, hist


def gains(acc: dict, floor: float) -> dict:
    """Relative gains of CAT (free) on the composite task (our reading of the paper's "average" gains:
    the ratio to the mean of the other model merges, and to DATA-MIX, minus 1); and the best merge minus
    DATA-MIX ('merging beats data mixing'). floor keeps a zero denominator finite (1 / eval_n)."""
    cat = acc["cat_free/composite"]
    others = sum(acc[f"{m}/composite"] for m in MERGES) / len(MERGES)
    best = max(MERGES + ["cat_softmax", "cat_free"], key=lambda m: acc[f"{m}/composite"])
    return {"cat_vs_merges": cat / max(others, floor) - 1, "cat_vs_datamix": cat / max(acc["data_mix/composite"], floor) - 1,
            "best_merge_vs_datamix": acc[f"{best}/composite"] - acc["data_mix/composite"], "best_merge": best}


def beats(p: float, q: float, n: int) -> str:
    """'yes' when accuracy p beats q by more than 2 standard errors of the difference (n prompts each)."""
    noise = 2 * math.sqrt((p * (1 - p) + q * (1 - q)) / n)
    return "yes" if p - q > noise else f"no (gap {p - q:+.3f}, noise {noise:.3f})"


def run(cfg: Config) -> dict:
    common.set_threads(cfg.threads, cfg.device)
    device = torch.device(cfg.device)
    t0 = time.time()
    seeds = [cfg.seed + i for i in range(max(1, cfg.seeds))]
    metrics, history, per_seed = {}, {}, {}
    for design in cfg.designs:
        prefix = "acc" if design == "A" else "acc_B"
        runs = []
        for sd in seeds:
            acc, hist = run_design(cfg, design, sd, device)
            runs.append(acc)
            history[f"{design}/seed{sd}"] = hist
            common.print0(f"design {design} seed {sd}: {acc['time_s']:.0f} s")
        per_seed[design] = runs
        keys = [k for k in runs[0] if k != "time_s"]
        mean = {k: sum(r[k] for r in runs) / len(runs) for k in keys}
        std = {k: (sum((r[k] - mean[k]) ** 2 for r in runs) / max(1, len(runs) - 1)) ** 0.5 for k in keys}
        for k in keys:
            metrics[f"{prefix}/{k}"] = mean[k]
            if len(runs) > 1:
                metrics[f"{prefix}/{k}/std"] = std[k]
        g = gains(mean, 1.0 / cfg.eval_n)
        for k, v in g.items():
            metrics[f"gain_{design}/{k}"] = v
        cell = (lambda m, t: common.mean_std([r[f"{m}/{t}"] for r in runs]))
        title = {"A": "design A: composite needs both skills in one answer (exact match, "
                      f"{cfg.eval_n} prompts/task, {len(seeds)} seed(s))",
                 "B": "design B: composite = skill A's map in skill B's format (never seen together) "
                      f"({cfg.eval_n} prompts/task, {len(seeds)} seed(s))"}[design]
        common.print_table([[LABELS[m]] + [cell(m, t) for t in TASKS] for m in METHODS],
                           ["method", "skill A", "skill B", "composite"], title=title)
        if design == "B":
            common.print0("  transfer probes (a merge composes only as far as both hold): skill A's map behind '>' "
                          f"LoRA A {cell('lora_a', 'g_behind_gt')}, DATA-MIX {cell('data_mix', 'g_behind_gt')}; "
                          f"skill B's reversal on digits LoRA B {cell('lora_b', 'reverse_digits')}, "
                          f"DATA-MIX {cell('data_mix', 'reverse_digits')}")
        for mix in ("softmax", "free"):
            common.print0(f"  learned CAT-{mix} per-module weights in [{mean[f'cat_{mix}/weight_min']:.2f}, "
                          f"{mean[f'cat_{mix}/weight_max']:.2f}]")
        common.print0()
    wall = time.time() - t0
    metrics["wall_time_s"] = wall

    # headline: the paper's claims beside ours
    rows = []
    pct = lambda v: f"{100 * v:+.0f}%"
    if "A" in cfg.designs:
        a = {k[len("acc/"):]: v for k, v in metrics.items() if k.startswith("acc/")}
        best_other = max(MERGES + ["lora_a", "lora_b"], key=lambda m: a[f"{m}/composite"])
        ok = a["cat_free/composite"] > a[f"{best_other}/composite"] + 0.1
        rows.append(["A: CAT vs other model merges (composite, rel.)", "+43%", pct(metrics["gain_A/cat_vs_merges"]),
                     "yes" if ok else f"no (best other: {best_other})"])
        rows.append(["A: CAT vs DATA-MIX (composite, rel.)", "+12%", pct(metrics["gain_A/cat_vs_datamix"]),
                     "yes" if metrics["gain_A/cat_vs_datamix"] > 0 else "no: DATA-MIX composes token-local maps"])
    if "B" in cfg.designs:
        b = {k[len("acc_B/"):]: v for k, v in metrics.items() if k.startswith("acc_B/")}
        best, dm = metrics["gain_B/best_merge"], b["data_mix/composite"]
        rows.append(["B: best merge vs DATA-MIX (composite, abs.)", "merging > data mixing",
                     f"{b[f'{best}/composite']:.3f} ({best}) vs {dm:.3f}",
                     beats(b[f"{best}/composite"], dm, cfg.eval_n * len(seeds))])
        rows.append(["B: CAT vs DATA-MIX (composite, rel.)", "+12%", pct(metrics["gain_B/cat_vs_datamix"]),
                     beats(b["cat_free/composite"], dm, cfg.eval_n * len(seeds))])
        top = max(b[f"{m}/composite"] for m in MERGES + ["cat_softmax"])
        rows.append(["B: CAT (free) >= every other merge", "yes", f"{b['cat_free/composite']:.3f} vs {top:.3f}",
                     "yes" if b["cat_free/composite"] >= top else "no"])
    common.print_table(rows, ["claim (paper: GSM-Hard, LLaMA-7B)", "paper", "ours", "reproduces?"],
                       title=f"LoRA Soups headline ({cfg.preset}, {wall:.0f} s wall)")
    common.save_results("lora_cat", cfg, metrics, history, wall)
    return metrics


def main():
    run(common.parse_args(Config, PRESETS))


if __name__ == "__main__":
    main()
