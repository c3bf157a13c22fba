/*
 * A C program on edge-diffuse's C API (include/edge_diffuse.h).
 *
 *   main MODEL_DIR SEED CLASS OUT.pgm [OUT.f32]   one image: 8-bit PGM/PPM, optionally the raw
 *                                                 float samples; prints size, time and checksum
 *   main --selftest MODEL_DIR                     checks the error codes (NULL pointers, short
 *                                                 buffers, cancelling, bad values) and that the
 *                                                 in-memory route gives the same image
 *
 * Build: see the Makefile here, or README "Embedding". tests/capi.rs builds and runs both modes.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "edge_diffuse.h"

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static int generate_one(const char *dir, uint64_t seed, const char *class_name, const char *pgm,
                        const char *raw) {
    ed_pipeline *pipe = NULL;
    double t0 = now_ms();
    if (ed_pipeline_open(dir, 1, &pipe) != ED_OK) {
        fprintf(stderr, "open: %s\n", ed_last_error());
        return 1;
    }
    double t_load = now_ms() - t0;
    uint32_t w, h, c;
    ed_request req;
    int64_t label;
    size_t len;
    if (ed_image_info(pipe, &w, &h, &c) != ED_OK || ed_request_init(&req, sizeof req) != ED_OK ||
        ed_class_label(pipe, class_name, &label) != ED_OK) {
        fprintf(stderr, "setup: %s\n", ed_last_error());
        ed_pipeline_free(pipe);
        return 1;
    }
    req.seed = seed;
    req.classes = &label;
    req.num_classes = 1;
    ed_output_len(pipe, &req, &len);
    float *samples = malloc(len * sizeof *samples);
    uint8_t *pixels = malloc(len);
    t0 = now_ms();
    ed_status st = ed_generate(pipe, &req, samples, len, pixels, len, NULL, NULL);
    double t_gen = now_ms() - t0;
    if (st != ED_OK) {
        fprintf(stderr, "generate (status %d): %s\n", (int)st, ed_last_error());
        return 1;
    }
    FILE *f = fopen(pgm, "wb");
    if (!f) {
        perror(pgm);
        return 1;
    }
    /* PGM for grey, PPM for RGB; other channel counts are written as raw bytes after a P5
     * header of width*channels, which keeps the file readable. */
    fprintf(f, "%s\n%u %u\n255\n", c == 3 ? "P6" : "P5", c == 1 || c == 3 ? w : w * c, h);
    fwrite(pixels, 1, len, f);
    fclose(f);
    if (raw) {
        f = fopen(raw, "wb");
        if (!f) {
            perror(raw);
            return 1;
        }
        fwrite(samples, sizeof *samples, len, f);
        fclose(f);
    }
    uint64_t sum = 0;
    for (size_t i = 0; i < len; i++) sum += pixels[i];
    printf("edge-diffuse %s: %ux%ux%u, load %.0f ms, image %.1f ms, pixel sum %llu\n",
           ed_version(), w, h, c, t_load, t_gen, (unsigned long long)sum);
    free(samples);
    free(pixels);
    ed_pipeline_free(pipe);
    return 0;
}

/* ---- self-test ---------------------------------------------------------------------------- */

static int failures = 0, checks = 0;

#define EXPECT(cond)                                                                        \
    do {                                                                                    \
        checks++;                                                                           \
        if (!(cond)) {                                                                      \
            failures++;                                                                     \
            fprintf(stderr, "FAIL line %d: %s (last error: %s)\n", __LINE__, #cond,         \
                    ed_last_error());                                                       \
        }                                                                                   \
    } while (0)

#define EXPECT_ERR(call, code, needle)                                                      \
    do {                                                                                    \
        ed_status got_ = (call);                                                            \
        EXPECT(got_ == (code));                                                             \
        EXPECT(strstr(ed_last_error(), (needle)) != NULL);                                  \
    } while (0)

struct counter {
    int calls;
    int cancel_at; /* 0: never */
    uint32_t last_total;
};

static int on_step(void *user_data, uint32_t image, uint32_t step, uint32_t total, double ms) {
    struct counter *c = user_data;
    (void)image;
    c->calls++;
    c->last_total = total;
    if (!(ms >= 0.0)) return 1;
    return c->cancel_at != 0 && (int)step >= c->cancel_at;
}

