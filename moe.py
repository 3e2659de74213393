"""
Mixture of Parrots: Experts improve memorization more than reasoning
Samy Jelassi, Clara Mohri, David Brandfonbrener, Alex Gu, Nikhil Vyas, Nikhil Anand, David Alvarez-Melis,
Yuanzhi Li, Sham M. Kakade, Eran Malach -- 2024, arXiv 2410.19034 (ICLR 2025). Official code: none found.
MoE layer mirrors Hugging Face `transformers` Mixtral (MixtralSparseMoeBlock, load_balancing_loss_func).

Finding: at a fixed number of *active* parameters, adding experts keeps improving memorization (MoE recall
tracks a dense model of the same *total* size) while reasoning does not improve (MoE accuracy tracks the
dense model of the same *active* size / width). The quick preset trains, on one CPU thread:
  phone-book (closed-book recall of 2000 random name -> 5-digit number pairs): dense d=32 and d=80 (FFN 8d)
  and top-2 MoEs at d=32 with E = 4 and 16 experts of hidden 4d (same active FFN as dense d=32);
  shortest path on small random graphs (8 vertices, 10 edges; 1000 unseen test graphs): dense d=16 and
  d=64 and a top-2 MoE at d=16 with E=16.
It prints accuracy, total and active parameters for every model, the routing load of every expert, and
the paper's (qualitative) result beside ours; the figures plot accuracy vs total and vs active parameters.
The theory's length-2 path problem is `--graph-task 2hop` (yes/no: is there a path of length 2 from s to
t?); at quick scale (|V|=16, 24 edges, 1000 steps, d=8..64) no width learned it (all at chance), so the
quick preset uses a small shortest path, as the spec's prototype did.

Run:
    python moe.py --preset smoke          # seconds, what pytest runs
    python moe.py                         # quick on CPU (~9 min on one thread of a busy 2-core box)
    python moe.py --device cuda           # full preset on one GPU (unmeasured; sized for < 1 h)
    python moe.py --graph-task 2hop       # the theory's length-2 path problem in place of shortest path

Glossary (ours -> paper):
    n_experts E  -> K (number of experts)          top_k k  -> top-2 routing (the paper's k)
    width d      -> m (hidden dimension / width)   heads    -> H
    graph_nodes  -> |V|                            graph_edges -> N (length of the edge list)
    params_active -> active parameters             params_total -> total parameters
    phonebook_acc -> exact-match accuracy of the retrieved number on the training entries
    graph_acc     -> exact-match accuracy on held-out graphs (any valid shortest path counts)

Design choices that are ours (the paper body gives the setup only in outline; an OpenReview reviewer
quotes top-2 routing and 12 layers for the synthetic runs, not checked against the PDF): an expert has
hidden size ratio*d/k, so a top-k MoE at width d has exactly the active FFN of the dense model at width d
(dense_d32 *is* the E=1 member of the d=32 family, up to the router's d*E weights). Phone-book ratio 8
(4d experts for top-2, the spec prototype's experts), graph ratio 4. GELU MLPs, learned positions,
LayerNorm (the paper's exact blocks are unverified). Load-balancing loss with Switch normalisation
(1 at balance; HF's Mixtral value is k times ours), coefficient 0.01, per layer, summed.

Does not include: the paper's pre-training of MoEs on 65B tokens and the downstream benchmarks (TriviaQA,
GSM8k, ...); expert parallelism / fused grouped-GEMM kernels; expert-choice routing; the proofs. The
graph sizes, depth and learning rates of the paper's synthetic experiments are not known to us: quick/full
use our own sizes. The paper reports the synthetic results as figures only, so the `paper` column is
qualitative.
"""
from __future__ import annotations

