"""
common.py -- the utilities every nanopapers script shares. Not the training loop: each script
writes its own, in the open (nanoGPT's train.py is the model).

    CLI        BaseConfig, parse_args(Config, PRESETS), config_from_preset, die
    runtime    session(cfg) (threads, torchrun, one-line Ctrl-C), get_device, autocast, set_seed
    DDP        setup_ddp, wrap_ddp, shard, token_mean, global_mean, broadcast_flag,
               print0, is_main
    training   configure_adamw, lr_at, cross_entropy_sum, masked_cross_entropy, progress, step_log
    text       Tokenizer (char- or word-level)
    model      positional_bias, rope_rotate, CausalSelfAttention (self-contained), GPTConfig, GPT
    results    mkey, over_seeds -> SeedRuns (mean +- std), print_table, save_results, plot, Stages

Metric names are `<family>/<model>/<x>` (e.g. `copy_acc/hard_alibi/L20`), built with mkey().
A paper script imports this module and nothing else of ours. Everything here is plain PyTorch.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import math
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
import typing
from dataclasses import asdict, dataclass
from importlib.util import find_spec

# A script imports this module before torch, so a missing package is one line, not an ImportError traceback.
_MISSING = [name for name in ("torch", "numpy", "tqdm") if find_spec(name) is None]  # matplotlib is optional
if _MISSING:
    print(f"error: missing package(s) {', '.join(_MISSING)}: install torch (pip install torch), then "
          f"pip install -r requirements.txt", file=sys.stderr, flush=True)
    sys.exit(2)

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# CLI: argparse built from a dataclass, one rule for bad input


def die(msg: str, code: int = 2) -> typing.NoReturn:
    """Print one clear line and exit; bad input never ends in a traceback."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


@dataclass
class BaseConfig:
    """Fields every script's Config inherits (each becomes a --flag).

    Checked for every script by validate_config before any work: numbers are finite and >= 0 (unless
    named in SIGNED); learning rates, batches, `seeds` and the fields in POSITIVE are > 0; a tuple whose
    default is non-empty must stay non-empty (unless named in MAY_BE_EMPTY); `out` must be writable.
    A script adds its own checks in __post_init__ (raise ValueError with the reason).
    """
    preset: str = ""        # smoke | quick | full; empty: full on a CUDA device, quick otherwise
    device: str = "auto"    # auto | cpu | cuda | cuda:N | mps
    seed: int = 0           # base random seed
    seeds: int = 1          # run seeds seed..seed+N-1 and report mean +- std of every metric
    out: str = "results"    # folder for <script>.json / .png (checked writable before any work)
    compile: bool = False   # torch.compile the models
    threads: int = 0        # CPU threads for torch; 0 = 1 (tiny models run fastest single-threaded)

    POSITIVE: typing.ClassVar[tuple] = ("seeds",)   # numeric fields that must be > 0
    SIGNED: typing.ClassVar[tuple] = ()              # numeric fields that may be negative
    MAY_BE_EMPTY: typing.ClassVar[tuple] = ()        # tuple fields that may be empty
    GLOBAL_BATCH: typing.ClassVar[tuple] = ()        # fields holding a global training batch (torchrun
                                                     # splits them over processes: must divide evenly)


_ALWAYS_POSITIVE = re.compile(r"(^|_)(lr|lrs|batch|batch_size)($|_)")


def validate_config(cfg, Config=None) -> None:
    """The generic input rules (see BaseConfig), on a config or on a dict of field values (checked before
    the script's own __post_init__ sees them). Raises ValueError naming the --flag."""
    Config = Config or type(cfg)
    values = cfg if isinstance(cfg, dict) else asdict(cfg)
    positive = set(Config.POSITIVE) | set(BaseConfig.POSITIVE)
    for f in dataclasses.fields(Config):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        v, flag = values.get(f.name, default), "--" + f.name.replace("_", "-")
        vals = list(v) if isinstance(v, (tuple, list)) else [v]
        if isinstance(v, (tuple, list)) and not v and default and f.name not in Config.MAY_BE_EMPTY:
            raise ValueError(f"{flag} needs at least one value")
        for x in vals:
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                continue
            if not math.isfinite(x):
                raise ValueError(f"{flag} must be a finite number (got {x})")
            if x <= 0 and (f.name in positive or _ALWAYS_POSITIVE.search(f.name)):
                raise ValueError(f"{flag} must be > 0 (got {x})")
            if x < 0 and f.name not in Config.SIGNED:
                raise ValueError(f"{flag} must be >= 0 (got {x})")