/* Counts previews; each must be one whole image of finite values. */
static int on_preview(void *user_data, uint32_t image, uint32_t step, uint32_t total,
                      const float *preview, size_t len) {
    struct counter *c = user_data;
    (void)image;
    (void)step;
    c->calls++;
    c->last_total = total;
    if (len != 32 * 32) return 1;
    for (size_t i = 0; i < len; i++)
        if (!isfinite(preview[i])) return 1;
    return 0;
}

static void *read_file(const char *dir, const char *name, size_t *len, int nul) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    if (fread(buf, 1, (size_t)n, f) != (size_t)n) {
        fclose(f);
        free(buf);
        return NULL;
    }
    fclose(f);
    if (nul) buf[n] = 0;
    *len = (size_t)n;
    return buf;
}

static int selftest(const char *dir) {
    ed_pipeline *pipe = (ed_pipeline *)&checks; /* must be reset to NULL on failure */
    EXPECT(strlen(ed_version()) > 0);
    EXPECT_ERR(ed_pipeline_open(NULL, 1, &pipe), ED_ERR_NULL, "model_dir");
    EXPECT(pipe == NULL);
    EXPECT_ERR(ed_pipeline_open(dir, 1, NULL), ED_ERR_NULL, "out");
    EXPECT_ERR(ed_pipeline_open("/nonexistent/model", 1, &pipe), ED_ERR_IO, "/nonexistent/model");
    EXPECT(pipe == NULL);
    EXPECT_ERR(ed_pipeline_open_with(dir, 1, "off", "f8", &pipe), ED_ERR_CONFIG, "weights");
    EXPECT(pipe == NULL);
    EXPECT(ed_pipeline_open(dir, 1, &pipe) == ED_OK && pipe != NULL);
    if (!pipe) return 1;

    uint32_t w = 0, h = 0, c = 0;
    EXPECT(ed_image_info(pipe, &w, &h, &c) == ED_OK && w == 32 && h == 32 && c == 1);
    EXPECT_ERR(ed_image_info(pipe, NULL, &h, &c), ED_ERR_NULL, "width");
    EXPECT_ERR(ed_image_info(NULL, &w, &h, &c), ED_ERR_NULL, "pipe");

    ed_request req;
    EXPECT_ERR(ed_request_init(NULL, sizeof req), ED_ERR_NULL, "req");
    EXPECT_ERR(ed_request_init(&req, sizeof req - 8), ED_ERR_INVALID_ARGUMENT, "header");
    EXPECT(ed_request_init(&req, sizeof req) == ED_OK);
    EXPECT(req.num_images == 1 && req.steps == 0 && req.sampler == NULL && req.guidance < 0);

    int64_t label = -1;
    EXPECT(ed_class_label(pipe, "sneaker", &label) == ED_OK && label == 7);
    EXPECT_ERR(ed_class_label(pipe, "unicorn", &label), ED_ERR_CONFIG, "unicorn");
    EXPECT_ERR(ed_class_label(pipe, NULL, &label), ED_ERR_NULL, "name");

    size_t len = 0;
    EXPECT(ed_output_len(pipe, &req, &len) == ED_OK && len == 32 * 32);
    req.num_images = 3;
    EXPECT(ed_output_len(pipe, &req, &len) == ED_OK && len == 3 * 32 * 32);
    req.num_images = 1;
    len = 32 * 32;
    EXPECT_ERR(ed_output_len(pipe, &req, NULL), ED_ERR_NULL, "len");

    float *samples = malloc(2 * len * sizeof *samples);
    uint8_t *a = malloc(2 * len), *b = malloc(2 * len);
    req.seed = 7;
    req.classes = &label;
    req.num_classes = 1;

    /* NULL pointers and short buffers: error codes, and the message names the size needed. */
    EXPECT_ERR(ed_generate(NULL, &req, samples, len, a, len, NULL, NULL), ED_ERR_NULL, "pipe");
    EXPECT_ERR(ed_generate(pipe, NULL, samples, len, a, len, NULL, NULL), ED_ERR_NULL, "req");
    EXPECT_ERR(ed_generate(pipe, &req, NULL, len, NULL, len, NULL, NULL), ED_ERR_NULL, "nothing");
    EXPECT_ERR(ed_generate(pipe, &req, samples, len - 1, a, len, NULL, NULL),
               ED_ERR_BUFFER_TOO_SMALL, "needs 1024");
    EXPECT_ERR(ed_generate(pipe, &req, NULL, 0, a, 10, NULL, NULL), ED_ERR_BUFFER_TOO_SMALL,
               "pixels");
    req.num_images = 2;
    EXPECT_ERR(ed_generate(pipe, &req, samples, len, NULL, 0, NULL, NULL),
               ED_ERR_BUFFER_TOO_SMALL, "needs 2048");
    req.num_images = 1;
    EXPECT_ERR(ed_generate(pipe, &req, (float *)((char *)samples + 1), len, NULL, 0, NULL, NULL),
               ED_ERR_INVALID_ARGUMENT, "aligned");

    /* Conditioning inputs: the student has none, so a value is refused by name at generation,
     * and clearing it restores the card's (empty) set. */
    float difficulty = 0.25f;
    EXPECT(ed_set_conditioning(pipe, "difficulty", &difficulty, 1) == ED_OK);
    EXPECT_ERR(ed_generate(pipe, &req, samples, len, NULL, 0, NULL, NULL), ED_ERR_CONFIG, "difficulty");
    EXPECT(ed_set_conditioning(pipe, "difficulty", NULL, 0) == ED_OK);
    EXPECT(ed_generate(pipe, &req, samples, len, NULL, 0, NULL, NULL) == ED_OK);
    EXPECT_ERR(ed_set_conditioning(pipe, "difficulty", NULL, 1), ED_ERR_NULL, "values");
    EXPECT_ERR(ed_set_conditioning(NULL, "difficulty", &difficulty, 1), ED_ERR_NULL, "pipe");

    /* Bad request values. */
    req.sampler = "nope";
    EXPECT_ERR(ed_generate(pipe, &req, samples, len, a, len, NULL, NULL), ED_ERR_CONFIG, "nope");
    req.sampler = NULL;
    int64_t bad_label = 99;
    req.classes = &bad_label;
    EXPECT_ERR(ed_generate(pipe, &req, samples, len, a, len, NULL, NULL), ED_ERR_CONFIG, "99");
    req.classes = NULL;
    EXPECT_ERR(ed_generate(pipe, &req, samples, len, a, len, NULL, NULL), ED_ERR_NULL, "classes");
    req.classes = &label;
    req.guidance = NAN;
    EXPECT_ERR(ed_generate(pipe, &req, samples, len, a, len, NULL, NULL), ED_ERR_CONFIG, "guidance");
    req.guidance = -1;

    /* Cancelling from the callback, then the pipeline still works. */
    struct counter cnt = {0, 1, 0};
    EXPECT_ERR(ed_generate(pipe, &req, samples, len, a, len, on_step, &cnt), ED_ERR_CANCELLED,
               "cancelled at step 1");
    EXPECT(cnt.calls == 1);
    cnt = (struct counter){0, 0, 0};
    EXPECT(ed_generate(pipe, &req, samples, len, a, len, on_step, &cnt) == ED_OK);
    EXPECT(cnt.calls == 2 && cnt.last_total == 2); /* the card's default: lcm, 2 steps */

    /* Same seed, same bytes; pixels alone equal pixels with samples. */
    EXPECT(ed_generate(pipe, &req, NULL, 0, b, len, NULL, NULL) == ED_OK);
    EXPECT(memcmp(a, b, len) == 0);

    /* Image i of a batch is image i's stream: image 0 of [sneaker, t-shirt] is the one above. */
    int64_t two[2] = {7, 0};
    req.classes = two;
    req.num_classes = 2;
    req.num_images = 2;
    EXPECT(ed_generate(pipe, &req, NULL, 0, b, 2 * len, NULL, NULL) == ED_OK);
    EXPECT(memcmp(a, b, len) == 0 && memcmp(a, b + len, len) != 0);
    req.classes = &label;
    req.num_classes = 1;
    req.num_images = 1;

    /* Image-to-image from the image above, with previews: strength 0.5 of 4 DDIM steps runs 2,
     * each previewed; 0.1 runs none and says which strength would. */
    struct counter pv = {0, 0, 0};
    float *init = malloc(len * sizeof *init);
    memcpy(init, samples, len * sizeof *init);
    req.init = init;
    req.strength = 0.5f;
    req.steps = 4;
    req.sampler = "ddim";
    req.preview_every = 1;
    req.on_preview = on_preview;
    req.preview_user_data = &pv;
    EXPECT(ed_generate(pipe, &req, NULL, 0, b, len, NULL, NULL) == ED_OK);
    EXPECT(pv.calls == 2 && pv.last_total == 2);
    EXPECT(memcmp(a, b, len) != 0);
    req.strength = 0.1f;
    EXPECT_ERR(ed_generate(pipe, &req, NULL, 0, b, len, NULL, NULL), ED_ERR_CONFIG, "strength");
    /* From a given noise level instead: Euler runs all 4 steps down from it; DDIM cannot. */
    req.strength = -1;
    req.init_sigma = 2.0f;
    EXPECT_ERR(ed_generate(pipe, &req, NULL, 0, b, len, NULL, NULL), ED_ERR_CONFIG, "init-sigma");
    req.sampler = "euler";
    pv.calls = 0;
    EXPECT(ed_generate(pipe, &req, NULL, 0, b, len, NULL, NULL) == ED_OK);
    EXPECT(pv.calls == 4 && pv.last_total == 4);
    req.init_sigma = 0;
    req.sampler = "ddim";
    /* Inpainting: a mask that keeps everything gives back the init's pixels. */
    float *keep = calloc(len, sizeof *keep);
    req.strength = -1;
    req.mask = keep;
    req.on_preview = NULL;
    EXPECT(ed_generate(pipe, &req, NULL, 0, b, len, NULL, NULL) == ED_OK);
    EXPECT(memcmp(a, b, len) == 0);
    free(keep);
    free(init);
    req.init = NULL;
    req.mask = NULL;
    req.preview_every = 0;
    req.steps = 0;
    req.sampler = NULL;

    /* The in-memory route gives the same image. */
    size_t card_len = 0, onnx_len = 0;
    char *card = read_file(dir, "model.toml", &card_len, 1);
    uint8_t *onnx = read_file(dir, "denoiser.onnx", &onnx_len, 0);
    EXPECT(card != NULL && onnx != NULL);
    if (card && onnx) {
        ed_pipeline *mem = NULL;
        EXPECT_ERR(ed_pipeline_open_bytes(card, NULL, onnx_len, 1, &mem), ED_ERR_NULL, "onnx");
        EXPECT_ERR(ed_pipeline_open_bytes(NULL, onnx, onnx_len, 1, &mem), ED_ERR_NULL, "card_toml");
        EXPECT_ERR(ed_pipeline_open_bytes(card, onnx, 100, 1, &mem), ED_ERR_MODEL, "ONNX");
        EXPECT_ERR(ed_pipeline_open_bytes("[model]\n", onnx, onnx_len, 1, &mem), ED_ERR_CARD,
                   "model.toml");
        EXPECT(mem == NULL);
        EXPECT(ed_pipeline_open_bytes(card, onnx, onnx_len, 1, &mem) == ED_OK && mem != NULL);
        free(onnx); /* read during the call only */
        if (mem) {
            memset(b, 0, len);
            EXPECT(ed_generate(mem, &req, NULL, 0, b, len, NULL, NULL) == ED_OK);
            EXPECT(memcmp(a, b, len) == 0);
            ed_pipeline_free(mem);
        }
    }
    free(card);

    ed_pipeline_free(NULL);
    ed_pipeline_free(pipe);
    free(samples);
    free(a);
    free(b);
    printf("selftest: %d of %d checks passed\n", checks - failures, checks);
    return failures ? 1 : 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "--selftest") == 0) return selftest(argv[2]);
    if (argc == 5 || argc == 6)
        return generate_one(argv[1], strtoull(argv[2], NULL, 10), argv[3], argv[4],
                            argc == 6 ? argv[5] : NULL);
    fprintf(stderr, "usage: %s MODEL_DIR SEED CLASS OUT.pgm [OUT.f32]\n       %s --selftest MODEL_DIR\n",
            argv[0], argv[0]);
    return 2;
}
