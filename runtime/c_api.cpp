// The C API (include/deft/deft_c.h) over the C++ API: exceptions become -1 + a thread-local
// message.
#include <cstring>
#include <string>

#include "deft/deft.hpp"
#include "deft/deft_c.h"

struct deft_kernel {
  deft::Kernel kernel;
  std::string variant_text;
};

namespace {

thread_local std::string g_error;

template <typename F>
int guarded(F&& f) {
  try {
    g_error.clear();
    f();
    return 0;
  } catch (const std::exception& e) {
    g_error = e.what();
  } catch (...) {
    g_error = "unknown error";
  }
  return -1;
}

}  // namespace

extern "C" {

const char* deft_version(void) { return deft::version(); }
const char* deft_last_error(void) { return g_error.c_str(); }
int deft_gpu_available(void) { return deft::gpu_available() ? 1 : 0; }

int deft_workspace_bytes(uint64_t* reserved, uint64_t* used) {
  return guarded([&] {
    const deft::WorkspaceStats s = deft::workspace_stats();
    if (reserved) *reserved = s.reserved_bytes;
    if (used) *used = s.used_bytes;
  });
}

int deft_release_workspace(void) {
  return guarded([] { deft::release_workspace(); });
}

int deft_canonical(const char* desc, char* buf, int64_t cap) {
  return guarded([&] {
    if (!desc || !buf || cap < 1) throw deft::Error("deft_canonical: null argument");
    std::string s = deft::to_string(deft::parse_layer_desc(desc));
    if ((int64_t)s.size() + 1 > cap) throw deft::Error("deft_canonical: buffer too small");
    std::memcpy(buf, s.c_str(), s.size() + 1);
  });
}

int deft_compile(const char* desc, const char* variant, const char* cache_path,
                 deft_kernel** out) {
  return deft_compile_ex(desc, variant, cache_path, nullptr, nullptr, 0, out);
}

int deft_compile_ex(const char* desc, const char* variant, const char* cache_path,
                    const char* backward_data_variant, const char* backward_weight_variant,
                    int deterministic, deft_kernel** out) {
  return guarded([&] {
    if (!desc || !out) throw deft::Error("deft_compile: null argument");
    deft::CompileOptions o;
    if (variant && *variant) o.variant = deft::parse_variant(variant);
    if (cache_path) o.cache_path = std::string(cache_path);
    if (backward_data_variant && *backward_data_variant)
      o.backward_data_variant = deft::parse_variant(backward_data_variant);
    if (backward_weight_variant && *backward_weight_variant)
      o.backward_weight_variant = deft::parse_variant(backward_weight_variant);
    o.deterministic = deterministic != 0;
    auto k = std::make_unique<deft_kernel>();
    k->kernel = deft::compile(deft::parse_layer_desc(desc), o);
    k->variant_text = deft::to_string(k->kernel.variant());
    *out = k.release();
  });
}

int deft_forward(const deft_kernel* k, const void* input, const void* offset, const void* mask,
                 const void* weight, const void* bias, void* output, void* stream) {
  return guarded([&] {
    if (!k) throw deft::Error("deft_forward: null kernel");
    deft::ForwardArgs a;
    a.input = input;
    a.offset = offset;
    a.mask = mask;
    a.weight = weight;
    a.bias = bias;
    a.output = output;
    k->kernel.forward(a, static_cast<CUstream>(stream));
  });
}

int deft_backward(const deft_kernel* k, const void* input, const void* offset, const void* mask,
                  const void* weight, const void* grad_output, void* grad_input,
                  void* grad_offset, void* grad_mask, void* grad_weight, void* grad_bias,
                  int deterministic, void* stream) {
  return guarded([&] {
    if (!k) throw deft::Error("deft_backward: null kernel");
    deft::BackwardArgs a;
    a.input = input;
    a.offset = offset;
    a.mask = mask;
    a.weight = weight;
    a.grad_output = grad_output;
    a.grad_input = grad_input;
    a.grad_offset = grad_offset;
    a.grad_mask = grad_mask;
    a.grad_weight = grad_weight;
    a.grad_bias = grad_bias;
    k->kernel.backward(a, static_cast<CUstream>(stream), deterministic < 0 ? -1 : (deterministic ? 1 : 0));
  });
}

const char* deft_kernel_variant(const deft_kernel* k) { return k ? k->variant_text.c_str() : ""; }
int deft_kernel_from_cache(const deft_kernel* k) {
  return k && k->kernel.info().from_cache ? 1 : 0;
}
void deft_kernel_release(deft_kernel* k) { delete k; }

int64_t deft_nvrtc_compiles(void) { return deft::stats().nvrtc_compiles; }
int64_t deft_cache_hits(void) { return deft::stats().cache_hits; }

}  // extern "C"
