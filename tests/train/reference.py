#!/usr/bin/python3
"""Independent PyTorch reference for adapterd's trainer (parity of gradients and optimizer steps).

Run with Debian's interpreter (torch and numpy; no transformers, peft, safetensors):

    /usr/bin/python3 tests/train/reference.py OUTDIR

The models, adapters and their forward maths are NOT re-implemented here: they come from
tests/adapters/reference.py (bases built by tests/parity/reference.py's llama_build /
gpt2_build, adapters made by its make_* functions, forward by its llama_forward /
gpt2_forward), imported with importlib; neither file is changed. Wrappers (in this module's
instance of them) make that forward what training needs:

  * DoRA: the row norm ||W + s B A|| is detached (a constant in the backward), as PEFT does
    (lora/dora.py: weight_norm = weight_norm.detach()); the values are unchanged.
  * Mistral's sliding window: key j is hidden from query i when i - j >= window (as in
    tests/parity/reference.py's causal_mask); the adapters reference has no window.
  * A tied Llama reads lm_head.weight = model.embed_tokens.weight (one tensor, both uses).

For every case OUTDIR/<case>/ holds (all safetensors: tensors sorted by name, "__metadata__"
{"format": "pt"} first, header padded with spaces to 8 bytes, the data bytes covered by the
tensors one after another without holes; F32 unless said):

  model/config.json, model/model.safetensors   the tiny random base (F32; the cases of one
                        base hard-link the same two files where the file system allows).
  adapter_config.json   the adapter's config as tests/adapters/reference.py writes it, with
                        "inference_mode": false (PEFT kinds and BITFIT). Bottleneck: the
                        AdapterHub file ({"config": BnConfig, "hidden_size", ...}), which has
                        no inference_mode field. Absent for FULL.
  init.safetensors      initial value of every trainable parameter (absent for FULL: the base).
  saved.safetensors     prefix tuning with prefix_projection only: {"prompt_embeddings": the
                        MLP's output for the initial parameters}, what PEFT saves.
  grads.safetensors     d(loss_sum / n_targets) / d(param) at the initial parameters.
  sgd1.safetensors      param - sgd.lr * grad.
  adamw5.safetensors    after 5 AdamW steps on the same batch (clipping, schedule, decay below).
  child5.safetensors    child cases: after 5 steps with the child-tuning rule.
  mask.safetensors      child-tuning D: the U8 0/1 mask of every maskable parameter.
  case.json             {
     "kind": "LORA"|"IA3"|"PREFIX_TUNING"|"PROMPT_TUNING"|"BITFIT"|"BOTTLENECK"|"FULL",
     "base": base name, "options": {what the case sets},
     "batch": {"tokens": [[ids]...], "targets": [[id or -1]...]}  (targets[s][i]: the token
              real position i predicts; virtual tokens have none),
     "loss": loss_sum at the initial params (sum of -log p(target), unscaled),
     "n_targets": N, "grad_tol": 1e-4, "param_tol": 1e-5,
     "params": [{"name", "shape", "no_decay", "maskable"}] sorted by name (index = k of the
                child-tuning hash),
     "no_decay": [names], "maskable": [names],
     "sgd": {"lr"},
     "adamw": {"lr", "betas", "eps", "weight_decay", "warmup_steps", "total_steps", "steps",
               "max_grad_norm", "schedule": "cosine_with_warmup", "clipped_steps": [t...],
               "grad_norms": [total L2 norm before clipping, per step], "lrs": [lr_t],
               "losses": [loss_sum before each step], "clip_margin": the least
               |max_grad_norm / (total + 1e-6) - 1| over the steps (> 1e-3)},
     "child": {"mode": "F"|"D", "reserve_p", "seed", "max_grad_norm" (D: the Fisher's
               per-tensor clip; the same value as adamw.max_grad_norm in every child case),
               "fisher_batches": [{"tokens", "targets"}] (D; [] for F), "kept": [kept
               elements per step], "clipped_steps", "grad_norms", "lrs", "losses",
               "clip_margin"; D also "percentile_q", "polar", "n_kept", "n_maskable",
               "fisher_clipped": [[batch index, name]], "polar_margin": the least relative
               distance of a Fisher value from polar} (child cases only),
     "checks": {the self-checks' worst errors and margins}}

Training rule (what the C trainer must reproduce), per step t = 0, 1, ..., steps - 1:
  g = grad of loss_sum / N at the current params;
  clip: total = sqrt(sum of all g^2); if max_grad_norm / (total + 1e-6) < 1, g *= that ratio;
  child-tuning: g *= mask (F: a new mask every step, kept elements scaled by 1 / reserve_p);
  lr_t = lr * f(t), f(t) = t / max(1, warmup) for t < warmup else
         0.5 * (1 + cos(pi * (t - warmup) / max(1, total - warmup)));
  decayed params: p *= 1 - lr_t * weight_decay;
  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
  p -= lr_t * (m / (1 - b1^(t+1))) / (sqrt(v / (1 - b2^(t+1))) + eps).
no_decay: the name ends in "bias", contains "norm" or "ln_", or is prompt/prefix embeddings
(prompt_embeddings, prompt_encoder.embedding.weight). Maskable (child-tuning): every trainable
parameter but embeddings (embed_tokens, wte, wpe) and norms' weights and biases.

Child-tuning masks (splitmix64 with uint64 wrapping arithmetic):
  key_t = splitmix64(splitmix64(seed) + t); x = splitmix64(key_t + (k << 40) + i)
  (k: index of the parameter in the name-sorted list, i: row-major element index);
  u = (x >> 11) * 2^-53; kept iff u < reserve_p.
  D: Fisher = mean over fisher_batches of g^2, each maskable parameter's g clipped alone to
  L2 norm child.max_grad_norm; polar = numpy.percentile(all maskable Fisher values,
  percentile_q) (linear interpolation); mask = fisher >= polar, applied without rescaling.

Self-checks (an AssertionError means the reference is wrong): per parameter two elements'
gradients against 5-point central finite differences of the float64 loss (DoRA: with the
row norm held at its value, which is what detaching means); the loss by a second route
(F.cross_entropy; LoRA/DoRA/IA3: the merged weights, with gradients; FULL and GPT-2 BitFit:
tests/parity/reference.py's own forward, with gradients; prefix projection: the saved
prompt_embeddings as a plain prefix, gradients by the chain rule; the adapters reference's
layout checks for prefix, prompt and bottleneck); the hand-written AdamW (and child-tuning)
against torch.optim.AdamW + LambdaLR + clip_grad_norm_; splitmix64 against its published
outputs; numpy.percentile against the linear-interpolation formula; every file read back.
Robustness (so that a float32 trainer can meet param_tol): every clipping decision is more than
1e-3 (relative) from its edge, the D threshold more than 1e-5 from every Fisher value, and
noise of 1e-6 of each tensor's RMS on every gradient moves adamw5 / child5 by < param_tol / 4
(hence eps = 1e-3, see ADAMW).
"""
import importlib.util
import json
import math
import os
import struct
import sys
import time
import zlib

