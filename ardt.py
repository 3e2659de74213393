"""
On the Power of Decision Trees in Auto-Regressive Language Modeling
Gan, Galanti, Poggio, Malach. NeurIPS 2024. arXiv:2409.19150. Official code: none published.

Finding: a decision tree that reads the last L tokens and predicts the next one (an ARDT) writes text;
with chain-of-thought (CoT) a tree of fixed size simulates an automaton at every input length, while a
plain tree needs size growing with the length; trees on transformer features are claimed to reason.
Measured (quick, 3 seeds, 337 s/seed, 1 CPU thread): at 116k params next-token acc ARDT 0.868 vs GPT 0.886,
grammatical 1.000 vs 0.997, consistent stories 0.04 vs 0.98; parity T=64: CoT tree 4 leaves, acc 1.000 vs
plain tree 1568 leaves, 0.486; reasoning NOT reproduced: tree on TF features 0.842 vs on Lin 0.885.

    python ardt.py --preset smoke        # seconds (pytest);  python ardt.py: quick on CPU, full on CUDA
    python ardt.py --seeds 3             # mean +- std over seeds 0, 1, 2
    python ardt.py --data TinyStories-valid.txt --parts text   # a real text file: LM metrics + samples
    torchrun --standalone --nproc_per_node=2 ardt.py --preset smoke --device cpu   # the GPTs train DDP

Glossary (ours -> paper):
    K, L          |D| the vocabulary, L the context window      E = ppmi_svd()  Psi, the word embedding
    avg:L         the paper's weighted average of the window's embeddings (weights gamma^age)
    onehot:L      the theory's concatenated one-hot window: a node asks "is slot j == word w?"
    DecisionTree  one tree T: R^{L d} -> D (paper: XGBoost)   cot_rollout  x_{n+1} = T(x_{n-L+1..n})
    d16/d32/d64   the GPT of that width, and the ARDTs given as many parameters as it has
Does not include: TinyStories and GPT-4 grading (an exactly checkable story grammar replaces both;
--data reads a real file), XGBoost and Word2Vec (a numpy CART and PPMI-SVD stand in), GPT-2 (a tiny
GPT pretrained on unlabelled task-style text stands in), the k-sparse-circuit construction, the
paper's Table 1/2 numbers (not verified: only its claims are quoted).
"""
from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass

import common  # first: it reports a missing package in one line

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

NAME = "ardt"
FEATS = ("avg", "onehot")

# -----------------------------------------------------------------------------
# Config


@dataclass
class Config(common.BaseConfig):
    parts: tuple[str, ...] = ("text", "automata", "reason")  # experiments: text | automata | reason
    data: str = ""              # a UTF-8 text file (<|endoftext|> or blank-line separated); "" = story grammar
    vocab: int = 2000           # --data: most frequent words kept, the rest become <unk>
    max_len: int = 95           # --data: tokens kept per document
    n_train: int = 1000         # training stories
    n_test: int = 200           # held-out stories (none occurs in the training set) for next-token metrics
    n_gen: int = 100            # held-out prompts (a story's first sentence) for greedy generation
    ardt: tuple[str, ...] = ("avg:8", "onehot:32")  # ARDT families as featurizer:window, featurizer avg | onehot
    widths: tuple[int, ...] = (16, 32, 64)  # GPT widths; every ARDT family is also fitted at each GPT's
    # parameter count (leaf budget = params / (K + 2): a leaf stores K probabilities, a node 2 numbers)
    gamma: float = 0.5          # avg: weight gamma^age of a token `age` steps back (1 = uniform mean)
    emb_dim: int = 16           # d of the PPMI-SVD word embedding
    n_bins: int = 64            # quantile bins per real feature
    learner: str = "cart"       # cart | forest (bagged trees; the leaf budget is shared by the trees)
    n_trees: int = 8            # forest size
    max_depth: int = 40         # tree depth limit
    min_leaf: int = 2           # fewest training rows in a leaf
    n_layer: int = 2            # GPT: layers
    n_head: int = 4             # GPT: heads (must divide every width)
    steps: int = 1500           # GPT: AdamW steps
    batch_size: int = 32        # GPT: global batch in stories (split over torchrun processes)
    lr: float = 3e-3            # GPT: peak learning rate (warmup, cosine decay)
    warmup: int = 100           # GPT: warmup steps
    weight_decay: float = 0.1   # GPT: AdamW decay on matrices
    grad_clip: float = 1.0      # GPT: gradient norm clip
    log_every: int = 50         # GPT: loss logged every this many steps
    aut_lens: tuple[int, ...] = (4, 8, 12, 16, 24, 32, 64)  # parity input lengths T (CoT context T + 1)
    aut_n_train: int = 200      # CoT training sequences per T (lengths 1..T); the plain tree gets as many rows
    aut_bias: float = 0.25      # P(bit = 1) in the CoT tree's training inputs (tests use 0.5): below 0.5 the
    # previous state alone says something about the next, which greedy splits need (parity is XOR)
    aut_n_test: int = 500       # test inputs per T
    tm_cells: int = 12          # Turing machine tape length M (hand-built CoT tree)
    tm_steps: int = 60          # Turing machine steps simulated through CoT
    reason_train: int = 500     # labelled examples per task, the same for both trees
    reason_test: int = 1000     # test prompts per task
    reason_corpus: int = 20000  # unlabelled prompts per task for the feature GPT (2..8 operands / people)
    reason_steps: int = 2000    # feature GPT: LM steps (batch 64)
    reason_width: int = 64      # feature GPT: width
    reason_trees: int = 20      # reasoning forests: trees
    reason_depth: int = 8       # reasoning forests: depth

    POSITIVE = ("vocab", "max_len", "n_train", "n_test", "n_gen", "widths", "emb_dim", "n_trees", "max_depth",
                "min_leaf", "n_layer", "n_head", "steps", "log_every", "aut_lens", "aut_n_train", "aut_n_test",
                "tm_steps", "reason_train", "reason_test", "reason_corpus", "reason_steps", "reason_width",
                "reason_trees", "reason_depth")
    GLOBAL_BATCH = ("batch_size",)

    def __post_init__(self):
        self.parts, self.ardt = tuple(self.parts), tuple(self.ardt)
        self.widths, self.aut_lens = tuple(self.widths), tuple(self.aut_lens)
        for p in self.parts:
            if p not in ("text", "automata", "reason"):
                raise ValueError(f"--parts: unknown part '{p}' (choose text, automata, reason)")
        for s in self.ardt:
            kind, _, L = s.partition(":")
            if kind not in FEATS or not L.isdigit() or int(L) < 1:
                raise ValueError(f"--ardt: bad entry '{s}' (want kind:window, kind in {', '.join(FEATS)})")
        if self.learner not in ("cart", "forest"):
            raise ValueError(f"--learner: unknown learner '{self.learner}' (cart | forest)")
        if self.n_gen > self.n_test:
            raise ValueError(f"--n-gen {self.n_gen} > --n-test {self.n_test}")
        if self.n_head > 0 and any(w % self.n_head for w in self.widths + (self.reason_width,)):
            raise ValueError(f"--n-head {self.n_head} must divide every width ({self.widths}, {self.reason_width})")
        if not 0 < self.gamma <= 1 or not 0 < self.aut_bias < 1 or self.n_bins < 2 or self.tm_cells < 3:
            raise ValueError("need 0 < --gamma <= 1, 0 < --aut-bias < 1, --n-bins >= 2, --tm-cells >= 3")
        if self.data and self.vocab > 0 and self.max_len > 0:
            load_text(self.data, self.vocab, self.max_len)          # a file that exists and parses, or an error


PRESETS = {
    "smoke": dict(n_train=60, n_test=20, n_gen=10, ardt=("avg:8", "onehot:8"), widths=(16,), steps=60,
                  batch_size=16, warmup=10, aut_lens=(4, 16), aut_n_train=50, aut_n_test=100, tm_cells=8,
                  tm_steps=8, reason_train=200, reason_test=200, reason_corpus=500, reason_steps=40,
                  reason_width=32, reason_trees=5),
    "quick": dict(),
    "full": dict(n_train=4000, n_test=1000, n_gen=300, widths=(32, 64, 128), n_layer=4, steps=4000,
                 batch_size=64, lr=2e-3, aut_lens=(4, 8, 12, 16, 24, 32, 64, 128, 256), aut_n_train=500,
                 tm_cells=24, tm_steps=200, reason_corpus=100000, reason_steps=6000, reason_width=128),
}

