/* adapterd-mkmodel: writes a Hugging Face model directory with random weights, for benchmarks,
 * tests and a first run before a trained model exists.
 *
 *   adapterd-mkmodel [--preset smollm2-135m|tiny] [--family llama|gpt2] [--vocab N]
 *                    [--hidden N] [--layers N] [--heads N] [--kv-heads N] [--ff N] [--ctx N]
 *                    [--untied] [--seed N] OUTDIR
 */
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "adapterd/safetensors.h"
#include "adapterd/util.h"

struct shape {
    const char *family;
    int vocab, hidden, layers, heads, kv_heads, ff, ctx;
    bool tied;
};

static const struct {
    const char *name;
    struct shape s;
} presets[] = {
    {"smollm2-135m", {"llama", 49152, 576, 30, 9, 3, 1536, 2048, true}},
    {"tiny", {"llama", 512, 64, 2, 4, 2, 128, 256, true}},
};

static uint64_t rng_state = 1;

static float randn(void)
{
    /* xorshift64* + Box-Muller; quality is irrelevant, speed is not. */
    static int have;
    static float spare;
    if (have) {
        have = 0;
        return spare;
    }
    double u[2];
    for (int i = 0; i < 2; i++) {
        rng_state ^= rng_state >> 12;
        rng_state ^= rng_state << 25;
        rng_state ^= rng_state >> 27;
        u[i] = ((rng_state * 2685821657736338717ull) >> 11) * (1.0 / 9007199254740992.0);
    }
    double r = sqrt(-2.0 * log(u[0] + 1e-300)), t = 2.0 * M_PI * u[1];
    spare = (float)(r * sin(t));
    have = 1;
    return (float)(r * cos(t));
}

struct writer {
    struct ad_st_entry *e;
    size_t n, cap;
};

static float *add(struct writer *w, const char *name, int64_t d0, int64_t d1, float std,
                  float mean)
{
    if (w->n == w->cap) {
        w->cap = w->cap ? w->cap * 2 : 64;
        w->e = realloc(w->e, w->cap * sizeof(*w->e));
        if (!w->e)
            abort();
    }
    size_t n = (size_t)d0 * (size_t)(d1 ? d1 : 1);
    float *data = malloc(n * sizeof(float));
    if (!data)
        abort();
    for (size_t i = 0; i < n; i++)
        data[i] = mean + std * randn();
    w->e[w->n++] = (struct ad_st_entry){
        .name = strdup(name), .dtype = AD_DTYPE_F32, .n_dims = d1 ? 2 : 1,
        .shape = {d0, d1}, .data = data};
    return data;
}

static int write_json(const char *dir, const char *name, json_t *j)
{
    char path[4096];
    int r = ad_path_join(path, sizeof(path), dir, name);
    if (r >= 0)
        r = json_dump_file(j, path, JSON_INDENT(2) | JSON_SORT_KEYS) ? -EIO : 0;
    json_decref(j);
    return r;
}

