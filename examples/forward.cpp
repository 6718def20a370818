// examples/forward.cpp: deft end to end in one page.
//
//   deft_example_forward ["deform_conv2d n=2 c=64 h=28 w=28 k=64 r=3 s=3 pad=1 ..."]
//
// 1. Describe a layer: the canonical text form from argv[1], or a default DCNv2 layer.
// 2. Compile it with deft::compile (NVRTC on first use, then the on-disk cubin cache).
// 3. Run it on random data, on a CUDA stream we own, through the CUDA runtime.
// 4. Compare with the double-precision CPU reference (reference/deform_conv_ref.hpp) and
//    print the relative L2 error and PASS or FAIL.
// Exit status: 0 on PASS, and also without a GPU (after printing the description); 1 on FAIL
// or on any error.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "deft/deft.hpp"
#include "reference/deform_conv_ref.hpp"

namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

// A DCNv2 layer as found in detection backbones: 3x3, modulation mask, 4 offset groups.
deft::LayerDesc default_layer() {
  deft::LayerDesc d;
  d.n = 2, d.c = 64, d.h = 28, d.w = 28, d.k = 64;
  d.r = d.s = 3, d.pad_h = d.pad_w = 1;
  d.offset_groups = 4, d.mask = true;
  d.bias = true, d.act = deft::Activation::relu;
  return d;
}

// Host data is kept in double; these move it to and from the layer's storage type. The
// random data is rounded to that type first, so the reference sees exactly what the GPU sees.
double round_to(double v, deft::DType t) {
  switch (t) {
    case deft::DType::f64: return v;
    case deft::DType::f32: return (float)v;
    case deft::DType::f16: return __half2float(__float2half_rn((float)v));
    case deft::DType::bf16: return __bfloat162float(__float2bfloat16_rn((float)v));
  }
  return v;
}

std::vector<char> to_bytes(const std::vector<double>& v, deft::DType t) {
  std::vector<char> out(v.size() * deft::dtype_size(t));
  for (size_t i = 0; i < v.size(); ++i) {
    char* p = out.data() + i * deft::dtype_size(t);
    switch (t) {
      case deft::DType::f64: std::memcpy(p, &v[i], 8); break;
      case deft::DType::f32: { float f = (float)v[i]; std::memcpy(p, &f, 4); break; }
      case deft::DType::f16: { __half h = __float2half_rn((float)v[i]); std::memcpy(p, &h, 2); break; }
      case deft::DType::bf16: { __nv_bfloat16 b = __float2bfloat16_rn((float)v[i]); std::memcpy(p, &b, 2); break; }
    }
  }
  return out;
}

std::vector<double> from_bytes(const std::vector<char>& bytes, deft::DType t) {
  std::vector<double> out(bytes.size() / deft::dtype_size(t));
  for (size_t i = 0; i < out.size(); ++i) {
    const char* p = bytes.data() + i * deft::dtype_size(t);
    switch (t) {
      case deft::DType::f64: std::memcpy(&out[i], p, 8); break;
      case deft::DType::f32: { float f; std::memcpy(&f, p, 4); out[i] = f; break; }
      case deft::DType::f16: { __half h; std::memcpy(&h, p, 2); out[i] = __half2float(h); break; }
      case deft::DType::bf16: { __nv_bfloat16 b; std::memcpy(&b, p, 2); out[i] = __bfloat162float(b); break; }
    }
  }
  return out;
}

// A device copy of a host tensor; freed at scope exit.
struct DeviceTensor {
  void* ptr = nullptr;
  DeviceTensor(const std::vector<double>& host, deft::DType t) {
    const std::vector<char> bytes = to_bytes(host, t);
    if (bytes.empty()) return;
    check(cudaMalloc(&ptr, bytes.size()), "cudaMalloc");
    check(cudaMemcpy(ptr, bytes.data(), bytes.size(), cudaMemcpyHostToDevice), "cudaMemcpy");
  }
  ~DeviceTensor() { if (ptr) cudaFree(ptr); }
  DeviceTensor(const DeviceTensor&) = delete;
  DeviceTensor& operator=(const DeviceTensor&) = delete;
};

int64_t count(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t e : shape) n *= e;
  return n;
}

