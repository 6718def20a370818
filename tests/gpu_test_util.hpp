// Helpers for GPU tests: skipping without a GPU, CUDA runtime error checks, RAII device
// memory and streams, host conversion of double data to and from the bit patterns of every
// deft dtype (our own round-to-nearest-even f16/bf16 code, independent of cuda_fp16.h), and
// the relative error that GPU tests compare against their tolerance.
//
// The CUDA runtime is linked statically (CUDA::cudart_static); it loads the driver lazily, so
// a test binary starts on a machine without one and GPU tests skip there.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <future>
#include <limits>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "deft/deft.hpp"

// Skips the current test (GoogleTest) when no CUDA driver or device is present.
#define DEFT_SKIP_WITHOUT_GPU()                                                          \
  do {                                                                                  \
    if (!deft::gpu_available())                                                         \
      GTEST_SKIP() << "no CUDA driver or device on this machine: GPU test skipped";     \
  } while (0)

// Throws std::runtime_error naming the failed CUDA runtime call (GoogleTest reports it).
#define DEFT_CUDA_CHECK(expr) ::deft::test::cuda_check((expr), #expr, __FILE__, __LINE__)

namespace deft::test {

inline void cuda_check(cudaError_t err, const char* what, const char* file, int line) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(file) + ":" + std::to_string(line) + ": " + what +
                             " failed: " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
}

// ---- device memory and streams --------------------------------------------------------------