# -----------------------------------------------------------------------------
# Data 1: the story grammar (stands in for TinyStories; every sentence is checkable exactly)

NAMES = ["tom", "max", "ben", "sam", "leo", "jack", "lily", "mia", "sue", "anna", "emma", "zoe"]  # 6 m, 6 f
ANIMALS = ["dog", "cat", "bird", "fox", "owl", "frog", "bear", "duck", "ant", "elephant"]
ADJS = ["little", "big", "small", "old", "kind", "brave", "funny"]
COLORS = ["red", "blue", "green", "yellow", "orange", "pink"]
TOYS = ["ball", "kite", "car", "doll", "boat", "drum", "umbrella"]
PLACES = ["park", "garden", "forest", "river", "beach"]
NEGS = ["sad", "scared", "hungry", "lonely", "tired"]
SLOT_WORDS = dict(NAME=NAMES, ANIMAL=ANIMALS, ANIMAL2=ANIMALS, ADJ=ADJS, ADJ2=ADJS, COLOR=COLORS, TOY=TOYS,
                  PLACE=PLACES, NEG=NEGS, SUBJ=["he", "she"], POSS=["his", "her"], ART=["a", "an"], ART2=["a", "an"])
# (name, template, when): when = always | c1 | !c1 | c2 | c3 | !c3 (three fair coins per story)
TEMPLATES = [
    ("intro", "once upon a time , there was ART ADJ ANIMAL named NAME .", "always"),
    ("like", "NAME liked to play with POSS COLOR TOY .", "always"),
    ("took", "every day , SUBJ took the TOY to the PLACE .", "c1"),
    ("went", "one day , SUBJ went to the PLACE .", "!c1"),
    ("saw", "there , SUBJ saw ART2 ADJ2 ANIMAL2 .", "always"),
    ("neg", "the ANIMAL2 was NEG .", "always"),
    ("asked", "NAME asked the ANIMAL2 what was wrong .", "c2"),
    ("gave", "NAME gave the COLOR TOY to the ANIMAL2 .", "always"),
    ("happy", "the ANIMAL2 was happy and said thank you .", "always"),
    ("friends", "from that day on , NAME and the ANIMAL2 were best friends .", "c3"),
    ("played", "they played in the PLACE all day .", "!c3"),
    ("end", "the end .", "always"),
]