import numpy as np
import torch


def _load(name, rel):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", *rel.split("/"))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


A = _load("adapters_reference", "adapters/reference.py")
parity = A.parity  # the same tests/parity/reference.py instance the adapters reference uses

GRAD_TOL = 1e-4
PARAM_TOL = 1e-5
FD_TOL = 1e-6        # finite differences vs autograd, relative
SAME_TOL = 1e-10     # two float64 formulations of the same quantity (relative to its scale)
FD_STEP = 1e-4
SGD_LR = 0.1
# eps 1e-3, not PyTorch's 1e-8: Adam's update m/(sqrt(v)+eps) moves an element whose gradient
# is near zero by up to lr whatever its sign, so a float32 trainer's rounding noise (~1e-6 of a
# tensor's RMS gradient, e.g. on GPT-2's c_attn key bias, whose gradient is exactly 0 in
# theory) would move adamw5 by up to lr/eps * noise per step: 1e-2 with eps 1e-8, ~2e-6 with
# 1e-3 (measured below as checks.adamw_noise_1e-6; asserted < param_tol / 4). The RMS
# gradient is ~1e-2, well above eps: the normalisation still matters.
ADAMW = dict(lr=1e-2, betas=[0.9, 0.999], eps=1e-3, weight_decay=0.1, warmup_steps=2,
             total_steps=5, steps=5, schedule="cosine_with_warmup")
NOISE_REL = 1e-6     # the noise of the sensitivity check, relative to each tensor's RMS
CLIP_EPS = 1e-6      # torch.nn.utils.clip_grad_norm_: max_norm / (total + 1e-6)
CLIP_MARGIN = 1e-3   # every clipping decision at least this far (relative) from the edge
CHILD = dict(reserve_p=0.3, seed=20211107)

# ------------------------------------------------------------------------ wrappers

_DORA = {"frozen": None, "capture": None}  # row norms held fixed (FD checks) / recorded
_orig_project = A.project


def _project(base, fx, w, module, x):
    """A.project, with DoRA's row norm detached (PEFT: weight_norm.detach())."""
    if module not in fx.dora:
        return _orig_project(base, fx, w, module, x)
    assert module not in fx.ia3_in and module not in fx.ia3_out and not fx.lora.get(module)
    W = base.weight_out_in(w, module)
    b = w.get(module + ".bias")
    a, B, s, m = fx.dora[module]
    if _DORA["frozen"] is not None:
        norm = _DORA["frozen"][module]
    else:
        norm = (W + s * (B @ a)).norm(dim=1).detach()
        if _DORA["capture"] is not None:
            _DORA["capture"][module] = norm
    y = (m / norm) * (x @ W.T + s * ((x @ a.T) @ B.T))
    return y if b is None else y + b


A.project = _project

_WINDOW = {"w": None}
_orig_mask = A.attention_mask


def _attention_mask(T, n_prefix):
    """A.attention_mask plus Mistral's sliding window (absolute positions; never with a prefix)."""
    mask = _orig_mask(T, n_prefix)
    if _WINDOW["w"] is not None:
        assert n_prefix == 0, "no prefix tuning on a sliding-window base"
        i = torch.arange(T).unsqueeze(1)
        j = torch.arange(T).unsqueeze(0)
        mask = mask | ((i - j) >= _WINDOW["w"])
    return mask


A.attention_mask = _attention_mask


class Base(A.Base):
    """The adapters reference's Base, with a sliding window and a tied lm_head."""

    def __init__(self, name, c):
        super().__init__(name, c)
        self.tied = self.family == "llama" and c["tied"]
        if self.tied:  # the lm_head is the embedding: not a module of its own
            self.modules = [m for m in self.modules if m != "lm_head"]

    def forward(self, fx, tokens, w=None, capture=None):
        w = dict(self.w if w is None else w, **fx.overrides)
        if self.tied:
            w["lm_head.weight"] = w["model.embed_tokens.weight"]
        fwd = A.llama_forward if self.family == "llama" else A.gpt2_forward
        _WINDOW["w"] = self.c.get("sliding_window")
        try:
            return fwd(self, w, fx, tokens, capture)
        finally:
            _WINDOW["w"] = None

# --------------------------------------------------------------------------- bases

BASES = {
    # GQA 6:2, head_dim 6, untied lm_head
    "llama_gqa": dict(
        family="llama", arch="LlamaForCausalLM", model_type="llama", dtype="F32", seed=41,
        hidden=36, n_head=6, n_kv=2, inter=62, vocab=101, n_layer=2, tied=False,
        eps=1e-5, theta=10000.0, max_pos=64),
    # q/k/v biases
    "qwen2": dict(
        family="llama", arch="Qwen2ForCausalLM", model_type="qwen2", dtype="F32", seed=42,
        hidden=32, n_head=4, n_kv=2, inter=56, vocab=77, n_layer=2, tied=False,
        eps=1e-6, theta=1000000.0, max_pos=64, qkv_bias=True),
    # SmolLM-like: tie_word_embeddings, GQA 3:1
    "llama_tied": dict(
        family="llama", arch="LlamaForCausalLM", model_type="llama", dtype="F32", seed=43,
        hidden=24, n_head=3, n_kv=1, inter=40, vocab=53, n_layer=2, tied=True,
        eps=1e-5, theta=10000.0, max_pos=64),
    # window 6 < the 9, 14 and 17-token sequences
    "mistral_window": dict(
        family="llama", arch="MistralForCausalLM", model_type="mistral", dtype="F32", seed=44,
        hidden=32, n_head=4, n_kv=2, inter=48, vocab=59, n_layer=2, tied=False,
        eps=1e-5, theta=10000.0, max_pos=64, sliding_window=6),
    # Conv1D, LayerNorm, learned positions, tied wte, head_dim 9
    "gpt2": dict(
        family="gpt2", dtype="F32", seed=45, prefix="transformer.", std=0.2,
        n_embd=36, n_head=4, n_layer=2, vocab=97, n_pos=40, n_inner=None),
}

LLAMA_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# --------------------------------------------------------------------------- cases
# (name, base, kind, maker options); child cases add "child".

