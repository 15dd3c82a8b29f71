/* Bias sets (BitFit). adapterd's layout, in the PEFT container: adapter_config.json with
 * "peft_type": "BITFIT", and adapter_model.safetensors holding replacement biases keyed by
 * module path, "base_model.model.<module>.bias" ([out] for a linear, [hidden] for a LayerNorm).
 * A linear without a base bias (Llama) gets the bias added. The same tensors in a LoRA file
 * saved with bias="all" are read by the same code (peft_io.c, ctx_replacement). */
#include <errno.h>

#include "internal.h"

int ad_bias_load(struct load_ctx *c)
{
    for (size_t i = 0; i < ad_st_n_tensors(c->st); i++) {
        const struct ad_tensor *t = ad_st_tensor(c->st, i);
        int r = ctx_replacement(c, t);
        if (r < 0)
            return r;
        if (r == 0)
            return ad_err_set(c->err, -EINVAL, "tensor '%s': a bias set holds only "
                              "'<module>.bias' tensors of the model's modules", t->name);
    }
    return 0;
}