// Owns one cudaMalloc allocation. Move-only.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
    if (bytes) DEFT_CUDA_CHECK(cudaMalloc(&ptr_, bytes));
  }
  // Allocates and copies `host` in.
  explicit DeviceBuffer(const std::vector<uint8_t>& host) : DeviceBuffer(host.size()) {
    upload(host);
  }
  DeviceBuffer(DeviceBuffer&& o) noexcept
      : ptr_(std::exchange(o.ptr_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      reset();
      ptr_ = std::exchange(o.ptr_, nullptr);
      bytes_ = std::exchange(o.bytes_, 0);
    }
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { reset(); }

  void* get() const { return ptr_; }
  size_t bytes() const { return bytes_; }

  void upload(const std::vector<uint8_t>& host) {
    if (host.size() != bytes_) throw std::runtime_error("DeviceBuffer::upload: size mismatch");
    if (bytes_) DEFT_CUDA_CHECK(cudaMemcpy(ptr_, host.data(), bytes_, cudaMemcpyHostToDevice));
  }
  std::vector<uint8_t> download() const {
    std::vector<uint8_t> host(bytes_);
    if (bytes_) DEFT_CUDA_CHECK(cudaMemcpy(host.data(), ptr_, bytes_, cudaMemcpyDeviceToHost));
    return host;
  }
  // Fills every byte; 0xFF makes every element NaN in f32, f16, bf16 and f64.
  void fill_bytes(int value) {
    if (bytes_) DEFT_CUDA_CHECK(cudaMemset(ptr_, value, bytes_));
  }

 private:
  void reset() {
    if (ptr_) cudaFree(ptr_);  // no throw from a destructor
    ptr_ = nullptr;
    bytes_ = 0;
  }
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// Owns one CUDA stream (a blocking one: it orders with the legacy default stream, on which
// cudaMemcpy / cudaMemset run).
// Compute capability of the current device as 10 * major + minor (0 without a GPU).
inline int device_arch() {
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
  return 10 * major + minor;
}

class Stream {
 public:
  Stream() { DEFT_CUDA_CHECK(cudaStreamCreate(&s_)); }
  ~Stream() {
    if (s_) cudaStreamDestroy(s_);
  }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  cudaStream_t get() const { return s_; }
  CUstream cu() const { return reinterpret_cast<CUstream>(s_); }
  void sync() const { DEFT_CUDA_CHECK(cudaStreamSynchronize(s_)); }

 private:
  cudaStream_t s_ = nullptr;
};

// ---- f16 / bf16 bit patterns (round to nearest, ties to even) -------------------------------

inline uint16_t float_to_half_bits(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return sign | 0x7e00u;  // NaN (quiet)
  if (ax == 0x7f800000u) return sign | 0x7c00u; // inf
  if (ax < 0x38800000u) {
    // |f| < 2^-14: a half subnormal (or zero), i.e. a multiple of 2^-24. Scaling by 2^24 is
    // exact and nearbyint rounds to nearest even; 1024 becomes the smallest normal, as wanted.
    const float units = std::nearbyint(std::bit_cast<float>(ax) * 16777216.0f);
    return sign | (uint16_t)units;
  }
  // Normal: drop 13 mantissa bits with round-to-nearest-even, then rebias the exponent
  // (127 -> 15). A carry out of the mantissa bumps the exponent, which is what rounding wants.
  const uint32_t rounded = ax + 0x0fffu + ((ax >> 13) & 1u);
  const uint32_t h = (rounded >> 13) - ((127u - 15u) << 10);
  return sign | (uint16_t)(h >= 0x7c00u ? 0x7c00u : h);  // overflow -> inf
}

inline double half_bits_to_double(uint16_t h) {
  const int sign = (h & 0x8000u) ? -1 : 1;
  const int exp = (h >> 10) & 0x1f;
  const int mant = h & 0x3ff;
  if (exp == 0x1f)
    return mant ? std::numeric_limits<double>::quiet_NaN()
                : sign * std::numeric_limits<double>::infinity();
  if (exp == 0) return sign * std::ldexp((double)mant, -24);
  return sign * std::ldexp((double)(1024 + mant), exp - 25);
}

inline uint16_t float_to_bfloat16_bits(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x0040u);  // quiet NaN
  // Round to nearest even on the upper 16 bits; overflow carries into inf naturally.
  return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

inline double bfloat16_bits_to_double(uint16_t b) {
  return (double)std::bit_cast<float>((uint32_t)b << 16);
}

// ---- double data <-> device bit patterns ----------------------------------------------------

// Bytes of `v` as contiguous elements of `t` (f16 / bf16 round through f32 first; tests quantize
// their data with quantize() beforehand, so the double rounding never matters).
inline std::vector<uint8_t> encode(const std::vector<double>& v, DType t) {
  std::vector<uint8_t> out(v.size() * (size_t)dtype_size(t));
  for (size_t i = 0; i < v.size(); ++i) {
    uint8_t* p = out.data() + i * (size_t)dtype_size(t);
    switch (t) {
      case DType::f64: std::memcpy(p, &v[i], 8); break;
      case DType::f32: { const float f = (float)v[i]; std::memcpy(p, &f, 4); break; }
      case DType::f16: { const uint16_t b = float_to_half_bits((float)v[i]); std::memcpy(p, &b, 2); break; }
      case DType::bf16: { const uint16_t b = float_to_bfloat16_bits((float)v[i]); std::memcpy(p, &b, 2); break; }
    }
  }
  return out;
}

// Elements of `t` in `bytes`, widened to double exactly.
inline std::vector<double> decode(const std::vector<uint8_t>& bytes, DType t) {
  const size_t es = (size_t)dtype_size(t);
  std::vector<double> out(bytes.size() / es);
  for (size_t i = 0; i < out.size(); ++i) {
    const uint8_t* p = bytes.data() + i * es;
    switch (t) {
      case DType::f64: std::memcpy(&out[i], p, 8); break;
      case DType::f32: { float f; std::memcpy(&f, p, 4); out[i] = f; break; }
      case DType::f16: { uint16_t b; std::memcpy(&b, p, 2); out[i] = half_bits_to_double(b); break; }
      case DType::bf16: { uint16_t b; std::memcpy(&b, p, 2); out[i] = bfloat16_bits_to_double(b); break; }
    }
  }
  return out;
}

// The value the device will see when `v` is stored as `t`.
inline double quantize(double v, DType t) {
  switch (t) {
    case DType::f64: return v;
    case DType::f32: return (double)(float)v;
    case DType::f16: return half_bits_to_double(float_to_half_bits((float)v));
    case DType::bf16: return bfloat16_bits_to_double(float_to_bfloat16_bits((float)v));
  }
  return v;
}

inline void quantize_in_place(std::vector<double>& v, DType t) {
  for (double& x : v) x = quantize(x, t);
}

// ---- comparison -----------------------------------------------------------------------------

inline int64_t count_nonfinite(const std::vector<double>& v) {
  int64_t n = 0;
  for (double x : v) n += !std::isfinite(x);
  return n;
}

// ||out - ref||_2 / ||ref||_2; +inf if any output is NaN or inf (or the sizes differ). With an
// all-zero reference it returns the absolute norm ||out||_2.
inline double relative_error(const std::vector<double>& out, const std::vector<double>& ref) {
  if (out.size() != ref.size() || count_nonfinite(out) != 0)
    return std::numeric_limits<double>::infinity();
  double diff = 0, norm = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    diff += (out[i] - ref[i]) * (out[i] - ref[i]);
    norm += ref[i] * ref[i];
  }
  return norm > 0 ? std::sqrt(diff / norm) : std::sqrt(diff);
}

// Compiles the variants of one layer on up to 16 threads at once (deft::compile is thread-safe
// and keeps each kernel in its in-process memo, so the test's later compile of the same
// (layer, variant, options) returns it without NVRTC). Compile errors surface in the later
// compile, where the test reports them with the variant.
inline std::vector<deft::Kernel> compile_in_parallel(const deft::LayerDesc& desc,
                                                     const std::vector<deft::Variant>& variants,
                                                     const deft::CompileOptions& options) {
  std::vector<deft::Kernel> out(variants.size());
  const size_t workers = std::max(1u, std::min(16u, std::thread::hardware_concurrency()));
  for (size_t first = 0; first < variants.size(); first += workers) {
    std::vector<std::future<void>> batch;
    for (size_t i = first; i < std::min(variants.size(), first + workers); ++i)
      batch.push_back(std::async(std::launch::async, [&, i] {
        deft::CompileOptions o = options;
        o.variant = variants[i];
        try {
          out[i] = deft::compile(desc, o);
        } catch (const std::exception&) {
        }
      }));
    for (auto& f : batch) f.wait();
  }
  return out;
}

}  // namespace deft::test
