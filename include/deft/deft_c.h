/* deft C API: what the Python package (ctypes) and other languages call. Every function returns
 * 0 on success or -1 on error; deft_last_error() then gives the message (thread-local). */
#ifndef DEFT_C_H
#define DEFT_C_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct deft_kernel deft_kernel;

/* Library version, e.g. "0.1.0". */
const char* deft_version(void);
/* Message of the last failed call on this thread ("" if none). */
const char* deft_last_error(void);
/* 1 when a CUDA driver and device are present. */
int deft_gpu_available(void);

/* Normalises a description: writes the canonical text form into buf (size cap). Fails with a
 * message naming the field for an invalid description. */
int deft_canonical(const char* desc, char* buf, int64_t cap);

/* Compiles (or loads from the cache) the kernel for `desc` in the current CUDA context.
 * variant: NULL for the tuned/heuristic choice, or a variant text form.
 * cache_path: NULL for the default database, "" for none. */
int deft_compile(const char* desc, const char* variant, const char* cache_path,
                 deft_kernel** out);
/* deft_compile with the backward passes' variants chosen too (NULL: tuned/heuristic), and
 * the default of deft_backward's deterministic=-1 (0 or 1). */
int deft_compile_ex(const char* desc, const char* variant, const char* cache_path,
                    const char* backward_data_variant, const char* backward_weight_variant,
                    int deterministic, deft_kernel** out);
/* Launches forward on `stream` (a cudaStream_t; NULL = legacy default stream). mask and bias
 * may be NULL when the description has none. */
int deft_forward(const deft_kernel* k, const void* input, const void* offset, const void* mask,
                 const void* weight, const void* bias, void* output, void* stream);
/* Gradients of forward (see deft::BackwardArgs in deft.hpp): any grad_* pointer may be NULL to
 * skip that gradient. deterministic: 1 bitwise-reproducible, 0 fast (float atomics for grad
 * input), -1 as compiled. The backward kernels compile (or load from the cache) on first use. */
int deft_backward(const deft_kernel* k, const void* input, const void* offset, const void* mask,
                  const void* weight, const void* grad_output, void* grad_input,
                  void* grad_offset, void* grad_mask, void* grad_weight, void* grad_bias,
                  int deterministic, void* stream);
/* The variant text of a compiled kernel (valid while the kernel lives). */
const char* deft_kernel_variant(const deft_kernel* k);
/* 1 when the kernel's cubin came from the database. */
int deft_kernel_from_cache(const deft_kernel* k);
void deft_kernel_release(deft_kernel* k);

/* Workspace memory (the per-call scratch of forward and backward) comes from a per-device pool
 * that keeps freed memory for the next call: the bytes it holds and of those in use, summed
 * over devices; and returning the unused part to the driver. */
int deft_workspace_bytes(uint64_t* reserved, uint64_t* used);
int deft_release_workspace(void);

/* Counters: NVRTC compiles and cache hits in this process. */
int64_t deft_nvrtc_compiles(void);
int64_t deft_cache_hits(void);

#ifdef __cplusplus
}
#endif

#endif /* DEFT_C_H */