import dataclasses
import math
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
    # model family
    top_k: int = 2                     # experts per token (k); an expert's hidden size is ratio*d/k
    act: str = "gelu"                  # gelu | swiglu (same choice for dense MLPs and experts)
    renorm: bool = True                # renormalise the top-k gate weights to sum to 1 (Mixtral)
    aux_coef: float = 0.01             # load-balancing loss coefficient (Switch normalisation, per layer)
    z_coef: float = 0.0                # router z-loss coefficient (ST-MoE uses 1e-3); 0 = off
    capacity_factor: float = 0.0       # expert capacity c (drop assignments past ceil(c*k*T/E)); 0 = dropless
    dispatch: str = "auto"             # loop (Mixtral: one matmul pair per expert) | grouped (one padded bmm)
                                       # | auto = grouped on CUDA or for E >= 16 (fewer kernels), else loop
    # phone-book (memorization)
    pb_entries: int = 2000             # N name -> number pairs (paper: 1e5 .. 2e6)
    pb_digits: int = 5                 # digits per number
    pb_first: int = 100                # first-name tokens
    pb_last: int = 100                 # last-name tokens
    pb_layers: int = 2                 # transformer layers
    pb_heads: int = 4                  # attention heads
    pb_mlp_ratio: int = 8              # dense FFN hidden = ratio*d; expert hidden = ratio*d/k (8, k=2: 4d experts)
    pb_dense_widths: tuple[int, ...] = (32, 80)          # dense baselines of growing width
    pb_moe_width: int = 32             # width of every MoE (fixed active parameters)
    pb_experts: tuple[int, ...] = (4, 16)                 # E for the MoEs
    pb_steps: int = 1000               # optimizer steps
    pb_batch: int = 256                # entries per step
    pb_lr: float = 3e-3                # peak learning rate (weight decay 0: decay fights memorization)
    pb_eval_max: int = 0               # evaluate on at most this many training entries; 0 = all
    # graph reasoning
    graph_task: str = "path"           # 2hop (is there a path of length 2 from s to t?) | path (shortest path)
    graph_nodes: int = 8               # |V|
    graph_edges: int = 10              # edges per graph (the edge list has this many vertex pairs)
    graph_train: int = 50000           # training graphs (paper: 1e6)
    graph_test: int = 1000             # held-out test graphs (paper: 1e3)
    graph_layers: int = 3              # transformer layers
    graph_heads: int = 4               # attention heads
    graph_mlp_ratio: int = 4           # dense FFN hidden = ratio*d; expert hidden = ratio*d/k
    graph_dense_widths: tuple[int, ...] = (16, 64)        # dense baselines of growing width
    graph_moe_width: int = 16          # width of every MoE
    graph_experts: tuple[int, ...] = (16,)                # E for the MoEs
    graph_steps: int = 1500            # optimizer steps
    graph_batch: int = 128             # graphs per step
    graph_lr: float = 1e-3             # peak learning rate
    graph_wd: float = 0.1              # weight decay for the graph task
    warmup: int = 100                  # linear warmup steps (then cosine)
    eval_batch: int = 2000             # sequences per evaluation batch

    def __post_init__(self):
        if self.act not in ("gelu", "swiglu"):
            raise ValueError(f"act must be gelu or swiglu, not '{self.act}'")
        if self.graph_task not in ("2hop", "path"):
            raise ValueError(f"graph_task must be 2hop or path, not '{self.graph_task}'")
        if self.dispatch not in ("auto", "loop", "grouped"):
            raise ValueError(f"dispatch must be auto, loop or grouped, not '{self.dispatch}'")
        if self.top_k < 1:
            raise ValueError("top_k must be >= 1")
        for name in ("pb_experts", "graph_experts"):
            for e in getattr(self, name):
                if e < self.top_k:
                    raise ValueError(f"{name} has E={e} < top_k={self.top_k}")
        for w, h, what in [(w, self.pb_heads, "pb") for w in (*self.pb_dense_widths, self.pb_moe_width)] + \
                [(w, self.graph_heads, "graph") for w in (*self.graph_dense_widths, self.graph_moe_width)]:
            if w <= 0 or w % h:
                raise ValueError(f"{what} width {w} is not a positive multiple of {what}_heads={h}")
        for w, r in ((self.pb_moe_width, self.pb_mlp_ratio), (self.graph_moe_width, self.graph_mlp_ratio)):
            if r < 1 or (r * w) % self.top_k:
                raise ValueError(f"mlp ratio*d = {r * w} is not a positive multiple of top_k={self.top_k}")
        if not 1 <= self.pb_entries <= self.pb_first * self.pb_last:
            raise ValueError(f"pb_entries must be in [1, pb_first*pb_last = {self.pb_first * self.pb_last}]")
        if self.pb_digits < 1:
            raise ValueError("pb_digits must be >= 1")
        pairs = self.graph_nodes * (self.graph_nodes - 1) // 2
        if self.graph_nodes < 4 or not 3 <= self.graph_edges <= pairs:
            raise ValueError(f"need graph_nodes >= 4 and 3 <= graph_edges <= {pairs} (all vertex pairs)")
        if min(self.pb_steps, self.graph_steps, self.pb_batch, self.graph_batch, self.graph_train,
               self.graph_test, self.eval_batch) < 1:
            raise ValueError("steps, batches and set sizes must be >= 1")


PRESETS = {
    "smoke": dict(pb_entries=50, pb_digits=3, pb_layers=1, pb_dense_widths=(16,), pb_moe_width=16,
                  pb_experts=(4,), pb_steps=150, pb_batch=50, pb_lr=1e-2, graph_task="path", graph_nodes=6,
                  graph_edges=7, graph_train=200, graph_test=100, graph_layers=1, graph_dense_widths=(16,),
                  graph_moe_width=16, graph_experts=(), graph_steps=30, graph_batch=32, graph_lr=3e-3, warmup=10),
    "quick": {},
    "full": dict(pb_entries=100_000, pb_digits=8, pb_first=500, pb_last=500, pb_layers=4, pb_heads=4,
                 pb_dense_widths=(64, 128, 256, 384), pb_moe_width=64, pb_experts=(4, 8, 16, 32, 64), pb_steps=6000,
                 pb_batch=1024, pb_lr=2e-3, graph_task="path", graph_nodes=15, graph_edges=22,
                 graph_train=1_000_000, graph_test=1000, graph_layers=6, graph_heads=4,
                 graph_dense_widths=(64, 128, 256, 512), graph_moe_width=64, graph_experts=(8, 16, 32),
                 graph_steps=6000, graph_batch=128, graph_lr=1e-3, eval_batch=4096),
}

