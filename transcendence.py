"""
Transcendence: Generative Models Can Outperform The Experts That Train Them -- E. Zhang, V. Zhu, N. Saphra,
A. Kleiman, B. Edelman, M. Tambe, S. Kakade, E. Malach. NeurIPS 2024, arXiv 2406.11741.
Official code: https://github.com/KempnerInstitute/chess-research (model, games vs Stockfish, Glicko-2).

Finding: a model trained on several noisy experts plays at temperature 1 like their average (Prop. 1), but at
low temperature it is a majority vote that beats the best of them when their errors differ (Props. 2-4); an
error all experts share wins the vote instead (the diversity ablation).
Measured (quick, 3 seeds, 1054 s, one CPU thread): held-out reward tau=0.001 -0.21 vs best expert -0.81;
  shared blunders -3.80 vs -2.16; the CPU-scale transcript GPT loses every game. Full: unmeasured.
Run:  python transcendence.py --preset smoke           # seconds; what pytest runs
      python transcendence.py                          # quick on CPU: toy, position pool, small transcript GPT
      python transcendence.py --device cuda            # full: one GPU, <= 10 min, needs Stockfish
      torchrun --standalone --nproc_per_node=2 transcendence.py --preset smoke --device cpu
Glossary (ours -> paper):
  pi0                 f*: the argmax of a 1-ply material score s(x, y), ties uniform
  expert rho          Prop. 3's noisy expert: pi0, but with probability rho a blunder
  diversity           independent: a blunder is a uniform legal move; shared: every expert's blunder is the
                      move pi0 scores worst (the same error for all, like the paper's low-entropy CF-1500 data)
  r(x, y) = s - max s the reward (<= 0, pi0 gets 0); tau: f_tau = softmax(log f / tau), tau <= 1e-3 = argmax
  char mode           the official player: free generation, up to 5 tries, then forfeit (a loss)
  legal mode          sampling among the legal moves only (tree-scored), our second row
  rung eps            the opponent: Stockfish (skill 0, depth 1) that plays a random move with probability eps
Does not include: Lichess data and the 50M ChessFormer, Stockfish levels 1/3/5 (our experts score 0/20 against
  skill 0), the favour analysis (Table 1), the data-entropy analysis (Fig. 5), the t-SNE.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import hashlib
import math
import multiprocessing
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass

import common  # first: it reports a missing package in one line

import chess
import chess.engine
import torch
import torch.nn as nn
import torch.nn.functional as F

NAME = "transcendence"

# -----------------------------------------------------------------------------
# Config

VOCAB = " #+-.0123456789;=BKNOQRabcdefghx"   # the official 32-char vocabulary, in its index order
TOK = common.Tokenizer(list(VOCAB))
PIECE_VALUE = {chess.PAWN: 1, chess.KNIGHT: 3, chess.BISHOP: 3, chess.ROOK: 5, chess.QUEEN: 9, chess.KING: 0}
CACHE_VERSION = 2             # bump when the games cache format or the experts change
# ChessFormer-1000 (data capped at 1000) by temperature, read off figures/rating_temp.png in the official repo:
# Glicko-2 vs Stockfish 1/3/5 minus the data's cap, i.e. the shape "gain of the model over the best player"
PAPER_GAIN = {1.0: -150, 0.75: 80, 0.5: 300, 0.1: 500, 0.001: 420}
ENGINE_NOTE = ("Stockfish's skill levels pick moves with a time-seeded generator: games against it are not "
               "reproducible at a fixed --seed")


@functools.lru_cache(maxsize=8)
def engine_name(path: str) -> str:
    """The UCI handshake ('uci' -> 'id name ...' -> 'uciok'); ValueError when `path` does not answer it."""
    try:
        eng = chess.engine.SimpleEngine.popen_uci(path, timeout=5)
    except (OSError, chess.engine.EngineError, chess.engine.EngineTerminatedError, TimeoutError,
            ValueError) as e:
        raise ValueError(f"--stockfish {path}: not a UCI chess engine ({type(e).__name__}: {e})") from None
    try:
        return eng.id.get("name", os.path.basename(path))
    finally:
        eng.quit()


@dataclass
class Config(common.BaseConfig):
    parts: str = "toy,pool,chess"   # experiments to run: a comma-separated subset of toy,pool,chess
    taus: tuple[float, ...] = (1.0, 0.75, 0.5, 0.1, 0.001)  # temperatures (> 0; <= 1e-3 means argmax)
    # part 1: linear toy (paper Fig. 7)
    toy_d: int = 100              # input dim, x ~ N(0, I_d)
    toy_classes: int = 10         # C classes; the truth is y = argmax W* x
    toy_experts: int = 5          # k experts, W_i = W* + sigma xi_i
    toy_n: int = 10_000           # training examples, each labelled by a uniformly chosen expert
    toy_test: int = 10_000        # fresh test inputs
    toy_steps: int = 200          # full-batch Adam steps
    toy_lr: float = 0.05          # Adam learning rate of the toy
    toy_sigmas: tuple[float, ...] = (0.3, 1.0, 3.0)  # expert noise levels swept
    toy_sigma: float = 1.0        # noise level of the headline toy metrics and of the ablation
    toy_corr: float = 1.0         # ablation: xi_i = sqrt(c) xi_shared + sqrt(1-c) xi_i' (1 = identical experts)
    # chess experts and their games
    rhos: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7)  # blunder probability of each expert, in [0, 1]
    diversity: str = "independent"  # training games of part 3: independent | shared (see the glossary)
    n_games: int = 1500           # expert games generated (1 in 20 held out), cached in --out
    max_plies: int = 60           # game cap; then adjudicated by material (>= 2 pawns ahead wins)
    workers: int = 1              # processes generating games
    # part 2: position pool (the theory's exact setting on chess positions)
    pool_train: int = 4000        # training positions (uniform over (game, ply) of the training games)
    pool_test: int = 1000         # held-out positions (from held-out games) the rewards are measured on
    pool_steps: int = 300         # AdamW steps of the move scorer
    pool_batch: int = 128         # positions per step
    pool_lr: float = 3e-3         # AdamW learning rate of the move scorer
    pool_hidden: int = 64         # hidden width of the move scorer
    # part 3: transcript GPT (paper: 16 layers, 8 heads, d 512, block 1023)
    n_layer: int = 2              # transformer blocks
    n_head: int = 4               # attention heads
    n_embd: int = 128             # model width
    block_size: int = 320         # context in characters (a 60-ply game is ~320)
    batch_size: int = 32          # global batch of blocks (split over torchrun processes)
    steps: int = 120              # training steps (quick: ~1.2M characters, what 2 CPU minutes allow)
    lr: float = 3e-3              # peak learning rate (paper: 3e-4 for 50M); AdamW betas (0.9, 0.95)
    warmup: int = 30              # linear warmup steps, then cosine to lr/10
    weight_decay: float = 0.1     # AdamW weight decay on >= 2-D weights
    grad_clip: float = 1.0        # gradient-norm clip
    log_every: int = 25           # steps between logged losses
    eval_positions: int = 100     # held-out positions for the position reward and the legal-move rate
    score_chunk: int = 16         # positions per tree-scoring forward pass (legal mode)
    # part 3: rated games
    game_taus: tuple[float, ...] = (1.0, 0.001)  # temperatures the model plays games at
    game_modes: tuple[str, ...] = ("char", "legal")  # model players: char (official, headline) | legal
    games: int = 10               # games of each model player against each rung
    expert_games: int = 10        # games of each expert against each rung
    stockfish: str = "auto"       # auto (PATH, then /usr/games/stockfish) | none (built-in rungs) | PATH
    sf_eps: tuple[float, ...] = (0.75,)  # rungs: random-move probability of each (first = the anchor)
    anchor_rating: float = 1000.0  # the anchor rung's fixed Glicko-2 rating (RD 0); other rungs are calibrated
    calib_games: int = 40         # games of each rung against the previous one (rating calibration)
    engines: int = 1              # Stockfish processes playing in parallel

    POSITIVE = ("toy_d", "toy_n", "toy_test", "toy_steps", "toy_experts", "n_games", "pool_train", "pool_test",
                "pool_steps", "pool_hidden", "n_layer", "n_head", "n_embd", "steps", "log_every",
                "eval_positions", "score_chunk", "workers", "engines", "max_plies", "block_size")
    GLOBAL_BATCH = ("batch_size",)

    def __post_init__(self):
        parts = [p for p in self.parts.split(",") if p]
        if not parts or any(p not in ("toy", "pool", "chess") for p in parts):
            raise ValueError(f"--parts must be a subset of toy,pool,chess (got '{self.parts}')")
        if self.diversity not in ("independent", "shared"):
            raise ValueError(f"--diversity must be independent or shared (got '{self.diversity}')")
        if any(m not in ("char", "legal") for m in self.game_modes):
            raise ValueError(f"--game-modes must be char and/or legal (got {self.game_modes})")
        if any(not 0.0 <= r <= 1.0 for r in self.rhos) or any(not 0.0 <= e <= 1.0 for e in self.sf_eps):
            raise ValueError("--rhos and --sf-eps are probabilities in [0, 1]")
        if any(t <= 0 for t in self.taus + self.game_taus):
            raise ValueError("temperatures must be > 0")
        if not 0.0 <= self.toy_corr <= 1.0 or self.toy_classes < 2:
            raise ValueError("need 0 <= --toy-corr <= 1 and --toy-classes >= 2")
        if self.n_games < 20 or self.max_plies < 4 or self.block_size < 128:
            raise ValueError("need --n-games >= 20, --max-plies >= 4 and --block-size >= 128")
        if self.n_head and self.n_embd % self.n_head:
            raise ValueError(f"--n-embd {self.n_embd} is not divisible by --n-head {self.n_head}")
        if self.stockfish == "auto":  # resolved once, so the JSON records the binary used
            found = shutil.which("stockfish") or "/usr/games/stockfish"
            self.stockfish = found if os.path.isfile(found) else "none"
        if self.stockfish != "none":
            engine_name(self.stockfish)   # a folder, /bin/true or a non-engine fails here, before any work
        elif self.preset == "full" and "chess" in parts:
            raise ValueError("the full preset plays rated games against Stockfish, which was not found: install "
                             "it (apt-get install stockfish, brew install stockfish) or pass --stockfish PATH")


PRESETS = {
    "smoke": dict(toy_d=20, toy_classes=5, toy_n=2000, toy_test=4000, toy_steps=100, toy_sigmas=(1.0,),
                  n_games=40, pool_train=300, pool_test=100, pool_steps=150, pool_batch=64, pool_hidden=32,
                  n_layer=1, n_head=2, n_embd=32, block_size=160, batch_size=8, steps=20, warmup=5, log_every=5,
                  eval_positions=8, game_taus=(0.001,), games=2, expert_games=2, calib_games=2,
                  sf_eps=(0.75, 0.5)),
    "quick": dict(),
    "full": dict(seeds=1, toy_sigmas=(0.1, 0.3, 1.0, 2.0, 3.0), n_games=100_000, workers=14, pool_train=10_000,
                 pool_test=2000, pool_steps=3000, pool_batch=1024, pool_hidden=128, n_layer=8, n_head=8,
                 n_embd=512, block_size=384, batch_size=128, steps=3000, lr=6e-4, warmup=200, log_every=100,
                 eval_positions=500, score_chunk=64, game_taus=(1.0, 0.75, 0.5, 0.1, 0.001), games=60,
                 expert_games=100, sf_eps=(0.75, 0.5, 0.25), calib_games=100, engines=12),
}

# -----------------------------------------------------------------------------
# Data: the theory toys, chess experts, their games, sampled positions


def temper(logp: torch.Tensor, tau: float) -> torch.Tensor:
    """f_tau = softmax(log f / tau) over the last dim; tau <= 1e-3 is the argmax with uniform tie-break."""
    if tau <= 1e-3:
        top = logp == logp.max(-1, keepdim=True).values
        return top.float() / top.sum(-1, keepdim=True)
    return F.softmax(logp / tau, -1)


def toy_three_actions(tau: float = 0.1) -> dict:
    """Appendix C: experts (.6,.4,0) and (0,.4,.6); only the middle action is rewarded."""
    mix = (torch.tensor([0.6, 0.4, 0.0]) + torch.tensor([0.0, 0.4, 0.6])) / 2   # f_hat = (0.3, 0.4, 0.3)
    p = temper(mix.log(), tau)
    return {"mixture": mix, "tempered": p, "reward_mixture": float(mix[1]), "reward_tempered": float(p[1])}


def toy_linear(d, C, k, N, sigma, corr, steps, lr, taus, seed, n_test=10_000) -> dict:
    """Fig. 7: k noisy linear experts label x ~ N(0, I_d); a linear model learns their mixture. Accuracy vs the
    truth argmax W* x; the model's is the exact expectation E_x f_tau(y*|x) (no sampling noise)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(C, d, generator=g)                                        # W*
    xi = math.sqrt(corr) * torch.randn(C, d, generator=g) + math.sqrt(1 - corr) * torch.randn(k, C, d, generator=g)
    We = W + sigma * xi                                                       # (k, C, d) expert weights
    x, xt = torch.randn(N, d, generator=g), torch.randn(n_test, d, generator=g)
    who = torch.randint(0, k, (N,), generator=g)                              # a random expert per example
    y = torch.einsum("nd,ncd->nc", x, We[who]).argmax(-1)                     # (N,) expert labels
    torch.manual_seed(seed)
    model = nn.Linear(d, C)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    truth = (xt @ W.T).argmax(-1)
    exp_acc = (torch.einsum("nd,kcd->knc", xt, We).argmax(-1) == truth).float().mean(1)   # (k,)
    with torch.no_grad():
        logp = F.log_softmax(model(xt), -1)
    out = {"best_expert": float(exp_acc.max()), "mean_expert": float(exp_acc.mean())}
    out.update({f"tau{t:g}": float(temper(logp, t).gather(1, truth[:, None]).mean()) for t in taus})
    return out


