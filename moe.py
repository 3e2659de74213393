"""
Mixture of Parrots: Experts improve memorization more than reasoning
Jelassi, Mohri, Brandfonbrener, Gu, Vyas, Anand, Alvarez-Melis, Li, Kakade, Malach. ICLR 2025, arXiv 2410.19034.
Official code: none found. The MoE layer follows Hugging Face Mixtral (top-k softmax router, dropless).

Finding: with active parameters fixed, more experts keep improving memorization (a MoE moves toward the
dense model of equal *total* size) but not reasoning (it stays with the dense model of equal *active* size).
Measured (quick, --seeds 3, CPU one thread, 1533 s): 16 experts close 0.48 +- 0.19 of the phone-book gap
from the dense model of the MoE's width to the dense model of its total size, 0.15 +- 0.19 on 2-hop; full: unmeasured.

Run:  python moe.py --preset smoke            # seconds, what pytest runs
      python moe.py                           # quick on CPU: phone-book + 2-hop, 1 seed (add --seeds 3)
      python moe.py --device cuda             # full on one GPU
      torchrun --standalone --nproc_per_node=2 moe.py --preset smoke --device cpu
Tasks: phone-book = closed-book recall of N random 'F17 L42 : 30915' entries (exact match over all of
them); 2hop = the theory's length-2 path problem in search form: on a held-out random graph given as a list
of edge tokens, output a path s w t (the yes/no form gave no learning signal at small scale); path = shortest
path (any shortest path counts). An expert has hidden size mlp_ratio*d/top_k, so a top-2 MoE at width d has
the active FFN of the dense model at width d.
Glossary (ours -> paper): n_experts E -> K; top_k -> k (top-2); width d -> m; heads -> H; graph_nodes -> |V|;
  graph_edges -> N (edge tokens); params total / active -> total / active parameters;
  gap_closed -> where a MoE sits between the dense model of its width (0) and the dense model closest in
  total size to the largest MoE (1).
Does not include: the 65B-token pre-training and benchmarks (TriviaQA, GSM8k, ...), the proofs, expert
parallelism or fused grouped-GEMM kernels, expert-choice routing. The paper's synthetic sizes are not known
to us (figures only): ours are our own, and the `paper` column is qualitative.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import common  # first: it reports a missing package in one line

import torch
import torch.nn as nn
import torch.nn.functional as F

NAME = "moe"

# -----------------------------------------------------------------------------
# Config


@dataclass
class Config(common.BaseConfig):
    # the MoE layer
    top_k: int = 2                     # experts per token (k); an expert's hidden size is mlp_ratio*d/k
    act: str = "gelu"                  # gelu | swiglu: the FFN of dense models and of every expert
    renorm: bool = True                # renormalise the top-k gate weights to sum to 1 (Mixtral); off = Switch
    aux_coef: float = 0.01             # load-balancing loss weight (Switch normalisation, summed over layers)
    z_coef: float = 0.0                # router z-loss weight (ST-MoE uses 1e-3); 0 = off
    capacity_factor: float = 0.0       # expert capacity c: drop assignments past ceil(c*k*T/E); 0 = dropless
    dispatch: str = "auto"             # loop (one matmul pair per expert) | grouped (one padded bmm) | auto
                                       # (grouped on CUDA or for E >= 16, where it is faster; loop otherwise)
    # phone-book (memorization)
    pb_entries: int = 2000             # N name -> number entries (paper: 1e5 .. 2e6)
    pb_digits: int = 5                 # digits per number
    pb_first: int = 100                # first-name tokens (N <= first * last)
    pb_last: int = 100                 # last-name tokens
    pb_layers: int = 2                 # transformer layers
    pb_heads: int = 4                  # attention heads
    pb_mlp_ratio: int = 8              # dense FFN hidden = ratio*d; expert hidden = ratio*d/top_k
    pb_dense_widths: tuple[int, ...] = (32, 80)   # dense widths; must hold pb_moe_width (its E=1 member)
    pb_moe_width: int = 32             # width d of every phone-book MoE (active size fixed)
    pb_experts: tuple[int, ...] = (4, 16)         # numbers of experts E (each >= top_k)
    pb_steps: int = 1000               # optimizer steps per model
    pb_batch: int = 256                # entries per step (global batch: split over torchrun processes)
    pb_lr: float = 3e-3                # peak learning rate (weight decay 0: decay fights memorization)
    # graph reasoning
    graph_task: str = "2hop"           # 2hop (output a length-2 path s w t) | path (output a shortest path)
    graph_nodes: int = 8               # |V| vertices
    graph_edges: int = 10              # edges per graph (one token each)
    graph_train: int = 100_000         # training examples (paper: 1e6)
    graph_test: int = 3000             # held-out examples, no graph shared with training (paper: 1e3)
    graph_layers: int = 2              # transformer layers
    graph_heads: int = 2               # attention heads
    graph_mlp_ratio: int = 4           # dense FFN hidden = ratio*d; expert hidden = ratio*d/top_k
    graph_dense_widths: tuple[int, ...] = (8, 16)      # dense widths; must hold graph_moe_width
    graph_moe_width: int = 8           # width d of every graph MoE
    graph_experts: tuple[int, ...] = (4, 8, 16)   # numbers of experts E (each >= top_k)
    graph_steps: int = 2000            # optimizer steps per model
    graph_batch: int = 128             # examples per step (global batch)
    graph_lr: float = 1e-3             # peak learning rate
    graph_wd: float = 0.1              # weight decay on the graph task
    warmup: int = 100                  # linear warmup steps, then cosine decay to 0.1 x peak
    grad_clip: float = 1.0             # gradient-norm clip
    eval_batch: int = 2000             # sequences per evaluation batch
    log_every: int = 100               # steps between logged losses

    POSITIVE = ("top_k", "pb_entries", "pb_digits", "pb_first", "pb_last", "pb_layers", "pb_heads",
                "pb_mlp_ratio", "pb_dense_widths", "pb_moe_width", "pb_experts", "pb_steps", "graph_nodes",
                "graph_edges", "graph_train", "graph_test", "graph_layers", "graph_heads", "graph_mlp_ratio",
                "graph_dense_widths", "graph_moe_width", "graph_experts", "graph_steps", "eval_batch", "log_every")
    MAY_BE_EMPTY = ("pb_experts", "graph_experts")
    GLOBAL_BATCH = ("pb_batch", "graph_batch")

    def __post_init__(self):
        for name in ("top_k", "pb_heads", "graph_heads"):                  # divisors: checked before use
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0 (got {getattr(self, name)})")
        for name, allowed in (("act", ("gelu", "swiglu")), ("graph_task", ("2hop", "path")),
                              ("dispatch", ("auto", "loop", "grouped"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                                 f"not '{getattr(self, name)}'")
        for task in ("pb", "graph"):
            g = lambda f: getattr(self, f"{task}_{f}")
            if any(e < self.top_k for e in g("experts")):
                raise ValueError(f"--{task}-experts {g('experts')}: every E must be >= --top-k {self.top_k}")
            if g("moe_width") not in g("dense_widths"):
                raise ValueError(f"--{task}-moe-width {g('moe_width')} must be one of --{task}-dense-widths "
                                 f"(the dense model of the MoE's width is its E=1 reference)")
            for w in g("dense_widths"):
                if w % g("heads"):
                    raise ValueError(f"--{task}-dense-widths: {w} is not a multiple of --{task}-heads {g('heads')}")
            if (g("mlp_ratio") * g("moe_width")) % self.top_k:
                raise ValueError(f"{task}: mlp_ratio*d = {g('mlp_ratio') * g('moe_width')} must split into "
                                 f"--top-k {self.top_k} experts")
        if self.pb_entries > self.pb_first * self.pb_last:
            raise ValueError(f"--pb-entries {self.pb_entries} > pb_first*pb_last = {self.pb_first * self.pb_last}"
                             " (names must be unique)")
        pairs = self.graph_nodes * (self.graph_nodes - 1) // 2
        if self.graph_nodes < 4 or not 3 <= self.graph_edges <= pairs - 1:
            raise ValueError(f"need --graph-nodes >= 4 and 3 <= --graph-edges <= {pairs - 1}")
        if math.comb(pairs, self.graph_edges) < 10 * (self.graph_train + self.graph_test):
            raise ValueError(f"only {math.comb(pairs, self.graph_edges):,} graphs with {self.graph_nodes} vertices "
                             f"and {self.graph_edges} edges: too few for disjoint train and test sets")


PRESETS = {
    "smoke": dict(pb_entries=50, pb_digits=3, pb_layers=1, pb_dense_widths=(16,), pb_moe_width=16,
                  pb_experts=(8,), pb_steps=150, pb_batch=50, pb_lr=1e-2, graph_nodes=6, graph_edges=7,
                  graph_train=300, graph_test=100, graph_layers=1, graph_dense_widths=(16,), graph_moe_width=16,
                  graph_experts=(), graph_steps=30, graph_batch=32, graph_lr=3e-3, warmup=10, log_every=10),
    "quick": {},
    "full": dict(pb_entries=100_000, pb_digits=8, pb_first=500, pb_last=500, pb_layers=4, pb_heads=4,
                 pb_dense_widths=(64, 128, 320), pb_moe_width=64, pb_experts=(4, 16, 64), pb_steps=5000,
                 pb_batch=1024, pb_lr=2e-3, graph_nodes=32, graph_edges=48, graph_train=1_000_000,
                 graph_test=3000, graph_dense_widths=(16, 32, 64, 128), graph_moe_width=32,
                 graph_experts=(4, 16, 64), graph_steps=3000, graph_batch=512, eval_batch=4096, log_every=200),
}

# -----------------------------------------------------------------------------
# Data: the phone-book (memorization)


def phonebook_vocab(n_first: int, n_last: int) -> common.Tokenizer:
    return common.Tokenizer(["<pad>", "<bos>", ":", "<eos>"] + [str(i) for i in range(10)]
                            + [f"F{i}" for i in range(n_first)] + [f"L{i}" for i in range(n_last)])


def make_phonebook(n: int, digits: int, n_first: int, n_last: int, gen: torch.Generator) -> torch.Tensor:
    """n entries with unique (first, last) names and uniform random numbers: (n, digits + 5) token ids.

    One entry, token by token:  <bos> F17 L42 : 3 0 9 1 5 <eos>   ("F17 L42: 30915")
    """
    tok = phonebook_vocab(n_first, n_last)
    name = torch.randperm(n_first * n_last, generator=gen)[:n]        # unique (first, last) pairs
    number = tok["0"] + torch.randint(0, 10, (n, digits), generator=gen)
    col = lambda i: torch.full((n, 1), i, dtype=torch.long)
    return torch.cat([col(tok["<bos>"]), tok["F0"] + name[:, None] // n_last, tok["L0"] + name[:, None] % n_last,
                      col(tok[":"]), number, col(tok["<eos>"])], 1)


def answer_targets(seqs: torch.Tensor, n_prompt: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets): next-token targets, -100 on the prompt and on padding (only the answer is scored)."""
    x, y = seqs[:, :-1], seqs[:, 1:].clone()
    y[:, :n_prompt - 1] = -100
    return x, y.masked_fill(y == pad, -100)