# -----------------------------------------------------------------------------
# The MoE layer


class MLP(nn.Module):
    """One feed-forward network: the dense FFN and every expert. gelu: W2 gelu(W1 x); swiglu: W2 (silu(W1 x) * W3 x)."""

    def __init__(self, d: int, hid: int, act: str = "gelu"):
        super().__init__()
        self.act = act
        self.fc = nn.Linear(d, hid, bias=False)
        self.gate = nn.Linear(d, hid, bias=False) if act == "swiglu" else None
        self.proj = nn.Linear(hid, d, bias=False)  # named 'proj': common.GPT gives it the scaled init

    def forward(self, x):                          # (T, d) or (B, T, d)
        h = self.fc(x)
        h = F.silu(h) * self.gate(x) if self.act == "swiglu" else F.gelu(h)
        return self.proj(h)


class MoE(nn.Module):
    """Token-choice top-k Mixture of Experts (Mixtral-style, dropless unless capacity_factor > 0).

    After each forward: self.aux (load-balancing loss), self.z (router z-loss), self.load (E,) assignments
    per expert, self.dropped (assignments dropped by the capacity limit).
    """

    def __init__(self, d: int, hid: int, n_experts: int, k: int, act: str = "gelu", renorm: bool = True,
                 capacity_factor: float = 0.0, dispatch: str = "loop"):
        super().__init__()
        if not 1 <= k <= n_experts:
            raise ValueError(f"need 1 <= k <= E, got k={k}, E={n_experts}")
        if dispatch not in ("loop", "grouped"):
            raise ValueError(f"dispatch must be loop or grouped, not '{dispatch}'")
        self.E, self.k, self.renorm, self.capacity_factor = n_experts, k, renorm, capacity_factor
        self.act, self.dispatch = act, dispatch
        self.router = nn.Linear(d, n_experts, bias=False)  # N(0, 0.02) init (zeros would tie all tokens to experts 0..k-1)
        self.experts = nn.ModuleList([MLP(d, hid, act) for _ in range(n_experts)])
        self.aux = self.z = torch.zeros(())
        self.load = torch.zeros(n_experts)
        self.dropped = 0

    def route(self, x):
        """x (T, d) -> probs (T, E), gate weights (T, k), expert ids (T, k). Router math in fp32."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.router.weight.float())   # (T, E)
        probs = logits.softmax(-1)                                     # p_e(x) = softmax(W_r x)_e
        w, idx = probs.topk(self.k, dim=-1)                            # (T, k), (T, k)
        if self.renorm:
            w = w / w.sum(-1, keepdim=True)                            # g = p_topk / sum p_topk
        return logits, probs, w, idx

    def forward(self, x):                                              # (B, T, d)
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                   # (N, d), N = B*T tokens
        N, E, k = x.shape[0], self.E, self.k
        logits, probs, w, idx = self.route(x)
        counts = torch.bincount(idx.reshape(-1), minlength=E)          # (E,) assignments per expert
        # Switch load balancing: aux = E * sum_e f_e * P_e, f_e = share of assignments, P_e = mean router prob
        self.aux = E * (counts.float() / (N * k) * probs.mean(0)).sum()
        self.z = torch.logsumexp(logits, -1).pow(2).mean()             # ST-MoE router z-loss
        self.load = counts.detach()
        # dispatch: sort the N*k (token, slot) assignments by expert, keeping token order within an expert
        flat_expert = idx.reshape(-1)                                   # (N*k,)
        order = flat_expert.argsort(stable=True)
        expert = flat_expert[order]                                     # (N*k,) sorted expert ids
        tok = torch.arange(N, device=x.device).repeat_interleave(k)[order]   # (N*k,) token of each assignment
        gate = w.reshape(-1)[order]                                     # (N*k,) its gate weight
        rank = torch.arange(N * k, device=x.device) - (torch.cumsum(counts, 0) - counts)[expert]  # place in queue
        self.dropped = 0
        if self.capacity_factor > 0:                                    # keep the first C per expert (Switch)
            cap = math.ceil(self.capacity_factor * k * N / E)
            keep = rank < cap
            expert, tok, gate, rank = expert[keep], tok[keep], gate[keep], rank[keep]
            self.dropped = int((~keep).sum())
            counts = counts.clamp(max=cap)
        out = torch.zeros_like(x)                                       # (N, d)
        if self.dispatch == "grouped":                                  # one batched matmul over experts
            buf = x.new_zeros(E, int(counts.max()), x.shape[1])          # (E, C, d), C = busiest expert
            buf[expert, rank] = x[tok]
            y = self._grouped(buf)[expert, rank]                        # (n_kept, d)
            out.index_add_(0, tok, (y * gate[:, None]).to(out.dtype))
        else:                                                           # Mixtral: loop over experts
            for e, (tok_e, gate_e) in enumerate(zip(tok.split(counts.tolist()), gate.split(counts.tolist()))):
                if tok_e.numel():                                       # y_t += g_{t,e} * FFN_e(x_t)
                    y = self.experts[e](x[tok_e]) * gate_e[:, None]
                    out.index_add_(0, tok_e, y.to(out.dtype))
        return out.reshape(shape)

    def _grouped(self, buf):
        """All experts at once on a padded (E, C, d) buffer with their weights stacked: same math as MLP."""
        W1 = torch.stack([e.fc.weight for e in self.experts])          # (E, hid, d)
        W2 = torch.stack([e.proj.weight for e in self.experts])        # (E, d, hid)
        h = buf @ W1.transpose(1, 2)                                    # (E, C, hid)
        if self.act == "swiglu":
            h = F.silu(h) * (buf @ torch.stack([e.gate.weight for e in self.experts]).transpose(1, 2))
        else:
            h = F.gelu(h)
        return h @ W2.transpose(1, 2)                                   # (E, C, d)


def moe_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, MoE)]


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(total, active): active = total - sum over MoE layers of (E - k) * params(expert). Router counts as active."""
    total = common.count_params(model)
    idle = sum((m.E - m.k) * common.count_params(m.experts[0]) for m in moe_layers(model))
    return total, total - idle


