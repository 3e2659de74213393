"""
common.py -- the pieces every nanopapers script shares.

    CLI        BaseConfig, parse_args(Config, PRESETS), die
    runtime    get_device, autocast, set_seed, set_threads, setup_ddp / cleanup_ddp, print0
    text       Tokenizer (char- or word-level, with specials)
    model      GPTConfig, GPT (pre-norm; positional scheme by name: none / learned / alibi /
               hard_alibi / rope; pluggable MLP; optional KV cache and per-layer hidden states)
    training   configure_adamw, lr_at, train (AdamW, warmup + cosine/linear, clip, bf16 on CUDA,
               optional torch.compile, DDP under torchrun, eval callback, checkpoints)
    results    print_table, save_results, plot, over_seeds, count_params

A paper script imports this module and nothing else of ours. Everything here is plain PyTorch.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import random
import sys
import time
import typing
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

PRESET_NAMES = ("smoke", "quick", "full")

# -----------------------------------------------------------------------------
# CLI: argparse built from a dataclass


def die(msg: str, code: int = 2) -> typing.NoReturn:
    """Print one clear line and exit; bad input never ends in a traceback."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


@dataclass
class BaseConfig:
    """Fields every script's Config inherits (each becomes a --flag)."""
    preset: str = ""        # smoke | quick | full; empty: full on a CUDA device, quick otherwise
    device: str = "auto"    # auto | cpu | cuda | cuda:N | mps
    seed: int = 0           # base random seed
    seeds: int = 1          # run the experiment for seeds seed..seed+N-1 and report mean +- std
    out: str = "results"    # folder for <script>.json / .png
    compile: bool = False   # torch.compile the models
    threads: int = 0        # CPU threads for torch; 0 = 1 (tiny models run fastest single-threaded)


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse's default prints the whole usage block first
        die(f"{message} (see {self.prog} -h)")


def _field_parser(tp):
    """Turn a field's annotation into an argparse `type` (tuples/lists take comma-separated values)."""
    origin = typing.get_origin(tp)
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis] or [str]
        elem = args[0]
        def parse(s, elem=elem, origin=origin):
            vals = [elem(v) for v in s.split(",") if v.strip() != ""]
            return tuple(vals) if origin is tuple else vals
        return parse
    if tp in (int, float, str):
        return tp
    return str


def parse_args(Config, presets: dict, argv=None):
    """Build a parser from `Config` (a dataclass inheriting BaseConfig) and return the resolved config.

    Precedence: dataclass defaults < preset overrides < explicit command-line flags. The device is
    resolved here so that a CUDA request on a machine without CUDA fails at once, in one line.
    """
    prog = os.path.basename(sys.argv[0]) if argv is None else "script"
    doc = (sys.modules[Config.__module__].__doc__ or "").strip().splitlines()
    p = _OneLineParser(prog=prog, description=doc[0] if doc else None,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        tp = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        names = [flag] if flag == "--" + f.name else [flag, "--" + f.name]
        if f.name == "preset":
            p.add_argument(*names, default=None, metavar="{" + ",".join(presets) + "}",
                           help="preset of overrides (default: full on CUDA, quick otherwise)")
        elif tp is bool:
            p.add_argument(*names, action=argparse.BooleanOptionalAction, default=None,
                           help=f"(default: {default})")
        else:
            p.add_argument(*names, type=_field_parser(tp), default=None, metavar=tp.__name__.upper()
                           if isinstance(tp, type) else "A,B,..", help=f"(default: {default})")
    p.formatter_class = argparse.HelpFormatter  # defaults are already in each help string
    ns = vars(p.parse_args(argv))
    explicit = {k: v for k, v in ns.items() if v is not None}

    device = get_device(explicit.get("device", "auto"))
    preset = explicit.get("preset") or ("full" if device.type == "cuda" else "quick")
    if preset not in presets:
        die(f"unknown preset '{preset}' (choose one of: {', '.join(presets)})")
    kwargs = {**presets[preset], **explicit, "preset": preset, "device": str(device)}
    try:
        cfg = Config(**kwargs)
    except (ValueError, AssertionError) as e:
        die(f"bad configuration: {e}")
    print0(f"config ({prog}): " + ", ".join(f"{k}={v}" for k, v in asdict(cfg).items()))
    return cfg


def config_from_preset(Config, presets: dict, preset: str = "smoke", **overrides):
    """The resolved config of a preset without touching sys.argv (tests and notebooks use this)."""
    if preset not in presets:
        die(f"unknown preset '{preset}' (choose one of: {', '.join(presets)})")
    return Config(**{**presets[preset], "preset": preset, **overrides})

# -----------------------------------------------------------------------------
# Runtime: device, seeds, threads, distributed


def get_device(name: str = "auto") -> torch.device:
    """auto -> cuda > mps > cpu. An unavailable device is a one-line error, not a traceback."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            die(f"--device {name} was asked for, but this machine has no CUDA device "
                f"(torch {torch.__version__}); use --device cpu")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            die(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
        return dev
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            die("--device mps was asked for, but MPS is not available here; use --device cpu")
        return torch.device("mps")
    die(f"unknown device '{name}' (choose auto, cpu, cuda, cuda:N or mps)")


def autocast(device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; full precision elsewhere (CPU bf16 is slow for tiny models)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def set_seed(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a CPU generator for explicit sampling."""
    random.seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % 2**32)
    except ImportError:
        pass
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def set_threads(cfg_threads: int = 0, device="cpu"):
    """Tiny models on CPU run fastest single-threaded (thread spin costs more than the math)."""
    if torch.device(device).type == "cpu":
        torch.set_num_threads(cfg_threads if cfg_threads > 0 else 1)