def move_scores(board: chess.Board):
    """1-ply material score s(x, y) of every legal move, in board.legal_moves order (no push/pop):
    captured value + promotion gain + the mover's value if its square is attacked (it escapes)
    - the moved piece's value if the target square is attacked (it hangs)."""
    opp, out = not board.turn, []
    for m in board.legal_moves:
        mover, captured = board.piece_type_at(m.from_square), board.piece_type_at(m.to_square)
        s = 1 if board.is_en_passant(m) else (PIECE_VALUE[captured] if captured else 0)
        if m.promotion:
            s += PIECE_VALUE[m.promotion] - 1
        s += PIECE_VALUE[mover] * board.is_attacked_by(opp, m.from_square)
        s -= PIECE_VALUE[m.promotion or mover] * board.is_attacked_by(opp, m.to_square)
        out.append((m, s))
    return out


def expert_move(board: chess.Board, rho: float, shared: bool, rng: random.Random) -> chess.Move:
    """Expert rho: with probability rho a blunder, else pi0 (uniform over the best-scored moves).
    Blunder: a uniform legal move (independent), or uniform over the worst-scored moves (shared by every expert)."""
    sc = move_scores(board)
    if rng.random() < rho:
        if not shared:
            return rng.choice(sc)[0]
        worst = min(s for _, s in sc)
        return rng.choice([m for m, s in sc if s == worst])
    best = max(s for _, s in sc)
    return rng.choice([m for m, s in sc if s == best])


