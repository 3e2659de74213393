"""The nanopapers test suite: every script's smoke run plus properties that fail when the code is wrong.

Run: python -m pytest -q            (add -m "not slow" to skip the torchrun runs)
     python -m pytest -q -k copying (one script's tests: every test is named test_<script>_...)
Layout: shared helpers, then common.py, then one section per script in README order.
"""
import collections
import dataclasses
import importlib
import inspect
import json
import math
import os
import random
import shutil
import subprocess
import sys
import threading

import chess
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import copying
import icl_markov
import moe
import linear_ntp
import turing_programs
import turing_programs as tp
import shampoo
import trail
import lora_cat
import ardt
import transcendence

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = ("copying", "icl_markov", "moe", "linear_ntp", "turing_programs", "shampoo", "trail", "lora_cat",
           "ardt", "transcendence")
NO_DDP = ("shampoo",)  # scripts that train no network data-parallel (torchrun is refused in one line)

# ======================================================================
# shared helpers
# ======================================================================


def smoke(module, tmp_path, **overrides) -> dict:
    """Run `module`'s smoke preset in-process on the CPU; return its results JSON (config, metrics, ...)."""
    cfg = common.config_from_preset(module.Config, module.PRESETS, "smoke", device="cpu", out=str(tmp_path),
                                    **overrides)
    with common.session(cfg):
        module.run(cfg)
    with open(os.path.join(tmp_path, module.__name__ + ".json")) as f:
        return json.load(f)


