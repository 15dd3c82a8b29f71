#!/usr/bin/python3
"""Independent PyTorch reference for adapterd's adapter tests.

Run with Debian's interpreter (torch and numpy; no transformers, peft, safetensors):

    /usr/bin/python3 tests/adapters/reference.py OUTDIR

For each base model ("llama", "gpt2", "qwen2") this writes OUTDIR/<base>/:

  config.json, model.safetensors   the tiny random base (F32), built by
                                   tests/parity/reference.py's llama_build/gpt2_build.
  adapters/<name>/                 one adapter per directory, in the file layout the
                                   real library writes (see "Adapter files" below).
  ref.json                         {"prompts": [[ids] x 4, lengths 1, 6, 11, 17],
                                    "n_steps": 8,
                                    "decode": [[8 ids] per sequence],
                                    "n_vocab": V,
                                    "runs": [{"name": run, "adapters": [{"name": a,
                                              "weight": w}, ...],
                                              "lora_dtype": "auto" | "int8",
                                              "prefill": "runs/<run>.prefill.f32",
                                              "decode": "runs/<run>.decode.f32"}, ...]}
  runs/<run>.prefill.f32           little-endian float32 logits of every real prompt
                                   token, sequences concatenated: [sum(len), V].
  runs/<run>.decode.f32            [n_steps, n_seqs, V]: step t holds the logits after
                                   feeding decode[s][t] to sequence s whose cache holds
                                   prompt_s + decode[s][:t].  The decode ids are fixed
                                   random ids (teacher forcing), the same for every run.

Prompt and prefix tuning add virtual tokens in front of the sequence; they are not part
of the output: only the real tokens' logits are written.  Real tokens sit at positions
P, P+1, ... (P = num_virtual_tokens), as in PEFT.

Since the model is causal and the decode ids are fixed, the logits of prompt + decode ids
come from ONE full-sequence forward per sequence: rows [0, len) are the prefill, row
len + t is decode step t.

Adapter files
-------------
PEFT methods (LORA incl. DoRA, IA3, PREFIX_TUNING, PROMPT_TUNING):
  adapter_config.json        the config dataclass of PEFT 0.20 as PeftModel.save_pretrained
                             writes it: every field, json.dumps(indent=2, sort_keys=True),
                             no trailing newline, "inference_mode": true, "peft_version":
                             "0.20.0", "task_type": "CAUSAL_LM", "base_model_name_or_path":
                             the base's directory name ("llama" or "gpt2").
  adapter_model.safetensors  metadata {"format": "pt"}; keys as PEFT saves them, adapter
                             name removed:
                               base_model.model.<module>.lora_A.weight      [r, in]
                               base_model.model.<module>.lora_B.weight      [out, r]
                               base_model.model.<module>.lora_magnitude_vector [out] (DoRA)
                               base_model.model.<module>.ia3_l  [out, 1] or [1, in] (FF)
                               base_model.model.<module>.base_layer.bias    (bias="all",
                                                                    targeted module)
                               base_model.model.<module>.bias    (bias="all", others)
                               base_model.model.<module>.weight  (modules_to_save)
                               prompt_embeddings   prefix: [P, L*2*token_dim]
                                                   prompt: [P, hidden]
                             <module> is the path inside LlamaForCausalLM
                             (model.layers.L.self_attn.q_proj, lm_head) or GPT2LMHeadModel
                             (transformer.h.L.attn.c_attn).
BitFit (adapterd's own bias-set format; PEFT has no BitFit type):
  adapter_config.json        {"base_model_name_or_path": ..., "inference_mode": true,
                              "peft_type": "BITFIT", "task_type": "CAUSAL_LM"}
  adapter_model.safetensors  metadata {"format": "pt"}; one key per biased module,
                             base_model.model.<module>.bias = the module's REPLACEMENT bias
                             (not a delta).  A module without a base bias (every Llama
                             projection here) simply gets this bias added.  LayerNorm biases
                             (GPT-2 ln_1/ln_2/ln_f) are modules too: "...ln_2.bias".
Bottleneck adapters (AdapterHub `adapters` 1.2.0, save_adapter(use_safetensors=True)):
  adapter_config.json        {"config": <full BnConfig>, "hidden_size", "model_class",
                              "model_name", "model_type", "name", "version":
                              "adapters.1.2.0"}, json.dump(indent=2, sort_keys=True)
  adapter.safetensors        no metadata (adapters calls save_file without it); the adapter
                             name stays in the keys:
                               <layer>.attention_adapters.adapters.<name>.adapter_down.0.weight
                               (only with mh_adapter) and
                               <layer>.output_adapters.adapters.<name>.adapter_down.0.weight
                               [d_b, H], ...adapter_down.0.bias [d_b],
                               ...adapter_up.weight [H, d_b], ...adapter_up.bias [H],
                             <layer> = model.layers.L (Llama) or transformer.h.L (GPT-2).
Every safetensors file is written like the safetensors library does: tensors sorted by
name, "__metadata__" first in the header, header padded with spaces to 8 bytes.

Forward maths (shared/PEFT-FORMATS.md sections 2-7)
---------------------------------------------------
  LoRA   y = base(x) + s * B(A x), s = alpha/r (alpha/sqrt(r) with use_rslora), r from
         the A shape, alpha from alpha_pattern (first key k in dict order with
         re.match(r"(.*\\.)?(k)$", module)) else lora_alpha.  GPT-2 Conv1D: same A and B,
         delta added to the fused c_attn output before the q/k/v split.
  DoRA   y = (m / ||W + s*BA||_row) * (W x + s * B(A x)) + b  (bias not scaled); for
         Conv1D W is taken as [out, in] (the transpose of the stored weight).
  IA3    non-feed-forward: y = base(x) * l (bias included); feed-forward: y = base(x * l).
  prefix prompt_embeddings.view(P, 2L, heads, head_dim): block 2l = layer l keys, 2l+1 =
         values; put in front of the layer's K/V, keys NOT rotated, visible to every real
         token; real tokens at positions P.. (Llama RoPE, GPT-2 wpe[P+i]).
  prompt the [P, H] embeddings are prepended to the token embeddings: ordinary causal
         sequence positions 0..P-1 (Llama RoPE, GPT-2 wpe), real tokens at P..
  bottleneck (pre-LN blocks, residual_before_ln true): out = x + h + f(z), f(z) =
         up(act(down(z))), h the sub-layer output, x the residual input, z = x + h with
         original_ln_before (Pfeiffer/seq_bn), else z = h (Houlsby/double_seq_bn).
  bitfit / bias="all" / modules_to_save: the saved tensors replace the base tensors.

Runs and composition: every base has a run "base" (no adapter), one run per adapter
(named like it, weight 1.0), composition runs, and "<adapter>@int8" runs of some LoRA
adapters with adapterd's lora_dtype = int8 (factors held as 8-bit rows, int8_rows).  A composition of LoRA adapters with
weights w_i is defined as
        y = base(x) + sum_i w_i * s_i * B_i (A_i x)
on every module any of them targets.  Weights other than 1.0 are only defined (and only
accepted here) for plain LoRA adapters without replacement tensors.

Everything is deterministic: base, prompts, decode ids and every adapter tensor come from
fixed seeds.  Adapter tensors are random and non-zero (LoRA B too), stored as float32;
all maths is float64 on the stored float32 values.  Before writing a run the script checks
its own maths (an AssertionError means the reference itself is wrong):
  * LoRA, DoRA, IA3, mixes: the merged weights (W + s*BA; DoRA's m/||.|| * (W + s*BA);
    IA3 row/column scaling) give the same logits as the unmerged forward;
  * prefix: a prefix built from the base's own K/V cache of 3 real tokens (PEFT's
    cartridge packing) reproduces the base logits of the tokens after them;
  * prompt: virtual embeddings equal to real token embeddings reproduce the base logits;
  * bottleneck: zeroing adapter_up reproduces the base logits (residual wiring);
  * every adapter run moves the logits measurably away from the base run.
"""
import functools
import importlib.util
import json
import math
import os
import re
import sys
import zlib