def build_model(vocab: int, block: int, d: int, layers: int, heads: int, ratio: int, cfg: Config, n_experts: int = 0):
    """A common.GPT whose FFNs are dense MLP(d, ratio*d) (n_experts = 0) or MoE(d, ratio*d/k, E, k)."""
    gcfg = common.GPTConfig(vocab_size=vocab, block_size=block, n_layer=layers, n_head=heads, n_embd=d,
                            pos="learned", mlp_ratio=ratio, tie_weights=False)
    if n_experts:
        hid = ratio * d // cfg.top_k
        grouped = "cuda" in str(cfg.device) or n_experts >= 16
        dispatch = cfg.dispatch if cfg.dispatch != "auto" else ("grouped" if grouped else "loop")
        factory = lambda c, i: MoE(d, hid, n_experts, cfg.top_k, cfg.act, cfg.renorm, cfg.capacity_factor, dispatch)
    else:
        factory = lambda c, i: MLP(d, ratio * d, cfg.act)
    return common.GPT(gcfg, mlp_factory=factory)

# -----------------------------------------------------------------------------
# Data: the phone-book (memorization)


def phonebook_vocab(n_first: int, n_last: int) -> common.Tokenizer:
    return common.Tokenizer(["<pad>", "<bos>", ":", "<eos>"] + [str(i) for i in range(10)]
                            + [f"F{i}" for i in range(n_first)] + [f"L{i}" for i in range(n_last)])


def make_phonebook(n: int, digits: int, n_first: int, n_last: int, gen: torch.Generator) -> torch.Tensor:
    """n entries with unique (first, last) names and uniform random numbers. Returns (n, digits + 5) ids.

    One entry, token by token:  <bos> F17 L42 : 3 0 9 1 5 <eos>   ("F17 L42: 30915")
    """
    tok = phonebook_vocab(n_first, n_last)
    name = torch.randperm(n_first * n_last, generator=gen)[:n]        # unique (first, last) pairs
    first = tok["F0"] + name // n_last
    last = tok["L0"] + name % n_last
    number = tok["0"] + torch.randint(0, 10, (n, digits), generator=gen)
    col = lambda i: torch.full((n, 1), i, dtype=torch.long)
    return torch.cat([col(tok["<bos>"]), first[:, None], last[:, None], col(tok[":"]), number, col(tok["<eos>"])], 1)


def answer_targets(seqs: torch.Tensor, n_prompt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets): next-token targets with -100 everywhere but the answer (tokens after the prompt)."""
    x, y = seqs[:, :-1], seqs[:, 1:].clone()
    y[:, :n_prompt - 1] = -100
    return x, y

# -----------------------------------------------------------------------------
# Data: random graphs (reasoning)


def graph_vocab(n: int) -> common.Tokenizer:
    return common.Tokenizer(["<pad>", "<bos>", "|", ":", "<eos>", "yes", "no"] + [f"v{i}" for i in range(n)])


def random_graphs(B: int, n: int, m: int, gen: torch.Generator):
    """B graphs with m distinct undirected edges on n vertices: edge list (B, m, 2), adjacency (B, n, n) bool."""
    iu = torch.triu_indices(n, n, 1)                                    # (2, P) all vertex pairs
    pick = torch.rand(B, iu.shape[1], generator=gen).argsort(-1)[:, :m]  # m distinct pairs, random order
    edges = iu.T[pick]                                                  # (B, m, 2)
    flip = torch.rand(B, m, generator=gen) < 0.5                        # random orientation of each edge
    edges = torch.where(flip[..., None], edges.flip(-1), edges)
    A = torch.zeros(B, n, n, dtype=torch.bool)
    b = torch.arange(B)[:, None]
    A[b, edges[..., 0], edges[..., 1]] = True
    A[b, edges[..., 1], edges[..., 0]] = True
    return edges, A


def all_pairs_dist(A: torch.Tensor) -> torch.Tensor:
    """BFS distances by repeated frontier expansion: (B, n, n) bool -> (B, n, n) long, n+1 = unreachable."""
    B, n, _ = A.shape
    Af = A.float()
    dist = torch.full((B, n, n), n + 1, dtype=torch.long)
    reach = torch.eye(n, dtype=torch.bool).expand(B, n, n).clone()
    dist[reach] = 0
    for d in range(1, n):
        new = (reach.float() @ Af > 0) & ~reach
        if not new.any():
            break
        dist[new] = d
        reach |= new
    return dist


def sample_pairs(mask: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One uniformly random (s, t) with mask[b, s, t] per graph (mask must have a True per row)."""
    B, n, _ = mask.shape
    score = torch.rand(B, n * n, generator=gen).masked_fill(~mask.reshape(B, -1), -1.0)
    st = score.argmax(-1)
    return st // n, st % n