def check_writable_dir(path: str) -> None:
    """Create `path` if needed and prove a file can be written there (before hours of work, not after)."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"--out {path}: cannot write there ({e.strerror or e})") from None


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse's default prints the whole usage block first
        die(f"{message} (see {self.prog} -h)")


def _field_parser(tp, flag):
    """Turn a field's annotation into an argparse `type` (tuples/lists take comma-separated values)."""
    origin = typing.get_origin(tp)
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis] or [str]
        elem = _field_parser(args[0], flag)
        def parse(s, elem=elem, origin=origin):
            vals = [elem(v.strip()) for v in s.split(",") if v.strip() != ""]
            return tuple(vals) if origin is tuple else vals
        return parse
    if tp in (int, float):
        def parse_num(s, tp=tp):
            try:
                return tp(s)
            except ValueError:
                raise argparse.ArgumentTypeError(f"invalid {tp.__name__} value '{s}'") from None
        return parse_num
    return str


def _field_comments(Config) -> dict:
    """{field: its trailing `# comment` (continuation comment lines appended)} read from the source."""
    out = {}
    for cls in reversed(Config.__mro__):
        if not dataclasses.is_dataclass(cls):
            continue
        try:
            lines = inspect.getsource(cls).splitlines()
        except (OSError, TypeError):
            continue
        last = None
        for line in lines:
            m = re.match(r"\s+(\w+)\s*:[^=#]+=[^#]*#\s?(.*)$", line)
            if m:
                last = m.group(1)
                out[last] = m.group(2).strip()
            elif last and re.match(r"\s+#\s?(.*)$", line):
                out[last] += " " + line.strip()[1:].strip()
            else:
                last = None
    return out


def _show(v) -> str:
    return ",".join(str(x) for x in v) if isinstance(v, (tuple, list)) else str(v)


