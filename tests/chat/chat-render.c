/* chat-render: adapterd's chat_render() (src/http/chat.c) for tests/chat/chat.js. Reads from
 * stdin a JSON list of {template, bos_token, eos_token, messages} and writes to stdout a JSON
 * list, one entry each: {"text": rendering} or {"error": message, "code": -errno}. */
#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int chat_render(const char *tmpl, const char *bos, const char *eos, json_t *messages, char **ret,
                char *msg, size_t msg_len);

int main(void)
{
    json_error_t je;
    json_t *in = json_loadf(stdin, 0, &je), *out = json_array(), *c;
    size_t i;

    if (!json_is_array(in)) {
        fprintf(stderr, "chat-render: stdin: line %d: %s\n", je.line, je.text);
        return 2;
    }
    json_array_foreach(in, i, c) {
        const char *tmpl = json_string_value(json_object_get(c, "template"));
        const char *bos = json_string_value(json_object_get(c, "bos_token"));
        const char *eos = json_string_value(json_object_get(c, "eos_token"));
        char msg[256] = "", *text = NULL;
        int rc;

        if (!tmpl) {
            fprintf(stderr, "chat-render: case %zu has no template\n", i);
            return 2;
        }
        rc = chat_render(tmpl, bos, eos, json_object_get(c, "messages"), &text, msg, sizeof msg);
        if (rc == 0) {
            json_array_append_new(out, json_pack("{s:s}", "text", text));
            free(text);
        } else {
            json_array_append_new(out, json_pack("{s:s, s:i}", "error", msg, "code", rc));
        }
    }
    if (json_dumpf(out, stdout, JSON_COMPACT) < 0)
        return 1;
    json_decref(in);
    json_decref(out);
    return 0;
}