def ddp_info():
    """(rank, local_rank, world_size); (0, 0, 1) for a plain single process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"])
    return 0, 0, 1


def is_main() -> bool:
    return ddp_info()[0] == 0


def print0(*args, **kwargs):
    if is_main():
        print(*args, **kwargs, flush=True)


def setup_ddp(device: torch.device) -> torch.device:
    """Join the torchrun process group (nccl on CUDA, gloo on CPU). A single process does nothing."""
    import torch.distributed as dist
    rank, local_rank, world = ddp_info()
    if world == 1 or (dist.is_available() and dist.is_initialized()):
        return device
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def cleanup_ddp():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

# -----------------------------------------------------------------------------
# Tokenizer


class Tokenizer:
    """A fixed vocabulary of string tokens <-> integer ids.

    Char-level when every token is one character (encode takes a str and splits it into chars);
    word-level otherwise (encode takes a list of tokens, or a str split on whitespace).
        tok = Tokenizer(list("abc") + ["$", "|", ".", "*"]); tok.encode("$ab|ab.") -> [3, 0, 1, 4, 0, 1, 5]
    """

    def __init__(self, tokens):
        tokens = list(tokens)
        if len(set(tokens)) != len(tokens):
            raise ValueError("duplicate tokens in vocabulary")
        self.itos = tokens
        self.stoi = {t: i for i, t in enumerate(tokens)}
        self.char_level = all(len(t) == 1 for t in tokens)

    @classmethod
    def from_text(cls, text: str, char_level: bool = False, specials=()):
        units = sorted(set(text)) if char_level else sorted(set(text.split()))
        return cls(list(specials) + [u for u in units if u not in specials])

    def __len__(self):
        return len(self.itos)

    def __getitem__(self, token: str) -> int:
        return self.stoi[token]

    def encode(self, seq) -> list:
        if isinstance(seq, str):
            seq = list(seq) if self.char_level else seq.split()
        try:
            return [self.stoi[t] for t in seq]
        except KeyError as e:
            raise ValueError(f"token {e.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids) -> str:
        if torch.is_tensor(ids):
            ids = ids.tolist()
        return ("" if self.char_level else " ").join(self.itos[i] for i in ids)

    def encode_batch(self, seqs, pad: str, length: int | None = None) -> torch.Tensor:
        """Right-pad a list of sequences into a (B, T) LongTensor."""
        rows = [self.encode(s) for s in seqs]
        T = length or max(len(r) for r in rows)
        out = torch.full((len(rows), T), self.stoi[pad], dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, :len(r)] = torch.tensor(r[:T], dtype=torch.long)
        return out

# -----------------------------------------------------------------------------
# The baseline GPT


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int = 256        # longest sequence (only the learned positional table depends on it)
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    pos: str = "learned"         # none (= nope, NoPE) | learned | alibi | hard_alibi | rope
    hard_windows: tuple = ()     # hard_alibi: window (in tokens, self included) per head, 0 = NoPE head;
                                 # empty -> first n_head//2 heads get windows 1..n_head//2
    mlp_ratio: int = 4
    parallel_residual: bool = False  # GPT-NeoX style x + attn(ln1 x) + mlp(ln2 x)
    bias: bool = False
    dropout: float = 0.0
    tie_weights: bool = True
    rope_base: float = 10000.0
    init: str = "gpt2"           # gpt2: N(0, 0.02) weights (nanoGPT); fan_in: PyTorch's default
                                 # U(+-1/sqrt(fan_in)) for Linear layers -- larger, and far faster to
                                 # train for narrow models (copying at d=128: see copying.py)

    def __post_init__(self):
        self.pos = "none" if self.pos == "nope" else self.pos  # NoPE is spelled either way
        if self.init not in ("gpt2", "fan_in"):
            raise ValueError(f"unknown init '{self.init}'")
        if self.pos not in ("none", "learned", "alibi", "hard_alibi", "rope"):
            raise ValueError(f"unknown positional scheme '{self.pos}'")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.pos == "hard_alibi":
            if not self.hard_windows:
                self.hard_windows = tuple(range(1, self.n_head // 2 + 1)) + (0,) * (self.n_head - self.n_head // 2)
            if len(self.hard_windows) != self.n_head:
                raise ValueError("hard_windows needs one entry per head")
        self.hard_windows = tuple(self.hard_windows)


def alibi_slopes(n_head: int) -> torch.Tensor:
    """m_h = 2^(-8(h+1)/H) (Press et al.; exact for H a power of two)."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / n_head) for h in range(n_head)])