int run(int argc, char** argv) {
  // 1. The layer.
  const deft::LayerDesc d = argc > 1 ? deft::parse_layer_desc(argv[1]) : default_layer();
  deft::validate(d);
  std::printf("layer:   %s\n", deft::to_string(d).c_str());
  if (!deft::gpu_available()) {
    std::printf("no CUDA driver or GPU on this machine: deft::compile needs one to load the "
                "kernel (the deft CLI can still compile offline for an explicit sm_XY).\n");
    return 0;
  }

  // 2. Compile (or fetch from the cache).
  const deft::Kernel kernel = deft::compile(d);
  const deft::CompileInfo& info = kernel.info();
  std::printf("kernel:  %s (sm_%d)\n", info.kernel_name.c_str(), info.arch);
  std::printf("variant: %s\n", deft::to_string(kernel.variant()).c_str());
  std::printf("source:  %s, %.3f s\n", info.from_cache ? "cubin cache" : "NVRTC compile",
              info.compile_seconds);

  // 3. Random data: input, weight, bias in [-1, 1], offsets ~ N(0, 2^2) px, mask in (0, 1).
  const deft::TensorShapes shapes = deft::tensor_shapes(d);
  std::mt19937_64 rng(42);
  std::uniform_real_distribution<double> sym(-1, 1), unit(0, 1);
  std::normal_distribution<double> px(0, 2);
  auto make = [&](int64_t n, auto& dist) {
    std::vector<double> v(n);
    for (double& x : v) x = round_to(dist(rng), d.dtype);
    return v;
  };
  const std::vector<double> input = make(count(shapes.input), sym);
  const std::vector<double> offset = make(count(shapes.offset), px);
  const std::vector<double> mask = d.mask ? make(count(shapes.mask), unit) : std::vector<double>();
  const std::vector<double> weight = make(count(shapes.weight), sym);
  const std::vector<double> bias = d.bias ? make(count(shapes.bias), sym) : std::vector<double>();
  const int64_t out_count = count(shapes.output);

  DeviceTensor d_input(input, d.dtype), d_offset(offset, d.dtype), d_mask(mask, d.dtype),
      d_weight(weight, d.dtype), d_bias(bias, d.dtype),
      d_output(std::vector<double>(out_count), d.dtype);

  cudaStream_t stream;
  check(cudaStreamCreate(&stream), "cudaStreamCreate");
  kernel.forward({.input = d_input.ptr,
                  .offset = d_offset.ptr,
                  .mask = d_mask.ptr,
                  .weight = d_weight.ptr,
                  .bias = d_bias.ptr,
                  .output = d_output.ptr},
                 reinterpret_cast<CUstream>(stream));
  check(cudaStreamSynchronize(stream), "kernel");
  check(cudaStreamDestroy(stream), "cudaStreamDestroy");

  std::vector<char> bytes(out_count * deft::dtype_size(d.dtype));
  check(cudaMemcpy(bytes.data(), d_output.ptr, bytes.size(), cudaMemcpyDeviceToHost), "cudaMemcpy");
  const std::vector<double> output = from_bytes(bytes, d.dtype);

  // 4. Compare with the reference.
  std::vector<double> ref(out_count);
  deft::ref::deform_conv2d_forward(d, input.data(), offset.data(), d.mask ? mask.data() : nullptr,
                                   weight.data(), d.bias ? bias.data() : nullptr, ref.data());
  double diff = 0, norm = 0;
  bool finite = true;
  for (int64_t i = 0; i < out_count; ++i) {
    finite = finite && std::isfinite(output[i]);
    diff += (output[i] - ref[i]) * (output[i] - ref[i]);
    norm += ref[i] * ref[i];
  }
  const double rel = finite ? std::sqrt(diff / (norm > 0 ? norm : 1)) : INFINITY;
  double tol = 1e-5;  // f32 and f64
  if (d.dtype == deft::DType::f16 || d.dtype == deft::DType::bf16) tol = 1e-2;
  if (d.dtype == deft::DType::f32 && d.math == deft::MathMode::tf32) tol = 5e-3;
  const bool pass = rel <= tol;
  std::printf("relative L2 error vs reference: %.3g (tolerance %.0e): %s\n", rel, tol,
              pass ? "PASS" : "FAIL");
  return pass ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const deft::DescError& e) {
    std::fprintf(stderr, "bad layer description (field %s): %s\n", e.field().c_str(), e.what());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
  }
  return 1;
}