CASES = [
    ("lora_llama", "llama_gqa", "LORA", dict(target_modules=LLAMA_PROJ, r=4, lora_alpha=8)),
    ("lora_regex_tied", "llama_tied", "LORA", dict(
        target_modules=r"model\.layers\.\d+\.(self_attn\.(q|v)_proj|mlp\.up_proj)"
                       r"|model\.layers\.1\.self_attn\.o_proj", r=3, lora_alpha=5)),
    ("rslora_mistral", "mistral_window", "LORA", dict(
        target_modules=LLAMA_PROJ, r=6, lora_alpha=12, use_rslora=True)),
    ("dora_qwen2", "qwen2", "LORA", dict(
        target_modules=LLAMA_PROJ[:4], r=4, lora_alpha=8, use_dora=True)),
    ("dora_bias_all_qwen2", "qwen2", "LORA", dict(
        target_modules=["q_proj", "v_proj", "o_proj"], r=4, lora_alpha=8, use_dora=True,
        bias="all")),
    ("lora_mts_lm_head", "llama_gqa", "LORA", dict(
        target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, modules_to_save=["lm_head"])),
    ("lora_mts_mlp_tied", "llama_tied", "LORA", dict(
        target_modules=["q_proj", "k_proj"], r=2, lora_alpha=4,
        modules_to_save=["model.layers.1.mlp.down_proj"])),
    ("lora_gpt2", "gpt2", "LORA", dict(
        target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, r=4, lora_alpha=8,
        a_std=0.1, b_std=0.1)),
    ("dora_gpt2", "gpt2", "LORA", dict(
        target_modules=["c_attn"], fan_in_fan_out=True, r=4, lora_alpha=8, use_dora=True,
        a_std=0.1, b_std=0.1)),
    ("lora_bias_all_gpt2", "gpt2", "LORA", dict(
        target_modules=["c_attn"], fan_in_fan_out=True, r=4, lora_alpha=8, bias="all",
        a_std=0.1, b_std=0.1, bias_std=0.05)),
    ("ia3_qwen2", "qwen2", "IA3", dict(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    ("ia3_gpt2", "gpt2", "IA3", dict(
        target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
        fan_in_fan_out=True, std=0.15)),
    ("prefix_llama", "llama_gqa", "PREFIX_TUNING", dict(num_virtual_tokens=3)),
    ("prefix_proj_llama", "llama_gqa", "PREFIX_TUNING", dict(
        num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=20)),
    ("prefix_gpt2", "gpt2", "PREFIX_TUNING", dict(num_virtual_tokens=3)),
    ("prefix_proj_gpt2", "gpt2", "PREFIX_TUNING", dict(
        num_virtual_tokens=2, prefix_projection=True, encoder_hidden_size=16)),
    ("prompt_tied", "llama_tied", "PROMPT_TUNING", dict(num_virtual_tokens=4)),
    ("prompt_gpt2", "gpt2", "PROMPT_TUNING", dict(num_virtual_tokens=5, std=0.3)),
    ("bitfit_llama", "llama_gqa", "BITFIT", dict(modules=[
        f"model.layers.{i}.{m}" for i in range(2)
        for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")])),
    ("bitfit_qwen2", "qwen2", "BITFIT", dict(modules=[
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj",
        "model.layers.1.self_attn.k_proj", "model.layers.1.mlp.up_proj"])),
    ("bitfit_gpt2", "gpt2", "BITFIT", dict(modules=[
        f"transformer.h.{i}.{m}" for i in range(2)
        for m in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc")]
        + ["transformer.ln_f"])),
    ("houlsby_llama", "llama_gqa", "BOTTLENECK", dict(
        preset="double_seq_bn", reduction_factor=6, non_linearity="swish")),
    ("pfeiffer_mistral", "mistral_window", "BOTTLENECK", dict(
        preset="seq_bn", reduction_factor=8, non_linearity="relu")),
    ("houlsby_gpt2", "gpt2", "BOTTLENECK", dict(
        preset="double_seq_bn", reduction_factor=9, non_linearity="swish", up_std=0.1)),
    ("pfeiffer_gpt2", "gpt2", "BOTTLENECK", dict(
        preset="seq_bn", reduction_factor=12, non_linearity="relu", up_std=0.1)),
    ("full_llama", "llama_gqa", "FULL", {}),
    ("full_tied", "llama_tied", "FULL", {}),
    ("full_mistral", "mistral_window", "FULL", {}),
    ("full_gpt2", "gpt2", "FULL", {}),
    ("child_f_full", "llama_gqa", "FULL", dict(child="F")),
    ("child_f_lora", "llama_gqa", "LORA", dict(
        target_modules=["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8, child="F")),
    ("child_d_full", "llama_gqa", "FULL", dict(child="D")),
]

# ---------------------------------------------------------------------- batches

BATCH_SHAPES = [  # (lengths, prompt positions without a target per sequence)
    ((5, 9, 14, 17), (2, 0, 4, 1)),
    ((6, 11, 16), (0, 3, 2)),
]


def make_batch(vocab, seed, lengths, prompts, hole=True):
    """Random tokens; targets[i] = tokens[i+1], -1 on the prompt part and the last position
    (and, with hole, one position in the middle of the longest sequence)."""
    gen = torch.Generator().manual_seed(seed)
    tokens, targets = [], []
    for n, p in zip(lengths, prompts):
        t = torch.randint(0, vocab, (n,), generator=gen).tolist()
        tg = [t[i + 1] if p <= i < n - 1 else -1 for i in range(n)]
        tokens.append(t)
        targets.append(tg)
    if hole:
        s = max(range(len(lengths)), key=lambda j: lengths[j])
        targets[s][lengths[s] // 2] = -1
    return {"tokens": tokens, "targets": targets}


def n_targets(batch):
    return sum(t >= 0 for tg in batch["targets"] for t in tg)

# ---------------------------------------------------------------- safetensors


def write_st(path, tensors):
    """{name: float tensor (F32) or uint8 tensor (U8)}: sorted names, __metadata__ first,
    header padded with spaces to 8 bytes, data contiguous."""
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous()
        if t.dtype == torch.uint8:
            dtype, b = "U8", t.numpy().tobytes()
        else:
            dtype, b = "F32", t.to(torch.float32).numpy().astype("<f4").tobytes()
        header[name] = {"dtype": dtype, "shape": list(t.shape),
                        "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * (-len(hjson) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for b in blobs:
            f.write(b)


def read_st(path):
    """Reads write_st's files back (self-check of the layout)."""
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    assert n % 8 == 0
    header = json.loads(data[8:8 + n])
    assert list(header)[0] == "__metadata__" and header.pop("__metadata__") == {"format": "pt"}
    body, out, spans = data[8 + n:], {}, []
    assert list(header) == sorted(header)
    for name, e in header.items():
        b, end = e["data_offsets"]
        spans.append((b, end))
        np_dtype = {"F32": "<f4", "U8": "u1"}[e["dtype"]]
        out[name] = torch.from_numpy(
            np.frombuffer(body[b:end], dtype=np_dtype).reshape(e["shape"]).copy())
    pos = 0
    for b, end in sorted(spans):
        assert b == pos, "hole or overlap in the data section"
        pos = end
    assert pos == len(body)
    return out

# ------------------------------------------------------------------ splitmix64

M64 = (1 << 64) - 1
SM_GOLDEN, SM_M1, SM_M2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def splitmix64(z):
    """The standard splitmix64 output for state z (Python ints, 64-bit wrapping)."""
    z = (z + SM_GOLDEN) & M64
    z = ((z ^ (z >> 30)) * SM_M1) & M64
    z = ((z ^ (z >> 27)) * SM_M2) & M64
    return z ^ (z >> 31)


def splitmix64_np(z):
    """Vectorized splitmix64 on a numpy uint64 array."""
    with np.errstate(over="ignore"):
        z = z + np.uint64(SM_GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(SM_M1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(SM_M2)
        return z ^ (z >> np.uint64(31))


def child_f_keep(seed, t, k, n, reserve_p):
    """Bool [n]: element i of parameter k is kept at step t."""
    key = splitmix64((splitmix64(seed) + t) & M64)
    base = (key + (k << 40)) & M64
    with np.errstate(over="ignore"):
        x = splitmix64_np(np.uint64(base) + np.arange(n, dtype=np.uint64))
    u = (x >> np.uint64(11)).astype(np.float64) * 2.0 ** -53  # < 2^53: exact in a double
    return torch.from_numpy(u < reserve_p)


def check_splitmix():
    assert splitmix64(0) == 0xE220A8397B1DCDAF
    assert splitmix64(1234567) == 6457827717110365317
    assert splitmix64((1234567 + SM_GOLDEN) & M64) == 3203168211198807973
    seed, t, k, n = CHILD["seed"], 3, 5, 1000
    keep = child_f_keep(seed, t, k, n, CHILD["reserve_p"])
    key = splitmix64((splitmix64(seed) + t) & M64)
    for i in (0, 1, 577, 999):
        x = splitmix64((key + (k << 40) + i) & M64)
        assert bool(keep[i]) == ((x >> 11) * 2.0 ** -53 < CHILD["reserve_p"])
    assert 0.25 < keep.double().mean() < 0.35

# ------------------------------------------------------------------- the cases


def f64leaf(t):
    return t.detach().to(torch.float64).clone()


def is_no_decay(name):
    return (name.endswith("bias") or "norm" in name or "ln_" in name
            or name in ("prompt_embeddings", "prompt_encoder.embedding.weight"))


def is_maskable(name):
    embedding = any(e in name for e in ("embed_tokens", "wte", "wpe")) or \
        name in ("prompt_embeddings", "prompt_encoder.embedding.weight")
    norm = "norm" in name or "ln_" in name
    return not (embedding or norm)


class Case:
    def __init__(self, name, base, kind, opts, index):
        self.name, self.base, self.kind, self.opts = name, base, kind, dict(opts)
        self.child = self.opts.pop("child", None)
        lengths, prompts = BATCH_SHAPES[index % len(BATCH_SHAPES)]
        self.batch = make_batch(base.vocab, zlib.crc32(name.encode()), lengths, prompts)
        self.config, self.saved, self.adapter = None, None, None
        getattr(self, "make_" + kind.lower())()
        self.names = sorted(self.init)

    # ......................................................... per kind: init, effects
    @staticmethod
    def _peft_config(config):
        return dict(config, inference_mode=False)  # a training config

    def make_lora(self):
        self.adapter = A.make_lora(self.base, self.name, **self.opts)
        self.config = self._peft_config(self.adapter.config)
        self.init = dict(self.adapter.tensors)

    def make_ia3(self):
        self.adapter = A.make_ia3(self.base, self.name, **self.opts)
        self.config = self._peft_config(self.adapter.config)
        self.init = dict(self.adapter.tensors)

    def make_prefix_tuning(self):
        opts = dict(self.opts)
        proj, enc = opts.pop("prefix_projection", False), opts.pop("encoder_hidden_size", None)
        self.adapter = A.make_prefix(self.base, self.name, **opts)
        config = dict(self.adapter.config)
        if not proj:
            self.init = dict(self.adapter.tensors)
        else:  # PEFT's PrefixEncoder in training form
            D, L, P = config["token_dim"], config["num_layers"], config["num_virtual_tokens"]
            config.update(prefix_projection=True, encoder_hidden_size=enc)
            rng = A.Rng(f"{self.base.name}/{self.name}/projection")
            self.init = {
                "prompt_encoder.embedding.weight": rng.normal((P, D), 1.0),
                "prompt_encoder.transform.0.weight": rng.normal((enc, D), 1.0 / math.sqrt(D)),
                "prompt_encoder.transform.0.bias": rng.normal((enc,), 0.3),
                "prompt_encoder.transform.2.weight": rng.normal((L * 2 * D, enc), 1.0),
                "prompt_encoder.transform.2.bias": rng.normal((L * 2 * D,), 0.3),
            }
        self.config = self._peft_config(config)

    def make_prompt_tuning(self):
        self.adapter = A.make_prompt(self.base, self.name, **self.opts)
        self.config = self._peft_config(self.adapter.config)
        self.init = dict(self.adapter.tensors)

    def make_bitfit(self):
        self.adapter = A.make_bitfit(self.base, self.name, **self.opts)
        self.config = self._peft_config(self.adapter.config)
        # adapterd's BitFit training config names the biased modules (every linear's and
        # LayerNorm's bias when it names none); the saved file needs no list
        self.config["target_modules"] = list(self.opts["modules"])
        self.init = dict(self.adapter.tensors)

    def make_bottleneck(self):
        self.adapter = A.make_bottleneck(self.base, self.name, **self.opts)
        self.config = self.adapter.config  # AdapterHub's file: no inference_mode field
        self.init = dict(self.adapter.tensors)

    def make_full(self):
        self.init = {name: t for name, t, _ in self.base.entries}

    def prefix_embeddings(self, p):
        """The prefix projection's output [P, L*2*D] (PEFT PrefixEncoder.forward)."""
        e = p["prompt_encoder.embedding.weight"]
        h = torch.tanh(e @ p["prompt_encoder.transform.0.weight"].T
                       + p["prompt_encoder.transform.0.bias"])
        return h @ p["prompt_encoder.transform.2.weight"].T + p["prompt_encoder.transform.2.bias"]

    def effects(self, p):
        """(Effects, weights or None) of the trainable params p {name: float64 tensor}."""
        kind, a = self.kind, self.adapter
        if kind == "FULL":
            return A.Effects(), p
        if kind == "PREFIX_TUNING" and "prompt_embeddings" not in p:
            p = {"prompt_embeddings": self.prefix_embeddings(p)}
        probe = A.Adapter(a.name, a.kind, a.config, p)
        return A.EFFECTS[a.kind](self.base, probe, 1.0), None

    # ..................................................................... loss, grads
    def loss(self, p, batch=None):
        batch = batch or self.batch
        fx, w = self.effects(p)
        total = 0.0
        for toks, tg in zip(batch["tokens"], batch["targets"]):
            logits = self.base.forward(fx, toks, w=w)
            assert logits.shape == (len(toks), self.base.vocab)
            rows = [i for i, t in enumerate(tg) if t >= 0]
            if rows:
                lp = torch.log_softmax(logits[rows], dim=-1)
                picked = lp[torch.arange(len(rows)), torch.tensor([tg[i] for i in rows])]
                total = total - picked.sum()
        return total

    def grads(self, p, batch=None):
        """(loss_sum, {name: d(loss_sum / N)/d param})."""
        batch = batch or self.batch
        leaves = {n: t.detach().clone().requires_grad_(True) for n, t in p.items()}
        loss = self.loss(leaves, batch)
        gs = torch.autograd.grad(loss / n_targets(batch), [leaves[n] for n in self.names],
                                 allow_unused=True)
        return loss.item(), {n: (torch.zeros_like(p[n]) if g is None else g.detach())
                             for n, g in zip(self.names, gs)}

# ------------------------------------------------------------------- self-checks


def rel_err(a, b):
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-300)
    return (a - b).abs().max().item() / scale


def fd_check(case, p, g):
    """Two elements per parameter: autograd against 5-point central differences."""
    N = n_targets(case.batch)
    gen = torch.Generator().manual_seed(zlib.crc32(case.name.encode()) + 7)
    frozen = None
    if case.kind == "LORA" and case.config["use_dora"]:
        _DORA["capture"] = {}
        with torch.no_grad():
            case.loss(p)
        frozen, _DORA["capture"] = _DORA["capture"], None
    worst = 0.0
    _DORA["frozen"] = frozen
    try:
        with torch.no_grad():
            for name in case.names:
                gf = g[name].flatten()
                big = gf.abs().max().item()
                assert big > 0, f"{case.name}: {name} has a zero gradient"
                cand = torch.nonzero(gf.abs() >= 0.1 * big).flatten()
                picks = {int(gf.abs().argmax())}
                picks.add(int(cand[torch.randint(len(cand), (1,), generator=gen)]))
                for i in picks:
                    def f(h):
                        q = dict(p)
                        t = p[name].clone()
                        t.view(-1)[i] += h
                        q[name] = t
                        return case.loss(q).item() / N
                    h = FD_STEP
                    fd = (-f(2 * h) + 8 * f(h) - 8 * f(-h) + f(-2 * h)) / (12 * h)
                    err = abs(fd - gf[i].item()) / abs(gf[i].item())
                    assert err < FD_TOL, f"{case.name}: {name}[{i}] fd {fd!r} vs {gf[i].item()!r}"
                    worst = max(worst, err)
    finally:
        _DORA["frozen"] = None
    return worst


def grads_of(fn, p, names):
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in p.items()}
    loss = fn(leaves)
    gs = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
    return loss.item(), {n: torch.zeros_like(p[n]) if x is None else x for n, x in zip(names, gs)}


def merged_loss(case, leaves):
    """LoRA / DoRA / IA3 folded into the weights (DoRA's norm detached), then a plain forward."""
    base = case.base
    fx, _ = case.effects(leaves)
    w = dict(base.w, **fx.overrides)
    for module in base.modules:
        W = base.weight_out_in(w, module)
        b = w.get(module + ".bias")
        if module in fx.ia3_in:
            W = W * fx.ia3_in[module].unsqueeze(0)
        if module in fx.dora:
            a, B, s, m = fx.dora[module]
            V = W + s * (B @ a)
            W = (m / V.norm(dim=1).detach()).unsqueeze(1) * V
        for a, B, s in fx.lora.get(module, ()):
            W = W + s * (B @ a)
        if module in fx.ia3_out:
            W = W * fx.ia3_out[module].unsqueeze(1)
            b = None if b is None else b * fx.ia3_out[module]
        w[module + ".weight"] = W.T if base.is_conv1d(module) else W
        if b is not None:
            w[module + ".bias"] = b
    plain = A.Effects()
    total = 0.0
    for toks, tg in zip(case.batch["tokens"], case.batch["targets"]):
        logits = base.forward(plain, toks, w=w)
        total = total + ce_sum(logits, tg)
    return total / n_targets(case.batch)


def ce_sum(logits, targets):
    """Second formulation of the loss: torch's cross_entropy, sum, ignore_index -1."""
    return torch.nn.functional.cross_entropy(
        logits, torch.tensor(targets), ignore_index=-1, reduction="sum")


def parity_loss(case, leaves):
    """tests/parity/reference.py's own forward (FULL; GPT-2 BitFit through its biases)."""
    base = case.base
    c = base.c
    fwd = parity.llama_forward if base.family == "llama" else parity.gpt2_forward
    if case.kind == "FULL":
        w = leaves
    else:
        fx, _ = case.effects(leaves)
        w = dict(base.w, **fx.overrides)
    total = 0.0
    for toks, tg in zip(case.batch["tokens"], case.batch["targets"]):
        total = total + ce_sum(fwd(c, w, toks), tg)
    return total / n_targets(case.batch)


def second_checks(case, p, loss0, g):
    """Loss (and where possible gradients) by a second route; returns {check: worst err}."""
    out, N, base = {}, n_targets(case.batch), case.base
    # 1. the loss through cross_entropy on the same logits
    fx, w = case.effects(p)
    with torch.no_grad():
        ce = sum(ce_sum(base.forward(fx, t, w=w), tg).item()
                 for t, tg in zip(case.batch["tokens"], case.batch["targets"]))
    out["loss_cross_entropy"] = abs(ce - loss0) / abs(loss0)
    assert out["loss_cross_entropy"] < SAME_TOL
    route = None
    if case.kind in ("LORA", "IA3"):
        route = ("merged", lambda q: merged_loss(case, q))
    elif case.kind == "FULL" or (case.kind == "BITFIT" and base.family == "gpt2"):
        route = ("parity_forward", lambda q: parity_loss(case, q))
    if route:
        l2, g2 = grads_of(route[1], p, case.names)
        out[f"loss_{route[0]}"] = abs(l2 * N - loss0) / abs(loss0)
        out[f"grads_{route[0]}"] = max(rel_err(g[n], g2[n]) for n in case.names)
        assert out[f"loss_{route[0]}"] < SAME_TOL and out[f"grads_{route[0]}"] < SAME_TOL, out
    if case.kind == "LORA" and case.config["use_dora"]:
        # the detach matters: PEFT's gradients differ from the undetached ones
        orig = A.project
        A.project = _orig_project
        try:
            _, g3 = case.grads(p)
        finally:
            A.project = orig
        out["dora_detach_effect"] = max(rel_err(g[n], g3[n]) for n in case.names
                                        if n.endswith((".lora_A.weight", ".lora_B.weight")))
        assert out["dora_detach_effect"] > 1e-3
    if case.kind == "PREFIX_TUNING":
        if "prompt_embeddings" in p:
            A.check_prefix_layout(base, case.adapter, case.batch["tokens"] * 2)
        else:  # the saved MLP output used as a plain prefix: same loss; chain rule grads
            plain = A.Adapter(case.name, "prefix", dict(case.adapter.config),
                              {"prompt_embeddings": case.saved})
            sub = PlainPrefix(case, plain)
            with torch.no_grad():
                l_saved = sub.loss({"prompt_embeddings": f64leaf(case.saved)}).item()
            # the saved values are float32-rounded: that loss agrees to float32 precision
            out["loss_saved_prefix"] = abs(l_saved - loss0) / abs(loss0)
            leaves = {n: t.detach().clone().requires_grad_(True) for n, t in p.items()}
            pe = case.prefix_embeddings(leaves)
            assert (pe.detach().to(torch.float32) == case.saved).all()
            l2, gpe = sub.grads({"prompt_embeddings": pe.detach()})  # at the exact output
            out["loss_prefix_of_mlp"] = abs(l2 - loss0) / abs(loss0)
            gs = torch.autograd.grad(pe, [leaves[n] for n in case.names],
                                     grad_outputs=gpe["prompt_embeddings"])
            out["grads_chain_rule"] = max(rel_err(g[n], x) for n, x in zip(case.names, gs))
            assert out["loss_saved_prefix"] < 1e-5, out
            assert out["loss_prefix_of_mlp"] < SAME_TOL and out["grads_chain_rule"] < SAME_TOL, out
    if case.kind == "PROMPT_TUNING":
        A.check_prompt_layout(base, case.adapter, case.batch["tokens"] * 2)
    if case.kind == "BOTTLENECK":
        seqs = case.batch["tokens"]
        with torch.no_grad():
            base_logits = [base.forward(A.Effects(), s) for s in seqs]
        A.check_bottleneck_residual(base, case.adapter, seqs, base_logits)
    if base.c.get("sliding_window"):  # the window must matter for this batch
        with torch.no_grad():
            saved = base.c.pop("sliding_window")
            try:
                nowin = case.loss(p).item()
            finally:
                base.c["sliding_window"] = saved
        out["window_effect"] = abs(nowin - loss0) / abs(loss0)
        assert out["window_effect"] > 1e-3
    return out


class PlainPrefix:
    """A prefix-tuning case made of a fixed prompt_embeddings (the projection's saved form)."""

    def __init__(self, case, adapter):
        self.base, self.batch, self.adapter = case.base, case.batch, adapter
        self.kind = "PREFIX_TUNING"
        self.names = ["prompt_embeddings"]

    effects = Case.effects
    loss = Case.loss
    grads = Case.grads

# ---------------------------------------------------------------------- training


def schedule(t):
    w, total = ADAMW["warmup_steps"], ADAMW["total_steps"]
    if t < w:
        return t / max(1, w)
    return 0.5 * (1.0 + math.cos(math.pi * (t - w) / max(1, total - w)))


def train(case, p0, max_norm, child=None):
    """5 AdamW steps (the module docstring's rule). child: None, ("F", None) or ("D", masks).
    Returns (params, log)."""
    b1, b2 = ADAMW["betas"]
    eps, wd, lr = ADAMW["eps"], ADAMW["weight_decay"], ADAMW["lr"]
    p = {n: t.clone() for n, t in p0.items()}
    m = {n: torch.zeros_like(t) for n, t in p.items()}
    v = {n: torch.zeros_like(t) for n, t in p.items()}
    log = {"clipped_steps": [], "grad_norms": [], "lrs": [], "losses": [], "clip_margin": 1e9,
           "kept": []}
    for t in range(ADAMW["steps"]):
        loss, g = case.grads(p)
        log["losses"].append(loss)
        total = math.sqrt(sum((g[n] ** 2).sum().item() for n in case.names))
        coef = max_norm / (total + CLIP_EPS)
        log["grad_norms"].append(total)
        log["clip_margin"] = min(log["clip_margin"], abs(coef - 1.0))
        if coef < 1.0:
            g = {n: x * coef for n, x in g.items()}
            log["clipped_steps"].append(t)
        if child is not None:
            mode, masks = child
            kept = 0
            for k, n in enumerate(case.names):
                if not is_maskable(n):
                    continue
                if mode == "F":
                    keep = child_f_keep(CHILD["seed"], t, k, g[n].numel(), CHILD["reserve_p"])
                    keep = keep.view(g[n].shape)
                    g[n] = g[n] * keep.to(torch.float64) / CHILD["reserve_p"]
                else:
                    keep = masks[n]
                    g[n] = g[n] * keep.to(torch.float64)
                kept += int(keep.sum())
            log["kept"].append(kept)
        lr_t = lr * schedule(t)
        log["lrs"].append(lr_t)
        for n in case.names:
            if not is_no_decay(n):
                p[n] = p[n] * (1.0 - lr_t * wd)
            m[n] = b1 * m[n] + (1 - b1) * g[n]
            v[n] = b2 * v[n] + (1 - b2) * g[n] ** 2
            mhat = m[n] / (1 - b1 ** (t + 1))
            vhat = v[n] / (1 - b2 ** (t + 1))
            p[n] = p[n] - lr_t * mhat / (vhat.sqrt() + eps)
    return p, log


def train_torch(case, p0, max_norm, child=None):
    """The same with torch.optim.AdamW, LambdaLR and clip_grad_norm_ (a cross-check); the
    child-tuning masks are applied to the clipped .grad before opt.step()."""
    leaves = {n: p0[n].clone().requires_grad_(True) for n in case.names}
    decay = [leaves[n] for n in case.names if not is_no_decay(n)]
    nodecay = [leaves[n] for n in case.names if is_no_decay(n)]
    groups = [g for g in ({"params": decay, "weight_decay": ADAMW["weight_decay"]},
                          {"params": nodecay, "weight_decay": 0.0}) if g["params"]]
    opt = torch.optim.AdamW(groups, lr=ADAMW["lr"], betas=tuple(ADAMW["betas"]),
                            eps=ADAMW["eps"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    for t in range(ADAMW["steps"]):
        opt.zero_grad()
        loss = case.loss(leaves) / n_targets(case.batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([leaves[n] for n in case.names], max_norm)
        if child is not None:
            mode, masks = child
            for k, n in enumerate(case.names):
                if not is_maskable(n):
                    continue
                grad = leaves[n].grad
                if mode == "F":
                    keep = child_f_keep(CHILD["seed"], t, k, grad.numel(), CHILD["reserve_p"])
                    grad.mul_(keep.view(grad.shape).to(grad.dtype)).div_(CHILD["reserve_p"])
                else:
                    grad.mul_(masks[n].to(grad.dtype))
        opt.step()
        sched.step()
    return {n: t.detach() for n, t in leaves.items()}


def pick_max_norm(case, p0, g0):
    """A max_grad_norm (3 significant digits) that clips step 0, every decision at least
    CLIP_MARGIN from the edge. Returns (max_norm, params after training, log)."""
    total = math.sqrt(sum((g0[n] ** 2).sum().item() for n in case.names))
    for f in (0.8, 0.7, 0.9, 0.6, 0.95, 0.5):
        mn = float(f"{f * total:.3g}")
        p, log = train(case, p0, mn)
        if log["clip_margin"] > CLIP_MARGIN and 0 in log["clipped_steps"]:
            return mn, p, log
    raise AssertionError(f"{case.name}: no max_grad_norm with a clear clipping decision")


def fisher_mask(case, p0, batches, max_norm):
    """Child-tuning D: Fisher over batches (per-tensor clipped g^2, mean), percentile mask."""
    maskable = [n for n in case.names if is_maskable(n)]
    fisher = {n: torch.zeros_like(p0[n]) for n in maskable}
    clipped, margin = [], 1e9
    for bi, batch in enumerate(batches):
        _, g = case.grads(p0, batch)
        for n in maskable:
            norm = g[n].norm().item()
            coef = max_norm / (norm + CLIP_EPS)
            margin = min(margin, abs(coef - 1))
            x = g[n] * coef if coef < 1 else g[n]
            if coef < 1:
                clipped.append([bi, n])
            fisher[n] += x ** 2 / len(batches)
    values = torch.cat([fisher[n].flatten() for n in maskable]).numpy()
    q = (1 - CHILD["reserve_p"]) * 100
    polar = float(np.percentile(values, q))
    srt = np.sort(values)  # numpy's default ("linear"): between the floor and ceil ranks
    rank = q / 100 * (values.size - 1)
    lo = int(math.floor(rank))
    own = srt[lo] + (rank - lo) * (srt[min(lo + 1, values.size - 1)] - srt[lo])
    assert abs(own - polar) <= 1e-15 * polar, (own, polar)
    masks = {n: (fisher[n] >= polar) for n in maskable}
    j = int(np.searchsorted(srt, polar))  # first >= polar
    gaps = [abs(x - polar) / polar for x in (srt[j - 1], srt[j]) if x != polar]
    return masks, {"percentile_q": q, "polar": polar, "fisher_clipped": clipped,
                   "clip_margin": margin, "polar_margin": min(gaps),
                   "n_kept": int(sum(int(mk.sum()) for mk in masks.values())),
                   "n_maskable": int(values.size)}

# ---------------------------------------------------------------------- driver


def sensitivity(case, p0, max_norm, ref, child=None, rel=NOISE_REL):
    """How far 5 AdamW steps move when every non-zero gradient element carries Gaussian noise
    of rel times its tensor's RMS (a float32 trainer's error): max |param diff|."""
    gen = torch.Generator().manual_seed(5)
    orig = case.grads

    def noisy(p, batch=None):
        loss, g = orig(p, batch)
        return loss, {n: x + (x != 0) * rel * x.pow(2).mean().sqrt() * torch.randn(
            x.shape, generator=gen, dtype=torch.float64) for n, x in g.items()}
    case.grads = noisy
    try:
        got, _ = train(case, p0, max_norm, child)
    finally:
        case.grads = orig
    return max((got[n] - ref[n]).abs().max().item() for n in case.names)


_MODEL_FILES = {}  # base name -> its first model directory


def write_model(d, base):
    """config.json + model.safetensors; later cases of a base hard-link the first one's files
    (the same bytes, a few MB less), or write their own where links fail."""
    os.makedirs(d, exist_ok=True)
    first = _MODEL_FILES.get(base.name)
    if first is not None:
        try:
            for f in ("config.json", "model.safetensors"):
                if os.path.exists(os.path.join(d, f)):
                    os.unlink(os.path.join(d, f))
                os.link(os.path.join(first, f), os.path.join(d, f))
            return
        except OSError:
            pass
    parity.write_json(os.path.join(d, "config.json"), base.config)
    parity.write_safetensors(os.path.join(d, "model.safetensors"), base.entries)
    _MODEL_FILES.setdefault(base.name, d)


def run_case(index, name, base_name, kind, opts, outdir, bases):
    t0 = time.time()
    base = bases[base_name]
    case = Case(name, base, kind, opts, index)
    d = os.path.join(outdir, name)
    write_model(os.path.join(d, "model"), base)

    p0 = {n: f64leaf(t) for n, t in case.init.items()}
    if kind == "PREFIX_TUNING" and "prompt_embeddings" not in p0:
        with torch.no_grad():
            case.saved = case.prefix_embeddings(p0).to(torch.float32)
    loss0, g0 = case.grads(p0)
    N = n_targets(case.batch)
    assert math.isfinite(loss0) and N > 0
    checks = {"fd_rel": fd_check(case, p0, g0)}
    checks.update(second_checks(case, p0, loss0, g0))

    sgd1 = {n: p0[n] - SGD_LR * g0[n] for n in case.names}
    child, masks = None, None
    if case.child == "D":
        best = None
        for seed in range(6):  # the Fisher batches whose threshold is clearest of 6 draws
            fb = [make_batch(base.vocab, zlib.crc32(f"{name}/fisher{seed}/{i}".encode()),
                             lens, pr)
                  for i, (lens, pr) in enumerate([((4, 8, 12), (0, 1, 2)),
                                                  ((7, 10, 13), (2, 0, 0))])]
            # one max_grad_norm for the Fisher's per-tensor clipping and the training's
            # global one: between the per-tensor norms, some tensors clipped, some not
            _, gfb = case.grads(p0, fb[0])
            norms = sorted(gfb[n].norm().item() for n in case.names if is_maskable(n))
            j = len(norms) * 3 // 4
            mn = float(f"{math.sqrt(norms[j] * norms[j + 1]):.3g}")
            mk, info = fisher_mask(case, p0, fb, mn)
            if info["clip_margin"] > CLIP_MARGIN and (
                    best is None or info["polar_margin"] > best[3]["polar_margin"]):
                best = (fb, mn, mk, info)
        fb, max_norm, masks, info = best
        assert info["polar_margin"] > 1e-5, info
        assert info["fisher_clipped"] and len(info["fisher_clipped"]) < 2 * len(norms)
        child = dict(CHILD, mode="D", fisher_batches=fb, max_grad_norm=max_norm, **info)
        checks["mask_polar_margin"] = info["polar_margin"]
        adamw5, log = train(case, p0, max_norm)
        assert log["clip_margin"] > CLIP_MARGIN and 0 in log["clipped_steps"]
    else:
        max_norm, adamw5, log = pick_max_norm(case, p0, g0)
        if case.child == "F":
            child = dict(CHILD, mode="F", fisher_batches=[], max_grad_norm=max_norm)
    ref = train_torch(case, p0, max_norm)
    checks["adamw_vs_torch"] = max((adamw5[n] - ref[n]).abs().max().item() for n in case.names)
    assert checks["adamw_vs_torch"] < 1e-12, checks
    moved = max((adamw5[n] - p0[n]).abs().max().item() for n in case.names)
    assert moved > 100 * PARAM_TOL
    checks["adamw_noise_1e-6"] = sensitivity(case, p0, max_norm, adamw5)
    checks["clip_margin"] = log["clip_margin"]
    assert checks["adamw_noise_1e-6"] < PARAM_TOL / 4, checks

    adamw = dict(ADAMW, max_grad_norm=max_norm, clipped_steps=log["clipped_steps"],
                 grad_norms=log["grad_norms"], lrs=log["lrs"], losses=log["losses"],
                 clip_margin=log["clip_margin"])
    out = {"sgd1": sgd1, "adamw5": adamw5}
    if child is not None:
        child5, clog = train(case, p0, max_norm, (case.child, masks))
        assert clog["clip_margin"] > CLIP_MARGIN and clog["clipped_steps"]
        ref = train_torch(case, p0, max_norm, (case.child, masks))
        checks["child_vs_torch"] = max((child5[n] - ref[n]).abs().max().item()
                                       for n in case.names)
        assert checks["child_vs_torch"] < 1e-12, checks
        checks["child_effect"] = max((child5[n] - adamw5[n]).abs().max().item()
                                     for n in case.names)
        assert checks["child_effect"] > 100 * PARAM_TOL, checks  # the mask matters
        checks["child_noise_1e-6"] = sensitivity(case, p0, max_norm, child5,
                                                 (case.child, masks))
        assert checks["child_noise_1e-6"] < PARAM_TOL / 4, checks
        checks["clip_margin"] = min(checks["clip_margin"], clog["clip_margin"])
        child.update(kept=clog["kept"], clipped_steps=clog["clipped_steps"],
                     grad_norms=clog["grad_norms"], lrs=clog["lrs"], losses=clog["losses"],
                     clip_margin=clog["clip_margin"])
        if case.child == "D":
            write_st(os.path.join(d, "mask.safetensors"),
                     {n: mk.to(torch.uint8) for n, mk in masks.items()})
        out["child5"] = child5

    if case.config is not None:
        A.write_config_json(os.path.join(d, "adapter_config.json"), case.config)
    if kind != "FULL":
        write_st(os.path.join(d, "init.safetensors"), case.init)
    if case.saved is not None:
        write_st(os.path.join(d, "saved.safetensors"), {"prompt_embeddings": case.saved})
    write_st(os.path.join(d, "grads.safetensors"), g0)
    for key, params in out.items():
        write_st(os.path.join(d, f"{key}.safetensors"), params)
    for key, params in dict(out, grads=g0).items():  # the files read back
        back = read_st(os.path.join(d, f"{key}.safetensors"))
        assert sorted(back) == case.names
        assert all(torch.equal(back[n], params[n].to(torch.float32)) for n in case.names)
    if masks is not None:
        back = read_st(os.path.join(d, "mask.safetensors"))
        assert all(torch.equal(back[n], masks[n].to(torch.uint8)) for n in masks)

    params = [{"name": n, "shape": list(case.init[n].shape), "no_decay": is_no_decay(n),
               "maskable": is_maskable(n)} for n in case.names]
    desc = {"kind": kind, "base": base_name, "options": opts, "batch": case.batch,
            "loss": loss0, "n_targets": N, "grad_tol": GRAD_TOL, "param_tol": PARAM_TOL,
            "params": params, "no_decay": [n for n in case.names if is_no_decay(n)],
            "maskable": [n for n in case.names if is_maskable(n)],
            "sgd": {"lr": SGD_LR}, "adamw": adamw, "checks": checks}
    if child is not None:
        desc["child"] = child
    with open(os.path.join(d, "case.json"), "w") as f:
        json.dump(desc, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"{name}: {kind} on {base_name}, {len(case.names)} params "
          f"{sum(case.init[n].numel() for n in case.names)} values, loss {loss0:.6f}/{N}, "
          f"clipped {adamw['clipped_steps']}, fd {checks['fd_rel']:.1e}, "
          f"{time.time() - t0:.2f}s", flush=True)
    return checks


LOW_IS_WORSE = {"clip_margin", "mask_polar_margin", "window_effect", "dora_detach_effect",
                "child_effect"}


def main(argv):
    if len(argv) != 2:
        print(f"usage: {argv[0]} OUTDIR", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    check_splitmix()
    bases = {name: Base(name, c) for name, c in BASES.items()}
    t0, worst = time.time(), {}
    for index, (name, base, kind, opts) in enumerate(CASES):
        for key, value in run_case(index, name, base, kind, opts, argv[1], bases).items():
            low = key in LOW_IS_WORSE  # margins and effects: the smallest is the worst
            if key not in worst or (value < worst[key][0] if low else value > worst[key][0]):
                worst[key] = (value, name)
    for key, (value, name) in sorted(worst.items()):
        print(f"{'least' if key in LOW_IS_WORSE else 'worst'} {key}: {value:.3g} ({name})")
    print(f"{len(CASES)} cases in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