def attention_bias(cfg: GPTConfig, q_pos: torch.Tensor, k_pos: torch.Tensor, device) -> torch.Tensor:
    """Additive (H, Tq, Tk) bias: causal mask plus the positional scheme's bias.

    q_pos / k_pos are absolute indices of queries and keys (they differ with a KV cache).
    ALiBi: -m_h (i - j). Hard-ALiBi: head h sees only keys with i - j < window_h (0 = no window).
    """
    dist = (q_pos[:, None] - k_pos[None, :]).to(device)                # (Tq, Tk)
    allowed = (dist >= 0).expand(cfg.n_head, -1, -1)                    # (H, Tq, Tk)
    bias = torch.zeros(allowed.shape, device=device)
    if cfg.pos == "alibi":
        bias = bias - alibi_slopes(cfg.n_head).to(device)[:, None, None] * dist.clamp(min=0)
    if cfg.pos == "hard_alibi":
        w = torch.tensor(cfg.hard_windows, device=device)[:, None, None]
        allowed = allowed & ((w == 0) | (dist < w))
    return bias.masked_fill(~allowed, float("-inf"))


def rope_rotate(x: torch.Tensor, pos: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary embedding on the full head dim. x: (B, H, T, hd), pos: (T,)."""
    hd = x.shape[-1]
    inv = base ** (-torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd)
    ang = pos.to(x.device, torch.float32)[:, None] * inv[None, :]      # (T, hd/2)
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x, bias, q_pos, cache=None):
        B, T, C = x.shape
        H = self.cfg.n_head
        q, k, v = self.qkv(x).view(B, T, 3, H, C // H).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, hd)
        if self.cfg.pos == "rope":
            q, k = rope_rotate(q, q_pos, self.cfg.rope_base), rope_rotate(k, q_pos, self.cfg.rope_base)
        if cache is not None:  # append this step's keys/values to the layer's cache
            if cache.get("k") is not None:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        drop = self.dropout if self.training else 0.0
        if bias is None:  # plain causal attention: let SDPA pick its fused kernel
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=drop)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, cfg.mlp_ratio * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, mlp: nn.Module):
        super().__init__()
        self.parallel = cfg.parallel_residual
        self.ln1, self.ln2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias), nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn, self.mlp = CausalSelfAttention(cfg), mlp

    def forward(self, x, bias, q_pos, cache=None):
        if self.parallel:
            return x + self.attn(self.ln1(x), bias, q_pos, cache) + self.mlp(self.ln2(x))
        x = x + self.attn(self.ln1(x), bias, q_pos, cache)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """nanoGPT-style decoder.

    mlp_factory(cfg, layer_index) -> nn.Module replaces the dense MLP of a block (moe.py uses it).
    forward(idx, targets=None, loss_mask=None, *, attn_mask=None, pos=None, cache=None, return_hidden=False)
      idx (B, T) ids; targets (B, T) ids with -100 = ignored; loss_mask (B, T) 0/1 weights.
      attn_mask: optional bool (T, T) or (B, T, T), True = may attend, combined with the causal mask.
      pos: optional (T,) or (B, T) position ids for the learned table (default: cache offset + arange(T));
           rope takes (T,) only. The causal mask always follows the sequence order.
      cache: a list from new_cache(); the forward appends keys/values to it (incremental decoding).
      returns (logits, loss) or (logits, loss, hidden) where hidden = [embedding out, block 1 out, ...].
    """

    def __init__(self, cfg: GPTConfig, mlp_factory=None):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        make_mlp = mlp_factory or (lambda c, i: MLP(c))
        self.blocks = nn.ModuleList([Block(cfg, make_mlp(cfg, i)) for i in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.wte.weight
        for m in self.modules():
            if isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.Linear) and cfg.init == "gpt2":
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if cfg.init == "gpt2":
            for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
                if name.endswith("proj.weight"):
                    nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))
        self._bias_cache = {}

    def new_cache(self):
        return [dict() for _ in self.blocks]

    def _bias(self, offset, T, device, attn_mask):
        plain = self.cfg.pos in ("none", "learned", "rope")
        if plain and attn_mask is None and offset == 0:
            return None  # SDPA's own causal kernel
        key = (offset, T, str(device))
        if key not in self._bias_cache:
            if len(self._bias_cache) > 16:
                self._bias_cache.clear()
            q_pos = torch.arange(offset, offset + T)
            self._bias_cache[key] = attention_bias(self.cfg, q_pos, torch.arange(offset + T), device)
        bias = self._bias_cache[key]
        if attn_mask is not None:  # extra user mask (True = allowed), (T, T) or (B, T, T)
            extra = attn_mask[:, None] if attn_mask.dim() == 3 else attn_mask
            bias = bias.masked_fill(~extra.to(device), float("-inf"))
        return bias

    def forward(self, idx, targets=None, loss_mask=None, *, attn_mask=None, pos=None, cache=None,
                return_hidden=False):
        B, T = idx.shape
        offset = cache[0]["k"].shape[2] if cache is not None and cache[0].get("k") is not None else 0
        q_pos = pos if pos is not None else torch.arange(offset, offset + T, device=idx.device)
        x = self.wte(idx)
        if self.wpe is not None:
            if int(q_pos.max()) >= self.cfg.block_size:
                raise ValueError(f"position {int(q_pos.max())} >= block_size {self.cfg.block_size}")
            x = x + self.wpe(q_pos)
        x = self.drop(x)
        bias = self._bias(offset, T, idx.device, attn_mask)
        hidden = [x]
        for i, block in enumerate(self.blocks):
            x = block(x, bias, q_pos, None if cache is None else cache[i])
            hidden.append(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None if targets is None else masked_cross_entropy(logits, targets, loss_mask)
        return (logits, loss, hidden) if return_hidden else (logits, loss)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, greedy=False, top_k=None, eos_id=None,
                 generator=None, use_cache=True):
        """Batched sampling. greedy=True (or temperature 0) takes the argmax. Returns (B, T + new)."""
        cache = self.new_cache() if use_cache else None
        done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        step_in = idx
        for _ in range(max_new_tokens):
            if cache is None:
                step_in = idx if self.wpe is None else idx[:, -self.cfg.block_size:]
            logits = self(step_in, cache=cache)[0][:, -1, :].float()
            nxt = sample_logits(logits, temperature, greedy, top_k, generator)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            idx = torch.cat([idx, nxt[:, None]], 1)
            step_in = nxt[:, None]
            if eos_id is not None and bool(done.all()):
                break
        return idx


def sample_logits(logits, temperature=1.0, greedy=False, top_k=None, generator=None):
    """(B, V) logits -> (B,) ids."""
    if greedy or temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, -1)
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def masked_cross_entropy(logits, targets, loss_mask=None):
    """Mean next-token CE over positions with target != -100 (and loss_mask > 0 when given)."""
    logits = logits.float().reshape(-1, logits.shape[-1])
    targets = targets.reshape(-1)
    if loss_mask is None:
        return F.cross_entropy(logits, targets, ignore_index=-100)
    w = loss_mask.reshape(-1).float() * (targets != -100)
    ce = F.cross_entropy(logits, targets.clamp(min=0), reduction="none")
    return (ce * w).sum() / w.sum().clamp(min=1.0)


def count_params(model: nn.Module) -> int:
    seen, n = set(), 0
    for p in model.parameters():  # tied weights count once
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n

# -----------------------------------------------------------------------------
# Training


def configure_adamw(model: nn.Module, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95),
                    no_decay=("A_log", "D"), fused=None):
    """AdamW with decay on >=2-D weights only (not norms, biases, or names ending in `no_decay`).

    fused: None = the fused kernel on CUDA only; True = also on CPU (worth it when one huge matrix makes
    the unfused step cost as much as the forward pass), falling back where torch has no such kernel.
    """
    decay, other, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        skip = p.dim() < 2 or any(name.endswith(s) for s in no_decay)
        (other if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]
    if fused is None:
        fused = next(model.parameters()).is_cuda
    if fused:
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
        except (RuntimeError, TypeError):  # no fused kernel for this device / torch version
            pass
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def lr_at(step: int, steps: int, lr: float, warmup: int, schedule: str = "cosine", min_frac: float = 0.1):
    """Linear warmup to lr, then cosine (to min_frac * lr) or linear (to 0) decay; constant if 'constant'."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    t = min(1.0, (step - warmup) / max(1, steps - warmup))
    if schedule == "linear":
        return lr * (1.0 - t)
    return lr * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def _default_loss(model, batch):
    return model(*batch)[1]


def train(model, get_batch, *, steps, lr, device, warmup=100, schedule="cosine", min_lr_frac=0.1,
          weight_decay=0.1, betas=(0.9, 0.95), grad_clip=1.0, loss_fn=None, optimizer=None,
          eval_fn=None, eval_every=0, compile=False, desc="train", log_every=50, cfg=None,
          save_path=None, resume=False, quiet=False):
    """The standard loop. Returns a history dict {step, loss, lr, eval: [(step, dict)], time_s}.

    get_batch(step) -> tuple of tensors for the *global* batch (each rank takes its rows, so the
    global batch and the result do not depend on the number of processes).
    loss_fn(model, batch) -> scalar; default: model(*batch)[1].
    eval_fn(model, step) -> dict, called on rank 0 every eval_every steps and at the end.
    Under torchrun the model is wrapped in DistributedDataParallel.
    """
    from tqdm.auto import tqdm
    device = torch.device(device)
    rank, _, world = ddp_info()
    raw = model
    opt = optimizer or configure_adamw(model, lr, weight_decay, betas)
    start = 0
    if resume and save_path and os.path.exists(save_path):
        ck = torch.load(save_path, map_location=device, weights_only=True)
        raw.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start = int(ck["step"])
        print0(f"resumed from {save_path} at step {start}")
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    fwd = torch.compile(model) if compile else model
    loss_fn = loss_fn or _default_loss
    hist = {"step": [], "loss": [], "lr": [], "eval": []}
    t0 = time.time()
    bar = tqdm(range(start, steps), desc=desc, disable=True if (quiet or rank != 0) else None, mininterval=2, dynamic_ncols=True)
    for step in bar:
        cur_lr = lr_at(step, steps, lr, warmup, schedule, min_lr_frac)
        for g in opt.param_groups:
            g["lr"] = cur_lr
        batch = get_batch(step)
        if world > 1:
            batch = tuple(b[rank::world] for b in batch)
        model.train()
        with autocast(device):
            loss = loss_fn(fwd, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            lv = loss.item()
            hist["step"].append(step)
            hist["loss"].append(lv)
            hist["lr"].append(cur_lr)
            ms = 1000 * (time.time() - t0) / (step - start + 1)
            bar.set_postfix_str(f"loss {lv:.4f} | {ms:.1f} ms/step")
        last = step == steps - 1
        if eval_fn is not None and ((eval_every and (step + 1) % eval_every == 0) or last):
            if rank == 0:
                raw.eval()
                res = eval_fn(raw, step + 1)
                hist["eval"].append((step + 1, res))
                if not quiet:
                    bar.write(f"{desc} step {step + 1}/{steps} | loss {hist['loss'][-1]:.4f} | "
                              + " | ".join(f"{k} {v:.3f}" for k, v in res.items() if isinstance(v, (int, float))))
            stop = rank == 0 and res_stop(hist)
            if world > 1:  # every rank must leave the loop together
                flag = torch.tensor([int(stop)], device=device)
                torch.distributed.broadcast(flag, 0)
                stop = bool(flag.item())
            if stop:
                break
        if save_path and rank == 0 and (last or (eval_every and (step + 1) % eval_every == 0)):
            save_checkpoint(save_path, raw, opt, step + 1, cfg)
    bar.close()
    hist["time_s"] = time.time() - t0
    raw.eval()
    return hist


def res_stop(hist) -> bool:
    """An eval_fn may return {'stop': 1} to end training early (e.g. 'reached 90%')."""
    return bool(hist["eval"]) and bool(hist["eval"][-1][1].get("stop", 0))


def save_checkpoint(path, model, opt, step, cfg=None):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                "config": asdict(cfg) if cfg is not None else {}}, tmp)
    os.replace(tmp, path)

