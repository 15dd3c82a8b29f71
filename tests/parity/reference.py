#!/usr/bin/python3
"""Independent PyTorch reference for the adapterd parity test.

Run with Debian's interpreter (it has torch and numpy):

    /usr/bin/python3 tests/parity/reference.py OUTDIR

For every case below this builds a tiny random Hugging Face-format model and
writes OUTDIR/<case>/ containing:

  config.json               HF config for the architecture.
  model.safetensors         all tensors; or, for the sharded case,
                            model.safetensors.index.json
                            {"metadata": {"total_size": N}, "weight_map": {name: shard}}
                            plus model-0000{1,2}-of-00002.safetensors.
  generation_config.json    only for some cases.
  ref.json                  {"prompts": [[ids]...], "decode": [[ids] per sequence],
                             "n_vocab": V, "n_steps": 16}
  prefill.f32               little-endian float32 logits for EVERY prompt position
                            of every sequence, sequences concatenated in order:
                            shape [sum(len(prompt_i)), V].
  decode.f32                little-endian float32, shape [n_steps, n_seqs, V]:
                            step t holds the logits after feeding decode[s][t] to
                            sequence s whose KV cache holds prompt_s + decode[s][:t],
                            i.e. the logits at position len(prompt_s) + t.
                            decode[s][0] is the argmax of the last prompt logits and
                            decode[s][t+1] the argmax of step t's logits.

safetensors layout (written by hand, no safetensors package): u64 little-endian
header length N, N bytes of JSON {name: {"dtype": "F32"|"F16"|"BF16", "shape": [..],
"data_offsets": [begin, end]}, "__metadata__": {"format": "pt"}} padded with spaces
to a multiple of 8, then the raw little-endian tensor bytes (offsets are relative
to the start of that data section).

Weights are rounded to the stored dtype first and the reference maths is done in
float64 on the rounded values.  The maths follows Hugging Face transformers but
is written here from scratch (transformers is not imported).
"""
import json
import math
import os
import struct
import sys

import torch

N_STEPS = 16
# 110, 112: prefill attention in blocks of 64 queries; 265 rows in one pass: sgemm in row slices
PROMPT_LENS = (1, 7, 13, 22, 110, 112)
ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
TORCH_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}

# --------------------------------------------------------------------------- cases
# std is the projection weights' std (default 0.1).  Tied-embedding models use 0.3 so
# the residual branches outweigh the token's own embedding and greedy decoding does
# not just repeat the last token.
# Seeds are chosen so that no greedy decode token is an eos id of the case.

CASES = {
    "llama_gqa3": dict(
        family="llama", arch="LlamaForCausalLM", model_type="llama", dtype="F32", seed=1,
        hidden=60, n_head=6, n_kv=2, inter=92, vocab=257, n_layer=3, tied=False,
        eps=1e-5, theta=10000.0, max_pos=128),
    "llama3_headdim_bf16": dict(
        family="llama", arch="LlamaForCausalLM", model_type="llama", dtype="BF16", seed=7,
        hidden=40, n_head=6, n_kv=2, head_dim=12, inter=70, vocab=301, n_layer=2,
        tied=True, std=0.3, eps=1e-5, theta=500000.0, max_pos=128,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        generation_config={"bos_token_id": 1, "eos_token_id": [5, 7]}),
    "qwen2_bias_f16_sharded": dict(
        family="llama", arch="Qwen2ForCausalLM", model_type="qwen2", dtype="F16", seed=3,
        hidden=48, n_head=6, n_kv=2, inter=80, vocab=263, n_layer=3, tied=False,
        eps=1e-6, theta=1000000.0, max_pos=128, qkv_bias=True, sharded=True),
    "mistral_window": dict(
        family="llama", arch="MistralForCausalLM", model_type="mistral", dtype="F32", seed=9,
        hidden=32, n_head=4, n_kv=4, inter=56, vocab=199, n_layer=2, tied=False,
        eps=1e-5, theta=10000.0, max_pos=128, sliding_window=5),
    "gpt2_prefixed": dict(
        family="gpt2", dtype="F32", seed=5, prefix="transformer.", std=0.3,
        n_embd=36, n_head=4, n_layer=3, vocab=263, n_pos=128, n_inner=None),
    "gpt2_bare_f16": dict(
        family="gpt2", dtype="F16", seed=6, prefix="", legacy_bias=True, std=0.3,
        n_embd=48, n_head=3, n_layer=2, vocab=211, n_pos=128, n_inner=100),
}

# ------------------------------------------------------------------ safetensors I/O