import torch


def _load_parity_reference():
    """tests/parity/reference.py: base builders, safetensors writer, maths helpers."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "parity", "reference.py")
    spec = importlib.util.spec_from_file_location("parity_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


parity = _load_parity_reference()

PROMPT_LENS = (1, 6, 11, 17)
N_STEPS = 8
PEFT_VERSION = "0.20.0"
ADAPTERS_VERSION = "adapters.1.2.0"
PEFT_PREFIX = "base_model.model."
CHECK_TOL = 1e-9        # float64 agreement of two formulations of the same maths
INT8_MIN_OFF = 1e-3     # an int8 run's least distance from its file's run: 10x test-adapters' 1e-4
MIN_MEAN_EFFECT = 0.02  # mean |logit - base logit| an adapter run must reach

# --------------------------------------------------------------------------- bases
# Argument dicts of tests/parity/reference.py's llama_build / gpt2_build.

BASES = {
    "llama": dict(
        family="llama", arch="LlamaForCausalLM", model_type="llama", dtype="F32", seed=21,
        hidden=48, n_head=6, n_kv=2, inter=80, vocab=263, n_layer=2, tied=False,
        eps=1e-5, theta=10000.0, max_pos=128),
    "gpt2": dict(
        family="gpt2", dtype="F32", seed=22, prefix="transformer.", std=0.3,
        n_embd=48, n_head=4, n_layer=2, vocab=211, n_pos=64, n_inner=None),
    # Qwen2: Llama with a bias on q, k and v (never on o_proj): DoRA and bias="all" on biased
    # modules.
    "qwen2": dict(
        family="llama", arch="Qwen2ForCausalLM", model_type="qwen2", dtype="F32", seed=23,
        hidden=48, n_head=6, n_kv=2, inter=80, vocab=263, n_layer=2, tied=False,
        eps=1e-6, theta=1000000.0, max_pos=128, qkv_bias=True),
}


class Base:
    """A base model: HF config, stored tensors (float32) and float64 weights."""

    def __init__(self, name, c):
        self.name, self.c, self.family = name, c, c["family"]
        build = parity.llama_build if self.family == "llama" else parity.gpt2_build
        self.config, wb = build(c)
        self.entries, self.w = wb.entries, wb.w
        self.n_layer = c["n_layer"]
        if self.family == "llama":
            self.hidden, self.vocab = c["hidden"], c["vocab"]
            self.n_head, self.n_kv = c["n_head"], c["n_kv"]
            self.head_dim = parity.llama_head_dim(c)
            self.layer_prefix = "model.layers.{}"
            per_layer = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                         "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
            tail = ["lm_head"]
        else:
            self.hidden, self.vocab = c["n_embd"], c["vocab"]
            self.n_head = self.n_kv = c["n_head"]
            self.head_dim = c["n_embd"] // c["n_head"]
            self.layer_prefix = "transformer.h.{}"
            per_layer = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
            tail = []  # lm_head is tied to wte: not a target here
        # Linear / Conv1D modules in named_modules() order: the candidates for targeting.
        self.modules = [f"{self.layer_prefix.format(i)}.{m}"
                        for i in range(self.n_layer) for m in per_layer] + tail

    def is_conv1d(self, module):
        return self.family == "gpt2"  # every GPT-2 projection is an HF Conv1D

    def weight_out_in(self, w, module):
        """The module's weight as [out, in] (Conv1D stores [in, out])."""
        W = w[module + ".weight"]
        return W.T if self.is_conv1d(module) else W

    def in_out(self, module):
        out_f, in_f = self.weight_out_in(self.w, module).shape
        return in_f, out_f

    def layer(self, i):
        return self.layer_prefix.format(i)

    def forward(self, fx, tokens, w=None, capture=None):
        """float64 logits [len(tokens), V] of the real tokens under Effects fx."""
        w = dict(self.w if w is None else w, **fx.overrides)
        fwd = llama_forward if self.family == "llama" else gpt2_forward
        return fwd(self, w, fx, tokens, capture)

# ------------------------------------------------------------------ adapter effects


class Effects:
    """What the active adapters of one run change in the forward pass."""

    def __init__(self):
        self.overrides = {}   # checkpoint tensor name -> replacement (bias, lm_head, ...)
        self.lora = {}        # module -> [(A [r,in], B [out,r], scale)]
        self.dora = {}        # module -> (A, B, scale, magnitude [out])
        self.ia3_out = {}     # module -> [out] factor on the output (bias included)
        self.ia3_in = {}      # module -> [in] factor on the input
        self.prefix = None    # per layer (K, V), each [heads, P, head_dim]
        self.prompt = None    # [P, hidden] virtual token embeddings
        self.bottleneck = {}  # (layer, "attn" | "out") -> Bottleneck

    def add(self, other):
        """Combines two adapters' effects (LoRA deltas add up; nothing else may clash)."""
        for name in ("overrides", "dora", "ia3_out", "ia3_in", "bottleneck"):
            mine, theirs = getattr(self, name), getattr(other, name)
            assert not set(mine) & set(theirs), f"two adapters both set {name}"
            mine.update(theirs)
        for module, deltas in other.lora.items():
            self.lora.setdefault(module, []).extend(deltas)
        for name in ("prefix", "prompt"):
            assert getattr(self, name) is None or getattr(other, name) is None
            if getattr(other, name) is not None:
                setattr(self, name, getattr(other, name))
        touched = [set(self.lora) | set(self.dora), set(self.ia3_out) | set(self.ia3_in)]
        assert not touched[0] & touched[1], "LoRA and IA3 on the same module"
        assert not set(self.lora) & set(self.dora), "LoRA and DoRA on the same module"
        return self

    def mergeable(self):
        return self.prefix is None and self.prompt is None and not self.bottleneck