# -----------------------------------------------------------------------------
# Results


def fmt(v, digits=3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.{digits}f}" if abs(v) < 1e4 else f"{v:.3g}"
    return str(v)


def print_table(rows, headers, title=None):
    """rows: list of lists; numbers are formatted to 3 decimals."""
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(headers)]
    line = "+".join("-" * (w + 2) for w in widths)
    out = []
    if title:
        out.append(title)
    out.append(" | ".join(str(h).ljust(w) for h, w in zip(headers, widths)))
    out.append(line)
    out += [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    print0("\n".join(out) + "\n")


def env_info(device) -> dict:
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "device_name": name, "threads": torch.get_num_threads(), "world_size": ddp_info()[2]}


def save_results(name, cfg, metrics: dict, history=None, wall_time_s=None, out_dir=None) -> str | None:
    """Write <out>/<name>.json atomically (rank 0 only): config, metrics, history, env, wall_time_s."""
    if not is_main():
        return None
    out_dir = out_dir or getattr(cfg, "out", "results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    blob = {"config": asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg or {}),
            "metrics": metrics, "history": history or {},
            "env": env_info(getattr(cfg, "device", "cpu")), "wall_time_s": wall_time_s}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(blob, f, indent=1, default=_json_default)
    os.replace(tmp, path)
    print0(f"wrote {path}")
    return path


