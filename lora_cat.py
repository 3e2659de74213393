"""
LoRA Soups: Merging LoRAs for Practical Skill Composition Tasks (CAT), on toy skill-composition tasks.
Akshara Prabhakar, Yuanzhi Li, Karthik Narasimhan, Sham Kakade, Eran Malach, Samy Jelassi. COLING 2025
Industry Track. arXiv 2410.13025. Official code: github.com/aksh555/LoRA-Soups (CAT layer:
learnable_lora/lora/layer.py; baselines: HF PEFT add_weighted_adapter).

Finding: two LoRAs trained on two skills, concatenated with one learned weight per adapter per module
(CAT, trained on 5% of the skill data, never on the target), solve a composite task that needs both
skills; the paper reports +43% over other merges and +12% over one LoRA on both skills' data (DATA-MIX).
Measured (--seeds 5, 816 s on one CPU thread), composite exact match: design A CAT 0.794 ± 0.068 vs the best
other merge 0.753 ± 0.090 (paired p 0.06), DATA-MIX 0.982 ± 0.014 (p 0.004); design B 0.144 / 0.258 / 0.081.

    python lora_cat.py --preset smoke          # seconds (what pytest runs)
    python lora_cat.py                         # quick on CPU (seeds 0-2, 477 s), full on CUDA
    python lora_cat.py --seeds 5               # the five-seed paired tests
    torchrun --standalone --nproc_per_node=2 lora_cat.py --preset smoke --device cpu

Glossary (ours -> paper):
    skill A / skill B / composite   skill 1 (math) / skill 2 (code) data / the target task (GSM-Hard)
    LoRALinear A_i, B_i, scaling    LoRA_i factors, lora_alpha / r
    mix="free" / "softmax"          CAT's alpha_i of "W0 + a1 B1A1 + a2 B2A2" / the official code's softmax
    data_mix                        DATA-MIX: one LoRA on the union of both skills' data
    *_ab                            PEFT add_weighted_adapter (rules on A and B separately: the paper's runs)
    *_dw                            the same rules on Delta W_i = s B_i A_i (the TIES / DARE papers)
Does not include: LLaMA-7B and the paper's datasets; LoraHub; the MoE baseline; the official CAT's HF
Trainer details (best checkpoint on validation loss, loss on prompt tokens, random weight init).
"""
from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass

import common  # first: it reports a missing package in one line

import torch
import torch.nn as nn
import torch.nn.functional as F

NAME = "lora_cat"

# -----------------------------------------------------------------------------
# Config


@dataclass
class Config(common.BaseConfig):
    designs: tuple[str, ...] = ("A", "B")  # A: both skills inside one answer; B: skill A's map in skill B's format
    n_embd: int = 128           # width d of the GPT (common.GPT, learned positions, pre-LN)
    n_layer: int = 2            # transformer blocks
    n_head: int = 4             # attention heads
    max_len: int = 4            # longest string (lengths n in [2, max_len]) in every task
    batch: int = 64             # global batch (sequences) of every training phase
    pretrain_steps: int = 800   # base-model steps on the generic mixture (copy / reverse)
    pretrain_lr: float = 3e-3   # peak learning rate of the base model
    warmup: int = 50            # linear warmup steps (pretraining and LoRA training)
    emb_std: float = 0.02       # init std of the token / position embeddings
    base_reverse: bool = True   # the base's mixture also reverses behind '<' (else it only copies, behind = and >)
    rank: int = 4               # LoRA rank r of every skill LoRA and of DATA-MIX
    alpha_ratio: float = 2.0    # lora_alpha = alpha_ratio * r (paper: r 32, alpha 64)
    lora_steps: int = 500       # steps per skill LoRA (DATA-MIX gets twice as many: the same data per skill)
    lora_lr: float = 1e-2       # LoRA learning rate
    lora_clip: float = 1.0      # gradient-norm clip of LoRA training (0 = off)
    cat_frac: float = 0.05      # CAT's pool: this fraction of the skill examples the LoRAs saw (paper: 5%)
    cat_lr: float = 5e-2        # learning rate of CAT's per-module weights
    cat_epochs: int = 1         # passes over CAT's fixed pool (paper: 1 epoch)
    density: float = 0.75       # TIES / DARE keep-fraction (the official eval's 0.75)
    eval_n: int = 400           # prompts per task in each of the validation and test sets
    log_every: int = 25         # steps between logged losses

    POSITIVE = ("n_embd", "n_layer", "n_head", "max_len", "pretrain_steps", "rank", "lora_steps", "cat_epochs",
                "eval_n", "log_every")
    GLOBAL_BATCH = ("batch",)

    def __post_init__(self):
        self.designs = tuple(d.upper() for d in self.designs)
        if any(d not in ("A", "B") for d in self.designs):
            raise ValueError(f"--designs takes A and/or B (got {','.join(self.designs)})")
        if not 2 <= self.max_len <= 20:
            raise ValueError("--max-len must be in [2, 20]")
        if self.n_embd % self.n_head:
            raise ValueError(f"--n-embd {self.n_embd} is not divisible by --n-head {self.n_head}")
        if not 0 < self.cat_frac <= 1 or not 0 < self.density <= 1:
            raise ValueError("--cat-frac and --density must be in (0, 1]")
        if self.batch % 2:
            raise ValueError("--batch must be even (mixed batches are half skill A, half skill B)")