def art(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def story_vocab() -> list:
    words = {w for _, t, _ in TEMPLATES for w in t.split() if w not in SLOT_WORDS}
    words |= {w for ws in SLOT_WORDS.values() for w in ws}
    return ["<pad>", "<bos>"] + sorted(words)


def sample_stories(n: int, g: torch.Generator, stoi: dict) -> tuple:
    """n stories as an (n, Tmax) id tensor right-padded with <pad>, and their lengths. Batched: every slot is
    drawn for all stories at once, each template becomes an (n, len) block, and pack() drops the unused ones.
        once upon a time , there was a brave fox named mia . mia liked to play with her red kite .
        one day , she went to the park . there , she saw an old owl . the owl was sad .
        mia gave the red kite to the owl . the owl was happy and said thank you .
        they played in the park all day . the end ."""
    ids = lambda words: torch.tensor([stoi[w] for w in words])
    r = lambda k: torch.randint(k, (n,), generator=g)
    name, a1, adj1, adj2 = r(len(NAMES)), r(len(ANIMALS)), r(len(ADJS)), r(len(ADJS))
    a2 = (a1 + 1 + r(len(ANIMALS) - 1)) % len(ANIMALS)          # a second animal, never the first
    color, toy, place, neg = r(len(COLORS)), r(len(TOYS)), r(len(PLACES)), r(len(NEGS))
    coins = torch.rand(3, n, generator=g) < 0.5
    fem = (name >= 6).long()
    arts = ids([art(w) for w in ADJS])
    slot = dict(NAME=ids(NAMES)[name], ANIMAL=ids(ANIMALS)[a1], ANIMAL2=ids(ANIMALS)[a2], ADJ=ids(ADJS)[adj1],
                ADJ2=ids(ADJS)[adj2], COLOR=ids(COLORS)[color], TOY=ids(TOYS)[toy], PLACE=ids(PLACES)[place],
                NEG=ids(NEGS)[neg], SUBJ=ids(["he", "she"])[fem], POSS=ids(["his", "her"])[fem],
                ART=arts[adj1], ART2=arts[adj2])
    when = {"always": torch.ones(n, dtype=torch.bool), "c1": coins[0], "!c1": ~coins[0], "c2": coins[1],
            "c3": coins[2], "!c3": ~coins[2]}
    blocks, keep = [], []
    for _, tpl, w in TEMPLATES:
        cols = [slot[t] if t in slot else torch.full((n,), stoi[t]) for t in tpl.split()]
        blocks.append(torch.stack(cols, 1))                                  # (n, len)
        keep.append(when[w][:, None].expand(-1, len(cols)))
    return pack(torch.cat(blocks, 1), torch.cat(keep, 1), stoi["<pad>"])


def pack(blocks: torch.Tensor, keep: torch.Tensor, pad: int) -> tuple:
    """Keep the tokens where `keep`, in order, left-aligned: (n, W) -> (n, max len) padded, lengths."""
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices  # kept tokens first, in order
    lens = keep.sum(1)
    out = blocks.gather(1, order)
    out[torch.arange(out.shape[1])[None, :] >= lens[:, None]] = pad
    return out[:, :int(lens.max())], lens


def unseen(seqs, lens, seen_seqs, seen_lens) -> torch.Tensor:
    """Mask of the rows of (seqs, lens) that occur nowhere in (seen_seqs, seen_lens)."""
    seen = {tuple(s[:n]) for s, n in zip(seen_seqs.tolist(), seen_lens.tolist())}
    return torch.tensor([tuple(s[:n]) not in seen for s, n in zip(seqs.tolist(), lens.tolist())], dtype=torch.bool)


def parse_sentence(words: list):
    """Match one sentence (ending in '.') against the 12 templates: (template name, slot bindings) or None."""
    for name, tpl, _ in TEMPLATES:
        t = tpl.split()
        if len(t) != len(words):
            continue
        bind = {}
        for i, (tw, w) in enumerate(zip(t, words)):
            if tw in SLOT_WORDS:
                if w not in SLOT_WORDS[tw] or (tw.startswith("ART") and w != art(words[i + 1])):
                    break
                bind[tw.rstrip("2")] = w
            elif tw != w:
                break
        else:
            return name, bind
    return None


def split_sentences(words: list) -> list:
    """Split after every '.'; an unfinished tail counts as a (bad) sentence."""
    ends = [i + 1 for i, w in enumerate(words) if w == "."]
    return [words[a:b] for a, b in zip([0] + ends, ends + [len(words)]) if b > a]


def check(words: list) -> tuple:
    """(n_sentences, n_grammatical, consistent). Consistent: one intro and it comes first, every name is the
    introduced one, he/she/his/her agree with its gender, 'the X' names an animal already introduced with
    a/an, the given or carried toy and color are the ones introduced, the story ends with 'the end .'."""
    sents = split_sentences(words)
    parsed = [parse_sentence(s) for s in sents]
    n_gram = sum(p is not None for p in parsed)
    ok = n_gram == len(sents) and len(sents) > 0 and parsed[0][0] == "intro" and parsed[-1][0] == "end"
    if ok:
        hero, animals, toy = parsed[0][1]["NAME"], {parsed[0][1]["ANIMAL"]}, None
        subj, poss = ("she", "her") if NAMES.index(hero) >= 6 else ("he", "his")
        for i, (kind, b) in enumerate(parsed):
            if (kind == "intro") != (i == 0) or b.get("NAME", hero) != hero:
                ok = False
            if b.get("SUBJ", subj) != subj or b.get("POSS", poss) != poss:
                ok = False
            if kind == "like":
                toy = (b["COLOR"], b["TOY"])
            if kind in ("took", "gave") and (toy is None or b["TOY"] != toy[1] or b.get("COLOR", toy[0]) != toy[0]):
                ok = False
            if kind == "saw":
                animals.add(b["ANIMAL"])
            elif "ANIMAL" in b and kind != "intro" and b["ANIMAL"] not in animals:
                ok = False
    return len(sents), n_gram, bool(ok)


def load_text(path: str, vocab: int, max_len: int):
    """--data: documents split on <|endoftext|> (or blank lines), lowercased word tokens, top-`vocab` words."""
    try:
        raw = open(path, encoding="utf-8").read().lower()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--data {path}: cannot read it as UTF-8 text ({e})") from None
    docs = raw.split("<|endoftext|>") if "<|endoftext|>" in raw else re.split(r"\n\s*\n", raw)
    docs = [re.findall(r"[a-z]+|[0-9]+|[^\sa-z0-9]", d)[:max_len] for d in docs]
    docs = [d for d in docs if len(d) > 8]                  # the generation prompt is 8 tokens
    if len(docs) < 4:
        raise ValueError(f"--data {path}: found {len(docs)} documents of more than 8 tokens, need at least 4")
    words, counts = np.unique(np.concatenate(docs), return_counts=True)
    keep = words[np.argsort(-counts, kind="stable")][:vocab]
    itos = ["<pad>", "<bos>", "<unk>"] + sorted(keep.tolist())
    stoi = {w: i for i, w in enumerate(itos)}
    out = nn.utils.rnn.pad_sequence([torch.tensor([stoi.get(w, 2) for w in d]) for d in docs], batch_first=True)
    return out, torch.tensor([len(d) for d in docs]), itos                 # right-padded with <pad> = 0


def story_data(cfg, g) -> dict:
    """Train and held-out test stories (test stories that also occur in the training set are dropped)."""
    if cfg.data:
        seqs, lens, itos = load_text(cfg.data, cfg.vocab, cfg.max_len)
        n_te = max(1, min(cfg.n_test, len(seqs) // 5))
        tr, te = slice(0, min(cfg.n_train, len(seqs) - n_te)), slice(len(seqs) - n_te, len(seqs))
        train, test, P = (seqs[tr], lens[tr]), (seqs[te], lens[te]), 8
    else:
        itos = story_vocab()
        stoi = {w: i for i, w in enumerate(itos)}
        train = sample_stories(cfg.n_train, g, stoi)
        test, P = sample_stories(cfg.n_test + 20, g, stoi), len(TEMPLATES[0][1].split())  # prompt: 1st sentence
    keep = unseen(*test, *train)
    if not keep.any():
        common.die(f"--data {cfg.data}: every held-out document also occurs in the training part")
    test = (test[0][keep][:cfg.n_test], test[1][keep][:cfg.n_test])
    overlap = int((~unseen(*test, *train)).sum())
    return dict(itos=itos, train=train, test=test, P=P, overlap=overlap, dropped=int((~keep).sum()))

# -----------------------------------------------------------------------------
# Data 2: parity through chain-of-thought, and a Turing machine
#
# CoT format for a DFA (Q states, S symbols) and context L = M + 1, inputs of length T <= M:
#     x_1 .. x_T <pad>*(M-T) <sep> q_1 .. q_T          q_t = delta(q_{t-1}, x_t), q_0 = 0
# When the tree predicts q_t, window slot 0 holds x_t and the last slot holds q_{t-1} (or <sep> = q_0):
# two equality tests per step, whatever T is. Tokens: states 0..Q-1, symbols Q..Q+S-1, <sep>, <pad>.
PARITY = np.array([[0, 1], [1, 0]])   # delta[state, symbol]


def run_dfa(delta: np.ndarray, x: np.ndarray) -> np.ndarray:
    """States q_1..q_T of a batch of inputs (B, T) (a loop over time, batched over inputs)."""
    q, out = np.zeros(len(x), np.int64), []
    for t in range(x.shape[1]):
        q = delta[q, x[:, t]]
        out.append(q)
    return np.stack(out, 1)


def cot_sequences(delta, x, lens, M):
    """(B, 2M+1) CoT sequences; inputs x (B, >=max len) in symbol ids, lens (B,) true lengths."""
    Q, S = delta.shape
    sep, pad = Q + S, Q + S + 1
    x = np.pad(x, ((0, 0), (0, M - x.shape[1])))
    valid = np.arange(M)[None, :] < lens[:, None]
    seq = np.full((len(x), 2 * M + 1), pad)
    seq[:, :M] = np.where(valid, Q + x, pad)
    seq[:, M] = sep
    seq[:, M + 1:] = np.where(valid, run_dfa(delta, x), pad)
    return seq


def cot_rows(seq, lens, M):
    """Training rows: the window (M+1 tokens) before each CoT token, and the token. Only t <= T."""
    W = np.lib.stride_tricks.sliding_window_view(seq, M + 1, axis=1)[:, :M]  # (B, M, M+1): W[:, t-1] -> q_t
    valid = np.arange(M)[None, :] < lens[:, None]
    return W[valid], seq[:, M + 1:][valid]


# A small Turing machine: a binary counter. Tape symbols 0, 1, _ ; states I (increment), R (return right).
# CoT = configurations c_0 | c_1 | ... ; a cell is a symbol or a composite (state, symbol) head token.
# Cell i of c_{t+1} depends only on cells i-1, i, i+1 of c_t, which sit M+2, M+1, M tokens back: a tree
# on a window of L = M + 2 tokens reads slots 0, 1, 2 and never needs more, however long it runs.
TM_WRITE = np.array([[1, 0, 1], [0, 1, 2]])   # [state I/R, read 0/1/_] -> written symbol
TM_MOVE = np.array([[1, -1, 1], [1, 1, -1]])  # +1 right, -1 left (clamped at the tape ends)
TM_NEXT = np.array([[1, 0, 1], [1, 1, 0]])    # next state: I=0, R=1
TM_SEP, TM_PAD, TM_K = 9, 10, 11              # tokens: 0,1,_ = 0..2, head(s, a) = 3 + 3s + a


def tm_simulate(tape, head, state, steps):
    """Direct batched simulation; returns the configurations c_1..c_steps as tokens (B, steps, M)."""
    tape, head, state = tape.copy(), head.copy(), state.copy()
    rows, M, out = np.arange(len(tape)), tape.shape[1], []
    for _ in range(steps):
        a = tape[rows, head]
        tape[rows, head] = TM_WRITE[state, a]
        head, state = np.clip(head + TM_MOVE[state, a], 0, M - 1), TM_NEXT[state, a]
        c = tape.copy()
        c[rows, head] = 3 + 3 * state + tape[rows, head]
        out.append(c)
    return np.stack(out, 1)


def tm_local_rule(l, c, r):
    """The new token of a cell from its left, own and right tokens in the previous configuration."""
    if c in (TM_SEP, TM_PAD):
        return c
    if c >= 3:  # the head is here: write, and move unless blocked by the tape's end
        s, a = divmod(c - 3, 3)
        mv = TM_MOVE[s, a]
        if (mv < 0 and l in (TM_SEP, TM_PAD)) or (mv > 0 and r == TM_SEP):
            return 3 + 3 * TM_NEXT[s, a] + TM_WRITE[s, a]
        return TM_WRITE[s, a]
    for nb, side in ((l, 1), (r, -1)):  # a head moving into this cell
        if 3 <= nb < TM_SEP:
            s, a = divmod(nb - 3, 3)
            if TM_MOVE[s, a] == side:
                return 3 + 3 * TM_NEXT[s, a] + c
    return c

# -----------------------------------------------------------------------------
# Data 3: BIG-Bench-Hard-style reasoning prompts (boolean_expressions, web_of_lies), batched

PEOPLE = ["alice", "bob", "carl", "dana", "eve", "fred", "gina", "hank"]
R_ITOS = ["<pad>", "<bos>", "not", "true", "false", "and", "or", "is", "lies", "tells", "the", "truth", "says",
          ".", "does", "tell", "?", "yes", "no"] + PEOPLE
R = {w: i for i, w in enumerate(R_ITOS)}
TASK_RANGE, CORPUS_RANGE = (3, 6), (2, 8)   # operands / people: labelled task prompts; unlabelled corpus


def boolean_expressions(n, g, lo=3, hi=6):
    """BBH boolean_expressions without parentheses. Prompt ids, lengths, answer id, label:
        not not true and false or not true is  -> false"""
    nops = torch.randint(lo, hi + 1, (n,), generator=g)
    nots, vals, is_and = torch.randint(0, 3, (n, hi), generator=g), torch.rand(n, hi, generator=g) < 0.5, \
        torch.rand(n, hi, generator=g) < 0.5
    full = lambda w: torch.full((n,), R[w])
    cols, keep = [], []
    for i in range(hi):
        on = i < nops
        cols += [full("not"), full("not"), torch.where(vals[:, i], R["true"], R["false"]),
                 torch.where(is_and[:, i], R["and"], R["or"])]
        keep += [on & (nots[:, i] > 0), on & (nots[:, i] > 1), on, i < nops - 1]
    lit = vals ^ (nots % 2 == 1)
    acc, cur = torch.zeros(n, dtype=torch.bool), lit[:, 0]
    for i in range(1, hi):  # python precedence: not > and > or
        on, a = i < nops, is_and[:, i - 1]
        acc = torch.where(on & ~a, acc | cur, acc)
        cur = torch.where(on, torch.where(a, cur & lit[:, i], lit[:, i]), cur)
    label = (acc | cur).long()
    ids, lens = pack(torch.stack(cols + [full("is")], 1), torch.stack(keep + [torch.ones(n, dtype=torch.bool)], 1), 0)
    return ids, lens, torch.where(label == 1, R["true"], R["false"]), label


def web_of_lies(n, g, lo=3, hi=6):
    """BBH web_of_lies, a parity chain:
        eve lies . bob says eve lies . dana says bob tells the truth . does dana tell the truth ?  -> yes"""
    npl = torch.randint(lo, hi + 1, (n,), generator=g)
    names = torch.tensor([R[p] for p in PEOPLE])[torch.rand(n, len(PEOPLE), generator=g).argsort(1)[:, :hi]]
    says_lie = torch.rand(n, hi, generator=g) < 0.5          # person i says person i-1 lies (slot 0: i lies)
    full, yes = (lambda w: torch.full((n,), R[w])), torch.ones(n, dtype=torch.bool)
    cols = [names[:, 0], full("lies"), full("tells"), full("the"), full("truth"), full(".")]
    keep = [yes, says_lie[:, 0]] + [~says_lie[:, 0]] * 3 + [yes]
    t = ~says_lie[:, 0]
    for i in range(1, hi):
        on = i < npl
        t = torch.where(on, t ^ says_lie[:, i], t)  # says "i-1 lies": truthful iff i-1 lied
        cols += [names[:, i], full("says"), names[:, i - 1], full("lies"), full("tells"), full("the"), full("truth"),
                 full(".")]
        keep += [on, on, on, on & says_lie[:, i], on & ~says_lie[:, i], on & ~says_lie[:, i], on & ~says_lie[:, i], on]
    last = names.gather(1, (npl - 1)[:, None])[:, 0]
    cols += [full("does"), last, full("tell"), full("the"), full("truth"), full("?")]
    keep += [yes] * 6
    label = t.long()
    ids, lens = pack(torch.stack(cols, 1), torch.stack(keep, 1), 0)
    return ids, lens, torch.where(label == 1, R["yes"], R["no"]), label


TASKS = {"boolean_expressions": boolean_expressions, "web_of_lies": web_of_lies}


def reason_split(task, n_train, n_test, n_corpus, g) -> dict:
    """Test prompts first; then the unlabelled corpus (prompts only, no answers, 2..8 operands/people) and the
    labelled training prompts, both with every test prompt removed. A prompt ends in 'is' or '?', so a test
    prompt can occur in a corpus document only as the whole document: exact matching is the whole check."""
    fn = TASKS[task]
    test = fn(n_test, g, *TASK_RANGE)
    corpus = fn(n_corpus, g, *CORPUS_RANGE)[:2]
    train = fn(2 * n_train + 100, g, *TASK_RANGE)                   # margin for the rows dropped below
    keep_c, keep_t = unseen(*corpus, *test[:2]), unseen(*train[:2], *test[:2])
    corpus = tuple(t[keep_c] for t in corpus)
    train = tuple(t[keep_t][:n_train] for t in train)
    overlap = int((~unseen(*test[:2], *corpus)).sum() + (~unseen(*test[:2], *train[:2])).sum())
    return dict(test=test, train=train, corpus=corpus, overlap=overlap,
                dropped=int((~keep_c).sum() + (~keep_t[:len(train[0])]).sum()))

# -----------------------------------------------------------------------------
# Model 1: embeddings and featurizers (a window of L token ids -> the tree's integer-coded features)


def ppmi_svd(seqs: np.ndarray, K: int, d: int, window: int = 2, pad: int = 0) -> tuple:
    """Co-occurrence counts within +-window (pad excluded) -> PPMI -> E = U_d sqrt(S_d), signs fixed.
    PPMI(w, c) = max(0, log p(w, c) / (p(w) p(c))). Returns (E (K, d), PPMI (K, K))."""
    C = np.zeros(K * K)
    for off in range(1, window + 1):
        a, b = seqs[:, :-off].ravel(), seqs[:, off:].ravel()
        ok = (a != pad) & (b != pad)
        C += np.bincount(a[ok] * K + b[ok], minlength=K * K) + np.bincount(b[ok] * K + a[ok], minlength=K * K)
    C = C.reshape(K, K)
    row = C.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        pmi = np.log(C * C.sum() / (row * row.T))
    ppmi = np.where(C > 0, np.maximum(pmi, 0.0), 0.0)
    U, S, _ = np.linalg.svd(ppmi)
    E = U[:, :d] * np.sqrt(S[:d])
    E *= np.sign(E[np.abs(E).argmax(0), np.arange(E.shape[1])])  # deterministic signs
    return E.astype(np.float32), ppmi


def windows(seqs: torch.Tensor, lens: torch.Tensor, L: int, bos: int) -> tuple:
    """One row per story token: the L tokens before it (left-padded with <bos>) and the token itself.
    (N, T) -> W (sum(lens), L), y (sum(lens),)."""
    N, T = seqs.shape
    P = torch.cat([torch.full((N, L), bos), seqs], 1)
    W = P.unfold(1, L, 1)[:, :T]                                   # (N, T, L): W[n, i] precedes seqs[n, i]
    valid = torch.arange(T)[None, :] < lens[:, None]
    return W[valid].numpy(), seqs[valid].numpy()


def avg_feature(W: np.ndarray, E: np.ndarray, gamma: float) -> np.ndarray:
    """The paper's feature: sum_j w_j E[x_j] with w_j proportional to gamma^(L-1-j) (newest token heaviest)."""
    L = W.shape[1]
    w = gamma ** np.arange(L - 1, -1, -1, dtype=np.float64)
    return np.einsum("l,rld->rd", w / w.sum(), E[W]).astype(np.float32)


class Binner:
    """Quantile bins per feature: code = number of bin edges below x, so 'code <= b' is 'x <= edge_b'."""

    def __init__(self, n_bins):
        self.n_bins = n_bins

    def fit(self, X):
        qs = np.linspace(0, 1, self.n_bins + 1)[1:-1]
        self.edges = [np.unique(np.quantile(X[:, f], qs)) for f in range(X.shape[1])]
        return self

    def __call__(self, X):
        return np.stack([np.searchsorted(e, X[:, f]) for f, e in enumerate(self.edges)], 1).astype(np.int32)


class Featurizer:
    """Window (R, L) of ids -> integer codes. onehot: the ids themselves, split by equality ('slot j == w',
    the same tree as on the explicit one-hot vector). avg: the weighted average embedding, in quantile bins."""

    def __init__(self, kind: str, L: int, E: np.ndarray, gamma: float, n_bins: int):
        self.kind, self.L, self.E, self.gamma, self.n_bins = kind, L, E, gamma, n_bins
        self.n_params = 0 if kind == "onehot" else E.size          # the embedding belongs to the model

    def fit(self, W, seed=0):
        if self.kind == "avg":
            sub = W[np.random.default_rng(seed).permutation(len(W))[:50000]]
            self.binner = Binner(self.n_bins).fit(avg_feature(sub, self.E, self.gamma))
        self.is_cat = np.full(self.L if self.kind == "onehot" else self.E.shape[1], self.kind == "onehot")
        return self

    def __call__(self, W):
        return W.astype(np.int32) if self.kind == "onehot" else self.binner(avg_feature(W, self.E, self.gamma))

# -----------------------------------------------------------------------------
# Model 2: the decision tree (histogram CART, entropy criterion, best-first growth) and a bagged forest


def _xlogx(a):
    a = np.asarray(a, dtype=np.float64)
    return np.where(a > 0, a * np.log(np.maximum(a, 1e-300)), 0.0)


class DecisionTree:
    """Classifier on integer-coded features X (N, F). Node test: X[f] == t if is_cat[f] else X[f] <= t.
    Grown best-first (the split with the largest entropy gain next) up to max_leaves (0 = no limit);
    a node splits only on a strictly positive gain, so balanced XOR never splits (greedy's blind spot).
    Leaves keep class frequencies -> predict_proba. fit(..., progress=f) calls f(rows) as rows settle in leaves."""

    def __init__(self, max_depth=40, min_leaf=1, max_features=1.0, seed=0, max_leaves=0):
        self.max_depth, self.min_leaf, self.max_features, self.max_leaves = max_depth, min_leaf, max_features, max_leaves
        self.rng = np.random.default_rng(seed)

    def fit(self, X, y, is_cat, n_classes, progress=None):
        import heapq
        X, y = np.asarray(X), np.asarray(y)
        self.is_cat, self.n_classes = np.asarray(is_cat, bool), n_classes
        B = int(X.max()) + 1
        feat, thr, left, right, rows, heap = [], [], [], [], {}, []

        def add(idx, depth):                          # a new leaf; queue its best split if it has one
            nd = len(feat)
            feat.append(-1), thr.append(-1), left.append(-1), right.append(-1)
            rows[nd] = idx
            yi = y[idx]
            if depth < self.max_depth and len(idx) >= 2 * self.min_leaf and (yi != yi[0]).any():
                split = self._best_split(X[idx], yi, B)
                if split is not None:
                    heapq.heappush(heap, (-split[0], nd, depth, split[1], split[2]))
                    return nd
            if progress:
                progress(len(idx))
            return nd

        add(np.arange(len(y)), 0)
        while heap and (not self.max_leaves or len(rows) < self.max_leaves):
            _, nd, depth, f, t = heapq.heappop(heap)
            idx = rows.pop(nd)
            go = X[idx, f] == t if self.is_cat[f] else X[idx, f] <= t
            feat[nd], thr[nd] = f, t
            left[nd], right[nd] = add(idx[go], depth + 1), add(idx[~go], depth + 1)
        if progress:
            progress(sum(len(rows[nd]) for _, nd, *_ in heap))
        leaves = sorted(rows)
        counts = np.stack([np.bincount(y[rows[nd]], minlength=n_classes) for nd in leaves]).astype(np.float32)
        return self._set(feat, thr, left, right, leaves, counts / counts.sum(1, keepdims=True))  # (n_leaves, K)

    def _best_split(self, Xn, yn, B):
        """(gain, feature, threshold) of the best split, or None. One bincount over (feature, bin, class)."""
        cls, yl = np.unique(yn, return_inverse=True)
        n, C, F_ = len(yn), len(cls), Xn.shape[1]
        feats = np.arange(F_)
        if self.max_features < 1.0:
            feats = np.sort(self.rng.choice(F_, max(1, int(self.max_features * F_)), replace=False))
        tot = np.bincount(yl, minlength=C).astype(np.float64)
        parent = float(_xlogx(n) - _xlogx(tot).sum())                # n * H(parent)
        best_cost, best = parent - 1e-9 * n, None
        chunk = max(1, (1 << 22) // (B * C))
        for s in range(0, len(feats), chunk):
            fs = feats[s:s + chunk]
            codes = (np.arange(len(fs))[None, :] * B + Xn[:, fs]) * C + yl[:, None]
            cnt = np.bincount(codes.ravel(), minlength=len(fs) * B * C).reshape(len(fs), B, C).astype(np.float64)
            Lc = np.where(self.is_cat[fs][:, None, None], cnt, np.cumsum(cnt, 1))  # rows going left
            nL = Lc.sum(-1)
            nR = n - nL
            cost = _xlogx(nL) - _xlogx(Lc).sum(-1) + _xlogx(nR) - _xlogx(tot - Lc).sum(-1)  # n_L H_L + n_R H_R
            cost[(nL < self.min_leaf) | (nR < self.min_leaf)] = np.inf
            j = int(cost.argmin())
            if cost.flat[j] < best_cost:
                best_cost, best = float(cost.flat[j]), (int(fs[j // B]), j % B)
        return None if best is None else (parent - best_cost, *best)

    def _set(self, feat, thr, left, right, leaves, proba):
        """Store the node arrays (a leaf has feature -1), each leaf's row of `proba`, and the depth."""
        self.feat, self.thr, self.left, self.right = map(np.array, (feat, thr, left, right))
        self.leaf_of = np.full(len(feat), -1)
        self.leaf_of[leaves] = np.arange(len(leaves))
        self.proba, self.depth, frontier = proba, 0, [0]
        while frontier:
            frontier = [c for nd in frontier if self.feat[nd] >= 0 for c in (self.left[nd], self.right[nd])]
            self.depth += bool(frontier)
        return self

    @classmethod
    def from_table(cls, slots, table: dict, n_classes: int, n_features: int):
        """A tree built by hand from a lookup table {(x[slots[0]], x[slots[1]], ...): output}: slots are tested
        in order by chains of equality nodes; a sub-table whose outputs all agree becomes one leaf."""
        t = cls()
        t.is_cat, t.n_classes = np.ones(n_features, bool), n_classes
        feat, thr, left, right, outs = [], [], [], [], {}

        def new():
            for a in (feat, thr, left, right):
                a.append(-1)
            return len(feat) - 1

        def build(items, depth):                      # items: [(key tuple, output)]
            if len({o for _, o in items}) == 1:
                nd = new()
                outs[nd] = items[0][1]
                return nd
            groups = {}
            for k, o in items:
                groups.setdefault(k[depth], []).append((k, o))
            keys, root = sorted(groups), None
            for i, v in enumerate(keys):              # slot == v ? build(v) : (next value ...)
                nd = build(groups[v], depth + 1) if i == len(keys) - 1 else new()
                if i < len(keys) - 1:
                    feat[nd], thr[nd], left[nd] = slots[depth], v, build(groups[v], depth + 1)
                if root is None:
                    root = nd
                else:
                    right[prev] = nd
                prev = nd
            return root

        build(sorted(table.items()), 0)
        leaves = sorted(outs)
        return t._set(feat, thr, left, right, leaves, np.eye(n_classes, dtype=np.float32)[[outs[nd] for nd in leaves]])

    def apply(self, X):
        """Leaf node id of every row, all rows descending one level per iteration."""
        X = np.asarray(X)
        nd, rows = np.zeros(len(X), np.int64), np.arange(len(X))
        for _ in range(self.depth):
            f = self.feat[nd]
            fc = np.maximum(f, 0)
            x = X[rows, fc]
            go = np.where(self.is_cat[fc], x == self.thr[nd], x <= self.thr[nd])
            nd = np.where(f >= 0, np.where(go, self.left[nd], self.right[nd]), nd)
        return nd

    def predict_proba(self, X):
        return self.proba[self.leaf_of[self.apply(X)]]

    def predict(self, X):
        return self.predict_proba(X).argmax(1)

    n_nodes = property(lambda self: len(self.feat))
    n_leaves = property(lambda self: int((self.feat < 0).sum()))


class Forest:
    """Bagging (bootstrap rows drawn from `seed`) + per-node feature subsampling; averages leaf distributions."""

    def __init__(self, n_trees=16, max_depth=40, min_leaf=1, max_features=0.5, seed=0, max_leaves=0):
        self.seed = seed
        self.trees = [DecisionTree(max_depth, min_leaf, max_features, (seed, i), max_leaves) for i in range(n_trees)]

    def fit(self, X, y, is_cat, n_classes, progress=None):
        rng = np.random.default_rng(self.seed)
        for t in self.trees:
            b = rng.integers(0, len(y), len(y))
            t.fit(X[b], y[b], is_cat, n_classes, progress)
        return self

    def predict_proba(self, X):
        return sum(t.predict_proba(X) for t in self.trees) / len(self.trees)

    def predict(self, X):
        return self.predict_proba(X).argmax(1)

    n_nodes = property(lambda self: sum(t.n_nodes for t in self.trees))
    n_leaves = property(lambda self: sum(t.n_leaves for t in self.trees))


def make_learner(cfg, max_leaves=0):
    """The text experiment's tree (or forest) for a leaf budget; the seed follows cfg.seed."""
    if cfg.learner == "forest":
        return Forest(cfg.n_trees, cfg.max_depth, cfg.min_leaf, 0.5, cfg.seed, max(2, max_leaves // cfg.n_trees))
    return DecisionTree(cfg.max_depth, cfg.min_leaf, 1.0, cfg.seed, max_leaves)


def fit_tree(model, X, y, is_cat, n_classes, desc):
    """model.fit with a progress bar over training rows (a forest's bar counts every tree's rows)."""
    bar = common.progress(total=len(y) * len(getattr(model, "trees", [0])), desc=desc)
    model.fit(X, y, is_cat, n_classes, progress=bar.update)
    bar.close()
    return model


def tree_params(model, K: int) -> tuple:
    """(parameters with a K-probability leaf, with an argmax-token leaf): 2 per inner node (feature, threshold)."""
    inner = model.n_nodes - model.n_leaves
    return 2 * inner + K * model.n_leaves, 2 * inner + model.n_leaves


def ardt_generate(model, feat, prompt: np.ndarray, L: int, n_new: int, bos: int) -> np.ndarray:
    """Greedy autoregressive generation: predict, append, slide the window. (B, P) -> (B, n_new)."""
    seq = np.concatenate([np.full((len(prompt), L), bos), prompt], 1)
    for _ in range(n_new):
        seq = np.concatenate([seq, model.predict(feat(seq[:, -L:]))[:, None]], 1)
    return seq[:, L + prompt.shape[1]:]


def cot_rollout(tree, x, delta, M):
    """Autoregressive CoT: the tree writes q_1..q_T one token at a time. x (B, T) -> states (B, T)."""
    B, T = x.shape
    seq = cot_sequences(delta, x, np.full(B, T), M)
    seq[:, M + 1:] = sum(delta.shape) + 1                                 # erase the answers: <pad>
    for t in range(1, T + 1):
        seq[:, M + t] = tree.predict(seq[:, t - 1:M + t])                 # window: x_t .. q_{t-1}
    return seq[:, M + 1:M + 1 + T]


def dfa_tree(delta, M):
    """The theory's construction: test the last slot (previous state or <sep>), then slot 0 (the symbol)."""
    Q, S = delta.shape
    table = {(p, Q + a): int(delta[0 if p == Q + S else p, a]) for p in list(range(Q)) + [Q + S] for a in range(S)}
    return DecisionTree.from_table((M, 0), table, Q + S + 2, M + 1)


def tm_tree(M):
    toks = range(TM_K)
    table = {(c, l, r): int(tm_local_rule(l, c, r)) for c in toks for l in toks for r in toks}
    return DecisionTree.from_table((1, 0, 2), table, TM_K, M + 2)   # slots: center, left, right


def tm_cot_rollout(tree, c0, steps):
    """Write configurations c_1..c_steps token by token with the tree. c0 (B, M) -> (B, steps, M)."""
    B, M = c0.shape
    seq = np.concatenate([np.full((B, 1), TM_PAD), c0, np.full((B, 1), TM_SEP)], 1)
    for _ in range(steps * (M + 1)):
        seq = np.concatenate([seq, tree.predict(seq[:, -(M + 2):])[:, None]], 1)
    return seq[:, M + 2:].reshape(B, steps, M + 1)[:, :, :M]

# -----------------------------------------------------------------------------
# Model 3: the GPT baseline / feature model (common.GPT) and its training loop


def gpt_xy(seqs, bos, pad):
    """Input [<bos>, s_0 .. s_{n-2}] and target [s_0 .. s_{n-1}] (pads ignored) for whole sequences."""
    return torch.cat([torch.full((len(seqs), 1), bos), seqs[:, :-1]], 1), seqs.masked_fill(seqs == pad, -100)


def train_gpt(model, cfg, x_all, y_all, g, steps, lr, batch_size, desc="gpt"):
    """AdamW, warmup + cosine, next-token loss over whole sequences; the global batch (the same draw on every
    rank) is split over torchrun ranks and the loss is the global token mean."""
    device = torch.device(cfg.device)
    opt = common.configure_adamw(model, lr, cfg.weight_decay)
    fwd = common.wrap_ddp(model, device)
    fwd = torch.compile(fwd) if cfg.compile else fwd
    hist, t0 = {"step": [], "loss": []}, time.time()
    bar = common.progress(range(steps), desc)
    model.train()
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = common.lr_at(step, steps, lr, min(cfg.warmup, steps // 10 + 1))
        b = torch.randint(len(x_all), (batch_size,), generator=g)
        x, y = common.shard(x_all[b].to(device), y_all[b].to(device))   # this rank's rows
        with common.autocast(device):
            logits = fwd(x)[0]
            loss = common.token_mean(*common.cross_entropy_sum(logits, y))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if step % cfg.log_every == 0 or step == steps - 1:
            hist["step"].append(step)
            hist["loss"].append(common.global_mean(loss))
            bar.set_postfix_str(common.step_log(step + 1, steps, t0, loss=hist["loss"][-1]))
    model.eval()
    return hist

# -----------------------------------------------------------------------------
# Evaluation


def lm_metrics(proba, y, K, smooth=0.01) -> dict:
    """Next-token accuracy and perplexity (hard tree leaves are smoothed: 0.99 p + 0.01 / K)."""
    p = (1 - smooth) * proba[np.arange(len(y)), y] + smooth / K
    return {"acc": float((proba.argmax(1) == y).mean()), "ppl": float(np.exp(-np.log(np.maximum(p, 1e-12)).mean()))}


@torch.no_grad()
def gpt_proba(model, x, device) -> np.ndarray:
    """(N, T) inputs -> (N, T, K) next-token probabilities."""
    return torch.cat([F.softmax(model(x[i:i + 256].to(device))[0].float(), -1).cpu()
                      for i in range(0, len(x), 256)]).numpy()


def story_metrics(prompts: np.ndarray, conts: np.ndarray, itos: list) -> dict:
    """Cut each continuation after the first 'the end .'; the fraction of generated sentences that parse,
    and of whole stories (prompt + continuation) that are consistent."""
    n_sent = n_gram = n_cons = 0
    for p, c in zip(prompts, conts):
        words = [itos[i] for i in c]
        words = words[:next((i + 3 for i in range(len(words) - 2) if words[i:i + 3] == ["the", "end", "."]), None)]
        sents = split_sentences(words)
        n_sent += len(sents)
        n_gram += sum(parse_sentence(s) is not None for s in sents)
        n_cons += check([itos[i] for i in p] + words)[2]
    return {"grammatical": n_gram / max(1, n_sent), "consistent": n_cons / len(prompts)}

# -----------------------------------------------------------------------------
# Experiment 1: text. ARDTs vs GPTs of the same parameter count, on held-out stories


def exp_text(cfg, g) -> tuple:
    d = story_data(cfg, g)
    itos, P, (train, train_lens), (test, test_lens) = d["itos"], d["P"], d["train"], d["test"]
    K, pad, bos, dev = len(itos), 0, 1, torch.device(cfg.device)
    prompts = test[:cfg.n_gen, :P].numpy()
    n_new = max(train.shape[1], test.shape[1]) - P + 4          # room to finish any story
    E, _ = ppmi_svd(torch.cat([torch.full((len(train), 1), bos), train], 1).numpy(), K, cfg.emb_dim)
    ytr, yte = windows(train, train_lens, 1, bos)[1], windows(test, test_lens, 1, bos)[1]
    uni = np.bincount(ytr, minlength=K) / len(ytr)
    res = {"unigram": lm_metrics(np.tile(uni, (len(yte), 1)), yte, K) | {"params": K}}
    samples, hist, secs = {}, {}, {}
    story = lambda conts: {} if cfg.data else story_metrics(prompts, conts, itos)    # --data: no grammar to check
    (xtr, ytr_t), (xte, yte_t) = gpt_xy(train, bos, pad), gpt_xy(test, bos, pad)
    for w in cfg.widths:                                     # the GPT of width w, then trees of its size
        model = common.GPT(common.GPTConfig(vocab_size=K, block_size=xtr.shape[1] + n_new + P, n_layer=cfg.n_layer,
                                            n_head=cfg.n_head, n_embd=w)).to(dev)
        t0 = time.time()
        hist[f"gpt/d{w}"] = train_gpt(model, cfg, xtr, ytr_t, g, cfg.steps, cfg.lr, cfg.batch_size, f"gpt d{w}")
        secs[f"gpt/d{w}"] = time.time() - t0
        m = yte_t != -100
        r = lm_metrics(gpt_proba(model, xte, dev)[m.numpy()], yte_t[m].numpy(), K, 0.0)
        idx = torch.cat([torch.full((len(prompts), 1), bos), torch.from_numpy(prompts)], 1).to(dev)
        conts = model.generate(idx, n_new, greedy=True)[:, 1 + P:].cpu().numpy()
        r["params"] = common.count_params(model)
        res[f"gpt/d{w}"], samples[f"gpt/d{w}"] = r | story(conts), conts[0]
        for spec in cfg.ardt:
            kind, L = spec.split(":")[0], int(spec.split(":")[1])
            name = f"ardt_{kind}_L{L}/d{w}"
            Wtr, ytr = windows(train, train_lens, L, bos)
            Wte, yte = windows(test, test_lens, L, bos)
            feat = Featurizer(kind, L, E, cfg.gamma, cfg.n_bins).fit(Wtr, cfg.seed)
            budget = max(2, (r["params"] - feat.n_params + 2) // (K + 2))     # as many parameters as the GPT
            t0 = time.time()
            tree = fit_tree(make_learner(cfg, budget), feat(Wtr), ytr, feat.is_cat, K, f"ardt {spec} d{w}")
            secs[name] = time.time() - t0
            t = lm_metrics(tree.predict_proba(feat(Wte)), yte, K)
            conts = ardt_generate(tree, feat, prompts, L, n_new, bos)
            full, argmax = tree_params(tree, K)
            t.update(params=full + feat.n_params, params_argmax=argmax + feat.n_params, leaves=tree.n_leaves)
            res[name], samples[name] = t | story(conts), conts[0]
    fam = {"acc": "next_token_acc", "grammatical": "grammatical_frac", "consistent": "consistent_frac"}
    metrics = {common.mkey(fam.get(k, k), name): v for name, r in res.items() for k, v in r.items()}
    metrics["overlap/text/test_in_train"] = d["overlap"]
    text = lambda ids: " ".join(itos[i] for i in ids)
    return metrics, {"samples": {n: text(prompts[0]) + " | " + text(c[:60]) for n, c in samples.items()},
                     "gpt_loss": hist, "dropped_test_stories": d["dropped"], "fit_seconds": secs}

# -----------------------------------------------------------------------------
# Experiment 2: automata. A fixed-size CoT tree at every length vs a plain tree whose size grows with T


def exp_automata(cfg) -> dict:
    rng, res = np.random.default_rng(cfg.seed), {}
    for T in cfg.aut_lens:
        M = T                                                        # context L = T + 1
        lens = rng.integers(1, T + 1, cfg.aut_n_train)               # CoT rows from inputs of length 1..T
        seq = cot_sequences(PARITY, (rng.random((cfg.aut_n_train, T)) < cfg.aut_bias).astype(np.int64), lens, M)
        W, y = cot_rows(seq, lens, M)
        cot = fit_tree(DecisionTree(cfg.max_depth, 1), W, y, np.ones(M + 1, bool), 6, f"cot tree T={T}")
        xp = rng.integers(0, 2, (len(y), T))       # the plain tree: as many rows, x -> q_T, uniform bits as in test
        plain = fit_tree(DecisionTree(10 ** 6, 1), xp, run_dfa(PARITY, xp)[:, -1], np.ones(T, bool), 2,
                         f"plain tree T={T}")
        xt = rng.integers(0, 2, (cfg.aut_n_test, T))
        truth = run_dfa(PARITY, xt)
        roll = cot_rollout(cot, xt, PARITY, M)
        hand = cot_rollout(dfa_tree(PARITY, M), xt, PARITY, M)
        res |= {f"parity_acc/cot/T{T}": float((roll[:, -1] == truth[:, -1]).mean()),
                f"parity_all_steps_acc/cot/T{T}": float((roll == truth).all(1).mean()),
                f"parity_acc/plain/T{T}": float((plain.predict(xt) == truth[:, -1]).mean()),
                f"parity_acc/hand/T{T}": float((hand == truth).all(1).mean()),
                f"parity_leaves/cot/T{T}": cot.n_leaves, f"parity_leaves/plain/T{T}": plain.n_leaves,
                f"parity_rows/cot/T{T}": len(y), f"parity_rows/plain/T{T}": len(xp)}
    res["parity_leaves/hand"] = dfa_tree(PARITY, 1).n_leaves                 # (|Q| + 1) |S| = 6, any T
    Mt, B = cfg.tm_cells, 64                     # the Turing machine: random numbers, head at the last digit
    tape = np.concatenate([rng.integers(0, 2, (B, Mt - 1)), np.full((B, 1), 2)], 1)
    c0 = tape.copy()
    c0[:, Mt - 2] = 3 + tape[:, Mt - 2]
    tt = tm_tree(Mt)
    sim = tm_simulate(tape, np.full(B, Mt - 2), np.zeros(B, np.int64), cfg.tm_steps)
    res["turing_acc/hand"] = float((tm_cot_rollout(tt, c0, cfg.tm_steps) == sim).all((1, 2)).mean())
    res["turing_leaves/hand"] = tt.n_leaves
    return res

# -----------------------------------------------------------------------------
# Experiment 3: reasoning. Trees on linear vs transformer features, the featurizer never sees an answer


def lin_features(ids, lens, emb, last=8) -> list:
    """'Lin', two variants, both linear in the one-hot prompt, each + the last 8 tokens' embeddings: the mean of
    fixed random token embeddings over the prompt, and the bag of words (token counts)."""
    e = emb[ids]                                                           # (n, T, d)
    valid = (torch.arange(ids.shape[1])[None, :] < lens[:, None]).float()
    mean = (e * valid[..., None]).sum(1) / lens[:, None]
    bow = (F.one_hot(ids, len(emb)) * valid[..., None]).sum(1).float()    # (n, |V|)
    pos = (lens[:, None] - last + torch.arange(last)[None, :])              # (n, last)
    tail = torch.where((pos >= 0)[..., None], e.gather(1, pos.clamp(min=0)[..., None].expand(-1, -1, e.shape[-1])), 0.0)
    return [torch.cat([mean, tail.flatten(1)], 1).numpy(), torch.cat([bow, tail.flatten(1)], 1).numpy()]


def answer_acc(logits, task, y) -> float:
    """Accuracy of a model's own answer: the larger of its two answer logits (true/false or yes/no)."""
    yes, no = (R["true"], R["false"]) if task == "boolean_expressions" else (R["yes"], R["no"])
    return float(((logits[:, yes] > logits[:, no]).long() == y).float().mean())


@torch.no_grad()
def tf_features(model, ids, lens, device) -> tuple:
    """'TF': per layer (embedding output, block 1, block 2, ...) the frozen GPT's hidden state at the prompt's
    last token + its mean over the prompt; also the GPT's own next-token logits there (its answer, if any)."""
    x = torch.cat([torch.full((len(ids), 1), R["<bos>"]), ids], 1).to(device)
    logits, _, hidden = model(x, return_hidden=True)
    valid = (torch.arange(1, x.shape[1])[None, :] <= lens[:, None]).float()[..., None]
    at = torch.arange(len(ids))
    feats = [torch.cat([h.float().cpu()[at, lens], (h.float().cpu()[:, 1:] * valid).sum(1) / lens[:, None]], 1).numpy()
             for h in hidden]                                       # (n, 2C) per layer
    return feats, logits.float().cpu()[at, lens]


def forest_acc(cfg, X_tr, y_tr, X_te, y_te) -> float:
    """A forest on quantile-binned features, fitted on (X_tr, y_tr); its accuracy on (X_te, y_te)."""
    b = Binner(32).fit(X_tr)
    f = Forest(cfg.reason_trees, cfg.reason_depth, 1, 0.5, cfg.seed).fit(b(X_tr), y_tr, np.zeros(X_tr.shape[1], bool), 2)
    return float((f.predict(b(X_te)) == y_te).mean())


def pick_layer_and_score(cfg, layers, y_tr, y_te) -> tuple:
    """layers: [(X_train, X_test)] per candidate layer. The layer whose forest, fitted on the first 80% of the
    labels, scores best on the last 20%; then its forest fitted on all labels, scored on the test prompts."""
    n_fit = int(0.8 * len(y_tr))
    val = [forest_acc(cfg, X[:n_fit], y_tr[:n_fit], X[n_fit:], y_tr[n_fit:]) for X, _ in layers]
    best = int(np.argmax(val))
    return forest_acc(cfg, layers[best][0], y_tr, layers[best][1], y_te), best


def exp_reason(cfg, g) -> tuple:
    splits = {t: reason_split(t, cfg.reason_train, cfg.reason_test, cfg.reason_corpus, g) for t in TASKS}
    width = max(s["corpus"][0].shape[1] for s in splits.values())   # unlabelled prompts of both tasks, <pad> = 0
    text = torch.cat([F.pad(s["corpus"][0], (0, width - s["corpus"][0].shape[1])) for s in splits.values()])
    model = common.GPT(common.GPTConfig(vocab_size=len(R_ITOS), block_size=text.shape[1] + 1, n_layer=cfg.n_layer,
                                        n_head=cfg.n_head, n_embd=cfg.reason_width)).to(cfg.device)
    untrained = copy.deepcopy(model)                                # control: the same GPT before training
    hist = train_gpt(model, cfg, *gpt_xy(text, R["<bos>"], R["<pad>"]), g, cfg.reason_steps, 3e-3, 64, "feature gpt")
    emb = torch.randn(len(R_ITOS), 16, generator=g)
    res = {}
    for task, s in splits.items():
        (ids_tr, lens_tr, _, y_tr), (ids_te, lens_te, _, y_te) = s["train"], s["test"]
        y_tr, y_te = y_tr.numpy(), y_te.numpy()
        cands = {"lin": list(zip(lin_features(ids_tr, lens_tr, emb), lin_features(ids_te, lens_te, emb)))}
        for name, m in (("tf", model), ("tf_untrained", untrained)):
            te, logits = tf_features(m, ids_te, lens_te, cfg.device)
            cands[name] = list(zip(tf_features(m, ids_tr, lens_tr, cfg.device)[0], te))
            if name == "tf":                              # the trained GPT's own answer
                res[f"reasoning_acc/featurizer/{task}"] = answer_acc(logits, task, torch.from_numpy(y_te))
        for feat, layers in cands.items():                # the layer (Lin: the variant) is chosen on validation labels
            acc, best = pick_layer_and_score(cfg, layers, y_tr, y_te)
            res[f"reasoning_acc/ardt_{feat}/{task}"], res[f"reasoning_layer/ardt_{feat}/{task}"] = acc, best
        res[f"reasoning_acc/majority/{task}"] = float(max(y_te.mean(), 1 - y_te.mean()))
        res[f"overlap/reason/{task}"] = s["overlap"]
    for m in ("ardt_lin", "ardt_tf", "ardt_tf_untrained", "featurizer", "majority"):
        res[f"reasoning_acc/{m}/mean"] = float(np.mean([res[f"reasoning_acc/{m}/{t}"] for t in TASKS]))
    return res, {"feature_gpt_loss": hist, "dropped_train_prompts": {t: s["dropped"] for t, s in splits.items()}}

# -----------------------------------------------------------------------------
# Run: the experiments per seed, the tables (mean +- std over seeds), results/ardt.json and figures


def run_seed(cfg, stages) -> tuple:
    g = common.set_seed(cfg.seed)
    metrics, extras, timings = {}, {}, {}
    for part in cfg.parts:
        t0 = time.time()
        with stages(f"{part}, seed {cfg.seed}"):
            if part == "text":
                m, extras["text"] = exp_text(cfg, g)
            elif part == "automata":
                m = exp_automata(cfg)
            else:
                m, extras["reason"] = exp_reason(cfg, g)
        metrics |= m
        timings[part] = time.time() - t0
        if cfg.seeds == 1:
            common.save_results(NAME, cfg, metrics, info=extras, timings=timings, partial=True)
    return metrics, extras | {"timings": timings}


def report(cfg, runs, models):
    """The tables: mean +- std over seeds, each ARDT beside the GPT of its size; then the headline."""
    c, seeds, head = runs.cell, f"{len(runs.seeds)} seed(s)", []
    kp = lambda key: f"{runs.mean[key] / 1e3:.1f}k" if key in runs.mean else "-"
    if "text" in cfg.parts:
        fams = ("next_token_acc", "ppl", "grammatical_frac", "consistent_frac")
        common.print_table([["unigram", "-", kp("params/unigram"), c("next_token_acc/unigram"), c("ppl/unigram"), "-",
                             "-"]] + [[m, f"d{w}", kp(f"params/{m}/d{w}")] + [c(f"{f}/{m}/d{w}") for f in fams]
                                      for w in cfg.widths for m in models],
                           ["model", "size", "params", "next-token acc", "ppl", "grammatical", "consistent"],
                           f"text: held-out stories ({seeds}); each ARDT has as many parameters as the GPT of its size")
        for name, sample in runs.extras[0]["text"]["samples"].items():
            common.print0(f"  sample {name}: {sample}")
        w, a = cfg.widths[-1], models[-1]
        head += [[f"next-token acc, {a} vs gpt at {kp(f'params/gpt/d{w}')} params", "on par with a smaller GPT",
                  f"{c(f'next_token_acc/{a}/d{w}')} vs {c(f'next_token_acc/gpt/d{w}')}"]]
        if not cfg.data:
            head += [["grammatical sentences, same pair", "grammatical (GPT-4 grades)",
                      f"{c(f'grammatical_frac/{a}/d{w}')} vs {c(f'grammatical_frac/gpt/d{w}')}"]]
    if "automata" in cfg.parts:
        pa = lambda fam, T: c(f"parity_{fam}/T{T}", 0 if "acc" not in fam else 3)
        common.print_table([[T, pa("rows/cot", T), pa("leaves/cot", T), pa("acc/cot", T), pa("leaves/plain", T),
                             pa("acc/plain", T), f"{2 ** T:.3g}", pa("acc/hand", T)] for T in cfg.aut_lens],
                           ["T", "training rows", "CoT tree leaves", "CoT acc", "plain tree leaves", "plain acc",
                            "2^T (exact plain tree)", "hand-built CoT (6 leaves)"],
                           f"automata: parity, context T + 1, equal training rows ({seeds})")
        T = cfg.aut_lens[-1]
        head += [[f"parity at T={T}: CoT tree vs plain tree, leaves (acc)", "fixed size vs 2^T (theorems)",
                  f"{pa('leaves/cot', T)} ({pa('acc/cot', T)}) vs {pa('leaves/plain', T)} ({pa('acc/plain', T)})"]]
    if "reason" in cfg.parts:
        cols = ("majority", "ardt_lin", "ardt_tf", "ardt_tf_untrained", "featurizer")
        common.print_table([[t] + [c(f"reasoning_acc/{m}/{t}") for m in cols] + [c(f"overlap/reason/{t}", 0)]
                            for t in list(TASKS) + ["mean"]],
                           ["task", "majority", "tree on Lin", "tree on TF", "tree on untrained TF", "TF's own answer",
                            "test overlap"],
                           f"reasoning: forests on {cfg.reason_train} labels each, {cfg.reason_test} test prompts; "
                           f"layers chosen on validation labels ({seeds})")
        head += [["reasoning: tree on TF vs on Lin features", "GPT-2 features > linear (BBH)",
                  f"{c('reasoning_acc/ardt_tf/mean')} vs {c('reasoning_acc/ardt_lin/mean')}"]]
    common.print_table(head, ["claim", "paper", "ours"], f"headline ({seeds}; the paper's numbers are not quoted: "
                       f"not verified for this script)")


def run(cfg) -> common.SeedRuns:
    t_start, cost = time.time(), {"text": 3.0, "automata": 0.1, "reason": 2.0}
    stages = common.Stages({f"{p}, seed {cfg.seed + i}": cost[p] for i in range(cfg.seeds) for p in cfg.parts})
    runs = common.over_seeds(cfg, lambda c: run_seed(c, stages), NAME)
    models = ["gpt"] + [f"ardt_{s.split(':')[0]}_L{s.split(':')[1]}" for s in cfg.ardt]
    report(cfg, runs, models)
    wall = time.time() - t_start
    common.save_results(NAME, cfg, runs, info={"extras": [{k: v for k, v in e.items() if k != "timings"}
                                                          for e in runs.extras]},
                        timings={p: [e["timings"][p] for e in runs.extras] for p in cfg.parts}, wall_time_s=wall)
    if "text" in cfg.parts:
        w = cfg.widths
        common.plot(NAME, {m: ([runs.mean[f"params/{m}/d{x}"] for x in w], [runs.mean[f"next_token_acc/{m}/d{x}"] for x in w],
                               [runs.std.get(f"next_token_acc/{m}/d{x}", 0.0) for x in w]) for m in models},
                    cfg.out, xlabel="parameters", ylabel="held-out next-token accuracy", logx=True,
                    title="ARDT vs GPT at equal parameter counts")
    if "automata" in cfg.parts:
        common.plot(NAME + "_automata", {k: (list(cfg.aut_lens), [runs.mean[f"parity_leaves/{k}/T{T}"] for T in
                                                                  cfg.aut_lens]) for k in ("cot", "plain")},
                    cfg.out, xlabel="parity input length T", ylabel="tree leaves", logy=True,
                    title="leaves needed: CoT tree vs plain tree (equal training rows)")
    common.print0(f"wall time {wall:.1f} s")
    return runs


def main():
    cfg = common.parse_args(Config, PRESETS)
    with common.session(cfg):
        run(cfg)


if __name__ == "__main__":
    main()