def shortest_path_targets(A: torch.Tensor, dist: torch.Tensor, s: torch.Tensor, t: torch.Tensor, length: int):
    """The BFS shortest path s -> t, smallest-index neighbour at ties: (B, length) vertex ids, -1 padded."""
    B, n, _ = A.shape
    b = torch.arange(B)
    path = torch.full((B, length), -1, dtype=torch.long)
    cur, path[:, 0] = s.clone(), s
    d_t = dist[b, :, t]                                                 # (B, n) distance of every vertex to t
    for i in range(1, length):
        going = d_t[b, cur] > 0
        step_ok = A[b, cur] & (d_t == (d_t[b, cur] - 1)[:, None])      # neighbours one step closer to t
        nxt = torch.where(step_ok, torch.arange(n), n).min(-1).values  # smallest such index
        cur = torch.where(going, nxt, cur)
        path[:, i] = torch.where(going, cur, -1)
    return path


def make_graph_task(B: int, n: int, m: int, task: str, gen: torch.Generator) -> dict:
    """B examples of the graph task, as token ids plus the graphs (for checking answers).

    path: <bos> v3 v0 v1 v5 ... (m edges as vertex pairs) | v3 v4 : v3 v0 v4 <eos> <pad> ...
          (shortest path from s=v3 to t=v4; distance >= 2; any shortest path is accepted at eval)
    2hop: <bos> v3 v0 v1 v5 ... | v3 v4 : yes      ("is there a w with s-w and w-t edges?", balanced yes/no)
    """
    tok = graph_vocab(n)
    V0 = tok["v0"]
    out = {"seqs": [], "A": [], "s": [], "t": [], "dist": []}
    need = B
    while need > 0:
        edges, A = random_graphs(need + need // 4 + 8, n, m, gen)
        dist = all_pairs_dist(A)
        if task == "path":
            cand = (dist >= 2) & (dist <= n)
        else:
            two = (A.float() @ A.float() > 0) & ~torch.eye(n, dtype=torch.bool)  # a length-2 path exists
            want_yes = torch.rand(A.shape[0], generator=gen) < 0.5
            no = ~two & ~torch.eye(n, dtype=torch.bool)
            has_yes, has_no = two.flatten(1).any(1), no.flatten(1).any(1)
            use_yes = (want_yes & has_yes) | ~has_no
            cand = torch.where(use_yes[:, None, None], two, no)
        ok = cand.flatten(1).any(1)
        edges, A, dist, cand = edges[ok][:need], A[ok][:need], dist[ok][:need], cand[ok][:need]
        s, t = sample_pairs(cand, gen)
        Bc = A.shape[0]
        col = lambda name: torch.full((Bc, 1), tok[name], dtype=torch.long)
        prompt = torch.cat([col("<bos>"), V0 + edges.reshape(Bc, -1), col("|"), V0 + s[:, None], V0 + t[:, None],
                            col(":")], 1)
        if task == "path":
            p = shortest_path_targets(A, dist, s, t, n)                       # (Bc, n), -1 padded
            ans = torch.where(p >= 0, V0 + p, tok["<pad>"])
            ans = torch.cat([ans, col("<pad>")], 1)
            ans[torch.arange(Bc), dist[torch.arange(Bc), s, t] + 1] = tok["<eos>"]
        else:
            ans = torch.where(two[torch.arange(Bc), s, t], tok["yes"], tok["no"])[:, None]
        out["seqs"].append(torch.cat([prompt, ans], 1))
        for key, val in (("A", A), ("s", s), ("t", t), ("dist", dist[torch.arange(Bc), s, t])):
            out[key].append(val)
        need -= Bc
    res = {key: torch.cat(v) for key, v in out.items()}
    res["prompt_len"] = 2 * m + 5
    return res


def graph_hash(A: torch.Tensor) -> torch.Tensor:
    """A 63-bit hash of each graph's edge set (Zobrist-style sum of fixed random keys), (B,)."""
    n = A.shape[-1]
    keys = torch.randint(0, 2**62, (n, n), generator=torch.Generator().manual_seed(1234))
    return (A.long() * keys).flatten(1).sum(1)


def check_paths(pred: torch.Tensor, A: torch.Tensor, s, t, dist, v0: int, eos: int) -> torch.Tensor:
    """(B,) bool: pred (B, L) tokens spell *a* shortest path s -> t then <eos> (any tie is accepted)."""
    B, L = pred.shape
    n = A.shape[-1]
    b = torch.arange(B)
    v = pred - v0
    is_vertex = (v >= 0) & (v < n)
    vc = v.clamp(0, n - 1)
    pos = torch.arange(L)[None, :]
    inside = pos <= dist[:, None]                                       # the dist+1 vertices of the path
    ok = torch.where(inside, is_vertex, True).all(1)
    hop = A[b[:, None], vc[:, :-1], vc[:, 1:]]                          # (B, L-1) is (v_i, v_i+1) an edge?
    ok &= torch.where(pos[:, 1:] <= dist[:, None], hop, True).all(1)
    ok &= (vc[:, 0] == s) & (vc[b, dist.clamp(max=L - 1)] == t)
    eos_at = (dist + 1).clamp(max=L - 1)
    ok &= (pred[b, eos_at] == eos) & (dist + 1 < L)
    return ok

# -----------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def eval_phonebook(model, seqs: torch.Tensor, device, batch: int) -> dict:
    """Closed-book recall: greedy-decode the digits and <eos> from '<bos> F L :'; exact match on all of them."""
    model.eval()
    hit, loss_sum = 0, 0.0
    for i in range(0, len(seqs), batch):
        chunk = seqs[i:i + batch].to(device)
        with common.autocast(device):
            out = model.generate(chunk[:, :4], chunk.shape[1] - 4, greedy=True)
            x, y = answer_targets(chunk, 4)
            loss_sum += float(model(x, y)[1]) * len(chunk)
        hit += int((out[:, 4:] == chunk[:, 4:]).all(1).sum())
    return {"acc": hit / len(seqs), "loss": loss_sum / len(seqs)}


@torch.no_grad()
def eval_graph(model, data: dict, task: str, device, batch: int) -> dict:
    """Held-out accuracy: 2hop = the yes/no token is right; path = the decoded path is a valid shortest path."""
    model.eval()
    P = data["prompt_len"]
    n = data["A"].shape[-1]
    tok = graph_vocab(n)
    hit, loss_sum, N = 0, 0.0, len(data["seqs"])
    for i in range(0, N, batch):
        sl = slice(i, i + batch)
        seqs = data["seqs"][sl].to(device)
        x, y = answer_targets(seqs, P)
        y = y.masked_fill(y == tok["<pad>"], -100)
        with common.autocast(device):
            loss_sum += float(model(x, y)[1]) * len(seqs)
            if task == "2hop":
                pred = model(seqs[:, :P])[0][:, -1].argmax(-1)
                hit += int((pred == seqs[:, P]).sum())
            else:
                out = model.generate(seqs[:, :P], seqs.shape[1] - P, greedy=True).cpu()
                ok = check_paths(out[:, P:], data["A"][sl], data["s"][sl], data["t"][sl], data["dist"][sl],
                                 tok["v0"], tok["<eos>"])
                hit += int(ok.sum())
    return {"acc": hit / N, "loss": loss_sum / N}

# -----------------------------------------------------------------------------
# Training one model


def train_one(model, data: torch.Tensor, n_prompt: int, pad_id: int, steps: int, batch: int, lr: float,
              wd: float, cfg: Config, device, gen: torch.Generator, desc: str):
    """AdamW (common.train) on answer tokens + aux_coef * sum of per-layer balance losses (+ z-loss).
    Returns (history, routing load (layers, E) share of assignments over the last 20% of steps)."""
    moes = moe_layers(model)
    load = torch.zeros(len(moes), moes[0].E) if moes else None
    calls = [0]

    def get_batch(step):
        rows = data[torch.randint(0, len(data), (batch,), generator=gen)]
        x, y = answer_targets(rows, n_prompt)
        y = y.masked_fill(y == pad_id, -100)
        return x.to(device), y.to(device)

    def loss_fn(m, b):
        loss = m(*b)[1]
        if moes:
            loss = loss + cfg.aux_coef * sum(l.aux for l in moes)
            if cfg.z_coef:
                loss = loss + cfg.z_coef * sum(l.z for l in moes)
            calls[0] += 1
            if calls[0] > 0.8 * steps:
                for j, l in enumerate(moes):
                    load[j] += l.load.float().cpu()
        return loss

    hist = common.train(model, get_batch, steps=steps, lr=lr, device=device, warmup=min(cfg.warmup, steps // 2),
                        weight_decay=wd, loss_fn=loss_fn, compile=cfg.compile, desc=desc, quiet=True)
    if load is not None:
        load = load / load.sum(1, keepdim=True).clamp(min=1)
    return hist, load


def model_names(dense_widths, moe_experts, k):
    return [(f"dense_d{w}", w, 0) for w in dense_widths] + [(f"moe_e{e}_k{k}", None, e) for e in moe_experts]


def run_phonebook(cfg: Config, device, seed: int) -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(seed)
    tok = phonebook_vocab(cfg.pb_first, cfg.pb_last)
    data = make_phonebook(cfg.pb_entries, cfg.pb_digits, cfg.pb_first, cfg.pb_last, gen)
    ev = data if not cfg.pb_eval_max else data[:cfg.pb_eval_max]
    rows = {}
    for name, w, E in model_names(cfg.pb_dense_widths, cfg.pb_experts, cfg.top_k):
        torch.manual_seed(seed)
        d = w or cfg.pb_moe_width
        model = build_model(len(tok), data.shape[1], d, cfg.pb_layers, cfg.pb_heads, cfg.pb_mlp_ratio, cfg, E).to(device)
        t0 = time.time()
        hist, load = train_one(model, data, 4, tok["<pad>"], cfg.pb_steps, cfg.pb_batch, cfg.pb_lr, 0.0, cfg,
                               device, gen, f"phonebook {name}")
        res = eval_phonebook(model, ev, device, cfg.eval_batch)
        total, active = param_counts(model)
        rows[name] = dict(d=d, E=E or 1, total=total, active=active, acc=res["acc"], loss=res["loss"],
                          load=load, seconds=time.time() - t0, curve=hist["loss"])
        common.print0(f"phonebook {name:12s} total {total:>9,} active {active:>9,} | answer loss "
                      f"{res['loss']:.3f} | recall {res['acc']:.3f} | {time.time() - t0:.0f} s")
    return rows, {"entries": cfg.pb_entries, "digits": cfg.pb_digits}


def run_graph(cfg: Config, device, seed: int) -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(seed + 1)
    tok = graph_vocab(cfg.graph_nodes)
    chunks = [make_graph_task(min(100_000, cfg.graph_train - i), cfg.graph_nodes, cfg.graph_edges, cfg.graph_task, gen)
              for i in range(0, cfg.graph_train, 100_000)]
    train = {k: (torch.cat([c[k] for c in chunks]) if torch.is_tensor(chunks[0][k]) else chunks[0][k]) for k in chunks[0]}
    test_gen = torch.Generator().manual_seed(seed + 10_007)            # held-out graphs: another seed ...
    test = make_graph_task(cfg.graph_test + cfg.graph_test // 10 + 10, cfg.graph_nodes, cfg.graph_edges,
                           cfg.graph_task, test_gen)
    fresh = ~torch.isin(graph_hash(test["A"]), graph_hash(train["A"]))  # ... and none equal to a training graph
    test = {k: (v[fresh][:cfg.graph_test] if torch.is_tensor(v) else v) for k, v in test.items()}
    rows = {}
    for name, w, E in model_names(cfg.graph_dense_widths, cfg.graph_experts, cfg.top_k):
        torch.manual_seed(seed)
        d = w or cfg.graph_moe_width
        model = build_model(len(tok), train["seqs"].shape[1], d, cfg.graph_layers, cfg.graph_heads, cfg.graph_mlp_ratio,
                            cfg, E).to(device)
        t0 = time.time()
        hist, load = train_one(model, train["seqs"], train["prompt_len"], tok["<pad>"], cfg.graph_steps,
                               cfg.graph_batch, cfg.graph_lr, cfg.graph_wd, cfg, device, gen, f"graph {name}")
        res = eval_graph(model, test, cfg.graph_task, device, cfg.eval_batch)
        total, active = param_counts(model)
        rows[name] = dict(d=d, E=E or 1, total=total, active=active, acc=res["acc"], loss=res["loss"],
                          load=load, seconds=time.time() - t0, curve=hist["loss"])
        common.print0(f"graph {name:12s} total {total:>9,} active {active:>9,} | answer loss "
                      f"{res['loss']:.3f} | test acc {res['acc']:.3f} | {time.time() - t0:.0f} s")
    n_yes = int((test["seqs"][:, test["prompt_len"]] == tok["yes"]).sum()) if cfg.graph_task == "2hop" else 0
    return rows, {"test_size": len(test["seqs"]), "yes_share": n_yes / len(test["seqs"]),
                  "dropped_duplicates": int((~fresh).sum())}

# -----------------------------------------------------------------------------
# Report


def usage_line(load: torch.Tensor) -> str:
    """Per-expert share of assignments (averaged over layers) in % and max/mean, min/mean (1 = balanced)."""
    share = load.mean(0)
    E = share.numel()
    return (" ".join(f"{100 * v:.1f}" for v in share.tolist())
            + f"   | max/mean {float(load.max()) * E:.2f}, min/mean {float(load.min()) * E:.2f}")


def report(task: str, rows: dict, paper: dict, moe_d: int, metric: str):
    """The headline table: one row per model with the paper's qualitative result beside ours."""
    table = []
    for name, r in rows.items():
        tag = " (= E=1)" if (r["E"] == 1 and r["d"] == moe_d) else ""   # the dense member of the MoE family
        table.append([name + tag, r["d"], r["E"], f"{r['total']:,}", f"{r['active']:,}", r["loss"], r["acc"],
                      paper["moe" if name.startswith("moe") else "dense"], f"{r['seconds']:.0f}"])
    common.print_table(table, ["model", "d", "E", "total params", "active params", "answer loss",
                               f"ours: {metric}", "paper (qualitative)", "s"], title=task)
    for name, r in rows.items():
        if r["load"] is not None:
            common.print0(f"  routing load {name} (% of assignments per expert, last 20% of steps): {usage_line(r['load'])}")
    common.print0("")


def summary_lines(pb: dict, gr: dict, cfg: Config) -> list[str]:
    """The finding in measured numbers: recall rises with E at fixed active size; graph accuracy does not."""
    out = []
    moe_pb = [r for n, r in pb.items() if n.startswith("moe")]
    base = pb.get(f"dense_d{cfg.pb_moe_width}")
    if moe_pb:
        seq = ([f"E=1 {base['acc']:.2f}"] if base else []) + [f"E={r['E']} {r['acc']:.2f}" for r in moe_pb]
        out.append(f"phone-book recall at fixed active size (d={cfg.pb_moe_width}, top-{cfg.top_k}): " + " -> ".join(seq))
    moe_g = [r for n, r in gr.items() if n.startswith("moe")]
    gbase = gr.get(f"dense_d{cfg.graph_moe_width}")
    if moe_g:
        seq = ([f"E=1 {gbase['acc']:.2f}"] if gbase else []) + [f"E={r['E']} {r['acc']:.2f}" for r in moe_g]
        wid = " -> ".join(f"d={r['d']} {r['acc']:.2f}" for n, r in gr.items() if n.startswith("dense"))
        out.append(f"graph ({cfg.graph_task}) accuracy at fixed width d={cfg.graph_moe_width}: " + " -> ".join(seq)
                   + f";  dense by width: {wid}")
    return out


def plot_results(name: str, rows: dict, out_dir: str, ylabel: str, moe_d: int):
    """Accuracy vs total and vs active parameters; the MoE line starts at its E=1 member (dense at moe_d)."""
    for axis in ("total", "active"):
        curves = {}
        for fam in ("dense", "moe"):
            pts = sorted((r[axis], r["acc"]) for n, r in rows.items()
                         if n.startswith(fam) or (fam == "moe" and n == f"dense_d{moe_d}"))
            if len(pts) > (fam == "moe"):
                curves[fam if fam == "dense" else f"moe d={moe_d} (E=1 = dense)"] = ([p[0] for p in pts], [p[1] for p in pts])
        common.plot(f"moe_{name}_{axis}", curves, out_dir=out_dir, xlabel=f"{axis} parameters", ylabel=ylabel,
                    title=f"{name}: accuracy vs {axis} parameters", logx=True)

# -----------------------------------------------------------------------------
# Run


PAPER_PB = {"dense": "on the dense curve by total params", "moe": "rises with E; ~dense of same total"}
PAPER_GRAPH = {"dense": "rises with width", "moe": "flat in E; = dense of same width"}


def run(cfg: Config) -> dict:
    common.set_threads(cfg.threads, cfg.device)
    device = common.get_device(cfg.device)
    t_start = time.time()
    keep = {}

    def run_one(c: Config) -> dict:
        common.set_seed(c.seed)
        pb, pb_info = run_phonebook(c, device, c.seed)
        gr, gr_info = run_graph(c, device, c.seed)
        keep.update(pb=pb, gr=gr, pb_info=pb_info, gr_info=gr_info)
        m = {}
        for n, r in pb.items():
            m[f"phonebook_acc/{n}"], m[f"phonebook_loss/{n}"] = r["acc"], r["loss"]
        for n, r in gr.items():
            m[f"graph_acc/{n}"], m[f"graph_loss/{n}"] = r["acc"], r["loss"]
        for prefix, rows in (("graph", gr), ("phonebook", pb)):  # plain params_*/<model>: the phone-book's
            for n, r in rows.items():                                 # count where both tasks use the name
                m[f"params_total/{n}"], m[f"params_active/{n}"] = r["total"], r["active"]
                m[f"{prefix}_params_total/{n}"], m[f"{prefix}_params_active/{n}"] = r["total"], r["active"]
                if r["load"] is not None:
                    m[f"{prefix}_load_max_over_mean/{n}"] = float(r["load"].max()) * r["E"]
        return m

    metrics = common.over_seeds(cfg, run_one)
    pb, gr = keep["pb"], keep["gr"]
    info = keep["gr_info"]
    report(f"Phone-book (memorization): closed-book recall of {cfg.pb_entries} name -> {cfg.pb_digits}-digit "
           f"entries, exact match on all training entries (last seed)", pb, PAPER_PB, cfg.pb_moe_width, "recall")
    chance = "chance 0.5, yes share %.2f" % info["yes_share"] if cfg.graph_task == "2hop" else "held-out graphs"
    report(f"Graph reasoning ({cfg.graph_task}, |V|={cfg.graph_nodes}, {cfg.graph_edges} edges): exact-match "
           f"accuracy on {info['test_size']} unseen graphs ({chance})", gr, PAPER_GRAPH, cfg.graph_moe_width, "acc")
    for line in summary_lines(pb, gr, cfg):
        common.print0(line)
    wall = time.time() - t_start
    history = {"phonebook": {n: {"loss": r["curve"], "load": r["load"]} for n, r in pb.items()},
               "graph": {n: {"loss": r["curve"], "load": r["load"]} for n, r in gr.items()}, **keep["gr_info"]}
    common.save_results("moe", cfg, metrics, history, wall)
    plot_results("phonebook", pb, cfg.out, "phone-book recall", cfg.pb_moe_width)
    plot_results("graph", gr, cfg.out, f"{cfg.graph_task} test accuracy", cfg.graph_moe_width)
    common.print0(f"wall time {wall:.0f} s")
    return metrics


def main():
    run(common.parse_args(Config, PRESETS))


if __name__ == "__main__":
    main()
