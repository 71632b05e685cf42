/* Deconvolves a raw volume with an RLN model through the C API (capi/include/rln_engine.h).
 *
 *   deconvolve MODEL.safetensors IN.u16 OUT.f32 NZ NY NX [cpu|auto|cuda]
 *
 * IN is NZ*NY*NX little-endian uint16 samples in z,y,x order (what cameras give); OUT
 * receives float32 samples in the same order. Build (from the repository root, after
 * `cargo build --release -p rln-engine-capi`):
 *
 *   cc -O2 examples/c/deconvolve.c -Icapi/include target/release/librln_engine_capi.a \
 *      -lstdc++ -lpthread -ldl -lm -o deconvolve
 */
#include "rln_engine.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int fail(const char *what) {
    fprintf(stderr, "error: %s: %s\n", what, rln_last_error());
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 7) {
        fprintf(stderr, "usage: %s MODEL IN.u16 OUT.f32 NZ NY NX [cpu|auto|cuda]\n", argv[0]);
        return 2;
    }
    size_t shape[3] = {strtoul(argv[4], NULL, 10), strtoul(argv[5], NULL, 10), strtoul(argv[6], NULL, 10)};
    size_t n = shape[0] * shape[1] * shape[2];
    uint32_t device = RLN_DEVICE_CPU;
    if (argc > 7 && strcmp(argv[7], "auto") == 0) device = RLN_DEVICE_AUTO;
    if (argc > 7 && strcmp(argv[7], "cuda") == 0) device = RLN_DEVICE_CUDA;

    uint16_t *raw = malloc(n * sizeof *raw);
    float *restored = malloc(n * sizeof *restored);
    FILE *f = fopen(argv[2], "rb");
    if (!raw || !restored || !f || fread(raw, sizeof *raw, n, f) != n) {
        fprintf(stderr, "error: cannot read %zu samples from %s\n", n, argv[2]);
        return 1;
    }
    fclose(f);

    RlnModel *model = NULL;
    RlnEngine *engine = NULL;
    if (rln_model_open(argv[1], &model) != RLN_STATUS_OK) return fail("opening the model");
    if (rln_engine_open(model, device, 0, false, &engine) != RLN_STATUS_OK) return fail("opening the engine");
    fprintf(stderr, "deconvolving %zux%zux%zu on %s\n", shape[0], shape[1], shape[2], rln_engine_describe(engine));

    /* strides {0,0,0}: C order */
    RlnBuffer in = {raw, RLN_DTYPE_U16, {shape[0], shape[1], shape[2]}, {0, 0, 0}};
    RlnBuffer out = {restored, RLN_DTYPE_F32, {shape[0], shape[1], shape[2]}, {0, 0, 0}};
    if (rln_engine_deconvolve(engine, &in, &out) != RLN_STATUS_OK) return fail("deconvolving");

    /* written under a temporary name and renamed, so a failure leaves no partial OUT */
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.partial", argv[3]);
    f = fopen(tmp, "wb");
    if (!f || fwrite(restored, sizeof *restored, n, f) != n || fclose(f) != 0 || rename(tmp, argv[3]) != 0) {
        fprintf(stderr, "error: cannot write %s\n", argv[3]);
        remove(tmp);
        return 1;
    }
    rln_engine_free(engine);
    rln_model_free(model);
    free(raw);
    free(restored);
    return 0;
}