PRESETS = {
    "smoke": dict(n_embd=32, n_layer=1, pretrain_steps=200, pretrain_lr=1e-2, lora_steps=150, warmup=10, eval_n=64,
                  cat_frac=0.1),
    "quick": dict(seeds=3),
    "full": dict(n_embd=256, n_layer=4, n_head=8, batch=256, pretrain_steps=3000, pretrain_lr=1e-3, warmup=100,
                 rank=8, lora_steps=1000, lora_lr=5e-3, eval_n=1000, seeds=5),
}

# -----------------------------------------------------------------------------
# Data: vocabulary, the two skills and their composite (batched tensor code)

VOCAB = ["<pad>", "<bos>", ";", "=", ">"] + list("0123456789") + list("abcdefghij") + ["<"]
PAD, BOS, END, EQ, GT = range(5)
LT = VOCAB.index("<")            # pretraining only: '<' asks the base to reverse
DIGITS = torch.arange(5, 15)
LETTERS = torch.arange(15, 25)
TASKS = ("skill_a", "skill_b", "composite")
PROBES = ("g_behind_gt", "reverse_digits")                              # design B only (see sample_task)


def skill_maps(seed_g: int = 123, seed_h: int = 456) -> torch.Tensor:
    """(V,) lookup table: digits -> g(digit), letters -> h(letter), other tokens -> themselves.
    g and h are fixed random permutations (design A's 'math' and 'code' skills)."""
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