class Bottleneck:
    """AdapterHub bottleneck at one place of a pre-LN block: out = x + h + f(z)."""

    ACTIVATIONS = {"relu": torch.relu, "swish": torch.nn.functional.silu}

    def __init__(self, down_w, down_b, up_w, up_b, non_linearity, original_ln_before):
        self.down_w, self.down_b, self.up_w, self.up_b = down_w, down_b, up_w, up_b
        self.act = self.ACTIVATIONS[non_linearity]
        self.original_ln_before = original_ln_before

    def __call__(self, x, h):
        z = x + h if self.original_ln_before else h
        f = self.act(z @ self.down_w.T + self.down_b) @ self.up_w.T + self.up_b
        return x + h + f

# --------------------------------------------------------------------- forward


def project(base, fx, w, module, x):
    """A Linear/Conv1D module with its adapters: IA3, LoRA, DoRA."""
    W = base.weight_out_in(w, module)
    b = w.get(module + ".bias")
    if module in fx.ia3_in:
        x = x * fx.ia3_in[module]
    y = x @ W.T
    if module in fx.dora:
        A, B, s, m = fx.dora[module]
        norm = (W + s * (B @ A)).norm(dim=1)
        y = (m / norm) * (y + s * ((x @ A.T) @ B.T))
    for A, B, s in fx.lora.get(module, ()):
        y = y + s * ((x @ A.T) @ B.T)
    if b is not None:
        y = y + b
    if module in fx.ia3_out:
        y = y * fx.ia3_out[module]
    return y


def residual(fx, layer, place, x, h):
    """Adds a sub-layer output h to the residual stream x (through a bottleneck if any)."""
    bn = fx.bottleneck.get((layer, place))
    return x + h if bn is None else bn(x, h)


def attention_mask(T, n_prefix):
    """[T, n_prefix + T], True = masked: prefix columns always visible, rest causal."""
    i = torch.arange(T).unsqueeze(1)
    j = torch.arange(n_prefix + T).unsqueeze(0)
    return (j - n_prefix) > i


def embed_with_virtual_tokens(fx, x):
    """Prepends prompt-tuning embeddings; returns (rows, n_virtual, n_prefix)."""
    n_virtual = 0
    if fx.prompt is not None:
        n_virtual = fx.prompt.shape[0]
        x = torch.cat([fx.prompt, x])
    n_prefix = 0 if fx.prefix is None else fx.prefix[0][0].shape[1]
    return x, n_virtual, n_prefix


def with_prefix(fx, i, k, v):
    if fx.prefix is None:
        return k, v
    pk, pv = fx.prefix[i]
    return torch.cat([pk, k], dim=1), torch.cat([pv, v], dim=1)


def llama_forward(base, w, fx, tokens, capture):
    c, nh, nkv, hd = base.c, base.n_head, base.n_kv, base.head_dim
    x, n_virtual, n_prefix = embed_with_virtual_tokens(
        fx, w["model.embed_tokens.weight"][torch.tensor(tokens)])
    T = x.shape[0]
    positions = torch.arange(n_prefix, n_prefix + T, dtype=torch.float64)
    angles = positions.unsqueeze(1) * parity.llama_inv_freq(c)
    cos, sin = angles.cos(), angles.sin()
    mask = attention_mask(T, n_prefix)
    for i in range(base.n_layer):
        p = base.layer(i) + "."
        y = parity.rms_norm(x, w[p + "input_layernorm.weight"], c["eps"])
        q, k, v = (project(base, fx, w, p + f"self_attn.{proj}_proj", y)
                   .view(T, heads, hd).transpose(0, 1)
                   for proj, heads in (("q", nh), ("k", nkv), ("v", nkv)))
        q, k = parity.apply_rope(q, cos, sin), parity.apply_rope(k, cos, sin)
        if capture is not None:
            capture.append((k, v))
        k, v = with_prefix(fx, i, k, v)  # prefix keys are used as stored: no RoPE
        group = nh // nkv                # query head h reads kv head h // group
        a = parity.attention(q, k.repeat_interleave(group, 0), v.repeat_interleave(group, 0), mask)
        h = project(base, fx, w, p + "self_attn.o_proj", a.transpose(0, 1).reshape(T, nh * hd))
        x = residual(fx, i, "attn", x, h)
        y = parity.rms_norm(x, w[p + "post_attention_layernorm.weight"], c["eps"])
        act = (torch.nn.functional.silu(project(base, fx, w, p + "mlp.gate_proj", y))
               * project(base, fx, w, p + "mlp.up_proj", y))
        x = residual(fx, i, "out", x, project(base, fx, w, p + "mlp.down_proj", act))
    x = parity.rms_norm(x, w["model.norm.weight"], c["eps"])
    return (x @ w["lm_head.weight"].T)[n_virtual:]


