/*
 * edge_diffuse.h: the C API of edge-diffuse, few-step diffusion sampling on small devices.
 *
 * Build the library (cargo feature "capi"):
 *   cargo rustc --release --lib --features capi --crate-type staticlib,cdylib
 * which writes target/release/libedge_diffuse.a and libedge_diffuse.so. Link the static one with
 *   cc app.c -I include target/release/libedge_diffuse.a -lpthread -ldl -lm -Wl,-z,noexecstack
 *
 * Use: open a pipeline once, then for every image fill an ed_request and call ed_generate with
 * buffers you own. After the first call, calls of the same size do not grow the heap (the engine
 * allocates temporaries inside each call and frees them again).
 *
 * Every function that can fail returns an ed_status; ED_OK is 0. On failure ed_last_error()
 * holds a one-line message naming the argument, file or field at fault. NULL pointers and
 * short buffers are reported as errors, never dereferenced. A pipeline may move between
 * threads but must not be used by two threads at once.
 *
 * Hand-written; tests/capi.rs compiles examples/c/main.c against it and the library.
 */
#ifndef EDGE_DIFFUSE_H
#define EDGE_DIFFUSE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Result of every fallible call. */
typedef enum ed_status {
    ED_OK = 0,
    ED_ERR_NULL = 1,             /* a required pointer was NULL */
    ED_ERR_BUFFER_TOO_SMALL = 2, /* an output buffer is short; the message names the size needed */
    ED_ERR_INVALID_ARGUMENT = 3, /* not UTF-8, misaligned buffer, wrong sizeof(ed_request) */
    ED_ERR_CANCELLED = 4,        /* the step callback returned nonzero */
    ED_ERR_IO = 5,               /* a file could not be read */
    ED_ERR_CARD = 6,             /* the model card (model.toml, or a folder's configs or tokenizer) is not valid */
    ED_ERR_MODEL = 7,            /* the ONNX model could not be loaded or does not fit its card */
    ED_ERR_CONFIG = 8,           /* a request value is out of range (sampler, steps, class, guidance, eta) */
    ED_ERR_TENSOR = 9,           /* a tensor has the wrong shape or values */
    ED_ERR_INFERENCE = 10,       /* the inference engine failed */
    ED_ERR_NON_FINITE = 11,      /* the denoiser produced NaN or Inf */
    ED_ERR_PANIC = 12            /* a bug in edge-diffuse, caught at the boundary: free the pipeline */
} ed_status;

/* A loaded model (opaque). */
typedef struct ed_pipeline ed_pipeline;

/* What to generate. Fill it with ed_request_init(&req, sizeof req), then set fields. */
typedef struct ed_request {
    uint64_t seed;          /* image i reads noise stream i of this seed (same as the CLI) */
    uint32_t num_images;    /* 0 means 1 */
    uint32_t steps;         /* 0: the card's default */
    const int64_t *classes; /* one label for all images or one per image (cycled); */
    size_t num_classes;     /*   0 (classes may be NULL): the card's null class */
    float guidance;         /* classifier-free guidance scale; negative: the card's default */
    float eta;              /* DDIM's eta; negative: the card's default */
    const char *sampler;    /* "lcm", "ddim", ...; NULL: the card's default */
    /* Image-to-image: images to start from, float [init_images][channels][height][width] in the
     * output's value range (a latent model encodes them with its VAE encoder); NULL: none. */
    const float *init;
    uint32_t init_images;   /* 1 (for every image) or num_images */
    float strength;         /* (0, 1]: the last int(steps * strength) steps run; negative: 0.8,
                             * or 1 with a mask */
    float init_sigma;       /* image-to-image from this sigma instead of a strength (the
                             * sigma-space samplers); 0: none */
    /* Inpainting, with init: float [mask_images][height][width] in [0, 1], 1 = draw anew. An
     * inpainting model's masked image is made from init and mask (and encoded). */
    const float *mask;
    uint32_t mask_images;   /* 1 (for every image) or num_images */
    uint32_t preview_every; /* every this many steps and at the last, on_preview gets x0; 0: never */
    /* The image the model predicts at that step (x0), len floats as one output image
     * ([channels][height][width], value range), valid during the call. Nonzero cancels. */
    int (*on_preview)(void *user_data, uint32_t image, uint32_t step, uint32_t total,
                      const float *preview, size_t len);
    void *preview_user_data;
} ed_request;