def run_script(script, *args, timeout=120, env=None):
    """Run `python <script>.py args...` here; returns the CompletedProcess (text output)."""
    return subprocess.run([sys.executable, f"{script}.py", *map(str, args)], cwd=HERE, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def torchrun(script, tmp_path, *args, nproc=2, timeout=240):
    """Run a script under torchrun (gloo, CPU); returns the CompletedProcess."""
    exe = shutil.which("torchrun")
    cmd = ([exe] if exe else [sys.executable, "-m", "torch.distributed.run"]) + [
        "--standalone", f"--nproc_per_node={nproc}", f"{script}.py", "--preset", "smoke", "--device", "cpu",
        "--out", str(tmp_path), *map(str, args)]
    return subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def assert_causal(forward, vocab: int, T: int = 24, cut: int = 13, batch: int = 2, atol=1e-5):
    """forward(idx (B, T)) -> (B, T, V): outputs before `cut` ignore tokens from `cut` on; later ones do not."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (batch, T), generator=g)
    y = x.clone()
    y[:, cut:] = (y[:, cut:] + 1 + torch.randint(0, vocab - 1, (batch, T - cut), generator=g)) % vocab
    with torch.no_grad():
        a, b = forward(x), forward(y)
    assert torch.allclose(a[:, :cut], b[:, :cut], atol=atol), "a past output depends on a future token"
    assert not torch.allclose(a[:, cut:], b[:, cut:], atol=atol), "the output ignores its own inputs"


def tiny_gpt(vocab=13, pos="learned", n_layer=2, n_head=4, n_embd=32, seed=0, **kw) -> common.GPT:
    torch.manual_seed(seed)
    return common.GPT(common.GPTConfig(vocab_size=vocab, block_size=64, n_layer=n_layer, n_head=n_head,
                                       n_embd=n_embd, pos=pos, **kw)).eval()


def copy_out(*objs) -> dict:
    """Paste the source of each function/class into a fresh namespace holding only torch, nn, F, math and
    numpy (what a user's new file would import) and return that namespace: a piece must run from there."""
    ns = {"torch": torch, "nn": nn, "F": F, "math": math, "np": np, "__name__": "pasted"}
    for obj in objs:
        exec(compile(inspect.getsource(obj), f"<pasted {obj.__name__}>", "exec"), ns)
    return ns


def bad_input_cases(module):
    """Bad inputs derived from a script's own Config: each must be one `error:` line, exit 2, no work."""
    fields = {f.name: f for f in dataclasses.fields(module.Config)}
    cfg = common.config_from_preset(module.Config, module.PRESETS, "smoke", device="cpu", out="results")
    flag = lambda n: "--" + n.replace("_", "-")
    cases = [(["--preset", "no-such-preset"], "unknown preset"), (["--seeds", "0"], "--seeds"),
             (["--seeds", "-1"], "--seeds"), (["--out", "/proc/no/such/dir"], "--out"),
             (["--device", "tpu"], "unknown device")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "CUDA"))
    lr = next((n for n in fields if common._ALWAYS_POSITIVE.search(n) and "lr" in n
               and isinstance(getattr(cfg, n), float)), None)
    if lr:
        cases += [([flag(lr), "nan"], flag(lr)), ([flag(lr), "-1"], flag(lr)), ([flag(lr), "inf"], flag(lr))]
    batch = next((n for n in fields if "batch" in n and isinstance(getattr(cfg, n), int)), None)
    if batch:
        cases += [([flag(batch), "0"], flag(batch)), ([flag(batch), "-4"], flag(batch))]
    for n in fields:
        if isinstance(getattr(cfg, n), tuple) and getattr(cfg, n) and n not in module.Config.MAY_BE_EMPTY:
            cases.append(([flag(n), ","], flag(n)))
            break
    for n in module.Config.POSITIVE:
        if isinstance(getattr(cfg, n), int):
            cases.append(([flag(n), "0"], flag(n)))
    return [(["--preset", "smoke", "--device", "cpu"] + argv if argv[0] != "--preset" else argv, needle)
            for argv, needle in cases]

# ======================================================================
# common.py
# ======================================================================


@dataclasses.dataclass
class TinyConfig(common.BaseConfig):
    n: int = 3                          # a size
    lens: tuple[int, ...] = (1, 2)      # lengths
    lr: float = 1e-3                    # a learning rate
    flag: bool = True                   # a switch
    POSITIVE = ("n",)


TINY_PRESETS = {"smoke": {"n": 1}, "quick": {"n": 5}, "full": {"n": 9}}


def test_common_parse_args_presets_and_flags(tmp_path):
    cfg = common.parse_args(TinyConfig, TINY_PRESETS, ["--device", "cpu", "--out", str(tmp_path)])
    assert cfg.preset == "quick" and cfg.n == 5  # CPU defaults to quick
    cfg = common.parse_args(TinyConfig, TINY_PRESETS, ["--preset", "smoke", "--n", "7", "--lens", "3,4",
                                                       "--no-flag", "--out", str(tmp_path)])
    assert (cfg.n, cfg.lens, cfg.flag) == (7, (3, 4), False)  # explicit flags beat the preset


@pytest.mark.parametrize("argv, needle", [
    (["--preset", "no-such-preset"], "unknown preset"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "cuda"),
    (["--device", "tpu"], "unknown device"),
    (["--n", "0"], "--n must be > 0"),
    (["--n", "abc"], "invalid int"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--lens", ","], "--lens needs at least one value"),
    (["--lens", "3,-1"], "--lens must be >= 0"),
    (["--seeds", "0"], "--seeds must be > 0"),
    (["--out", "/proc/no/such"], "--out /proc/no/such: cannot write"),
])
def test_common_bad_input_is_one_line_error(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        common.parse_args(TinyConfig, TINY_PRESETS, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err


def test_common_help_shows_comments_and_the_chosen_presets_defaults(capsys):
    for argv, n in ((["-h"], "5"), (["--preset", "smoke", "-h"], "1")):
        with pytest.raises(SystemExit):
            common.parse_args(TinyConfig, TINY_PRESETS, argv)
        out = " ".join(capsys.readouterr().out.split())
        assert f"a size (default: {n})" in out and "lengths (default: 1,2)" in out


def test_common_save_results_is_atomic_under_concurrent_writers(tmp_path):
    cfg = common.config_from_preset(TinyConfig, TINY_PRESETS, "smoke", device="cpu", out=str(tmp_path))
    errors, reads = [], []

    def writer(k):
        try:
            for i in range(60):
                common.save_results("x", cfg, {"a/b": float(k * 1000 + i), "nan": float("nan")})
        except Exception as e:  # noqa: BLE001 - any failure is the test's finding
            errors.append(repr(e))

    def reader():
        for _ in range(200):
            try:
                with open(tmp_path / "x.json") as f:
                    reads.append(json.load(f)["metrics"]["nan"])
            except FileNotFoundError:
                pass
    threads = [threading.Thread(target=writer, args=(k,)) for k in range(2)] + [threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(r is None for r in reads)  # every read parsed; NaN is written as null
    blob = json.loads((tmp_path / "x.json").read_text())
    assert blob["complete"] and "argv" in blob["env"] and "git_commit" in blob["env"]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    with pytest.raises(TypeError):
        common.save_results("x", cfg, {"label": "text"})


def test_common_over_seeds_reports_mean_and_std(tmp_path):
    cfg = common.config_from_preset(TinyConfig, TINY_PRESETS, "smoke", device="cpu", out=str(tmp_path),
                                    seed=3, seeds=3)
    runs = common.over_seeds(cfg, lambda c: {"acc/m": float(c.seed), "n": 1}, name="s")
    assert runs.seeds == [3, 4, 5] and runs.mean["acc/m"] == 4.0 and runs.std["acc/m"] == pytest.approx(1.0)
    assert runs.cell("acc/m") == "4.000 ± 1.000" and runs.cell("missing") == "-"
    common.save_results("s", cfg, runs)
    blob = json.loads((tmp_path / "s.json").read_text())
    assert blob["metrics_std"]["acc/m"] == pytest.approx(1.0) and len(blob["per_seed"]) == 3
    one = common.over_seeds(dataclasses.replace(cfg, seeds=1), lambda c: ({"a": 2.0}, "curve"))
    assert one.cell("a") == "2.000" and one.std == {} and one.extras == ["curve"]


def test_common_token_mean_matches_the_plain_mean_in_one_process():
    logits, targets = torch.randn(3, 5, 7), torch.randint(0, 7, (3, 5))
    targets[0, :2] = -100
    s, n = common.cross_entropy_sum(logits, targets)
    ref = F.cross_entropy(logits.reshape(-1, 7), targets.reshape(-1), ignore_index=-100)
    assert n == 13 and torch.allclose(common.token_mean(s, n), ref)
    assert torch.allclose(common.masked_cross_entropy(logits, targets), ref)


def test_common_lr_schedule():
    assert common.lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert common.lr_at(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert common.lr_at(99, 100, 1.0, 10, "linear") < 0.02
    assert common.lr_at(100, 100, 1.0, 10, "cosine", 0.1) == pytest.approx(0.1)


def test_common_tokenizer_roundtrip():
    tok = common.Tokenizer(list("ab") + ["$", "|", "."])
    assert tok.encode("$ab|ab.") == [2, 0, 1, 3, 0, 1, 4] and tok.decode(tok.encode("$ba|.")) == "$ba|."
    with pytest.raises(ValueError):
        tok.encode("A")


@pytest.mark.parametrize("pos", ["none", "learned", "alibi", "hard_alibi", "rope"])
def test_common_gpt_attention_is_causal(pos):
    m = tiny_gpt(pos=pos)
    assert_causal(lambda x: m(x)[0], vocab=13, T=30, cut=17)


@pytest.mark.parametrize("pos", ["none", "learned", "alibi", "hard_alibi", "rope"])
def test_common_gpt_kv_cache_matches_full_forward(pos):
    m = tiny_gpt(vocab=11, pos=pos, seed=1)
    x = torch.randint(0, 11, (3, 20))
    with torch.no_grad():
        full = m(x)[0]
        cache = m.new_cache()
        parts = [m(x[:, :7], cache=cache)[0]] + [m(x[:, t:t + 1], cache=cache)[0] for t in range(7, 20)]
        assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)
        g = m.generate(x[:, :5], 8, greedy=True)
        for t in range(5, 13):  # each greedy token is the argmax of a full forward over its prefix
            assert torch.equal(g[:, t], m(g[:, :t])[0][:, -1].argmax(-1))


def test_common_hard_alibi_heads_see_only_their_window():
    T = 12
    bias = common.positional_bias("hard_alibi", 4, torch.arange(T), torch.arange(T), (1, 2, 4, 0))
    probs = torch.softmax(torch.randn(4, T, T) + bias, -1)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    for h, w in enumerate((1, 2, 4)):
        outside = (j > i) | (i - j >= w)
        assert probs[h][outside].abs().max() == 0 and torch.allclose(probs[h].sum(-1), torch.ones(T))
    causal = torch.zeros(T, T).masked_fill(j > i, float("-inf"))
    assert torch.equal(bias[3], causal)  # the window-0 head is plain causal attention (NoPE)
    # in a model whose heads are all windowed, a token further back than every window never matters
    m = tiny_gpt(vocab=7, pos="hard_alibi", n_layer=1, n_head=2, n_embd=16, hard_windows=(1, 3))
    x = torch.randint(0, 7, (2, 10))
    y = x.clone()
    y[:, 2] = (y[:, 2] + 1) % 7
    with torch.no_grad():
        a, b = m(x)[0], m(y)[0]
    assert torch.allclose(a[:, 5:], b[:, 5:], atol=1e-6)  # positions >= 2 + 3 do not see position 2
    assert not torch.allclose(a[:, 2:5], b[:, 2:5], atol=1e-4)


def test_common_alibi_slopes_and_translation_invariance():
    assert torch.allclose(common.alibi_slopes(4), torch.tensor([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8]))
    bias = common.positional_bias("alibi", 4, torch.arange(9), torch.arange(9))
    assert bias[1, 5, 2] == pytest.approx(-3 * 2 ** -4) and bias[0, 2, 5] == float("-inf")


def test_common_attention_copies_out_with_torch_alone():
    ns = copy_out(common.alibi_slopes, common.positional_bias, common.rope_rotate, common.CausalSelfAttention)
    for pos, windows in (("hard_alibi", (1, 2, 0, 0)), ("alibi", ()), ("rope", ()), ("none", ())):
        torch.manual_seed(0)
        ours = common.CausalSelfAttention(16, 4, pos, windows).eval()
        pasted = ns["CausalSelfAttention"](16, 4, pos, windows).eval()
        pasted.load_state_dict(ours.state_dict())
        x = torch.randn(2, 9, 16)
        assert torch.allclose(ours(x), pasted(x), atol=1e-6)
        assert_causal(lambda t: pasted(F.one_hot(t, 16).float()), vocab=16, T=12, cut=7)


def test_common_stages_and_step_log_print_an_eta(capsys):
    stages = common.Stages({"a": 1, "b": 3})
    with stages("a"):
        pass
    with stages("b"):
        pass
    out = capsys.readouterr().out
    assert "[stage 1/2: a]" in out and "[stage 2/2: b]" in out and "eta" in out
    assert common.step_log(10, 100, 0.0, loss=0.5).startswith("step 10/100 | loss 0.5 |")


# ---------------------------------------------------------------- every script: input, help, torchrun
# Per-script flags that make the torchrun smoke shorter (the part that trains data-parallel stays).
TORCHRUN_ARGS = {
    "copying": ["--models", "lstm,hard_alibi", "--lookup-models", ",", "--hash-trials", "50"],
    "icl_markov": ["--trigram-iters", "0", "--mix-fracs", "0"],
    "moe": ["--pb-steps", "20", "--graph-steps", "10"],
    "linear_ntp": ["--steps", "10", "--parity-steps", "30", "--test-pairs", "40", "--valid-pairs", "40",
                   "--eval-every", "0"],
    "turing_programs": [], "shampoo": [], "trail": [],
    "lora_cat": ["--designs", "A"],
    "ardt": ["--parts", "text", "--ardt", "onehot:8"],
    "transcendence": ["--parts", "chess"],
}
# Metrics that must agree between one process and two (same global batch, token-weighted loss).
TORCHRUN_CLOSE = {
    "copying": ["copy_char_acc/lstm/L4", "copy_loss/lstm/L4", "copy_char_acc/hard_alibi/L4", "copy_loss/hard_alibi/L4"],
    "icl_markov": ["kl_true/minimal/final", "kl_true/bigram/ref"],   # the transformer has dropout: ranks differ
    "moe": ["phonebook_loss/dense_d16", "phonebook_loss/moe_e8_k2", "graph_loss/dense_d16"],
    "linear_ntp": ["mult_final_loss/mlp/cot", "mult_final_loss/mlp/answer_pad", "mult_final_loss/mlp/answer",
                   "mult_tf/mlp/expansion", "parity_acc/linear/cot"],
    "turing_programs": ["final_loss/add/tp/hard_alibi", "token_acc_in_dist/add/tp/hard_alibi",
                        "final_loss/add/tp/nope", "token_acc/add/tp/nope/L5"],
    "shampoo": [],
    "trail": ["lm_loss/final", "len_mean/lm", "mae/probe/all", "mae/prompt_only/all", "mae/prompt_probe_bayes/all",
              "chosen/probe/layer"],
    "lora_cat": ["cat_A/cat_free/loss_first"],
    "ardt": ["next_token_acc/gpt/d16", "next_token_acc/ardt_onehot_L8/d16"],
    "transcendence": ["gpt/loss"],
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_bad_input_is_one_line_before_any_work(script, capsys):
    module = importlib.import_module(script)
    for argv, needle in bad_input_cases(module):
        with pytest.raises(SystemExit) as e:
            common.parse_args(module.Config, module.PRESETS, argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2, (argv, err)
        assert len(err.splitlines()) == 1 and err.startswith("error:") and needle in err, (argv, err)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_entry_point_refuses_an_unwritable_out_at_once(script):
    r = run_script(script, "--preset", "smoke", "--device", "cpu", "--out", "/proc/no/such/dir", timeout=30)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [l for l in r.stderr.strip().splitlines() if l.startswith("error:")]


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_help_lists_every_field_with_its_comment(script, capsys):
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as e:
        common.parse_args(module.Config, module.PRESETS, ["--preset", "smoke", "-h"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    notes = common._field_comments(module.Config)
    for f in dataclasses.fields(module.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
        assert notes.get(f.name), f"{script}: field {f.name} has no comment for -h"


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_script_torchrun_two_processes_match_one(script, tmp_path):
    if script in NO_DDP:
        r = torchrun(script, tmp_path, timeout=120)  # (torchrun adds its own report of a failed child)
        assert r.returncode != 0 and "error: " + script + ".py has nothing to split" in r.stderr, r.stderr[-2000:]
        return
    module = importlib.import_module(script)
    r = torchrun(script, tmp_path / "two", *TORCHRUN_ARGS[script])
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads((tmp_path / "two" / f"{script}.json").read_text())
    assert two["env"]["world_size"] == 2
    cfg = common.parse_args(module.Config, module.PRESETS, ["--preset", "smoke", "--device", "cpu", "--out",
                                                            str(tmp_path / "one"), *TORCHRUN_ARGS[script]])
    with common.session(cfg):
        module.run(cfg)
    one = json.loads((tmp_path / "one" / f"{script}.json").read_text())
    assert set(one["metrics"]) == set(two["metrics"])
    for k in TORCHRUN_CLOSE[script]:
        assert abs(one["metrics"][k] - two["metrics"][k]) <= 0.05, (k, one["metrics"][k], two["metrics"][k])


# ======================================================================
# copying.py
# ======================================================================


def _copying_cfg(**kw):
    base = dict(t_dim=32, t_heads=4, t_windows=(1, 2, 0, 0), nope_dim=32, nope_layers=2, lstm_dim=16, mamba_dim=16,
                mamba_layers=2, mamba_state=4, device="cpu")
    return copying.Config(**{**base, **kw})


def test_copying_copy_format_and_mask():
    tok = copying.make_tokenizer(26)
    lens = torch.tensor([3, 5, 1])
    ids, scored = copying.make_examples("copy", lens, 26, torch.Generator().manual_seed(0))
    for r, L in enumerate(lens.tolist()):
        s = tok.decode(ids[r])
        x = s[1:1 + L]
        assert s.rstrip("*") == "$" + x + "|" + x + "."
        assert scored[r].sum() == L + 1 and scored[r, 2 + L:3 + 2 * L].all()  # answer + EOS only
    inp, tgt = copying.to_lm_batch(ids, scored)
    assert inp.shape == tgt.shape and ((tgt != -100).sum(1) == lens + 1).all()


@pytest.mark.parametrize("task", ["prefix_ngram", "suffix_ngram"])
def test_copying_lookup_answer_follows_unique_key(task):
    tok = copying.make_tokenizer(26)
    g = torch.Generator().manual_seed(3)
    n, a = 3, 5
    lens = torch.randint(12, 30, (64,), generator=g)
    ids, scored = copying.make_examples(task, lens, 26, g, n, a)
    for r in range(64):
        s = tok.decode(ids[r]).rstrip("*")
        if task == "prefix_ngram":
            key, x, y = s[1:].rstrip(".").split("|")
        else:
            x, gy = s[1:].rstrip(".").split("|")
            key, y = gy[:n], gy[n:]
        assert len(key) == n and len(y) == a and x.count(key) == 1
        assert x[x.index(key) + n:x.index(key) + n + a] == y
        assert tok.decode(ids[r][scored[r]]) == y + "."


def test_copying_packed_rows_are_full_and_the_cut_example_unscored():
    tok = copying.make_tokenizer(26)
    lens = torch.randint(3, 13, (8 * 10,), generator=torch.Generator().manual_seed(1))
    ids, scored = copying.pack_rows(*copying.make_examples("copy", lens, 26, torch.Generator().manual_seed(0)),
                                    8, 64, tok["*"])
    assert ids.shape == (8, 64) and (ids != tok["*"]).all()  # every row exactly full
    for r in range(8):
        s = tok.decode(ids[r])
        last_eos = s.rfind(".")
        assert not scored[r, last_eos + 1:].any()  # the truncated tail carries no loss
        for ex in s[:last_eos + 1].split(".")[:-1]:
            x, y = ex[1:].split("|")
            assert x == y and len(x) >= 3
        assert int(scored[r].sum()) == sum(len(e[1:].split("|")[1]) + 1 for e in s[:last_eos + 1].split(".")[:-1])
    cfg = _copying_cfg(pack=64, batch=8, train_min_len=3, train_max_len=12)
    inp, tgt = copying.training_batch("copy", cfg, torch.Generator().manual_seed(0), "cpu")
    assert inp.shape == (8, 63) and (inp != tok["*"]).all()


# ---------------------------------------------------------------- copying.py: models


def test_copying_parallel_scan_equals_sequential_with_grads():
    g = torch.Generator().manual_seed(0)
    B, T, E, N = 2, 37, 6, 4
    args = [t.double().requires_grad_() for t in (torch.randn(B, T, E, generator=g), torch.rand(B, T, E, generator=g) * 2,
                                                  -torch.rand(E, N, generator=g) * 2, torch.randn(B, T, N, generator=g),
                                                  torch.randn(B, T, N, generator=g))]  # u, Delta, A, B, C
    ys, yp = copying.selective_scan_sequential(*args), copying.selective_scan_parallel(*args)
    assert torch.allclose(ys, yp, atol=1e-10)
    w = torch.randn_like(ys)
    for a, b in zip(torch.autograd.grad((ys * w).sum(), args), torch.autograd.grad((yp * w).sum(), args)):
        assert torch.allclose(a, b, atol=1e-10)


def _copying_reference_mamba(blk, x):
    """The selective SSM written out with loops over t (float64), independent of MambaBlock.forward:
    u, z = in_proj(x); u = SiLU(causal depthwise conv(u)); (dt, B, C) = x_proj(u); Delta = softplus(dt_proj(dt));
    h_t = exp(Delta_t A) h_{t-1} + Delta_t B_t x_t;  y_t = C_t h_t + D x_t;  out = out_proj(y * SiLU(z))."""
    W = {k: v.double() for k, v in blk.state_dict().items()}
    Bsz, T, _ = x.shape
    E, N, R, K = W["D"].shape[0], blk.N, blk.R, W["conv.weight"].shape[-1]
    uz = x.double() @ W["in_proj.weight"].T
    u_raw, z = uz[..., :E], uz[..., E:]
    out = torch.zeros(Bsz, T, x.shape[-1], dtype=torch.float64)
    A = -torch.exp(W["A_log"])                                           # (E, N)
    for b in range(Bsz):
        h = torch.zeros(E, N, dtype=torch.float64)
        for t in range(T):
            conv = W["conv.bias"].clone()
            for k in range(K):  # tap k looks back K-1-k tokens
                if t - (K - 1 - k) >= 0:
                    conv = conv + W["conv.weight"][:, 0, k] * u_raw[b, t - (K - 1 - k)]
            u = conv * torch.sigmoid(conv)                               # SiLU
            proj = W["x_proj.weight"] @ u
            dt_raw, Bt, Ct = proj[:R], proj[R:R + N], proj[R + N:]
            delta = F.softplus(W["dt_proj.weight"] @ dt_raw + W["dt_proj.bias"])  # (E,)
            h = torch.exp(delta[:, None] * A) * h + (delta[:, None] * Bt[None, :]) * u[:, None]
            y = h @ Ct + W["D"] * u
            gate = z[b, t] * torch.sigmoid(z[b, t])
            out[b, t] = W["out_proj.weight"] @ (y * gate)
    return out


@pytest.mark.parametrize("scan", ["sequential", "parallel"])
def test_copying_mamba_block_matches_a_loop_reference_of_the_selective_ssm(scan):
    torch.manual_seed(0)
    blk = copying.MambaBlock(8, d_state=4, scan=scan).double()
    with torch.no_grad():  # random weights everywhere, Delta of order 1 so the decay matters
        for p in blk.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        blk.A_log.copy_(torch.rand_like(blk.A_log))
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(blk(x), _copying_reference_mamba(blk, x), atol=1e-9)


def test_copying_mamba_recurrent_step_equals_forward():
    torch.manual_seed(0)
    m = copying.MambaLM(12, 16, 2, 4, scan="parallel").eval()
    x = torch.randint(0, 12, (3, 15))
    with torch.no_grad():
        full, state, steps = m(x), m.init_state(3, "cpu"), []
        for t in range(15):
            logits, state = m.step(x[:, t], state)
            steps.append(logits)
    assert torch.allclose(torch.stack(steps, 1), full, atol=1e-4)


def test_copying_mamba_small_delta_keeps_the_state_at_zero():
    blk = copying.MambaBlock(8, 4)
    with torch.no_grad():
        blk.dt_proj.bias.fill_(-30.0)  # softplus(-30) ~ 1e-13: Delta -> 0
        blk.dt_proj.weight.zero_()
        y = copying.selective_scan_sequential(*blk.ssm_inputs(torch.randn(2, 10, 16)))
    assert y.abs().max() < 1e-8  # the state never moves, so the block's output is just D*u


def test_copying_mamba_copies_out_with_torch_alone():
    ns = copy_out(copying.selective_scan_sequential, copying.selective_scan_parallel, copying.MambaBlock,
                  copying.RMSNorm, copying.MambaLM)
    for scan in ("sequential", "parallel"):
        torch.manual_seed(0)
        ours = copying.MambaLM(11, 16, 2, 4, scan=scan).eval()
        pasted = ns["MambaLM"](11, 16, 2, 4, scan=scan).eval()
        pasted.load_state_dict(ours.state_dict())
        x = torch.randint(0, 11, (2, 13))
        with torch.no_grad():
            assert torch.allclose(ours(x), pasted(x), atol=1e-6)
        assert_causal(pasted, vocab=11, T=16, cut=9)


@pytest.mark.parametrize("name", ["nope", "alibi", "hard_alibi", "lstm", "mamba"])
def test_copying_every_model_is_causal(name):
    torch.manual_seed(0)
    m = copying.build_model(name, _copying_cfg(), 64).eval()
    assert_causal(lambda x: copying.logits_of(m, x), vocab=30, T=25, cut=11)


class _CopyingPerfectCopier(torch.nn.Module):
    """Oracle: in '$x|x.' predicts x[t - L - 1] in the answer span, then '.' (a hand-made 'model')."""

    def __init__(self, tok):
        super().__init__()
        self.tok = tok

    def forward(self, idx):
        B, T = idx.shape
        logits = torch.zeros(B, T, len(self.tok))
        for b in range(B):
            s = idx[b].tolist()
            if self.tok["|"] not in s:
                continue
            sep = s.index(self.tok["|"])
            for t in range(sep, T):
                src = t - sep + 1
                logits[b, t, s[src] if src < sep else self.tok["."]] = 1.0
        return logits


class _CopyingSuffixOracle(torch.nn.Module):
    """Oracle for '$x|gy.': after the key g (n tokens after '|'), predicts the tokens that follow g in x."""

    def __init__(self, tok, n, answer_len):
        super().__init__()
        self.tok, self.n, self.a = tok, n, answer_len

    def forward(self, idx):
        B, T = idx.shape
        logits = torch.zeros(B, T, len(self.tok))
        for b in range(B):
            s = idx[b].tolist()
            sep = s.index(self.tok["|"])
            x, key = s[1:sep], s[sep + 1:sep + 1 + self.n]
            start = next((i + self.n for i in range(len(x)) if x[i:i + self.n] == key), None)
            if start is None or start + self.a > len(x):  # not the suffix layout (x too short for g y)
                continue
            for j in range(self.a + 1):  # position sep + n + j predicts answer token j (then '.')
                t = sep + self.n + j
                if t < T:
                    logits[b, t, x[start + j] if j < self.a else self.tok["."]] = 1.0
        return logits


class _CopyingSpoiled(torch.nn.Module):
    """Wraps an oracle and makes the answer token just before '.' wrong: exact match 0, char accuracy < 1."""

    def __init__(self, inner, dot):
        super().__init__()
        self.inner, self.dot = inner, dot

    def forward(self, idx):
        logits = self.inner(idx).clone()
        b, t = ((logits.argmax(-1) == self.dot) & (logits.amax(-1) > 0)).nonzero(as_tuple=True)
        b, t = b[t > 0], t[t > 0]
        logits[b, t - 1] = logits[b, t - 1].roll(1, -1)                 # argmax moves to another token
        return logits


def test_copying_lookup_scoring_with_an_oracle():
    cfg, tok = _copying_cfg(vocab=26), copying.make_tokenizer(26)
    oracle = _CopyingSuffixOracle(tok, cfg.ngram, cfg.answer_len)
    r = copying.evaluate(oracle, "suffix_ngram", 20, 24, cfg, torch.Generator().manual_seed(0), "cpu")
    assert r["string_acc"] == 1.0 and r["char_acc"] == 1.0
    wrong = copying.evaluate(oracle, "prefix_ngram", 20, 24, cfg, torch.Generator().manual_seed(0), "cpu")
    assert wrong["string_acc"] < 0.2  # the oracle reads the suffix layout: on the prefix layout it fails


def test_copying_experiments_score_what_they_trained(monkeypatch):
    """exp_copy / exp_lookup wiring, with oracles in place of trained models (train is a stub)."""
    cfg, tok = _copying_cfg(vocab=26, eval_lens=(5, 12), eval_n=8, lookup_eval_lens=(20, 30),
                            models=("hard_alibi",), lookup_models=("mamba",)), copying.make_tokenizer(26)
    batches = []

    def fake_train(model, cfg, get_batch, steps, desc="", probe=None):
        batches.append(tok.decode(get_batch(0)[0][0]))
        return {"curve": [(32, 0.5), (64, 0.95), (96, 0.9)], "examples": 96}
    monkeypatch.setattr(copying, "train", fake_train)
    monkeypatch.setattr(copying, "build_model", lambda name, cfg, block=256: _CopyingPerfectCopier(tok))
    m = copying.exp_copy(cfg, torch.device("cpu"))[0]
    assert (m["copy_acc/hard_alibi/L5"], m["copy_acc/hard_alibi/L12"], m["longest_copied/hard_alibi"]) == (1.0, 1.0, 12)
    assert (m["examples_to_90/hard_alibi"], m["reached_90/hard_alibi"], m["examples/hard_alibi"]) == (64, 1.0, 96)
    monkeypatch.setattr(copying, "build_model", lambda name, cfg, block=256: _CopyingSuffixOracle(tok, 3, 5))
    m = copying.exp_lookup(dataclasses.replace(cfg, lookup_tasks=("suffix_ngram",)), torch.device("cpu"))
    assert m == {"suffix_ngram_acc/mamba/L20": 1.0, "suffix_ngram_acc/mamba/L30": 1.0}
    x, y = batches[0].rstrip("*")[1:].split("|")  # inputs (the last token '.' is only a target)
    assert x == y
    x, gy = batches[1].rstrip("*")[1:].split("|")
    assert len(gy) == 3 + 5 and gy[:3] in x  # the suffix layout: key then answer
    # an oracle wrong on the last answer token: exact match (what the tables report) 0, char accuracy (L-1)/L
    monkeypatch.setattr(copying, "build_model", lambda name, cfg, block=256: _CopyingSpoiled(_CopyingPerfectCopier(tok),
                                                                                             tok["."]))
    m = copying.exp_copy(cfg, torch.device("cpu"))[0]
    assert (m["copy_acc/hard_alibi/L5"], m["copy_acc/hard_alibi/L12"], m["longest_copied/hard_alibi"]) == (0.0, 0.0, 0)
    assert m["copy_char_acc/hard_alibi/L5"] == pytest.approx(4 / 5) and m["copy_char_acc/hard_alibi/L12"] == pytest.approx(11 / 12)
    monkeypatch.setattr(copying, "build_model", lambda name, cfg, block=256: _CopyingSpoiled(_CopyingSuffixOracle(tok, 3, 5),
                                                                                             tok["."]))
    m = copying.exp_lookup(dataclasses.replace(cfg, lookup_tasks=("suffix_ngram",)), torch.device("cpu"))
    assert m == {"suffix_ngram_acc/mamba/L20": 0.0, "suffix_ngram_acc/mamba/L30": 0.0}


def test_copying_fitted_transformers_get_their_own_lr_and_budget(monkeypatch):
    cfg = _copying_cfg(models=("hard_alibi", "nope", "lstm"), lr=1e-3, fit_lr=5e-3, steps=7, fit_steps=9, eval_lens=(4,),
                       eval_n=2)
    seen = []

    def fake_train(model, cfg, get_batch, steps, desc="", probe=None):
        seen.append((cfg.lr, steps))
        return {"curve": [(32, 0.5)], "examples": 32}
    monkeypatch.setattr(copying, "train", fake_train)
    copying.exp_copy(cfg, torch.device("cpu"))
    assert seen == [(1e-3, 7), (5e-3, 9), (1e-3, 7)]


@pytest.mark.parametrize("which", ["untrained", "oracle"])
def test_copying_teacher_forced_exact_match_equals_greedy(which):
    cfg, tok = _copying_cfg(vocab=4), copying.make_tokenizer(4)
    torch.manual_seed(0)
    model = copying.build_model("hard_alibi", cfg, 64).eval() if which == "untrained" else _CopyingPerfectCopier(tok)
    r = copying.evaluate(model, "copy", 8, 16, cfg, torch.Generator().manual_seed(5), "cpu")
    ids, scored = copying.make_examples("copy", torch.full((16,), 8), 4, torch.Generator().manual_seed(5))
    out = copying.greedy_answer(model, ids, scored)
    answer = scored & (ids != tok["."])
    assert r["string_acc"] == pytest.approx(((out == ids) | ~answer).all(1).float().mean().item())
    if which == "oracle":
        assert r["string_acc"] == 1.0 and r["char_acc"] == 1.0


@pytest.mark.parametrize("pack", [0, 40])
def test_copying_train_counts_examples_and_stops_when_the_probe_says_so(pack):
    cfg = _copying_cfg(batch=8, eval_every=5, train_max_len=6, vocab=5, pack=pack)
    torch.manual_seed(0)
    model, calls = copying.build_model("lstm", cfg), []

    def probe(m):
        calls.append(1)
        return {"acc": len(calls) / 10, "stop": len(calls) == 3}
    gen = torch.Generator().manual_seed(0)
    hist = copying.train(model, cfg, lambda s: copying.training_batch("copy", cfg, gen, "cpu"), 100, "t", probe)
    gen = torch.Generator().manual_seed(0)  # the same batches again: count the complete examples (scored EOS)
    counts = [int((copying.training_batch("copy", cfg, gen, "cpu")[1] == 5 + 2).sum()) for _ in range(15)]
    assert hist["steps_run"] == 15 and hist["examples"] == sum(counts)
    assert hist["curve"] == [(sum(counts[:5]), 0.1), (sum(counts[:10]), 0.2), (sum(counts), 0.3)]
    assert counts == [8] * 15 if not pack else sum(counts) > 15 * 8  # packing holds several strings per row


def test_copying_mean_curve_keeps_a_stopped_seed_at_its_last_probe():
    xs, ys, std = copying.mean_curve([[(1, 0.1), (2, 0.9)], [(1, 0.3), (2, 0.5), (3, 0.95)]])
    assert xs == [1, 2, 3] and ys == pytest.approx([0.2, 0.7, 0.925]) and std[2] == pytest.approx(0.05 / math.sqrt(2))
    assert copying.mean_curve([[(1, 0.1), (2, 0.9)]])[2] is None


def test_copying_examples_to_90():
    curve = [(100, 0.5), (200, 0.95), (300, 0.85), (400, 0.97)]
    assert copying.examples_to(curve, 0.9) == 200 and copying.examples_to(curve, 0.96) == 400
    assert copying.examples_to([(100, 0.9)], 0.9) == 100 and math.isnan(copying.examples_to(curve, 0.99))

# ---------------------------------------------------------------- copying.py: theory and metrics


def test_copying_hash_oracle_exact_without_repeats_and_bounded_by_p_rep():
    x = torch.randint(0, 26, (3000, 100), generator=torch.Generator().manual_seed(0))
    repeats = copying.has_repeated_ngram(x, 3)
    h = copying.ngram_hashes(x, 3).sort(1).values
    assert torch.equal(repeats, (h[:, 1:] == h[:, :-1]).any(1))
    ok = (copying.ngram_copy_oracle(x, 3) == x).all(1)
    assert ok[~repeats].all()  # exact whenever no n-gram repeats
    fail, p_rep = 1 - ok.float().mean().item(), repeats.float().mean().item()
    assert fail <= p_rep <= copying.ngram_bound(100, 26, 3)
    # p_rep = 1 - prod_k (1 - k/D^n) for the L-n+1 n-grams (birthday): 0.206 at L=100, n=3
    exact = 1 - math.prod(1 - k / 26 ** 3 for k in range(98))
    assert abs(p_rep - exact) < 0.03 and 0.15 < fail


def test_copying_state_bits_and_the_gssm_bound():
    assert copying.gssm_error_lower_bound(64, 20, 26) > 0.99
    assert copying.gssm_error_lower_bound(math.ceil(20 * math.log2(26)), 20, 26) == 0.0
    assert copying.state_bits(copying.LSTMLM(30, 8, 2)) == 2 * 2 * 8 * 32
    assert copying.state_bits(copying.MambaLM(30, 8, 3, 5)) == 3 * 16 * (5 + 3) * 32  # E = 16, N = 5, conv 3
    assert copying.state_bits(tiny_gpt()) == -1


def test_copying_longest_copied():
    assert copying.longest_copied({10: 1.0, 20: 0.9, 40: 0.4, 60: 0.6}) == 20
    assert copying.longest_copied({10: 0.49, 20: 0.0}) == 0
    assert copying.longest_copied({10: 0.5, 20: 0.7}) == 20

# ---------------------------------------------------------------- copying.py: end to end


def test_copying_smoke_every_model_beats_its_untrained_copy(tmp_path):
    blob = smoke(copying, tmp_path)
    m, cfg = blob["metrics"], copying.Config(**blob["config"])
    L = cfg.eval_lens[0]  # 4: a training length where 200 steps teach every model to copy a little
    block = 2 * max(cfg.eval_lens + cfg.lookup_eval_lens) + cfg.ngram + cfg.answer_len + 8
    for name in cfg.models:
        common.set_seed(cfg.seed)
        fresh = copying.build_model(name, cfg, block)
        untrained = copying.evaluate(fresh, "copy", L, cfg.eval_n, cfg, torch.Generator().manual_seed(cfg.seed + 12345),
                                     "cpu")
        # same test strings: the trained model's loss is far below its untrained copy's, its accuracy no lower
        assert m[f"copy_loss/{name}/L{L}"] < untrained["loss"] - 0.5, (name, m[f"copy_loss/{name}/L{L}"], untrained)
        assert m[f"copy_char_acc/{name}/L{L}"] > untrained["char_acc"] + 0.25, (name, m[f"copy_char_acc/{name}/L{L}"],
                                                                                 untrained)
        for L2 in cfg.eval_lens:
            assert 0.0 <= m[f"copy_acc/{name}/L{L2}"] <= m[f"copy_char_acc/{name}/L{L2}"] <= 1.0
        curve = blob["history"][f"probe/{name}"][0]
        reached = [x for x, a in curve if a >= 0.9]
        assert m[f"examples_to_90/{name}"] == (reached[0] if reached else None)
        assert m[f"reached_90/{name}"] == float(bool(reached))
        assert m[f"examples/{name}"] == curve[-1][0] and m[f"examples/{name}"] % cfg.batch == 0
    assert m["state_bits/lstm"] == 2 * cfg.lstm_dim * 32 and "state_bits/hard_alibi" not in m
    assert m["bound_len/lstm"] == pytest.approx(m["state_bits/lstm"] / math.log2(cfg.vocab))
    for n in cfg.hash_ns:  # fail rate <= p_rep, and p_rep near the birthday formula 1 - prod(1 - k / D^n)
        assert 1 - m[f"hash_copy_acc/n{n}"] <= m[f"p_rep/n{n}"] + 1e-9
        birthday = 1 - math.prod(1 - k / cfg.vocab ** n for k in range(cfg.hash_len - n + 1))
        assert abs(m[f"p_rep/n{n}"] - birthday) < 0.1, (n, m[f"p_rep/n{n}"], birthday)
    assert {f"suffix_ngram_acc/{n}/L14" for n in cfg.lookup_models} <= set(m)
    assert (tmp_path / "copying.png").exists() and (tmp_path / "copying_lengths.png").exists()


# ======================================================================
# icl_markov.py
# ======================================================================

def _icl_markov_cfg(tmp_path, **kw):
    return common.config_from_preset(icl_markov.Config, icl_markov.PRESETS, "smoke", device="cpu",
                                     out=str(tmp_path), **kw)


def test_icl_markov_smoke(tmp_path):
    blob = smoke(icl_markov, tmp_path)
    m = blob["metrics"]
    # the references are ordered, and the model passes uniform -> unigram -> bigram within the smoke budget
    assert m["kl_true/bigram/ref"] < m["kl_true/unigram/ref"] < m["kl_true/uniform/ref"]
    assert m["reached/bigram/main"] == 1.0
    assert 0 < m["phase_step/unigram/main"] < m["phase_step/bigram/main"] <= blob["config"]["iters"]
    assert m["kl_to_model/bigram/final"] < m["kl_to_model/unigram/final"]
    assert m["kl_true/transformer/final"] < m["kl_true/unigram/ref"]
    # the mechanism: layer 1 turns into a previous-token head
    assert m["prev_token_attn/main/final"] > max(0.5, 2 * m["prev_token_attn/main/before"])
    assert m["n_params/transformer/main"] == 3264                       # T=32: the relative table shrinks
    for key in ("transition_step/mix/p0", "transition_step/mix/p0.5", "reached/mix/p0",
                "transition_ds_kseq/mix/p0.5", "delay_step/mix/p0.5", "delay_ds_kseq/mix/p0.5",
                "half_rise_step/minimal/W", "half_rise_step/minimal/v", "order/minimal/W_first",
                "phase_step/trigram/trigram", "kl_true/transformer/trigram_final"):
        assert key in m, key
    assert m["kl_true/trigram/trigram_ref"] < m["kl_true/bigram/trigram_ref"]
    # the minimal model: layer 2 (W) covers half its change before layer 1 (v) does
    assert m["half_rise_step/minimal/W"] < m["half_rise_step/minimal/v"] and m["order/minimal/W_first"] == 1.0
    # DS chains at the transition = step x batch x (1 - p) / 1000
    if not math.isnan(m["transition_step/mix/p0.5"] or math.nan):
        assert m["transition_ds_kseq/mix/p0.5"] == pytest.approx(m["transition_step/mix/p0.5"] * blob["config"]["batch"] * 0.5 / 1000)
    assert (tmp_path / "icl_markov.png").exists()


def test_icl_markov_seeds_give_mean_and_std(tmp_path):
    blob = smoke(icl_markov, tmp_path, seeds=2, iters=20, mix_fracs=(0.0,), mix_ds_iters=20, trigram_iters=0,
                 minimal_iters=20)
    s = blob["config"]["seed"]
    assert blob["seeds"] == [s, s + 1] and len(blob["per_seed"]) == 2
    assert "kl_true/transformer/final" in blob["metrics_std"]


def test_icl_markov_bad_config():
    for kw in (dict(k=1), dict(prior="zipf"), dict(mix_fracs=(0.5, 1.0)), dict(betas=(0.9,)), dict(dropout=1.0)):
        with pytest.raises(ValueError):
            icl_markov.Config(**kw)


@pytest.mark.parametrize("prior", ["dirichlet", "doubly", "unigram", "mix"])
def test_icl_markov_sampler_rows_and_stationary(prior):
    g = torch.Generator().manual_seed(0)
    for k in (2, 3):
        P = icl_markov.sample_transition_matrices(512, k, 2, prior, g, mix_p=0.5)
        assert P.shape == (512, k, k)
        assert (P >= 0).all()
        assert torch.allclose(P.sum(-1), torch.ones(512, k), atol=1e-5)
        if prior == "doubly":
            assert torch.allclose(P.sum(-2), torch.ones(512, k), atol=1e-5)
        pi = icl_markov.stationary(P)
        assert torch.allclose(torch.einsum("bs,bst->bt", pi, P), pi, atol=1e-5)   # pi P = pi
        assert torch.allclose(pi.sum(-1), torch.ones(512), atol=1e-5)
    P3 = icl_markov.sample_transition_matrices(256, 2, 3, "dirichlet", g)
    L = icl_markov.lifted_chain(P3)
    pi3 = icl_markov.stationary(L)
    assert torch.allclose(torch.einsum("bs,bst->bt", pi3, L), pi3, atol=1e-5)


@pytest.mark.parametrize("p", [0.0, 0.25, 0.75])
def test_icl_markov_mixture_has_exactly_the_unigram_fraction(p):
    P = icl_markov.sample_transition_matrices(64, 3, 2, "mix", torch.Generator().manual_seed(3), mix_p=p)
    uni = (P == P[:, :1]).all(-1).all(-1)                  # every row the same: i.i.d. tokens
    assert int(uni.sum()) == round(p * 64)
    assert torch.allclose(P[~uni].sum(-2), torch.ones(int((~uni).sum()), 3), atol=1e-5)   # the rest: doubly


def test_icl_markov_mixture_holds_doubly_stochastic_chains_fixed(tmp_path, monkeypatch):
    """Fraction p trains mix_ds_iters / (1 - p) steps; transitions are converted to DS chains and compared with
    p = 0 at equal steps and at equal DS chains (crossing faked: half-way through each run)."""
    cfg = _icl_markov_cfg(tmp_path, T=16, n_test=64, batch=8, eval_every=5, mix_ds_iters=10, mix_fracs=(0.0, 0.5),
                          mix_stop=False)
    monkeypatch.setattr(icl_markov, "crossing", lambda ev, lo, hi: ev[-1][0] / 2)
    m, (curves, ref) = icl_markov.exp_mixture(cfg, 0)
    assert [curves[n][2][-1][0] for n in ("p0", "p0.5")] == [10, 20]     # steps: 10 / (1 - p)
    assert m["transition_step/mix/p0"] == 5 and m["transition_step/mix/p0.5"] == 10
    assert m["transition_ds_kseq/mix/p0"] == pytest.approx(5 * 8 / 1000)
    assert m["transition_ds_kseq/mix/p0.5"] == pytest.approx(10 * 8 * 0.5 / 1000)
    assert m["delay_step/mix/p0.5"] == pytest.approx(5) and m["delay_ds_kseq/mix/p0.5"] == pytest.approx(0)


def test_icl_markov_empirical_frequencies():
    g = torch.Generator().manual_seed(1)
    k = 2
    P = icl_markov.sample_transition_matrices(1, k, 2, "dirichlet", g).expand(8, k, k).contiguous()
    x = icl_markov.sample_chains(P, 10_000, g)
    freq = F.one_hot(x, k).float().mean((0, 1))
    assert torch.allclose(freq, icl_markov.stationary(P[:1])[0], atol=0.02)
    P3 = torch.tensor([[[0.7, 0.3], [0.2, 0.8], [0.5, 0.5], [0.35, 0.65]]]).expand(8, k * k, k).contiguous()
    x = icl_markov.sample_chains(P3, 10_000, g)
    ctx = x[:, :-2] + k * x[:, 1:-1]          # little-endian: the oldest token is the k^0 digit
    nxt = x[:, 2:]
    for c in range(k * k):
        sel = nxt[ctx == c]
        assert len(sel) > 1000
        assert torch.allclose(F.one_hot(sel, k).float().mean(0), P3[0, c], atol=0.02), c


def test_icl_markov_strategy_hand_examples():
    x = torch.tensor([[0, 1, 0, 1, 0]])
    assert torch.allclose(icl_markov.ngram_strategy(x, 2, 2), torch.tensor([[0.25, 0.75]]))   # 0->1 twice
    assert torch.allclose(icl_markov.ngram_strategy(x, 2, 1), torch.tensor([[4 / 7, 3 / 7]]))  # (3+1, 2+1)/(5+2)
    assert torch.allclose(icl_markov.ngram_strategy(x, 2, 0), torch.tensor([[0.5, 0.5]]))
    assert torch.allclose(icl_markov.ngram_strategy(x, 2, 3), torch.tensor([[1 / 3, 2 / 3]]))  # (1,0) -> 1 once
    x = torch.tensor([[2, 2, 1, 2, 0, 2]])
    assert torch.allclose(icl_markov.ngram_strategy(x, 3, 2), torch.tensor([[2 / 6, 2 / 6, 2 / 6]]))
    assert icl_markov.context_index(torch.tensor([[0, 1, 1, 0]]), 2, 3).item() == 1


def test_icl_markov_reference_kl_values():
    ref = icl_markov.make_test_set(2, 100, 2, 4096, seed=123)["kl_true_strategy"]
    for got, want in zip(ref, (0.213, 0.087, 0.0093)):   # a 20k-chain estimate
        assert abs(got - want) < 0.15 * want, (got, want)


def test_icl_markov_bayes_bigram_has_lowest_cross_entropy():
    g = torch.Generator().manual_seed(2)
    k, T = 2, 12
    x, P = icl_markov.sample_icl_mc(20_000, T, k, 2, "dirichlet", g)
    inp = x[:, :-1]
    p_true = P[torch.arange(len(P)), inp[:, -1]]
    ce = lambda s: -(p_true * s.log()).sum(-1).mean().item()
    best = ce(icl_markov.ngram_strategy(inp, k, 2, alpha=1.0))
    for other in (icl_markov.ngram_strategy(inp, k, 0), icl_markov.ngram_strategy(inp, k, 1),
                  icl_markov.ngram_strategy(inp, k, 2, alpha=0.5), icl_markov.ngram_strategy(inp, k, 2, alpha=2.0)):
        assert best < ce(other)


class _IclMarkovFixed(nn.Module):
    """Predicts `probs` at every position; layer-1 attention uniform over the causal prefix."""

    def __init__(self, probs):
        super().__init__()
        self.register_buffer("logp", torch.tensor(probs).log())

    def forward(self, idx, return_attn=False):
        B, T = idx.shape
        a = torch.tril(torch.ones(T, T))
        return self.logp.expand(B, T, -1), [(a / a.sum(-1, keepdim=True)).expand(B, 1, T, T)]


def test_icl_markov_kl_metrics_hand_computed():
    x = torch.tensor([[0, 1, 0, 1, 0], [1, 1, 1, 0, 1]])
    test = dict(x=x, p_true=torch.tensor([[0.5, 0.5], [0.9, 0.1]]), n=2,
                strat=[torch.full((2, 2), 0.5), torch.tensor([[4 / 7, 3 / 7], [2 / 7, 5 / 7]]),
                       torch.tensor([[1 / 4, 3 / 4], [2 / 5, 3 / 5]])])
    for m in (1, 2):
        assert torch.allclose(icl_markov.ngram_strategy(x, 2, m), test["strat"][m])
    res = icl_markov.evaluate(_IclMarkovFixed([0.8, 0.2]), test, "cpu")
    L = math.log
    want_true = (0.5 * L(0.5 / 0.8) + 0.5 * L(0.5 / 0.2) + 0.9 * L(0.9 / 0.8) + 0.1 * L(0.1 / 0.2)) / 2
    want_bi = (0.25 * L(0.25 / 0.8) + 0.75 * L(0.75 / 0.2) + 0.4 * L(0.4 / 0.8) + 0.6 * L(0.6 / 0.2)) / 2
    want_uni = (4 / 7 * L(4 / 7 / 0.8) + 3 / 7 * L(3 / 7 / 0.2) + 2 / 7 * L(2 / 7 / 0.8) + 5 / 7 * L(5 / 7 / 0.2)) / 2
    want_unif = 0.5 * L(0.5 / 0.8) + 0.5 * L(0.5 / 0.2)
    assert res["kl_true_model"] == pytest.approx(want_true, rel=1e-5)
    assert res["kl_bigram_model"] == pytest.approx(want_bi, rel=1e-5)
    assert res["kl_unigram_model"] == pytest.approx(want_uni, rel=1e-5)
    assert res["kl_uniform_model"] == pytest.approx(want_unif, rel=1e-5)
    # the uniform causal layer puts 1/(i+1) on x_(i-1) at position i: the probe averages i = 1..T-1
    assert res["prev_token_attn"] == pytest.approx(sum(1 / (i + 1) for i in range(1, 5)) / 4, rel=1e-5)
    assert res["prev2_token_attn"] == pytest.approx(sum(1 / (i + 1) for i in range(2, 5)) / 3, rel=1e-5)


def _icl_markov_hand_set_layer1(T, distance=None, big=30.0):
    """A transformer whose layer 1 attends to `distance` back at every position (None: uniformly)."""
    torch.manual_seed(0)
    model = icl_markov.AttnOnlyTransformer(2, T, d=16, n_layer=2, heads_first_layer=1, dropout=0.0).eval()
    l1 = model.layers[0]
    with torch.no_grad():
        l1.ln.weight.zero_()
        l1.ln.bias.fill_(1.0)                 # LN(x) = 1 for every token: the same query everywhere
        l1.K.weight.zero_()                   # no content term
        l1.rel.weight.zero_()
        if distance is not None:
            q = l1.Q(l1.ln.bias)
            l1.rel.weight[distance] = big * math.sqrt(16) * q / q.dot(q)   # q . r_d / sqrt(hd) = big
    return model


def test_icl_markov_probe_reads_a_hand_set_previous_token_layer():
    T = 40
    test = icl_markov.make_test_set(2, T, 2, 64, seed=5)
    res = icl_markov.evaluate(_icl_markov_hand_set_layer1(T, 1), test, "cpu")
    assert res["prev_token_attn"] > 0.999 and res["prev2_token_attn"] < 1e-3
    res = icl_markov.evaluate(_icl_markov_hand_set_layer1(T, 2), test, "cpu")
    assert res["prev2_token_attn"] > 0.999 and res["prev_token_attn"] < 0.02
    res = icl_markov.evaluate(_icl_markov_hand_set_layer1(T, None), test, "cpu")
    assert res["prev_token_attn"] == pytest.approx(sum(1 / (i + 1) for i in range(1, T)) / (T - 1), rel=1e-4)


def test_icl_markov_relative_scores_match_a_hand_loop():
    torch.manual_seed(3)
    B, T, d, H = 2, 6, 8, 2
    layer = icl_markov.RelAttention(d, H, block_size=10, dropout=0.0).eval()
    x = torch.randn(B, T, d)
    out, att = layer(x, return_attn=True)
    h = layer.ln(x)
    q, k, v = layer.Q(h), layer.K(h), layer.V(h)
    hd = d // H
    want = torch.zeros(B, H, T, T)
    for b in range(B):
        for hh in range(H):
            sl = slice(hh * hd, (hh + 1) * hd)
            for i in range(T):
                s = torch.tensor([float(q[b, i, sl] @ (k[b, j, sl] + layer.rel.weight[i - j, sl])) / math.sqrt(hd)
                                  for j in range(i + 1)])
                want[b, hh, i, :i + 1] = s.softmax(0)
    assert torch.allclose(att, want, atol=1e-6)
    with torch.no_grad():                     # the relative term matters: other r, other output
        layer.rel.weight.mul_(3.0)
    assert not torch.allclose(layer(x)[0], out, atol=1e-4)


def test_icl_markov_relative_attention_without_r_is_causal_sdpa():
    torch.manual_seed(2)
    B, T, d, H = 3, 17, 16, 2
    layer = icl_markov.RelAttention(d, H, block_size=32, dropout=0.0).eval()
    with torch.no_grad():
        layer.rel.weight.zero_()
    x = torch.randn(B, T, d)
    out, _ = layer(x)
    h = layer.ln(x)
    q, k, v = (m(h).view(B, T, H, d // H).transpose(1, 2) for m in (layer.Q, layer.K, layer.V))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, d)
    assert torch.allclose(out, x + layer.c_proj(y), atol=1e-5)


def test_icl_markov_without_relative_positions_no_bigram_phase(tmp_path):
    cfg = _icl_markov_cfg(tmp_path)
    test = icl_markov.make_test_set(cfg.k, cfg.T, 2, cfg.n_test, cfg.test_seed)
    reached = {}
    for rel in (True, False):
        model = icl_markov.make_transformer(cfg, cfg.k, 2, cfg.seed)
        if not rel:                            # no positional information at all (NoPE)
            for layer in model.layers:
                layer.rel.weight.data.zero_()
                layer.rel.weight.requires_grad_(False)
        stream = icl_markov.chain_stream(cfg.batch, cfg.T, cfg.k, 2, "dirichlet", torch.Generator().manual_seed(cfg.seed + 1),
                                         "cpu")                # the main run's stream
        hist = icl_markov.train(model, icl_markov.adamw(model, cfg.lr, cfg), cfg, stream, cfg.iters, "t",
                                lambda m, s: icl_markov.evaluate(m, test, "cpu"))
        reached[rel] = icl_markov.crossing(hist["evals"], "unigram", "bigram") is not None
    assert reached == {True: True, False: False}


def test_icl_markov_crossing_and_half_rise_hand_examples():
    ev = [(0, {"kl_unigram_model": 0.1, "kl_bigram_model": 0.3}), (10, {"kl_unigram_model": 0.1, "kl_bigram_model": 0.2}),
          (20, {"kl_unigram_model": 0.2, "kl_bigram_model": 0.1})]
    assert icl_markov.crossing(ev, "unigram", "bigram") == pytest.approx(15.0)   # d: 0.1 -> -0.1
    assert icl_markov.crossing(ev[:2], "unigram", "bigram") is None
    assert icl_markov.half_rise([0, 10, 20, 30], [0.0, 0.1, 0.3, 0.4]) == pytest.approx(15.0)
    assert icl_markov.half_rise([0, 10, 20], [1.0, 0.0, 0.0]) == pytest.approx(5.0)


def test_icl_markov_diag_gap_hand_examples():
    assert icl_markov.diag_gap(torch.eye(2)) == pytest.approx(1.0)
    assert abs(icl_markov.diag_gap(torch.full((3, 3), 0.01))) < 1e-7                    # the minimal model's init
    assert icl_markov.diag_gap(torch.tensor([[3., 1, 2], [0, 5, 1], [1, 1, 4]])) == pytest.approx(4.0 - 1.0)


def test_icl_markov_causality():
    T = 20
    torch.manual_seed(0)
    tf = icl_markov.AttnOnlyTransformer(3, T, d=16, n_layer=2, heads_first_layer=2, dropout=0.0).eval()
    mm = icl_markov.MinimalModel(3, T)
    with torch.no_grad():
        mm.v.copy_(torch.randn(T))
        mm.W.copy_(torch.randn(3, 3))
    for model in (tf, mm):
        assert_causal(lambda x: model(x)[0], vocab=3, T=T, cut=9)


def test_icl_markov_hand_set_minimal_model_counts_bigrams():
    torch.manual_seed(1)
    k, T, c = 3, 30, 0.7
    mm = icl_markov.MinimalModel(k, T)
    with torch.no_grad():
        mm.v.fill_(-30.0)
        mm.v[1] = 30.0
        mm.W.copy_(c * torch.eye(k))
    x = torch.randint(0, k, (8, T))
    e = F.one_hot(x, k).float()
    h, _ = mm.layer1(e)
    assert torch.allclose(h[:, 1:], e[:, :-1], atol=1e-4)          # h_j = e_{x_{j-1}}
    assert torch.allclose(h[:, 0], e[:, 0], atol=1e-6)             # position 0 only sees itself
    want = torch.zeros(8, T, k)
    for b in range(8):
        for t in range(T):
            for j in range(1, t + 1):
                if x[b, j - 1] == x[b, t]:
                    want[b, t, x[b, j]] += c
            if x[b, 0] == x[b, t]:
                want[b, t, x[b, 0]] += c
    assert torch.allclose(mm(x)[0], want, atol=1e-4)
    test = icl_markov.make_test_set(k, T, 2, 32, seed=4)
    assert icl_markov.evaluate(mm, test, "cpu")["prev_token_attn"] > 0.999


def test_icl_markov_param_count():
    model = icl_markov.AttnOnlyTransformer(k=2, block_size=100, d=16, n_layer=2, heads_first_layer=1)
    assert common.count_params(model) == 5440   # the official run prints 5440


def test_icl_markov_pieces_copy_out():
    ns = copy_out(icl_markov.RelAttention, icl_markov.AttnOnlyTransformer, icl_markov.MinimalModel,
                  icl_markov.ngram_strategy, icl_markov.kl, icl_markov.lifted_chain, icl_markov.stationary,
                  icl_markov.sample_chains)
    x = torch.randint(0, 3, (2, 12))
    for name, args in (("AttnOnlyTransformer", (3, 16, 16, 2, 2, 0.0)), ("MinimalModel", (3, 16))):
        torch.manual_seed(0)
        ours = getattr(icl_markov, name)(*args).eval()
        pasted = ns[name](*args).eval()
        pasted.load_state_dict(ours.state_dict())
        assert torch.allclose(ours(x)[0], pasted(x)[0], atol=1e-6), name
    assert torch.allclose(ns["ngram_strategy"](x, 3, 2), icl_markov.ngram_strategy(x, 3, 2))
    P = icl_markov.sample_transition_matrices(4, 3, 2, "dirichlet", torch.Generator().manual_seed(0))
    assert torch.equal(ns["sample_chains"](P, 9, torch.Generator().manual_seed(1)),
                       icl_markov.sample_chains(P, 9, torch.Generator().manual_seed(1)))


# ======================================================================
# moe.py
# ======================================================================


def test_moe_smoke(tmp_path):
    blob = smoke(moe, tmp_path)
    m = blob["metrics"]
    for name in ("dense_d16", "moe_e8_k2"):
        assert m[f"phonebook_params/{name}/total"] >= m[f"phonebook_params/{name}/active"] > 0
        # 50 entries x 3 digits: chance recall is 1e-3; a working loop memorizes a good share in 150 steps
        assert 0.3 < m[f"phonebook_acc/{name}"] <= 1.0, m
    assert m["phonebook_params/moe_e8_k2/total"] > m["phonebook_params/moe_e8_k2/active"]
    assert m["phonebook_params/dense_d16/total"] == m["phonebook_params/dense_d16/active"]
    # graph answers: the loss starts at ~ln(vocab); a working loop is well below it after 30 steps
    assert m["graph_loss/dense_d16"] < 0.75 * math.log(len(moe.graph_vocab(6)))
    assert 0.0 <= m["graph_acc/dense_d16"] <= 1.0
    assert 1.0 <= m["phonebook_load/moe_e8_k2/max_over_mean"] < 3.0                 # routing stays spread
    assert blob["complete"] and (tmp_path / "moe_phonebook.png").exists()


def _moe_recall(E, seed, steps=200, d=8, hid=8, n=16, digits=2):
    """Closed-book recall of a 256-entry phone-book by embeddings -> one FFN (MoE or dense of equal active
    size) -> digit heads, trained full-batch: a dedicated small run where memory must live in the FFN."""
    tok = moe.phonebook_vocab(n, n)
    book = moe.make_phonebook(n * n, digits, n, n, torch.Generator().manual_seed(seed))
    names, y = book[:, 1:3], book[:, 4:4 + digits] - tok["0"]
    torch.manual_seed(seed)
    emb, head = nn.Embedding(len(tok), d), nn.Linear(d, 10 * digits)
    ffn = moe.MoE(d, hid, E, 2) if E > 1 else moe.MLP(d, 2 * hid)         # top-2 of hid = dense of 2*hid
    params = [*emb.parameters(), *ffn.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=2e-2)
    logits = lambda: head(emb(names).sum(1) + ffn(emb(names).sum(1)[None])[0]).view(-1, digits, 10)
    for _ in range(steps):
        loss = F.cross_entropy(logits().reshape(-1, 10), y.reshape(-1)) + (0.01 * ffn.aux if E > 1 else 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((logits().argmax(-1) == y).all(1).float().mean())


def test_moe_recall_rises_with_experts():
    # measured over seeds 0-3: dense 0.46-0.55, E=4 0.87-0.99; all tokens sent to 2 fixed experts: 0.47-0.58
    dense, four = _moe_recall(1, seed=1), _moe_recall(4, seed=1)
    assert four > dense + 0.2, (dense, four)


def _moe_layer(d=8, hid=16, E=4, k=2, **kw):
    torch.manual_seed(0)
    layer = moe.MoE(d, hid, E, k, **kw)
    for p in layer.parameters():
        nn.init.normal_(p, 0.0, 0.3)
    return layer


def _moe_reference(layer, x):
    """Per-token loop: y_t = sum over its top-k experts of gate * expert(x_t)."""
    _, _, w, idx = layer.route(x)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(layer.k):
            out[t] += w[t, j] * layer.experts[int(idx[t, j])](x[t])
    return out


def test_moe_router_probs_topk_and_load():
    layer = _moe_layer(E=8, k=2)
    x = torch.randn(50, 8)
    _, probs, w, idx = layer.route(x)
    assert torch.allclose(probs.sum(-1), torch.ones(50), atol=1e-6)
    assert torch.allclose(w.sum(-1), torch.ones(50), atol=1e-6)             # renormalised top-k gates
    assert idx.shape == (50, 2) and (idx[:, 0] != idx[:, 1]).all()           # exactly k distinct experts
    assert torch.equal(idx[:, 0], probs.argmax(-1))                         # the top expert comes first
    layer(x[None])
    assert torch.equal(layer.load, torch.bincount(idx.reshape(-1), minlength=8))   # every token counted k times


@pytest.mark.parametrize("E,k", [(2, 1), (4, 2), (8, 2)])
@pytest.mark.parametrize("dispatch", ["loop", "grouped"])
@pytest.mark.parametrize("act", ["gelu", "swiglu"])
def test_moe_dispatch_equals_token_loop(E, k, dispatch, act):
    layer = _moe_layer(E=E, k=k, dispatch=dispatch, act=act)
    x = torch.randn(2, 9, 8)
    assert torch.allclose(layer(x).reshape(-1, 8), _moe_reference(layer, x.reshape(-1, 8)), atol=1e-5)


def test_moe_layer_copies_out_with_torch_alone():
    ns = copy_out(moe.MLP, moe.MoE)
    for dispatch, act, cap in (("loop", "gelu", 0.0), ("grouped", "swiglu", 0.0), ("loop", "gelu", 0.5)):
        ours = _moe_layer(E=4, k=2, dispatch=dispatch, act=act, capacity_factor=cap)
        pasted = ns["MoE"](8, 16, 4, 2, act, True, cap, dispatch)
        pasted.load_state_dict(ours.state_dict())
        x = torch.randn(3, 7, 8)
        assert torch.allclose(ours(x), pasted(x), atol=1e-6)
        assert torch.allclose(ours.aux, pasted.aux) and torch.equal(ours.load, pasted.load)


def test_moe_e1_equals_dense_mlp():
    d, hid = 8, 32
    torch.manual_seed(0)
    dense = common.MLP(d, hid)
    layer = moe.MoE(d, hid, n_experts=1, k=1)
    layer.experts[0].fc.weight.data.copy_(dense.fc.weight.data)
    layer.experts[0].proj.weight.data.copy_(dense.proj.weight.data)
    x = torch.randn(3, 5, d)
    assert torch.allclose(layer(x), dense(x), atol=1e-6)


def test_moe_soft_when_k_equals_E_and_permutation_equivariant():
    layer = _moe_layer(E=4, k=4)
    x = torch.randn(20, 8)
    probs = torch.softmax(x @ layer.router.weight.T, -1)
    soft = sum(probs[:, e:e + 1] * layer.experts[e](x) for e in range(4))
    assert torch.allclose(layer(x), soft, atol=1e-5)
    layer2 = _moe_layer(E=4, k=2)
    y = layer2(x)
    perm = torch.tensor([2, 0, 3, 1])
    layer2.router.weight.data = layer2.router.weight.data[perm]
    layer2.experts = nn.ModuleList([layer2.experts[int(i)] for i in perm])
    assert torch.allclose(layer2(x), y, atol=1e-5)


def test_moe_load_balancing_loss_values_and_router_gradient():
    layer = _moe_layer(E=8, k=2)
    nn.init.zeros_(layer.router.weight)                                      # uniform router
    layer(torch.randn(64, 8))
    assert abs(float(layer.aux.detach()) - 1.0) < 1e-6                                # the minimum, whatever top-k picks
    layer = _moe_layer(E=8, k=1, renorm=False)
    layer.router.weight.data.zero_()
    layer.router.weight.data[0] = 50.0                                       # every token -> expert 0
    layer(torch.ones(64, 8))
    assert abs(float(layer.aux.detach()) - 8.0) < 1e-3                                # total collapse: aux = E
    layer = _moe_layer(E=8, k=2)
    layer(torch.randn(64, 8)).pow(2).sum().backward()                        # task loss only, k < E
    assert layer.router.weight.grad.abs().sum() > 0                          # gates carry gradient to the router


@pytest.mark.parametrize("dispatch", ["loop", "grouped"])
def test_moe_capacity(dispatch):
    layer = _moe_layer(E=4, k=2, capacity_factor=0.5, dispatch=dispatch)
    x = torch.randn(40, 8)
    y = layer(x)
    assert torch.allclose(y, _moe_layer(E=4, k=2, capacity_factor=0.5, dispatch="loop")(x), atol=1e-5)
    cap = math.ceil(0.5 * 2 * 40 / 4)
    _, _, _, idx = layer.route(x)
    kept = torch.bincount(idx.reshape(-1), minlength=4).clamp(max=cap)
    assert layer.dropped == 80 - int(kept.sum()) > 0
    assert torch.allclose(_moe_layer(E=4, k=2, capacity_factor=1e6, dispatch=dispatch)(x), _moe_layer(E=4, k=2)(x),
                          atol=1e-6)


def test_moe_param_counts_by_hand():
    cfg = moe.Config()
    V, T, d, L = 20, 8, 16, 2
    dense = moe.build_model(V, T, d, L, 4, 4, cfg, 0)
    m4 = moe.build_model(V, T, d, L, 4, 4, cfg, 4)
    m16 = moe.build_model(V, T, d, L, 4, 4, cfg, 16)
    emb = 2 * V * d + T * d + d                                               # wte, lm_head, wpe, ln_f
    per_layer = 2 * d + 4 * d * d                                            # ln1, ln2, attention
    assert moe.param_counts(dense) == (emb + L * (per_layer + 8 * d * d),) * 2
    expert = 2 * d * (4 * d // 2)
    total4 = emb + L * (per_layer + 4 * d + 4 * expert)
    assert moe.param_counts(m4) == (total4, total4 - L * 2 * expert) == (11216, 7120)
    t16, a16 = moe.param_counts(m16)
    assert a16 - moe.param_counts(dense)[1] == L * 16 * d                    # only the router differs
    assert t16 - a16 == L * (16 - 2) * expert


def test_moe_gap_closed_by_hand():
    rows = {"dense_d8": dict(E=1, total=100, acc=0.2), "dense_d16": dict(E=1, total=400, acc=0.6),
            "dense_d32": dict(E=1, total=1600, acc=0.9), "moe_e4_k2": dict(E=4, total=200, acc=0.3),
            "moe_e16_k2": dict(E=16, total=500, acc=0.5)}
    g = moe.gap_closed(rows, "graph", 8)                                      # hi = dense_d16 (total closest to 500)
    assert g == pytest.approx({"graph_gap_closed/moe_e4_k2": 0.25, "graph_gap_closed/moe_e16_k2": 0.75})
    assert moe.gap_closed({k: v for k, v in rows.items() if k.startswith("dense")}, "graph", 8) == {}


def _moe_bfs(adj, s):
    dist, q = {s: 0}, collections.deque([s])
    while q:
        u = q.popleft()
        for v in adj[u]:
            if v not in dist:
                dist[v] = dist[u] + 1
                q.append(v)
    return dist


def _moe_decode_edges(seq, m, tok):
    names = [tok.itos[i] for i in seq[1:1 + m]]
    return [tuple(int(x) for x in name[1:].split("_")) for name in names]


@pytest.mark.parametrize("task", ["path", "2hop"])
def test_moe_graph_answers_checked_by_bfs(task):
    n, m = 8, 10
    data = moe.make_graph_task(200, n, m, task, torch.Generator().manual_seed(3))
    tok = moe.graph_vocab(n)
    P = data["prompt_len"]
    for i in range(200):
        seq = data["seqs"][i].tolist()
        assert seq[0] == tok["<bos>"] and seq[m + 1] == tok["|"] and seq[P - 1] == tok[":"]
        edges = _moe_decode_edges(seq, m, tok)
        assert len(set(edges)) == m and all(u < v for u, v in edges)
        adj = {v: set() for v in range(n)}
        for u, v in edges:
            adj[u].add(v), adj[v].add(u)
        s, t = seq[m + 2] - tok["v0"], seq[m + 3] - tok["v0"]
        dist = _moe_bfs(adj, s)
        assert t in dist and dist[t] == int(data["dist"][i]) and (dist[t] == 2 if task == "2hop" else dist[t] >= 2)
        path = [x - tok["v0"] for x in seq[P:P + dist[t] + 1]]
        assert path[0] == s and path[-1] == t and seq[P + dist[t] + 1] == tok["<eos>"]
        assert all(b in adj[a] for a, b in zip(path, path[1:]))
    ok = moe.check_paths(data["seqs"][:, P:], data["A"], data["s"], data["t"], data["dist"], tok["v0"], tok["<eos>"])
    assert ok.all()


def test_moe_path_checker_accepts_any_shortest_path():
    # square 0-1-3, 0-2-3 plus tail 3-4: two shortest paths 0 -> 3
    n = 5
    A = torch.zeros(1, n, n, dtype=torch.bool)
    for u, v in [(0, 1), (1, 3), (0, 2), (2, 3), (3, 4)]:
        A[0, u, v] = A[0, v, u] = True
    tok = moe.graph_vocab(n)
    v0, eos = tok["v0"], tok["<eos>"]
    check = lambda p: bool(moe.check_paths(torch.tensor([p]), A, torch.tensor([0]), torch.tensor([3]),
                                           torch.tensor([2]), v0, eos)[0])
    assert check([v0 + 0, v0 + 1, v0 + 3, eos, 0])
    assert check([v0 + 0, v0 + 2, v0 + 3, eos, 0])                            # the other tie is fine
    assert not check([v0 + 0, v0 + 4, v0 + 3, eos, 0])                        # 0-4 is not an edge
    assert not check([v0 + 0, v0 + 1, v0 + 3, v0 + 4, eos])                   # no <eos> after t
    assert not check([v0 + 1, v0 + 3, v0 + 3, eos, 0])                        # does not start at s
    assert not check([v0 + 3, v0 + 1, v0 + 3, eos, 0])                        # a 2-hop walk to t from 3, not s
    assert not check([v0 + 0, v0 + 1, v0 + 0, eos, 0])                        # a 2-hop walk that ends at 0, not t
    targets = {tuple(moe.shortest_path_targets(A, moe.all_pairs_dist(A), torch.tensor([0]), torch.tensor([3]), 4,
                                               torch.Generator().manual_seed(i))[0].tolist()) for i in range(20)}
    assert targets == {(0, 1, 3, -1), (0, 2, 3, -1)}                          # random ties: both shortest paths


def test_moe_heldout_graphs_share_no_graph_with_training():
    n, m = 5, 4                                                              # 210 graphs: training sees most of them
    train, test = moe.graph_split(300, 40, n, m, "2hop", seed=0)
    tok = moe.graph_vocab(n)
    as_set = lambda seq: frozenset(_moe_decode_edges(seq, m, tok))
    seen = {as_set(s) for s in train["seqs"].tolist()}
    assert len(test["seqs"]) == 40 and len(seen) > 100                       # duplicates were there to remove
    assert not any(as_set(s) in seen for s in test["seqs"].tolist())
    for i, seq in enumerate(test["seqs"].tolist()):                           # the kept graphs match their tokens
        A = torch.zeros(n, n, dtype=torch.bool)
        for u, v in _moe_decode_edges(seq, m, tok):
            A[u, v] = A[v, u] = True
        assert torch.equal(A, test["A"][i])


def test_moe_eval_scores_oracles():
    seqs = moe.make_phonebook(500, 4, 30, 30, torch.Generator().manual_seed(0))
    assert len({(a, b) for a, b in seqs[:, 1:3].tolist()}) == 500              # unique names

    class Lookup(nn.Module):                                                  # a "model" that knows the book
        def __init__(self, rows, wrong=False):
            super().__init__()
            self.table, self.wrong = {tuple(r[:4]): r for r in rows.tolist()}, wrong

        def generate(self, prefix, n_new, greedy=True):
            out = torch.tensor([self.table[tuple(p)] for p in prefix.tolist()])
            out[::2, -2] = (out[::2, -2] + 1) if self.wrong else out[::2, -2]  # every other entry off by one digit
            return out

        def forward(self, x, y):
            return None, torch.zeros(())
    assert moe.eval_phonebook(Lookup(seqs), seqs, "cpu", 128, 0)["acc"] == 1.0
    assert moe.eval_phonebook(Lookup(seqs, wrong=True), seqs, "cpu", 128, 0)["acc"] == 0.5
    data = moe.make_graph_task(64, 8, 10, "path", torch.Generator().manual_seed(1))
    P = data["prompt_len"]
    full = {tuple(r[:P]): r for r in data["seqs"].tolist()}

    class PathOracle(Lookup):
        def generate(self, prefix, n_new, greedy=True):
            return torch.tensor([full[tuple(p)] for p in prefix.tolist()])
    assert moe.eval_graph(PathOracle(data["seqs"]), data, "cpu", 16)["acc"] == 1.0

    class DetourOracle(Lookup):                                               # every other answer skips a hop
        def generate(self, prefix, n_new, greedy=True):
            out = torch.tensor([full[tuple(p)] for p in prefix.tolist()])
            out[::2, P + 1] = out[::2, P]                                      # s s ... : not a path
            return out
    assert moe.eval_graph(DetourOracle(data["seqs"]), data, "cpu", 16)["acc"] == 0.5


def test_moe_train_loop_adds_the_balancing_and_z_losses(tmp_path):
    def router_after(aux_coef, z_coef=0.0):
        cfg = common.config_from_preset(moe.Config, moe.PRESETS, "smoke", device="cpu", out=str(tmp_path),
                                        aux_coef=aux_coef, z_coef=z_coef)
        torch.manual_seed(0)
        model = moe.build_model(20, 9, 16, 1, 4, 8, cfg, 4)
        data = torch.randint(1, 20, (64, 9), generator=torch.Generator().manual_seed(1))
        hist, load = moe.train(model, cfg, lambda step: moe.answer_targets(data, 4, 0), 5, 1e-2, 0.0, "test")
        assert torch.allclose(load.sum(1), torch.ones(1)) and hist["step"] == [0, 4]   # logged: first, last
        return model.blocks[0].mlp.router.weight.detach().clone()
    plain = router_after(0.0)
    assert not torch.allclose(plain, router_after(10.0)) and not torch.allclose(plain, router_after(0.0, 10.0))
    assert torch.equal(plain, router_after(0.0))                               # deterministic otherwise


def test_moe_bad_config():
    for kw in (dict(pb_experts=(1,), top_k=2), dict(graph_edges=1000), dict(graph_task="maze"),
               dict(pb_moe_width=48), dict(top_k=0), dict(graph_heads=0), dict(graph_nodes=5, graph_edges=4)):
        with pytest.raises(ValueError):
            moe.Config(**kw)


# ======================================================================
# linear_ntp.py
# ======================================================================

def test_linear_ntp_smoke(tmp_path):
    blob = smoke(linear_ntp, tmp_path)
    m = blob["metrics"]
    for fmt in linear_ntp.FORMATS:
        for fam in ("mult_acc", "mult_valid_acc", "mult_train_acc"):
            assert 0.0 <= m[f"{fam}/mlp/{fmt}"] <= 1.0
        assert math.isfinite(m[f"mult_final_loss/mlp/{fmt}"])
    # the capacity-matched control: same context length and parameter count as the CoT model
    assert m["mult_T/mlp/answer_pad"] == m["mult_T/mlp/cot"] == 77 and m["mult_T/mlp/answer"] == 11
    assert m["mult_params/mlp/answer_pad"] == m["mult_params/mlp/cot"] > 5 * m["mult_params/mlp/answer"]
    # the CoT's expansion tokens are learned even in 40 steps (chance ~1/117)
    assert m["mult_tf/mlp/expansion"] > 0.3
    # every parity CoT step is a linear threshold: learned far above chance; without CoT, chance
    assert m["parity_acc/linear/cot"] >= 0.9
    assert m["parity_acc/linear/nocot"] <= 0.75
    assert m["parity_cot_tokens/linear/cot"] == 11 and m["parity_cot_tokens/linear/xor"] == 5
    assert blob["complete"] and (tmp_path / "linear_ntp.png").exists()


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_linear_ntp_cot_answer_is_product(n):
    lo, hi = linear_ntp.operand_range(n)
    g = torch.Generator().manual_seed(n)
    a, b = torch.randint(lo, hi, (200,), generator=g), torch.randint(lo, hi, (200,), generator=g)
    x, seg = linear_ntp.mult_batch(a, b, n, "cot")
    assert x.shape[1] == {1: 28, 2: 77, 3: 166, 4: 307}[n] == linear_ntp.seq_len(n, "cot")
    tok = linear_ntp.MTOK
    for i in range(0, 200, 7):
        words = tok.decode(x[i]).split()
        assert words == linear_ntp.cot_text(int(a[i]), int(b[i]), n).split()   # batched == reference
        parts = " ".join(words).split(" = ")
        assert len(parts) == 5             # prompt, expansion, digit products, partial products, answer
        partials = [int("".join(p.split())) for p in parts[3].split(" + ")]
        assert sum(partials) == int(a[i]) * int(b[i])
        assert int("".join(parts[4].split())) == int(a[i]) * int(b[i])
        for factor, v in zip(parts[1].split(" ) x ( "), (a[i], b[i])):     # the expansion rebuilds a and b
            terms = factor.strip("( )").split(" + ")
            assert sum(int(t.split(" x ")[0]) * int("".join(t.split(" x ")[1].split())) for t in terms) == int(v)
    ans = x[:, seg == 4] - tok["0"]
    val = (ans * 10 ** torch.arange(ans.shape[1] - 1, -1, -1)).sum(1)
    assert torch.equal(val, a * b)


@pytest.mark.parametrize("n", [2, 4])
def test_linear_ntp_answer_only_formats(n):
    lo, hi = linear_ntp.operand_range(n)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(lo, hi, (50,), generator=g), torch.randint(lo, hi, (50,), generator=g)
    cot, _ = linear_ntp.mult_batch(a, b, n, "cot")
    short, _ = linear_ntp.mult_batch(a, b, n, "answer")
    pad, seg = linear_ntp.mult_batch(a, b, n, "answer_pad")
    L, P = linear_ntp.answer_len(n), 2 * n + 3
    assert short.shape[1] == P + L == linear_ntp.seq_len(n, "answer")
    assert pad.shape == cot.shape                                           # same context length as the CoT
    assert torch.equal(pad[:, :P], cot[:, :P]) and torch.equal(short[:, :P], cot[:, :P])
    assert torch.equal(pad[:, -L:], cot[:, -L:]) and torch.equal(short[:, -L:], cot[:, -L:])  # same answer, same place
    assert (pad[:, P:-L] == linear_ntp.MTOK["[UNK]"]).all() and (seg[P:-L] == 5).all()
    assert linear_ntp.cot_text(23, 41, 2, cot=False) == linear_ntp.MTOK.decode(
        linear_ntp.mult_batch(torch.tensor([23]), torch.tensor([41]), 2, "answer")[0][0]) == "[BOS] 2 3 x 4 1 = 0 9 4 3"


def test_linear_ntp_official_strings():
    # token-for-token the official builder's output (emalach/LinearLM ProductDataset._nums_to_text)
    ref = ("[BOS] 1 1 1 8 x 9 9 9 8 = ( 8 x 1 + 1 x 1 0 + 1 x 1 0 0 + 1 x 1 0 0 0 ) x ( 8 x 1 + 9 x 1 0 + "
           "9 x 1 0 0 + 9 x 1 0 0 0 ) = 8x8 x 1 x 1 + 8x9 x 1 x 1 0 + 8x9 x 1 x 1 0 0 + 8x9 x 1 x 1 0 0 0 + "
           "1x8 x 1 0 x 1 + 1x9 x 1 0 x 1 0 + 1x9 x 1 0 x 1 0 0 + 1x9 x 1 0 x 1 0 0 0 + 1x8 x 1 0 0 x 1 + "
           "1x9 x 1 0 0 x 1 0 + 1x9 x 1 0 0 x 1 0 0 + 1x9 x 1 0 0 x 1 0 0 0 + 1x8 x 1 0 0 0 x 1 + "
           "1x9 x 1 0 0 0 x 1 0 + 1x9 x 1 0 0 0 x 1 0 0 + 1x9 x 1 0 0 0 x 1 0 0 0 = 6 4 + 7 2 0 + 7 2 0 0 + "
           "7 2 0 0 0 + 0 8 0 + 0 9 0 0 + 0 9 0 0 0 + 0 9 0 0 0 0 + 0 8 0 0 + 0 9 0 0 0 + 0 9 0 0 0 0 + "
           "0 9 0 0 0 0 0 + 0 8 0 0 0 + 0 9 0 0 0 0 + 0 9 0 0 0 0 0 + 0 9 0 0 0 0 0 0 = 1 1 1 7 7 7 6 4")
    assert linear_ntp.cot_text(1118, 9998, 4) == ref
    x, _ = linear_ntp.mult_batch(torch.tensor([1118]), torch.tensor([9998]), 4)
    assert linear_ntp.MTOK.decode(x[0]) == ref and x.shape[1] == 307


@pytest.mark.parametrize("n", [1, 2, 3])
def test_linear_ntp_split_by_unordered_pair(n):
    lo, hi = linear_ntp.operand_range(n)
    a, b = torch.arange(lo, hi).repeat_interleave(hi - lo), torch.arange(lo, hi).repeat(hi - lo)
    s = linear_ntp.split_of(a, b, n, seed=3)
    assert torch.equal(s, linear_ntp.split_of(b, a, n, seed=3))            # no pair's mirror in another split
    upper = a <= b                                                          # each unordered pair once
    N = int(upper.sum())
    counts = [int((s[upper] == k).sum()) for k in range(3)]
    assert counts[2] == N // 4 and counts[1] == N // 20 and sum(counts) == N
    assert not torch.equal(s, linear_ntp.split_of(a, b, n, seed=4))        # the seed reshuffles the split
    for k, split in enumerate(linear_ntp.SPLITS):
        pa, pb = linear_ntp.split_pairs(10 ** 6, n, split, seed=3)
        assert len(pa) == int((s == k).sum())                               # every pair of the split, once
        assert len(set(zip(pa.tolist(), pb.tolist()))) == len(pa)
    g = torch.Generator().manual_seed(0)
    ta, tb = linear_ntp.sample_pairs(500, n, "train", g, seed=3)
    assert (linear_ntp.split_of(ta, tb, n, 3) == 0).all()


def _linear_ntp_one_split(a, b, n, seed):
    """The split id (0 train / 1 valid / 2 test) shared by all pairs (a, b), or -1 if they mix splits."""
    s = linear_ntp.split_of(a, b, n, seed)
    return int(s[0]) if bool((s == s[0]).all()) else -1


def test_linear_ntp_each_metric_reads_its_own_split(monkeypatch, tmp_path):
    """Training batches come from train pairs; 'test' / 'valid' / 'train' exact match score their own split."""
    cfg = common.config_from_preset(linear_ntp.Config, linear_ntp.PRESETS, "smoke", device="cpu", seed=1,
                                    out=str(tmp_path))
    n, seen = cfg.ndigits, {}
    digits = lambda x, i: ((x[:, i:i + n] - linear_ntp.MTOK["0"]) * 10 ** torch.arange(n - 1, -1, -1)).sum(1)
    test_inputs = set((linear_ntp.parity_bits(4000, cfg.parity_bits, "test", torch.Generator().manual_seed(0),
                                              cfg.seed) * 2 ** torch.arange(cfg.parity_bits)).sum(1).tolist())
    in_test = lambda x, k: [v in test_inputs for v in ((x[:, 1:k + 1] - 2) * 2 ** torch.arange(k)).sum(1).tolist()]

    def fake_train(model, cfg_, get_batch, steps, lr, desc, eval_fn=None):
        x = get_batch(0)
        if desc.startswith("mult"):
            seen[desc] = _linear_ntp_one_split(digits(x, 1), digits(x, n + 2), n, cfg.seed)
        else:
            seen[desc] = sum(in_test(x, cfg.parity_bits))
        return {"loss": [0.0], "eval": [], "time_s": 0.0}

    def fake_eval(model, a, b, n_, fmt, chunk=500):
        return {"exact": _linear_ntp_one_split(a, b, n_, cfg.seed), "whole": 0.0,
                **{f"tf/{k}": 0.0 for k in linear_ntp.SEG_NAMES[1:]}}

    monkeypatch.setattr(linear_ntp, "train", fake_train)
    monkeypatch.setattr(linear_ntp, "eval_mult", fake_eval)
    monkeypatch.setattr(linear_ntp, "eval_parity", lambda model, x, k: float(np.mean(in_test(x, k))))
    for fmt in linear_ntp.FORMATS:
        res, _ = linear_ntp.exp_multiplication(cfg, fmt, torch.Generator().manual_seed(0))
        assert seen[f"mult {fmt}"] == 0                                     # trained on train pairs only
        assert (res["exact"], res["valid"], res["train"]) == (2, 1, 0)
    res, _ = linear_ntp.exp_parity(cfg, "cot", torch.Generator().manual_seed(0))
    assert seen["parity cot"] == 0 and res["acc"] == 1.0                   # trained off, scored on, test inputs


def test_linear_ntp_split_four_digits():
    va, vb = linear_ntp.split_pairs(2000, 4, "test", seed=0)
    assert len(set(zip(va.tolist(), vb.tolist()))) == 2000
    assert (linear_ntp.split_of(va, vb, 4, 0) == 2).all() and (linear_ntp.split_of(vb, va, 4, 0) == 2).all()
    assert 1111 <= int(va.min()) and int(va.max()) <= 9999


def _models(T=12, d=4, V=9, n_chunks=3):
    torch.manual_seed(0)
    return [linear_ntp.LinearNTP(V, T, d, mlp=m, n_chunks=n_chunks) for m in (False, True)]


def test_linear_ntp_causal_and_padding():
    for model in _models():
        assert_causal(model, vocab=9, T=12, cut=5)
        x = torch.randint(0, 9, (5, 12))
        base = model(x)
        for j in (0, 4, 11):
            x2 = x.clone()
            x2[:, j] = (x2[:, j] + 1) % 9
            out = model(x2)
            assert torch.equal(out[:, :j], base[:, :j])       # exactly unchanged before j
            assert not torch.allclose(out[:, j], base[:, j])  # position j sees x_j (diagonal block)
        for k in (1, 5, 12):
            assert torch.allclose(model(x[:, :k]), base[:, :k], atol=1e-6)


def test_linear_ntp_mask_structure_and_counts():
    model = _models(T=6, d=3, n_chunks=2)[0]
    Wm = model.masked_weight().view(6, 3, 6, 3)
    for t in range(6):
        c = 0 if t < 3 else 1
        for s in range(6):
            if s > t:
                assert (Wm[t, :, s] == 0).all()
            else:
                t0 = model.rows[c][0]
                Wc = torch.cat([model.W_past[c - 1], model.W_diag[c]], 1) if c else model.W_diag[c]
                assert torch.equal(Wm[t, :, s], Wc[(t - t0) * 3:(t - t0 + 1) * 3, s * 3:(s + 1) * 3])
    assert linear_ntp.masked_block_params(307, 128) == 774_602_752     # the paper's 775M MLP
    assert linear_ntp.masked_block_params(64, 256) == 136_314_880      # TinyStories linear (+ embeddings)
    V = 9
    assert model.num_params() == 6 * 7 // 2 * 9 + V * 3 + (3 * V + V)
    assert model.num_params(effective=False) == (9 * 9 + 9 * 18) + V * 3 + (3 * V + V)   # rows 0-2 see s<3


@pytest.mark.parametrize("T, n_chunks", [(5, 8), (12, 3), (33, 8), (77, 16)])
def test_linear_ntp_blocked_forward_equals_official_dense(T, n_chunks):
    """forward_embedded's row blocks == the official F.linear(x, W*mask) on the whole (T*d)^2 matrix."""
    for model in _models(T=T, d=4, n_chunks=n_chunks):
        e = torch.randn(3, T, 4)
        dense = F.linear(e.reshape(3, -1), model.masked_weight()).view(3, T, 4)
        assert torch.allclose(model.forward_embedded(e), model.readout(dense), atol=1e-5)


def test_linear_ntp_is_linear_in_one_hot_context():
    lin, mlp = _models(T=10, d=5, V=7)
    torch.manual_seed(1)
    X = [F.one_hot(torch.randint(0, 7, (3, 10)), 7).float() for _ in range(3)]
    w = torch.tensor([0.5, 0.3, 0.2])                                   # affine combination (sums to 1)
    f = lambda m, oh: m.forward_embedded(oh @ m.emb.weight)
    for m, linear in ((lin, True), (mlp, False)):
        lhs = f(m, sum(wi * Xi for wi, Xi in zip(w, X)))
        rhs = sum(wi * f(m, Xi) for wi, Xi in zip(w, X))
        assert torch.allclose(lhs, rhs, atol=1e-5) == linear            # superposition: only the linear one
    h = torch.randn(4, 5)
    assert torch.allclose(mlp.readout(h), mlp.out(F.relu(mlp.lin2(F.relu(h)))))  # Out(ReLU(Lin2(ReLU(h))))
    assert torch.allclose(lin.readout(h), lin.out(h))
    # logits(x) - logits(x') for x, x' differing at j equals Out W[t,j] (Emb[x_j] - Emb[x'_j]) for t >= j
    x = torch.randint(0, 7, (1, 10))
    x2 = x.clone()
    j = 3
    x2[0, j] = (x[0, j] + 2) % 7
    diff = lin(x) - lin(x2)
    Wv = lin.masked_weight().view(10, 5, 10, 5)
    de = lin.emb.weight[x[0, j]] - lin.emb.weight[x2[0, j]]
    for t in range(j, 10):
        assert torch.allclose(diff[0, t], lin.out.weight @ (Wv[t, :, j] @ de), atol=1e-5)


def test_linear_ntp_incremental_generate_matches_full_forward():
    for model in _models():
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, 9, (4, 3), generator=g)
        out = model.generate(prompt, 20)
        assert out.shape == (4, 12)                                        # capped at T
        assert torch.equal(out[:, :3], prompt)
        assert torch.equal(model(out)[:, 2:-1].argmax(-1), out[:, 3:])     # each token = full-forward argmax


def test_linear_ntp_model_copies_out_with_torch_alone():
    ns = copy_out(linear_ntp.masked_block_params, linear_ntp.LinearNTP)
    for mlp in (False, True):
        torch.manual_seed(0)
        ours = linear_ntp.LinearNTP(11, 14, 4, mlp=mlp, n_chunks=4)
        pasted = ns["LinearNTP"](11, 14, 4, mlp=mlp, n_chunks=4)
        pasted.load_state_dict(ours.state_dict())
        x = torch.randint(0, 11, (3, 14))
        assert torch.allclose(ours(x), pasted(x), atol=1e-6)
        assert torch.equal(ours.generate(x[:, :4], 10), pasted.generate(x[:, :4], 10))
        assert pasted.num_params() == ours.num_params()


def test_linear_ntp_parity_cot_steps():
    g = torch.Generator().manual_seed(0)
    n = 9
    bits = torch.randint(0, 2, (300, n), generator=g)
    for mode, T in (("nocot", n + 3), ("xor", 2 * n + 2), ("cot", 3 * n + 2)):
        x = linear_ntp.parity_batch(bits, mode)
        assert x.shape == (300, T)
        assert torch.equal(x[:, 1:n + 1] - 2, bits)
        assert torch.equal(x[:, -1] - 2, bits.sum(1) % 2)                  # last token = parity
    x = linear_ntp.parity_batch(bits, "cot")[:, n + 2:] - 2
    c, p = x[:, 0::2], x[:, 1::2]
    prev = 0 * p[:, 0]
    for k in range(n):
        assert torch.equal(c[:, k], bits[:, k] * prev)                     # c_k = x_k AND p_{k-1}
        assert torch.equal(p[:, k], bits[:, k] + prev - 2 * c[:, k])       # p_k = x_k XOR p_{k-1}
        assert torch.equal(p[:, k], bits[:, :k + 1].sum(1) % 2)
        prev = p[:, k]
    assert linear_ntp.PTOK.decode(linear_ntp.parity_batch(torch.tensor([[1, 1, 0]]), "cot")[0]) == \
        "[BOS] 1 1 0 = 0 1 1 0 0 0"
    pw = 2 ** torch.arange(n)
    tr = linear_ntp.parity_bits(500, n, "train", g, seed=1)
    te = linear_ntp.parity_bits(500, n, "test", g, seed=1)
    assert not set(((tr * pw).sum(1)).tolist()) & set(((te * pw).sum(1)).tolist())   # disjoint inputs


class _Oracle(linear_ntp.LinearNTP):
    """Replays the ground truth of the sequences `ref` (looked up by their prompt); wrong digits if `lie`."""

    def __init__(self, ref, n, lie=False):
        super().__init__(len(linear_ntp.MULT_VOCAB), ref.shape[1], 2, mlp=False)
        self.ref, self.P, self.lie = ref, 2 * n + 3, lie

    def forward(self, idx):
        B, t = idx.shape
        rows = (idx[:, None, :self.P] == self.ref[None, :, :self.P]).all(-1).float().argmax(1)
        nxt = torch.cat([self.ref[rows, 1:t + 1], torch.zeros(B, max(0, t + 1 - self.ref.shape[1]),
                                                              dtype=torch.long)], 1)[:, :t]
        if self.lie:
            nxt[:, -1] = (nxt[:, -1] - 2 + 1) % 10 + 2 if t == self.ref.shape[1] - 1 else nxt[:, -1]
        return F.one_hot(nxt, len(linear_ntp.MULT_VOCAB)).float()

    @torch.no_grad()
    def generate(self, idx, max_new_tokens):
        for _ in range(max_new_tokens):
            idx = torch.cat([idx, self(idx)[:, -1].argmax(-1, keepdim=True)], 1)
        return idx


def test_linear_ntp_scoring_oracle_liar_and_random():
    """Exact match and per-segment accuracy: the ground truth scores 1, one wrong last digit scores 0."""
    n = 2
    a, b = linear_ntp.split_pairs(100, n, "test", seed=0)
    for fmt in linear_ntp.FORMATS:
        x, _ = linear_ntp.mult_batch(a, b, n, fmt)
        res = linear_ntp.eval_mult(_Oracle(x, n), a, b, n, fmt, chunk=37)
        assert res["exact"] == 1.0 and res["whole"] == 1.0 and res["tf/answer"] == 1.0
        liar = linear_ntp.eval_mult(_Oracle(x, n, lie=True), a, b, n, fmt, chunk=37)
        assert liar["exact"] == 0.0 and liar["tf/answer"] == pytest.approx(1 - 1 / linear_ntp.answer_len(n))
        if fmt == "cot":
            assert all(res[f"tf/{s}"] == 1.0 for s in linear_ntp.SEG_NAMES[1:5])
    torch.manual_seed(0)
    x, _ = linear_ntp.mult_batch(a, b, n, "cot")
    rnd = linear_ntp.LinearNTP(len(linear_ntp.MULT_VOCAB), x.shape[1], 4, mlp=True)
    assert linear_ntp.eval_mult(rnd, a, b, n, "cot")["exact"] <= 0.05


def test_linear_ntp_parity_scoring():
    n = 5
    bits = torch.randint(0, 2, (64, n), generator=torch.Generator().manual_seed(0))
    x = linear_ntp.parity_batch(bits, "cot")

    class ParityOracle(linear_ntp.LinearNTP):
        @torch.no_grad()
        def generate(self, idx, max_new_tokens):
            return x if not self.mlp else torch.cat([x[:, :-1], 5 - x[:, -1:]], 1)   # mlp=True: flip the last

    assert linear_ntp.eval_parity(ParityOracle(5, x.shape[1], 2), x, n) == 1.0
    assert linear_ntp.eval_parity(ParityOracle(5, x.shape[1], 2, mlp=True), x, n) == 0.0


def test_linear_ntp_bad_config_is_refused_before_work():
    for kw in (dict(ndigits=0), dict(ndigits=6), dict(parity_bits=1), dict(parity_bits=21),
               dict(ndigits=4, d=256)):
        with pytest.raises(ValueError):
            linear_ntp.Config(**kw)
    r = run_script("linear_ntp", "--preset", "smoke", "--device", "cpu", "--steps", "0", timeout=30)
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "--steps" in r.stderr
    assert "Traceback" not in r.stderr


# ======================================================================
# turing_programs.py
# ======================================================================

def _turing_programs_digits(gen, count, n):
    return torch.randint(0, 10, (count, n), generator=gen)


def _turing_programs_value(row):
    return int("".join(str(int(d)) for d in row))


def _turing_programs_lines(tokens):
    """Trace token ids -> list of lines (lists of token strings); lines[0] is the prompt."""
    toks = [tp.VOCAB[t] for t in tokens if tp.VOCAB[t] not in ("<bos>", "<pad>")]
    out, cur = [], []
    for t in toks:
        if t in ("|", "<eos>"):
            out.append(cur)
            cur = []
        else:
            cur.append(t)
    return out


_digits, _value, _lines = _turing_programs_digits, _turing_programs_value, _turing_programs_lines


def test_turing_programs_addition_answers():
    gen = torch.Generator().manual_seed(0)
    cases = [*((n, n, 200) for n in range(1, 12)), (20, 20, 30), (50, 50, 10), (1, 7, 50), (9, 2, 50), (3, 12, 30)]
    for na, nb, count in cases:
        a, b = _digits(gen, count, na), _digits(gen, count, nb)
        for fmt in ("tp", "plain", "none"):  # the baselines end in the same answer
            s = tp.addition(a, b, fmt)
            for i in range(count if fmt == "tp" else min(count, 20)):
                assert int(tp.parse_answer(s.tok[i].tolist())) == _value(a[i]) + _value(b[i])
        if na != nb:  # unequal lengths: max + 1 lines, a head that left its operand is not written
            s = tp.addition(a, b)
            lines = _lines(s.tok[0].tolist())[1:]
            assert len(lines) == max(na, nb) + 1
            letters = [sum(t in "abcdefghij" for t in line[line.index("=") + 1:][:na]) for line in lines]
            assert letters == [1] * na + [0] * (max(na, nb) + 1 - na)


@pytest.mark.parametrize("lsb", [True, False])
def test_turing_programs_addition_steps_are_local_edits(lsb):
    gen = torch.Generator().manual_seed(1)
    letter = {chr(ord("a") + d): str(d) for d in range(10)}
    for n in (1, 4, 9):
        a, b = _digits(gen, 30, n), _digits(gen, 30, n)
        s = tp.addition(a, b, lsb=lsb)
        w = (lambda x: x.flip(0)) if lsb else (lambda x: x)    # operands as written
        for i in range(30):
            lines = _lines(s.tok[i].tolist())[1:]
            assert len(lines) == n + 1
            prev = None
            for k, line in enumerate(lines):
                assert len(line) == 2 * n + 3 + k                     # step k: 2n+3+k tokens (+ separator)
                assert line[k + 1] == "=" and (line[0] in "NC" if k < n else line[0] in "01")
                ops = line[k + 2:]
                unmarked = [letter.get(t, t) for t in ops]
                assert unmarked == [str(int(d)) for d in w(a[i])] + ["+"] + [str(int(d)) for d in w(b[i])]
                assert _lines(s.tok[i].tolist())[0] == unmarked            # the prompt, written the same way
                marks = [j for j, t in enumerate(ops) if t in letter]
                head = k if lsb else n - 1 - k                              # the units first: column k
                assert marks == ([head, n + 1 + head] if k < n else [])
                if prev is not None:
                    changed = sum(x != y for x, y in zip(prev[k + 1:], ops))
                    assert changed <= 4                                 # the operands: heads moved
                    assert line[2:k + 1] == prev[1:k]                   # old digits copied behind the new one
                prev = line


def test_turing_programs_multiplication_answers():
    gen = torch.Generator().manual_seed(2)
    for n in range(1, 12):
        a, d = _digits(gen, 200, n), _digits(gen, 200, 1)
        s = tp.mul1(a, d)
        for i in range(200):
            assert int(tp.parse_answer(s.tok[i].tolist())) == _value(a[i]) * int(d[i, 0])
        for m in (1, 2, 3):
            a, b = _digits(gen, 60, n), _digits(gen, 60, m)
            s = tp.mulm(a, b)
            assert len(_lines(s.tok[0].tolist())) == m * (n + 1) + 2  # prompt + m(n+1)+1 lines
            for i in range(60):
                assert int(tp.parse_answer(s.tok[i].tolist())) == _value(a[i]) * _value(b[i])
    a, b = _digits(gen, 10, 40), _digits(gen, 10, 3)
    s = tp.mulm(a, b)
    for i in range(10):
        assert int(tp.parse_answer(s.tok[i].tolist())) == _value(a[i]) * _value(b[i])


@pytest.mark.parametrize("lsb", [True, False])
def test_turing_programs_mul1_head_walks_from_the_units(lsb):
    gen = torch.Generator().manual_seed(3)
    n = 6
    a, d = _digits(gen, 40, n), _digits(gen, 40, 1)
    s = tp.mul1(a, d, lsb=lsb)
    for i in range(40):
        written = [str(int(x)) for x in (a[i].flip(0) if lsb else a[i])] + ["*", str(int(d[i, 0]))]
        lines = _lines(s.tok[i].tolist())
        assert lines[0] == written and len(lines) == n + 2
        for k, line in enumerate(lines[1:]):
            ops = line[line.index("=") + 1:]
            marks = [j for j, t in enumerate(ops) if t in "abcdefghij"]
            assert marks == ([k if lsb else n - 1 - k] if k < n else [])  # step k reads the k-th digit from the units
            assert [str("abcdefghij".index(t)) if t in "abcdefghij" else t for t in ops] == written
        assert int(tp.parse_answer(s.tok[i].tolist())) == _value(a[i]) * int(d[i, 0])


@pytest.mark.parametrize("name", ["add", "mul1"])
def test_turing_programs_task_writes_operands_in_the_chosen_order(name):
    for lsb in (True, False):
        task = tp.Task(name, lsb=lsb)
        s = task.sample(task.lengths(20, 4, 4, torch.Generator().manual_seed(0)), torch.Generator().manual_seed(1))
        for i in range(20):
            first = _lines(s.tok[i].tolist())[1]
            marks = [j for j, t in enumerate(first[first.index("=") + 1:]) if t in "abcdefghij"]
            assert marks[0] == (0 if lsb else 3)                   # the first step reads the units digit


def test_turing_programs_tm_binary_increment():
    # LSB-first binary increment; symbols: 0 blank, 1 = bit 0, 2 = bit 1. State 0: carry, 1: done.
    tm = tp.TM([[(1, 2, 1), (1, 2, 1), (0, 1, 1)],
                [(1, 0, 1), (1, 1, 1), (1, 2, 1)]])
    rng = random.Random(0)
    xs = [rng.randrange(2 ** 12) for _ in range(300)]
    tapes = torch.tensor([[1 + ((x >> i) & 1) for i in range(12)] for x in xs])
    _, _, tape, _ = tm.run_batch(tapes, 13)
    for x, row in zip(xs, tape[:, -1].tolist()):
        assert sum((s - 1) << i for i, s in enumerate(row) if s) == x + 1
        ref = tm.run([1 + ((x >> i) & 1) for i in range(12)], 13)[-1][2]  # the reference simulator agrees
        assert ref == row[:len(ref)] and not any(row[len(ref):])


def test_turing_programs_random_tm_trace_is_the_machine_run():
    for syms, seed in ((3, 12345), (8, 12345), (5, 7)):
        tm = tp.TM.random(4, syms, random.Random(seed))
        gen = torch.Generator().manual_seed(seed)
        for n in (1, 3, 8, 17):
            inp = torch.randint(1, syms, (40, n), generator=gen)
            s = tp.random_tm(tm, inp)
            for i in range(40):
                confs = tp.parse_configs(s.tok[i].tolist())
                assert confs == [(q, h, t) for q, h, t in tm.run(inp[i].tolist(), n)]   # parse(trace) == run
                for (q0, h0, t0), (q1, h1, t1) in zip(confs, confs[1:]):
                    nq, ns, mv = tm.delta[q0][t0[h0]]
                    assert q1 == nq and t1[h0] == ns                                 # delta[(q, s)]
                    assert h1 - h0 == mv or (h0 == 0 and h1 == 0 and mv == -1)        # |move| = 1, left edge stays
                    diff = [j for j in range(len(t0)) if t0[j] != t1[j]]
                    assert set(diff) <= {h0} and t1[:len(t0)] == [ns if j == h0 else c for j, c in enumerate(t0)]
                    assert len(t1) - len(t0) in (0, 1)                                # right edge: one blank
            assert tp.parse_answer(s.tok[0].tolist()).split()[0].startswith(("s", "Q"))


def test_turing_programs_hard_alibi_locality():
    torch.manual_seed(0)
    cfg = common.GPTConfig(vocab_size=len(tp.VOCAB), n_layer=1, n_head=4, n_embd=32, pos="hard_alibi",
                           hard_windows=(1, 2, 3, 4))
    model = common.GPT(cfg).eval()
    x = torch.randint(0, len(tp.VOCAB), (2, 40))
    y = x.clone()
    p = 20
    y[:, :p] = (y[:, :p] + 7) % len(tp.VOCAB)               # perturb every token before p
    with torch.no_grad():
        lx, ly = model(x)[0], model(y)[0]
    assert torch.allclose(lx[:, p + 3:], ly[:, p + 3:], atol=1e-5)   # widest window is 4: sees p..p+3
    assert not torch.allclose(lx[:, p:p + 3], ly[:, p:p + 3], atol=1e-3)  # inside the window it changes


def test_turing_programs_mask_equals_official_rule():
    H, M, T = 16, 8, 12
    windows = common.GPTConfig(vocab_size=10, n_head=H, n_embd=64, pos="hard_alibi").hard_windows
    allowed = torch.isfinite(common.positional_bias("hard_alibi", H, torch.arange(T), torch.arange(T), windows))
    ref = torch.zeros(H, T, T, dtype=torch.bool)
    for h in range(H):                                      # literal hard_alibi_model.py::_attn rule
        for i in range(T):
            for j in range(i + 1):
                ref[h, i, j] = (i - j <= h) if h < M else True
    assert torch.equal(allowed, ref)


def test_turing_programs_teacher_forcing_equals_greedy():
    torch.manual_seed(0)
    cfg = common.config_from_preset(tp.Config, tp.PRESETS, "smoke", device="cpu")
    model = tp.build_model(cfg, "hard_alibi").eval()
    W = 16
    prompt = torch.randint(0, len(tp.VOCAB), (3, 5))
    seq = tp.greedy_decode(model, prompt, 40, W)             # decoded with the same window rule
    pred = tp.strided_argmax(model, seq, W)
    assert torch.equal(pred[:, 4:-1], seq[:, 5:])
    x = torch.randint(0, len(tp.VOCAB), (2, 45))              # strided eval == per-position crop-and-refeed
    pred = tp.strided_argmax(model, x, W)
    with torch.no_grad():
        for t in range(45):
            s = tp.crop_start(t, W)
            assert t - s < W and (t < W or t - s >= W // 2)
            assert torch.equal(model(x[:, s:t + 1])[0][:, -1].argmax(-1), pred[:, t])


def test_turing_programs_step_context_equals_greedy_decoding_with_a_cache():
    tok = torch.tensor([[tp.BOS, tp.D0, tp.SEP, tp.D0 + 1, tp.D0 + 2, tp.SEP, tp.D0, tp.EOS, tp.BOS]])
    assert tp.step_ids(tok).tolist() == [[1, 1, 2, 2, 2, 3, 3, 3, 4]]  # '|' opens the step it predicts
    m = tp.step_mask(tok)[0]
    assert m[4].tolist() == [True] * 5 + [False] * 4                 # own step + the one before (causality
    assert m[6].tolist() == [False] * 2 + [True] * 6 + [False]       # is the attention's own mask)
    assert m[8].tolist() == [False] * 5 + [True] * 4
    torch.manual_seed(0)
    cfg = common.config_from_preset(tp.Config, tp.PRESETS, "smoke", device="cpu")
    model = tp.build_model(cfg, "hard_alibi").eval()
    prompt = tp.Task("add").sample(torch.tensor([[2, 3]] * 3), torch.Generator().manual_seed(0)).tok[:, :9]
    seq = tp.greedy_decode(model, prompt, 40, 0)              # token by token, KV cache, step mask rows
    assert torch.equal(tp.predict(model, seq, 0)[:, 8:-1], seq[:, 9:])  # == one masked forward
    cut = seq.clone()
    cut[:, 1:4] = tp.D0                                        # change the prompt: steps >= 2 cannot see it
    ids = tp.step_ids(seq)
    with torch.no_grad():
        a = model(seq, attn_mask=tp.step_mask(seq))[0]
        b = model(cut, attn_mask=tp.step_mask(cut))[0]
    far = ids[0] >= 2 + cfg.n_layer                           # one step further back per layer
    assert torch.allclose(a[0, far], b[0, far], atol=1e-5) and not torch.allclose(a[0, ids[0] == 2], b[0, ids[0] == 2])


def test_turing_programs_pieces_copy_out():
    ns = copy_out(tp.TM, tp.crop_start, tp.strided_argmax, tp.greedy_decode)
    rng = random.Random(3)
    ours, pasted = tp.TM.random(4, 5, random.Random(3)), ns["TM"].random(4, 5, rng)
    inp = torch.randint(1, 5, (6, 7))
    assert all(torch.equal(x, y) for x, y in zip(ours.run_batch(inp, 7), pasted.run_batch(inp, 7)))
    model = tiny_gpt(vocab=len(tp.VOCAB), pos="hard_alibi", seed=2)
    x = torch.randint(0, len(tp.VOCAB), (2, 50))
    assert torch.equal(ns["strided_argmax"](model, x, 16), tp.strided_argmax(model, x, 16))
    assert torch.equal(ns["greedy_decode"](model, x[:, :4], 20, 16), tp.greedy_decode(model, x[:, :4], 20, 16))


class _TuringProgramsOracle(nn.Module):
    """A 'model' that reads the prompt and predicts the true next token of the addition program
    (corrupt=True: every new sum digit is predicted one too high)."""

    def __init__(self, corrupt=False):
        super().__init__()
        self.corrupt = corrupt

    def forward(self, idx):
        out = torch.zeros(*idx.shape, len(tp.VOCAB))
        for i, row in enumerate(idx.tolist()):
            plus, sep = row.index(tp.PLUS), row.index(tp.SEP)
            a, b = torch.tensor([row[1:plus]]) - tp.D0, torch.tensor([row[plus + 1:sep]]) - tp.D0
            s = tp.addition(a.flip(1), b.flip(1))                # the prompt is written units first
            nxt = s.tok[0, 1:].clone()
            if self.corrupt:
                d = s.cat[0, 1:] == tp.DIGIT
                nxt[d] = tp.D0 + (nxt[d] - tp.D0 + 1) % 10
            L = min(len(row) - 1, len(nxt))
            out[i, torch.arange(L), nxt[:L]] = 1.0
        return out, None


def test_turing_programs_exact_and_token_accuracy_of_an_oracle():
    task = tp.Task("add")
    gen = torch.Generator().manual_seed(0)
    lens = task.lengths(30, 1, 4, gen)
    good = tp.evaluate(_TuringProgramsOracle(), task, "tp", lens, 256, "cpu", seed=1)
    assert good == {k: 1.0 for k in ("exact", "tok") + tp.CATS}
    bad = tp.evaluate(_TuringProgramsOracle(corrupt=True), task, "tp", lens, 256, "cpu", seed=1)
    assert bad["exact"] == 0.0 and bad["digit"] == 0.0 and bad["copy"] == bad["head"] == bad["state"] == 1.0
    s = tp.addition(torch.tensor([[4, 5]]), torch.tensor([[7]]))   # 45 + 7: tokens hand-counted
    assert [tp.VOCAB[t] for t in s.tok[0]] == "<bos> 5 4 + 7 | N = f 4 + h | C 2 = 5 e + 7 | 0 5 2 = 5 4 + 7 <eos>".split()
    n_prog = int((s.cat >= 0).sum())
    assert n_prog == 7 + 8 + 9 and int((s.cat == tp.DIGIT).sum()) == 2  # 'N = f 4 + h |' ... '0 5 2 = 5 4 + 7 <eos>'
    pred = torch.cat([s.tok[:, 1:], s.tok[:, :1]], 1)           # pred[:, t] = token t+1: all right
    assert tp.score(pred, s)["tok"] == [n_prog, n_prog] and tp.score(pred, s)["exact"] == [1, 1]
    pred[0, -3] = tp.D0                                          # one wrong token: exact 0, tok n-1
    r = tp.score(pred, s)
    assert r["exact"] == [0, 1] and r["tok"] == [n_prog - 1, n_prog]


def test_turing_programs_operand_lengths_are_independent():
    gen = torch.Generator().manual_seed(0)
    lens = tp.Task("add").lengths(4000, 1, 5, gen)
    assert lens.shape == (4000, 2) and int(lens.min()) == 1 and int(lens.max()) == 5
    same = float((lens[:, 0] == lens[:, 1]).float().mean())
    assert abs(same - 0.2) < 0.03                             # independent uniform: P(na == nb) = 1/5
    assert tp.Task("rtm8").lengths(10, 2, 2, gen).shape == (10, 1)


class _TuringProgramsFakeTask:
    """Programs of n prompt tokens (9) then 2n program tokens (10 + category); lines=True:
    "<bos> 9 |" then n steps "10 11 12 |" (the last one ends in <eos>)."""
    def __init__(self, lines=False):
        self.lines = lines

    def lengths(self, count, lo, hi, gen):
        return torch.randint(lo, hi + 1, (count, 1), generator=gen)

    def sample(self, lens, gen, fmt="tp"):
        return tp._concat([self._one(int(n)) for n in lens[:, 0]])

    def _one(self, n):
        if self.lines:
            tok = torch.tensor([[tp.BOS, 9, tp.SEP] + [10, 11, 12, tp.SEP] * n])
            tok[0, -1] = tp.EOS
            cat = torch.tensor([[-1] * 3 + [0] * 4 * n], dtype=torch.int8)
        else:
            cat = torch.tensor([[-1] * n + [c % 4 for c in range(2 * n)]], dtype=torch.int8)
            tok = torch.where(cat < 0, 9, 10 + cat.long())
        return tp.Seqs(tok, cat, torch.ones_like(tok, dtype=torch.bool))


def test_turing_programs_stream_batches():
    gen = torch.Generator().manual_seed(0)
    x, y, mask = tp.stream_batch(_TuringProgramsFakeTask(), "tp", 64, 20, 2, 9, gen)
    assert x.shape == y.shape == mask.shape == (64, 20)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(mask, (y != 9).float())                 # loss only on program tokens
    x, y, mask = tp.stream_batch(tp.Task("add"), "tp", 64, 32, 5, 5, gen)  # n=5 programs: 112 tokens > T
    assert int((y == tp.EOS).sum()) > 0 and int((x[:, 0] != tp.BOS).sum()) > 32  # late lines, mid-program starts
    assert (mask[y == tp.BOS] == 0).all() and (mask[y == tp.EOS] == 1).all()
    lined = _TuringProgramsFakeTask(lines=True)                # steps "| 10 11 12" after "<bos> 9"
    x, y, mask = tp.stream_batch(lined, "tp", 64, 30, 1, 4, gen, line_starts=True)
    assert set(x[:, 0].tolist()) == {tp.BOS, tp.SEP}          # every row starts at a step
    prompt_target = (y == tp.BOS) | (y == 9) | ((y == tp.SEP) & (x == 9))
    ids = tp.step_ids(x)
    assert torch.equal(mask.bool(), (ids > ids[:, :1]) & ~prompt_target)  # not the row's first step
    x, y, mask = tp.stream_batch(lined, "tp", 64, 30, 1, 4, gen)
    assert len(set(x[:, 0].tolist())) > 3                      # without line_starts: any token


def test_turing_programs_digit_order_reaches_the_task(monkeypatch):
    seen = []
    monkeypatch.setattr(tp, "train_and_test", lambda cfg, task, fmt, pos: (seen.append(task), ({}, {"time_s": 0.0}))[1])
    monkeypatch.setattr(common, "save_results", lambda *a, **k: None)
    for digits, head in (("lsb", 2), ("msb", 4)):            # 'N = d 4 5 + ...' / 'N = 5 4 d + ...'
        cfg = common.config_from_preset(tp.Config, tp.PRESETS, "smoke", device="cpu", digits=digits)
        tp.exp_runs(cfg)
        s = seen[-1].sample(torch.tensor([[3, 3]]), torch.Generator().manual_seed(0))
        line = _lines(s.tok[0].tolist())[1]
        assert [j for j, t in enumerate(line[:5]) if t in "abcdefghij"] == [head]


def test_turing_programs_bad_config():
    for kw in (dict(task="sort"), dict(runs=("tp:xpos",)), dict(task="mul1", runs=("plain:nope",)),
               dict(eval_lens=(60,), context="tokens"), dict(train_min=6), dict(hard_windows=(1, 2)),
               dict(window=31), dict(task="rtm8", runs=("tp:hard_alibi",)), dict(runs=("plain:hard_alibi",)),
               dict(context="all"), dict(digits="reversed")):
        with pytest.raises(ValueError):
            tp.Config(**kw)


def test_turing_programs_smoke(tmp_path):
    blob = smoke(tp, tmp_path)
    m, cfg = blob["metrics"], blob["config"]
    for pos in ("hard_alibi", "nope"):
        key = ("add", "tp", pos)
        assert 0.0 <= m[common.mkey("exact_in_dist", *key)] <= 1.0
        for n in cfg["eval_lens"]:
            assert 0.0 <= m[common.mkey("exact", *key, f"L{n}")] <= 1.0
            for c in tp.CATS:
                assert 0.0 <= m[common.mkey("token_acc", *key, f"L{n}", c)] <= 1.0
        assert m[common.mkey("final_loss", *key)] < 0.7 * math.log(len(tp.VOCAB))   # uniform: ln 46 = 3.83
        assert m[common.mkey("token_acc_in_dist", *key)] > 4.0 / len(tp.VOCAB)      # 4x chance
    assert blob["complete"] and blob["history"]["tp:hard_alibi"]["loss"]


def test_turing_programs_metrics_are_measured_at_their_lengths(monkeypatch):
    """Wiring of train_and_test: each metric comes from programs of the length its name says."""
    cfg = common.config_from_preset(tp.Config, tp.PRESETS, "smoke", device="cpu", eval_samples=200)
    seen = []

    def fake_evaluate(model, task, fmt, lens, W, device, seed, bs=50):
        seen.append(lens.clone())
        n = float(lens.float().mean())
        return {"exact": n, "tok": n / 100, **{c: n / 100 + (i + 1) / 1000 for i, c in enumerate(tp.CATS)}}

    monkeypatch.setattr(tp, "evaluate", fake_evaluate)
    monkeypatch.setattr(tp, "train", lambda model, cfg, get_batch, desc="", eval_fn=None:
                        {"loss": [2.0] * 9 + [1.0], "time_s": 0.0})
    m, _ = tp.train_and_test(cfg, tp.Task("add"), "tp", "hard_alibi")
    in_dist = seen[0]
    assert in_dist.shape == (200, 2) and int(in_dist.min()) == cfg.train_min and int(in_dist.max()) == cfg.train_max
    assert float((in_dist[:, 0] == in_dist[:, 1]).float().mean()) < 0.6      # operand lengths independent
    key = ("add", "tp", "hard_alibi")
    assert m[common.mkey("exact_in_dist", *key)] == float(in_dist.float().mean())
    for n, lens in zip(cfg.eval_lens, seen[1:]):
        assert (lens == n).all() and len(lens) == cfg.eval_samples
        assert m[common.mkey("exact", *key, f"L{n}")] == n
        assert m[common.mkey("token_acc", *key, f"L{n}")] == n / 100
        for i, c in enumerate(tp.CATS):
            assert m[common.mkey("token_acc", *key, f"L{n}", c)] == n / 100 + (i + 1) / 1000
    assert m[common.mkey("final_loss", *key)] == 1.0                         # mean of the last 10% of records


# ======================================================================
# shampoo.py
# ======================================================================

def _shampoo_rand_grads(k, m, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, m, n, generator=g, dtype=torch.float64), torch.rand(k, generator=g, dtype=torch.float64)


def _shampoo_spd(d, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(d, 2 * d, generator=g, dtype=torch.float64)
    return X @ X.T / (2 * d) + 0.1 * torch.eye(d, dtype=torch.float64)


def test_shampoo_smoke(tmp_path):
    blob = smoke(shampoo, tmp_path)
    m, cfg = blob["metrics"], shampoo.Config(**blob["config"])
    last = cfg.checkpoints[-1]
    for mat in ("gn", "ada"):
        c = {k: m[f"cos/{mat}/{k}/step{last}"] for k in ("optimal", "shampoo2", "shampoo", "diagonal")}
        assert all(0 < v <= 1 + 1e-9 for v in c.values())
        # the inequality every Kronecker approximation obeys, and the finding itself
        assert c["optimal"] >= c["shampoo2"] - 1e-6 and c["optimal"] >= c["shampoo"] - 1e-6
        assert c["shampoo2"] > c["shampoo"] and c["shampoo2"] > c["diagonal"]
    assert m["check/power_iter_gap"] < 1e-10
    for name in cfg.optimizers:
        assert m[f"train_loss/{name}"] < math.log(cfg.b_classes) and 0.1 < m[f"test_acc/{name}"] <= 1
    for inputs in ("train", "heldout"):
        vals = [m[f"labels/{inputs}/real_B{b}/step{s}"] for b in cfg.batch_sizes for s in cfg.checkpoints]
        assert m[f"labels/{inputs}/real_B16/mean"] == pytest.approx(sum(vals[-len(cfg.checkpoints):]) / len(cfg.checkpoints))
    assert (tmp_path / "shampoo.png").exists() and blob["complete"]


def _shampoo_label_case(N=48, C=4, m=3, n=5, seed=0):
    """Per-class gradients with E_{c~p}[G_c] = 0 per example (as for cross-entropy), and their H_GN."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(N, C, m, n, generator=g, dtype=torch.float64)
    p = torch.softmax(torch.randn(N, C, generator=g, dtype=torch.float64), -1)
    G = D - torch.einsum("nc,ncij->nij", p, D)[:, None]
    H = shampoo.gn_matrices(G, p, torch.ones(N, n, dtype=torch.float64))
    return G, p, H


def test_shampoo_label_study_known_answers():
    G, p, H = _shampoo_label_case()
    N, C, m, n = G.shape
    y = torch.zeros(N, dtype=torch.long)                       # every real label is class 0: a large mean gradient
    out = shampoo.batch_label_study(G, p, y, H["H"], (N, 8), 3000, torch.Generator().manual_seed(1))
    RH, nH = shampoo.rearrange(H["H"], m, n), H["H"].norm()
    # B = N: every batch is the whole set, so G_B is the mean real-label gradient and L_B, R_B are rank one
    gbar = G[:, 0].mean(0)
    ref = shampoo.cos_sim(H["H"], torch.kron(gbar @ gbar.T, gbar.T @ gbar))
    assert out[f"real_B{N}"] == pytest.approx(ref, abs=1e-9)
    # sampled labels: E[G_B G_B^T] = E[G G^T] / B (zero-mean per example), so the factors are L and R up to scale
    shampoo2 = shampoo.kron_cos(RH, nH, H["L"], H["R"])
    assert out["sampled_B8"] == pytest.approx(shampoo2, abs=0.01)
    assert out[f"sampled_B{N}"] == pytest.approx(shampoo2, abs=0.01)
    assert out[f"real_B{N}"] < shampoo2 - 0.1                  # the mean gradient spoils the real-label estimate


def test_shampoo_study_pools_are_training_and_heldout_inputs():
    x, y = torch.arange(30.0)[:, None], torch.arange(30)
    xtr, ytr, pools = shampoo.study_split(x, y, shampoo.Config(n_train=20, n_pool=8, batch_sizes=(1,)))
    assert xtr[:, 0].tolist() == ytr.tolist() == list(range(20))
    for name, rows in (("train", range(8)), ("heldout", range(20, 28))):  # a subset of training / never trained on
        assert pools[name][0][:, 0].tolist() == pools[name][1].tolist() == list(rows)


def test_shampoo_report_matches_explicit_kronecker_products():
    m, n = 3, 4
    Gs, w = _shampoo_rand_grads(25, m, n, seed=7)
    g = Gs.reshape(25, -1)
    H = (g * w[:, None]).T @ g
    L = torch.einsum("s,sij,skj->ik", w, Gs, Gs)
    R = torch.einsum("s,sji,sjk->ik", w, Gs, Gs)
    rep = shampoo.approx_report(dict(H=H, L=L, R=R), power_iters=50)
    K = torch.kron(L, R)
    assert rep["shampoo2"] == pytest.approx(shampoo.cos_sim(H, K), abs=1e-10)
    assert rep["shampoo"] == pytest.approx(shampoo.cos_sim(H, shampoo.psd_pow(K, 0.5)), abs=1e-8)
    assert rep["diagonal"] == pytest.approx(shampoo.cos_sim(H, torch.diag(torch.diagonal(H))), abs=1e-10)
    assert rep["identity"] == pytest.approx(shampoo.cos_sim(H, torch.eye(m * n, dtype=H.dtype)), abs=1e-10)


def test_shampoo_classifier_scores_the_test_split():
    cfg = shampoo.Config(b_dim=4, b_classes=3, b_hidden=8, b_steps=150, b_batch=32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 4, generator=g)
    y = (x[:, 0] > 0).long()
    # validation = training data; test = the same inputs with labels shifted: a fitted model scores ~0 there
    r = shampoo.train_classifier("adamw", 1e-2, (x, y, x, y, x, (y + 1) % 3), cfg, torch.device("cpu"))
    assert r["train_loss"] == pytest.approx(r["val_loss"]) and r["train_loss"] < 0.3 and r["test_acc"] < 0.1


def test_shampoo_lr_is_chosen_on_validation_loss():
    by_lr = {0.1: dict(val_loss=0.5, train_loss=0.1, test_acc=0.9), 0.3: dict(val_loss=0.4, train_loss=0.3,
                                                                                test_acc=0.5)}
    assert shampoo.choose_lr(by_lr) == 0.3


def test_shampoo_optimizer_copies_out_with_torch_alone():
    ns = copy_out(shampoo.inv_root, shampoo.Shampoo)
    a, b = _shampoo_net(), _shampoo_net()
    _shampoo_run_opt(shampoo.Shampoo(a.parameters(), lr=0.01, exponent=2, update_freq=2, start_step=1), a)
    _shampoo_run_opt(ns["Shampoo"](b.parameters(), lr=0.01, exponent=2, update_freq=2, start_step=1), b)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert not torch.equal(a[0].weight, _shampoo_net()[0].weight)


def test_shampoo_refuses_compile_and_torchrun_and_keeps_float64_off_mps():
    with pytest.raises(ValueError, match="--compile"):
        shampoo.Config(compile=True)
    assert shampoo.matrix_device("mps").type == "cpu" and shampoo.matrix_device("cpu").type == "cpu"


def test_shampoo_rearrangement_and_vec_convention():
    m, n = 3, 4
    g = torch.Generator().manual_seed(1)
    H = torch.randn(m * n, m * n, generator=g, dtype=torch.float64)
    A = torch.randn(m, m, generator=g, dtype=torch.float64)
    B = torch.randn(n, n, generator=g, dtype=torch.float64)
    G = torch.randn(m, n, generator=g, dtype=torch.float64)
    lhs = (H - torch.kron(A, B)).norm()
    rhs = (shampoo.rearrange(H, m, n) - torch.outer(A.reshape(-1), B.reshape(-1))).norm()
    assert torch.allclose(lhs, rhs, atol=1e-10)
    assert torch.allclose(torch.kron(A, B) @ G.reshape(-1), (A @ G @ B.T).reshape(-1), atol=1e-10)
    # cosine and relative error computed without forming A (x) B match the explicit ones
    RH = shampoo.rearrange(H, m, n)
    assert abs(shampoo.kron_cos(RH, H.norm(), A, B) - shampoo.cos_sim(H, torch.kron(A, B))) < 1e-10
    c = 0.37
    ref = float((H - c * torch.kron(A, B)).norm() / H.norm())
    assert abs(shampoo.kron_relerr(RH, H.norm(), A, B, c) - ref) < 1e-10


def test_shampoo_one_power_step_is_L_kron_R():
    m, n = 5, 3
    Gs, w = _shampoo_rand_grads(40, m, n)
    g = Gs.reshape(40, -1)
    H = (g * w[:, None]).T @ g                                  # H = sum_i w_i g_i g_i^T
    L = torch.einsum("s,sij,skj->ik", w, Gs, Gs)
    R = torch.einsum("s,sji,sjk->ik", w, Gs, Gs)
    RH = shampoo.rearrange(H, m, n)
    assert torch.allclose(RH @ torch.eye(n, dtype=H.dtype).reshape(-1), L.reshape(-1), atol=1e-10)
    assert torch.allclose(RH.T @ torch.eye(m, dtype=H.dtype).reshape(-1), R.reshape(-1), atol=1e-10)
    A1, B1, _ = shampoo.power_iteration(RH, m, n, 1)
    assert torch.allclose(A1, L / L.norm(), atol=1e-6) and torch.allclose(B1, R / R.norm(), atol=1e-6)
    K = torch.kron(A1, B1)
    K = K * torch.trace(H) / torch.trace(K)
    assert torch.allclose(K, torch.kron(L, R) / torch.trace(H), atol=1e-6 * torch.kron(L, R).abs().max())


def test_shampoo_exact_kronecker_recovered():
    m, n = 4, 3
    Sa, Sb = _shampoo_spd(m, 2), _shampoo_spd(n, 3)
    H = torch.kron(Sa, Sb)
    L, R = torch.trace(Sb) * Sa, torch.trace(Sa) * Sb          # E[G G^T], E[G^T G] for G = Sa^1/2 Z Sb^1/2
    assert torch.allclose(torch.kron(L, R) / torch.trace(H), H, atol=1e-10)
    rep = shampoo.approx_report(dict(H=H, L=L, R=R), power_iters=50)
    assert abs(rep["optimal"] - 1) < 1e-9 and abs(rep["shampoo2"] - 1) < 1e-9
    assert rep["shampoo"] < 0.999                                # Shampoo's square root is not exact
    assert rep["relerr_shampoo2"] < 1e-6
    A, B, _ = shampoo.power_iteration(shampoo.rearrange(H, m, n), m, n, 50)
    K = torch.kron(A, B)
    assert torch.allclose(K * H.norm() / K.norm(), H, atol=1e-8)


def test_shampoo_power_iteration_matches_svd_and_bounds():
    m, n = 4, 5
    Gs, w = _shampoo_rand_grads(30, m, n, seed=4)
    g = Gs.reshape(30, -1)
    H = (g * w[:, None]).T @ g
    L = torch.einsum("s,sij,skj->ik", w, Gs, Gs)
    R = torch.einsum("s,sji,sjk->ik", w, Gs, Gs)
    RH = shampoo.rearrange(H, m, n)
    U, S, Vh = torch.linalg.svd(RH)
    A, B, _ = shampoo.power_iteration(RH, m, n, 500)
    assert abs(float(A.reshape(-1) @ U[:, 0])) > 1 - 1e-8
    assert abs(float(B.reshape(-1) @ Vh[0])) > 1 - 1e-8
    rep = shampoo.approx_report(dict(H=H, L=L, R=R), power_iters=500)
    assert abs(rep["optimal"] - float(S[0] / RH.norm())) < 1e-8
    assert rep["optimal"] >= rep["shampoo2"] - 1e-9 and rep["optimal"] >= rep["shampoo"] - 1e-9
    # cosine at the optimal scale <-> relative Frobenius error: min_c |H - cK|^2 / |H|^2 = 1 - cos^2
    K = torch.kron(L, R)
    c = float((H * K).sum() / (K * K).sum())
    cos = rep["shampoo2"]
    assert abs(shampoo.kron_relerr(RH, H.norm(), L, R, c) ** 2 - (1 - cos ** 2)) < 1e-10


def test_shampoo_inv_root_matches_float64_reference():
    M = _shampoo_spd(6, 5)
    M[0] *= 0; M[:, 0] *= 0                                     # rank deficient: the eps matters
    M32, eps = M.float(), 1e-3
    reg = M + eps * torch.linalg.eigvalsh(M).max() * torch.eye(6, dtype=torch.float64)
    inv = torch.linalg.inv(reg)
    X1 = shampoo.inv_root(M32, 1, eps).double()
    assert torch.allclose(X1, inv, rtol=1e-4, atol=1e-3)
    X2 = shampoo.inv_root(M, 2, eps)
    assert torch.allclose(X2 @ X2, inv, atol=1e-9)
    X4 = shampoo.inv_root(M, 4, eps)
    assert torch.allclose(torch.linalg.matrix_power(X4, 4) @ reg, torch.eye(6, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(X4, X4.T) and torch.linalg.eigvalsh(X4).min() > 0


def test_shampoo_exponent4_single_step_is_polar_factor():
    G = torch.randn(5, 5, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    D = shampoo.inv_root(G @ G.T, 4, 1e-14) @ G @ shampoo.inv_root(G.T @ G, 4, 1e-14)
    U, _, Vh = torch.linalg.svd(G)
    assert torch.allclose(D, U @ Vh, atol=1e-5)


def _shampoo_net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 5))


def _shampoo_run_opt(opt, net, steps=10):
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(9))
    y = torch.arange(16) % 5
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()


def test_shampoo_identity_preconditioner_is_sgd_and_graft():
    # identity preconditioner (start_step beyond the run), no momentum, no grafting -> plain SGD
    a, b = _shampoo_net(), _shampoo_net()
    _shampoo_run_opt(shampoo.Shampoo([a[0].weight, a[2].weight], lr=0.1, betas=(0.0, 0.999), graft="none",
                             start_step=10**9), a)
    _shampoo_run_opt(torch.optim.SGD([b[0].weight, b[2].weight], lr=0.1), b)
    assert torch.allclose(a[0].weight, b[0].weight, atol=1e-6) and torch.allclose(a[2].weight, b[2].weight, atol=1e-6)
    # a preconditioner that is a multiple of I (huge relative eps) + Adam grafting == identity + grafting
    c, d = _shampoo_net(), _shampoo_net()
    _shampoo_run_opt(shampoo.Shampoo(c.parameters(), lr=0.01, eps=1e8, start_step=1, update_freq=1), c)
    _shampoo_run_opt(shampoo.Shampoo(d.parameters(), lr=0.01, start_step=10**9), d)
    for p, q in zip(c.parameters(), d.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_shampoo_graft_norm_freq_and_adam_params():
    net, ref = _shampoo_net(), _shampoo_net()
    opt = shampoo.Shampoo(net.parameters(), lr=0.01, update_freq=3, start_step=1)
    adam = torch.optim.Adam(ref.parameters(), lr=0.01)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(9))
    y = torch.arange(16) % 5
    W = net[0].weight
    for t in range(1, 11):
        for model, o in ((net, opt), (ref, adam)):
            o.zero_grad()
            F.cross_entropy(model(x), y).backward()
        Li_before = opt.state[W]["Li"].clone() if W in opt.state else None
        before = W.detach().clone()
        opt.step()
        adam.step()
        st = opt.state[W]
        m_hat = st["m"] / (1 - 0.9 ** t)
        adam_dir = m_hat / ((st["v"] / (1 - 0.999 ** t)).sqrt() + 1e-8)
        step_norm = (before - W.detach()).norm() / 0.01
        assert abs(step_norm - adam_dir.norm()) < 1e-4 * adam_dir.norm()   # grafted: Adam's norm exactly
        if Li_before is not None and (t - 1) % 3 != 0:
            assert torch.equal(st["Li"], Li_before)                       # no refresh between updates
        elif Li_before is not None:
            assert not torch.equal(st["Li"], Li_before)


def test_shampoo_1d_params_follow_torch_adam():
    a, b = _shampoo_net(), _shampoo_net()
    _shampoo_run_opt(shampoo.Shampoo([a[0].bias, a[2].bias], lr=0.01), a)         # weights stay fixed in both nets
    _shampoo_run_opt(torch.optim.Adam([b[0].bias, b[2].bias], lr=0.01), b)
    for name in ("0.bias", "2.bias"):
        assert not torch.equal(a.get_parameter(name), _shampoo_net().get_parameter(name))
        assert torch.allclose(a.get_parameter(name), b.get_parameter(name), atol=1e-6)


def test_shampoo_gn_matches_jacobian_formula():
    net = shampoo.MLP((3, 4, 4, 3)).double()
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    G, p = shampoo.class_grads(net, "2.weight", x, chunk=4)
    H = shampoo.gn_matrices(G, p, shampoo.layer_input(net, "2.weight", x))["H"]
    W = net.get_parameter("2.weight")
    ref = torch.zeros(16, 16, dtype=torch.float64)
    for i in range(6):
        J = torch.autograd.functional.jacobian(
            lambda w: torch.func.functional_call(net, {"2.weight": w}, (x[i:i + 1],))[0], W)
        J = J.reshape(3, 16)                                              # dz/dvec(W)
        pi = F.softmax(net(x[i:i + 1]), -1)[0]
        ref += J.T @ (torch.diag(pi) - torch.outer(pi, pi)) @ J / 6       # J^T Lambda J
    assert torch.allclose(H, ref, atol=1e-10)


def test_shampoo_batch_gradient_identity():
    net = shampoo.MLP((3, 4, 2, 3)).double()
    N, C = 4, 3
    x = torch.randn(N, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 1])
    G, p = shampoo.class_grads(net, "2.weight", x)
    Gf = G.reshape(N, C, -1)
    assert torch.allclose(torch.einsum("nc,ncd->nd", p, Gf), torch.zeros(N, 8, dtype=torch.float64), atol=1e-12)
    full = torch.einsum("nc,ncd,nce->de", p, Gf, Gf) / N                  # E[g g^T], sampled labels
    # B = 2: examples iid uniform, labels iid from the model; enumerate every (e1, c1, e2, c2)
    samp = torch.zeros_like(full)
    for e1 in range(N):
        for e2 in range(N):
            for c1 in range(C):
                for c2 in range(C):
                    gb = (Gf[e1, c1] + Gf[e2, c2]) / 2
                    samp += p[e1, c1] * p[e2, c2] / N ** 2 * torch.outer(gb, gb)
    assert torch.allclose(samp, full / 2, atol=1e-12)
    # real labels: E[G_B G_B^T] = E[g g^T]/B + (1 - 1/B) gbar gbar^T
    gr = Gf[torch.arange(N), y]
    real = sum(torch.outer((gr[a] + gr[b]) / 2, (gr[a] + gr[b]) / 2) for a in range(N) for b in range(N)) / N ** 2
    gbar = gr.mean(0)
    assert torch.allclose(real, gr.T @ gr / N / 2 + 0.5 * torch.outer(gbar, gbar), atol=1e-12)


def test_shampoo_bad_config():
    for bad in (dict(checkpoints=(0, 5000), steps=100), dict(batch_sizes=(2048,), n_pool=64),
                dict(optimizers=("lion",)), dict(hidden=256), dict(checkpoints=(0,))):
        with pytest.raises(ValueError):
            shampoo.Config(**bad)


# ======================================================================
# trail.py
# ======================================================================

def test_trail_smoke(tmp_path):
    blob = smoke(trail, tmp_path)
    m, cfg = blob["metrics"], blob["config"]
    keys = [f"mae/{p}/{t}" for p in trail.PREDICTORS for t in ("all",) + trail.TASKS]
    keys += [f"{k}/{p}/load{l:g}" for k in ("latency", "ttft", "latency_sd", "speedup_latency", "speedup_ttft",
                                            "speedup_latency_sd", "drift") for p in cfg["policies"] for l in cfg["loads"]]
    keys += [f"mg1_rel_err/{c}_C{C:g}" for c in ("perfect", "noisy") for C in cfg["mg1_cs"]] + ["mg1_rel_err/fcfs"]
    keys += [f"csweep_{q}/trail/{c}" for q in ("latency", "peak_kv", "preemptions") for c in ("C0", "Cinf")]
    for k in keys:
        assert k in m and math.isfinite(m[k]), k
    assert 0 <= m["chosen/probe/layer"] <= cfg["n_layer"]
    # the probe beats predicting the median remaining length even for the 60-step LM (it reads the position)
    assert m["mae/probe/all"] < m["mae/constant/all"]
    assert m["speedup_latency/fcfs/load0.95"] == 1.0 and m["speedup_latency/srpt_oracle/load0.95"] > 1.0
    assert m["csweep_preemptions/trail/C0"] == 0 < m["csweep_preemptions/trail/Cinf"]
    for k, v in m.items():
        if k.startswith("mg1_rel_err/"):
            assert abs(v) < 0.05, (k, v)
    assert blob["complete"] and os.path.exists(tmp_path / "trail.png") and os.path.exists(tmp_path / "trail_ttft.png")


@pytest.mark.parametrize("argv", [["--lm-batch", "0"], ["--loads", ","], ["--lm-steps", "0"], ["--loads", "0.5,1.2"],
                                  ["--policies", "trail"], ["--kv-budget", "10"], ["--n-max", "100"],
                                  ["--sim-requests", "0"], ["--arrival-seeds", "0"], ["--c0", "0"],
                                  ["--val-frac", "0.9"]])
def test_trail_bad_config_is_one_line_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        common.parse_args(trail.Config, trail.PRESETS, ["--preset", "smoke", "--device", "cpu"] + argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error:"), (argv, err)

# --- data and LM --------------------------------------------------------------------------------------


def test_trail_requests_follow_the_task_rules():
    cfg = trail.Config()
    prompts, out, L, task = trail.make_requests(3000, cfg, torch.Generator().manual_seed(0))
    assert (L >= 2).all() and (L <= cfg.max_out).all()
    for i in range(3000):
        o = out[i].tolist()
        k = int(L[i]) - 1
        assert o[k] == trail.EOS and all(v == trail.PAD for v in o[k + 1:])
        vals = [v - trail.NUM0 for v in o[:k]]
        assert all(v >= 0 for v in vals)
        x, stop = int(prompts[i, 2]) - trail.NUM0, int(prompts[i, 3]) - trail.NUM0
        if task[i] == 1:                                   # COUNT: 1..n
            assert vals == list(range(1, stop + 1))
        elif task[i] == 2:                                 # LIST: s..b with 1 <= s <= a
            assert vals[-1] == stop and 1 <= vals[0] <= x and vals == list(range(vals[0], stop + 1))
        else:                                              # WALK: +-1 steps from s, first hit of 0 or B ends it
            path = [x] + vals
            assert all(abs(a - b) == 1 for a, b in zip(path, path[1:]))
            assert all(0 < v < stop for v in path[:-1])
            assert path[-1] in (0, stop) or k == cfg.max_out - 1


def test_trail_kv_cache_equals_full_recomputation():
    torch.manual_seed(0)
    model = common.GPT(common.GPTConfig(vocab_size=30, block_size=24, n_layer=2, n_head=2, n_embd=16)).eval()
    seq = torch.randint(0, 30, (3, 20))
    with torch.no_grad():
        full, _, hid = model(seq, return_hidden=True)
        cache = model.new_cache()
        lg, _, h = model(seq[:, :5], cache=cache, return_hidden=True)
        step_logits, step_hidden = [lg], [h[-1]]
        for t in range(5, 20):
            lg, _, h = model(seq[:, t:t + 1], cache=cache, return_hidden=True)
            step_logits.append(lg)
            step_hidden.append(h[-1])
    torch.testing.assert_close(torch.cat(step_logits, 1), full, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat(step_hidden, 1), hid[-1], atol=1e-5, rtol=0)
    # generate(): EOS sits at position L-1 and PAD after it
    outs, L = trail.generate(model, seq[:, :5] % 8, 12, 1.0, torch.Generator().manual_seed(1))
    for o, l in zip(outs.tolist(), L.tolist()):
        assert o[l - 1] == trail.EOS and all(v == trail.PAD for v in o[l:]) and trail.EOS not in o[:l - 1]


def test_trail_step_targets_count_down_to_one():
    req, t, rem = trail.step_targets(torch.tensor([3, 1, 2]))
    assert req.tolist() == [0, 0, 0, 1, 2, 2]
    assert t.tolist() == [0, 1, 2, 0, 0, 1]
    assert rem.tolist() == [3, 2, 1, 1, 2, 1]


# --- predictors: split, fit, MAE ----------------------------------------------------------------------


def _trail_predictor_setup(n=200):
    cfg = common.config_from_preset(trail.Config, trail.PRESETS, "smoke", device="cpu", out="results")
    torch.manual_seed(0)
    model = common.GPT(common.GPTConfig(vocab_size=cfg.vocab_size, block_size=trail.P + cfg.max_out, n_layer=2,
                                        n_head=2, n_embd=16)).eval()
    prompts, outs, L, task = trail.make_requests(n, cfg, torch.Generator().manual_seed(7))
    return cfg, model, prompts, outs, L, task


def test_trail_probes_fit_on_training_requests_only():
    cfg, model, prompts, outs, L, task = _trail_predictor_setup()
    tr, va, te = trail.split_requests(len(L), cfg.val_frac, cfg.test_frac, cfg.seed + 4)
    assert len(set(tr.tolist()) | set(va.tolist()) | set(te.tolist())) == len(L) == len(tr) + len(va) + len(te)
    m1, _, fit1 = trail.exp_predictors(cfg, model, prompts, outs, L, task, torch.device("cpu"))
    # replace the test requests by other ones: nothing fitted or chosen may change, the test MAE must
    p2, o2, L2, t2 = trail.make_requests(len(L), cfg, torch.Generator().manual_seed(8))
    prompts, outs, L, task = prompts.clone(), outs.clone(), L.clone(), task.clone()
    prompts[te], outs[te], L[te], task[te] = p2[te], o2[te], L2[te], t2[te]
    m2, _, fit2 = trail.exp_predictors(cfg, model, prompts, outs, L, task, torch.device("cpu"))
    assert fit1["layer"] == fit2["layer"] and m1["chosen/probe/epoch"] == m2["chosen/probe/epoch"]
    for name in ("probe", "prompt_probe"):
        for (k, a), b in zip(fit1[name].state_dict().items(), fit2[name].state_dict().values()):
            assert torch.equal(a, b), (name, k)
    assert all(m1[k] == m2[k] for k in m1 if k.startswith("mae_val/"))      # validation scores: test-blind
    assert m1["mae/probe/all"] != m2["mae/probe/all"]
    # the layer is the validation argmin
    sweep = [m1[f"mae_val/probe/layer{i}"] for i in range(cfg.n_layer + 1)]
    assert fit1["layer"] == int(np.argmin(sweep))


def test_trail_test_mae_matches_a_per_request_recomputation():
    """prompt-only, probe and prompt-prior+probe+Bayes MAE recomputed request by request, step by step."""
    cfg, model, prompts, outs, L, task = _trail_predictor_setup()
    m, trace, fit = trail.exp_predictors(cfg, model, prompts, outs, L, task, torch.device("cpu"))
    te = trail.split_requests(len(L), cfg.val_frac, cfg.test_frac, cfg.seed + 4)[2]
    M, k = cfg.max_out, cfg.n_bins
    width, mids = trail.bin_edges(M, k)
    T = trail.build_transition(k, width)
    errs = {"prompt_only": [], "probe": [], "prompt_probe_bayes": []}
    tasks = []
    for n_i, i in enumerate(te.tolist()):
        tasks += [int(task[i])] * int(L[i])
        steps, prompt = trail.hidden_features(model, prompts[i:i + 1], outs[i:i + 1], L[i:i + 1], fit["layer"])
        with torch.no_grad():
            pp = F.softmax(fit["prompt_probe"](prompt), -1)[0]
            ps = F.softmax(fit["probe"](steps), -1)
        r0, post = float(pp @ mids), None
        assert trace["r0_prompt"][n_i] == pytest.approx(r0, abs=1e-4)
        for t in range(int(L[i])):
            rem, cap = int(L[i]) - t, M - t
            post = pp * ps[0] if t == 0 else (post @ T) * ps[t]
            post = post / post.sum()
            errs["prompt_only"].append(abs(min(max(r0 - t, 0), cap) - rem))
            errs["probe"].append(abs(min(max(float(ps[t] @ mids), 0), cap) - rem))
            errs["prompt_probe_bayes"].append(abs(min(max(float(post @ mids), 0), cap) - rem))
            assert trace["pred_refined"][n_i][t] == pytest.approx(min(max(float(post @ mids), 0), cap), abs=1e-3)
    tasks = np.array(tasks)
    for name, e in errs.items():
        assert m[f"mae/{name}/all"] == pytest.approx(float(np.mean(e)), rel=1e-4), name
        for ti, tname in enumerate(trail.TASKS):
            assert m[f"mae/{name}/{tname}"] == pytest.approx(float(np.mean(np.array(e)[tasks == ti])), rel=1e-4)


def test_trail_train_probe_learns_and_keeps_the_best_validation_epoch():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (2000,), generator=g)
    # the bin as a +4 sd bump on one of 10 unstandardised features: the Bayes rule (argmax) errs 1.7% of the
    # time, chance 90% (a +3 bump would put the Bayes error itself at 9.8%, too close to the 10% bound)
    X = 5.0 + 4.0 * F.one_hot(y, 10).float() + torch.randn(2000, 10, generator=g)
    err = lambda p: 1.0 - float((p(X[:500]).argmax(-1) == y[:500]).float().mean())
    seen = []
    probe, epoch = trail.train_probe(X[500:], y[500:], 32, 10, 6, 64, 3e-3, 0, lambda p: seen.append(err(p)) or seen[-1])
    assert len(seen) == 6 and seen[epoch - 1] == min(seen) and min(seen) < 0.1                   # it learns
    assert err(probe) == pytest.approx(min(seen))
    # the best validation epoch is kept even when later epochs score worse: the weights returned are epoch 3's
    scores, states = iter([5.0, 3.0, 1.0, 2.0, 4.0, 6.0]), []
    def score(p):
        states.append({k: v.clone() for k, v in p.state_dict().items()})
        return next(scores)
    probe, epoch = trail.train_probe(X[500:], y[500:], 32, 10, 6, 64, 3e-3, 0, score)
    assert epoch == 3 and not torch.equal(states[2]["net.0.weight"], states[5]["net.0.weight"])
    for k, v in probe.state_dict().items():
        assert torch.equal(v, states[2][k]), k


def test_trail_length_probe_copies_out_with_torch_alone():
    ns = copy_out(trail.bin_edges, trail.expect, trail.LengthProbe, trail.build_transition, trail.bayes_update,
                  trail.bayes_smooth)
    torch.manual_seed(0)
    X = torch.randn(50, 12) * 3 + 1
    ours = trail.LengthProbe(12, 16, 10, X.mean(0), X.std(0))
    pasted = ns["LengthProbe"](12, 16, 10, X.mean(0), X.std(0))
    pasted.load_state_dict(ours.state_dict())
    p = F.softmax(ours(X), -1).view(5, 10, 10)
    q = F.softmax(pasted(X), -1).view(5, 10, 10)
    torch.testing.assert_close(p, q)
    w, mids = ns["bin_edges"](64, 10)
    T = ns["build_transition"](10, w)
    prior = torch.softmax(torch.randn(5, 10), -1)
    torch.testing.assert_close(ns["expect"](ns["bayes_smooth"](q, T, prior=prior), mids),
                               trail.expect(trail.bayes_smooth(p, trail.build_transition(10, w), prior=prior), mids))

# --- predictor pieces ---------------------------------------------------------------------------------


def test_trail_bins_monotone_and_expectation_in_range():
    w, mids = trail.bin_edges(64, 10)
    b = trail.to_bin(torch.arange(0, 200), 64, 10)
    assert (b[1:] >= b[:-1]).all() and b.min() == 0 and b.max() == 9
    p = torch.softmax(torch.randn(500, 10) * 5, -1)
    e = trail.expect(p, mids)
    assert (e >= 0).all() and (e <= 64).all()
    assert torch.allclose(mids[trail.to_bin(mids, 64, 10)], mids)   # each midpoint falls in its own bin


def test_trail_bayes_smoothing_identities():
    k = 10
    T = trail.build_transition(k, 6.4)
    torch.testing.assert_close(T.sum(1), torch.ones(k))
    p = torch.softmax(torch.randn(4, 6, k), -1)
    # T = I and a uniform prior: the posterior is the normalised product of the probe outputs
    post = trail.bayes_smooth(p, torch.eye(k), prior=torch.full((4, k), 1.0 / k))
    prod = torch.cumprod(p, 1)
    torch.testing.assert_close(post, prod / prod.sum(-1, keepdim=True))
    # a one-hot probe output pins the posterior to it (any prior with full support)
    onehot = torch.nn.functional.one_hot(torch.randint(0, k, (4,)), k).float()
    prior = torch.softmax(torch.randn(4, k), -1)
    torch.testing.assert_close(trail.bayes_update(prior, onehot, T), onehot)
    torch.testing.assert_close(trail.bayes_smooth(onehot[:, None], T, prior=prior)[:, 0], onehot)
    # smoothing with the real T stays a distribution
    post = trail.bayes_smooth(p, T, prior=torch.softmax(torch.randn(4, k), -1))
    torch.testing.assert_close(post.sum(-1), torch.ones(4, 6))


def test_trail_matches_official_algorithms():
    """Re-implemented from the repo's description (schedule_policy.py, trail_predictor.py) and driven with
    random states: same preemptibility, same victim, same smoothed posterior."""
    rng = np.random.default_rng(0)

    def repo_preemptible(generated, init, c):
        return generated <= c * max(init, 1)

    def repo_priority(generated, init, remaining, c):
        return math.inf if generated > c * max(init, 1) else remaining

    for _ in range(300):
        c = float(rng.choice([0.0, 0.2, 0.5, 0.8, 1.0]))
        n_run = 4
        init = rng.integers(1, 60, n_run).astype(float)
        gen = rng.integers(0, 60, n_run)
        rem = rng.integers(0, 60, n_run).astype(float)
        incoming = float(rng.integers(0, 60))
        for i in range(n_run):
            assert trail.trail_preemptible(int(gen[i]), init[i], c) == repo_preemptible(gen[i], init[i], c)
        # repo: batch full -> the incoming request preempts the preemptible running one with the largest value,
        # iff incoming + margin (0) < value
        vals = [repo_priority(gen[i], init[i], rem[i], c) for i in range(n_run)]
        cand = [i for i in range(n_run) if repo_preemptible(gen[i], init[i], c)]
        victim = None
        if cand:
            v = max(cand, key=lambda i: (vals[i], i))
            if incoming < vals[v]:
                victim = v
        # ours: rank everyone (running requests arrived first), keep the top n_run
        keys = {i: trail.trail_key(int(gen[i]), init[i], rem[i], c, i) for i in range(n_run)}
        keys[n_run] = trail.trail_key(0, incoming, incoming, c, n_run)
        kept = sorted(keys, key=keys.get)[:n_run]
        dropped = [i for i in range(n_run) if i not in kept]
        assert dropped == ([] if victim is None else [victim])

    def repo_transition(k, width):
        q = min(1.0, 1.0 / width)
        T = np.zeros((k, k))
        T[0, 0] = 1.0
        for i in range(1, k):
            T[i, i], T[i, i - 1] = 1 - q, q
        return T

    def repo_smooth(prev, p, T, s):
        prior = prev @ np.linalg.matrix_power(T, s)
        post = prior * p
        return post / post.sum(-1, keepdims=True)

    T = repo_transition(10, 51.2)
    torch.testing.assert_close(trail.build_transition(10, 51.2), torch.tensor(T, dtype=torch.float32))
    prev, p = rng.dirichlet(np.ones(10), 5), rng.dirichlet(np.ones(10), 5)
    for s in (1, 8):
        ours = trail.bayes_update(torch.tensor(prev), torch.tensor(p), torch.tensor(T), steps=s)
        torch.testing.assert_close(ours, torch.tensor(repo_smooth(prev, p, T, s)))


# --- M/G/1 theory -------------------------------------------------------------------------------------


def _exp_quantiles(n):
    return -np.log1p(-(np.arange(n) + 0.5) / n)


def test_trail_closed_form_matches_simulation():
    rng = np.random.default_rng(1)
    n = 40_000
    x = rng.exponential(1.0, n)
    arr = np.cumsum(rng.exponential(1.0, n)) / 0.5
    for C in (0.5, 1.0):
        sim = trail.simulate_mg1(x, x, arr, C).mean()
        assert abs(trail.closed_form(0.5, C, x, x, 100) / sim - 1) < 0.05, C
    r = rng.exponential(x)                          # noisy predictions R ~ Exp(mean X), lam = 0.8
    arr = np.cumsum(rng.exponential(1.0, n)) / 0.8
    sim = trail.simulate_mg1(x, r, arr, 0.8).mean()
    assert abs(trail.closed_form(0.8, 0.8, x, r, 100) / sim - 1) < 0.03
    # limited preemption changes the answer: C = 0 (non-preemptive SJF on predictions) is clearly worse here
    assert trail.closed_form(0.8, 0.0, x, r, 100) > 1.05 * trail.closed_form(0.8, 1.0, x, r, 100)


def test_trail_closed_form_and_simulation_agree_where_the_cutoff_matters():
    """C = 0.2 with perfect predictions is ~11% above plain SPRPT (C = 1): a simulator or a closed form that
    ignores the cutoff fails here (at C = 0.5 or 0.8 the gap is within the tolerance)."""
    rng = np.random.default_rng(11)
    n = 100_000
    x = rng.exponential(1.0, n)
    arr = np.cumsum(rng.exponential(1.0, n)) / 0.5
    assert trail.closed_form(0.5, 0.2, x, x, 100) > 1.08 * trail.closed_form(0.5, 1.0, x, x, 100)
    for C in (0.2, 1.0):
        sim = trail.simulate_mg1(x, x, arr, C).mean()
        assert abs(trail.closed_form(0.5, C, x, x, 100) / sim - 1) < 0.03, C


def test_trail_closed_form_reduces_to_schrage_miller():
    x = _exp_quantiles(50_000)                      # a near-exact quadrature sample of Exp(1)
    sm = trail.schrage_miller(0.5, lambda v: np.exp(-v), lambda v: 1 - np.exp(-v), 40.0)
    assert abs(trail.closed_form(0.5, 1.0, x, x, 200) / sm - 1) < 1e-3
    assert abs(trail.closed_form(0.5, math.inf, x, x, 200) / sm - 1) < 1e-3


def test_trail_fcfs_simulation_matches_pollaczek_khinchine():
    rng = np.random.default_rng(2)
    n = 40_000
    x = rng.exponential(1.0, n)
    arr = np.cumsum(rng.exponential(1.0, n)) / 0.5
    sim = trail.simulate_mg1(x, x, arr, policy="fcfs").mean()
    assert abs(sim / 2.0 - 1) < 0.03                 # P-K: 1 + 0.5 * 2 / (2 * 0.5) = 2
    assert trail.pollaczek_khinchine(0.5, _exp_quantiles(100_000)) == pytest.approx(2.0, rel=2e-3)


# --- serving simulator --------------------------------------------------------------------------------


def _trail_trace(n, rng, mean_len=20, max_out=64):
    """A synthetic held-out trace: geometric lengths, noisy prompt estimates, noisier-early refined ones."""
    L = np.minimum(rng.geometric(1.0 / mean_len, n), max_out)
    r0 = np.clip(L * rng.lognormal(0, 0.5, n), 1, max_out)
    steps = np.arange(max_out)[None]
    pred = np.clip(np.maximum(L[:, None] - steps, 0) * rng.lognormal(0, 0.3, (n, max_out)), 0, max_out)
    return trail.make_trace(L, r0, pred, max_out)


def _all_policies(trace, rows):
    names = list(trail.POLICIES) + ["trail_C0", "trail_C0.5"]
    return {name: trail.policy_inputs(name, trace, rows, 0.8) for name in names}


def test_trail_serving_single_server_matches_mg1():
    """max_batch 1, unlimited KV, one time unit per token: an M/G/1 queue (preemption at token boundaries)."""
    rng = np.random.default_rng(3)
    n, lam = 10_000, 0.05
    L = rng.geometric(0.1, n)                       # mean 10: load 0.5 (FCFS spread over seeds ~ +-2%)
    arr = np.cumsum(rng.exponential(1.0 / lam, n))
    kw = dict(max_batch=1, kv_budget=math.inf, c0=1.0, c_dec=0.0, c_pre=0.0)
    fcfs = trail.simulate_serving(arr, L, "fcfs", **kw)["latency"].mean()
    assert abs(fcfs / trail.pollaczek_khinchine(lam, L) - 1) < 0.03
    steps = np.arange(L.max())
    countdown = [np.maximum(v - steps, 0) for v in L]
    for C in (0.2, 0.5, math.inf):
        sim = trail.simulate_serving(arr, L, "soap", L, countdown, C, **kw)
        assert abs(sim["latency"].mean() / trail.closed_form(lam, C, L, L) - 1) < 0.03, C


def test_trail_serving_hand_worked_examples():
    kw = dict(kv_budget=math.inf, prompt_len=5)
    # two requests at t = 0, one batch: iteration costs 1 + 0.5 * 2 + 0.1 * 10 (prefill) = 3, then 2, then 1.5
    s = trail.simulate_serving([0.0, 0.0], [2, 3], "fcfs", max_batch=2, c0=1.0, c_dec=0.5, c_pre=0.1, **kw)
    assert s["latency"].tolist() == [5.0, 6.5] and s["ttft"].tolist() == [3.0, 3.0]
    assert s["peak_kv"] == 14 and s["mean_kv"] == pytest.approx((12 * 3 + 14 * 2 + 8 * 1.5) / 6.5)
    # one slot, a token per time unit: a shorter arrival at t = 1 preempts the job of 4 under SRPT (C = inf), not
    # under C = 0.2 (age 1 > 0.2 * 4: pinned); FCFS serves in arrival order
    one = dict(max_batch=1, c0=1.0, c_dec=0.0, c_pre=0.0, **kw)
    pred = [[4.0, 3.0, 2.0, 1.0], [2.0, 1.0]]
    s = trail.simulate_serving([0.0, 1.0], [4, 2], "soap", [4.0, 2.0], pred, math.inf, **one)
    assert s["latency"].tolist() == [6.0, 2.0] and s["ttft"].tolist() == [1.0, 1.0] and s["preemptions"] == 1
    s = trail.simulate_serving([0.0, 1.0], [4, 2], "soap", [4.0, 2.0], pred, 0.2, **one)
    assert s["latency"].tolist() == [4.0, 5.0] and s["ttft"].tolist() == [1.0, 4.0] and s["preemptions"] == 0
    s = trail.simulate_serving([0.0, 1.0], [4, 2], "fcfs", **one)
    assert s["latency"].tolist() == [4.0, 5.0] and s["area"] / s["t_end"] == pytest.approx((4 + 5) / 6)


def test_trail_serving_invariants():
    rng = np.random.default_rng(4)
    n = 300
    trace = _trail_trace(n, rng)
    rows = np.arange(n)
    arr = np.cumsum(rng.exponential(5.0, n))        # heavy load for max_batch 4
    for name, (kind, a, b, C) in _all_policies(trace, rows).items():
        s = trail.simulate_serving(arr, trace["L"], kind, a, b, C, max_batch=4, kv_budget=100, record=True)
        log = s["log"]
        assert log["emitted"] == trace["L"], name                 # every request emits exactly its length
        assert max(log["kv"]) <= 100 and max(log["batch"]) <= 4, name
        assert s["peak_kv"] == max(log["kv"]) and 0 < s["mean_kv"] <= s["peak_kv"], name
        assert (s["ttft"] > 0).all() and (s["ttft"] <= s["latency"] + 1e-9).all(), name
        assert sorted(log["order"]) == list(range(n))
        assert s["evictions"] > 0, name                            # the budget binds in this setting


def test_trail_serving_orders_and_preemption():
    rng = np.random.default_rng(5)
    n = 400
    arr = np.cumsum(rng.exponential(2.0, n))
    kw = dict(max_batch=4, kv_budget=math.inf)
    # FCFS with equal lengths and unlimited KV completes in arrival order
    s = trail.simulate_serving(arr, np.full(n, 10), "fcfs", record=True, **kw)
    assert s["log"]["order"] == list(range(n)) and s["preemptions"] == 0
    # C = 0: a started request is never preempted; C = inf on the same trace does preempt
    trace = _trail_trace(n, rng)
    pol = _all_policies(trace, np.arange(n))
    assert trail.simulate_serving(arr, trace["L"], *pol["trail_C0"], **kw)["preemptions"] == 0
    assert trail.simulate_serving(arr, trace["L"], *pol["sprpt"], **kw)["preemptions"] > 0
    # load -> 0: every request runs alone, so every policy gives the same latencies
    far = np.arange(n) * 1e6
    lat = [trail.simulate_serving(far, trace["L"], *p, **kw)["latency"] for p in pol.values()]
    for other in lat[1:]:
        np.testing.assert_allclose(other, lat[0])


def test_trail_srpt_oracle_beats_fcfs_and_littles_law():
    rng = np.random.default_rng(6)
    n = 3000
    trace = _trail_trace(n, rng)
    cfg = trail.Config()
    arr, rows = trail.make_arrivals(trace, n, 0.95, cfg, 0)
    L = [trace["L"][i] for i in rows]
    pols = _all_policies(trace, rows)
    res = {k: trail.simulate_serving(arr, L, *pols[k]) for k in ("fcfs", "srpt_oracle", "trail")}
    assert res["srpt_oracle"]["latency"].mean() < res["fcfs"]["latency"].mean()
    for s in res.values():                          # time-average number in system = lambda * mean latency
        lam_hat = n / arr[-1]
        assert abs((s["area"] / s["t_end"]) / (lam_hat * s["latency"].mean()) - 1) < 0.03
    # the load is arrival rate / full-batch capacity: a full batch serves load / 1 of the time at load 1
    busy = sum(L) * (cfg.c0 / cfg.max_batch + cfg.c_dec) + cfg.c_pre * trail.P * n
    assert busy / arr[-1] == pytest.approx(0.95, rel=0.05)


def test_trail_ratio_of_means_and_load_curve_metrics():
    r, sd = trail.ratio_of_means([4.0, 6.0], [2.0, 2.0])
    assert r == 2.5 and sd == pytest.approx(math.sqrt(0.5))       # per-seed ratios 2 and 3
    cfg = common.config_from_preset(trail.Config, trail.PRESETS, "smoke", device="cpu", out="results",
                                    loads=(0.6, 0.9), sim_requests=1500, sim_min=800, arrival_seeds=2,
                                    policies=("fcfs", "trail_prompt", "trail", "srpt_oracle"), c_sweep=(0.0, 0.5))
    trace = _trail_trace(300, np.random.default_rng(9))
    m = trail.exp_load_curve(cfg, trace)
    for p in cfg.policies:
        lat = [trail.serve(cfg, trace, p, 0.9, (cfg.seed, s), cfg.kv_tokens)["latency"] for s in range(2)]
        assert m[f"latency/{p}/load0.9"] == pytest.approx(np.mean(lat))
        assert m[f"latency_sd/{p}/load0.9"] == pytest.approx(np.std(lat, ddof=1))
        assert m[f"speedup_latency/{p}/load0.9"] == pytest.approx(m["latency/fcfs/load0.9"] / m[f"latency/{p}/load0.9"])
    assert m["refine_gain/ttft/load0.9"] == pytest.approx(m["ttft/trail_prompt/load0.9"] / m["ttft/trail/load0.9"])
    h = [trail.serve(cfg, trace, "fcfs", 0.6, (cfg.seed, s), cfg.kv_tokens) for s in range(2)]
    assert m["drift/fcfs/load0.6"] == pytest.approx(np.mean([r["half2"] for r in h]) / np.mean([r["half1"] for r in h]) - 1)
    assert trail.trace_length(cfg, 0.9) == 1500 and trail.trace_length(cfg, 0.6) == 800
    c = trail.exp_c_sweep(cfg, trace)
    assert c["csweep_preemptions/trail/C0"] == 0 < c["csweep_preemptions/trail/C0.5"]
    one = trail.serve(cfg, trace, "trail", cfg.c_sweep_load, (cfg.seed, 0), math.inf, cutoff=0.5)
    two = trail.serve(cfg, trace, "trail", cfg.c_sweep_load, (cfg.seed, 1), math.inf, cutoff=0.5)
    assert c["csweep_peak_kv/trail/C0.5"] == pytest.approx((one["peak_kv"] + two["peak_kv"]) / 2)
    assert c["csweep_latency/trail/C0.5"] == pytest.approx((one["latency"] + two["latency"]) / 2)


def test_trail_mg1_experiment_uses_pollaczek_khinchine_on_its_own_sample():
    cfg = common.config_from_preset(trail.Config, trail.PRESETS, "smoke", device="cpu", out="results",
                                    mg1_jobs=20_000, mg1_cs=(0.2,))
    m = trail.exp_mg1(cfg)
    rng = np.random.default_rng(cfg.seed + 6)
    x, gaps = rng.exponential(1.0, cfg.mg1_jobs), rng.exponential(1.0, cfg.mg1_jobs)
    sim = trail.simulate_mg1(x, x, np.cumsum(gaps) / cfg.mg1_lam_perfect, policy="fcfs").mean()
    assert m["mg1_rel_err/fcfs"] == pytest.approx(trail.pollaczek_khinchine(cfg.mg1_lam_perfect, x) / sim - 1, abs=1e-12)
    r = rng.exponential(x)
    sim = trail.simulate_mg1(x, r, np.cumsum(gaps) / cfg.mg1_lam_noisy, 0.2).mean()
    assert m["mg1_rel_err/noisy_C0.2"] == pytest.approx(trail.closed_form(cfg.mg1_lam_noisy, 0.2, x, r, cfg.mg1_grid) / sim - 1)


# ======================================================================
# lora_cat.py
# ======================================================================

def _lora_cat_gpt(seed=0, n_layer=2):
    torch.manual_seed(seed)
    cfg = common.GPTConfig(vocab_size=len(lora_cat.VOCAB), block_size=14, n_layer=n_layer, n_head=2, n_embd=16)
    return lora_cat.split_qkv(common.GPT(cfg)).eval()


def _lora_cat_random_lora(model, r, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(r, m.in_features, generator=g), torch.randn(m.out_features, r, generator=g) * 0.1)
            for n, m in model.named_modules() if n in lora_cat.target_names(model)}


def test_lora_cat_smoke(tmp_path):
    out = smoke(lora_cat, tmp_path)
    m = out["metrics"]
    for d in ("A", "B"):
        for meth in lora_cat.METHODS:
            for task in lora_cat.TASKS + ("composite_val",):
                v = m[f"acc_{d}/{meth}/{task}"]
                assert 0.0 <= v <= 1.0 and math.isfinite(v)
        # each single LoRA learned its own skill far above chance (exact match of 2-6 tokens) and the base
        assert m[f"acc_{d}/lora_a/skill_a"] > 0.3 and m[f"acc_{d}/lora_a/skill_a"] > m[f"acc_{d}/base/skill_a"] + 0.2
        assert m[f"acc_{d}/lora_b/skill_b"] > 0.3 and m[f"acc_{d}/data_mix/skill_a"] > 0.3
        # CAT's training lowered its loss; its weights moved away from their init (1 free, 0.5 softmax)
        for mix in ("cat_free", "cat_softmax"):
            assert m[f"cat_{d}/{mix}/loss_last"] < m[f"cat_{d}/{mix}/loss_first"]
        assert m[f"cat_{d}/cat_free/weight_max"] - m[f"cat_{d}/cat_free/weight_min"] > 1e-3
        # the pre-registered comparisons: the rival is the merge chosen on validation, the gap is on test
        best = out["info"]["best_merge_per_seed"][d][0]
        assert best == lora_cat.best_merge({k: v for k, v in m.items()}, f"acc_{d}")
        cat = m[f"acc_{d}/cat_free/composite"]
        assert m[f"cmp_{d}/best_merge/composite"] == m[f"acc_{d}/{best}/composite"]
        assert m[f"cmp_{d}/cat_vs_best_merge/gap"] == pytest.approx(cat - m[f"acc_{d}/{best}/composite"])
        assert m[f"cmp_{d}/cat_vs_data_mix/gap"] == pytest.approx(cat - m[f"acc_{d}/data_mix/composite"])
    for k in ("acc_B/lora_b/reverse_digits", "acc_B/lora_a/g_behind_gt"):
        assert 0.0 <= m[k.replace("acc_B", "probe_B")] <= 1.0
    assert (tmp_path / "lora_cat.json").exists()


def test_lora_cat_two_seeds_give_a_paired_test(tmp_path):
    out = smoke(lora_cat, tmp_path, designs=("A",), seeds=2, eval_n=16, pretrain_steps=60, lora_steps=40)
    m, sd = out["metrics"], out["metrics_std"]
    assert out["seeds"] == [0, 1] and len(out["per_seed"]) == 2 and "acc_A/cat_free/composite" in sd
    gaps = [r["cmp_A/cat_vs_data_mix/gap"] for r in out["per_seed"]]
    ref = lora_cat.paired_test(gaps)
    assert m["test_A/cat_vs_data_mix/mean"] == pytest.approx(np.mean(gaps))
    assert m["test_A/cat_vs_data_mix/std"] == pytest.approx(np.std(gaps, ddof=1))
    assert (m["test_A/cat_vs_data_mix/p"] is None) == (not math.isfinite(ref["p"]))


def test_lora_cat_paired_t_test_against_tables():
    # two-sided critical values of Student's t at p = 0.05 and 0.01 (standard tables)
    for t, df, p in ((12.706, 1, 0.05), (4.303, 2, 0.05), (2.776, 4, 0.05), (4.604, 4, 0.01), (2.228, 10, 0.05),
                     (0.0, 3, 1.0)):
        assert lora_cat.t_pvalue(t, df) == pytest.approx(p, abs=2e-4)
    res = lora_cat.paired_test([0.53, 0.27, 0.07, 0.05, -0.01])   # mean 0.182, std 0.221: t 1.84, p 0.14
    assert res["mean"] == pytest.approx(0.182) and res["std"] == pytest.approx(0.22118, abs=1e-4)
    assert res["t"] == pytest.approx(1.840, abs=2e-3) and 0.13 < res["p"] < 0.15
    assert lora_cat.verdict(res).startswith("no significant")
    assert lora_cat.verdict(lora_cat.paired_test([0.3, 0.25, 0.35, 0.28, 0.31])).startswith("CAT better")
    assert lora_cat.verdict(lora_cat.paired_test([-0.3, -0.25, -0.35, -0.28, -0.31])).startswith("CAT worse")
    assert lora_cat.verdict(lora_cat.paired_test([0.3])) == "needs >= 2 seeds"


def test_lora_cat_best_merge_is_chosen_on_validation():
    acc = {f"acc_B/{m}/{t}": 0.1 for m in lora_cat.METHODS for t in ("composite", "composite_val")}
    acc["acc_B/ties_dw/composite_val"], acc["acc_B/sum/composite"] = 0.6, 0.9   # val and test disagree
    acc["acc_B/cat_free/composite_val"] = 0.99                                  # CAT is not a rival
    assert lora_cat.best_merge(acc, "acc_B") == "ties_dw"


def test_lora_cat_accuracy_is_greedy_exact_match():
    class Echo:  # "generates" a fixed continuation: right on rows 0 and 2, one token wrong on row 1
        def eval(self):
            return self

        def generate(self, idx, n, greedy=True):
            ans = torch.tensor([[7, 8], [7, 9], [5, 6]])
            return torch.cat([idx, ans[:, :n]], 1)
    prompt = torch.tensor([[1, 5, 6, 3]] * 3)
    groups = [(prompt, torch.tensor([[7, 8], [7, 8], [5, 6]]))]
    assert lora_cat.accuracy(Echo(), groups, "cpu") == pytest.approx(2 / 3)


def test_lora_cat_zero_init_is_identity():
    base = _lora_cat_gpt()
    model = lora_cat.add_lora(base, 1, r=4, alpha=8.0, seed=1)
    assert all(bool((m.B[0] == 0).all()) for m in model.modules() if isinstance(m, lora_cat.LoRALinear))
    x = torch.randint(0, len(lora_cat.VOCAB), (3, 10))
    assert torch.equal(model(x)[0], base(x)[0])


def test_lora_cat_split_qkv_is_the_fused_layer():
    torch.manual_seed(0)
    cfg = common.GPTConfig(vocab_size=25, block_size=14, n_layer=1, n_head=2, n_embd=16)
    fused = common.GPT(cfg).eval()
    x = torch.randint(0, 25, (2, 9))
    ref = fused(x)[0]
    assert torch.allclose(lora_cat.split_qkv(fused)(x)[0], ref, atol=1e-6)


def test_lora_cat_layer_equals_merged_weight_and_copies_out():
    torch.manual_seed(0)
    lin = nn.Linear(12, 7, bias=True)
    W0 = lin.weight.detach().clone()
    layer = lora_cat.LoRALinear(lin, n_adapters=2, r=3, alpha=5.0, mix="free")
    for p in list(layer.A) + list(layer.B):
        p.data.normal_()
    layer.w.data = torch.tensor([0.7, -1.3])
    x = torch.randn(4, 5, 12)
    dW = sum(layer.w[i] * (5.0 / 3) * layer.B[i] @ layer.A[i] for i in range(2))
    expected = F.linear(x, W0 + dW, lin.bias)
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert torch.allclose(F.linear(x, W0 + layer.delta_weight(), lin.bias), expected, atol=1e-5)
    # the pieces a user copies run from a fresh file holding only torch / nn / F / math / numpy
    ns = copy_out(lora_cat.LoRALinear, lora_cat.magnitude_prune, lora_cat.random_prune, lora_cat.task_arithmetic,
                  lora_cat.ties, lora_cat.dare_linear)
    for mix in ("free", "softmax"):
        ours = lora_cat.LoRALinear(nn.Linear(12, 7), 2, 3, 5.0, mix, torch.Generator().manual_seed(4))
        pasted = ns["LoRALinear"](ours.base, 2, 3, 5.0, mix, torch.Generator().manual_seed(4))
        for p in list(ours.B):
            p.data.normal_()
        pasted.load_state_dict(ours.state_dict())
        assert torch.equal(pasted(x), ours(x))
    ts = [torch.randn(5, 4), torch.randn(5, 4)]
    assert torch.equal(ns["ties"](ts, [1.0, 0.5], 0.5), lora_cat.ties(ts, [1.0, 0.5], 0.5))
    for rescale in (True, False):
        a = ns["dare_linear"](ts, [1.0, 0.5], 0.5, torch.Generator().manual_seed(2), rescale)
        assert torch.equal(a, lora_cat.dare_linear(ts, [1.0, 0.5], 0.5, torch.Generator().manual_seed(2), rescale))


def test_lora_cat_equals_peft_cat_rank_r1_plus_r2():
    """PEFT's combination_type='cat': A = [c1 s A1; c2 s A2], B = [B1, B2], scale 1, rank r1 + r2."""
    torch.manual_seed(1)
    lin = nn.Linear(10, 6, bias=False)
    layer = lora_cat.LoRALinear(lin, n_adapters=2, r=4, alpha=8.0, mix="softmax")
    for p in list(layer.A) + list(layer.B):
        p.data.normal_()
    layer.w.data = torch.tensor([0.3, -0.2])
    c, s = torch.softmax(layer.w, 0), 2.0
    A = torch.cat([c[0] * s * layer.A[0], c[1] * s * layer.A[1]], 0)     # (8, 10)
    B = torch.cat([layer.B[0], layer.B[1]], 1)                             # (6, 8)
    x = torch.randn(5, 10)
    assert torch.allclose(layer(x), lin(x) + x @ A.T @ B.T, atol=1e-5)


def test_lora_cat_linear_ab_cross_terms():
    base = _lora_cat_gpt()
    l1, l2 = _lora_cat_random_lora(base, 4, 1), _lora_cat_random_lora(base, 4, 2)
    w, s = [0.7, 1.3], 2.0
    lin = lora_cat.merge_ab([l1, l2], w, s, "linear")
    for name in l1:
        (A1, B1), (A2, B2) = l1[name], l2[name]
        cross = lin[name] - (w[0] * s * B1 @ A1 + w[1] * s * B2 @ A2)
        assert torch.allclose(cross, math.sqrt(w[0] * s * w[1] * s) * (B1 @ A2 + B2 @ A1), atol=1e-5)
    single = lora_cat.merge_ab([l1], [1.0], s, "linear")
    for name in l1:
        assert torch.allclose(single[name], s * l1[name][1] @ l1[name][0], atol=1e-5)


def test_lora_cat_one_zero_weight_equals_other_single_lora():
    base = _lora_cat_gpt()
    l1, l2 = _lora_cat_random_lora(base, 4, 1), _lora_cat_random_lora(base, 4, 2)
    cat = lora_cat.add_lora(base, 2, r=4, alpha=8.0, mix="free", loras=[l1, l2])
    for m in cat.modules():
        if isinstance(m, lora_cat.LoRALinear):
            m.w.data = torch.tensor([0.0, 1.0])
    single = lora_cat.add_lora(base, 1, r=4, alpha=8.0, loras=[l2])
    x = torch.randint(0, 25, (3, 12))
    assert torch.allclose(cat(x)[0], single(x)[0], atol=1e-5)
    merged = lora_cat.with_delta(base, lora_cat.cat_delta(cat))
    assert torch.allclose(merged(x)[0], single(x)[0], atol=1e-5)


def test_lora_cat_softmax_at_zero_is_uniform_merge():
    base = _lora_cat_gpt()
    l1, l2 = _lora_cat_random_lora(base, 4, 1), _lora_cat_random_lora(base, 4, 2)
    cat = lora_cat.add_lora(base, 2, r=4, alpha=8.0, mix="softmax", loras=[l1, l2])
    uni = lora_cat.merge_dw([l1, l2], [0.5, 0.5], 2.0, "linear")
    d = lora_cat.cat_delta(cat)
    assert all(torch.allclose(d[n], uni[n], rtol=0, atol=1e-6) for n in uni)


def test_lora_cat_training_touches_only_the_weights():
    base = _lora_cat_gpt(n_layer=2)
    l1, l2 = _lora_cat_random_lora(base, 4, 1), _lora_cat_random_lora(base, 4, 2)
    for mix in ("free", "softmax"):
        cat = lora_cat.add_lora(base, 2, r=4, alpha=8.0, mix=mix, loras=[l1, l2])
        trainable = [p for p in cat.parameters() if p.requires_grad]
        assert sum(p.numel() for p in trainable) == 2 * 6 * 2          # layers x modules x adapters
        x = torch.randint(0, 25, (4, 12))
        cat(x, x)[1].backward()
        for m in cat.modules():
            if isinstance(m, lora_cat.LoRALinear):
                assert all(p.grad is None for p in list(m.A) + list(m.B))
                assert m.w.grad is not None and bool((m.w.grad != 0).all())
        assert all(p.grad is None for n, p in cat.named_parameters() if not n.endswith(".w"))
    lora = lora_cat.add_lora(base, 1, r=4, alpha=8.0)                  # a skill LoRA: A, B train, W0 frozen
    names = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert names and all(n.split(".")[-2] in ("A", "B") for n in names)


def test_lora_cat_cat_training_lowers_its_loss_and_moves_its_weights():
    # An over-confident base (embeddings of std 1: pool loss 13.5) and a large random adapter with its
    # negation: at the init w = (1, 1) they cancel, so CAT lowers the loss only by moving the two weights
    # apart (a random adapter at scale 1 brings the pool loss to about 8.2).
    base = _lora_cat_gpt(n_layer=1)
    nn.init.normal_(base.wte.weight, 0.0, 1.0)
    l1 = {n: (A, B * 10) for n, (A, B) in _lora_cat_random_lora(base, 4, 1).items()}
    l2 = {n: (A, -B) for n, (A, B) in l1.items()}
    cfg = common.config_from_preset(lora_cat.Config, lora_cat.PRESETS, "smoke", device="cpu", log_every=1)
    pool = lora_cat.cat_pool("B", 4, 16, torch.Generator().manual_seed(0), lora_cat.skill_maps(), 4, "cpu")
    cat = lora_cat.add_lora(base, 2, r=4, alpha=8.0, mix="free", loras=[l1, l2])
    before = {n: p.detach().clone() for n, p in cat.named_parameters()}
    losses = lora_cat.train(cat, cfg, lambda s: pool[s % 4], 24, cfg.cat_lr, 2, 0.0, "cat")
    assert sum(losses[-4:]) / 4 < 0.9 * sum(losses[:4]) / 4                 # the same 4 batches, first vs last
    for n, p in cat.named_parameters():
        moved = not torch.equal(p, before[n])
        assert moved == n.endswith(".w"), n                             # only CAT's weights move


def test_lora_cat_pool_has_no_composite_example():
    maps = lora_cat.skill_maps()
    for design, L in (("A", 6), ("B", 4)):
        pool = lora_cat.cat_pool(design, 6, 32, torch.Generator().manual_seed(1), maps, L, "cpu")
        for x, _ in pool:
            for row in x.tolist():
                k = next(i for i, t in enumerate(row) if t in (lora_cat.EQ, lora_cat.GT, lora_cat.LT))
                prompt, sep = row[1:k], row[k]
                has_dig = any(t in lora_cat.DIGITS.tolist() for t in prompt)
                has_let = any(t in lora_cat.LETTERS.tolist() for t in prompt)
                assert not (has_dig and has_let)                        # design A's composite mixes them
                assert not (has_dig and sep == lora_cat.GT)             # design B's composite: digits behind '>'
        assert len(pool) == 6 and all(x.shape[0] == 32 for x, _ in pool)


def test_lora_cat_ties_hand_computed():
    t = torch.tensor([1.0, -2.0, 3.0, 0.5, 4.0, -1.0])
    assert torch.equal(lora_cat.ties([t], [1.0], 1.0), t)                  # density 1, one task: identity
    tied = torch.tensor([1.0, 1.0, 1.0, 1.0, 2.0, -2.0, 0.1, 0.1])
    for d in (0.25, 0.5, 0.75, 0.6):                                        # exactly int(d * numel) kept
        assert int((lora_cat.magnitude_prune(tied, d) != 0).sum()) == int(d * tied.numel())
    merged = lora_cat.ties([torch.tensor([1.0]), torch.tensor([3.0]), torch.tensor([-1.0])], [1, 1, 1], 1.0)
    assert torch.allclose(merged, torch.tensor([2.0]))                      # sign +, mean of (1, 3)
    # the sign is elected on the UNweighted sum: +1 - 2 = -1 -> '-', although 1*1 + 0.25*(-2) > 0;
    # the disjoint mean then keeps only the weighted agreeing entry: 0.25 * -2 / 1
    merged = lora_cat.ties([torch.tensor([1.0]), torch.tensor([-2.0])], [1.0, 0.25], 1.0)
    assert torch.allclose(merged, torch.tensor([-0.5]))
    t1, t2 = torch.tensor([4.0, -1.0, 2.0, 0.5]), torch.tensor([-3.0, 2.5, 1.0, -2.0])
    # trim to 2 of 4: t1 -> [4, 0, 2, 0], t2 -> [-3, 2.5, 0, 0]; signs of the sum: + + + (0 -> +)
    # disjoint mean of the weighted agreeing entries (weights 1, 0.5): [4/1, 1.25/1, 2/1, 0]
    assert torch.allclose(lora_cat.ties([t1, t2], [1.0, 0.5], 0.5), torch.tensor([4.0, 1.25, 2.0, 0.0]))


def test_lora_cat_dare_hand_computed():
    t1, t2 = torch.randn(50, 40), torch.randn(50, 40)
    lin = lora_cat.task_arithmetic([t1, t2], [1.0, 0.5])
    g = torch.Generator().manual_seed(0)
    assert torch.allclose(lora_cat.dare_linear([t1, t2], [1.0, 0.5], 1.0, g), lin)   # density 1 = linear
    one = lora_cat.dare_linear([t1], [1.0], 0.5, g)                        # each entry is 0 or t / 0.5
    assert bool(((one == 0) | torch.isclose(one, 2 * t1)).all()) and bool((one != 0).any())
    raw = lora_cat.dare_linear([t1], [1.0], 0.5, g, rescale=False)         # PEFT as the paper ran it: 0 or t
    assert bool(((raw == 0) | (raw == t1)).all()) and bool((raw != 0).any())
    a = lora_cat.dare_linear([t1, t2], [1.0, 0.5], 0.75, torch.Generator().manual_seed(3))
    b = lora_cat.dare_linear([t1, t2], [1.0, 0.5], 0.75, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)                                                # same seed, same result
    x, y = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 3.0, -2.0])
    g = torch.Generator().manual_seed(1)
    mean = sum(lora_cat.dare_linear([x, y], [1.0, 1.0], 0.75, g) for _ in range(4000)) / 4000
    assert torch.allclose(mean, x + y, rtol=0.03, atol=0.03)                # unbiased: E = linear merge
    # the merges as run: PEFT's DARE on A, B without the rescale; ours on dW with it
    base = _lora_cat_gpt(n_layer=1)
    l1, l2 = _lora_cat_random_lora(base, 4, 1), _lora_cat_random_lora(base, 4, 2)
    full = lora_cat.merge_ab([l1, l2], [1.0, 1.0], 2.0, "linear")
    part = lora_cat.merge_ab([l1, l2], [1.0, 1.0], 2.0, "dare_norescale", 0.5, torch.Generator().manual_seed(0))
    ratio = sum(float(part[n].norm()) for n in full) / sum(float(full[n].norm()) for n in full)
    assert 0.2 < ratio < 0.75                                               # about density^2 of the norm, not ~1


def test_lora_cat_data_composes_the_skills():
    maps = lora_cat.skill_maps()
    dig, let = lora_cat.DIGITS, lora_cat.LETTERS
    assert sorted(maps[dig].tolist()) == dig.tolist() and sorted(maps[let].tolist()) == let.tolist()
    g = torch.Generator().manual_seed(0)
    xa, ya, na, _ = lora_cat.sample_task("A", "skill_a", 2000, g, maps)
    xb, yb, nb, _ = lora_cat.sample_task("A", "skill_b", 2000, g, maps)
    gmap = {int(p): int(q) for p, q in zip(xa.flatten(), ya.flatten())}
    hmap = {int(p): int(q) for p, q in zip(xb.flatten(), yb.flatten())}
    assert len(gmap) == 10 and len(hmap) == 10
    x, y, n, sep = lora_cat.sample_task("A", "composite", 500, g, maps)
    for i in range(500):
        k = int(n[i])
        xs = x[i, :k].tolist()
        assert y[i, :k].tolist() == [gmap[t] if t in gmap else hmap[t] for t in xs]
        assert sum(t in gmap for t in xs) == k // 2                         # never a pure-digit prompt
        assert sum(t in hmap for t in xs) == k - k // 2
    assert bool((sep == lora_cat.EQ).all())
    # design B: skill B reverses letters behind '>'; composite = reverse(g(digits)) behind '>'
    xb, yb, nb, sb = lora_cat.sample_task("B", "skill_b", 300, g, maps)
    xc, yc, nc, sc = lora_cat.sample_task("B", "composite", 300, g, maps)
    _, _, _, sa = lora_cat.sample_task("B", "skill_a", 300, g, maps)
    for i in range(300):
        kb, kc = int(nb[i]), int(nc[i])
        assert yb[i, :kb].tolist() == xb[i, :kb].tolist()[::-1]
        assert yc[i, :kc].tolist() == [gmap[t] for t in xc[i, :kc].tolist()][::-1]
        assert all(t in gmap for t in xc[i, :kc].tolist())
    assert bool((sa == lora_cat.EQ).all() and (sb == lora_cat.GT).all() and (sc == lora_cat.GT).all())
    # design B's generic mixture: '=' and '>' copy, '<' reverses; '<' never occurs in skill or composite data
    xp, yp, np_, sp = lora_cat.sample_task("B", "copy", 600, g, maps)
    assert {int(t) for t in sp} == {lora_cat.EQ, lora_cat.GT, lora_cat.LT}
    for i in range(600):
        k, xs = int(np_[i]), xp[i, :int(np_[i])].tolist()
        assert yp[i, :k].tolist() == (xs[::-1] if int(sp[i]) == lora_cat.LT else xs)
    assert not bool((sa == lora_cat.LT).any() or (sb == lora_cat.LT).any() or (sc == lora_cat.LT).any())
    # the transfer probes: skill A's map behind '>', skill B's reversal on digits
    xg, yg, ng, sg = lora_cat.sample_task("B", "g_behind_gt", 200, g, maps)
    xr, yr, nr, sr = lora_cat.sample_task("B", "reverse_digits", 200, g, maps)
    for i in range(200):
        assert yg[i, :int(ng[i])].tolist() == [gmap[t] for t in xg[i, :int(ng[i])].tolist()]
        assert yr[i, :int(nr[i])].tolist() == xr[i, :int(nr[i])].tolist()[::-1]
    assert bool((sg == lora_cat.GT).all() and (sr == lora_cat.GT).all())


def test_lora_cat_sequence_layout():
    x, y = torch.tensor([[5, 6, 7, 8, 9, 10]]), torch.tensor([[11, 12, 13, 14, 15, 16]])
    inp, tgt = lora_cat.to_sequences(x, y, torch.tensor([3]), torch.tensor([lora_cat.EQ]))
    # <bos> 0 1 2 = 6 7 8 ; <pad>...
    assert inp[0, :9].tolist() == [1, 5, 6, 7, 3, 11, 12, 13, 2]
    assert bool((inp[0, 9:] == lora_cat.PAD).all())
    assert tgt[0].tolist() == [-100, -100, -100, -100, 11, 12, 13, 2] + [-100] * 6


def test_lora_cat_bad_config():
    for kw in (dict(designs=("C",)), dict(n_embd=30, n_head=4), dict(max_len=1), dict(batch=63),
               dict(density=1.5), dict(cat_frac=0.0)):
        with pytest.raises(ValueError):
            lora_cat.Config(**kw)


# ======================================================================
# ardt.py
# ======================================================================

def test_ardt_smoke(tmp_path):
    blob = smoke(ardt, tmp_path)
    m = blob["metrics"]
    for k in ["next_token_acc/ardt_avg_L8/d16", "next_token_acc/ardt_onehot_L8/d16", "next_token_acc/gpt/d16",
              "grammatical_frac/ardt_onehot_L8/d16", "consistent_frac/gpt/d16", "ppl/gpt/d16",
              "reasoning_acc/ardt_lin/mean", "reasoning_acc/ardt_tf/mean", "reasoning_acc/featurizer/mean"]:
        assert k in m and math.isfinite(m[k]), k
    uni = m["next_token_acc/unigram"]
    for name in ("ardt_avg_L8", "ardt_onehot_L8"):  # far above the unigram baseline, and grammatical
        assert m[f"next_token_acc/{name}/d16"] > uni + 0.4
        assert m[f"grammatical_frac/{name}/d16"] > 0.8
        assert m[f"ppl/{name}/d16"] < m["ppl/unigram"] / 5
        # the leaf budget gives the tree the GPT's parameter count (within one leaf's worth)
        assert m["params/gpt/d16"] - 2 * (99 + 2) <= m[f"params/{name}/d16"] <= m["params/gpt/d16"]
    assert m["next_token_acc/gpt/d16"] > uni + 0.2
    assert m["overlap/text/test_in_train"] == 0
    # automata: the CoT tree has the same 4 leaves at T = 4 and 16 and is exact; the plain tree is not
    for T in (4, 16):
        assert m[f"parity_acc/cot/T{T}"] == 1.0 and m[f"parity_all_steps_acc/cot/T{T}"] == 1.0
        assert m[f"parity_leaves/cot/T{T}"] == 4 and m[f"parity_acc/hand/T{T}"] == 1.0
    assert m["parity_leaves/plain/T16"] > 4 * m["parity_leaves/plain/T4"] and m["parity_acc/plain/T16"] < 0.75
    assert m["parity_leaves/plain/T4"] <= 16 and m["parity_rows/cot/T16"] > m["parity_rows/cot/T4"]
    for T in (4, 16):                   # the plain tree is fitted on as many rows as the CoT tree
        assert m[f"parity_rows/plain/T{T}"] == m[f"parity_rows/cot/T{T}"]
    assert m["parity_leaves/hand"] == 6 and m["turing_acc/hand"] == 1.0
    assert m["overlap/reason/boolean_expressions"] == 0 and m["overlap/reason/web_of_lies"] == 0
    assert m["reasoning_acc/ardt_tf/mean"] > m["reasoning_acc/majority/mean"] + 0.1
    assert (tmp_path / "ardt.png").exists() and (tmp_path / "ardt_automata.png").exists()


def test_ardt_seeds_give_mean_and_std(tmp_path):
    blob = smoke(ardt, tmp_path, parts=("automata",), seeds=2)
    assert blob["seeds"] == [0, 1] and len(blob["per_seed"]) == 2
    assert "parity_leaves/plain/T16" in blob["metrics_std"]
    assert blob["per_seed"][0]["parity_leaves/plain/T16"] != blob["per_seed"][1]["parity_leaves/plain/T16"]


class _ArdtMemorizer:
    """A 'tree' that returns the label stored for a training window and <pad> for any window it never saw."""
    n_nodes = n_leaves = 1

    def fit(self, X, y, is_cat, n_classes, progress=None):
        self.K, X = n_classes, np.ascontiguousarray(X)
        self.table = {r.tobytes(): int(l) for r, l in zip(X, y)}
        self.train_acc = float((self.predict(X) == y).mean())
        return self

    def predict_proba(self, X):
        return np.eye(self.K)[[self.table.get(r.tobytes(), 0) for r in np.ascontiguousarray(X)]]

    def predict(self, X):
        return self.predict_proba(X).argmax(1)


def test_ardt_text_scores_on_held_out_windows(monkeypatch, tmp_path):
    mem = _ArdtMemorizer()
    monkeypatch.setattr(ardt, "make_learner", lambda cfg, max_leaves=0: mem)
    cfg = common.config_from_preset(ardt.Config, ardt.PRESETS, "smoke", device="cpu", out=str(tmp_path),
                                    ardt=("onehot:32",), steps=2)
    m, _ = ardt.exp_text(cfg, torch.Generator().manual_seed(0))
    assert mem.train_acc > 0.95                        # on its own training windows it is nearly perfect
    assert m["next_token_acc/ardt_onehot_L32/d16"] < mem.train_acc - 0.3   # held-out windows: it is not


def test_ardt_gpt_is_scored_on_held_out_stories(monkeypatch, tmp_path):
    seen, real = [], ardt.gpt_proba
    monkeypatch.setattr(ardt, "gpt_proba", lambda model, x, device: seen.append(x) or real(model, x, device))
    cfg = common.config_from_preset(ardt.Config, ardt.PRESETS, "smoke", device="cpu", out=str(tmp_path),
                                    ardt=("onehot:8",), steps=2)
    g = torch.Generator().manual_seed(0)
    ardt.exp_text(cfg, g)
    d = ardt.story_data(cfg, torch.Generator().manual_seed(0))       # the same draw exp_text made
    (x,) = seen
    assert torch.equal(x, ardt.gpt_xy(d["test"][0], 1, 0)[0])       # the held-out stories, not the training ones


def test_ardt_test_stories_never_occur_in_training():
    itos = ardt.story_vocab()
    stoi = {w: i for i, w in enumerate(itos)}
    a = ardt.sample_stories(50, torch.Generator().manual_seed(0), stoi)
    b = ardt.sample_stories(30, torch.Generator().manual_seed(1), stoi)
    mixed = (torch.cat([b[0], a[0][:5, :b[0].shape[1]]]), torch.cat([b[1], a[1][:5]]))
    keep = ardt.unseen(*mixed, *a)
    assert keep[:30].all() and not keep[30:].any()
    d = ardt.story_data(common.config_from_preset(ardt.Config, ardt.PRESETS, "smoke", device="cpu"),
                        torch.Generator().manual_seed(0))
    assert d["overlap"] == 0 and len(d["test"][0]) == 20 and ardt.unseen(*d["test"], *d["train"]).all()


def test_ardt_parity_cot_tree_is_learned_at_t64():
    for seed in (0, 1, 2):      # biased training bits make the state informative: greedy splits find the rule
        cfg = common.config_from_preset(ardt.Config, ardt.PRESETS, "smoke", device="cpu", seed=seed,
                                        aut_lens=(64,), aut_n_train=200)
        m = ardt.exp_automata(cfg)
        assert m["parity_leaves/cot/T64"] == 4 and m["parity_acc/cot/T64"] == 1.0
        assert m["parity_acc/plain/T64"] < 0.6 and m["parity_leaves/plain/T64"] > 500


def test_ardt_data_file_test_documents_are_held_out(tmp_path):
    docs = [f"{who} saw a {what} in the {where} . it was {how} ." for who in ("tom", "lily") for what in ("dog", "cat")
            for where in ("park", "house") for how in ("happy", "sad", "big")]
    p = tmp_path / "dups.txt"
    p.write_text("\n\n".join(docs + docs[:2] + ["sam ran to the big park . it was fun ."] * 1))   # 27 documents
    cfg = common.config_from_preset(ardt.Config, ardt.PRESETS, "smoke", device="cpu", data=str(p), vocab=30)
    d = ardt.story_data(cfg, torch.Generator().manual_seed(0))
    assert d["dropped"] == 2 and len(d["test"][0]) == 3 and d["overlap"] == 0


def _vocab():
    itos = ardt.story_vocab()
    return itos, {w: i for i, w in enumerate(itos)}


def test_ardt_grammar_checker_rejects_ungrammatical_sentences():
    good = ["once upon a time , there was an old owl named zoe .", "zoe liked to play with her red ball .",
            "there , she saw a big ant .", "the end ."]
    for s in good:
        assert ardt.parse_sentence(s.split()) is not None, s
    bad = ["once upon a time , there was an big dog named tom .",   # 'an' before a consonant
           "once upon a time , there was a old dog named tom .",    # 'a' before a vowel
           "tom liked to play with his red .",                      # the toy is missing
           "tom liked to play with his ball red .",                 # words swapped
           "there , he saw a little tom .",                         # a name in an animal slot
           "one day , he went to the the park .",                   # a doubled word
           "the owl was happy and said thank .",                    # truncated
           "the end",                                               # no full stop
           "tom gave the red ball to the owl the owl ."]            # run-on
    for s in bad:
        assert ardt.parse_sentence(s.split()) is None, s
    story = " ".join(good[:2] + [bad[0]] + good[3:]).split()
    assert ardt.check(story)[:2] == (4, 3) and not ardt.check(story)[2]


def test_ardt_grammar_sampler_and_consistency_checker():
    itos, stoi = _vocab()
    assert len(itos) == 99
    seqs, lens = ardt.sample_stories(2000, torch.Generator().manual_seed(1), stoi)
    stories = [[itos[i] for i in s[:n]] for s, n in zip(seqs.tolist(), lens.tolist())]
    for w in stories:
        n, n_gram, cons = ardt.check(w)
        assert n == n_gram and cons, " ".join(w)
    assert all(itos[i] == "<pad>" for s, n in zip(seqs.tolist(), lens.tolist()) for i in s[n:])

    def fails(w, old, new, which=None):  # replace one occurrence (index `which`, default first)
        idx = [i for i, x in enumerate(w) if x == old]
        if not idx:
            return None
        w = list(w)
        w[idx[which or 0]] = new
        return not ardt.check(w)[2]

    tested = {k: 0 for k in ("art", "pronoun", "name", "animal", "toy")}
    for w in stories[:300]:
        art = w[7]
        tested["art"] += fails(w, art, "an" if art == "a" else "a")
        subj = "he" if "he" in w else "she"
        if subj in w:
            tested["pronoun"] += fails(w, subj, "she" if subj == "he" else "he")
        name = w[11]
        other = "zoe" if name != "zoe" else "tom"
        if w.count(name) >= 2:
            tested["name"] += fails(w, name, other, which=1)
        hero_animal, a2 = w[9], w[w.index("saw") + 3]
        unseen = next(a for a in ardt.ANIMALS if a not in (hero_animal, a2))
        tested["animal"] += fails(w, a2, unseen, which=1)  # "the <never introduced animal>"
        toy = w[w.index("liked") + 6]
        gi = w.index("gave")
        w2 = list(w)
        w2[gi + 3] = next(t for t in ardt.TOYS if t != toy)
        tested["toy"] += not ardt.check(w2)[2]
    assert tested["art"] == 300 and tested["toy"] == 300 and tested["animal"] == 300
    assert tested["pronoun"] == 300 and tested["name"] >= 100


def test_ardt_story_metrics_hand_worked():
    itos, stoi = _vocab()
    enc = lambda s: [stoi[w] for w in s.split()]
    prompt = enc("once upon a time , there was a big dog named tom .")
    good = enc("tom liked to play with his red ball . there , he saw an old owl . the owl was sad . "
               "tom gave the red ball to the owl . the owl was happy and said thank you . "
               "they played in the park all day . the end . the end .")                # cut after 'the end .'
    bad = enc("tom liked to play with her red ball . the owl was sad . the end .")   # her; owl never introduced
    width = max(len(good), len(bad))
    conts = np.array([good + [0] * (width - len(good)), bad + [0] * (width - len(bad))])
    r = ardt.story_metrics(np.array([prompt, prompt]), conts, itos)
    assert r["consistent"] == 0.5 and r["grammatical"] == 1.0        # every sentence parses; one story is wrong
    r = ardt.story_metrics(np.array([prompt]), np.array([enc("tom liked to play with his . the end .")]), itos)
    assert r["grammatical"] == 0.5 and r["consistent"] == 0.0


def test_ardt_lm_metrics_hand_worked():
    proba = np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]])
    r = ardt.lm_metrics(proba, np.array([1, 1]), 3, smooth=0.0)
    assert r["acc"] == 0.5 and r["ppl"] == pytest.approx(math.exp(-(math.log(0.25) + math.log(0.8)) / 2))
    r = ardt.lm_metrics(np.array([[1.0, 0.0]]), np.array([1]), 2, smooth=0.01)
    assert r["ppl"] == pytest.approx(1 / 0.005)                           # 0.99 * 0 + 0.01 / 2


def test_ardt_featurization_hand_worked():
    E = np.array([[0, 0], [1, 0], [0, 1], [2, 2]], np.float32)
    W = np.array([[1, 2, 3]])
    # paper's weighted average: weights gamma^age (age 2, 1, 0), normalized: (0.25, 0.5, 1) / 1.75
    expect = (0.25 * E[1] + 0.5 * E[2] + 1.0 * E[3]) / 1.75
    np.testing.assert_allclose(ardt.avg_feature(W, E, 0.5)[0], expect, rtol=1e-6)
    np.testing.assert_allclose(ardt.avg_feature(W, E, 1e-9)[0], E[3], atol=1e-6)   # gamma -> 0: last token
    np.testing.assert_allclose(ardt.avg_feature(W, E, 1.0)[0], E[1:].mean(0), rtol=1e-6)
    # windowing: one row per story token, left-padded with <bos>
    seqs = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    W, y = ardt.windows(seqs, torch.tensor([3, 2]), 3, bos=1)
    assert W.tolist() == [[1, 1, 1], [1, 1, 5], [1, 5, 6], [1, 1, 1], [1, 1, 8]] and y.tolist() == [5, 6, 7, 8, 9]
    E10 = np.random.default_rng(0).normal(size=(10, 2)).astype(np.float32)
    f = ardt.Featurizer("onehot", 3, E10, 0.5, 8).fit(W)
    assert f(W).tolist() == W.tolist() and f.is_cat.all() and f.n_params == 0
    f = ardt.Featurizer("avg", 3, E10, 0.5, 8).fit(W)
    assert f(W).shape == (5, 2) and not f.is_cat.any() and f.n_params == E10.size


def test_ardt_ppmi_hand_worked():
    # corpus "a b a b" (ids 1, 2), window 1: C[a,b] = C[b,a] = 3, total 6 -> PMI = log(3*6/(3*3)) = log 2
    E, P = ardt.ppmi_svd(np.array([[1, 2, 1, 2]]), 3, 2, window=1)
    np.testing.assert_allclose(P, [[0, 0, 0], [0, 0, math.log(2)], [0, math.log(2), 0]], atol=1e-12)
    itos, stoi = _vocab()
    seqs, _ = ardt.sample_stories(50, torch.Generator().manual_seed(0), stoi)
    E1, P1 = ardt.ppmi_svd(seqs.numpy(), len(itos), 16)
    E2, _ = ardt.ppmi_svd(seqs.numpy(), len(itos), 16)
    np.testing.assert_array_equal(E1, E2)                               # deterministic
    S = np.linalg.svd(P1, compute_uv=False)
    np.testing.assert_allclose((E1 ** 2).sum(), S[:16].sum(), rtol=1e-4)  # ||U_d sqrt(S_d)||^2 = sum of top-d s


def test_ardt_cart():
    rng = np.random.default_rng(0)
    X = np.unique(rng.integers(0, 8, (400, 5)), axis=0).astype(np.int32)
    y = rng.integers(0, 7, len(X))
    is_cat = np.array([True, False, True, False, False])
    settled = []
    t = ardt.DecisionTree(max_depth=100, min_leaf=1).fit(X, y, is_cat, 7, progress=settled.append)
    assert (t.predict(X) == y).all() and sum(settled) == len(y)        # distinct rows -> memorized
    np.testing.assert_allclose(t.predict_proba(X[:50]).sum(1), 1.0, rtol=1e-6)
    ref = []                                                           # per-row reference traversal
    for row in X:
        nd = 0
        while t.feat[nd] >= 0:
            f, th = t.feat[nd], t.thr[nd]
            nd = t.left[nd] if (row[f] == th if is_cat[f] else row[f] <= th) else t.right[nd]
        ref.append(nd)
    assert t.apply(X).tolist() == ref
    # balanced XOR: no single split has positive gain, so greedy CART never splits (the documented limitation)
    Xx = np.array([[0, 0], [0, 1], [1, 0], [1, 1]] * 25, np.int32)
    tx = ardt.DecisionTree(max_depth=100, min_leaf=1).fit(Xx, Xx[:, 0] ^ Xx[:, 1], np.zeros(2, bool), 2)
    assert tx.n_leaves == 1 and (tx.predict(Xx) == (Xx[:, 0] ^ Xx[:, 1])).mean() == 0.5


def test_ardt_leaf_budget_grows_best_first():
    rng = np.random.default_rng(1)
    X = rng.integers(0, 6, (3000, 6)).astype(np.int32)
    y = (X[:, 0] + (X[:, 1] > 2) * 3 + rng.integers(0, 2, 3000)) % 7        # learnable + noise
    is_cat = np.zeros(6, bool)
    full = ardt.DecisionTree(40, 1).fit(X, y, is_cat, 7)
    accs, settled = [], []
    for k in (2, 5, 20, 80):
        t = ardt.DecisionTree(40, 1, max_leaves=k).fit(X, y, is_cat, 7, progress=settled.append)
        assert t.n_leaves == k and sum(settled) == len(y)
        settled.clear()
        accs.append((t.predict(X) == y).mean())
    assert accs == sorted(accs) and accs[-1] <= (full.predict(X) == y).mean() and full.n_leaves > 80
    # best-first: the 2-leaf tree's split is the root split of every larger tree (the largest gain)
    t2, t5 = (ardt.DecisionTree(40, 1, max_leaves=k).fit(X, y, is_cat, 7) for k in (2, 5))
    assert (t2.feat[0], t2.thr[0]) == (t5.feat[0], t5.thr[0]) == (full.feat[0], full.thr[0])
    # the parameter count: 2 per inner node, K (or 1) per leaf
    assert ardt.tree_params(t5, 7) == (2 * 4 + 7 * 5, 2 * 4 + 5)


def test_ardt_decision_tree_copies_out():
    ns = copy_out(ardt._xlogx, ardt.DecisionTree)
    rng = np.random.default_rng(0)
    X = rng.integers(0, 5, (300, 4)).astype(np.int32)
    y = (X[:, 0] * 2 + X[:, 2]) % 5
    is_cat = np.array([True, False, False, True])
    for kw in (dict(), dict(max_leaves=6), dict(max_features=0.5, seed=3)):
        a = ardt.DecisionTree(20, 2, **kw).fit(X, y, is_cat, 5)
        b = ns["DecisionTree"](20, 2, **kw).fit(X, y, is_cat, 5)
        assert np.array_equal(a.feat, b.feat) and np.array_equal(a.predict_proba(X), b.predict_proba(X))
    h = ns["DecisionTree"].from_table((0, 1), {(0, 0): 1, (0, 1): 0, (1, 0): 0, (1, 1): 1}, 2, 2)
    assert h.predict(np.array([[0, 0], [0, 1], [1, 0], [1, 1]])).tolist() == [1, 0, 0, 1]


def test_ardt_forest_bootstrap_follows_the_seed():
    rng = np.random.default_rng(0)
    X = rng.integers(0, 6, (400, 5)).astype(np.int32)
    y = (X[:, 0] + rng.integers(0, 3, 400)) % 4
    fit = lambda seed, mf=0.5: ardt.Forest(3, 10, 1, mf, seed).fit(X, y, np.zeros(5, bool), 4).predict_proba(X)
    assert np.array_equal(fit(0), fit(0)) and not np.array_equal(fit(0), fit(1))
    assert not np.array_equal(fit(0, 1.0), fit(1, 1.0))           # all features: only the bootstrap differs
    np.testing.assert_allclose(fit(2).sum(1), 1.0, rtol=1e-6)
    for seed in (0, 1):
        cfg = common.config_from_preset(ardt.Config, ardt.PRESETS, "smoke", device="cpu", learner="forest", seed=seed)
        assert ardt.make_learner(cfg, 100).seed == seed


def test_ardt_hand_built_automaton_trees():
    rng = np.random.default_rng(0)
    M = 200
    rand_dfa = rng.integers(0, 5, (5, 3))
    for delta in (ardt.PARITY, rand_dfa):
        Q, S = delta.shape
        tree = ardt.dfa_tree(delta, M)
        assert tree.n_leaves <= (Q + 1) * S
        x = rng.integers(0, S, (1000, M))
        np.testing.assert_array_equal(ardt.cot_rollout(tree, x, delta, M), ardt.run_dfa(delta, x))  # every step
    t = ardt.dfa_tree(ardt.PARITY, M)
    assert t.n_leaves == 3 * 2 and ardt.tree_params(t, 6) == (2 * 5 + 6 * 6, 2 * 5 + 6)


def test_ardt_cot_rows_and_plain_parity():
    rng = np.random.default_rng(0)
    M, T = 12, 12
    lens = rng.integers(1, T + 1, 200)
    seq = ardt.cot_sequences(ardt.PARITY, rng.integers(0, 2, (200, T)), lens, M)
    W, y = ardt.cot_rows(seq, lens, M)
    assert len(y) == lens.sum() and np.isin(W[:, -1], [0, 1, 4]).all()   # last slot: q_{t-1} or <sep>
    assert np.isin(W[:, 0], [2, 3]).all()                                  # slot 0: the symbol x_t
    np.testing.assert_array_equal(y, np.where(W[:, -1] == 4, 0, W[:, -1]) ^ (W[:, 0] - 2))   # q_t = q_{t-1} xor x_t
    # a plain tree that reads all 4 bits of every input is exact with 2^4 leaves
    x4 = np.array([[(i >> b) & 1 for b in range(4)] for i in range(16)] * 4)
    plain = ardt.DecisionTree(100, 1).fit(x4, ardt.run_dfa(ardt.PARITY, x4)[:, -1], np.ones(4, bool), 2)
    assert plain.n_leaves in (1, 16)        # balanced and exhaustive: no split has a positive gain, or all do


def test_ardt_turing_machine_tree():
    rng = np.random.default_rng(0)
    M, B, steps = 7, 32, 40
    tape = np.concatenate([rng.integers(0, 2, (B, M - 1)), np.full((B, 1), 2)], 1)
    c0 = tape.copy()
    c0[:, M - 2] = 3 + tape[:, M - 2]
    sim = ardt.tm_simulate(tape, np.full(B, M - 2), np.zeros(B, np.int64), steps)
    np.testing.assert_array_equal(ardt.tm_cot_rollout(ardt.tm_tree(M), c0, steps), sim)
    # the counter really counts: after returning to state I, the tape holds the next number
    assert (sim[:, :, :M - 1] >= 0).all() and len({tuple(c) for c in sim[0]}) > steps // 2


def test_ardt_reasoning_generators_match_python_eval():
    g = torch.Generator().manual_seed(0)
    ids, lens, ans, y = ardt.boolean_expressions(300, g)
    for i in range(300):
        w = [ardt.R_ITOS[t] for t in ids[i, :lens[i]]]
        assert w[-1] == "is" and eval(" ".join(w[:-1]).replace("true", "True").replace("false", "False")) == bool(y[i])
    ids, lens, ans, y = ardt.web_of_lies(300, g)
    for i in range(300):
        sents = " ".join(ardt.R_ITOS[t] for t in ids[i, :lens[i]]).split(" . ")
        truth = {sents[0].split()[0]: sents[0].split()[1] != "lies"}
        for s in sents[1:-1]:
            p = s.split()
            truth[p[0]] = truth[p[2]] == (p[3] != "lies")
        assert truth[sents[-1].split()[1]] == bool(y[i])


def test_ardt_reasoning_split_has_no_overlap_and_no_answers():
    for task in ardt.TASKS:
        s = ardt.reason_split(task, 1500, 1500, 3000, torch.Generator().manual_seed(0))
        test = {tuple(r[:n]) for r, n in zip(s["test"][0].tolist(), s["test"][1].tolist())}
        corpus = {tuple(r[:n]) for r, n in zip(s["corpus"][0].tolist(), s["corpus"][1].tolist())}
        train = {tuple(r[:n]) for r, n in zip(s["train"][0].tolist(), s["train"][1].tolist())}
        assert s["dropped"] > 0 and s["overlap"] == 0                # short prompts repeat: some were dropped
        assert not test & corpus and not test & train and len(s["train"][0]) == 1500
        answers = {ardt.R["yes"], ardt.R["no"]}
        assert all(p[-1] in (ardt.R["is"], ardt.R["?"]) and not answers & set(p) for p in corpus)
        lens = s["corpus"][1]
        assert lens.min() < s["test"][1].min() and lens.max() > s["test"][1].max()   # a shifted length range


def test_ardt_layer_is_chosen_on_validation_labels():
    cfg = common.config_from_preset(ardt.Config, ardt.PRESETS, "smoke", device="cpu")
    rng = np.random.default_rng(0)
    y_tr, y_te = rng.integers(0, 2, 300), rng.integers(0, 2, 300)
    noise = lambda n: rng.normal(size=(n, 4))
    signal = lambda y: np.c_[y + 0.1 * rng.normal(size=len(y)), rng.normal(size=(len(y), 3))]
    layers = [(noise(300), noise(300)), (signal(y_tr), signal(y_te)), (noise(300), noise(300))]
    acc, best = ardt.pick_layer_and_score(cfg, layers, y_tr, y_te)
    assert best == 1 and acc > 0.95
    assert ardt.forest_acc(cfg, *layers[0][:1], y_tr, layers[0][1], y_te) < 0.65


def test_ardt_tree_on_tf_reads_the_trained_gpt(monkeypatch):
    """'tree on TF' and 'TF's own answer' come from the trained feature GPT; the control from its untrained copy."""
    trained, made, picked, answered = [], {}, [], []
    real_train, real_tf, real_pick, real_ans = ardt.train_gpt, ardt.tf_features, ardt.pick_layer_and_score, ardt.answer_acc
    def tf(model, *a):
        feats, logits = real_tf(model, *a)
        made.update({id(x): (x, model) for x in feats + [logits]})     # x kept alive: its id stays unique
        return feats, logits
    monkeypatch.setattr(ardt, "train_gpt", lambda model, *a: trained.append(model) or real_train(model, *a))
    monkeypatch.setattr(ardt, "tf_features", tf)
    monkeypatch.setattr(ardt, "pick_layer_and_score", lambda cfg, layers, *a: picked.append(
        [made.get(id(x), (x, None))[1] for pair in layers for x in pair]) or real_pick(cfg, layers, *a))
    monkeypatch.setattr(ardt, "answer_acc", lambda logits, *a: answered.append(made[id(logits)][1]) or real_ans(logits, *a))
    cfg = common.config_from_preset(ardt.Config, ardt.PRESETS, "smoke", device="cpu", reason_steps=2)
    ardt.exp_reason(cfg, torch.Generator().manual_seed(0))
    (model,) = trained
    assert len(picked) == 3 * len(ardt.TASKS) and answered == [model] * len(ardt.TASKS)
    for lin, tf_, untrained in zip(picked[0::3], picked[1::3], picked[2::3]):
        assert set(lin) == {None} and set(tf_) == {model}
        (other,) = set(untrained)
        assert other is not None and other is not model
        assert not torch.equal(other.lm_head.weight, model.lm_head.weight)   # a copy made before training


def test_ardt_linear_features_hand_worked():
    emb = torch.arange(len(ardt.R_ITOS) * 2, dtype=torch.float32).reshape(-1, 2)
    ids, lens = torch.tensor([[3, 5, 3, 0]]), torch.tensor([3])                 # true and true <pad>
    mean_f, bow_f = ardt.lin_features(ids, lens, emb, last=2)
    np.testing.assert_allclose(mean_f[0, :2], (2 * emb[3] + emb[5]).numpy() / 3)
    assert bow_f[0, 3] == 2 and bow_f[0, 5] == 1 and bow_f[0, :len(ardt.R_ITOS)].sum() == 3   # <pad> not counted
    np.testing.assert_allclose(bow_f[0, len(ardt.R_ITOS):], torch.cat([emb[5], emb[3]]).numpy())   # last 2 tokens


def test_ardt_featurizer_answer_is_scored_from_its_logits():
    logits = torch.zeros(4, len(ardt.R_ITOS))
    logits[:, ardt.R["yes"]] = torch.tensor([1.0, 1.0, -1.0, -1.0])
    y = torch.tensor([1, 0, 0, 0])
    assert ardt.answer_acc(logits, "web_of_lies", y) == 0.75
    logits[:, ardt.R["true"]] = 5.0
    assert ardt.answer_acc(logits, "boolean_expressions", torch.tensor([1, 1, 1, 0])) == 0.75


def test_ardt_data_file_path(tmp_path):
    lines = [f"{who} saw a {what} in the {where} . it was {how} ." for who in ("tom", "lily") for what in ("dog", "cat")
             for where in ("park", "house") for how in ("happy", "sad", "big")]      # 24 distinct documents
    p = tmp_path / "tiny.txt"
    p.write_text("\n<|endoftext|>\n".join(lines))
    m = smoke(ardt, tmp_path, data=str(p), vocab=20, parts=("text",), steps=10, n_test=4, n_gen=2)["metrics"]
    assert "grammatical_frac/gpt/d16" not in m and math.isfinite(m["next_token_acc/ardt_onehot_L8/d16"])
    _, _, itos = ardt.load_text(str(p), 10, 95)
    assert len(itos) == 10 + 3


def test_ardt_bad_config(tmp_path):
    for kw in (dict(ardt=("tree:8",)), dict(parts=("text", "vision")), dict(widths=(18,)), dict(aut_bias=1.0),
               dict(data=str(tmp_path / "missing.txt")), dict(n_gen=500)):
        with pytest.raises(ValueError):
            ardt.Config(**kw)


# ======================================================================
# transcendence.py
# ======================================================================
_TR = transcendence
_INF = float("-inf")


def test_transcendence_smoke(tmp_path):
    blob = smoke(_TR, tmp_path)
    m, cfg = blob["metrics"], blob["config"]
    for k, v in m.items():
        assert v is not None and math.isfinite(v), k
    s = f"sigma{cfg['toy_sigma']:g}"
    # linear toy: the majority vote transcends, tau = 1 does not (Prop. 1), identical experts give no gain
    assert m[f"toy_acc/{s}/tau0.001"] > m[f"toy_acc/{s}/best_expert"] + 0.05
    assert m[f"toy_acc/{s}/tau1"] <= m[f"toy_acc/{s}/mean_expert"] + 0.03
    assert m[f"toy_acc/{s}_corr1/tau0.001"] <= m[f"toy_acc/{s}_corr1/best_expert"] + 0.01
    assert m["toy3/reward/tau0.1"] == pytest.approx(0.899, abs=1e-3)
    # position pool, held-out positions: independent blunders are voted away, shared ones win the vote
    assert m["pool_reward/independent/tau0.001"] > m["pool_reward/independent/best_expert"] + 0.2
    assert m["pool_reward/independent/tau1"] < m["pool_reward/independent/best_expert"]
    assert m["pool_reward/shared/tau0.001"] < m["pool_reward/shared/best_expert"]
    assert m["pool_gain/independent"] == pytest.approx(
        m["pool_reward/independent/tau0.001"] - m["pool_reward/independent/best_expert"])
    for t in cfg["taus"]:
        assert 0.0 <= m[f"legal_rate/first_try/tau{t:g}"] <= m[f"legal_rate/five_tries/tau{t:g}"] <= 1.0
    assert m["chess_reward/expert/rho0.3"] > m["chess_reward/expert/rho0.7"] > m["chess_reward/random"]
    assert m["gpt/loss"] < math.log(32)             # the transcript model learned something in 20 steps
    for key in ["expert/rho0.3", "model_char/tau0.001", "model_legal/tau0.001"]:
        assert 0 < m[f"rating_rd/{key}"] < 500 and 0.0 <= m[f"score/{key}"] <= 1.0
    assert m["rating/best_expert"] == max(m[f"rating/expert/rho{r:g}"] for r in cfg["rhos"])
    assert m["rating/rung/eps0.75"] == cfg["anchor_rating"]
    assert blob["info"]["engine"] and blob["info"]["engine_seeding"]
    assert os.path.getmtime(tmp_path / "transcendence.png") >= os.path.getmtime(tmp_path / "transcendence.json")


def test_transcendence_bad_config_fails_before_any_work(tmp_path, capsys):
    for kw in (dict(diversity="some"), dict(parts="toy,chesss"), dict(rhos=(0.2, 1.5)), dict(game_modes=("x",)),
               dict(stockfish="/bin/true"), dict(stockfish=str(tmp_path)), dict(stockfish=str(tmp_path / "nope"))):
        with pytest.raises(ValueError):
            _TR.Config(**kw)
    with pytest.raises(ValueError, match="Stockfish"):
        _TR.Config(preset="full", stockfish="none")
    assert _TR.Config(preset="quick", stockfish="none").stockfish == "none"   # quick falls back to built-in rungs
    with pytest.raises(SystemExit) as e:
        common.parse_args(_TR.Config, _TR.PRESETS, ["--preset", "smoke", "--stockfish", "/bin/true", "--out",
                                                    str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--stockfish /bin/true" in err[0]

# --- theory ---------------------------------------------------------------------------------------------


def test_transcendence_temperature_limits_and_appendix_c():
    p = torch.tensor([[0.1, 0.5, 0.4], [0.3, 0.3, 0.4]])
    assert torch.allclose(_TR.temper(p.log(), 1.0), p, atol=1e-6)
    assert torch.allclose(_TR.temper(p.log(), 1e-4), torch.eye(3)[[1, 2]])   # tau -> 0 is argmax
    assert torch.allclose(_TR.temper(p.log(), 0.01), torch.eye(3)[[1, 2]], atol=1e-4)
    assert torch.equal(_TR.temper(torch.tensor([0.0, 0.0, -1.0]), 1e-4), torch.tensor([0.5, 0.5, 0.0]))  # ties
    t3 = _TR.toy_three_actions(0.1)
    assert torch.allclose(t3["tempered"], torch.tensor([0.0505, 0.899, 0.0505]), atol=1e-3)
    ns = copy_out(_TR.temper)
    assert torch.equal(ns["temper"](p.log(), 0.3), _TR.temper(p.log(), 0.3))


def test_transcendence_toy_best_expert_is_the_best_of_differing_experts():
    r = _TR.toy_linear(d=8, C=4, k=5, N=400, sigma=1.0, corr=0.0, steps=5, lr=0.1, taus=(1.0,), seed=0, n_test=4000)
    assert r["best_expert"] > r["mean_expert"] + 0.01                        # noisy experts differ in accuracy
    same = _TR.toy_linear(d=8, C=4, k=5, N=400, sigma=1.0, corr=1.0, steps=5, lr=0.1, taus=(1.0,), seed=0, n_test=4000)
    assert same["best_expert"] == pytest.approx(same["mean_expert"], abs=1e-6)    # identical experts (corr=1)


def test_transcendence_prop1_and_majority_vote_on_tables():
    g = torch.Generator().manual_seed(0)
    X, Y, k = 50, 6, 5
    r = torch.rand(X, Y, generator=g)
    fstar = F.one_hot(r.argmax(1), Y).float()
    f = torch.rand(k, X, Y, generator=g)
    f = f / f.sum(-1, keepdim=True)
    R = lambda pol: float((pol * r).sum(-1).mean())
    assert R(f.mean(0)) == pytest.approx(sum(R(fi) for fi in f) / k, abs=1e-6)     # Prop. 1
    noisy = torch.stack([rho / Y + (1 - rho) * fstar for rho in (0.3, 0.5, 0.7, 0.8, 0.9)])
    mix_max = _TR.temper(noisy.mean(0).log(), 1e-4)                                 # Prop. 3
    assert torch.equal(mix_max, fstar) and R(mix_max) > max(R(fi) for fi in noisy)
    part = torch.arange(X) % k                                                      # Prop. 4
    comp = torch.stack([torch.where((part == i)[:, None], fstar, torch.full_like(fstar, 1 / Y)) for i in range(k)])
    mix_max = _TR.temper(comp.mean(0).log(), 1e-4)
    assert torch.equal(mix_max, fstar) and R(mix_max) > max(R(fi) for fi in comp)

# --- chess data, players, scoring -------------------------------------------------------------------------


def test_transcendence_games_replay_and_the_cache_is_versioned_and_checked(tmp_path, capsys):
    lines = _TR.generate_games(30, (0.3, 0.7), seed=3, max_plies=60, cache_dir=str(tmp_path))
    lines += _TR.generate_games(10, (0.3, 0.7), seed=4, shared=True, max_plies=60)
    for line in lines:
        i, j, res, t = line.split(",", 3)
        assert set(t) <= set(_TR.VOCAB) and "..." not in t and t.startswith("1.")
        board = chess.Board()
        for n, tok in enumerate(t.split()):
            assert (n % 2 == 1) or tok.startswith(f"{n // 2 + 1}.")
            board.push_san(tok.split(".")[-1])                                  # raises on an illegal move
        assert _TR.TOK.decode(_TR.TOK.encode(";" + t)) == ";" + t
        assert _TR.adjudicate(board) == float(res)
    (path,) = [p for p in tmp_path.iterdir() if p.name.startswith("transcendence_games_")]
    assert f"_v{_TR.CACHE_VERSION}_" in path.name and not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]
    assert _TR.generate_games(30, (0.3, 0.7), seed=3, max_plies=60, cache_dir=str(tmp_path)) == lines[:30]
    text = path.read_text()
    no_marker = text.replace("#end 30\n", lines[0] + "\n")                    # a writer killed before the marker
    for broken in (text[:len(text) // 2], text.replace(",1.", ",X.", 1), "", no_marker):
        path.write_text(broken)                                                 # truncated / corrupt / empty
        capsys.readouterr()
        assert _TR.generate_games(30, (0.3, 0.7), seed=3, max_plies=60, cache_dir=str(tmp_path)) == lines[:30]
        out = capsys.readouterr().out
        assert str(path) in out and "rebuilding" in out and len(out.strip().splitlines()) == 1
        assert path.read_text() == text


def test_transcendence_experts_blunder_as_specified():
    rng = random.Random(0)
    board = chess.Board("r3k2r/ppp2ppp/2n5/3qp3/3P4/2N2N2/PPP2PPP/R2QKB1R w KQkq - 0 9")
    sc = dict(_TR.move_scores(board))
    best, worst = max(sc.values()), min(sc.values())
    assert best > worst
    for rho, shared, allowed in ((0.0, False, {m for m, s in sc.items() if s == best}),
                                 (1.0, True, {m for m, s in sc.items() if s == worst}),
                                 (1.0, False, set(sc))):
        seen = {_TR.expert_move(board, rho, shared, rng) for _ in range(300)}
        assert seen <= allowed and (len(seen) > 1 or len(allowed) == 1)
    assert len(seen) > len({m for m, s in sc.items() if s == best})      # independent blunders spread wide
    # pi0 vs pi0 is fair (colours alternate), a random mover is crushed
    s = [v for _, v in _TR.play_games(_TR.ExpertPlayer(0.0, seed=1), [_TR.Rung(0.0, None, seed=2)], 60, 60)]
    assert abs(sum(s) / 60 - 0.5) < 3 * 0.5 / math.sqrt(60)
    s = [v for _, v in _TR.play_games(_TR.ExpertPlayer(1.0, seed=1), [_TR.Rung(0.0, None, seed=2)], 20, 60)]
    assert sum(s) / 20 < 0.15


class _Forfeiter:
    def choose(self, boards, histories):
        return [None for _ in boards]


class _QueenGiver:
    def choose(self, boards, histories):
        return [chess.Move.from_uci({1: "e7e5", 2: "d8h4"}.get(b.fullmove_number, "b8c6")) for b in boards]


def test_transcendence_forfeit_scores_a_loss():
    res = _TR.play_games(_Forfeiter(), [_TR.Rung(0.0, None, seed=0)], 4, 20)
    assert [s for _, s in res] == [0.0] * 4                         # White and Black forfeits alike
    class _Player:   # White: e4, Qh5, Qxh4 wins the queen, then forfeits; material would score it a win
        def choose(self, boards, histories):
            n = len(histories[0])
            return [chess.Move.from_uci(["e2e4", "d1h5", "h5h4"][n // 2]) if n < 6 else None for _ in boards]
    res = _TR.play_games(_Player(), [_QueenGiver()], 1, 20)
    assert res == [(0, 0.0)]


@pytest.mark.skipif(_TR.Config(stockfish="auto").stockfish == "none", reason="stockfish not installed")
def test_transcendence_stockfish_game_at_a_fixed_level_completes_legally():
    class _Checked:
        def __init__(self, inner):
            self.inner, self.moves = inner, 0
        def choose(self, boards, histories):
            out = self.inner.choose(boards, histories)
            for b, m in zip(boards, out):
                assert m in b.legal_moves
            self.moves += len(out)
            return out
    with _TR.open_engines(_TR.Config(stockfish="auto").stockfish, 2) as engines:
        sf = _Checked(_TR.Rung(0.0, engines, seed=0))
        res = _TR.play_games(_Checked(_TR.ExpertPlayer(0.0, seed=1)), [sf], 2, 40)
    assert len(res) == 2 and sf.moves >= 20 and all(s in (0.0, 0.5, 1.0) for _, s in res)


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    m = common.GPT(common.GPTConfig(vocab_size=32, block_size=160, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def test_transcendence_tree_scoring_matches_naive():
    model, rng, items = _tiny_model(), random.Random(0), []
    board, sans = chess.Board(), []
    for ply in range(14):
        if ply in (0, 5, 13):
            items.append((_TR.prefix_for(sans), [board.san(m) + " " for m in board.legal_moves]))
        m = rng.choice(list(board.legal_moves))
        sans.append(board.san(m))
        board.push(m)
    for (prefix, cands), lp in zip(items, _TR.score_moves(model, items, chunk=2)):
        p_ids = _TR.TOK.encode(prefix)
        for c, v in zip(cands, lp):
            ids = torch.tensor([p_ids + _TR.TOK.encode(c)])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids)[0][0], -1)
            want = sum(float(logp[len(p_ids) - 1 + t, ids[0, len(p_ids) + t]]) for t in range(len(c)))
            assert v.item() == pytest.approx(want, abs=1e-4)
        assert float(lp.exp().sum()) <= 1.0 + 1e-5               # candidates with terminator are prefix-free


def test_transcendence_batched_generation_matches_one_by_one():
    model = _tiny_model(3)
    prompts = [";1.", ";1.e4 e5 2.Nf3", ";1.d4 d5 2.c4 e6 3.Nc3 Nf6 4."]
    got = _TR.generate_replies(model, prompts, 1e-4, torch.Generator().manual_seed(0), n_new=6)
    for p, reply in zip(prompts, got):
        want = model.generate(torch.tensor([_TR.TOK.encode(p)]), 6, greedy=True)[0, len(p):]
        assert reply == _TR.TOK.decode(want)
    board = chess.Board()
    assert _TR.parse_reply(board, "Nf3+ e5") == chess.Move.from_uci("g1f3")
    assert _TR.parse_reply(board, ";1.e4") is None and _TR.parse_reply(board, "Ke2 ") is None


def test_transcendence_low_temperature_is_argmax_and_char_mode_counts_tries():
    model = _tiny_model(1)
    board = chess.Board()
    board.push_san("e4")
    lp = _TR.score_moves(model, [(_TR.prefix_for(["e4"]), [board.san(m) + " " for m in board.legal_moves])])[0]
    best = list(board.legal_moves)[int(lp.argmax())]
    player = _TR.ModelPlayer(model, 1e-3, "legal", seed=0)
    assert all(player.choose([board], [["e4"]])[0] == best for _ in range(5))
    g = torch.Generator().manual_seed(0)
    moves, n_try, n_bad = _TR.char_moves(model, [board] * 3, [["e4"]] * 3, 1e-4, g, tries=5)
    assert len(set(moves)) == 1                                    # greedy: the same reply for the same prompt
    assert n_try == 3 * 5 if moves[0] is None else n_try == 3 and n_bad == (15 if moves[0] is None else 0)

# --- position pool ------------------------------------------------------------------------------------------


def test_transcendence_expert_reward_closed_form_on_a_hand_worked_pool():
    rew = torch.tensor([[0.0, -1.0, -3.0, _INF], [0.0, 0.0, -2.0, -2.0]])
    # independent: a blunder is uniform: (0-1-3)/3 = -4/3 and (0+0-2-2)/4 = -1, mean -7/6
    assert _TR.expert_rewards(rew, [0.0, 0.5, 1.0], False) == pytest.approx([0.0, -7 / 12, -7 / 6])
    # shared: a blunder is the worst move: -3 and -2, mean -2.5
    assert _TR.expert_rewards(rew, [0.0, 0.5, 1.0], True) == pytest.approx([0.0, -1.25, -2.5])
    logp = torch.tensor([[-1.0, -0.5, -3.0, _INF], [-2.0, -0.1, -0.1, -9.0]])
    # argmax: position 1 plays r=-1; position 2 ties between r=0 and r=-2 -> -1
    assert _TR.policy_reward(logp, rew, 1e-3) == pytest.approx(-1.0)
    p = logp.softmax(-1)
    assert _TR.policy_reward(logp, rew, 1.0) == pytest.approx(float((p * rew.nan_to_num(0, 0, 0)).sum(1).mean()))


def test_transcendence_label_sampler_matches_the_closed_form(tmp_path):
    lines = _TR.generate_games(20, (0.3, 0.7), seed=5, max_plies=60)
    pos = _TR.sample_positions(lines, 150, seed=0)
    for b, h in pos[:20]:                                  # the history replays to the board, never finished
        r = chess.Board()
        for san in h:
            r.push_san(san)
        assert r == b and not b.is_game_over()
    pool = _TR.pool_tensors([b for b, _ in pos])
    for (b, _), f, r in zip(pos[:20], pool["feat"], pool["rew"]):
        sc = [s for _, s in _TR.move_scores(b)]
        assert r[:len(sc)].tolist() == [s - max(sc) for s in sc] and bool((r[len(sc):] == _INF).all())
        assert f[:len(sc), 0].tolist() == [b.piece_type_at(m.from_square) for m in b.legal_moves]
    rew = pool["rew"]
    g = torch.Generator().manual_seed(0)
    for shared in (False, True):
        for rhos in ((0.0,), (0.5,), (0.3, 0.7)):
            x, y = _TR.sample_expert_labels(rew, rhos, shared, 40_000, g)
            vals = rew[x, y]
            want = sum(_TR.expert_rewards(rew, rhos, shared)) / len(rhos)      # the mixture: mean of the experts
            se = float(vals.std()) / math.sqrt(len(vals)) + 1e-9
            assert abs(float(vals.mean()) - want) < 3 * se + 1e-6, (shared, rhos)
            assert math.isfinite(float(vals.min()))


def test_transcendence_move_scorer_learns_the_mixture_on_held_out_positions():
    lines = _TR.generate_games(60, (0.3, 0.7), seed=6, max_plies=60)
    cfg = _TR.Config(stockfish="none", rhos=(0.3, 0.5, 0.7), pool_steps=300, pool_batch=128, pool_hidden=32)
    train = _TR.pool_tensors([b for b, _ in _TR.sample_positions(lines[10:], 600, 1)])
    test = _TR.pool_tensors([b for b, _ in _TR.sample_positions(lines[:10], 200, 2)])
    model, _ = _TR.train_move_scorer(cfg, train, False, seed=0)
    with torch.no_grad():
        logp = model(test["feat"], test["rew"] > _INF)
    best = max(_TR.expert_rewards(test["rew"], cfg.rhos, False))
    assert _TR.policy_reward(logp, test["rew"], 1e-3) > best + 0.2

# --- ratings -------------------------------------------------------------------------------------------------


def test_transcendence_glicko2_matches_glickman_and_copies_out():
    example = (1500, 200, 0.06, [(1400, 30, 1), (1550, 100, 0), (1700, 300, 0)], 0.5)
    ns = copy_out(_TR.glicko2_update)
    for update in (_TR.glicko2_update, ns["glicko2_update"]):
        r, rd, sig = update(*example)
        assert (r, rd, sig) == pytest.approx((1464.06, 151.52, 0.05999), abs=0.01)
        assert sig == pytest.approx(0.05999, abs=1e-5)
    assert ns["glicko2_update"](*example) == _TR.glicko2_update(*example)
    # a win moves the rating up, a loss down, a draw against an equal opponent leaves it
    assert _TR.glicko2_update(1500, 350, 0.06, [(1500, 50, 1.0)])[0] > 1500
    assert _TR.glicko2_update(1500, 350, 0.06, [(1500, 50, 0.0)])[0] < 1500
    assert _TR.glicko2_update(1500, 350, 0.06, [(1500, 50, 0.5)])[0] == pytest.approx(1500)
    assert _TR.glicko2_update(1500, 350, 0.06, [(1500, 50, 1.0)])[1] < 350
    # sequential one-game periods (the paper's protocol) approach the logistic estimate for a long series
    R, RD = _TR.rate_sequential([(1500.0, 0.0, s) for s in [1, 1, 1, 0] * 150])
    assert abs(R - (1500 + 400 * math.log10(3))) < 30 and RD < 100