def sample_task(design: str, task: str, B: int, gen: torch.Generator, maps: torch.Tensor, max_len: int = 4):
    """B examples of one task -> (prompt (B, L), answer (B, L), n (B,), sep (B,)); only the first n used.

    copy      the base's generic mixture, a third each: `x =` -> x, `x >` -> x, `x <` -> reverse(x)
              (x: digits and letters): the base copies and can already reverse any string
    skill_a   digits  `3 1 4 =` -> g(3) g(1) g(4)           (both designs: the 'math' skill)
    design A  skill_b    letters `c a f =` -> h(c) h(a) h(f)
              composite  `3 c a =` -> g(3) h(c) h(a)        (n//2 digits shuffled among letters)
    design B  skill_b    letters `c a f >` -> f a c         (a format skill: '>' now asks for reversal)
              composite  `3 1 4 >` -> g(4) g(1) g(3)       (g in the '>' format: never in the skill data)
              probes     g_behind_gt `3 1 4 >` -> g(3) g(1) g(4); reverse_digits `3 1 4 >` -> 4 1 3
    """
    L = max_len
    n = torch.randint(2, L + 1, (B,), generator=gen)
    dig = DIGITS[torch.randint(0, 10, (B, L), generator=gen)]
    let = LETTERS[torch.randint(0, 10, (B, L), generator=gen)]
    sep = torch.full((B,), EQ)
    if task in ("copy", "copy_only"):
        x = torch.cat([DIGITS, LETTERS])[torch.randint(0, 20, (B, L), generator=gen)]
        u = torch.rand(B, generator=gen) * (1 if task == "copy" else 2 / 3)
        sep = torch.where(u < 1 / 3, EQ, torch.where(u < 2 / 3, GT, LT))
        return x, torch.where((sep == LT)[:, None], reverse_prefix(x, n), x), n, sep
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
    k = n[:, None]                                                       # (B, 1)
    seq = torch.full((B, T), PAD)
    seq[:, 0] = BOS
    seq = torch.where((i >= 1) & (i <= k), prompt.gather(1, (i - 1).clamp(0, L - 1).expand(B, -1)), seq)
    seq = torch.where(i == k + 1, sep[:, None], seq)
    in_ans = (i >= k + 2) & (i <= 2 * k + 1)
    seq = torch.where(in_ans, answer.gather(1, (i - k - 2).clamp(0, L - 1).expand(B, -1)), seq)
    seq = torch.where(i == 2 * k + 2, torch.full_like(seq, END), seq)
    tgt = seq[:, 1:].clone()
    tgt[~((i[:, 1:] >= k + 2) & (i[:, 1:] <= 2 * k + 2))] = -100
    return seq[:, :-1], tgt                                              # (B, T-1) each


