/* Fuzz target: adapter loading (adapter_config.json + safetensors) against a tiny Llama.
 * Input: the config text, a NUL byte, then the safetensors image. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "adapterd/adapter.h"
#include "adapterd/model.h"
#include "adapterd/safetensors.h"
#include "adapterd/util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* A 2-layer Llama with 16 hidden, 4 heads, 2 KV heads, written once to a temp directory. */
static struct ad_model *tiny_model(void)
{
    static struct ad_model *m;
    static float w[64 * 40];
    char dir[] = "/tmp/adapterd-fuzz-XXXXXX", path[256];
    struct ad_err err;

    if (m)
        return m;
    if (!mkdtemp(dir))
        abort();
    snprintf(path, sizeof(path), "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    fputs("{\"architectures\":[\"LlamaForCausalLM\"],\"vocab_size\":40,\"hidden_size\":16,"
          "\"num_hidden_layers\":2,\"num_attention_heads\":4,\"num_key_value_heads\":2,"
          "\"intermediate_size\":24,\"tie_word_embeddings\":true}", f);
    fclose(f);
    struct ad_st_entry e[32];
    static char names[32][96];
    size_t n = 0;
    snprintf(names[n], 96, "model.embed_tokens.weight");
    e[n] = (struct ad_st_entry){names[n], AD_DTYPE_F32, 2, {40, 16}, w}, n++;
    snprintf(names[n], 96, "model.norm.weight");
    e[n] = (struct ad_st_entry){names[n], AD_DTYPE_F32, 1, {16}, w}, n++;
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
        e[n] = (struct ad_st_entry){names[n], AD_DTYPE_F32, 1, {16}, w}, n++;
        snprintf(names[n], 96, "model.layers.%d.post_attention_layernorm.weight", l);
        e[n] = (struct ad_st_entry){names[n], AD_DTYPE_F32, 1, {16}, w}, n++;
    }
    snprintf(path, sizeof(path), "%s/model.safetensors", dir);
    if (ad_st_write(path, e, n, NULL, &err) < 0 || ad_model_load(dir, &m, &err) < 0) {
        fprintf(stderr, "fuzz-adapter: %s\n", err.msg);
        abort();
    }
    return m;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct ad_model *m = tiny_model();
    const uint8_t *nul = memchr(data, 0, size);
    struct ad_adapter *a;
    struct ad_err err;

    if (!nul)
        return 0;
    char *config = malloc((size_t)(nul - data) + 1);
    if (!config)
        return 0;
    memcpy(config, data, (size_t)(nul - data));
    config[nul - data] = '\0';
    int r = ad_adapter_load_mem(m, config, nul + 1, size - (size_t)(nul - data) - 1, "fuzz", &a,
                                &err);
    if (getenv("FUZZ_VERBOSE")) /* to check that seeds load: FUZZ_VERBOSE=1 replay-adapter DIR */
        fprintf(stderr, "%s\n", r == 0 ? "loaded" : err.msg);
    if (r == 0) {
        struct ad_mix mix = {.n = 1, .a = {a}, .w = {1.0f}};
        (void)ad_mix_validate(&mix, &err);
        ad_adapter_unref(a);
    }
    free(config);
    return 0;
}