def adjudicate(board: chess.Board) -> float:
    """White's score: checkmate 1/0, other game ends 0.5; at the cap +-2 material decides, else a draw."""
    if board.is_checkmate():
        return 0.0 if board.turn == chess.WHITE else 1.0
    if board.is_game_over():
        return 0.5
    m = sum(v * (len(board.pieces(p, chess.WHITE)) - len(board.pieces(p, chess.BLACK))) for p, v in PIECE_VALUE.items())
    return 1.0 if m >= 2 else 0.0 if m <= -2 else 0.5


def transcript(sans) -> str:
    """SAN list -> the paper's format: '1.e4 e5 2.Nf3 Nc6' (no space after 'N.', no black numbers, no result)."""
    return " ".join(f"{i // 2 + 1}.{s}" if i % 2 == 0 else s for i, s in enumerate(sans))


def _games_worker(args):
    n, rhos, shared, max_plies, seed = args
    rng, out = random.Random(seed), []
    for _ in range(n):
        i, j = rng.randrange(len(rhos)), rng.randrange(len(rhos))   # white and black: independent uniform experts
        board, sans = chess.Board(), []
        while len(sans) < max_plies and not board.is_game_over():
            m = expert_move(board, rhos[i] if board.turn == chess.WHITE else rhos[j], shared, rng)
            sans.append(board.san(m))
            board.push(m)
        out.append(f"{i},{j},{adjudicate(board)},{transcript(sans)}")
    return out


def _read_games_cache(path, n):
    """The cached lines, or (None, why) when the file is truncated or corrupt."""
    try:
        with open(path) as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        return None, f"unreadable: {e}"
    if len(lines) < 2 or lines[-2] != f"#end {n}":
        return None, "truncated (no end marker)"
    for k, line in enumerate(lines[:-2]):
        f = line.split(",", 3)
        if len(f) != 4 or not (f[0].isdigit() and f[1].isdigit() and f[2] in ("0.0", "0.5", "1.0")) \
                or not set(f[3]) <= set(VOCAB):
            return None, f"line {k + 1} is not 'white,black,score,transcript'"
    return (lines[:-2], None) if len(lines) - 2 == n else (None, f"{len(lines) - 2} games, expected {n}")