def batch_fn(design, tasks, B, gen, maps, max_len, device):
    """get_batch(step) -> (inputs, targets) of a global batch: equal shares of each task."""
    def get(step):
        parts = [to_sequences(*sample_task(design, t, B // len(tasks), gen, maps, max_len)) for t in tasks]
        return tuple(torch.cat(p).to(device) for p in zip(*parts))
    return get


def cat_pool(design, steps, B, gen, maps, max_len, device, tasks=("skill_a", "skill_b")) -> list:
    """CAT's fixed training pool: `steps` batches of the skill tasks in equal shares, never the composite."""
    get = batch_fn(design, list(tasks), B, gen, maps, max_len, device)
    return [get(i) for i in range(steps)]

# -----------------------------------------------------------------------------
# Model: LoRA with several adapters (CAT), and the merge rules (self-contained: copy them with torch)


class LoRALinear(nn.Module):
    """y = W0 x + sum_i c_i * s * B_i A_i x,  s = alpha / r,  W0 (and its bias) frozen.

    One adapter with c = 1 is plain LoRA (Hu et al. 2021). Several adapters with learned c are CAT:
      mix="free"    c = w, the paper's  W0 + a1 B1 A1 + a2 B2 A2  with layer-wise a_i (init 1)
      mix="softmax" c = softmax(w), the official code's lora_learnable_weights (init 0: uniform 0.5)
      mix="fixed"   c = w = 1, not trained (plain LoRA; several adapters: their sum)
    A CAT layer is a rank-(r1 + r2) LoRA with A = [c1 s A1; c2 s A2], B = [B1, B2]: no cross terms B_i A_j.
    """

    def __init__(self, base: nn.Linear, n_adapters=1, r=4, alpha=8.0, mix="fixed", generator=None):
        super().__init__()
        if mix not in ("fixed", "free", "softmax"):
            raise ValueError(f"unknown mix '{mix}'")
        self.base, self.r, self.scaling, self.mix = base, r, alpha / r, mix
        base.weight.requires_grad_(False)                               # the frozen base W0
        if base.bias is not None:
            base.bias.requires_grad_(False)
        d_in, d_out, dev = base.in_features, base.out_features, base.weight.device
        # A_i ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming_uniform_(a=sqrt(5))), B_i = 0: starts at W0
        self.A = nn.ParameterList([nn.Parameter(((2 * torch.rand(r, d_in, generator=generator) - 1)
                                                 / math.sqrt(d_in)).to(dev)) for _ in range(n_adapters)])  # (r, in)
        self.B = nn.ParameterList([nn.Parameter(torch.zeros(d_out, r, device=dev)) for _ in range(n_adapters)])
        init = 0.0 if mix == "softmax" else 1.0
        self.w = nn.Parameter(torch.full((n_adapters,), init, device=dev), requires_grad=mix != "fixed")

    def coeffs(self) -> torch.Tensor:                                   # (n_adapters,)
        return torch.softmax(self.w, 0) if self.mix == "softmax" else self.w

    def delta_weight(self) -> torch.Tensor:                             # (out, in)
        c = self.coeffs()
        return sum(c[i] * self.scaling * (B @ A) for i, (A, B) in enumerate(zip(self.A, self.B)))

    def forward(self, x):                                               # (..., in) -> (..., out)
        y = self.base(x)
        c = self.coeffs()
        for i, (A, B) in enumerate(zip(self.A, self.B)):
            y = y + (c[i] * self.scaling) * F.linear(F.linear(x, A), B)  # c_i s B_i (A_i x)
        return y


def magnitude_prune(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = int(density * numel) largest |entries| (ties: lower index first)."""
    if density >= 1:
        return t
    k = int(density * t.numel())
    keep = torch.argsort(t.abs().flatten(), descending=True, stable=True)[:k]
    mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    mask[keep] = 1
    return t * mask.view_as(t)


def random_prune(t: torch.Tensor, density: float, gen: torch.Generator, rescale: bool = True) -> torch.Tensor:
    """DARE: drop each entry with prob 1 - density; rescale=True divides the survivors by density (the DARE
    paper); PEFT before 2026 (what the paper ran) discarded that division, i.e. rescale=False."""
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full(t.shape, density), generator=gen).to(t)
    return t * mask / density if rescale else t * mask


def task_arithmetic(ts, weights):
    return sum(w * t for w, t in zip(weights, ts))                      # sum_i w_i t_i


def ties(ts, weights, density, gen=None):
    """TIES (Yadav et al. 2023) as PEFT codes it: trim each t_i by magnitude, elect the sign of the
    unweighted sum_i t_i ('total'), then average the weighted entries that agree with it (disjoint mean)."""
    ts = torch.stack([magnitude_prune(t, density) for t in ts])         # (n, ...)
    agree = ts.sign() == torch.where(ts.sum(0) >= 0, 1.0, -1.0)          # majority-sign mask
    w = torch.as_tensor(weights, dtype=ts.dtype, device=ts.device).view(-1, *[1] * (ts.dim() - 1))
    return (w * ts * agree).sum(0) / agree.sum(0).clamp(min=1)


def dare_linear(ts, weights, density, gen, rescale=True):
    """DARE (Yu et al. 2023): random drop (+ rescale), then a weighted sum."""
    return task_arithmetic([random_prune(t, density, gen, rescale) for t in ts], weights)

# -----------------------------------------------------------------------------
# Model surgery: q/k/v as separate Linears, LoRA wrapping, merged models


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
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".", 2)[-1] in TARGETS]


def add_lora(base_model, n_adapters=1, r=4, alpha=8.0, mix="fixed", loras=None, seed=0):
    """A copy of base_model, all of it frozen, with every target Linear wrapped in LoRALinear.
    loras: optional list (one per adapter) of {module name: (A, B)} to load; those stay frozen too, so
    only the CAT weights w train (mix free / softmax). Without loras the new A_i, B_i train."""
    model = copy.deepcopy(base_model)
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    for name in target_names(model):
        parent, attr = model.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
        lin = LoRALinear(getattr(parent, attr), n_adapters, r, alpha, mix, gen)
        if loras is not None:
            for i, lo in enumerate(loras):
                lin.A[i].data.copy_(lo[name][0])
                lin.B[i].data.copy_(lo[name][1])
            lin.A.requires_grad_(False)
            lin.B.requires_grad_(False)
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


RULES = {"linear": lambda ts, w, d, g: task_arithmetic(ts, w), "ties": ties,
         "dare": dare_linear, "dare_norescale": lambda ts, w, d, g: dare_linear(ts, w, d, g, rescale=False)}


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
    """The rule on the task vectors Delta W_i = s B_i A_i (the TIES / DARE papers' semantics)."""
    return {name: RULES[rule]([scaling * lo[name][1] @ lo[name][0] for lo in loras], weights, density, gen)
            for name in loras[0]}


def cat_delta(model) -> dict:
    """Delta W of every LoRALinear of a (CAT) model: sum_i c_i s B_i A_i, no cross terms."""
    return {n: m.delta_weight().detach() for n, m in model.named_modules() if isinstance(m, LoRALinear)}

# -----------------------------------------------------------------------------
# Training: one loop for the base, the LoRAs, DATA-MIX and CAT's weights


def train(model, cfg: Config, get_batch, steps, lr, warmup, clip, desc) -> list:
    """AdamW (no weight decay), warmup + cosine to 0; returns the logged losses.

    Only parameters with requires_grad move: every weight when pretraining the base; the LoRA factors
    A_i, B_i (W0 frozen inside LoRALinear) for a skill LoRA or DATA-MIX; the per-module weights w alone
    (W0 and every A_i, B_i frozen) for CAT. The global batch is split over torchrun ranks.
    """
    device = torch.device(cfg.device)
    params = [p for p in model.parameters() if p.requires_grad]        # the trainable part
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    fwd = common.wrap_ddp(model, device)
    fwd = torch.compile(fwd) if cfg.compile else fwd
    model.train()
    losses, t0 = [], time.time()
    bar = common.progress(range(steps), desc)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = common.lr_at(step, steps, lr, warmup, min_frac=0.0)
        x, y = common.shard(*get_batch(step))                          # this rank's rows
        with common.autocast(device):
            logits = fwd(x)[0]
        loss = common.token_mean(*common.cross_entropy_sum(logits, y))  # answer tokens only
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip > 0:
            nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        if step % cfg.log_every == 0 or step == steps - 1:
            losses.append(common.global_mean(loss))
            bar.set_postfix_str(common.step_log(step + 1, steps, t0, loss=losses[-1]))
    model.eval()
    return losses

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


def t_pvalue(t: float, df: int) -> float:
    """Two-sided p-value of Student's t with df degrees of freedom. With x = sqrt(df) tan(u),
    P(|T| < |t|) = 2 G((df+1)/2) / (sqrt(pi) G(df/2)) * int_0^atan(|t|/sqrt(df)) cos(u)^(df-1) du (Simpson)."""
    if not math.isfinite(t):
        return 0.0 if abs(t) == math.inf else 1.0
    top, m = math.atan(abs(t) / math.sqrt(df)), 2000
    h = top / m
    f = lambda u: math.cos(u) ** (df - 1)
    integral = h / 3 * (f(0) + f(top) + sum((4 if j % 2 else 2) * f(j * h) for j in range(1, m)))
    k = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(math.pi)
    return min(1.0, max(0.0, 1.0 - 2 * k * integral))


def paired_test(gaps, alpha=0.05) -> dict:
    """Paired t-test of per-seed gaps (method minus rival) against 0: mean, sample std, t, two-sided p."""
    n = len(gaps)
    mean, std = common.mean_std(gaps)
    if n < 2:
        return {"mean": mean, "std": std, "t": float("nan"), "p": float("nan"), "n": n}
    t = mean / (std / math.sqrt(n)) if std > 0 else math.copysign(math.inf, mean) if mean else 0.0
    return {"mean": mean, "std": std, "t": t, "p": t_pvalue(t, n - 1), "n": n}


def verdict(test: dict, alpha=0.05) -> str:
    if test["n"] < 2:
        return "needs >= 2 seeds"
    if test["p"] < alpha:
        return f"CAT {'better' if test['mean'] > 0 else 'worse'} (p={test['p']:.3f})"
    return f"no significant difference (p={test['p']:.2f})"

# -----------------------------------------------------------------------------
# Experiments


METHODS = ["base", "lora_a", "lora_b", "data_mix", "sum", "uniform", "linear_ab", "ties_ab", "dare_ab",
           "ties_dw", "dare_dw", "cat_softmax", "cat_free"]
LABELS = {"base": "base model", "lora_a": "LoRA skill A only", "lora_b": "LoRA skill B only",
          "data_mix": "DATA-MIX (one LoRA, 100% data)", "sum": "task arithmetic (sum, w=1)",
          "uniform": "uniform average (w=0.5)", "linear_ab": "linear on A,B (PEFT)",
          "ties_ab": "TIES on A,B (PEFT)", "dare_ab": "DARE on A,B (PEFT as run: no rescale)",
          "ties_dw": "TIES on dW", "dare_dw": "DARE on dW (rescaled)", "cat_softmax": "CAT softmax (official code)",
          "cat_free": "CAT free (paper formula)"}
MERGES = ["sum", "uniform", "linear_ab", "ties_ab", "dare_ab", "ties_dw", "dare_dw"]  # the non-CAT merges
CAT = "cat_free"             # pre-registered: "CAT" in every comparison is the paper's formula (free weights)


def best_merge(acc: dict, fam: str) -> str:
    """The non-CAT merge with the highest VALIDATION composite accuracy (first in MERGES on ties)."""
    return max(MERGES, key=lambda m: acc[common.mkey(fam, m, "composite_val")])


STREAMS = {"pretrain": 1, "lora_a": 2, "lora_b": 3, "data_mix": 4, "cat": 5, "test": 6, "val": 7, "dare": 8}


def stream(cfg: Config, name: str, design: str = "") -> torch.Generator:
    """The random stream of one phase at this seed (design B's phases get their own streams)."""
    return torch.Generator().manual_seed(1000 * cfg.seed + STREAMS[name] + (50 if design == "B" else 0))


def lora_batches(cfg: Config, design: str, tasks, gen):
    return batch_fn(design, tasks, cfg.batch, gen, skill_maps(), cfg.max_len, torch.device(cfg.device))


def exp_skills(cfg: Config) -> tuple:
    """The base GPT pretrained on the generic mixture, and LoRA A (skill A) on top of it (base frozen).
    Both are shared by the designs: they differ only in skill B and in the composite."""
    torch.manual_seed(cfg.seed)
    base = common.GPT(common.GPTConfig(vocab_size=len(VOCAB), block_size=2 * cfg.max_len + 2,
                                       n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, pos="learned"))
    nn.init.normal_(base.wte.weight, 0.0, cfg.emb_std)
    nn.init.normal_(base.wpe.weight, 0.0, cfg.emb_std)
    base = base.to(cfg.device)
    hist = {"pretrain": train(base, cfg, lora_batches(cfg, "A", ["copy" if cfg.base_reverse else "copy_only"],
                                                    stream(cfg, "pretrain")),
                              cfg.pretrain_steps, cfg.pretrain_lr, cfg.warmup, 0.0, "pretrain")}
    base = split_qkv(base)
    m = add_lora(base, 1, cfg.rank, cfg.alpha_ratio * cfg.rank, seed=1000 * cfg.seed + 20)
    hist["lora_a"] = train(m, cfg, lora_batches(cfg, "A", ["skill_a"], stream(cfg, "lora_a")), cfg.lora_steps,
                           cfg.lora_lr, cfg.warmup, cfg.lora_clip, "LoRA A")
    return base, lora_state(m), hist


def exp_cat(cfg: Config, design: str, base, pair) -> tuple:
    """CAT: both skill LoRAs frozen, one weight per adapter per module, trained on cat_frac of the skill
    examples (a fixed pool of skill A + skill B batches; no composite example), cat_epochs passes."""
    n_pool = max(1, round(cfg.cat_frac * 2 * cfg.lora_steps))          # batches: cat_frac of 2 LoRAs' data
    pool = cat_pool(design, n_pool, cfg.batch, stream(cfg, "cat", design), skill_maps(), cfg.max_len,
                    torch.device(cfg.device))
    steps = n_pool * cfg.cat_epochs
    out, hist = {}, {}
    for mix in ("softmax", "free"):
        m = add_lora(base, 2, cfg.rank, cfg.alpha_ratio * cfg.rank, mix=mix, loras=pair)
        hist[f"cat_{mix}"] = train(m, cfg, lambda step: pool[step % n_pool], steps, cfg.cat_lr,
                                   max(1, steps // 10), 0.0, f"{design} CAT-{mix}")
        out[f"cat_{mix}"] = m
    return out, hist


def exp_design(cfg: Config, design: str, base, lora_a) -> tuple[dict, dict]:
    """One design at one seed: LoRA B, DATA-MIX, CAT, the merges, accuracies on validation and test prompts."""
    loras, hist, s = {"lora_a": lora_a}, {}, cfg.alpha_ratio
    for k, (name, tasks, steps) in enumerate((("lora_b", ["skill_b"], cfg.lora_steps),
                                              ("data_mix", ["skill_a", "skill_b"], 2 * cfg.lora_steps))):
        m = add_lora(base, 1, cfg.rank, cfg.alpha_ratio * cfg.rank, seed=1000 * cfg.seed + 21 + k + 10 * (design == "B"))
        hist[name] = train(m, cfg, lora_batches(cfg, design, tasks, stream(cfg, name, design)), steps, cfg.lora_lr,
                           cfg.warmup, cfg.lora_clip, f"{design} {name}")
        loras[name] = lora_state(m)
    pair = [loras["lora_a"], loras["lora_b"]]
    cats, cat_hist = exp_cat(cfg, design, base, pair)
    hist.update(cat_hist)
    if not common.is_main():                                           # rank 0 evaluates
        return {}, hist
    g = stream(cfg, "dare", design)
    deltas = {"base": {}, **{k: merge_dw([loras[k]], [1.0], s, "linear") for k in ("lora_a", "lora_b", "data_mix")},
              "sum": merge_dw(pair, [1.0, 1.0], s, "linear"), "uniform": merge_dw(pair, [0.5, 0.5], s, "linear"),
              "linear_ab": merge_ab(pair, [1.0, 1.0], s, "linear"),
              "ties_ab": merge_ab(pair, [1.0, 1.0], s, "ties", cfg.density),
              "dare_ab": merge_ab(pair, [1.0, 1.0], s, "dare_norescale", cfg.density, g),
              "ties_dw": merge_dw(pair, [1.0, 1.0], s, "ties", cfg.density),
              "dare_dw": merge_dw(pair, [1.0, 1.0], s, "dare", cfg.density, g),
              **{k: cat_delta(m) for k, m in cats.items()}}
    return evaluate(cfg, design, base, deltas, cats, cat_hist), hist


def evaluate(cfg: Config, design: str, base, deltas: dict, cats: dict, cat_hist: dict) -> dict:
    """Greedy exact match of every method on skill A, skill B and the composite (test prompts), the
    composite on separate validation prompts, design B's probes; CAT's weights; the two comparisons."""
    maps, fam, device = skill_maps(), f"acc_{design}", torch.device(cfg.device)
    g_test = stream(cfg, "test", design)
    sets = {t: make_eval_set(design, t, cfg.eval_n, g_test, maps, cfg.max_len) for t in TASKS}
    sets["composite_val"] = make_eval_set(design, "composite", cfg.eval_n, stream(cfg, "val", design), maps,
                                          cfg.max_len)
    probes = {t: make_eval_set(design, t, cfg.eval_n, g_test, maps, cfg.max_len) for t in PROBES} if design == "B" else {}
    acc = {}
    for meth in common.progress(METHODS, f"{design} eval"):
        model = with_delta(base, deltas[meth])
        for t, groups in sets.items():
            acc[common.mkey(fam, meth, t)] = accuracy(model, groups, device)
        if meth in ("lora_a", "lora_b", "data_mix"):
            for t, groups in probes.items():
                acc[common.mkey(f"probe_{design}", meth, t)] = accuracy(model, groups, device)
    for k, m in cats.items():
        c = torch.stack([mod.coeffs().detach().cpu() for mod in m.modules() if isinstance(mod, LoRALinear)])
        acc[common.mkey(f"cat_{design}", k, "weight_min")] = float(c.min())
        acc[common.mkey(f"cat_{design}", k, "weight_max")] = float(c.max())
        acc[common.mkey(f"cat_{design}", k, "loss_first")] = cat_hist[k][0]    # CAT's training loss, first
        acc[common.mkey(f"cat_{design}", k, "loss_last")] = cat_hist[k][-1]    # and last logged
    best = best_merge(acc, fam)                                        # the rival, chosen on validation
    for rival, key in ((best, "best_merge"), ("data_mix", "data_mix")):
        acc[common.mkey(f"cmp_{design}", key, "composite")] = acc[common.mkey(fam, rival, "composite")]
        acc[common.mkey(f"cmp_{design}", f"cat_vs_{key}", "gap")] = (acc[common.mkey(fam, CAT, "composite")]
                                                                     - acc[common.mkey(fam, rival, "composite")])
    return acc


def run_seed(cfg: Config):
    base, lora_a, hist = exp_skills(cfg)
    metrics, history = {}, {"skills": hist}
    for design in cfg.designs:
        acc, history[design] = exp_design(cfg, design, base, lora_a)
        metrics.update(acc)
    return metrics, history


def run(cfg: Config):
    t0 = time.time()
    runs = common.over_seeds(cfg, run_seed, NAME)
    if not common.is_main():
        return runs
    info, rows = {"best_merge_per_seed": {}}, []
    for design in cfg.designs:
        fam = f"acc_{design}"
        common.print_table([[LABELS[m]] + [runs.cell(common.mkey(fam, m, t)) for t in TASKS + ("composite_val",)]
                            for m in METHODS], ["method", "skill A", "skill B", "composite (test)", "composite (val)"],
                           title=f"design {design}: exact match, {cfg.eval_n} prompts per task, seeds {runs.seeds}")
        if design == "B":
            common.print0("probes (does a skill carry over to the other skill's inputs?): g behind '>': LoRA A "
                          f"{runs.cell('probe_B/lora_a/g_behind_gt')}, DATA-MIX {runs.cell('probe_B/data_mix/g_behind_gt')}"
                          f"; reversal of digits: LoRA B {runs.cell('probe_B/lora_b/reverse_digits')}, DATA-MIX "
                          f"{runs.cell('probe_B/data_mix/reverse_digits')}\n")
        chosen = [best_merge(r, fam) for r in runs.per_seed]          # each seed's rival, chosen on validation
        info["best_merge_per_seed"][design] = chosen
        for key, paper in (("best_merge", "+43%"), ("data_mix", "+12%")):
            test = paired_test([r[common.mkey(f"cmp_{design}", f"cat_vs_{key}", "gap")] for r in runs.per_seed])
            for k in ("mean", "std", "t", "p"):
                runs.mean[common.mkey(f"test_{design}", f"cat_vs_{key}", k)] = test[k]
            cat, rival = runs.mean[common.mkey(fam, CAT, "composite")], runs.mean[common.mkey(f"cmp_{design}", key, "composite")]
            name = f"best other merge ({','.join(dict.fromkeys(chosen))})" if key == "best_merge" else "DATA-MIX"
            rows.append([design, f"CAT vs {name}", paper, runs.cell(common.mkey(fam, CAT, "composite")),
                         runs.cell(common.mkey(f"cmp_{design}", key, "composite")), f"{cat / max(rival, 1e-9) - 1:+.0%}",
                         f"{test['mean']:+.3f} ± {test['std']:.3f}", verdict(test)])
    common.print_table(rows, ["design", "pre-registered comparison (composite, test)", "paper", "CAT", "rival", "rel.",
                              "gap (mean ± std over seeds)", "paired t-test"],
                       title=f"LoRA Soups headline ({cfg.preset}, seeds {runs.seeds}, {time.time() - t0:.0f} s)")
    history = {f"seed{s}": h for s, h in zip(runs.seeds, runs.extras)}
    common.save_results(NAME, cfg, runs, history=history, info=info, wall_time_s=time.time() - t0)
    return runs


def main():
    cfg = common.parse_args(Config, PRESETS)
    with common.session(cfg):
        run(cfg)


if __name__ == "__main__":
    main()
