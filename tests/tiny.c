#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "adapterd/model.h"
#include "adapterd/safetensors.h"
#include "adapterd/util.h"
#include "tiny.h"

static float w[64 * 40];

struct ad_model *tiny_model(char dir[64])
{
    struct ad_model *m;
    char path[256];
    struct ad_err err;

    uint32_t x = 12345; /* fixed pseudo-random weights in [-0.5, 0.5) */
    for (size_t i = 0; i < sizeof(w) / sizeof(w[0]); i++) {
        x = x * 1664525u + 1013904223u;
        w[i] = (float)(x >> 8) / 16777216.0f - 0.5f;
    }
    snprintf(dir, 64, "/tmp/adapterd-tiny-XXXXXX");
    if (!mkdtemp(dir))
        abort();
    snprintf(path, sizeof(path), "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    if (!f)
        abort();
    fputs("{\"architectures\":[\"LlamaForCausalLM\"],\"vocab_size\":40,\"hidden_size\":16,"
          "\"num_hidden_layers\":2,\"num_attention_heads\":4,\"num_key_value_heads\":2,"
          "\"intermediate_size\":24,\"tie_word_embeddings\":true}", f);
    fclose(f);
    struct ad_st_entry e[32];
    static char names[32][96];
    size_t n = 0;
    snprintf(names[n], 96, "model.embed_tokens.weight");
    e[n] = (struct ad_st_entry){names[n], AD_DTYPE_F32, 2, {40, 16}, w};
    n++;
    snprintf(names[n], 96, "model.norm.weight");
    e[n] = (struct ad_st_entry){names[n], AD_DTYPE_F32, 1, {16}, w};
    n++;
    for (int l = 0; l < 2; l++) {
        static const struct {
            const char *n;
            int64_t out, in;
        } lin[] = {{"self_attn.q_proj", 16, 16}, {"self_attn.k_proj", 8, 16},
                   {"self_attn.v_proj", 8, 16},  {"self_attn.o_proj", 16, 16},
                   {"mlp.gate_proj", 24, 16},    {"mlp.up_proj", 24, 16},
                   {"mlp.down_proj", 16, 24}};
        for (int i = 0; i < 7; i++) {
            snprintf(names[n], 96, "model.layers.%d.%s.weight", l, lin[i].n);
            e[n] = (struct ad_st_entry){names[n], AD_DTYPE_F32, 2, {lin[i].out, lin[i].in}, w};
            n++;
        }
        snprintf(names[n], 96, "model.layers.%d.input_layernorm.weight", l);
        e[n] = (struct ad_st_entry){names[n], AD_DTYPE_F32, 1, {16}, w};
        n++;
        snprintf(names[n], 96, "model.layers.%d.post_attention_layernorm.weight", l);
        e[n] = (struct ad_st_entry){names[n], AD_DTYPE_F32, 1, {16}, w};
        n++;
    }
    snprintf(path, sizeof(path), "%s/model.safetensors", dir);
    if (ad_st_write(path, e, n, NULL, &err) < 0 || ad_model_load(dir, &m, &err) < 0) {
        fprintf(stderr, "tiny_model: %s\n", err.msg);
        abort();
    }
    return m;
}

void tiny_lora(const char *path, int r, float value)
{
    static float buf[2][64 * 16];
    char name[4][96], file[512];
    struct ad_st_entry e[4];
    struct ad_err err;

    for (int i = 0; i < 64 * 16; i++)
        buf[0][i] = buf[1][i] = value;
    if (mkdir(path, 0755) < 0 && errno != EEXIST)
        abort();
    for (int l = 0; l < 2; l++) {
        snprintf(name[2 * l], 96, "base_model.model.model.layers.%d.self_attn.q_proj.lora_A.weight",
                 l);
        snprintf(name[2 * l + 1], 96,
                 "base_model.model.model.layers.%d.self_attn.q_proj.lora_B.weight", l);
        e[2 * l] = (struct ad_st_entry){name[2 * l], AD_DTYPE_F32, 2, {r, 16}, buf[0]};
        e[2 * l + 1] = (struct ad_st_entry){name[2 * l + 1], AD_DTYPE_F32, 2, {16, r}, buf[1]};
    }
    snprintf(file, sizeof(file), "%s/adapter_model.safetensors", path);
    if (ad_st_write(file, e, 4, NULL, &err) < 0)
        abort();
    snprintf(file, sizeof(file), "%s/adapter_config.json", path);
    FILE *f = fopen(file, "w");
    if (!f)
        abort();
    fprintf(f, "{\"peft_type\": \"LORA\", \"r\": %d, \"lora_alpha\": %d, "
               "\"target_modules\": [\"q_proj\"]}", r, 2 * r);
    fclose(f);
}

void tiny_prefix(const struct ad_model *m, const char *path, const int32_t *tokens, int n)
{
    const struct ad_model_config *c = &m->cfg;
    int L = c->n_layer, kvd = c->n_kv_head * c->head_dim, B = 4;
    struct ad_kv kv;
    struct ad_kv_seq seq = {0};
    struct ad_chunk ch = {.seq = &seq, .tokens = tokens, .n_tokens = n};
    struct ad_scratch *s = ad_scratch_new();
    float *logits = malloc((size_t)c->n_vocab * sizeof(float));
    float *emb = malloc((size_t)n * (size_t)L * 2 * (size_t)kvd * sizeof(float));
    char file[512];
    struct ad_err err;

    if (!s || !logits || !emb || ad_kv_init(&kv, c, (n + B - 1) / B, B) < 0 ||
        ad_model_forward(m, &kv, &ch, 1, NULL, s, logits, &err) < 0)
        abort();
    /* PEFT's prompt_embeddings [n, L * 2 * kvd]: per token [layer 0 K | V | layer 1 K | V] */
    size_t per_layer = (size_t)kv.n_blocks * (size_t)B * (size_t)kvd;
    for (int p = 0; p < n; p++)
        for (int l = 0; l < L; l++)
            for (int which = 0; which < 2; which++) {
                const float *src = (which ? kv.v : kv.k) + (size_t)l * per_layer +
                                   ((size_t)seq.blocks[p / B] * B + (size_t)(p % B)) * kvd;
                memcpy(emb + (((size_t)p * L + l) * 2 + which) * kvd, src,
                       (size_t)kvd * sizeof(float));
            }
    ad_kv_seq_release(&kv, &seq);
    ad_kv_fini(&kv);
    ad_scratch_free(s);
    free(logits);

    struct ad_st_entry e = {"prompt_embeddings", AD_DTYPE_F32, 2, {n, (int64_t)L * 2 * kvd}, emb};
    if (mkdir(path, 0755) < 0 && errno != EEXIST)
        abort();
    snprintf(file, sizeof(file), "%s/adapter_model.safetensors", path);
    if (ad_st_write(file, &e, 1, NULL, &err) < 0)
        abort();
    free(emb);
    snprintf(file, sizeof(file), "%s/adapter_config.json", path);
    FILE *f = fopen(file, "w");
    if (!f)
        abort();
    fprintf(f, "{\"peft_type\": \"PREFIX_TUNING\", \"task_type\": \"CAUSAL_LM\", "
               "\"num_virtual_tokens\": %d, \"token_dim\": %d, \"num_attention_heads\": %d, "
               "\"num_layers\": %d}", n, kvd, c->n_kv_head, L);
    fclose(f);
}