def generate_games(n, rhos, seed, workers=1, shared=False, max_plies=60, cache_dir=""):
    """n expert games as lines 'white_expert,black_expert,white_score,transcript', cached in cache_dir.

    One line: '2,4,1.0,1.e4 Nf6 2.Bc4 Nxe4 3.Bxf7+ Kxf7 ...' (White = expert 2, Black = expert 4, White won)."""
    key = hashlib.md5(repr((CACHE_VERSION, n, tuple(rhos), seed, workers, shared, max_plies)).encode()).hexdigest()
    path = os.path.join(cache_dir, f"{NAME}_games_v{CACHE_VERSION}_{key[:12]}.txt") if cache_dir else ""
    if path and os.path.exists(path):
        lines, why = _read_games_cache(path, n)
        if lines is not None:
            return lines
        common.print0(f"warning: games cache {path} is {why}; rebuilding it")
    w = max(1, min(workers, n // 10))
    chunks = [(n // (10 * w) + (i < n % (10 * w)), tuple(rhos), shared, max_plies, seed * 1000 + i)
              for i in range(10 * w)]                                         # 10 chunks per worker for the bar
    bar = common.progress(total=n, desc="expert games")
    lines = []
    with (multiprocessing.Pool(w) if w > 1 else contextlib.nullcontext()) as pool:
        for part in (pool.imap(_games_worker, chunks) if w > 1 else map(_games_worker, chunks)):
            lines += part
            bar.update(len(part))
    bar.close()
    if path:  # a unique temporary file, then an atomic rename: concurrent runs never see half a file
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{NAME}_games.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + f"\n#end {n}\n")
        os.replace(tmp, path)
    return lines


def sample_positions(lines, n, seed):
    """n unfinished positions, uniform over (game, ply): pick a game by its length, replay only its prefix.
    Returns [(board, SAN history)]."""
    rng = random.Random(seed)
    games = [line.split(",", 3)[3].split() for line in lines]
    out = []
    while len(out) < n:
        toks = rng.choices(games, weights=[len(g) for g in games])[0]
        board, sans = chess.Board(), []
        for tok in toks[:rng.randrange(len(toks))]:
            sans.append(tok.split(".")[-1])
            board.push_san(sans[-1])
        if not board.is_game_over():
            out.append((board, sans))
    return out


def pool_tensors(boards, device="cpu"):
    """Per position, every legal move (board.legal_moves order) as 7 small ints -- moved piece, captured piece,
    promotion, from/to square attacked, from/to square (seen from the mover) -- and its reward r = s - max s.
    Returns {'feat': (M, A, 7) long, 'rew': (M, A) float with -inf for padding}."""
    feats, rews = [], []
    for b in boards:
        sc = move_scores(b)
        top = max(s for _, s in sc)
        flip = (lambda q: chess.square_mirror(q)) if b.turn == chess.BLACK else (lambda q: q)
        opp = not b.turn
        feats.append([[b.piece_type_at(m.from_square), (b.piece_type_at(m.to_square) or (1 if b.is_en_passant(m) else 0)),
                       m.promotion or 0, int(b.is_attacked_by(opp, m.from_square)), int(b.is_attacked_by(opp, m.to_square)),
                       flip(m.from_square), flip(m.to_square)] for m, _ in sc])
        rews.append([float(s - top) for _, s in sc])
    pad = lambda rows, v: nn.utils.rnn.pad_sequence([torch.tensor(r) for r in rows], batch_first=True, padding_value=v)
    return {"feat": pad(feats, 0).to(device), "rew": pad(rews, float("-inf")).to(device)}


def blunder_moves(rew, shared):
    """(M, A) bool: the moves a blunder picks from, uniformly: every legal move, or the worst ones (shared)."""
    legal = rew > float("-inf")
    return rew == rew.masked_fill(~legal, float("inf")).min(1, keepdim=True).values if shared else legal


def sample_expert_labels(rew, rhos, shared, B, g):
    """x ~ U(pool), expert i ~ U(k), y ~ f_i(x), batched on rew's device. rew: (M, A), -inf = padding.
    Returns (positions (B,), move slots (B,))."""
    dev = rew.device
    x = torch.randint(0, rew.shape[0], (B,), generator=g, device=dev)
    r = rew[x]                                                                 # (B, A)
    rho = torch.tensor(rhos, device=dev)[torch.randint(0, len(rhos), (B,), generator=g, device=dev)]
    blunder = torch.rand(B, generator=g, device=dev) < rho
    pick = torch.where(blunder[:, None], blunder_moves(r, shared), r == 0).float()   # uniform over the chosen set
    return x, torch.multinomial(pick, 1, generator=g)[:, 0]

# -----------------------------------------------------------------------------
# Model: the pool's move scorer (the transcript GPT is common.GPT, the paper's nanoGPT)


class MoveScorer(nn.Module):
    """Scores each legal move from what a 1-ply player sees; a softmax over the legal moves is the policy.
    forward(feat (B, A, 7) long, legal (B, A) bool) -> log-probabilities (B, A), -inf off the legal moves."""

    def __init__(self, hidden: int = 64, d: int = 16):
        super().__init__()
        self.piece = nn.Embedding(7, d)          # moved / captured / promotion piece type (0 = none)
        self.attacked = nn.Embedding(2, d)       # is the from / to square attacked by the opponent
        self.square = nn.Embedding(64, d)        # from / to square, seen from the side to move
        self.mlp = nn.Sequential(nn.Linear(7 * d, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, 1))

    def forward(self, feat, legal):
        e = torch.cat([self.piece(feat[..., :3]).flatten(-2), self.attacked(feat[..., 3:5]).flatten(-2),
                       self.square(feat[..., 5:]).flatten(-2)], -1)             # (B, A, 7d)
        return F.log_softmax(self.mlp(e)[..., 0].masked_fill(~legal, float("-inf")), -1)


def prefix_for(sans, trailing_space=True) -> str:
    """The prompt before the next move: ';1.e4 e5 2.' (White to move) or ';1.e4 e5 2.Nf3 ' (Black to move).
    trailing_space=False gives the official char-mode prompt on Black's turn (';1.e4 e5 2.Nf3')."""
    t = transcript(sans)
    if len(sans) % 2 == 0:
        return ";" + t + (" " if t else "") + f"{len(sans) // 2 + 1}."
    return ";" + t + (" " if trailing_space else "")


@torch.no_grad()
def score_moves(model: common.GPT, items, chunk=8):
    """Tree scoring: log p(c_j | prefix) for every candidate c_j of every (prefix, [c_1, c_2, ...]) item, in one
    forward per item over 'prefix c_1 c_2 ...': each candidate sees the whole prefix and itself causally, with
    positions restarting at len(prefix). Candidates end in ' ' (O-O is a prefix of O-O-O)."""
    dev = next(model.parameters()).device
    out = []
    for c0 in range(0, len(items), chunk):
        rows = []
        for prefix, cands in items[c0:c0 + chunk]:
            p_ids = TOK.encode(prefix)[-(model.cfg.block_size - max(map(len, cands))):]  # crop from the left
            P = len(p_ids)
            ids, pos, grp, src, cid = list(p_ids), list(range(P)), [0] * P, [], []
            for j, c in enumerate(cands):
                a = len(ids)
                ids += TOK.encode(c)
                pos += range(P, P + len(c))
                grp += [j + 1] * len(c)
                src += [P - 1] + list(range(a, a + len(c) - 1))   # log p(c[t]) is read at the token before it
                cid += [j] * len(c)
            rows.append((ids, pos, grp, src, cid, len(cands)))
        pad = lambda j, v: nn.utils.rnn.pad_sequence([torch.tensor(r[j]) for r in rows], batch_first=True, padding_value=v)
        idx, pos, grp = pad(0, 0), pad(1, 0), pad(2, -1)                                  # (B, L), right-padded
        L, ar = idx.shape[1], torch.arange(idx.shape[1])
        same = (grp[:, None, :] == 0) | (grp[:, None, :] == grp[:, :, None])              # (B, L, L)
        allowed = (ar[None, :] <= ar[:, None]) & same & (grp[:, :, None] >= 0)
        allowed = allowed | ((grp[:, :, None] < 0) & torch.eye(L, dtype=torch.bool))       # pad rows: self only
        with common.autocast(dev):
            logits = model(idx.to(dev), pos=pos.to(dev), attn_mask=allowed.to(dev))[0]
        logp = F.log_softmax(logits.float(), -1).cpu()
        for b, (ids, _, _, src, cid, n) in enumerate(rows):
            lp = logp[b, torch.tensor(src), torch.tensor(ids[len(ids) - len(src):])]
            out.append(torch.zeros(n).index_add_(0, torch.tensor(cid), lp))
    return out


@torch.no_grad()
def generate_replies(model: common.GPT, prompts, tau, g, n_new=10):
    """The official sampler, batched: n_new chars per prompt at per-char temperature tau (<= 1e-3: greedy).
    Rows are right-padded; each reads its logits at its own last char (causal: the padding after it is unseen)."""
    dev = next(model.parameters()).device
    ids = [TOK.encode(p)[-(model.cfg.block_size - n_new):] for p in prompts]
    n = torch.tensor([len(i) for i in ids], device=dev)
    buf = torch.zeros(len(ids), int(n.max()) + n_new, dtype=torch.long, device=dev)
    for b, i in enumerate(ids):
        buf[b, :len(i)] = torch.tensor(i)
    rows = torch.arange(len(ids), device=dev)
    for _ in range(n_new):
        with common.autocast(dev):
            logits = model(buf[:, :int(n.max())])[0][rows, n - 1].float()  # (B, V)
        buf[rows, n] = common.sample_logits(logits, tau, tau <= 1e-3, g)
        n = n + 1
    return [TOK.decode(buf[b, len(i):len(i) + n_new]) for b, i in enumerate(ids)]


def parse_reply(board: chess.Board, reply: str):
    """Cut at ';' and '+', take the first whitespace token, parse it as SAN: a legal Move or None."""
    tok = reply.split(";")[0].split("+")[0].split()
    try:
        return board.parse_san(tok[0])
    except (IndexError, ValueError):
        return None


def char_moves(model, boards, histories, tau, g, tries=5):
    """The official char-mode player for many positions at once: up to `tries` generations per position.
    Returns (moves, with None where every try was illegal (a forfeit), number of tries, number illegal)."""
    moves, todo, n_try, n_bad = [None] * len(boards), list(range(len(boards))), 0, 0
    for _ in range(tries):
        if not todo:
            break
        replies = generate_replies(model, [prefix_for(histories[i], trailing_space=False) for i in todo], tau, g)
        n_try += len(todo)
        for i, rep in zip(todo, replies):
            moves[i] = parse_reply(boards[i], rep)
        todo = [i for i in todo if moves[i] is None]
        n_bad += len(todo)
    return moves, n_try, n_bad

# -----------------------------------------------------------------------------
# Training loops: the pool's move scorer and the transcript GPT


def train_move_scorer(cfg, pool, shared, seed):
    """Cross-entropy on the experts' labels: x ~ U(pool), i ~ U(k), y ~ f_i(x) (the paper's data process)."""
    dev = pool["rew"].device
    torch.manual_seed(seed)
    model = MoveScorer(cfg.pool_hidden).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pool_lr, weight_decay=0.0)
    g = torch.Generator(device=dev).manual_seed(seed)
    legal = pool["rew"] > float("-inf")
    for step in range(cfg.pool_steps):
        for group in opt.param_groups:
            group["lr"] = common.lr_at(step, cfg.pool_steps, cfg.pool_lr, max(1, cfg.pool_steps // 20))
        x, y = sample_expert_labels(pool["rew"], cfg.rhos, shared, cfg.pool_batch, g)
        logp = model(pool["feat"][x], legal[x])                                   # (B, A)
        loss = -logp.gather(1, y[:, None]).mean()                                 # imitate the mixture
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval(), loss.item()


def train_gpt(model, cfg, get_batch, desc="transcript GPT"):
    """AdamW, warmup + cosine; the global batch is split over torchrun ranks (token-weighted loss)."""
    device = torch.device(cfg.device)
    opt = common.configure_adamw(model, cfg.lr, cfg.weight_decay)
    fwd = common.wrap_ddp(model, device)
    fwd = torch.compile(fwd) if cfg.compile else fwd
    hist, t0 = {"step": [], "loss": []}, time.time()
    bar = common.progress(range(cfg.steps), desc)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = common.lr_at(step, cfg.steps, cfg.lr, cfg.warmup)
        x, y = common.shard(*get_batch(step))                 # this rank's rows of the global batch
        with common.autocast(device):
            logits = fwd(x)[0]
        loss = common.token_mean(*common.cross_entropy_sum(logits, y))   # next-character cross-entropy
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            hist["step"].append(step)
            hist["loss"].append(common.global_mean(loss))
            bar.set_postfix_str(common.step_log(step + 1, cfg.steps, t0, loss=hist["loss"][-1]))
    return hist

# -----------------------------------------------------------------------------
# Evaluation: rewards, players, games, Glicko-2


def expert_rewards(rew, rhos, shared):
    """Closed-form R(f_rho) on positions rew (M, A) (-inf = padding): pi0 gets 0, so R = rho * E_x[mean r of a
    blunder], where a blunder is uniform over the legal moves (independent) or over the worst ones (shared)."""
    blunder = blunder_moves(rew, shared).float()
    per_x = (rew.masked_fill(rew == float("-inf"), 0.0) * blunder).sum(1) / blunder.sum(1)   # mean r of a blunder
    return [rho * float(per_x.mean()) for rho in rhos]


def policy_reward(logp, rew, tau):
    """R(f_tau) = mean_x sum_y f_tau(y|x) r(x, y), exact (no sampling); logp, rew: (M, A), -inf = padding."""
    return float((temper(logp, tau) * rew.masked_fill(rew == float("-inf"), 0.0)).sum(1).mean())


class ExpertPlayer:
    def __init__(self, rho, shared=False, seed=0):
        self.rho, self.shared, self.rng = rho, shared, random.Random(seed)

    def choose(self, boards, histories):
        return [expert_move(b, self.rho, self.shared, self.rng) for b in boards]


class Rung:
    """A fixed opponent: a uniform random legal move with probability eps, else Stockfish (skill 0, depth 1),
    or pi0 when no engine is given (the built-in ladder). Engine moves run on the engine processes in parallel."""

    def __init__(self, eps, engines=None, seed=0):
        self.eps, self.engines, self.rng = eps, engines or [], random.Random(seed)

    def choose(self, boards, histories):
        rand = [self.rng.random() < self.eps for _ in boards]
        out = [self.rng.choice(list(b.legal_moves)) if r else None for b, r in zip(boards, rand)]
        todo = [i for i, r in enumerate(rand) if not r]
        if not self.engines:
            for i in todo:
                out[i] = expert_move(boards[i], 0.0, False, self.rng)
            return out
        def play(k):   # engine k plays positions k, k + E, ...
            return [(i, self.engines[k].play(boards[i], chess.engine.Limit(depth=1)).move)
                    for i in todo[k::len(self.engines)]]
        with concurrent.futures.ThreadPoolExecutor(len(self.engines)) as ex:
            for part in ex.map(play, range(len(self.engines))):
                for i, m in part:
                    out[i] = m
        return out


class ModelPlayer:
    """mode='char': the official player (char_moves: 5 tries, else None = forfeit). mode='legal': sample from
    softmax(log p(move) / tau) over the legal moves, tree-scored (it cannot forfeit)."""

    def __init__(self, model, tau, mode="char", seed=0, chunk=8):
        self.model, self.tau, self.mode, self.chunk = model, tau, mode, chunk
        self.g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
        self.cpu_g = torch.Generator().manual_seed(seed)
        self.tries = self.illegal = 0

    def choose(self, boards, histories):
        if self.mode == "char":
            moves, n_try, n_bad = char_moves(self.model, boards, histories, self.tau, self.g)
            self.tries, self.illegal = self.tries + n_try, self.illegal + n_bad
            return moves
        legal = [list(b.legal_moves) for b in boards]
        items = [(prefix_for(h), [b.san(m) + " " for m in ms]) for b, h, ms in zip(boards, histories, legal)]
        return [ms[int(torch.multinomial(temper(lp, self.tau), 1, generator=self.cpu_g))]
                for ms, lp in zip(legal, score_moves(self.model, items, self.chunk))]


def play_games(player, rungs, n, max_plies, desc="games"):
    """n games against each rung, the player White in even games, all games batched ply by ply.
    Returns [(rung index, the player's score)]: 1 / 0.5 / 0 by adjudicate; a forfeit (None move) is a loss."""
    G = n * len(rungs)
    boards, hist, forfeit = [chess.Board() for _ in range(G)], [[] for _ in range(G)], [False] * G
    for ply in common.progress(range(max_plies), desc):
        live = [i for i in range(G) if not forfeit[i] and not boards[i].is_game_over()]
        if not live:
            break
        mine = [i for i in live if (i % 2 == 0) == (ply % 2 == 0)]
        groups = [(player, mine)] + [(r, [i for i in live if i not in set(mine) and i // n == k])
                                     for k, r in enumerate(rungs)]
        for who, idx in groups:
            if idx:
                for i, m in zip(idx, who.choose([boards[i] for i in idx], [hist[i] for i in idx])):
                    if m is None:
                        forfeit[i] = True
                    else:
                        hist[i].append(boards[i].san(m))
                        boards[i].push(m)
    return [(i // n, 0.0 if forfeit[i] else adjudicate(b) if i % 2 == 0 else 1.0 - adjudicate(b))
            for i, b in enumerate(boards)]


def glicko2_update(r, rd, sigma, games, tau=0.5, eps=1e-6, scale=173.7178):
    """One Glicko-2 rating period (Glickman 2012). games: [(opponent rating, opponent RD, score 1/0.5/0)].
    Returns the new (rating, RD, volatility)."""
    mu, phi = (r - 1500) / scale, rd / scale
    if not games:
        return r, math.sqrt(phi ** 2 + sigma ** 2) * scale, sigma
    v_inv = delta_sum = 0.0
    for rj, rdj, s in games:
        muj, phij = (rj - 1500) / scale, rdj / scale
        gj = 1 / math.sqrt(1 + 3 * phij ** 2 / math.pi ** 2)              # g(phi_j)
        E = 1 / (1 + math.exp(-gj * (mu - muj)))                           # expected score
        v_inv += gj ** 2 * E * (1 - E)
        delta_sum += gj * (s - E)
    v, a = 1 / v_inv, math.log(sigma ** 2)
    delta = v * delta_sum

    def f(x):
        ex = math.exp(x)
        return ex * (delta ** 2 - phi ** 2 - v - ex) / (2 * (phi ** 2 + v + ex) ** 2) - (x - a) / tau ** 2

    A = a                                                                  # Illinois iteration for ln sigma'^2
    if delta ** 2 > phi ** 2 + v:
        B = math.log(delta ** 2 - phi ** 2 - v)
    else:
        k = 1
        while f(a - k * tau) < 0:
            k += 1
        B = a - k * tau
    fA, fB = f(A), f(B)
    while abs(B - A) > eps:
        C = A + (A - B) * fA / (fB - fA)
        fC = f(C)
        if fC * fB <= 0:
            A, fA = B, fB
        else:
            fA /= 2
        B, fB = C, fC
    sigma_new = math.exp(A / 2)
    phi_new = 1 / math.sqrt(1 / (phi ** 2 + sigma_new ** 2) + 1 / v)
    return 1500 + scale * (mu + phi_new ** 2 * delta_sum), scale * phi_new, sigma_new


def rate_sequential(results, prior=(1500.0, 500.0, 0.06), tau=0.5):
    """The paper's protocol: one game per rating period from the prior (1500, RD 500, 0.06).
    results: [(opponent rating, opponent RD, score)]. Returns (rating, RD)."""
    r, rd, sig = prior
    for game in results:
        r, rd, sig = glicko2_update(r, rd, sig, [game], tau)
    return r, rd


@contextlib.contextmanager
def open_engines(path, n):
    """n Stockfish processes at skill 0, one thread each (an empty list for path 'none')."""
    engines = []
    try:
        for _ in range(n if path != "none" else 0):
            engines.append(chess.engine.SimpleEngine.popen_uci(path))
            engines[-1].configure({"Threads": 1, "Hash": 16, "Skill Level": 0})
        yield engines
    finally:
        for e in engines:
            e.quit()

# -----------------------------------------------------------------------------
# Experiments (one per claim)


def exp_toy(cfg) -> dict:
    """Appendix C and Fig. 7: gain at low tau over the best expert, none at tau = 1, none for identical experts."""
    m = {"toy3/reward/tau0.1": toy_three_actions(0.1)["reward_tempered"]}
    runs = [(s, 0.0) for s in cfg.toy_sigmas if s != cfg.toy_sigma] + [(cfg.toy_sigma, 0.0), (cfg.toy_sigma, cfg.toy_corr)]
    for s, c in common.progress(runs, "linear toy"):
        r = toy_linear(cfg.toy_d, cfg.toy_classes, cfg.toy_experts, cfg.toy_n, s, c, cfg.toy_steps, cfg.toy_lr,
                       cfg.taus, cfg.seed, cfg.toy_test)
        tag = f"sigma{s:g}" + (f"_corr{c:g}" if c else "")
        m.update({common.mkey("toy_acc", tag, k): v for k, v in r.items()})
        m[common.mkey("toy_gain", tag)] = r[f"tau{min(cfg.taus):g}"] - r["best_expert"]
    return m


def exp_pool(cfg, train_lines, test_lines) -> dict:
    """Def. 1 on chess positions: the move scorer learns the experts' mixture on training positions and is scored
    exactly on held-out ones; independent blunders are voted away at low tau, shared ones are not."""
    dev = torch.device(cfg.device)
    train = pool_tensors([b for b, _ in sample_positions(train_lines, cfg.pool_train, cfg.seed + 1)], dev)
    test = pool_tensors([b for b, _ in sample_positions(test_lines, cfg.pool_test, cfg.seed + 2)], dev)
    m = {}
    for shared in common.progress((False, True), "position pool"):
        tag = "shared" if shared else "independent"
        model, loss = train_move_scorer(cfg, train, shared, cfg.seed + 3)
        with torch.no_grad():
            logp = model(test["feat"], test["rew"] > float("-inf"))
        experts = expert_rewards(test["rew"], cfg.rhos, shared)
        m.update({common.mkey("pool_reward", tag, f"expert_rho{rho:g}"): e for rho, e in zip(cfg.rhos, experts)})
        m[common.mkey("pool_reward", tag, "best_expert")] = max(experts)
        m[common.mkey("pool_reward", tag, "mixture")] = sum(experts) / len(experts)
        m.update({common.mkey("pool_reward", tag, f"tau{t:g}"): policy_reward(logp, test["rew"], t) for t in cfg.taus})
        m[common.mkey("pool_gain", tag)] = m[common.mkey("pool_reward", tag, f"tau{min(cfg.taus):g}")] - max(experts)
        m[common.mkey("pool_loss", tag)] = loss
    return m


def exp_transcripts(cfg, train_lines, test_lines):
    """Train the transcript GPT on the experts' games; held-out legal-move rate and position reward vs tau."""
    device = torch.device(cfg.device)
    corpus = "".join(";" + line.split(",", 3)[3] for line in train_lines)
    ids = torch.tensor(TOK.encode(corpus))
    starts = (ids == TOK[";"]).nonzero()[:, 0]
    starts = starts[starts + cfg.block_size + 1 <= len(ids)]          # every block starts at a game's ';'
    torch.manual_seed(cfg.seed)
    model = common.GPT(common.GPTConfig(vocab_size=len(VOCAB), block_size=cfg.block_size, n_layer=cfg.n_layer,
                                        n_head=cfg.n_head, n_embd=cfg.n_embd, pos="learned")).to(device)
    g = torch.Generator().manual_seed(cfg.seed + 11)

    def get_batch(step):   # (B, T) chars and their next chars, a block running on through the following games
        blk = ids[starts[torch.randint(0, len(starts), (cfg.batch_size,), generator=g)][:, None]
                  + torch.arange(cfg.block_size + 1)]
        return blk[:, :-1].to(device), blk[:, 1:].to(device)

    hist = train_gpt(model, cfg, get_batch)
    m = {"gpt/loss": hist["loss"][-1]}
    if not common.is_main():
        return m, model.eval(), hist
    model.eval()
    pos = sample_positions(test_lines, cfg.eval_positions, cfg.seed + 21)
    boards, hists = [b for b, _ in pos], [h for _, h in pos]
    rew = pool_tensors(boards)["rew"]
    items = [(prefix_for(h), [b.san(mv) + " " for mv in b.legal_moves]) for b, h in pos]
    logp = nn.utils.rnn.pad_sequence(score_moves(model, items, cfg.score_chunk), batch_first=True,
                                     padding_value=float("-inf"))                     # (M, A) like rew
    shared = cfg.diversity == "shared"
    m.update({common.mkey("chess_reward", "expert", f"rho{rho:g}"): e
              for rho, e in zip(cfg.rhos, expert_rewards(rew, cfg.rhos, shared))})
    m["chess_reward/random"] = expert_rewards(rew, [1.0], False)[0]
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 22)
    for t in common.progress(cfg.taus, "legal-move rate"):
        m[common.mkey("chess_reward", "model", f"tau{t:g}")] = policy_reward(logp, rew, t)
        for name, tries in (("first_try", 1), ("five_tries", 5)):
            moves = char_moves(model, boards, hists, t, gen, tries=tries)[0]
            m[common.mkey("legal_rate", name, f"tau{t:g}")] = sum(x is not None for x in moves) / len(pos)
    return m, model, hist


def exp_games(cfg, model) -> tuple[dict, dict]:
    """Rated games (the paper's Fig. 1): every expert and the model at each tau and mode play each rung;
    Glicko-2 from the prior (1500, 500, 0.06), one game per period, in a fixed shuffled order."""
    m, shared = {}, cfg.diversity == "shared"
    with open_engines(cfg.stockfish, cfg.engines) as engines:
        rungs = [Rung(e, engines, cfg.seed + 30 + k) for k, e in enumerate(cfg.sf_eps)]
        ladder = [(cfg.anchor_rating, 0.0)]                      # the anchor rung's rating is fixed
        for k in range(1, len(rungs)):                           # each next rung is rated against the one before
            res = play_games(rungs[k], [rungs[k - 1]], cfg.calib_games, cfg.max_plies, f"calibrate rung {k}")
            ladder.append(rate_sequential([(*ladder[k - 1], s) for _, s in res]))
        m.update({common.mkey("rating", "rung", f"eps{e:g}"): r for (r, _), e in zip(ladder, cfg.sf_eps)})

        def rate(player, n, key):
            res = [(*ladder[k], s) for k, s in play_games(player, rungs, n, cfg.max_plies, key)]
            random.Random(cfg.seed).shuffle(res)                 # fixed game order (sequential Glicko)
            m[common.mkey("rating", key)], m[common.mkey("rating_rd", key)] = rate_sequential(res)
            m[common.mkey("score", key)] = sum(s for *_, s in res) / len(res)

        for i, rho in enumerate(cfg.rhos):
            rate(ExpertPlayer(rho, shared, cfg.seed + 40 + i), cfg.expert_games, f"expert/rho{rho:g}")
        m["rating/best_expert"] = max(m[common.mkey("rating", f"expert/rho{rho:g}")] for rho in cfg.rhos)
        for mode in cfg.game_modes:
            for t in cfg.game_taus:
                p, key = ModelPlayer(model, t, mode, cfg.seed + 50, cfg.score_chunk), f"model_{mode}/tau{t:g}"
                rate(p, cfg.games, key)
                m[common.mkey("rating_gain", key)] = m[common.mkey("rating", key)] - m["rating/best_expert"]
                if mode == "char":
                    m[common.mkey("illegal_try_rate", key)] = p.illegal / max(1, p.tries)
        info = {"engine": engine_name(cfg.stockfish) if engines else "none (built-in rungs: pi0 instead of Stockfish)",
                "engine_seeding": ENGINE_NOTE if engines else "built-in rungs are seeded"}
    return m, info

# -----------------------------------------------------------------------------
# Main


def run_seed(cfg):
    parts, m, info, curves = cfg.parts.split(","), {}, {}, {}
    stages = common.Stages({"toy": 1, "games data": 1, "pool": 1, "transcript GPT": 3, "rated games": 2})
    if "toy" in parts and common.is_main():
        with stages("toy"):
            m.update(exp_toy(cfg))
    lines, split = [], 0
    if "pool" in parts or "chess" in parts:
        with stages("games data"):
            lines = generate_games(cfg.n_games, cfg.rhos, cfg.seed, cfg.workers, cfg.diversity == "shared",
                                   cfg.max_plies, cache_dir=cfg.out)
            split = max(2, len(lines) // 20)                                   # 5% of the games held out
    if "pool" in parts and common.is_main():
        with stages("pool"):
            m.update(exp_pool(cfg, lines[split:], lines[:split]))
    if "chess" in parts:
        with stages("transcript GPT"):
            res, model, hist = exp_transcripts(cfg, lines[split:], lines[:split])
            m.update(res)
            curves["gpt_loss"] = (hist["step"], hist["loss"])
        if common.is_main():
            common.save_results(NAME, cfg, m, partial=True)                    # Ctrl-C keeps the stages done
            with stages("rated games"):
                res, info = exp_games(cfg, model)
                m.update(res)
    return m, {"curves": curves, "info": info}


def run(cfg):
    t0 = time.time()
    runs = common.over_seeds(cfg, run_seed, NAME)
    c, tl, extra = runs.cell, f"tau{min(cfg.taus):g}", runs.extras[0]
    toy, corr = f"toy_acc/sigma{cfg.toy_sigma:g}", f"toy_acc/sigma{cfg.toy_sigma:g}_corr{cfg.toy_corr:g}"
    rows = [("toy3/reward/tau0.1", "linear toy (Fig. 7), accuracy", f"sigma={cfg.toy_sigma:g}", toy, toy + "/best_expert"),
            ("toy3/reward/tau0.1", "  identical experts (ablation)", f"corr={cfg.toy_corr:g}", corr, corr + "/best_expert"),
            *[(f"pool_reward/{t}/best_expert", "position pool, held-out reward", f"{t} blunders", f"pool_reward/{t}",
               f"pool_reward/{t}/best_expert") for t in ("independent", "shared")],
            ("chess_reward/random", "transcript GPT, held-out reward", f"loss {c('gpt/loss')}", "chess_reward/model",
             f"chess_reward/expert/rho{min(cfg.rhos):g}"),
            ("chess_reward/random", "  legal move, 1st try (char)", f"random {c('chess_reward/random')}",
             "legal_rate/first_try", None)]                            # (shown if, label, setting, prefix, best)
    common.print_table([[lab, setting, c(best), c(f"{pre}/tau1"), c(f"{pre}/{tl}")]
                        for key, lab, setting, pre, best in rows if key in runs.mean],
                       ["experiment", "setting", "best expert", "model tau=1", f"model tau={min(cfg.taus):g}"],
                       title=f"Transcendence: model vs best expert ({len(runs.seeds)} seed(s); higher is better)")
    if "rating/best_expert" in runs.mean:
        rows = [(f"expert rho={r:g}", f"expert/rho{r:g}", "") for r in cfg.rhos]
        rows += [(f"model {md} tau={t:g}", f"model_{md}/tau{t:g}", f"{PAPER_GAIN[t]:+d}" if t in PAPER_GAIN and md == "char"
                  else "") for md in cfg.game_modes for t in cfg.game_taus]
        common.print_table([[lab, c(f"rating/{k}"), c(f"rating_rd/{k}"), c(f"score/{k}"),
                             c(f"rating_gain/{k}") if k.startswith("model") else "", paper] for lab, k, paper in rows],
                           ["player", "Glicko-2 R", "RD (R +- 2RD)", "mean score", "R - best expert",
                            "paper: CF-1000 - data cap"],
                           title=f"Rated games vs rungs eps={','.join(f'{e:g}' for e in cfg.sf_eps)} (anchor eps="
                                 f"{cfg.sf_eps[0]:g} := {cfg.anchor_rating:g}); data: diversity={cfg.diversity}")
        common.print0(f"opponent engine: {extra['info'].get('engine')}. {extra['info'].get('engine_seeding')}.")
    info = {"diversity": cfg.diversity, **extra["info"],
            "paper_gain_cf1000_minus_cap": {f"tau{t:g}": v for t, v in PAPER_GAIN.items()}}
    common.save_results(NAME, cfg, runs, info=info, history={k: list(v) for k, v in extra["curves"].items()},
                        wall_time_s=time.time() - t0)
    if "pool_reward/independent/best_expert" in runs.mean:
        mean = runs.mean
        gain = {f"{g} blunders": (list(cfg.taus), [mean[f"pool_reward/{g}/tau{t:g}"] - mean[f"pool_reward/{g}/best_expert"]
                                                   for t in cfg.taus]) for g in ("independent", "shared")}
        common.plot(NAME, gain, out_dir=cfg.out, xlabel="temperature tau", ylabel="model reward - best expert", logx=True,
                    title="Position pool (held out): transcendence at low tau", hline=0.0)
    common.print0(f"wall time {time.time() - t0:.1f} s")
    return runs


def main():
    cfg = common.parse_args(Config, PRESETS)
    with common.session(cfg):
        run(cfg)


if __name__ == "__main__":
    main()