def tensor_bytes(t, dtype):
    """Raw little-endian bytes of float32 tensor t stored as dtype."""
    t = t.contiguous()
    if dtype == "F32":
        return t.to(torch.float32).numpy().astype("<f4").tobytes()
    if dtype == "F16":
        return t.to(torch.float16).numpy().astype("<f2").tobytes()
    if dtype == "BF16":  # upper 16 bits after round-to-nearest-even (torch's cast)
        return t.to(torch.bfloat16).view(torch.int16).numpy().astype("<i2").tobytes()
    raise ValueError(dtype)


def write_safetensors(path, tensors):
    """tensors: list of (name, float32 tensor, dtype). Returns data size in bytes."""
    header, blobs, off = {}, [], 0
    for name, t, dtype in tensors:
        b = tensor_bytes(t, dtype)
        header[name] = {"dtype": dtype, "shape": list(t.shape),
                        "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    header["__metadata__"] = {"format": "pt"}
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * (-len(hjson) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for b in blobs:
            f.write(b)
    return off


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")

# ------------------------------------------------------------------ random weights


class WeightBuilder:
    """Collects named random tensors, rounded to the stored dtype."""

    def __init__(self, seed, dtype):
        self.gen = torch.Generator().manual_seed(seed)
        self.dtype = dtype
        self.entries = []   # (name, float32 tensor, stored dtype) in file order
        self.w = {}         # name -> float64 tensor of the rounded values

    def randn(self, *shape):
        return torch.randn(*shape, generator=self.gen, dtype=torch.float32)

    def add(self, name, t, dtype=None):
        dtype = dtype or self.dtype
        rounded = t.to(ST_DTYPES[dtype]).to(torch.float32)
        self.entries.append((name, rounded, dtype))
        self.w[name] = rounded.to(torch.float64)

    def normal(self, name, shape, std):
        self.add(name, std * self.randn(*shape))

    def norm_weight(self, name, n):
        self.add(name, 1.0 + 0.1 * self.randn(n))

# ------------------------------------------------------------------ llama family


def llama_head_dim(c):
    return c.get("head_dim") or c["hidden"] // c["n_head"]


def llama_build(c):
    H, hd, I, V = c["hidden"], llama_head_dim(c), c["inter"], c["vocab"]
    nh, nkv = c["n_head"], c["n_kv"]
    wb, s = WeightBuilder(c["seed"], c["dtype"]), c.get("std", 0.1)
    wb.normal("model.embed_tokens.weight", (V, H), 0.5)
    for i in range(c["n_layer"]):
        p = f"model.layers.{i}."
        wb.norm_weight(p + "input_layernorm.weight", H)
        for proj, rows in (("q", nh * hd), ("k", nkv * hd), ("v", nkv * hd)):
            wb.normal(p + f"self_attn.{proj}_proj.weight", (rows, H), s)
            if c.get("qkv_bias"):
                wb.normal(p + f"self_attn.{proj}_proj.bias", (rows,), 0.1)
        wb.normal(p + "self_attn.o_proj.weight", (H, nh * hd), s)
        wb.norm_weight(p + "post_attention_layernorm.weight", H)
        wb.normal(p + "mlp.gate_proj.weight", (I, H), s)
        wb.normal(p + "mlp.up_proj.weight", (I, H), s)
        wb.normal(p + "mlp.down_proj.weight", (H, I), s)
    wb.norm_weight("model.norm.weight", H)
    if not c["tied"]:
        wb.normal("lm_head.weight", (V, H), s)
    config = {
        "architectures": [c["arch"]], "model_type": c["model_type"],
        "hidden_size": H, "intermediate_size": I, "num_hidden_layers": c["n_layer"],
        "num_attention_heads": nh, "num_key_value_heads": nkv, "vocab_size": V,
        "hidden_act": "silu", "rms_norm_eps": c["eps"], "rope_theta": c["theta"],
        "max_position_embeddings": c["max_pos"], "tie_word_embeddings": c["tied"],
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": TORCH_DTYPE_NAMES[c["dtype"]],
    }
    if "head_dim" in c:
        config["head_dim"] = c["head_dim"]
    if "rope_scaling" in c:
        config["rope_scaling"] = c["rope_scaling"]
    if c["model_type"] == "llama":
        config["attention_bias"] = False
    if c["model_type"] == "mistral":
        config["sliding_window"] = c["sliding_window"]
    if c["model_type"] == "qwen2":  # real Qwen2 configs carry a disabled window
        config.update(use_sliding_window=False, sliding_window=4096, max_window_layers=28)
    return config, wb


def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def llama_inv_freq(c):
    hd = llama_head_dim(c)
    inv = 1.0 / c["theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    rs = c.get("rope_scaling")
    if rs:
        assert rs["rope_type"] == "llama3"
        f, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        L = rs["original_max_position_embeddings"]
        low_wl, high_wl = L / lo, L / hi
        wavelen = 2 * math.pi / inv
        inv_l = torch.where(wavelen > low_wl, inv / f, inv)
        smooth = (L / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * inv_l / f + smooth * inv_l
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        inv = torch.where(medium, smoothed, inv_l)
    return inv


def apply_rope(x, cos, sin):
    """x: [heads, T, hd]; cos/sin: [T, hd/2]. rotate_half (NeoX) convention."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def causal_mask(T, window=None):
    p = torch.arange(T).unsqueeze(1)
    j = torch.arange(T).unsqueeze(0)
    masked = j > p
    if window is not None:
        masked |= (p - j) >= window
    return masked


def attention(q, k, v, mask):
    """q: [nh, T, hd], k/v: [nh, T, hd] (kv already expanded to nh heads)."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def linear(x, w, b=None):
    y = x @ w.T
    return y if b is None else y + b


def llama_forward(c, w, tokens):
    """Full-sequence forward; returns float64 logits [T, V]."""
    nh, nkv, hd, eps = c["n_head"], c["n_kv"], llama_head_dim(c), c["eps"]
    T = len(tokens)
    x = w["model.embed_tokens.weight"][torch.tensor(tokens)]
    angles = torch.arange(T, dtype=torch.float64).unsqueeze(1) * llama_inv_freq(c)
    cos, sin = angles.cos(), angles.sin()
    mask = causal_mask(T, c.get("sliding_window"))
    for i in range(c["n_layer"]):
        p = f"model.layers.{i}."
        y = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        qkv = []
        for proj, heads in (("q", nh), ("k", nkv), ("v", nkv)):
            name = p + f"self_attn.{proj}_proj."
            t = linear(y, w[name + "weight"], w.get(name + "bias"))
            qkv.append(t.view(T, heads, hd).transpose(0, 1))
        q, k, v = qkv
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        group = nh // nkv  # query head h uses kv head h // group
        k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
        a = attention(q, k, v, mask).transpose(0, 1).reshape(T, nh * hd)
        x = x + linear(a, w[p + "self_attn.o_proj.weight"], w.get(p + "self_attn.o_proj.bias"))
        y = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        gate = linear(y, w[p + "mlp.gate_proj.weight"])
        up = linear(y, w[p + "mlp.up_proj.weight"])
        x = x + linear(torch.nn.functional.silu(gate) * up, w[p + "mlp.down_proj.weight"])
    x = rms_norm(x, w["model.norm.weight"], eps)
    return x @ w.get("lm_head.weight", w["model.embed_tokens.weight"]).T

# ------------------------------------------------------------------ gpt2


def gpt2_build(c):
    C, V, P = c["n_embd"], c["vocab"], c["n_pos"]
    inner = c["n_inner"] or 4 * C
    pre = c["prefix"]
    wb, s = WeightBuilder(c["seed"], c["dtype"]), c.get("std", 0.1)
    wb.normal(pre + "wte.weight", (V, C), 0.5)
    wb.normal(pre + "wpe.weight", (P, C), 0.2)
    for i in range(c["n_layer"]):
        p = f"{pre}h.{i}."
        wb.norm_weight(p + "ln_1.weight", C)
        wb.normal(p + "ln_1.bias", (C,), 0.1)
        if c.get("legacy_bias"):  # old causal-mask buffer; loaders must ignore it
            wb.add(p + "attn.bias", torch.tril(torch.ones(P, P)).view(1, 1, P, P), "F32")
        wb.normal(p + "attn.c_attn.weight", (C, 3 * C), s)  # Conv1D: [in, out]
        wb.normal(p + "attn.c_attn.bias", (3 * C,), 0.1)
        wb.normal(p + "attn.c_proj.weight", (C, C), s)
        wb.normal(p + "attn.c_proj.bias", (C,), 0.1)
        wb.norm_weight(p + "ln_2.weight", C)
        wb.normal(p + "ln_2.bias", (C,), 0.1)
        wb.normal(p + "mlp.c_fc.weight", (C, inner), s)
        wb.normal(p + "mlp.c_fc.bias", (inner,), 0.1)
        wb.normal(p + "mlp.c_proj.weight", (inner, C), s)
        wb.normal(p + "mlp.c_proj.bias", (C,), 0.1)
    wb.norm_weight(pre + "ln_f.weight", C)
    wb.normal(pre + "ln_f.bias", (C,), 0.1)
    config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "n_embd": C, "n_layer": c["n_layer"], "n_head": c["n_head"], "n_positions": P,
        "n_ctx": P, "n_inner": c["n_inner"], "vocab_size": V, "layer_norm_epsilon": 1e-5,
        "activation_function": "gelu_new", "tie_word_embeddings": True,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "bos_token_id": 0, "eos_token_id": 0,
        "torch_dtype": TORCH_DTYPE_NAMES[c["dtype"]],
    }
    return config, wb


def layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1, keepdim=True)  # biased variance
    return (x - mu) / torch.sqrt(var + eps) * w + b


def gelu_new(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def gpt2_forward(c, w, tokens):
    """Full-sequence forward; returns float64 logits [T, V]."""
    C, nh, pre = c["n_embd"], c["n_head"], c["prefix"]
    hd, T = C // nh, len(tokens)
    x = w[pre + "wte.weight"][torch.tensor(tokens)] + w[pre + "wpe.weight"][:T]
    mask = causal_mask(T)
    for i in range(c["n_layer"]):
        p = f"{pre}h.{i}."
        y = layer_norm(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"])
        qkv = y @ w[p + "attn.c_attn.weight"] + w[p + "attn.c_attn.bias"]
        q, k, v = (t.view(T, nh, hd).transpose(0, 1) for t in qkv.split(C, dim=-1))
        a = attention(q, k, v, mask).transpose(0, 1).reshape(T, C)
        x = x + a @ w[p + "attn.c_proj.weight"] + w[p + "attn.c_proj.bias"]
        y = layer_norm(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"])
        m = gelu_new(y @ w[p + "mlp.c_fc.weight"] + w[p + "mlp.c_fc.bias"])
        x = x + m @ w[p + "mlp.c_proj.weight"] + w[p + "mlp.c_proj.bias"]
    x = layer_norm(x, w[pre + "ln_f.weight"], w[pre + "ln_f.bias"])
    return x @ w[pre + "wte.weight"].T

# ------------------------------------------------------------------ driver


FAMILIES = {"llama": (llama_build, llama_forward), "gpt2": (gpt2_build, gpt2_forward)}


def write_model(d, c, config, wb):
    write_json(os.path.join(d, "config.json"), config)
    if "generation_config" in c:
        write_json(os.path.join(d, "generation_config.json"), c["generation_config"])
    if not c.get("sharded"):
        write_safetensors(os.path.join(d, "model.safetensors"), wb.entries)
        return
    half = (len(wb.entries) + 1) // 2  # file order; lm_head is last, so in shard 2
    shards = [wb.entries[:half], wb.entries[half:]]
    weight_map, total = {}, 0
    for n, entries in enumerate(shards, 1):
        fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(os.path.join(d, fname), entries)
        weight_map.update({name: fname for name, _, _ in entries})
    write_json(os.path.join(d, "model.safetensors.index.json"),
               {"metadata": {"total_size": total}, "weight_map": weight_map})


def run_case(name, c, outdir):
    build, forward = FAMILIES[c["family"]]
    config, wb = build(c)
    d = os.path.join(outdir, name)
    os.makedirs(d, exist_ok=True)
    write_model(d, c, config, wb)

    V = c["vocab"]
    gen = torch.Generator().manual_seed(1000 + c["seed"])
    prompts = [torch.randint(0, V, (n,), generator=gen).tolist() for n in PROMPT_LENS]
    prefill, decode, steps = [], [], []
    for prompt in prompts:
        logits = forward(c, wb.w, prompt)
        prefill.append(logits)
        seq, toks, rows = list(prompt), [], []
        nxt = int(logits[-1].argmax())
        for _ in range(N_STEPS):
            toks.append(nxt)
            seq.append(nxt)
            row = forward(c, wb.w, seq)[-1]  # logits at position len(seq)-1
            rows.append(row)
            nxt = int(row.argmax())
        decode.append(toks)
        steps.append(torch.stack(rows))
    prefill = torch.cat(prefill)                       # [sum(len), V]
    dec = torch.stack(steps).transpose(0, 1)           # [n_steps, n_seqs, V]
    for t in (prefill, dec):
        if not torch.isfinite(t).all():
            raise RuntimeError(f"{name}: non-finite logits")
    prefill.to(torch.float32).numpy().astype("<f4").tofile(os.path.join(d, "prefill.f32"))
    dec.contiguous().to(torch.float32).numpy().astype("<f4").tofile(os.path.join(d, "decode.f32"))
    write_json(os.path.join(d, "ref.json"),
               {"prompts": prompts, "decode": decode, "n_vocab": V, "n_steps": N_STEPS})


def main(argv):
    if len(argv) != 2:
        print(f"usage: {argv[0]} OUTDIR", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    for name, c in CASES.items():
        run_case(name, c, argv[1])
        print(f"{name} ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