# -----------------------------------------------------------------------------
# Data: random graphs (reasoning)


def graph_vocab(n: int) -> common.Tokenizer:
    """Specials, one token per vertex, one token per undirected edge {u, v} (u < v)."""
    return common.Tokenizer(["<pad>", "<bos>", "|", ":", "<eos>"] + [f"v{i}" for i in range(n)]
                            + [f"e{u}_{v}" for u in range(n) for v in range(u + 1, n)])


def random_graphs(B: int, n: int, m: int, gen: torch.Generator):
    """B graphs with m distinct undirected edges on n vertices: edge ids (B, m) in random order, adjacency (B, n, n)."""
    iu = torch.triu_indices(n, n, 1)                                     # (2, P) all vertex pairs, row-major
    pick = torch.rand(B, iu.shape[1], generator=gen).argsort(-1)[:, :m]  # m distinct pairs, random order
    A = torch.zeros(B, n, n, dtype=torch.bool)
    b = torch.arange(B)[:, None]
    A[b, iu[0][pick], iu[1][pick]] = True
    A[b, iu[1][pick], iu[0][pick]] = True
    return pick, A


def all_pairs_dist(A: torch.Tensor) -> torch.Tensor:
    """BFS distances by frontier expansion: (B, n, n) bool -> (B, n, n) long, n + 1 = unreachable."""
    B, n, _ = A.shape
    dist = torch.full((B, n, n), n + 1, dtype=torch.long)
    reach = torch.eye(n, dtype=torch.bool).expand(B, n, n).clone()
    dist[reach] = 0
    for d in range(1, n):
        new = (reach.float() @ A.float() > 0) & ~reach
        if not new.any():
            break
        dist[new] = d
        reach |= new
    return dist