int main(int argc, char **argv)
{
    struct shape s = presets[1].s;
    uint64_t seed = 1;
    static const struct option opts[] = {
        {"preset", 1, 0, 'p'}, {"family", 1, 0, 'f'}, {"vocab", 1, 0, 'v'},
        {"hidden", 1, 0, 'H'}, {"layers", 1, 0, 'l'}, {"heads", 1, 0, 'h'},
        {"kv-heads", 1, 0, 'k'}, {"ff", 1, 0, 'F'}, {"ctx", 1, 0, 'c'},
        {"untied", 0, 0, 'u'}, {"seed", 1, 0, 's'}, {0, 0, 0, 0},
    };
    int o;

    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        long v = optarg ? strtol(optarg, NULL, 10) : 0;
        switch (o) {
        case 'p': {
            size_t i;
            for (i = 0; i < sizeof(presets) / sizeof(presets[0]); i++)
                if (!strcmp(optarg, presets[i].name))
                    break;
            if (i == sizeof(presets) / sizeof(presets[0])) {
                fprintf(stderr, "unknown preset '%s'\n", optarg);
                return 2;
            }
            s = presets[i].s;
            break;
        }
        case 'f': s.family = !strcmp(optarg, "gpt2") ? "gpt2" : "llama"; break;
        case 'v': s.vocab = (int)v; break;
        case 'H': s.hidden = (int)v; break;
        case 'l': s.layers = (int)v; break;
        case 'h': s.heads = (int)v; break;
        case 'k': s.kv_heads = (int)v; break;
        case 'F': s.ff = (int)v; break;
        case 'c': s.ctx = (int)v; break;
        case 'u': s.tied = false; break;
        case 's': seed = (uint64_t)v; break;
        default: return 2;
        }
    }
    if (optind != argc - 1 || s.vocab <= 0 || s.hidden <= 0 || s.layers <= 0 || s.heads <= 0 ||
        s.kv_heads <= 0 || s.ff <= 0 || s.ctx <= 0 || s.hidden % s.heads || s.heads % s.kv_heads) {
        fprintf(stderr, "usage: adapterd-mkmodel [--preset smollm2-135m|tiny] [--family "
                        "llama|gpt2] [--vocab N] [--hidden N] [--layers N] [--heads N] "
                        "[--kv-heads N] [--ff N] [--ctx N] [--untied] [--seed N] OUTDIR\n");
        return 2;
    }
    rng_state = seed * 0x9e3779b97f4a7c15ull + 1;
    const char *dir = argv[optind];
    if (mkdir(dir, 0755) < 0 && errno != EEXIST) {
        perror(dir);
        return 1;
    }

    bool gpt2 = !strcmp(s.family, "gpt2");
    int E = s.hidden, hd = E / s.heads, kvd = s.kv_heads * hd;
    float wstd = 1.0f / sqrtf((float)E);
    struct writer w = {0};
    char name[128];

    if (gpt2) {
        s.kv_heads = s.heads;
        add(&w, "transformer.wte.weight", s.vocab, E, 0.5f, 0);
        add(&w, "transformer.wpe.weight", s.ctx, E, 0.1f, 0);
        for (int l = 0; l < s.layers; l++) {
            static const struct {
                const char *n;
                int in, out; /* in units: 0 = E, 1 = ff, 2 = 3E */
            } lin[] = {{"attn.c_attn", 0, 2}, {"attn.c_proj", 0, 0}, {"mlp.c_fc", 0, 1},
                       {"mlp.c_proj", 1, 0}};
            for (int i = 0; i < 2; i++) {
                snprintf(name, sizeof(name), "transformer.h.%d.ln_%d.weight", l, i + 1);
                add(&w, name, E, 0, 0.05f, 1.0f);
                snprintf(name, sizeof(name), "transformer.h.%d.ln_%d.bias", l, i + 1);
                add(&w, name, E, 0, 0.05f, 0);
            }
            for (size_t i = 0; i < sizeof(lin) / sizeof(lin[0]); i++) {
                int dims[3] = {E, s.ff, 3 * E};
                snprintf(name, sizeof(name), "transformer.h.%d.%s.weight", l, lin[i].n);
                add(&w, name, dims[lin[i].in], dims[lin[i].out], wstd, 0);
                snprintf(name, sizeof(name), "transformer.h.%d.%s.bias", l, lin[i].n);
                add(&w, name, dims[lin[i].out], 0, 0.02f, 0);
            }
        }
        add(&w, "transformer.ln_f.weight", E, 0, 0.05f, 1.0f);
        add(&w, "transformer.ln_f.bias", E, 0, 0.05f, 0);
    } else {
        add(&w, "model.embed_tokens.weight", s.vocab, E, 0.5f, 0);
        for (int l = 0; l < s.layers; l++) {
            const struct {
                const char *n;
                int out, in;
            } lin[] = {{"self_attn.q_proj", E, E},     {"self_attn.k_proj", kvd, E},
                       {"self_attn.v_proj", kvd, E},   {"self_attn.o_proj", E, E},
                       {"mlp.gate_proj", s.ff, E},     {"mlp.up_proj", s.ff, E},
                       {"mlp.down_proj", E, s.ff}};
            snprintf(name, sizeof(name), "model.layers.%d.input_layernorm.weight", l);
            add(&w, name, E, 0, 0.05f, 1.0f);
            snprintf(name, sizeof(name), "model.layers.%d.post_attention_layernorm.weight", l);
            add(&w, name, E, 0, 0.05f, 1.0f);
            for (size_t i = 0; i < sizeof(lin) / sizeof(lin[0]); i++) {
                snprintf(name, sizeof(name), "model.layers.%d.%s.weight", l, lin[i].n);
                add(&w, name, lin[i].out, lin[i].in, 1.0f / sqrtf((float)lin[i].in), 0);
            }
        }
        add(&w, "model.norm.weight", E, 0, 0.05f, 1.0f);
        if (!s.tied)
            add(&w, "lm_head.weight", s.vocab, E, wstd, 0);
    }

    char path[4096];
    struct ad_err err;
    static const char *const meta[] = {"format", "pt", NULL};
    if (ad_path_join(path, sizeof(path), dir, "model.safetensors") < 0 ||
        ad_st_write(path, w.e, w.n, meta, &err) < 0) {
        fprintf(stderr, "adapterd-mkmodel: %s\n", err.msg);
        return 1;
    }

    json_t *cfg;
    if (gpt2)
        cfg = json_pack("{s:[s], s:s, s:i, s:i, s:i, s:i, s:i, s:i, s:s, s:f, s:b, s:i, s:i}",
                        "architectures", "GPT2LMHeadModel", "model_type", "gpt2", "vocab_size",
                        s.vocab, "n_embd", E, "n_layer", s.layers, "n_head", s.heads,
                        "n_positions", s.ctx, "n_inner", s.ff, "activation_function",
                        "gelu_new", "layer_norm_epsilon", 1e-5, "tie_word_embeddings", 1,
                        "bos_token_id", 0, "eos_token_id", 0);
    else
        cfg = json_pack("{s:[s], s:s, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:f, s:f, s:b, s:s, "
                        "s:i, s:i}",
                        "architectures", "LlamaForCausalLM", "model_type", "llama", "vocab_size",
                        s.vocab, "hidden_size", E, "num_hidden_layers", s.layers,
                        "num_attention_heads", s.heads, "num_key_value_heads", s.kv_heads,
                        "intermediate_size", s.ff, "max_position_embeddings", s.ctx,
                        "rms_norm_eps", 1e-5, "rope_theta", 10000.0, "tie_word_embeddings",
                        s.tied, "hidden_act", "silu", "bos_token_id", 1, "eos_token_id", 2);
    if (!cfg || write_json(dir, "config.json", cfg) < 0) {
        fprintf(stderr, "adapterd-mkmodel: cannot write config.json\n");
        return 1;
    }
    for (size_t i = 0; i < w.n; i++) {
        free((void *)w.e[i].data);
        free((void *)w.e[i].name);
    }
    free(w.e);
    return 0;
}