/* Runs after every model call: image index, 1-based step, steps per image, the step's time.
 * Return nonzero to cancel the run (ed_generate then returns ED_ERR_CANCELLED). */
typedef int (*ed_step_fn)(void *user_data, uint32_t image, uint32_t step, uint32_t total,
                          double elapsed_ms);

/* The library version, e.g. "0.1.0" (static). */
const char *ed_version(void);

/* The message of the last failed call on this thread ("" if none). Valid until the next
 * failing call on the same thread. */
const char *ed_last_error(void);

/* Loads a model directory (model.toml + ONNX file). threads: tract's threads, 0 = all cores.
 * *out is the new pipeline, or NULL on failure. */
ed_status ed_pipeline_open(const char *model_dir, uint32_t threads, ed_pipeline **out);

/* ed_pipeline_open, with the plan file of packed weights where plan_cache says: NULL or "auto"
 * (beside the ONNX file when its folder is writable, else $XDG_CACHE_HOME/edge-diffuse), "off"
 * (weights packed on the heap at every load) or a folder. Later loads map the file: the
 * weights cost no anonymous memory. weights: NULL or "f32", or "f16" (packed weights in half
 * the bytes, widened to f32 as the kernels read them). */
ed_status ed_pipeline_open_with(const char *model_dir, uint32_t threads, const char *plan_cache,
                                const char *weights, ed_pipeline **out);

/* Loads a model held in memory: the text of its model.toml and the ONNX bytes (read during
 * the call only, e.g. linked into the firmware). */
ed_status ed_pipeline_open_bytes(const char *card_toml, const uint8_t *onnx, size_t onnx_len,
                                 uint32_t threads, ed_pipeline **out);

/* Frees a pipeline; NULL is ignored. */
void ed_pipeline_free(ed_pipeline *pipe);

/* The size of one generated image. */
ed_status ed_image_info(const ed_pipeline *pipe, uint32_t *width, uint32_t *height,
                        uint32_t *channels);

/* Fills *req with the defaults: seed 0, one image, the card's sampler, steps, guidance and
 * eta, the null class. req_size must be sizeof(ed_request) (guards against a header from
 * another version: ED_ERR_INVALID_ARGUMENT). */
ed_status ed_request_init(ed_request *req, size_t req_size);

/* Resolves a class name ("sneaker") or number ("7") to its label. */
ed_status ed_class_label(const ed_pipeline *pipe, const char *name, int64_t *label);

/* Sets the values of the card's conditioning input `name` ([model.conditioning.NAME]) for the
 * following ed_generate calls: count floats, one image's values or rows of them cycled over the
 * images (as --cond). count 0 goes back to the card's default. An unknown name or values of the
 * wrong size are reported by the next ed_generate (ED_ERR_CONFIG, ED_ERR_TENSOR). */
ed_status ed_set_conditioning(ed_pipeline *pipe, const char *name, const float *values, size_t count);

/* The buffer length ed_generate needs for req: images * width * height * channels
 * (floats for samples, bytes for pixels). */
ed_status ed_output_len(const ed_pipeline *pipe, const ed_request *req, size_t *len);

/* Generates the images of req into the caller's buffers:
 *   samples: float [images][channels][height][width], in the card's value range;
 *   pixels:  uint8 [images][height][width][channels], channels interleaved (PGM/PPM order).
 * Either may be NULL when not wanted, not both; each given one must hold ed_output_len values,
 * else ED_ERR_BUFFER_TOO_SMALL before any work. on_step may be NULL. The pipeline stays usable
 * after any error but ED_ERR_PANIC. on_step must not call ed_generate on the same pipeline. */
ed_status ed_generate(ed_pipeline *pipe, const ed_request *req, float *samples,
                      size_t samples_len, uint8_t *pixels, size_t pixels_len, ed_step_fn on_step,
                      void *user_data);

#ifdef __cplusplus
}
#endif

#endif /* EDGE_DIFFUSE_H */