def parse_args(Config, presets: dict, argv=None):
    """Build a parser from `Config` (a dataclass inheriting BaseConfig) and return the resolved config.

    Precedence: dataclass defaults < preset overrides < explicit command-line flags. Every input rule
    is checked here, before any work: a bad value is one `error: ...` line and exit code 2.
    """
    prog = os.path.basename(sys.argv[0]) if argv is None else "script"
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)  # which preset's defaults does -h show?
    pre.add_argument("--preset")
    pre.add_argument("--device", default="auto")
    known = pre.parse_known_args(argv)[0]
    shown = known.preset if known.preset in presets else (
        "full" if torch.cuda.is_available() and known.device.startswith(("auto", "cuda")) else "quick")

    doc = (sys.modules[Config.__module__].__doc__ or "").strip().splitlines()
    p = _OneLineParser(prog=prog, description=doc[0] if doc else None,
                       epilog=f"defaults shown are those of the '{shown}' preset")
    hints, notes = typing.get_type_hints(Config), _field_comments(Config)
    for f in dataclasses.fields(Config):
        tp = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        default = presets.get(shown, {}).get(f.name, default)
        flag = "--" + f.name.replace("_", "-")
        names = [flag] if flag == "--" + f.name else [flag, "--" + f.name]
        note = notes.get(f.name, "").replace("%", "%%")  # argparse %-formats help strings
        if f.name == "preset":
            p.add_argument(*names, default=None, metavar="{" + ",".join(presets) + "}",
                           help="preset of overrides (default: full on CUDA, quick otherwise)")
        elif tp is bool:
            p.add_argument(*names, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{note} (default: {default})")
        else:
            meta = tp.__name__.upper() if isinstance(tp, type) else "A,B,.."
            p.add_argument(*names, type=_field_parser(tp, flag), default=None, metavar=meta,
                           help=f"{note} (default: {(_show(default) or 'empty').replace('%', '%%')})")
    ns = vars(p.parse_args(argv))
    explicit = {k: v for k, v in ns.items() if v is not None}

    device = get_device(explicit.get("device", "auto"))
    preset = explicit.get("preset") or ("full" if device.type == "cuda" else "quick")
    if preset not in presets:
        die(f"unknown preset '{preset}' (choose one of: {', '.join(presets)})")
    cfg = _build(Config, {**presets[preset], **explicit, "preset": preset, "device": str(device)})
    print0(f"config ({prog}): " + ", ".join(f"{k}={_show(v)}" for k, v in asdict(cfg).items()))
    return cfg


def _build(Config, kwargs):
    try:
        validate_config(kwargs, Config)
        cfg = Config(**kwargs)
        validate_config(cfg)
        check_writable_dir(cfg.out)
    except (ValueError, AssertionError) as e:
        die(f"bad configuration: {e}")
    return cfg


def config_from_preset(Config, presets: dict, preset: str = "smoke", **overrides):
    """The resolved, validated config of a preset without touching sys.argv (tests and notebooks)."""
    if preset not in presets:
        die(f"unknown preset '{preset}' (choose one of: {', '.join(presets)})")
    return _build(Config, {**presets[preset], "preset": preset, **overrides})

# -----------------------------------------------------------------------------
# Runtime: device, seeds, threads, a run's session


def get_device(name: str = "auto") -> torch.device:
    """auto -> cuda > mps > cpu. An unavailable device is a one-line error, not a traceback."""
    name = (name or "auto").strip().lower()
    has_mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if re.fullmatch(r"cuda(:\d+)?", name):
        if not torch.cuda.is_available():
            die(f"--device {name} was asked for, but this machine has no CUDA device "
                f"(torch {torch.__version__}); use --device cpu")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            die(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
        return dev
    if name == "mps":
        if not has_mps:
            die("--device mps was asked for, but MPS is not available here; use --device cpu")
        return torch.device("mps")
    die(f"unknown device '{name}' (choose auto, cpu, cuda, cuda:N or mps)")


def autocast(device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; full precision elsewhere (CPU bf16 is slow for tiny models)."""
    if torch.device(device).type == "cuda":
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


@contextlib.contextmanager
def session(cfg, data_parallel: bool = True):
    """Everything around run(cfg): threads, the torchrun process group, and a one-line Ctrl-C.

        cfg = common.parse_args(Config, PRESETS)
        with common.session(cfg):
            run(cfg)

    Under torchrun, cfg.device becomes this rank's device, and the rank's process ends with the block (all
    ranks meet at a barrier, then os._exit(0)). data_parallel=False: the script trains no
    network data-parallel, so torchrun is refused in one line. A global batch must split evenly.
    """
    world = ddp_info()[2]
    if world > 1 and not data_parallel:
        die(f"{os.path.basename(sys.argv[0])} has nothing to split across processes; run it without torchrun")
    for name in type(cfg).GLOBAL_BATCH:
        if getattr(cfg, name) % world:
            die(f"--{name.replace('_', '-')} {getattr(cfg, name)} does not split evenly over {world} processes")
    cfg.device = str(setup_ddp(torch.device(cfg.device)))
    set_threads(cfg.threads, cfg.device)
    _SAVED.clear()
    try:
        yield cfg
    except KeyboardInterrupt:
        kept = f"results of the finished stages are in {_SAVED[-1]}" if _SAVED else "nothing had finished, nothing saved"
        print("", file=sys.stderr)
        die(f"interrupted: {kept}", code=130)
    if world > 1:
        import torch.distributed as dist
        dist.barrier()  # ranks done early wait here for rank 0's evaluation and files
        # Every collective is done, so a rank leaves now, skipping the group's and the interpreter's teardown:
        # there gloo's C++ threads can abort a finished process ("terminate called without an active
        # exception", seen in CI after destroy_process_group). A rank that failed just raises.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

# -----------------------------------------------------------------------------
# Distributed data parallel (torchrun): each rank takes its rows of the global batch


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
    if world == 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def wrap_ddp(model: nn.Module, device) -> nn.Module:
    """DistributedDataParallel under torchrun (gradients averaged over ranks); the model itself otherwise."""
    if ddp_info()[2] == 1:
        return model
    device = torch.device(device)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def shard(*tensors):
    """This rank's rows (rank, rank + world, ...) of each global-batch tensor; unchanged for one process."""
    rank, _, world = ddp_info()
    out = tuple(t[rank::world] for t in tensors) if world > 1 else tensors
    return out if len(out) > 1 else out[0]


def _all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if ddp_info()[2] > 1:
        import torch.distributed as dist
        x = x.clone()
        dist.all_reduce(x)
    return x


def token_mean(loss_sum: torch.Tensor, n_tokens) -> torch.Tensor:
    """The loss to backpropagate: this rank's summed loss over the *global* token count.

    DDP averages gradients over the W ranks, so each rank returns W * sum_r / N_global: the gradient
    is then that of the global batch's token mean, whatever W is (ranks may hold different counts).
    """
    n = torch.as_tensor(n_tokens, dtype=torch.float32, device=loss_sum.device)
    world = ddp_info()[2]
    return loss_sum * world / _all_reduce_sum(n.detach()).clamp(min=1.0)


def broadcast_flag(flag: bool, device="cpu") -> bool:
    """Rank 0's decision on every rank (e.g. 'reached 90%, stop training': all ranks must leave together)."""
    if ddp_info()[2] == 1:
        return bool(flag)
    import torch.distributed as dist
    t = torch.tensor([int(bool(flag))], device=device)
    dist.broadcast(t, 0)
    return bool(t.item())


def global_mean(x: torch.Tensor) -> float:
    """The mean of a per-rank scalar over ranks (the logged loss is the global batch's)."""
    x = x.detach().float()
    return float(_all_reduce_sum(x)) / ddp_info()[2]

# -----------------------------------------------------------------------------
# Training utilities (the loop itself lives in each script)


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


def cross_entropy_sum(logits, targets, loss_mask=None):
    """(summed next-token CE, number of scored tokens) over targets != -100 (and loss_mask > 0)."""
    logits = logits.float().reshape(-1, logits.shape[-1])
    targets = targets.reshape(-1)
    w = (targets != -100).float()
    if loss_mask is not None:
        w = w * loss_mask.reshape(-1).float()
    ce = F.cross_entropy(logits, targets.clamp(min=0), reduction="none")
    return (ce * w).sum(), w.sum()


def masked_cross_entropy(logits, targets, loss_mask=None):
    """Mean next-token CE over the scored tokens (see cross_entropy_sum)."""
    s, n = cross_entropy_sum(logits, targets, loss_mask)
    return s / n.clamp(min=1.0)


def count_params(model: nn.Module) -> int:
    seen, n = set(), 0
    for p in model.parameters():  # tied weights count once
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def progress(iterable=None, desc: str = "", total=None, leave: bool = False):
    """A tqdm bar with ETA on rank 0 (silent on other ranks and when stderr is not a terminal)."""
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, total=total, leave=leave, mininterval=1.0, dynamic_ncols=True,
                disable=True if not is_main() else None)


def step_log(step: int, steps: int, t0: float, **vals) -> str:
    """'step 400/2000 | loss 0.123 | acc 0.980 | 12.1 ms/step | eta 1.4 m' (t0: time.time() at step 0)."""
    dt = time.time() - t0
    ms = 1000 * dt / max(1, step)
    eta = ms * (steps - step) / 60000
    parts = [f"step {step}/{steps}"] + [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in vals.items()]
    return " | ".join(parts + [f"{ms:.1f} ms/step", f"eta {eta:.1f} m"])


class Stages:
    """Overall progress of a multi-stage run: one line per stage with elapsed time and an ETA.

        stages = common.Stages({"copy": 5, "lookup": 2, "hash": 0.1})   # relative costs (guesses)
        with stages("copy"):
            ...
    """

    def __init__(self, costs: dict):
        self.costs, self.done, self.t0 = dict(costs), 0.0, time.time()

    @contextlib.contextmanager
    def __call__(self, name: str):
        i = list(self.costs).index(name) + 1
        elapsed = time.time() - self.t0
        total = sum(self.costs.values())
        eta = f"eta {elapsed / self.done * (total - self.done) / 60:.1f} m" if self.done else "eta ?"
        print0(f"[stage {i}/{len(self.costs)}: {name}] elapsed {elapsed / 60:.1f} m | {eta}")
        yield
        self.done += self.costs[name]

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

# -----------------------------------------------------------------------------
# Attention with its positional schemes: self-contained (copy these four pieces with torch alone)


def alibi_slopes(n_head: int) -> torch.Tensor:
    """m_h = 2^(-8(h+1)/H) (Press et al.; exact for H a power of two)."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / n_head) for h in range(n_head)])


def positional_bias(pos: str, n_head: int, q_pos, k_pos, windows=()) -> torch.Tensor:
    """Additive (H, Tq, Tk) attention bias: the causal mask plus the scheme's own term.

    q_pos / k_pos: absolute indices of queries and keys (they differ with a KV cache).
    alibi: -m_h (i - j). hard_alibi: head h sees only keys with i - j < windows[h] (0 = no window, NoPE).
    none / learned / rope: the causal mask alone (their positions enter elsewhere).
    """
    dist = q_pos[:, None] - k_pos[None, :]                                   # (Tq, Tk)
    allowed = (dist >= 0).expand(n_head, -1, -1)                             # (H, Tq, Tk)
    bias = torch.zeros(allowed.shape, device=dist.device)
    if pos == "alibi":
        bias = bias - alibi_slopes(n_head).to(dist.device)[:, None, None] * dist.clamp(min=0)
    if pos == "hard_alibi":
        w = torch.tensor(windows, device=dist.device)[:, None, None]
        allowed = allowed & ((w == 0) | (dist < w))
    return bias.masked_fill(~allowed, float("-inf"))


def rope_rotate(x: torch.Tensor, pos: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary embedding on the full head dim. x: (B, H, T, hd), pos: (T,)."""
    hd = x.shape[-1]
    inv = base ** (-torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd)
    ang = pos.to(x.device, torch.float32)[:, None] * inv[None, :]       # (T, hd/2)
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with the positional scheme inside.

    pos: none (NoPE) | learned (the table is added to the input, so attention adds nothing) | alibi |
    hard_alibi (windows: one per head, 0 = a NoPE head; Jelassi et al. 2024) | rope.
    forward(x (B, T, C), q_pos=None (T,), cache=None (a dict per layer), attn_mask=None (T, T) or
    (B, T, T) bool, True = may attend) -> (B, T, C).
    """

    def __init__(self, n_embd: int, n_head: int, pos: str = "none", windows=(), rope_base: float = 10000.0,
                 bias: bool = False, dropout: float = 0.0):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} is not divisible by n_head={n_head}")
        if pos == "hard_alibi" and len(windows) != n_head:
            raise ValueError("hard_alibi needs one window per head")
        self.n_head, self.pos, self.windows, self.rope_base = n_head, pos, tuple(windows), rope_base
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.dropout = dropout
        self._bias = {}  # (offset, T, device) -> positional bias, rebuilt when the shape changes

    def positional(self, offset: int, T: int, device):
        key = (offset, T, str(device))
        if key not in self._bias:
            if len(self._bias) > 16:
                self._bias.clear()
            k_pos = torch.arange(offset + T, device=device)
            self._bias[key] = positional_bias(self.pos, self.n_head, k_pos[offset:], k_pos, self.windows)
        return self._bias[key]

    def forward(self, x, q_pos=None, cache=None, attn_mask=None):
        B, T, C = x.shape
        H = self.n_head
        q, k, v = self.qkv(x).view(B, T, 3, H, C // H).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, hd)
        offset = cache["k"].shape[2] if cache is not None and cache.get("k") is not None else 0
        if self.pos == "rope":
            rp = q_pos if q_pos is not None else torch.arange(offset, offset + T, device=x.device)
            q, k = rope_rotate(q, rp, self.rope_base), rope_rotate(k, rp, self.rope_base)
        if cache is not None:  # append this step's keys/values to the layer's cache
            if cache.get("k") is not None:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        drop = self.dropout if self.training else 0.0
        if self.pos in ("none", "learned", "rope") and attn_mask is None and offset == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)  # fused causal kernel
        else:
            bias = self.positional(offset, T, x.device)
            if attn_mask is not None:
                extra = attn_mask[:, None] if attn_mask.dim() == 3 else attn_mask
                bias = bias.masked_fill(~extra.to(x.device), float("-inf"))
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=drop)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

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


class MLP(nn.Module):
    def __init__(self, n_embd: int, hidden: int, bias: bool = False, dropout: float = 0.0):
        super().__init__()
        self.fc = nn.Linear(n_embd, hidden, bias=bias)
        self.proj = nn.Linear(hidden, n_embd, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, mlp: nn.Module):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias), nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg.n_embd, cfg.n_head, cfg.pos, cfg.hard_windows, cfg.rope_base,
                                        cfg.bias, cfg.dropout)
        self.mlp = mlp

    def forward(self, x, q_pos=None, cache=None, attn_mask=None):
        x = x + self.attn(self.ln1(x), q_pos, cache, attn_mask)
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
      returns (logits, loss) or (logits, loss, hidden) where hidden = [embedding out, block 1 out, ...];
      loss is this process's token mean (a DDP loop uses cross_entropy_sum + token_mean instead).
    """

    def __init__(self, cfg: GPTConfig, mlp_factory=None):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        make_mlp = mlp_factory or (lambda c, i: MLP(c.n_embd, c.mlp_ratio * c.n_embd, c.bias, c.dropout))
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

    def new_cache(self):
        return [dict() for _ in self.blocks]

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
        rope_pos = q_pos if q_pos.dim() == 1 else None
        hidden = [x]
        for i, block in enumerate(self.blocks):
            x = block(x, rope_pos, None if cache is None else cache[i], attn_mask)
            hidden.append(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None if targets is None else masked_cross_entropy(logits, targets, loss_mask)
        return (logits, loss, hidden) if return_hidden else (logits, loss)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, greedy=False, generator=None):
        """Batched sampling with a KV cache. greedy=True (or temperature 0) takes the argmax. (B, T + new)."""
        cache = self.new_cache()
        step_in = idx
        for _ in range(max_new_tokens):
            logits = self(step_in, cache=cache)[0][:, -1, :].float()
            nxt = sample_logits(logits, temperature, greedy, generator)
            idx = torch.cat([idx, nxt[:, None]], 1)
            step_in = nxt[:, None]
        return idx


def sample_logits(logits, temperature=1.0, greedy=False, generator=None):
    """(B, V) logits -> (B,) ids."""
    if greedy or temperature <= 0:
        return logits.argmax(-1)
    probs = F.softmax(logits / temperature, -1)
    # sample where the generator lives (compare types: a generator made on "cuda" reports cuda, probs cuda:0)
    if generator is not None and generator.device.type != probs.device.type:
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(1).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)

# -----------------------------------------------------------------------------
# Results: metric names, seeds, tables, JSON, figures


def mkey(*parts) -> str:
    """A metric name `<family>/<model>/<x>`: mkey('copy_acc', 'nope', 'L20') -> 'copy_acc/nope/L20'."""
    return "/".join(str(p) for p in parts if p is not None and str(p) != "")


def fmt(v, digits=3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.{digits}f}" if abs(v) < 1e4 else f"{v:.3g}"
    return str(v)


def mean_std(vals):
    """(mean, sample std) of a list of numbers; std is 0.0 for one value."""
    vals = [float(v) for v in vals]
    m = sum(vals) / len(vals)
    s = (sum((x - m) ** 2 for x in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
    return m, s


@dataclass
class SeedRuns:
    """Metrics over seeds: mean[k], std[k] (only with >= 2 seeds), per_seed[i][k], extras[i]."""
    seeds: list
    mean: dict
    std: dict
    per_seed: list
    extras: list

    def cell(self, key, digits=3) -> str:
        """'0.812 ± 0.031' over several seeds, '0.812' for one, '-' when the metric is absent."""
        if key not in self.mean:
            return "-"
        m = fmt(self.mean[key], digits)
        return f"{m} ± {fmt(self.std[key], digits)}" if key in self.std else m


def aggregate(per_seed: list, seeds: list, extras=None) -> SeedRuns:
    """Mean (and std with >= 2 seeds) of every numeric metric that every seed reports."""
    keys = [k for k in per_seed[0] if all(isinstance(r.get(k), (int, float)) for r in per_seed)]
    mean, std = {}, {}
    for k in keys:
        m, s = mean_std([r[k] for r in per_seed])
        mean[k] = m
        if len(per_seed) > 1:
            std[k] = s
    return SeedRuns(list(seeds), mean, std, list(per_seed), list(extras or [None] * len(per_seed)))


def over_seeds(cfg, run_one, name: str | None = None) -> SeedRuns:
    """Run run_one(cfg with seed s) for s = cfg.seed .. cfg.seed + cfg.seeds - 1.

    run_one returns {metric: number} or ({metric: number}, extra) where extra is anything (curves for a
    figure). With `name`, the seeds finished so far are saved after each one (an interrupt keeps them).
    """
    per_seed, extras, seeds = [], [], []
    for i in range(cfg.seeds):
        s = cfg.seed + i
        if cfg.seeds > 1:
            print0(f"--- seed {s} ({i + 1}/{cfg.seeds})")
        out = run_one(dataclasses.replace(cfg, seed=s))
        m, extra = out if isinstance(out, tuple) else (out, None)
        per_seed.append(m)
        extras.append(extra)
        seeds.append(s)
        if name and i < cfg.seeds - 1:
            save_results(name, cfg, aggregate(per_seed, seeds, extras), partial=True)
    return aggregate(per_seed, seeds, extras)


def print_table(rows, headers, title=None):
    """rows: list of lists; floats are formatted to 3 decimals, strings (e.g. SeedRuns.cell) as given."""
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(headers)]
    line = "+".join("-" * (w + 2) for w in widths)
    out = [title] if title else []
    out.append(" | ".join(str(h).ljust(w) for h, w in zip(headers, widths)))
    out.append(line)
    out += [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    print0("\n".join(out) + "\n")


def _git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("+dirty" if dirty else "")) or None


def env_info(device) -> dict:
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "device_name": name, "threads": torch.get_num_threads(), "world_size": ddp_info()[2],
            "git_commit": _git_commit(), "argv": list(sys.argv)}


def _finite_or_none(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite_or_none(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite_or_none(x) for x in v]
    return v


def _plain(o):
    """JSON-able copy: tensors and numpy scalars to Python numbers, NaN/inf to null."""
    if torch.is_tensor(o):
        o = o.tolist()
    elif hasattr(o, "tolist") and not isinstance(o, (str, bytes)):
        o = o.tolist()
    if isinstance(o, dict):
        return {str(k): _plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple, set)):
        return [_plain(v) for v in o]
    return _finite_or_none(o)


_SAVED: list = []  # paths written in this session (session() names the last one on Ctrl-C)


def save_results(name, cfg, metrics, *, history=None, info=None, timings=None, wall_time_s=None,
                 partial=False) -> str | None:
    """Write <cfg.out>/<name>.json atomically (rank 0 only) and return its path.

    metrics: {name: number} or a SeedRuns (then `metrics` holds the means, `metrics_std` the stds and
    `per_seed` each seed's numbers). Numbers only; NaN is written as null. Labels go in `info`, seconds
    in `timings`. partial=True marks a run that has not finished (an interrupt keeps what was done).
    """
    if not is_main():
        return None
    if isinstance(metrics, SeedRuns):
        runs = metrics
    else:
        runs = SeedRuns([getattr(cfg, "seed", 0)], dict(metrics), {}, [dict(metrics)], [None])
    bad = [k for k, v in runs.mean.items() if isinstance(v, bool) or not isinstance(v, (int, float))]
    if bad:
        raise TypeError(f"metrics must be numbers; move {bad[:3]} to info=")
    blob = {"config": asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg or {}),
            "complete": not partial, "seeds": runs.seeds, "metrics": runs.mean, "metrics_std": runs.std,
            "per_seed": runs.per_seed if len(runs.per_seed) > 1 else [], "info": info or {},
            "history": history or {}, "timings": timings or {}, "wall_time_s": wall_time_s,
            "env": env_info(getattr(cfg, "device", "cpu"))}
    out_dir = getattr(cfg, "out", None) or "results"
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_plain(blob), f, indent=1, allow_nan=False)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _SAVED.append(path)
    if not partial:
        print0(f"wrote {path}")
    return path


def plot(name, curves: dict, out_dir="results", xlabel="", ylabel="", title="", logx=False, logy=False,
         shade=None, hline=None) -> str | None:
    """curves: {label: (xs, ys)} or {label: (xs, ys, std)} (a band of +-std). Saves <out_dir>/<name>.png.

    Call it after save_results, so a figure never sits beside the JSON of another run.
    """
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
    for label, curve in curves.items():
        xs, ys = curve[0], curve[1]
        line, = ax.plot(xs, ys, marker="o", ms=3, label=label)
        if len(curve) > 2 and curve[2] is not None:
            lo = [y - s for y, s in zip(ys, curve[2])]
            hi = [y + s for y, s in zip(ys, curve[2])]
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2)
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
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    plt.close(fig)
    print0(f"wrote {path}")
    return path