def _json_default(o):
    if torch.is_tensor(o):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def plot(name, curves: dict, out_dir="results", xlabel="", ylabel="", title="", logx=False, logy=False,
         shade=None, hline=None) -> str | None:
    """curves: {label: (xs, ys)}. Saves <out_dir>/<name>.png. Missing matplotlib is one printed line."""
    if not is_main():
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the figure (pip install matplotlib)")
        return None
    os.makedirs(out_dir, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker="o", ms=3, label=label)
    if shade is not None:
        ax.axvspan(*shade, color="grey", alpha=0.15, label="training range")
    if hline is not None:
        ax.axhline(hline, color="grey", ls="--", lw=0.8)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, f"{name}.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print0(f"wrote {path}")
    return path


def over_seeds(cfg, run_one):
    """Run run_one(cfg_with_seed) -> {metric: number} for cfg.seeds seeds.

    One seed: returns its metrics unchanged. Several: the mean under each key plus '<key>/std'.
    """
    runs = []
    for i in range(max(1, cfg.seeds)):
        c = dataclasses.replace(cfg, seed=cfg.seed + i)
        runs.append(run_one(c))
    if len(runs) == 1:
        return runs[0]
    out = {}
    for k, v in runs[0].items():
        vals = [r[k] for r in runs if isinstance(r.get(k), (int, float)) and r.get(k) is not None]
        if isinstance(v, (int, float)) and len(vals) == len(runs):
            m = sum(vals) / len(vals)
            out[k] = m
            out[k + "/std"] = (sum((x - m) ** 2 for x in vals) / max(1, len(vals) - 1)) ** 0.5
        else:
            out[k] = v
    return out


def mean_std(vals) -> str:
    """'0.812 +- 0.031' for a list of numbers (just the number for one)."""
    vals = list(vals)
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return fmt(float(m))
    s = (sum((x - m) ** 2 for x in vals) / (len(vals) - 1)) ** 0.5
    return f"{m:.3f} +- {s:.3f}"