def gpt2_forward(base, w, fx, tokens, capture):
    C, nh, hd, pre = base.hidden, base.n_head, base.head_dim, "transformer."
    x, n_virtual, n_prefix = embed_with_virtual_tokens(
        fx, w[pre + "wte.weight"][torch.tensor(tokens)])
    T = x.shape[0]
    x = x + w[pre + "wpe.weight"][n_prefix:n_prefix + T]
    mask = attention_mask(T, n_prefix)
    for i in range(base.n_layer):
        p = base.layer(i) + "."
        y = parity.layer_norm(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"])
        qkv = project(base, fx, w, p + "attn.c_attn", y)
        q, k, v = (t.view(T, nh, hd).transpose(0, 1) for t in qkv.split(C, dim=-1))
        if capture is not None:
            capture.append((k, v))
        k, v = with_prefix(fx, i, k, v)
        a = parity.attention(q, k, v, mask).transpose(0, 1).reshape(T, C)
        x = residual(fx, i, "attn", x, project(base, fx, w, p + "attn.c_proj", a))
        y = parity.layer_norm(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"])
        m = parity.gelu_new(project(base, fx, w, p + "mlp.c_fc", y))
        x = residual(fx, i, "out", x, project(base, fx, w, p + "mlp.c_proj", m))
    x = parity.layer_norm(x, w[pre + "ln_f.weight"], w[pre + "ln_f.bias"])
    return (x @ w[pre + "wte.weight"].T)[n_virtual:]

# ------------------------------------------------------------- file writing


def write_safetensors(path, tensors, metadata=None, dtype="F32"):
    """tensors: {name: float32 tensor}, stored as dtype (F32, BF16 or F16). Sorted by name,
    __metadata__ first, as the safetensors library writes them."""
    header, blobs, off = {}, [], 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name in sorted(tensors):
        b = parity.tensor_bytes(tensors[name], dtype)
        header[name] = {"dtype": dtype, "shape": list(tensors[name].shape),
                        "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * (-len(hjson) % 8)
    with open(path, "wb") as f:
        f.write(len(hjson).to_bytes(8, "little"))
        f.write(hjson)
        for b in blobs:
            f.write(b)


def write_config_json(path, obj):
    """As PEFT and adapters write it: indent 2, sorted keys, no trailing newline."""
    with open(path, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True))

# ----------------------------------------------------------------- adapters


class Adapter:
    """One adapter as written to disk: config dict, tensors {key: float32}, layout."""

    def __init__(self, name, kind, config, tensors, dtype="F32"):
        self.name, self.kind, self.config, self.tensors = name, kind, config, tensors
        self.dtype = dtype
        half = {"BF16": torch.bfloat16, "F16": torch.float16}.get(dtype)
        if half:  # the values the file holds are what the reference computes with
            self.tensors = {k: v.to(half).to(torch.float32) for k, v in tensors.items()}

    def write(self, d):
        os.makedirs(d, exist_ok=True)
        write_config_json(os.path.join(d, "adapter_config.json"), self.config)
        if self.kind == "bottleneck":
            write_safetensors(os.path.join(d, "adapter.safetensors"), self.tensors)
        else:
            write_safetensors(os.path.join(d, "adapter_model.safetensors"), self.tensors,
                              {"format": "pt"}, self.dtype)


class Rng:
    """Seeded float32 random tensors; the seed is derived from the adapter's name."""

    def __init__(self, key):
        self.gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))

    def normal(self, shape, std, mean=0.0):
        return (mean + std * torch.randn(*shape, generator=self.gen)).to(torch.float32)

    def uniform(self, shape, lo, hi):
        return (lo + (hi - lo) * torch.rand(*shape, generator=self.gen)).to(torch.float32)


def f64(t):
    return t.to(torch.float64)


def f32(t):
    return t.to(torch.float32)


def peft_key(module, leaf):
    return f"{PEFT_PREFIX}{module}.{leaf}"


def peft_common(base, peft_type):
    return {"auto_mapping": None, "base_model_name_or_path": base.name, "inference_mode": True,
            "peft_type": peft_type, "peft_version": PEFT_VERSION, "revision": None,
            "task_type": "CAUSAL_LM"}


def peft_config(base, peft_type, defaults, fields):
    config = dict(peft_common(base, peft_type), **defaults)
    unknown = set(fields) - set(config)
    assert not unknown, f"not a {peft_type} config field: {unknown}"
    config.update(fields)
    return config

# ...................................................................... LoRA

LORA_DEFAULTS = {  # LoraConfig fields of PEFT 0.20 and their defaults (PEFT-FORMATS 2.1/2.2)
    "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "bias": "none",
    "corda_config": None, "ensure_weight_tying": False, "eva_config": None,
    "exclude_modules": None, "fan_in_fan_out": False, "init_lora_weights": True,
    "kasa_config": None, "layer_replication": None, "layers_pattern": None,
    "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 8, "lora_bias": False,
    "lora_dropout": 0.0, "lora_ga_config": None, "megatron_config": None,
    "megatron_core": "megatron.core", "modules_to_save": None, "monteclora_config": None,
    "qalora_group_size": 16, "r": 8, "rank_pattern": {}, "target_modules": None,
    "target_parameters": None, "trainable_token_indices": None, "use_bdlora": None,
    "use_dora": False, "use_qalora": False, "use_rslora": False, "velora_config": None,
}


def is_target(config, name):
    """PEFT's check_target_module_exists (PEFT-FORMATS 1.4, rules 1-5)."""
    exclude = config.get("exclude_modules")
    if isinstance(exclude, str) and re.fullmatch(exclude, name):
        return False
    if isinstance(exclude, list) and (name in exclude
                                      or any(name.endswith("." + e) for e in exclude)):
        return False
    for m in config.get("modules_to_save") or ():
        if re.match(rf"(^|.*\.){m}($|\..*)", name):
            return False
    targets = config["target_modules"]
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if not (name in targets or any(name.endswith("." + t) for t in targets)):
        return False
    layers = config.get("layers_to_transform")
    if layers is None:
        return True
    layers = [layers] if isinstance(layers, int) else layers
    patterns = config.get("layers_pattern")
    if patterns is None:
        match = re.match(r".*?\.[^.]*\.(\d+)\.", name)
    else:
        patterns = [patterns] if isinstance(patterns, str) else patterns
        match = next(filter(None, (re.match(rf".*?\.{p}\.(\d+)\.", name) for p in patterns)),
                     None)
    return match is not None and int(match.group(1)) in layers


def pattern_value(pattern, module, default):
    """rank_pattern / alpha_pattern: the first key k (dict order) with
    re.match(r"(.*\\.)?(k)$", module) wins (PEFT-FORMATS 1.4 rule 7)."""
    for k, value in pattern.items():
        if re.match(rf"(.*\.)?({k})$", module):
            return value
    return default


def lora_scale(config, module, r):
    alpha = pattern_value(config["alpha_pattern"], module, config["lora_alpha"])
    return alpha / math.sqrt(r) if config["use_rslora"] else alpha / r


def make_lora(base, name, a_std=0.15, b_std=0.15, bias_std=0.1, mts_std=0.05, dtype="F32",
              **fields):
    config = peft_config(base, "LORA", LORA_DEFAULTS, fields)
    rng, w, tensors = Rng(f"{base.name}/{name}"), base.w, {}
    targets = [m for m in base.modules if is_target(config, m)]
    assert targets, name
    for module in targets:
        in_f, out_f = base.in_out(module)
        r = pattern_value(config["rank_pattern"], module, config["r"])
        A, B = rng.normal((r, in_f), a_std), rng.normal((out_f, r), b_std)
        tensors[peft_key(module, "lora_A.weight")] = A
        tensors[peft_key(module, "lora_B.weight")] = B
        if config["use_dora"]:  # around ||W + s BA|| per output row, times U(0.8, 1.2)
            s = lora_scale(config, module, r)
            norm = (base.weight_out_in(w, module) + s * (f64(B) @ f64(A))).norm(dim=1)
            tensors[peft_key(module, "lora_magnitude_vector")] = f32(
                norm * f64(rng.uniform((out_f,), 0.8, 1.2)))
    if config["bias"] == "all":  # every base bias, as a replacement value
        for tname in (n for n in w if n.endswith(".bias")):
            module = tname[:-len(".bias")]
            leaf = "base_layer.bias" if module in targets else "bias"
            tensors[peft_key(module, leaf)] = f32(w[tname]) + rng.normal(w[tname].shape, bias_std)
    for module in config["modules_to_save"] or ():  # full replacement of the module
        for leaf in ("weight", "bias"):
            if f"{module}.{leaf}" in w:
                t = w[f"{module}.{leaf}"]
                tensors[peft_key(module, leaf)] = f32(t) + rng.normal(t.shape, mts_std)
    return Adapter(name, "lora", config, tensors, dtype)