def shortest_path_targets(A, dist, s, t, length: int, gen: torch.Generator) -> torch.Tensor:
    """A shortest path s -> t, each hop a random neighbour one step closer to t: (B, length) vertex ids, -1 padded."""
    B, n, _ = A.shape
    b = torch.arange(B)
    path = torch.full((B, length), -1, dtype=torch.long)
    cur, path[:, 0] = s.clone(), s
    d_t = dist[b, :, t]                                                  # (B, n) distance of every vertex to t
    for i in range(1, length):
        going = d_t[b, cur] > 0
        closer = A[b, cur] & (d_t == (d_t[b, cur] - 1)[:, None])         # neighbours one step closer to t
        nxt = (torch.rand(B, n, generator=gen) * closer).argmax(-1)      # a random one of them
        cur = torch.where(going, nxt, cur)
        path[:, i] = torch.where(going, cur, -1)
    return path


def graph_hash(A: torch.Tensor) -> torch.Tensor:
    """A 63-bit hash of each graph's edge set (a Zobrist sum of fixed random keys): (B,) int64."""
    n = A.shape[-1]
    keys = torch.randint(0, 2**62, (n, n), generator=torch.Generator().manual_seed(1234))
    return (A.long() * keys).flatten(1).sum(1)


def make_graph_task(B: int, n: int, m: int, task: str, gen: torch.Generator) -> dict:
    """B examples: token ids plus what checks an answer (adjacency A, s, t, dist(s, t)) and each graph's hash.

    2hop (dist(s, t) = 2):  <bos> e0_3 e2_5 ... e1_4 | v3 v4 : v3 v0 v4 <eos>       (any common neighbour counts)
    path (dist(s, t) >= 2): <bos> e0_3 ... | v3 v7 : v3 v0 v5 v7 <eos> <pad> ...    (any shortest path counts)
    """
    tok = graph_vocab(n)
    V0, E0 = tok["v0"], tok[f"e0_1"]
    L = 3 if task == "2hop" else n                                        # path slots in the answer
    out = {k: [] for k in ("seqs", "A", "s", "t", "dist")}
    need = B
    while need > 0:
        edges, A = random_graphs(need + need // 4 + 8, n, m, gen)
        dist = all_pairs_dist(A)
        cand = (dist == 2) if task == "2hop" else (dist >= 2) & (dist <= n)
        ok = cand.flatten(1).any(1)
        edges, A, dist, cand = edges[ok][:need], A[ok][:need], dist[ok][:need], cand[ok][:need]
        Bc, b = A.shape[0], torch.arange(A.shape[0])
        score = torch.rand(Bc, n * n, generator=gen).masked_fill(~cand.reshape(Bc, -1), -1.0)
        s, t = score.argmax(-1) // n, score.argmax(-1) % n                # a random valid query (s, t)
        col = lambda name: torch.full((Bc, 1), tok[name], dtype=torch.long)
        prompt = torch.cat([col("<bos>"), E0 + edges, col("|"), V0 + s[:, None], V0 + t[:, None], col(":")], 1)
        p = shortest_path_targets(A, dist, s, t, L, gen)
        ans = torch.cat([torch.where(p >= 0, V0 + p, tok["<pad>"]), col("<pad>")], 1)
        ans[b, dist[b, s, t] + 1] = tok["<eos>"]
        out["seqs"].append(torch.cat([prompt, ans], 1))
        for key, val in (("A", A), ("s", s), ("t", t), ("dist", dist[b, s, t])):
            out[key].append(val)
        need -= Bc
    res = {key: torch.cat(v) for key, v in out.items()}
    res["hash"] = graph_hash(res["A"])
    res["prompt_len"] = m + 5
    return res


def graph_split(n_train: int, n_test: int, n: int, m: int, task: str, seed: int) -> tuple[dict, dict]:
    """Training examples and held-out test examples whose graphs never occur in training (one generator).

    Training is built in chunks and keeps only its token ids; test keeps the graphs to check answers.
    """
    gen = torch.Generator().manual_seed(seed)
    chunks = [make_graph_task(min(50_000, n_train - i), n, m, task, gen) for i in range(0, n_train, 50_000)]
    train = {"seqs": torch.cat([c["seqs"] for c in chunks]), "hash": torch.cat([c["hash"] for c in chunks]),
             "prompt_len": m + 5}
    parts, have = [], 0
    for _ in range(10):
        cand = make_graph_task(n_test, n, m, task, gen)
        fresh = ~torch.isin(cand["hash"], train["hash"])                   # drop graphs seen in training
        parts.append({k: v[fresh] for k, v in cand.items() if torch.is_tensor(v)})
        have += int(fresh.sum())
        if have >= n_test:
            break
    else:
        raise ValueError(f"could not draw {n_test} test graphs unseen in training (graph space too small)")
    test = {k: torch.cat([p[k] for p in parts])[:n_test] for k in parts[0]}
    test["prompt_len"] = m + 5
    return train, test


def check_paths(pred: torch.Tensor, A: torch.Tensor, s, t, dist, v0: int, eos: int) -> torch.Tensor:
    """(B,) bool: pred (B, L) tokens spell *a* shortest path s -> t, then <eos> (any tie is accepted)."""
    B, L = pred.shape
    n = A.shape[-1]
    b = torch.arange(B)
    v = pred - v0
    vc = v.clamp(0, n - 1)
    pos = torch.arange(L)[None, :]
    on_path = pos <= dist[:, None]                                       # the dist + 1 vertices of the path
    ok = torch.where(on_path, (v >= 0) & (v < n), True).all(1)
    hop = A[b[:, None], vc[:, :-1], vc[:, 1:]]                           # (B, L-1) is (v_i, v_i+1) an edge?
    ok &= torch.where(pos[:, 1:] <= dist[:, None], hop, True).all(1)
    ok &= (vc[:, 0] == s) & (vc[b, dist.clamp(max=L - 1)] == t)
    return ok & (dist + 1 < L) & (pred[b, (dist + 1).clamp(max=L - 1)] == eos)

# -----------------------------------------------------------------------------
# Model: the MoE layer (router + experts). Copy MLP and MoE together; they need only torch.


class MLP(nn.Module):
    """One feed-forward network (the dense FFN and every expert). gelu: W2 gelu(W1 x); swiglu: W2 (silu(W1 x) * W3 x)."""

    def __init__(self, d: int, hid: int, act: str = "gelu"):
        super().__init__()
        self.act = act
        self.fc = nn.Linear(d, hid, bias=False)
        self.gate = nn.Linear(d, hid, bias=False) if act == "swiglu" else None
        self.proj = nn.Linear(hid, d, bias=False)   # named 'proj': common.GPT gives it the scaled init

    def forward(self, x):                           # (..., d)
        h = self.fc(x)
        return self.proj(F.silu(h) * self.gate(x) if self.act == "swiglu" else F.gelu(h))


class MoE(nn.Module):
    """Token-choice top-k Mixture of Experts (Mixtral-style; dropless unless capacity_factor > 0).

    forward(x (B, T, d)) -> (B, T, d). After each forward: self.aux (Switch load-balancing loss, 1 at
    perfect balance, E at collapse), self.z (router z-loss), self.load (E,) assignments per expert,
    self.dropped (assignments past the capacity). dispatch: loop (per expert, as Mixtral) | grouped (one bmm).
    """

    def __init__(self, d: int, hid: int, n_experts: int, k: int = 2, act: str = "gelu", renorm: bool = True,
                 capacity_factor: float = 0.0, dispatch: str = "loop"):
        super().__init__()
        if not 1 <= k <= n_experts or dispatch not in ("loop", "grouped"):
            raise ValueError(f"need 1 <= k <= E and dispatch loop|grouped (k={k}, E={n_experts}, {dispatch})")
        self.E, self.k, self.renorm, self.capacity_factor, self.dispatch = n_experts, k, renorm, capacity_factor, dispatch
        self.act = act
        self.router = nn.Linear(d, n_experts, bias=False)
        self.experts = nn.ModuleList([MLP(d, hid, act) for _ in range(n_experts)])
        self.aux = self.z = torch.zeros(())
        self.load = torch.zeros(n_experts)
        self.dropped = 0

    def route(self, x):
        """x (N, d) -> logits (N, E), probs (N, E), gate weights (N, k), expert ids (N, k). Router in fp32."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.router.weight.float())    # (N, E)
        probs = logits.softmax(-1)                                      # p_e(x) = softmax(W_r x)_e
        w, idx = probs.topk(self.k, dim=-1)                             # (N, k), (N, k)
        if self.renorm:
            w = w / w.sum(-1, keepdim=True)                             # g = p_topk / sum p_topk
        return logits, probs, w, idx

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                    # (N, d), N = B*T tokens
        N, E, k = x.shape[0], self.E, self.k
        logits, probs, w, idx = self.route(x)
        counts = torch.bincount(idx.reshape(-1), minlength=E)           # (E,) assignments per expert
        # Switch load balancing: aux = E * sum_e f_e * P_e, f_e = share of assignments, P_e = mean router prob
        self.aux = E * (counts.float() / (N * k) * probs.mean(0)).sum()
        self.z = torch.logsumexp(logits, -1).pow(2).mean()              # ST-MoE router z-loss
        self.load = counts.detach()
        # sort the N*k (token, slot) assignments by expert, keeping token order within an expert
        flat = idx.reshape(-1)
        order = flat.argsort(stable=True)
        expert = flat[order]                                            # (N*k,) expert of each assignment
        tok = torch.arange(N, device=x.device).repeat_interleave(k)[order]    # its token
        gate = w.reshape(-1)[order]                                     # its gate weight
        rank = torch.arange(N * k, device=x.device) - (torch.cumsum(counts, 0) - counts)[expert]  # place in queue
        self.dropped = 0
        if self.capacity_factor > 0:                                    # keep the first C per expert (Switch)
            cap = math.ceil(self.capacity_factor * k * N / E)
            keep = rank < cap
            expert, tok, gate, rank = expert[keep], tok[keep], gate[keep], rank[keep]
            self.dropped = int((~keep).sum())
            counts = counts.clamp(max=cap)
        out = torch.zeros_like(x)                                       # (N, d)
        if self.dispatch == "grouped":                                  # every expert in one batched matmul
            buf = x.new_zeros(E, int(counts.max()), x.shape[1])         # (E, C, d), C = busiest expert's load
            buf[expert, rank] = x[tok]
            y = self._grouped(buf)[expert, rank]                        # (kept, d)
            out.index_add_(0, tok, (y * gate[:, None]).to(out.dtype))
        else:                                                           # Mixtral: loop over the experts
            for e, (tok_e, gate_e) in enumerate(zip(tok.split(counts.tolist()), gate.split(counts.tolist()))):
                y = self.experts[e](x[tok_e]) * gate_e[:, None]         # y_t += g_te * FFN_e(x_t); an idle
                out.index_add_(0, tok_e, y.to(out.dtype))               # expert still runs (0 rows) for DDP
        return out.reshape(shape)

    def _grouped(self, buf):
        """All experts at once on a padded (E, C, d) buffer, their weights stacked: the same math as MLP."""
        h = buf @ torch.stack([e.fc.weight for e in self.experts]).transpose(1, 2)           # (E, C, hid)
        if self.act == "swiglu":
            h = F.silu(h) * (buf @ torch.stack([e.gate.weight for e in self.experts]).transpose(1, 2))
        else:
            h = F.gelu(h)
        return h @ torch.stack([e.proj.weight for e in self.experts]).transpose(1, 2)        # (E, C, d)


def moe_layers(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, MoE)]


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(total, active): active = total - sum over MoE layers of (E - k) * params(expert). The router is active."""
    total = common.count_params(model)
    idle = sum((m.E - m.k) * common.count_params(m.experts[0]) for m in moe_layers(model))
    return total, total - idle


def build_model(vocab: int, block: int, d: int, layers: int, heads: int, ratio: int, cfg: Config,
                n_experts: int = 0) -> common.GPT:
    """common.GPT whose FFNs are MLP(d, ratio*d) (n_experts = 0) or MoE(d, ratio*d/k, E, k) in every layer."""
    gcfg = common.GPTConfig(vocab_size=vocab, block_size=block, n_layer=layers, n_head=heads, n_embd=d,
                            pos="learned", mlp_ratio=ratio, tie_weights=False)
    if not n_experts:
        return common.GPT(gcfg, mlp_factory=lambda c, i: MLP(d, ratio * d, cfg.act))
    grouped = cfg.dispatch == "grouped" or (cfg.dispatch == "auto" and ("cuda" in cfg.device or n_experts >= 16))
    return common.GPT(gcfg, mlp_factory=lambda c, i: MoE(d, ratio * d // cfg.top_k, n_experts, cfg.top_k, cfg.act,
                                                         cfg.renorm, cfg.capacity_factor,
                                                         "grouped" if grouped else "loop"))

# -----------------------------------------------------------------------------
# Training loop


def train(model, cfg: Config, get_batch, steps: int, lr: float, wd: float, desc: str):
    """AdamW, warmup + cosine, grad clip. Loss = answer-token cross-entropy (token mean over the global batch)
    + aux_coef * the MoE layers' load-balancing losses (+ z_coef * router z-losses).
    Returns the history and each layer's share of assignments per expert over the last 20% of steps."""
    device = torch.device(cfg.device)
    moes = moe_layers(model)
    opt = common.configure_adamw(model, lr, wd)
    fwd = common.wrap_ddp(model, device)
    fwd = torch.compile(fwd) if cfg.compile else fwd
    hist, t0 = {"step": [], "loss": [], "aux": []}, time.time()
    load = torch.zeros(len(moes), moes[0].E) if moes else None
    bar = common.progress(range(steps), desc)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = common.lr_at(step, steps, lr, min(cfg.warmup, steps // 2))
        x, y = common.shard(*get_batch(step))                          # this rank's rows of the global batch
        with common.autocast(device):
            task = common.token_mean(*common.cross_entropy_sum(fwd(x)[0], y))
            aux = sum(m.aux for m in moes) if moes else torch.zeros((), device=device)   # per layer, summed
            z = sum(m.z for m in moes) if moes else torch.zeros((), device=device)
            loss = task + cfg.aux_coef * aux + cfg.z_coef * z
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if moes and step >= 0.8 * steps:
            load += torch.stack([m.load.float().cpu() for m in moes])
        if step % cfg.log_every == 0 or step == steps - 1:
            hist["step"].append(step)
            hist["loss"].append(common.global_mean(task))
            hist["aux"].append(common.global_mean(aux) / max(1, len(moes)))
            bar.set_postfix_str(common.step_log(step + 1, steps, t0, loss=hist["loss"][-1], aux=hist["aux"][-1]))
    return hist, (load / load.sum(1, keepdim=True).clamp(min=1) if moes else None)

# -----------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def eval_phonebook(model, seqs: torch.Tensor, device, batch: int, pad: int) -> dict:
    """Closed-book recall: greedy-decode the digits and <eos> after '<bos> F L :'; exact match on all of them."""
    model.eval()
    hit, loss_sum = 0, 0.0
    for i in range(0, len(seqs), batch):
        chunk = seqs[i:i + batch].to(device)
        with common.autocast(device):
            out = model.generate(chunk[:, :4], chunk.shape[1] - 4, greedy=True)
            loss_sum += float(model(*answer_targets(chunk, 4, pad))[1]) * len(chunk)
        hit += int((out[:, 4:] == chunk[:, 4:]).all(1).sum())
    model.train()
    return {"acc": hit / len(seqs), "loss": loss_sum / len(seqs)}


@torch.no_grad()
def eval_graph(model, data: dict, device, batch: int) -> dict:
    """Held-out accuracy: the greedy answer is a valid path of the right length from s to t, then <eos>."""
    model.eval()
    P, n = data["prompt_len"], data["A"].shape[-1]
    tok = graph_vocab(n)
    hit, loss_sum, N = 0, 0.0, len(data["seqs"])
    for i in range(0, N, batch):
        sl = slice(i, i + batch)
        seqs = data["seqs"][sl].to(device)
        with common.autocast(device):
            loss_sum += float(model(*answer_targets(seqs, P, tok["<pad>"]))[1]) * len(seqs)
            out = model.generate(seqs[:, :P], seqs.shape[1] - P, greedy=True).cpu()
        hit += int(check_paths(out[:, P:], data["A"][sl], data["s"][sl], data["t"][sl], data["dist"][sl],
                               tok["v0"], tok["<eos>"]).sum())
    model.train()
    return {"acc": hit / N, "loss": loss_sum / N}

# -----------------------------------------------------------------------------
# Experiments: one model family per task (dense widths + MoEs at one width), then the gap each MoE closes


def model_grid(dense_widths, moe_width: int, experts, k: int) -> list:
    """[(name, width, E)], E = 0 for dense."""
    return [(f"dense_d{w}", w, 0) for w in dense_widths] + [(f"moe_e{e}_k{k}", moe_width, e) for e in experts]


def gap_closed(rows: dict, task: str, moe_width: int) -> dict:
    """Where each MoE sits between the dense model of its width (0) and the dense model whose total size is
    closest to the largest MoE's (1): (acc_moe - acc_lo) / (acc_hi - acc_lo)."""
    moes = {n: r for n, r in rows.items() if r["E"] > 1}
    if not moes:
        return {}
    lo = rows[f"dense_d{moe_width}"]
    big = max(moes.values(), key=lambda r: r["total"])["total"]
    hi = min((r for r in rows.values() if r["E"] == 1), key=lambda r: abs(r["total"] - big))
    if hi is lo:
        return {}
    return {common.mkey(f"{task}_gap_closed", n): (r["acc"] - lo["acc"]) / (hi["acc"] - lo["acc"])
            for n, r in moes.items()}


def train_family(cfg: Config, task: str, data: torch.Tensor, n_prompt: int, vocab: int, evaluate) -> dict:
    """Train and evaluate every model of one task (same seed, same batches); rows of numbers per model."""
    p = lambda f: getattr(cfg, f"{task}_{f}")
    pad, rows = 0, {}
    for name, d, E in model_grid(p("dense_widths"), p("moe_width"), p("experts"), cfg.top_k):
        torch.manual_seed(cfg.seed)
        model = build_model(vocab, data.shape[1], d, p("layers"), p("heads"), p("mlp_ratio"), cfg, E).to(cfg.device)
        gen = torch.Generator().manual_seed(cfg.seed + 7)                 # the same batches for every model

        def get_batch(step):
            rows_ = data[torch.randint(0, len(data), (p("batch"),), generator=gen)]
            x, y = answer_targets(rows_, n_prompt, pad)
            return x.to(cfg.device), y.to(cfg.device)
        t0 = time.time()
        hist, load = train(model, cfg, get_batch, p("steps"), p("lr"), cfg.graph_wd if task == "graph" else 0.0,
                           f"{task} {name}")
        res = evaluate(model) if common.is_main() else {"acc": float("nan"), "loss": float("nan")}
        total, active = param_counts(model)
        rows[name] = dict(d=d, E=E or 1, total=total, active=active, acc=res["acc"], loss=res["loss"],
                          load=load, seconds=time.time() - t0, curve=hist["loss"])
        common.print0(f"{task} {name:12s} total {total:>9,} active {active:>9,} | answer loss {res['loss']:.3f} "
                      f"| acc {res['acc']:.3f} | {time.time() - t0:.0f} s")
    return rows


def exp_phonebook(cfg: Config) -> dict:
    """Memorization: closed-book recall of every training entry, dense widths vs MoEs at one width."""
    tok = phonebook_vocab(cfg.pb_first, cfg.pb_last)
    data = make_phonebook(cfg.pb_entries, cfg.pb_digits, cfg.pb_first, cfg.pb_last,
                          torch.Generator().manual_seed(cfg.seed))
    return train_family(cfg, "pb", data, 4, len(tok),
                        lambda model: eval_phonebook(model, data, cfg.device, cfg.eval_batch, tok["<pad>"]))


def exp_graph(cfg: Config) -> dict:
    """Reasoning: accuracy on held-out graphs, dense widths vs MoEs at the smallest width."""
    train_set, test = graph_split(cfg.graph_train, cfg.graph_test, cfg.graph_nodes, cfg.graph_edges,
                                  cfg.graph_task, cfg.seed + 1)
    return train_family(cfg, "graph", train_set["seqs"], train_set["prompt_len"], len(graph_vocab(cfg.graph_nodes)),
                        lambda model: eval_graph(model, test, cfg.device, cfg.eval_batch))

# -----------------------------------------------------------------------------
# Run


PAPER = {"dense": "rises with size", "moe_pb": "rises with E, toward dense of equal total",
         "moe_graph": "flat in E, = dense of equal width"}


def run_seed(cfg: Config):
    common.set_seed(cfg.seed)
    m, rows = {}, {}
    stages = common.Stages({"phone-book": 1.0, "graph": 1.0})
    for task, exp in (("pb", exp_phonebook), ("graph", exp_graph)):
        with stages("phone-book" if task == "pb" else "graph"):
            rows[task] = exp(cfg)
        fam = "phonebook" if task == "pb" else "graph"
        for n, r in rows[task].items():
            m[common.mkey(f"{fam}_acc", n)], m[common.mkey(f"{fam}_loss", n)] = r["acc"], r["loss"]
            m[common.mkey(f"{fam}_params", n, "total")] = r["total"]
            m[common.mkey(f"{fam}_params", n, "active")] = r["active"]
            if r["load"] is not None:
                m[common.mkey(f"{fam}_load", n, "max_over_mean")] = float(r["load"].max()) * r["E"]
        m.update(gap_closed(rows[task], fam, getattr(cfg, f"{task}_moe_width")))
        if cfg.seeds == 1:
            common.save_results(NAME, cfg, m, partial=True)              # an interrupt keeps the finished task
    return m, rows


def report(runs: common.SeedRuns, rows: dict, fam: str, title: str):
    table = []
    for n, r in rows.items():
        paper = PAPER["dense"] if r["E"] == 1 else PAPER[f"moe_{'pb' if fam == 'phonebook' else 'graph'}"]
        table.append([n, r["d"], r["E"], f"{r['total']:,}", f"{r['active']:,}", runs.cell(f"{fam}_acc/{n}"),
                      runs.cell(f"{fam}_gap_closed/{n}", 2), paper])
    common.print_table(table, ["model", "d", "E", "total", "active", "ours: acc", "gap closed", "paper"], title)
    for n, r in rows.items():
        if r["load"] is not None:
            share = " ".join(f"{100 * v:.0f}" for v in r["load"].mean(0).tolist())
            common.print0(f"  {n}: % of assignments per expert (last 20% of steps): {share}")


def run(cfg: Config) -> common.SeedRuns:
    t0 = time.time()
    runs = common.over_seeds(cfg, run_seed, NAME)
    rows = runs.extras[-1]
    seeds = f"{len(runs.seeds)} seed{'s' if len(runs.seeds) > 1 else ''}"
    report(runs, rows["pb"], "phonebook", f"Phone-book (memorization): recall of all {cfg.pb_entries} entries "
           f"({cfg.pb_digits} digits), {seeds}; gap closed: 0 = dense of the MoE's width, 1 = the dense model "
           "closest in total size to the largest MoE")
    se = 0.5 / math.sqrt(cfg.graph_test)
    report(runs, rows["graph"], "graph", f"Graph reasoning ({cfg.graph_task}, |V|={cfg.graph_nodes}, "
           f"{cfg.graph_edges} edges): accuracy on {cfg.graph_test} held-out graphs (standard error <= {se:.3f} "
           f"per seed), {seeds}")
    big = lambda rs: max((n for n, r in rs.items() if r["E"] > 1), key=lambda n: rs[n]["E"], default=None)
    for fam, task in (("phonebook", "pb"), ("graph", "graph")):
        if big(rows[task]):
            common.print0(f"{fam}: {big(rows[task])} closes {runs.cell(common.mkey(f'{fam}_gap_closed', big(rows[task])), 2)}"
                          " of the gap from the dense model of its width to the dense model of its total size")
    wall = time.time() - t0
    info = {f"{task}_models": {n: {"d": r["d"], "E": r["E"]} for n, r in rows[task].items()} for task in rows}
    history = {task: {n: {"loss": r["curve"], "load": r["load"]} for n, r in rows[task].items()} for task in rows}
    timings = {f"{task}/{n}": r["seconds"] for task in rows for n, r in rows[task].items()}
    common.save_results(NAME, cfg, runs, history=history, info=info, timings=timings, wall_time_s=wall)
    for fam, task in (("phonebook", "pb"), ("graph", "graph")):
        curves = {}
        for kind in ("dense", "moe"):
            pts = sorted((r["total"], runs.mean.get(f"{fam}_acc/{n}", float("nan")), runs.std.get(f"{fam}_acc/{n}", 0.0))
                         for n, r in rows[task].items() if n.startswith(kind) or (kind == "moe" and r["E"] == 1
                                                                            and r["d"] == getattr(cfg, f"{task}_moe_width")))
            if len(pts) > 1:
                curves[kind if kind == "dense" else f"MoE d={getattr(cfg, f'{task}_moe_width')}"] = tuple(map(list, zip(*pts)))
        if curves:
            common.plot(f"moe_{fam}", curves, out_dir=cfg.out, xlabel="total parameters", ylabel="accuracy", logx=True,
                        title=f"{fam}: accuracy vs total parameters (MoE line starts at E=1)")
    common.print0(f"wall time {wall:.0f} s")
    return runs


def main():
    cfg = common.parse_args(Config, PRESETS)
    with common.session(cfg):
        run(cfg)


if __name__ == "__main__":
    main()