def int8_rows(t):
    """adapterd's lora_dtype = int8 (include/adapterd/adapter.h) for one factor: every row
    held as 8-bit integers q = round(v / s), ties to even, with s = max |row| / 127 in
    float32; the factor is q * s. A is quantized by rows, B [out, r] by columns (int8_rows of
    B.T): a scale per rank component."""
    t = f32(t)
    s = t.abs().amax(dim=1, keepdim=True) / 127
    q = torch.where(s > 0, torch.round(t / torch.where(s > 0, s, 1)), 0).clamp(-127, 127)
    return q * s


def lora_effects(base, adapter, weight, int8=False):
    """Reads a LoRA file back: deltas per module, replacement tensors; int8: the factors as
    adapterd holds them with lora_dtype = int8."""
    fx, config, tensors = Effects(), adapter.config, adapter.tensors
    suffix = ".lora_A.weight"
    hold = int8_rows if int8 else (lambda t: t)
    for key in (k for k in tensors if k.endswith(suffix)):
        module = key[len(PEFT_PREFIX):-len(suffix)]
        A = f64(hold(tensors[key]))
        B = f64(hold(tensors[peft_key(module, "lora_B.weight")].T).T)
        s = lora_scale(config, module, A.shape[0])  # rank from the tensor shape
        magnitude = tensors.get(peft_key(module, "lora_magnitude_vector"))
        if magnitude is None:
            fx.lora[module] = [(A, B, weight * s)]
        else:
            assert weight == 1.0, "DoRA is only defined with weight 1"
            fx.dora[module] = (A, B, s, f64(magnitude))
    lora_leaves = (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector")
    for key in (k for k in tensors if not k.endswith(lora_leaves)):
        assert weight == 1.0, "replacement tensors are only defined with weight 1"
        fx.overrides[key[len(PEFT_PREFIX):].replace(".base_layer.", ".")] = f64(tensors[key])
    return fx

# ....................................................................... IA3

IA3_DEFAULTS = {"exclude_modules": None, "fan_in_fan_out": False, "feedforward_modules": None,
                "init_ia3_weights": True, "modules_to_save": None, "target_modules": None}


def is_feedforward(config, module):
    """IA3's feed-forward match: regex fullmatch, or a plain endswith (no dot)."""
    ff = config["feedforward_modules"]
    if isinstance(ff, str):
        return re.fullmatch(ff, module) is not None
    return any(module.endswith(t) for t in ff)


def make_ia3(base, name, std=0.3, **fields):
    config = peft_config(base, "IA3", IA3_DEFAULTS, fields)
    rng, tensors = Rng(f"{base.name}/{name}"), {}
    for module in (m for m in base.modules if is_target(config, m)):
        in_f, out_f = base.in_out(module)
        shape = (1, in_f) if is_feedforward(config, module) else (out_f, 1)
        tensors[peft_key(module, "ia3_l")] = rng.normal(shape, std, mean=1.0)
    assert tensors, name
    return Adapter(name, "ia3", config, tensors)


def ia3_effects(base, adapter, weight):
    assert weight == 1.0, "IA3 is only defined with weight 1"
    fx = Effects()
    for key, l in adapter.tensors.items():
        module = key[len(PEFT_PREFIX):-len(".ia3_l")]
        in_f, out_f = base.in_out(module)
        if is_feedforward(adapter.config, module):
            assert l.shape == (1, in_f)
            fx.ia3_in[module] = f64(l).flatten()
        else:
            assert l.shape == (out_f, 1)
            fx.ia3_out[module] = f64(l).flatten()
    return fx

# ..................................................... prefix and prompt tuning


def make_prefix(base, name, num_virtual_tokens, std=1.0):
    # GQA models store the prefix per KV head (PEFT-FORMATS 3.4); GPT-2 has n_kv = n_head.
    token_dim = base.head_dim * base.n_kv
    config = dict(peft_common(base, "PREFIX_TUNING"), encoder_hidden_size=token_dim,
                  init_weights=None, modules_to_save=None, num_attention_heads=base.n_kv,
                  num_layers=base.n_layer, num_transformer_submodules=1,
                  num_virtual_tokens=num_virtual_tokens, prefix_projection=False,
                  token_dim=token_dim)
    rng = Rng(f"{base.name}/{name}")
    pe = rng.normal((num_virtual_tokens, base.n_layer * 2 * token_dim), std)
    return Adapter(name, "prefix", config, {"prompt_embeddings": pe})


def prefix_effects(base, adapter, weight):
    """prompt_embeddings [P, L*2*D] -> per layer (K, V) [heads, P, head_dim] (PEFT get_prompt)."""
    assert weight == 1.0, "prefix tuning is only defined with weight 1"
    c = adapter.config
    P, L = c["num_virtual_tokens"], c["num_layers"]
    heads, D = c["num_attention_heads"], c["token_dim"]
    assert (heads, D // heads, L) == (base.n_kv, base.head_dim, base.n_layer)
    pe = f64(adapter.tensors["prompt_embeddings"])
    assert pe.shape == (P, L * 2 * D)
    kv = pe.view(P, L * 2, heads, D // heads).permute(1, 2, 0, 3)  # [2L, heads, P, hd]
    fx = Effects()
    fx.prefix = [(kv[2 * i], kv[2 * i + 1]) for i in range(L)]
    return fx


def make_prompt(base, name, num_virtual_tokens, std=0.5):
    config = dict(peft_common(base, "PROMPT_TUNING"), modules_to_save=None,
                  num_attention_heads=base.n_head, num_layers=base.n_layer,
                  num_transformer_submodules=1, num_virtual_tokens=num_virtual_tokens,
                  prompt_tuning_init="RANDOM", prompt_tuning_init_text=None,
                  token_dim=base.hidden, tokenizer_kwargs=None, tokenizer_name_or_path=None)
    rng = Rng(f"{base.name}/{name}")
    pe = rng.normal((num_virtual_tokens, base.hidden), std)
    return Adapter(name, "prompt", config, {"prompt_embeddings": pe})


def prompt_effects(base, adapter, weight):
    assert weight == 1.0, "prompt tuning is only defined with weight 1"
    pe = f64(adapter.tensors["prompt_embeddings"])
    assert pe.shape == (adapter.config["num_virtual_tokens"], base.hidden)
    fx = Effects()
    fx.prompt = pe
    return fx

# .................................................................... BitFit


def make_bitfit(base, name, modules, std=0.1):
    """adapterd's bias set: replacement biases keyed base_model.model.<module>.bias."""
    config = {"base_model_name_or_path": base.name, "inference_mode": True,
              "peft_type": "BITFIT", "task_type": "CAUSAL_LM"}
    rng, tensors = Rng(f"{base.name}/{name}"), {}
    for module in modules:
        if module + ".bias" in base.w:
            old = f32(base.w[module + ".bias"])
        else:  # no base bias: the replacement is simply added
            old = torch.zeros(base.in_out(module)[1])
        tensors[peft_key(module, "bias")] = old + rng.normal(old.shape, std)
    return Adapter(name, "bitfit", config, tensors)


def bitfit_effects(base, adapter, weight):
    assert weight == 1.0, "BitFit is only defined with weight 1"
    fx = Effects()
    for key, t in adapter.tensors.items():
        assert key.startswith(PEFT_PREFIX) and key.endswith(".bias")
        fx.overrides[key[len(PEFT_PREFIX):]] = f64(t)
    return fx

# ...................................................... bottleneck adapters

BN_DEFAULTS = {  # BnConfig fields of adapters 1.2.0 (PEFT-FORMATS 7.1)
    "adapter_residual_before_ln": False, "cross_adapter": False, "dropout": 0.0,
    "factorized_phm_W": True, "factorized_phm_rule": False,
    "hypercomplex_nonlinearity": "glorot-uniform", "init_weights": "bert",
    "init_weights_seed": None, "inv_adapter": None, "inv_adapter_reduction_factor": None,
    "is_parallel": False, "learn_phm": True, "leave_out": [], "ln_after": False,
    "ln_before": False, "original_ln_after": True, "original_ln_before": False,
    "phm_bias": True, "phm_c_init": "normal", "phm_dim": 4, "phm_init_range": 0.0001,
    "phm_layer": False, "phm_rank": 1, "residual_before_ln": True, "scaling": 1.0,
    "shared_W_phm": False, "shared_phm_rule": True, "stochastic_depth": 0.0,
    "use_gating": False,
}
BN_PRESETS = {  # the presets' own values
    "seq_bn": dict(mh_adapter=False, output_adapter=True, original_ln_before=True,
                   non_linearity="relu", reduction_factor=16),
    "double_seq_bn": dict(mh_adapter=True, output_adapter=True, original_ln_before=False,
                          non_linearity="swish", reduction_factor=16),
}
BN_PLACES = (("attn", "attention_adapters", "mh_adapter"),
             ("out", "output_adapters", "output_adapter"))


def make_bottleneck(base, name, preset, down_std=0.3, up_std=0.2, bias_std=0.05, **fields):
    bn = {**BN_DEFAULTS, **BN_PRESETS[preset], **fields}
    config = {"config": bn, "hidden_size": base.hidden,
              "model_class": base.config["architectures"][0], "model_name": base.name,
              "model_type": base.config["model_type"], "name": name,
              "version": ADAPTERS_VERSION}
    H = base.hidden
    d_b = int(H // bn["reduction_factor"])
    rng, tensors = Rng(f"{base.name}/{name}"), {}
    for i in range(base.n_layer):
        for _, container, flag in BN_PLACES:
            if not bn[flag]:
                continue
            p = f"{base.layer(i)}.{container}.adapters.{name}."
            tensors[p + "adapter_down.0.weight"] = rng.normal((d_b, H), down_std)
            tensors[p + "adapter_down.0.bias"] = rng.normal((d_b,), bias_std)
            tensors[p + "adapter_up.weight"] = rng.normal((H, d_b), up_std)
            tensors[p + "adapter_up.bias"] = rng.normal((H,), bias_std)
    return Adapter(name, "bottleneck", config, tensors)


def bottleneck_effects(base, adapter, weight):
    assert weight == 1.0, "bottleneck adapters are only defined with weight 1"
    bn, name, t = adapter.config["config"], adapter.config["name"], adapter.tensors
    assert bn["residual_before_ln"] is True and bn["original_ln_after"] is True
    assert not (bn["ln_before"] or bn["ln_after"] or bn["is_parallel"] or bn["use_gating"]
                or bn["phm_layer"]) and bn["scaling"] == 1.0
    fx = Effects()
    for i in range(base.n_layer):
        for place, container, flag in BN_PLACES:
            p = f"{base.layer(i)}.{container}.adapters.{name}."
            if not bn[flag] or i in bn["leave_out"]:
                assert p + "adapter_up.weight" not in t
                continue
            fx.bottleneck[(i, place)] = Bottleneck(
                f64(t[p + "adapter_down.0.weight"]), f64(t[p + "adapter_down.0.bias"]),
                f64(t[p + "adapter_up.weight"]), f64(t[p + "adapter_up.bias"]),
                bn["non_linearity"], bn["original_ln_before"])
    return fx


EFFECTS = {"lora": lora_effects, "ia3": ia3_effects, "prefix": prefix_effects,
           "prompt": prompt_effects, "bitfit": bitfit_effects, "bottleneck": bottleneck_effects}

# ------------------------------------------------------------ adapter tables

LLAMA_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
spec = functools.partial

ADAPTERS = {
    "llama": {
        "lora_list": spec(make_lora, target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8),
        "lora_regex": spec(make_lora, target_modules=r".*\.(k_proj|down_proj)", r=3, lora_alpha=5),
        "lora_rslora_all": spec(make_lora, target_modules=LLAMA_PROJ, r=6, lora_alpha=12,
                             use_rslora=True, a_std=0.1, b_std=0.1),
        "lora_patterns": spec(make_lora, target_modules=LLAMA_PROJ[:4], r=4, lora_alpha=8,
                           rank_pattern={"k_proj": 2},
                           alpha_pattern={"layers.1.self_attn.o_proj": 3}),
        "lora_layers": spec(make_lora, target_modules=["gate_proj", "up_proj"], r=4, lora_alpha=8,
                         layers_to_transform=[1]),
        "dora": spec(make_lora, target_modules=["q_proj", "v_proj", "down_proj"], r=4,
                  lora_alpha=8, use_dora=True),
        # BF16 files: the factors stay BF16 in memory (odd rank, every projection)
        "lora_bf16": spec(make_lora, target_modules=LLAMA_PROJ, r=5, lora_alpha=10,
                          dtype="BF16"),
        "dora_bf16": spec(make_lora, target_modules=["q_proj", "up_proj"], r=4, lora_alpha=8,
                          use_dora=True, dtype="BF16"),
        "lora_f16": spec(make_lora, target_modules=LLAMA_PROJ, r=3, lora_alpha=6, dtype="F16"),
        "ia3": spec(make_ia3, target_modules=["k_proj", "v_proj", "down_proj"],
                 feedforward_modules=["down_proj"]),
        # input scaling on up_proj, whose input gate_proj shares: a BLAS call on the engine
        # thread for up, gate's output scaling in the pool's items
        "ia3_shared_in": spec(make_ia3, target_modules=["q_proj", "gate_proj", "up_proj"],
                              feedforward_modules=["up_proj"]),
        "prefix": spec(make_prefix, num_virtual_tokens=3),
        "prompt": spec(make_prompt, num_virtual_tokens=4),
        "bitfit": spec(make_bitfit, modules=[f"model.layers.{i}.{m}" for i in range(2) for m in
                                          ("self_attn.q_proj", "self_attn.v_proj",
                                           "self_attn.o_proj", "mlp.down_proj")]),
        "mts": spec(make_lora, target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8,
                 modules_to_save=["lm_head"]),
        "houlsby": spec(make_bottleneck, preset="double_seq_bn", reduction_factor=8,
                     non_linearity="swish"),
        "pfeiffer": spec(make_bottleneck, preset="seq_bn", reduction_factor=16,
                      non_linearity="relu"),
    },
    "gpt2": {  # GPT-2's logits are ~5x larger (tied std-0.5 embeddings): smaller stds
        "lora_c_attn": spec(make_lora, target_modules=["c_attn"], fan_in_fan_out=True, r=4,
                            lora_alpha=8, a_std=0.1, b_std=0.1),
        "lora_all": spec(make_lora, target_modules=["c_attn", "c_proj", "c_fc"],
                         fan_in_fan_out=True, r=2, lora_alpha=4, a_std=0.1, b_std=0.1),
        "lora_bias_all": spec(make_lora, target_modules=["c_attn"], fan_in_fan_out=True, r=4,
                              lora_alpha=8, bias="all", a_std=0.1, b_std=0.1, bias_std=0.05),
        "dora": spec(make_lora, target_modules=["c_attn"], fan_in_fan_out=True, r=4,
                     lora_alpha=8, use_dora=True, a_std=0.1, b_std=0.1),
        "ia3": spec(make_ia3, target_modules=["c_attn", "mlp.c_proj"],
                    feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True, std=0.15),
        "prefix": spec(make_prefix, num_virtual_tokens=3),
        "prompt": spec(make_prompt, num_virtual_tokens=5, std=0.3),
        "bitfit": spec(make_bitfit, modules=[f"transformer.h.{i}.{m}" for i in range(2) for m in
                                             ("attn.c_attn", "mlp.c_fc", "ln_2")]
                       + ["transformer.ln_f"]),
        "pfeiffer": spec(make_bottleneck, preset="seq_bn", reduction_factor=12,
                         non_linearity="relu", up_std=0.1),
    },
    "qwen2": {
        "lora_list": spec(make_lora, target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8),
        "lora_all": spec(make_lora, target_modules=LLAMA_PROJ, r=2, lora_alpha=4),
        # DoRA on biased (q, k, v) and bias-free (o) modules: the bias is not scaled.
        "dora": spec(make_lora, target_modules=LLAMA_PROJ[:4], r=4, lora_alpha=8, use_dora=True),
        # bias="all": q and v (targeted) get replacement biases under DoRA, k (not targeted) a
        # plain replacement: the DoRA output adds the replacement, unscaled.
        "dora_bias_all": spec(make_lora, target_modules=["q_proj", "v_proj", "o_proj"], r=4,
                              lora_alpha=8, use_dora=True, bias="all"),
        "lora_bias_all": spec(make_lora, target_modules=["q_proj", "k_proj"], r=4,
                              lora_alpha=8, bias="all"),
        "ia3": spec(make_ia3, target_modules=["k_proj", "v_proj", "down_proj"],
                    feedforward_modules=["down_proj"]),
        "bitfit": spec(make_bitfit, modules=[f"model.layers.{i}.{m}" for i in range(2) for m in
                                             ("self_attn.q_proj", "self_attn.v_proj")]),
    },
}

# Runs with adapterd's lora_dtype = int8 ("<adapter>@int8"): the same files, loaded with 8-bit
# factors; the reference quantizes them the same way (int8_rows: A's rows, B's columns).
INT8_RUNS = {
    "llama": ["lora_rslora_all", "lora_bf16", "lora_f16", "dora", "mts"],
    "gpt2": ["lora_all", "lora_bias_all", "dora"],
    "qwen2": ["lora_all", "dora_bias_all"],
}

COMPOSITIONS = {
    "llama": {"mix_lora": [("lora_list", 0.7), ("lora_rslora_all", -0.4)],
              "mix_bf16": [("lora_bf16", 0.8), ("lora_list", 0.5)]},
    "gpt2": {"mix_lora": [("lora_c_attn", 1.0), ("lora_all", 0.5)]},
    "qwen2": {"mix_lora": [("lora_list", 0.7), ("lora_all", -0.5)]},
}

# --------------------------------------------------------------- self-checks


def merged_weights(base, fx):
    """Folds LoRA, DoRA and IA3 into the weights: the 'merge_and_unload' form."""
    w = dict(base.w, **fx.overrides)
    for module in base.modules:
        W = base.weight_out_in(w, module)  # [out, in]
        b = w.get(module + ".bias")
        if module in fx.ia3_in:
            W = W * fx.ia3_in[module].unsqueeze(0)
        if module in fx.dora:
            A, B, s, m = fx.dora[module]
            V = W + s * (B @ A)
            W = (m / V.norm(dim=1)).unsqueeze(1) * V
        for A, B, s in fx.lora.get(module, ()):
            W = W + s * (B @ A)
        if module in fx.ia3_out:
            W = W * fx.ia3_out[module].unsqueeze(1)
            b = None if b is None else b * fx.ia3_out[module]
        w[module + ".weight"] = W.T if base.is_conv1d(module) else W
        if b is not None:
            w[module + ".bias"] = b
    return w


def assert_close(a, b, what):
    err = (a - b).abs().max().item()
    assert err < CHECK_TOL, f"{what}: max |diff| {err:g}"


def check_merged(base, fx, seqs, logits, what):
    w = merged_weights(base, fx)
    for seq, ref in zip(seqs, logits):
        assert_close(base.forward(Effects(), seq, w=w), ref, f"{what}: merged vs unmerged")


def check_prefix_layout(base, adapter, prompts):
    """A prefix made of the base's own K/V for 3 real tokens (packed like PEFT's
    cartridges: packed[:, 2l] = K_l.transpose(0, 1), packed[:, 2l+1] = V_l) must give
    the base logits of the tokens that follow them."""
    head, tail = prompts[1][:3], prompts[3]
    n = len(head)
    capture = []
    full = base.forward(Effects(), head + tail, capture=capture)
    packed = torch.zeros(n, 2 * base.n_layer, base.n_kv, base.head_dim, dtype=torch.float64)
    for i, (k, v) in enumerate(capture):
        packed[:, 2 * i] = k[:, :n].transpose(0, 1)
        packed[:, 2 * i + 1] = v[:, :n].transpose(0, 1)
    config = dict(adapter.config, num_virtual_tokens=n)
    probe = Adapter("probe", "prefix", config, {"prompt_embeddings": packed.reshape(n, -1)})
    got = base.forward(prefix_effects(base, probe, 1.0), tail)
    assert_close(got, full[n:], f"{base.name}: prefix from the base's own cache")


def check_prompt_layout(base, adapter, prompts):
    """Virtual embeddings equal to real token embeddings must give the base logits."""
    head, tail = prompts[3][:adapter.config["num_virtual_tokens"]], prompts[2]
    table = base.w["model.embed_tokens.weight" if base.family == "llama"
                   else "transformer.wte.weight"]
    probe = Adapter("probe", "prompt", adapter.config,
                    {"prompt_embeddings": table[torch.tensor(head)]})
    got = base.forward(prompt_effects(base, probe, 1.0), tail)
    assert_close(got, base.forward(Effects(), head + tail)[len(head):],
                 f"{base.name}: prompt embeddings = token embeddings")


def check_bottleneck_residual(base, adapter, seqs, base_logits):
    """With adapter_up zeroed the bottleneck adds nothing: base logits."""
    zeroed = {k: torch.zeros_like(t) if ".adapter_up." in k else t
              for k, t in adapter.tensors.items()}
    probe = Adapter(adapter.name, "bottleneck", adapter.config, zeroed)
    fx = bottleneck_effects(base, probe, 1.0)
    for seq, ref in zip(seqs, base_logits):
        assert_close(base.forward(fx, seq), ref, f"{base.name}/{adapter.name}: zero adapter_up")


def self_check(base, members, fx, prompts, seqs, logits, base_logits, what):
    """The checks of the module docstring for one run; members: [(Adapter, weight)]."""
    if not members:
        return
    effect = torch.cat([(a - b).abs().flatten() for a, b in zip(logits, base_logits)])
    assert effect.mean() > MIN_MEAN_EFFECT, f"{what}: changes the logits too little"
    if fx.mergeable():
        check_merged(base, fx, seqs, logits, what)
    if len(members) == 1:
        adapter = members[0][0]
        if adapter.kind == "prefix":
            check_prefix_layout(base, adapter, prompts)
        elif adapter.kind == "prompt":
            check_prompt_layout(base, adapter, prompts)
        elif adapter.kind == "bottleneck":
            check_bottleneck_residual(base, adapter, seqs, base_logits)

# -------------------------------------------------------------------- driver


def run_base(name, outdir):
    base = Base(name, BASES[name])
    d = os.path.join(outdir, name)
    os.makedirs(os.path.join(d, "runs"), exist_ok=True)
    parity.write_json(os.path.join(d, "config.json"), base.config)
    parity.write_safetensors(os.path.join(d, "model.safetensors"), base.entries)

    gen = torch.Generator().manual_seed(1000 + base.c["seed"])
    prompts = [torch.randint(0, base.vocab, (n,), generator=gen).tolist() for n in PROMPT_LENS]
    decode = [torch.randint(0, base.vocab, (N_STEPS,), generator=gen).tolist() for _ in prompts]
    seqs = [p + t for p, t in zip(prompts, decode)]

    adapters = {}
    for aname, make in ADAPTERS[name].items():
        adapters[aname] = make(base, aname)
        adapters[aname].write(os.path.join(d, "adapters", aname))

    runs = [("base", [])] + [(a, [(a, 1.0)]) for a in adapters]
    runs += list(COMPOSITIONS[name].items())
    runs += [(f"{a}@int8", [(a, 1.0)]) for a in INT8_RUNS[name]]
    ref_runs, base_logits = [], None
    for run, members in runs:
        fx, int8 = Effects(), run.endswith("@int8")
        for aname, weight in members:
            a = adapters[aname]
            fx.add(lora_effects(base, a, weight, int8=True) if int8
                   else EFFECTS[a.kind](base, a, weight))
        logits = [base.forward(fx, seq) for seq in seqs]
        for seq, t in zip(seqs, logits):
            assert t.shape == (len(seq), base.vocab) and torch.isfinite(t).all()
        if base_logits is None:
            base_logits = logits
        if int8:  # near the file's own run, but far enough from it for the test to tell them
            (a, wt), = members
            exact = [base.forward(lora_effects(base, adapters[a], wt), seq) for seq in seqs]
            moved = max((e - b).abs().max().item() for e, b in zip(exact, base_logits))
            off = max((g - e).abs().max().item() for g, e in zip(logits, exact))
            assert INT8_MIN_OFF < off < 0.1 * moved, f"{name}/{run}: int8 {off:g}, LoRA {moved:g}"
            print(f"{name}/{run}: {off:.3g} from the file's run, whose LoRA moves {moved:.3g}")
        self_check(base, [(adapters[a], wt) for a, wt in members], fx, prompts, seqs,
                   logits, base_logits, f"{name}/{run}")

        prefill = torch.cat([t[:len(p)] for t, p in zip(logits, prompts)])  # [sum len, V]
        steps = torch.stack([t[len(p):] for t, p in zip(logits, prompts)]).transpose(0, 1)
        files = {"prefill": f"runs/{run}.prefill.f32", "decode": f"runs/{run}.decode.f32"}
        for key, t in (("prefill", prefill), ("decode", steps)):
            path = os.path.join(d, files[key])
            t.contiguous().to(torch.float32).numpy().astype("<f4").tofile(path)
        ref_runs.append({"name": run,
                         "adapters": [{"name": a, "weight": wt} for a, wt in members],
                         "lora_dtype": "int8" if int8 else "auto", **files})
        print(f"{name}/{run} ok", flush=True)

    parity.write_json(os.path.join(d, "ref.json"),
                      {"prompts": prompts, "n_steps": N_STEPS, "decode": decode,
                       "n_vocab": base.vocab, "runs": ref_runs})


def main(argv):
    if len(argv) != 2:
        print(f"usage: {argv[0]} OUTDIR", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    for name in BASES:
        run_base(name, argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
