// GPU correctness of the deform_conv2d backward passes against the double-precision CPU
// reference (which test_reference.cpp checks against finite differences): random descriptions
// over every dtype and layout in fast and deterministic mode, bitwise reproducibility,
// f64 gradients against finite differences, sampling points outside the image, on pixel
// boundaries, at huge and NaN positions, requested-gradient subsets and errors. Every GPU test
// skips without a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "compiler/plan.hpp"
#include "deft/deft.hpp"
#include "reference/deform_conv_ref.hpp"
#include "tests/gpu_test_util.hpp"

namespace {

using deft::DType;
using deft::LayerDesc;
using deft::Layout;
using namespace deft::test;

struct Tensors {
  std::vector<double> input, offset, mask, weight, gout;
};

enum Grad { kInput, kOffset, kMask, kWeight, kBias, kGrads };
const char* kGradName[kGrads] = {"grad_input", "grad_offset", "grad_mask", "grad_weight",
                                 "grad_bias"};

int64_t grad_size(const LayerDesc& d, int g) {
  const int64_t hw = d.out_h() * d.out_w();
  switch (g) {
    case kInput: return d.n * d.c * d.h * d.w;
    case kOffset: return d.n * 2 * d.offset_groups * d.taps() * hw;
    case kMask: return d.mask ? d.n * d.offset_groups * d.taps() * hw : 0;
    case kWeight: return d.k * d.c_per_group() * d.taps();
    default: return d.bias ? d.k : 0;
  }
}

// input, weight, grad_out uniform in [-1, 1]; offsets ~ N(0, sigma^2) px; mask uniform (0, 1).
Tensors random_tensors(const LayerDesc& d, double sigma, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> sym(-1.0, 1.0), unit(0.0, 1.0);
  std::normal_distribution<double> px(0.0, sigma);
  Tensors t;
  t.input.resize(grad_size(d, kInput));
  t.offset.resize(grad_size(d, kOffset));
  t.mask.resize(grad_size(d, kMask));
  t.weight.resize(grad_size(d, kWeight));
  t.gout.resize(d.n * d.k * d.out_h() * d.out_w());
  for (double& v : t.input) v = sym(rng);
  for (double& v : t.offset) v = px(rng);
  for (double& v : t.mask) v = unit(rng);
  for (double& v : t.weight) v = sym(rng);
  for (double& v : t.gout) v = sym(rng);
  return t;
}

double tolerance(const LayerDesc& d) {
  switch (d.dtype) {
    case DType::f32: return d.math == deft::MathMode::tf32 ? 5e-3 : 1e-5;
    case DType::f64: return 1e-10;
    default: return 2e-2;
  }
}

deft::CompileOptions test_options(bool det = false) {
  deft::CompileOptions o;
#ifdef DEFT_TEST_TMP
  std::filesystem::create_directories(DEFT_TEST_TMP);
  o.cache_path = std::string(DEFT_TEST_TMP) + "/gpu_backward.db";
#else
  o.cache_path = "";
#endif
  o.deterministic = det;
  return o;
}

constexpr size_t kGuard = 256;

struct GpuGrads {
  std::vector<double> g[kGrads];
  std::vector<std::vector<uint8_t>> raw;  // bytes as written (for bitwise comparisons)
};

// Runs the backward pass on the device with every requested gradient poisoned (0xFF) first and
// followed by a guard that must stay untouched. want[g] false: the pointer is null and the
// buffer must stay poisoned.
GpuGrads run_gpu(const LayerDesc& d, const Tensors& t, int det, std::array<bool, kGrads> want,
                 int repeats = 1, const deft::CompileOptions& options = test_options(),
                 bool graph = false) {
  const DType dt = d.dtype;
  DeviceBuffer input(encode(t.input, dt)), offset(encode(t.offset, dt)),
      mask(encode(t.mask, dt)), weight(encode(t.weight, dt)), gout(encode(t.gout, dt));
  std::vector<DeviceBuffer> out;
  for (int g = 0; g < kGrads; ++g) out.emplace_back(size_t(grad_size(d, g)) * dtype_size(dt) + kGuard);
  const deft::Kernel kernel = deft::compile(d, options);
  GpuGrads r;
  for (int rep = 0; rep < repeats; ++rep) {
    for (auto& b : out) b.fill_bytes(0xFF);
    DEFT_CUDA_CHECK(cudaDeviceSynchronize());
    Stream stream;
    auto ptr = [&](int g) { return want[g] && grad_size(d, g) > 0 ? out[g].get() : nullptr; };
    // graph: the call captured into a CUDA graph (global capture mode, as PyTorch's), then the
    // graph launched
    cudaGraph_t cg = nullptr;
    if (graph) DEFT_CUDA_CHECK(cudaStreamBeginCapture(stream.get(), cudaStreamCaptureModeGlobal));
    kernel.backward({.input = input.get(),
                     .offset = offset.get(),
                     .mask = d.mask ? mask.get() : nullptr,
                     .weight = weight.get(),
                     .grad_output = gout.get(),
                     .grad_input = ptr(kInput),
                     .grad_offset = ptr(kOffset),
                     .grad_mask = ptr(kMask),
                     .grad_weight = ptr(kWeight),
                     .grad_bias = ptr(kBias)},
                    stream.cu(), det);
    if (graph) {
      DEFT_CUDA_CHECK(cudaStreamEndCapture(stream.get(), &cg));
      cudaGraphExec_t exec = nullptr;
      DEFT_CUDA_CHECK(cudaGraphInstantiate(&exec, cg, 0));
      DEFT_CUDA_CHECK(cudaGraphLaunch(exec, stream.get()));
      stream.sync();
      DEFT_CUDA_CHECK(cudaGraphExecDestroy(exec));
      DEFT_CUDA_CHECK(cudaGraphDestroy(cg));
    }
    stream.sync();
    DEFT_CUDA_CHECK(cudaGetLastError());
  }
  for (int g = 0; g < kGrads; ++g) {
    std::vector<uint8_t> bytes = out[g].download();
    const size_t n = size_t(grad_size(d, g)) * dtype_size(dt);
    const bool requested = want[g] && grad_size(d, g) > 0;
    const auto tail_begin = bytes.begin() + (ptrdiff_t)(requested ? n : 0);
    EXPECT_TRUE(std::all_of(tail_begin, bytes.end(), [](uint8_t b) { return b == 0xFF; }))
        << kGradName[g] << ": written " << (requested ? "past its end" : "though not requested");
    bytes.resize(n);
    r.raw.push_back(bytes);
    if (requested) r.g[g] = decode(bytes, dt);
  }
  return r;
}

// Quantizes the inputs to the dtype, runs reference and device, compares every gradient.
void check_backward(const LayerDesc& d, Tensors t, int det,
                    const deft::CompileOptions& options = test_options()) {
  SCOPED_TRACE("desc: " + deft::to_string(d) + (det ? " (deterministic)" : ""));
  for (auto* v : {&t.input, &t.offset, &t.mask, &t.weight, &t.gout}) quantize_in_place(*v, d.dtype);
  std::vector<double> ref[kGrads];
  for (int g = 0; g < kGrads; ++g) ref[g].resize(grad_size(d, g));
  deft::ref::deform_conv2d_backward(d, t.input.data(), t.offset.data(),
                                    d.mask ? t.mask.data() : nullptr, t.weight.data(),
                                    t.gout.data(), ref[kInput].data(), ref[kOffset].data(),
                                    d.mask ? ref[kMask].data() : nullptr, ref[kWeight].data(),
                                    d.bias ? ref[kBias].data() : nullptr);
  const GpuGrads r = run_gpu(d, t, det, {true, true, true, true, true}, 1, options);
  for (int g = 0; g < kGrads; ++g) {
    if (grad_size(d, g) == 0) continue;
    SCOPED_TRACE(kGradName[g]);
    EXPECT_EQ(count_nonfinite(r.g[g]), 0) << "unwritten (poisoned) or non-finite elements";
    const double err = relative_error(r.g[g], ref[g]);
    EXPECT_LE(err, tolerance(d)) << "relative L2 error " << err;
  }
}

struct Case {
  std::string name;
  LayerDesc desc;
  double sigma;
  uint64_t seed;
};
void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

// 24 seeded random descriptions: dtype cycles (f32, f16, bf16, f64), layout alternates every
// four; geometry, groups, offset groups, mask and bias drawn at random; every third case has
// sigma = 8 px offsets (many points outside the image).
std::vector<Case> random_cases() {
  std::mt19937_64 rng(777);
  auto pick = [&](std::initializer_list<int> v) {
    return *(v.begin() + std::uniform_int_distribution<size_t>(0, v.size() - 1)(rng));
  };
  const std::pair<int, int> kernels[] = {{1, 1}, {3, 3}, {5, 5}, {3, 1}};
  std::vector<Case> cases;
  for (int i = 0; i < 24; ++i) {
    LayerDesc d;
    d.dtype = std::array{DType::f32, DType::f16, DType::bf16, DType::f64}[i % 4];
    if (i % 8 == 4) d.math = deft::MathMode::tf32;  // f32 on tensor cores
    d.layout = (i / 4) % 2 ? Layout::nhwc : Layout::nchw;
    d.n = pick({1, 2, 3});
    d.h = pick({7, 9, 12, 16});
    d.w = pick({6, 9, 13, 17});
    std::tie(d.r, d.s) = kernels[pick({0, 1, 1, 2, 3})];
    d.stride_h = pick({1, 2}), d.stride_w = pick({1, 2});
    d.pad_h = pick({0, 1, 2}), d.pad_w = pick({0, 1, 2});
    d.dil_h = pick({1, 2}), d.dil_w = pick({1, 2});
    d.groups = pick({1, 2, 4});
    d.c = d.groups * pick({1, 2, 3, 8, 12, 16, 48});
    d.k = d.groups * pick({1, 3, 8, 20});
    do d.offset_groups = pick({1, 2, 4});
    while (d.c % d.offset_groups != 0);
    d.mask = pick({0, 1});
    d.bias = pick({0, 1});
    if (d.out_h() < 1 || d.out_w() < 1) d.pad_h = d.pad_w = 2, d.dil_h = d.dil_w = 1;
    cases.push_back({"case" + std::to_string(i) + "_" +
                         std::string(d.math == deft::MathMode::tf32 ? "tf32" : deft::to_string(d.dtype)) +
                         "_" + std::string(deft::to_string(d.layout)),
                     d, i % 3 == 2 ? 8.0 : 2.0, 5000 + uint64_t(i)});
  }
  return cases;
}

LayerDesc make(int64_t n, int64_t c, int64_t h, int64_t w, int64_t k, int r, int pad, int groups,
               int og, DType dt, Layout layout) {
  LayerDesc d;
  d.n = n, d.c = c, d.h = h, d.w = w, d.k = k, d.r = d.s = r, d.pad_h = d.pad_w = pad;
  d.groups = groups, d.offset_groups = og, d.dtype = dt, d.layout = layout, d.mask = true;
  d.bias = true;
  return d;
}

// Shapes the draw may miss: depthwise, long channel loops (several channel steps per block,
// several k slices), wide k tiles, many weight splits.
std::vector<Case> fixed_cases() {
  std::vector<Case> v;
  v.push_back({"dcnv2_f32_nchw", make(2, 64, 12, 12, 48, 3, 1, 1, 1, DType::f32, Layout::nchw), 2.0, 1});
  v.push_back({"dcnv2_f16_nhwc", make(2, 64, 12, 12, 48, 3, 1, 1, 1, DType::f16, Layout::nhwc), 2.0, 2});
  v.push_back({"dcnv2_bf16_nchw_og2", make(2, 96, 10, 11, 40, 3, 1, 1, 2, DType::bf16, Layout::nchw), 2.0, 3});
  LayerDesc tf = make(2, 64, 12, 12, 48, 3, 1, 1, 1, DType::f32, Layout::nhwc);
  tf.math = deft::MathMode::tf32;
  v.push_back({"dcnv2_tf32_nhwc", tf, 2.0, 21});
  tf = make(2, 128, 9, 10, 160, 3, 1, 2, 4, DType::f32, Layout::nchw);
  tf.math = deft::MathMode::tf32;
  v.push_back({"wide_tiles_tf32_nchw", tf, 2.0, 22});
  v.push_back({"wide_tiles_f16_nhwc", make(2, 128, 9, 10, 256, 3, 1, 1, 1, DType::f16, Layout::nhwc), 2.0, 23});
  v.push_back({"wide_tiles_bf16_nchw", make(1, 128, 11, 7, 144, 3, 1, 1, 2, DType::bf16, Layout::nchw), 8.0, 24});
  v.push_back({"depthwise_f32_nhwc", make(2, 32, 13, 9, 32, 3, 1, 32, 4, DType::f32, Layout::nhwc), 2.0, 4});
  v.push_back({"depthwise_f16_nchw", make(1, 16, 9, 13, 16, 5, 2, 16, 1, DType::f16, Layout::nchw), 8.0, 5});
  v.push_back({"depthwise_f64_nhwc", make(2, 8, 9, 9, 8, 3, 1, 8, 2, DType::f64, Layout::nhwc), 2.0, 6});
  // channels that fill no 16-byte vector (scalar kernel, a part-empty channel block), and
  // the transposed vector kernel with three offset groups
  v.push_back({"depthwise_f16_nhwc_c12", make(2, 12, 11, 10, 12, 3, 1, 12, 1, DType::f16, Layout::nhwc), 2.0, 9});
  v.push_back({"depthwise_bf16_nchw_og3", make(3, 24, 10, 9, 24, 3, 1, 24, 3, DType::bf16, Layout::nchw), 2.0, 10});
  v.push_back({"grouped_f64_nchw", make(1, 24, 8, 10, 36, 3, 1, 3, 2, DType::f64, Layout::nchw), 2.0, 7});
  v.push_back({"many_pixels_f32_nhwc", make(4, 16, 40, 40, 16, 3, 1, 1, 1, DType::f32, Layout::nhwc), 2.0, 8});
  return v;
}

class GpuBackward : public ::testing::TestWithParam<Case> {};

TEST_P(GpuBackward, MatchesReference) {
  DEFT_SKIP_WITHOUT_GPU();
  const Case& c = GetParam();
  check_backward(c.desc, random_tensors(c.desc, c.sigma, c.seed), 0);
}

TEST_P(GpuBackward, DeterministicMatchesReference) {
  DEFT_SKIP_WITHOUT_GPU();
  const Case& c = GetParam();
  check_backward(c.desc, random_tensors(c.desc, c.sigma, c.seed), 1);
}

auto param_name = [](const ::testing::TestParamInfo<Case>& info) { return info.param.name; };
INSTANTIATE_TEST_SUITE_P(Random, GpuBackward, ::testing::ValuesIn(random_cases()), param_name);
INSTANTIATE_TEST_SUITE_P(Fixed, GpuBackward, ::testing::ValuesIn(fixed_cases()), param_name);

// Deterministic mode: 10 runs give the same bits, in every dtype, on a layer where many
// sampling points share corners (small image, large offsets, many taps and channels), dense
// and depthwise (groups = 32: the f32 gather over sorted lists, f64 the fixed-point atomics).
TEST(GpuBackwardDeterminism, TenRunsBitwiseIdentical) {
  DEFT_SKIP_WITHOUT_GPU();
  for (int groups : {1, 32})
  for (DType dt : {DType::f32, DType::f16, DType::bf16, DType::f64}) {
    for (Layout layout : {Layout::nchw, Layout::nhwc}) {
      LayerDesc d = make(2, 32, 8, 8, 32, 3, 1, groups, 1, dt, layout);
      if (dt == DType::f32 && layout == Layout::nhwc) d.math = deft::MathMode::tf32;
      SCOPED_TRACE(deft::to_string(d));
      Tensors t = random_tensors(d, 3.0, 42);
      for (auto* v : {&t.input, &t.offset, &t.mask, &t.weight, &t.gout}) quantize_in_place(*v, dt);
      const GpuGrads first = run_gpu(d, t, 1, {true, true, true, true, true});
      for (int rep = 0; rep < 9; ++rep) {
        const GpuGrads again = run_gpu(d, t, 1, {true, true, true, true, true});
        for (int g = 0; g < kGrads; ++g)
          ASSERT_EQ(first.raw[g], again.raw[g]) << kGradName[g] << " differs in run " << rep + 2;
      }
    }
  }
}

// f64 gradients against central finite differences of the reference forward, at offsets
// whose fractional parts stay away from pixel boundaries (where the bilinear sample is
// smooth). Every element of every gradient is checked on a tiny layer.
TEST(GpuBackwardF64, MatchesFiniteDifferences) {
  DEFT_SKIP_WITHOUT_GPU();
  LayerDesc d = make(1, 4, 5, 6, 3, 3, 1, 1, 2, DType::f64, Layout::nchw);
  Tensors t = random_tensors(d, 1.5, 9);
  std::mt19937_64 rng(10);
  std::uniform_real_distribution<double> frac(0.15, 0.85);
  for (double& v : t.offset) v = std::floor(v) + frac(rng);
  std::vector<double> bias(d.k, 0.25);
  auto loss = [&](const Tensors& x, const std::vector<double>& b) {
    std::vector<double> out(x.gout.size());
    deft::ref::deform_conv2d_forward(d, x.input.data(), x.offset.data(), x.mask.data(),
                                     x.weight.data(), b.data(), out.data());
    double s = 0;
    for (size_t i = 0; i < out.size(); ++i) s += out[i] * x.gout[i];
    return s;
  };
  const GpuGrads r = run_gpu(d, t, 0, {true, true, true, true, true});
  const double h = 1e-6;
  auto check = [&](std::vector<double>& param, int g, std::vector<double>* b = nullptr) {
    double max_err = 0, max_ref = 0;
    for (size_t i = 0; i < param.size(); ++i) {
      const double keep = param[i];
      param[i] = keep + h;
      const double up = loss(t, b ? *b : bias);
      param[i] = keep - h;
      const double down = loss(t, b ? *b : bias);
      param[i] = keep;
      const double fd = (up - down) / (2 * h);
      max_err = std::max(max_err, std::abs(fd - r.g[g][i]));
      max_ref = std::max(max_ref, std::abs(fd));
    }
    EXPECT_LE(max_err, 1e-6 * std::max(1.0, max_ref)) << kGradName[g];
  };
  check(t.input, kInput);
  check(t.offset, kOffset);
  check(t.mask, kMask);
  check(t.weight, kWeight);
  check(bias, kBias, &bias);
}

// Points on pixel boundaries (integer offsets), far outside the image (+-1e6 px, and the
// largest finite f16 value) and at NaN positions: no crash, no write out of bounds, and the
// reference's definition (NaN and outside points contribute nothing) in every dtype.
// Offsets on pixel boundaries (integers: with pad 1 also exactly on the -1 and h edges),
// half-way between pixels, far outside (+-huge) and a few NaN, among the random ones. The
// reference treats NaN positions as outside; the GPU must give the same there.
void edge_offsets(Tensors& t, DType dt, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> kind(0, 5), integer(-3, 3);
  const double huge = dt == DType::f16 ? 65504.0 : 1e6;
  for (double& v : t.offset) {
    switch (kind(rng)) {
      case 0: v = integer(rng); break;                        // on a pixel boundary
      case 1: v = (integer(rng) % 2 ? 1 : -1) * huge; break;  // far outside
      case 2: v = integer(rng) + 0.5; break;                  // half-way between pixels
      default: break;                                          // random
    }
  }
  for (size_t i = 0; i < t.offset.size(); i += 37) t.offset[i] = std::nan("");
}

TEST(GpuBackwardEdges, BoundaryHugeAndNaNOffsets) {
  DEFT_SKIP_WITHOUT_GPU();
  for (DType dt : {DType::f32, DType::f16, DType::bf16, DType::f64}) {
    for (Layout layout : {Layout::nchw, Layout::nhwc}) {
      const LayerDesc d = make(2, 16, 7, 9, 12, 3, 1, 2, 2, dt, layout);
      SCOPED_TRACE(deft::to_string(d));
      Tensors t = random_tensors(d, 2.0, 77);
      edge_offsets(t, dt, 78);
      check_backward(d, t, 0);
      check_backward(d, t, 1);
    }
  }
}

// Deterministic grad input in gather form (gin_mode 3: the resident tensor-core kernel stores
// the points' values, deft_bwd_gather sums them per input pixel in fixed point; the depthwise
// kernel's gather computes them from grad_out, weight and mask, by default in f32 over lists
// deft_bwd_sort orders (gin_mode 4 sorted), with gin=gather det=1 in fixed point (3), and in
// the fast mode with gin=gather in f32 over unsorted lists):
// the f64 reference and
// bitwise-equal repeats, on edge offsets (NaN, huge, on and half-way between pixels, cells
// with y0 = -1 or x0 = -1), crowded cells (every sample of the image pulled next to one
// point: thousands of points in one cell), two offset groups, and more channels than one pass
// of the gather takes (640: a 512-channel pass, then a part-filled one).
TEST(GpuBackwardGather, EdgesCrowdedCellsAndWideGroups) {
  DEFT_SKIP_WITHOUT_GPU();
  struct G {
    const char* name;
    LayerDesc d;
    int kind;  // 0 edge offsets, 1 crowded, 2 random
  };
  std::vector<G> cases;
  for (DType dt : {DType::f16, DType::bf16, DType::f32})
    for (Layout layout : {Layout::nchw, Layout::nhwc}) {
      // 8 x 8: 64 output pixels a plane, so an nchw grad_out tile copies in vectors (the
      // resident kernel's condition; 7 x 9 would take the streaming kernel)
      LayerDesc d = make(2, 64, 8, 8, 48, 3, 1, 1, 2, dt, layout);
      if (dt == DType::f32) d.math = deft::MathMode::tf32;
      cases.push_back({"edges", d, 0});
    }
  cases.push_back({"crowded", make(2, 64, 8, 8, 32, 3, 1, 1, 1, DType::f16, Layout::nchw), 1});
  cases.push_back({"wide_group", make(1, 640, 5, 6, 16, 3, 1, 1, 1, DType::f16, Layout::nhwc), 2});
  // the depthwise kernel's direct gather (grad_out x weight x mask computed in the gather; nchw
  // grad_out through its channels-last copy): two offset groups of 32 channels, crowded cells,
  // 6 channels (scalar lanes) and 640 (two passes)
  for (DType dt : {DType::f16, DType::bf16, DType::f32})
    for (Layout layout : {Layout::nchw, Layout::nhwc})
      cases.push_back({"dw_edges", make(2, 64, 7, 9, 64, 3, 1, 64, 2, dt, layout), 0});
  cases.push_back({"dw_crowded", make(2, 48, 8, 8, 48, 3, 1, 48, 1, DType::f16, Layout::nchw), 1});
  cases.push_back({"dw_scalar", make(2, 6, 6, 5, 6, 3, 1, 6, 1, DType::f32, Layout::nhwc), 2});
  cases.push_back({"dw_wide", make(1, 640, 5, 6, 640, 3, 1, 640, 1, DType::f16, Layout::nchw), 2});
  for (const G& c : cases) {
    const LayerDesc& d = c.d;
    SCOPED_TRACE(std::string(c.name) + ": " + deft::to_string(d));
    LayerDesc data = d;
    data.pass = deft::Pass::backward_data;
    deft::Variant dv = deft::default_variant(data, 90, true);
    dv.deterministic = true;
    const bool dw = dv.algo == deft::Algo::depthwise;
    // the depthwise kernel: the f32 gather over sorted lists (4); the others: fixed point (3)
    ASSERT_EQ(deft::make_plan(data, dv).gin_mode, dw ? 4 : 3) << deft::to_string(dv);
    ASSERT_EQ(deft::make_plan(data, dv).gather_sorted, dw) << deft::to_string(dv);
    Tensors t = random_tensors(d, 2.0, 300 + cases.size());
    if (c.kind == 0) edge_offsets(t, d.dtype, 301);
    if (c.kind == 1) {  // nchw offsets: [n][og][tap][dy, dx][ho][wo]
      std::mt19937_64 rng(302);
      std::uniform_real_distribution<double> jitter(-0.05, 0.05);
      const int64_t ho = d.out_h(), wo = d.out_w();
      for (int64_t n = 0; n < d.n; ++n)
        for (int tap = 0; tap < d.taps(); ++tap)
          for (int64_t y = 0; y < ho; ++y)
            for (int64_t x = 0; x < wo; ++x) {
              const int64_t dy = ((n * 2 * d.taps() + 2 * tap) * ho + y) * wo + x;
              t.offset[dy] = 3.3 - double(y - d.pad_h + tap / d.s) + jitter(rng);
              t.offset[dy + ho * wo] = 4.6 - double(x - d.pad_w + tap % d.s) + jitter(rng);
            }
    }
    check_backward(d, t, 1);
    for (auto* v : {&t.input, &t.offset, &t.mask, &t.weight, &t.gout}) quantize_in_place(*v, d.dtype);
    const GpuGrads first = run_gpu(d, t, 1, {true, true, true, true, true});
    const GpuGrads again = run_gpu(d, t, 1, {true, true, true, true, true});
    for (int g = 0; g < kGrads; ++g) EXPECT_EQ(first.raw[g], again.raw[g]) << kGradName[g];
    // the depthwise kernel's other gathers: the fixed-point one (gin=gather det=1: reference,
    // the same bits again) and the fast mode's f32 one over unsorted lists (reference)
    for (int det : {1, 0}) {
      if (!dw) break;
      deft::Variant other = dv;
      other.deterministic = det != 0;
      other.gin_gather = true;
      ASSERT_EQ(deft::make_plan(data, other).gin_mode, det ? 3 : 4);
      SCOPED_TRACE(deft::to_string(other));
      deft::CompileOptions o = test_options(det != 0);
      o.backward_data_variant = other;
      check_backward(d, t, det, o);
      if (!det) continue;
      const GpuGrads f1 = run_gpu(d, t, 1, {true, true, true, true, true}, 2, o);
      const GpuGrads f2 = run_gpu(d, t, 1, {true, true, true, true, true}, 1, o);
      for (int g = 0; g < kGrads; ++g) EXPECT_EQ(f1.raw[g], f2.raw[g]) << kGradName[g];
    }
  }
}

// The depthwise gather's chain runs on an auxiliary stream alongside the data kernel (the
// runtime's driver::Fork), except under graph capture, where it stays on the caller's stream:
// deterministic mode gives the same bits both ways, on a one-image layer (the case the fork
// is for), nhwc (the gather writes grad input) and nchw (the finish transposes), and a dense
// layer's fixed-point gather (no fork) captured too; the graph's outputs were poisoned first.
TEST(GpuBackwardGather, ForkedChainMatchesCapturedGraph) {
  DEFT_SKIP_WITHOUT_GPU();
  const std::vector<LayerDesc> layers = {
      make(1, 256, 16, 16, 256, 3, 1, 256, 1, DType::f16, Layout::nhwc),
      make(1, 128, 12, 10, 128, 3, 1, 128, 2, DType::bf16, Layout::nchw),
      make(2, 64, 8, 8, 48, 3, 1, 1, 2, DType::f16, Layout::nhwc),
  };
  uint64_t seed = 2400;
  for (const LayerDesc& d : layers) {
    SCOPED_TRACE(deft::to_string(d));
    Tensors t = random_tensors(d, 2.0, ++seed);
    for (auto* v : {&t.input, &t.offset, &t.mask, &t.weight, &t.gout}) quantize_in_place(*v, d.dtype);
    const deft::CompileOptions o = test_options(true);
    const GpuGrads forked = run_gpu(d, t, 1, {true, true, true, true, true}, 2, o);
    const GpuGrads captured = run_gpu(d, t, 1, {true, true, true, true, true}, 1, o, /*graph=*/true);
    for (int g = 0; g < kGrads; ++g) EXPECT_EQ(forked.raw[g], captured.raw[g]) << kGradName[g];
  }
}

// One depthwise grad-input variant against the f64 reference: the default variant of d's data
// pass as `set` changes it, its plan checked by the predicate `planned` (else not run), on
// fresh offsets of spread sigma (0: edge offsets: NaN, huge, on pixel boundaries).
template <class Set, class Planned>
void check_dw_data_variant(const LayerDesc& d, double sigma, uint64_t& seed, Set set,
                           Planned planned) {
  LayerDesc data = d;
  data.pass = deft::Pass::backward_data;
  deft::Variant v = deft::default_variant(data, 90);
  ASSERT_EQ(v.algo, deft::Algo::depthwise);
  set(v);
  SCOPED_TRACE(deft::to_string(v) + " sigma " + std::to_string(sigma));
  ASSERT_TRUE(planned(deft::make_plan(data, v))) << "the plan does not run the variant asked for";
  Tensors t = random_tensors(d, sigma > 0 ? sigma : 2.0, ++seed);
  if (sigma == 0) edge_offsets(t, d.dtype, ++seed);
  deft::CompileOptions o = test_options(false);
  o.backward_data_variant = v;
  check_backward(d, t, 0, o);
}

// The depthwise grad input with staging=window (corners inside the tile's input window summed
// in shared memory, the rest scattered to global memory): the f64 reference on every dtype and
// layout, tiles of 8 and 16 pixels, halos 0 to 2, with small offsets (sigma = 0.5: nearly all
// corners in the window), large ones (sigma = 8: most outside, many outside the image) and edge
// offsets (NaN, huge, on pixel boundaries); partial tiles (9 x 11 and 7 x 5 outputs), two
// offset groups of 96 channels (a part-filled 128-channel pass), 256 channels (two passes),
// stride 2 with dilation 2.
TEST(GpuBackwardDwWindow, MatchesReference) {
  DEFT_SKIP_WITHOUT_GPU();
  struct W {
    LayerDesc d;
    double sigma;  // 0: edge offsets
    int tm, halo;
  };
  std::vector<W> cases;
  for (DType dt : {DType::f16, DType::bf16, DType::f32})
    for (Layout layout : {Layout::nchw, Layout::nhwc}) {
      cases.push_back({make(2, 256, 9, 11, 256, 3, 1, 256, 1, dt, layout), 0.5, 16, 1});
      cases.push_back({make(2, 256, 9, 11, 256, 3, 1, 256, 1, dt, layout), 8.0, 8, 2});
      cases.push_back({make(1, 192, 8, 8, 192, 3, 1, 192, 2, dt, layout), 0.0, 16, 0});
    }
  LayerDesc strided = make(2, 128, 13, 10, 128, 3, 2, 128, 1, DType::f16, Layout::nchw);
  strided.stride_h = strided.stride_w = 2, strided.dil_h = strided.dil_w = 2;
  cases.push_back({strided, 2.0, 16, 1});
  LayerDesc nomask = make(1, 128, 7, 5, 128, 3, 1, 128, 1, DType::f32, Layout::nhwc);
  nomask.mask = false;
  cases.push_back({nomask, 2.0, 8, 1});
  uint64_t seed = 900;
  for (const W& c : cases)
    check_dw_data_variant(
        c.d, c.sigma, seed,
        [&](deft::Variant& v) {
          v.tile_m = c.tm, v.threads = 32 * c.tm;
          v.staging = deft::Staging::window, v.halo = c.halo;
          v.gin_gather = v.gin_local = false;  // the window is a float-atomics form (f32: not the default)
          v.fuse_gw = false;                    // (nor does it sum grad weight)
        },
        [](const deft::KernelPlan& plan) { return plan.dw_window; });
}

// gin=local (fast mode): the near points gathered per 8 x 8 input tile, the far ones reduced by
// the data kernel; radii from 0 (only exact zero-offset floors near) to 8, small and large
// spreads (most points near, most far), edge offsets, stride and dilation, no mask, two offset
// groups, groups of channels that are not a multiple of the 128-channel slice, both layouts and
// the transposed nchw read.
TEST(GpuBackwardDwLocal, MatchesReference) {
  DEFT_SKIP_WITHOUT_GPU();
  struct L {
    LayerDesc d;
    double sigma;  // 0: edge offsets
    int halo;
    bool transpose;
  };
  std::vector<L> cases;
  for (DType dt : {DType::f16, DType::bf16, DType::f32})
    for (Layout layout : {Layout::nchw, Layout::nhwc}) {
      cases.push_back({make(2, 256, 9, 11, 256, 3, 1, 256, 1, dt, layout), 0.5, 2, false});
      cases.push_back({make(2, 256, 9, 11, 256, 3, 1, 256, 1, dt, layout), 8.0, 1, false});
      cases.push_back({make(1, 192, 17, 8, 192, 3, 1, 192, 2, dt, layout), 0.0, 0, false});
    }
  cases.push_back({make(2, 96, 20, 19, 96, 3, 1, 96, 1, DType::f16, Layout::nchw), 2.0, 4, true});
  // four slices a block and the tuner's large radii (6 and 8: the spread's, at sigma 2 and 8)
  cases.push_back({make(2, 512, 16, 16, 512, 3, 1, 512, 1, DType::f16, Layout::nhwc), 8.0, 6, false});
  cases.push_back({make(1, 384, 12, 13, 384, 3, 1, 384, 1, DType::bf16, Layout::nchw), 2.0, 8, true});
  cases.push_back({make(1, 320, 16, 16, 320, 3, 1, 320, 1, DType::f32, Layout::nhwc), 2.0, 3, false});
  LayerDesc strided = make(2, 128, 13, 10, 128, 3, 2, 128, 1, DType::f16, Layout::nchw);
  strided.stride_h = strided.stride_w = 2, strided.dil_h = strided.dil_w = 2;
  cases.push_back({strided, 2.0, 2, false});
  cases.push_back({strided, 0.5, 1, true});
  LayerDesc nomask = make(1, 128, 7, 5, 128, 3, 1, 128, 1, DType::f32, Layout::nhwc);
  nomask.mask = false;
  cases.push_back({nomask, 2.0, 2, false});
  uint64_t seed = 1900;
  for (const L& c : cases)
    check_dw_data_variant(
        c.d, c.sigma, seed,
        [&](deft::Variant& v) {
          v.gin_gather = false, v.gin_local = true, v.halo = c.halo;
          v.staging = deft::Staging::gather;
          v.fuse_gw = false;  // the separate data kernel (GpuBackwardDwFused: the fused one)
          if (c.d.layout == Layout::nchw) v.transpose = c.transpose;
        },
        [](const deft::KernelPlan& plan) { return plan.gin_mode == 5; });
}

// gin=local in deterministic mode (gin_mode 6: the near points' sums and the far points'
// reductions both in 64-bit fixed point): the f64 reference, and grad input, offset and mask
// bitwise equal over three runs and a fresh kernel's run, on small and large spreads, edge
// offsets (NaN, huge: the non-finite flag), both layouts, the transposed nchw read, radii 1 to 6.
TEST(GpuBackwardDwLocal, DeterministicIsReproducible) {
  DEFT_SKIP_WITHOUT_GPU();
  struct L {
    LayerDesc d;
    double sigma;  // 0: edge offsets
    int halo;
  };
  const std::vector<L> cases = {
      {make(2, 256, 9, 11, 256, 3, 1, 256, 1, DType::f16, Layout::nhwc), 0.5, 1},
      {make(2, 256, 9, 11, 256, 3, 1, 256, 1, DType::bf16, Layout::nchw), 8.0, 2},
      {make(1, 192, 17, 8, 192, 3, 1, 192, 2, DType::f32, Layout::nhwc), 0.0, 0},
      {make(2, 512, 16, 16, 512, 3, 1, 512, 1, DType::f16, Layout::nhwc), 2.0, 6},
      {make(1, 96, 20, 19, 96, 3, 1, 96, 1, DType::f16, Layout::nchw), 0.0, 4},
  };
  uint64_t seed = 2300;
  for (const L& c : cases) {
    LayerDesc data = c.d;
    data.pass = deft::Pass::backward_data;
    deft::Variant v = deft::default_variant(data, 90, true);
    ASSERT_EQ(v.algo, deft::Algo::depthwise);
    v.deterministic = true, v.gin_gather = false, v.gin_local = true, v.halo = c.halo;
    v.staging = deft::Staging::gather, v.fuse_gw = false;
    if (c.d.layout == Layout::nchw) v.transpose = true;
    SCOPED_TRACE(deft::to_string(c.d) + " | " + deft::to_string(v) + " sigma " + std::to_string(c.sigma));
    ASSERT_EQ(deft::make_plan(data, v).gin_mode, 6);
    Tensors t = random_tensors(c.d, c.sigma > 0 ? c.sigma : 2.0, ++seed);
    if (c.sigma == 0) edge_offsets(t, c.d.dtype, ++seed);
    deft::CompileOptions o = test_options(true);
    o.backward_data_variant = v;
    check_backward(c.d, t, 1, o);
    for (auto* x : {&t.input, &t.offset, &t.mask, &t.weight, &t.gout}) quantize_in_place(*x, c.d.dtype);
    const GpuGrads all = run_gpu(c.d, t, 1, {true, true, true, false, false}, 3, o);
    const GpuGrads again = run_gpu(c.d, t, 1, {true, true, true, false, false}, 1, o);
    for (int g = kInput; g <= kMask; ++g)
      EXPECT_EQ(again.raw[g], all.raw[g]) << kGradName[g] << ": not bitwise reproducible";
  }
}

// gw=fused: the depthwise data kernel sums grad weight too (and the point grads over its
// pixel's lanes, or over channel blocks with deft_bwd_fused_pg). Against the f64 reference on
// every dtype and layout, with each grad-input form it carries (float atomics, gin=local,
// gin=gather), small and large spreads and edge offsets (NaN, huge, on pixel boundaries):
// channel blocks of a whole offset group (256 channels: 32 lanes x 8) and shared ones (two
// offset groups of 96 channels: three blocks each; 512 channels: two), 32-byte vectors, 128
// threads, stride and dilation, no mask. Then each request subset (the others must stay
// poisoned; grad weight alone runs the separate kernel) equals the full run's gradients, and
// deterministic mode gives the same bits over three runs and a fresh kernel's.
TEST(GpuBackwardDwFused, MatchesReferenceSubsetsAndDeterminism) {
  DEFT_SKIP_WITHOUT_GPU();
  enum Gin { kAtomic, kLocal, kGather };
  struct F {
    LayerDesc d;
    double sigma;  // 0: edge offsets
    Gin gin;
    int vec, threads;
  };
  std::vector<F> cases;
  for (DType dt : {DType::f16, DType::bf16, DType::f32})
    for (Layout layout : {Layout::nchw, Layout::nhwc}) {
      cases.push_back({make(2, 256, 9, 11, 256, 3, 1, 256, 1, dt, layout), 0.5, kLocal, 1, 256});
      cases.push_back({make(2, 256, 9, 11, 256, 3, 1, 256, 1, dt, layout), 8.0, kAtomic, 1, 256});
      cases.push_back({make(1, 192, 8, 8, 192, 3, 1, 192, 2, dt, layout), 0.0, kGather, 1, 256});
    }
  cases.push_back({make(2, 512, 16, 16, 512, 3, 1, 512, 1, DType::f16, Layout::nhwc), 2.0, kLocal, 1, 256});
  cases.push_back({make(1, 512, 12, 13, 512, 3, 1, 512, 1, DType::f16, Layout::nhwc), 2.0, kGather, 16, 128});
  cases.push_back({make(1, 256, 10, 9, 256, 3, 1, 256, 1, DType::f32, Layout::nchw), 2.0, kAtomic, 8, 512});
  LayerDesc strided = make(2, 128, 13, 10, 128, 3, 2, 128, 1, DType::bf16, Layout::nchw);
  strided.stride_h = strided.stride_w = 2, strided.dil_h = strided.dil_w = 2;
  cases.push_back({strided, 2.0, kLocal, 1, 256});
  LayerDesc nomask = make(1, 128, 7, 5, 128, 3, 1, 128, 1, DType::f32, Layout::nhwc);
  nomask.mask = false;
  cases.push_back({nomask, 2.0, kGather, 1, 256});
  auto set = [](const F& c, deft::Variant& v) {
    v.fuse_gw = true;
    v.vec = c.vec, v.threads = c.threads, v.tile_m = 8;
    v.staging = deft::Staging::gather;
    v.gin_gather = c.gin == kGather, v.gin_local = c.gin == kLocal;
    v.halo = c.gin == kLocal ? 2 : 0;
    if (c.d.layout == Layout::nchw) v.transpose = true;
  };
  uint64_t seed = 2500;
  for (const F& c : cases) {
    check_dw_data_variant(c.d, c.sigma, seed, [&](deft::Variant& v) { set(c, v); },
                          [](const deft::KernelPlan& plan) { return plan.fused_gw; });
    // request subsets against the full run (fast mode)
    LayerDesc data = c.d;
    data.pass = deft::Pass::backward_data;
    deft::Variant v = deft::default_variant(data, 90);
    set(c, v);
    deft::CompileOptions o = test_options(false);
    o.backward_data_variant = v;
    Tensors t = random_tensors(c.d, c.sigma > 0 ? c.sigma : 2.0, ++seed);
    for (auto* x : {&t.input, &t.offset, &t.mask, &t.weight, &t.gout}) quantize_in_place(*x, c.d.dtype);
    const GpuGrads full = run_gpu(c.d, t, 0, {true, true, true, true, true}, 1, o);
    const std::array<std::array<bool, kGrads>, 4> subsets = {{{false, true, false, true, false},
                                                              {true, false, false, false, true},
                                                              {false, false, false, true, false},
                                                              {false, false, true, true, true}}};
    for (const auto& want : subsets) {
      const GpuGrads part = run_gpu(c.d, t, 0, want, 1, o);
      for (int g = 0; g < kGrads; ++g) {
        if (!want[g] || grad_size(c.d, g) == 0) continue;
        // equal bits, except grad input (float atomics or unordered lists in the fast mode) and
        // grad weight alone (the separate grad-weight kernel, whose sums run in another order)
        auto asked = [&](int h) { return want[h] && grad_size(c.d, h) > 0; };
        const bool alone = g == kWeight && !asked(kInput) && !asked(kOffset) && !asked(kMask);
        const double err = relative_error(part.g[g], full.g[g]);
        EXPECT_LE(err, g == kInput || alone ? tolerance(c.d) : 0.0)
            << kGradName[g] << " of a subset run differs from the full run's by " << err;
      }
    }
    // deterministic mode (the grad-input form is then the deterministic gather)
    deft::Variant vd = deft::default_variant(data, 90, true);
    set(c, vd);
    vd.deterministic = true, vd.gin_gather = vd.gin_local = false, vd.halo = 0;
    ASSERT_TRUE(deft::make_plan(data, vd).fused_gw) << deft::to_string(vd);
    deft::CompileOptions od = test_options(true);
    od.backward_data_variant = vd;
    const GpuGrads a = run_gpu(c.d, t, 1, {true, true, true, true, true}, 3, od);
    const GpuGrads b = run_gpu(c.d, t, 1, {true, true, true, true, true}, 1, od);
    for (int g = 0; g < kGrads; ++g)
      EXPECT_EQ(a.raw[g], b.raw[g]) << kGradName[g] << ": not bitwise reproducible (" << deft::to_string(vd) << ")";
  }
}

// The depthwise grad-input kernel's channel steps (32 lanes x 4 channels) issue their corner
// loads NB at a time (4 steps for f16, 2 otherwise): groups of 640 channels (5 steps: a full
// batch, then one step), 576 (4.5 steps: the last one part-filled) and 96 with two offset
// groups (one part-filled step each), in the fast and the deterministic mode, both layouts.
TEST(GpuBackwardDwSteps, BatchedCornerLoadsMatchReference) {
  DEFT_SKIP_WITHOUT_GPU();
  const LayerDesc layers[] = {make(1, 640, 6, 7, 640, 3, 1, 640, 1, DType::f16, Layout::nchw),
                              make(1, 640, 6, 7, 640, 3, 1, 640, 1, DType::f16, Layout::nhwc),
                              make(1, 576, 5, 6, 576, 3, 1, 576, 1, DType::bf16, Layout::nhwc),
                              make(1, 576, 5, 6, 576, 3, 1, 576, 1, DType::f32, Layout::nchw),
                              make(2, 192, 5, 5, 192, 3, 1, 192, 2, DType::f16, Layout::nhwc)};
  uint64_t seed = 970;
  for (const LayerDesc& d : layers)
    for (int det : {0, 1}) {
      Tensors t = random_tensors(d, 2.0, ++seed);
      check_backward(d, t, det);
    }
}

// Only the requested gradients are written (the others stay poisoned, checked in run_gpu),
// and each equals the full run's. Also a depthwise nchw layer in f16, whose passes share one
// channels-last copy of grad_out (and whose grad bias alone makes it), in both modes.
TEST(GpuBackwardSubsets, OnlyRequestedGradientsWritten) {
  DEFT_SKIP_WITHOUT_GPU();
  const std::pair<LayerDesc, int> layers[] = {
      {make(2, 16, 9, 9, 16, 3, 1, 1, 1, DType::f32, Layout::nchw), 1},
      {make(2, 32, 9, 7, 32, 3, 1, 32, 1, DType::f16, Layout::nchw), 1},
      {make(2, 32, 9, 7, 32, 3, 1, 32, 1, DType::f16, Layout::nchw), 0}};
  for (const auto& [d, det] : layers) {
    SCOPED_TRACE(deft::to_string(d) + (det ? " det" : " fast"));
    Tensors t = random_tensors(d, 2.0, 3);
    quantize_in_place(t.offset, d.dtype);
    const GpuGrads all = run_gpu(d, t, det, {true, true, true, true, true});
    for (int g = 0; g < kGrads; ++g) {
      std::array<bool, kGrads> want{};
      want[g] = true;
      const GpuGrads one = run_gpu(d, t, det, want);
      // (fast mode: the grad input's float atomics may add in another order)
      if (det || g != 0) EXPECT_EQ(one.raw[g], all.raw[g]) << kGradName[g];
    }
  }
}

TEST(GpuBackwardErrors, ClearMessages) {
  DEFT_SKIP_WITHOUT_GPU();
  LayerDesc d = make(1, 8, 6, 6, 8, 3, 1, 1, 1, DType::f32, Layout::nchw);
  d.act = deft::Activation::relu;
  const deft::Kernel k = deft::compile(d, test_options());
  DeviceBuffer buf(4096 * 8);
  void* p = buf.get();
  try {
    k.backward({.input = p, .offset = p, .mask = p, .weight = p, .grad_output = p, .grad_input = p});
    ADD_FAILURE() << "backward with act=relu did not throw";
  } catch (const deft::NotImplemented& e) {
    EXPECT_NE(std::string(e.what()).find("act=relu"), std::string::npos) << e.what();
  }
  d.act = deft::Activation::none;
  d.mask = false;
  const deft::Kernel k2 = deft::compile(d, test_options());
  try {
    k2.backward({.input = p, .offset = p, .weight = p, .grad_output = p, .grad_mask = p});
    ADD_FAILURE() << "grad_mask without a mask did not throw";
  } catch (const deft::Error& e) {
    EXPECT_NE(std::string(e.what()).find("grad_mask"), std::string::npos) << e.what();
  }
  try {
    k2.backward({.input = p, .offset = p, .weight = p, .grad_input = p});
    ADD_FAILURE() << "a null grad_output did not throw";
  } catch (const deft::Error& e) {
    EXPECT_NE(std::string(e.what()).find("grad_output"), std::string::npos) << e.what();
  }
}


// check_backward with variant v for one pass of layer d (the other pass: its default), or, if
// the plan refuses v, that it does so only for a channel tile wider than the groups. True when
// it ran.
bool check_pass_variant(const LayerDesc& d, deft::Pass pass, const deft::Variant& v,
                        const Tensors& t, int det) {
  LayerDesc pd = d;
  pd.pass = pass;
  try {
    deft::validate(pd, v);
  } catch (const deft::DescError& e) {
    EXPECT_EQ(e.field(), "tn") << e.what();
    return false;
  }
  SCOPED_TRACE(deft::to_string(v));
  deft::CompileOptions o = test_options(det != 0);
  (pass == deft::Pass::backward_data ? o.backward_data_variant : o.backward_weight_variant) = v;
  check_backward(d, t, det, o);
  return true;
}

// Layers for the wgmma backward kernels' tile tests: output channels that fill no 64-channel
// slice (k/groups = 80, 76), two groups and two offset groups, both layouts, partial pixel
// blocks, and grad_out copies of 16 bytes (nchw h*w = 144, nhwc k = 256), 8 bytes (h*w = 60,
// nhwc k = 76) and elements (h*w = 90); sigma 8 on one of them.
struct WgmmaLayer {
  LayerDesc d;
  double sigma;
};
std::vector<WgmmaLayer> wgmma_layers() {
  return {
      {make(2, 128, 9, 10, 80, 3, 1, 1, 2, DType::f16, Layout::nchw), 2.0},
      {make(2, 128, 7, 9, 256, 3, 1, 1, 1, DType::bf16, Layout::nhwc), 2.0},
      {make(2, 256, 12, 12, 128, 3, 1, 2, 2, DType::f16, Layout::nchw), 8.0},
      {make(3, 128, 6, 10, 128, 3, 1, 1, 1, DType::f16, Layout::nchw), 2.0},
      {make(2, 64, 8, 9, 76, 3, 1, 1, 1, DType::f16, Layout::nhwc), 2.0},
  };
}

// The warp-specialised grad-weight variant tm x tn with `prod` producer warpgroups, a ring of
// `stages` (0: the plan's) and chunks of kp pixels (64; tf32 32), for layer d's layout.
deft::Variant ws_weight_variant(const LayerDesc& d, int tm, int tn, int prod, int stages, int kp) {
  deft::Variant v;
  v.algo = deft::Algo::gemm_wgmma;
  v.tile_m = tm, v.tile_n = tn, v.tile_k = kp, v.threads = 2 * tm + 128 * prod;
  v.producers = prod, v.stages = stages;
  v.transpose = d.layout == Layout::nchw;
  return v;
}

// Grad weight on Hopper's wgmma (deform_conv_bwd_weight_wgmma.cuh): every tile a layer takes,
// on wgmma_layers() and a 64-channel 7x7 one (h*w = 49: element copies), and the
// warp-specialised form on the same layers.
TEST(GpuBackwardWgmma, EveryTileMatchesReference) {
  DEFT_SKIP_WITHOUT_GPU();
  if (device_arch() != 90) GTEST_SKIP() << "algo=gemm_wgmma runs on sm_90 only";
  std::vector<WgmmaLayer> layers = wgmma_layers();
  layers.push_back({make(3, 64, 7, 7, 64, 3, 1, 1, 1, DType::bf16, Layout::nchw), 2.0});
  for (const WgmmaLayer& w : layers) {
    LayerDesc wd = w.d;
    wd.pass = deft::Pass::backward_weight;
    const Tensors t = random_tensors(w.d, w.sigma, 321);
    for (int tm : {64, 128, 256})
      for (int tn : {64, 128}) {
        deft::Variant v;
        v.algo = deft::Algo::gemm_wgmma;
        v.tile_m = tm, v.tile_n = tn, v.tile_k = 64, v.threads = 2 * tm;
        v.transpose = w.d.layout == Layout::nchw;
        try {
          deft::validate(wd, v);
        } catch (const deft::DescError&) {
          continue;  // a channel tile wider than the layer's groups
        }
        SCOPED_TRACE(deft::to_string(v));
        deft::CompileOptions o = test_options();
        o.backward_weight_variant = v;
        check_backward(w.d, t, 0, o);
      }
    // The warp-specialised form (producer warpgroups gather into a ring, consumers copy
    // grad_out into their own stages): one and two producer warpgroups, one to four consumers,
    // the plan's ring and the shallowest rings it takes (2 slots for 1 or 2 producer
    // warpgroups: every slot refilled many times).
    for (auto [tm, tn, prod, stages] : {std::array{128, 128, 1, 0}, {64, 64, 1, 2}, {128, 64, 2, 2},
                                        {256, 64, 1, 0}, {64, 128, 2, 3}, {256, 64, 2, 0},
                                        {256, 128, 1, 0}})
      check_pass_variant(w.d, deft::Pass::backward_weight,
                         ws_weight_variant(w.d, tm, tn, prod, stages, 64), t, 0);
  }
}

// backward_data on Hopper's wgmma (deform_conv_bwd_data_wgmma.cuh): 64 and 128 pixels a block,
// one to four warpgroups taking turns over a half's channel steps (more than a layer has, too),
// 64- and 128-channel steps,
// the plan's weight rings and the shallowest and the deepest, fast and deterministic (64-pixel
// tiles: the plan refuses deterministic 128-pixel ones); on
// wgmma_layers() (several channel steps per block among them), a stride-2 layer (h*w = 42:
// element copies) and a dilated one (h*w = 64: 16-byte copies).
TEST(GpuBackwardWgmma, DataTilesMatchReference) {
  DEFT_SKIP_WITHOUT_GPU();
  if (device_arch() != 90) GTEST_SKIP() << "algo=gemm_wgmma runs on sm_90 only";
  LayerDesc strided = make(2, 64, 11, 13, 64, 3, 1, 1, 1, DType::bf16, Layout::nchw);
  strided.stride_h = strided.stride_w = 2;
  LayerDesc wide = make(2, 256, 8, 8, 128, 3, 1, 1, 1, DType::f16, Layout::nchw);
  wide.dil_h = wide.dil_w = 2;
  wide.pad_h = wide.pad_w = 2;
  std::vector<WgmmaLayer> layers = wgmma_layers();
  layers.push_back({strided, 2.0});
  layers.push_back({wide, 2.0});
  int ran = 0;
  for (const WgmmaLayer& w : layers) {
    const Tensors t = random_tensors(w.d, w.sigma, 654);
    for (auto [tm, wgs, tn, stages, det] :
         {std::array{64, 1, 64, 0, 0}, {64, 2, 64, 3, 1}, {64, 4, 64, 6, 0}, {64, 1, 128, 0, 0},
          {64, 2, 128, 0, 1}, {64, 3, 128, 3, 0}, {128, 2, 64, 0, 0}, {128, 4, 64, 3, 0},
          {128, 2, 128, 3, 0}}) {
      deft::Variant v;
      v.algo = deft::Algo::gemm_wgmma;
      v.tile_m = tm, v.tile_n = tn, v.tile_k = 64, v.threads = 128 * wgs, v.stages = stages;
      v.transpose = w.d.layout == Layout::nchw;
      ran += check_pass_variant(w.d, deft::Pass::backward_data, v, t, det);
    }
  }
  EXPECT_EQ(ran, 51);
}

// The wgmma backward_data kernel on the edge cases: offsets on pixel boundaries, huge and NaN
// (fast and deterministic, against the reference), deterministic results bitwise identical
// over 3 runs, and each requested subset of gradients alone equal to the full run's (the rest
// left poisoned, grad input skipped where not requested).
TEST(GpuBackwardWgmma, DataEdgesDeterminismAndSubsets) {
  DEFT_SKIP_WITHOUT_GPU();
  if (device_arch() != 90) GTEST_SKIP() << "algo=gemm_wgmma runs on sm_90 only";
  for (const LayerDesc& d : {make(2, 128, 7, 9, 96, 3, 1, 1, 2, DType::f16, Layout::nchw),
                             make(2, 64, 8, 10, 64, 3, 1, 1, 1, DType::bf16, Layout::nhwc)}) {
    SCOPED_TRACE(deft::to_string(d));
    Tensors t = random_tensors(d, 2.0, 91);
    edge_offsets(t, d.dtype, 92);
    for (const char* text : {"algo=gemm_wgmma tm=64 tn=64 tk=64 threads=256 stages=3",
                             "algo=gemm_wgmma tm=128 tn=64 tk=64 threads=512 stages=3"}) {
      deft::Variant v = deft::parse_variant(text);
      v.transpose = d.layout == Layout::nchw;
      SCOPED_TRACE(deft::to_string(v));
      const bool det_ok = v.tile_m == 64;  // the plan refuses deterministic 128-pixel tiles
      // DEFT_TEST_PROGRESS=1: a line per step on stderr (which step a device fault stopped)
      auto step = [&](const char* what) {
        if (std::getenv("DEFT_TEST_PROGRESS"))
          std::fprintf(stderr, "edges: %s | %s | %s\n", deft::to_string(d).c_str(),
                       deft::to_string(v).c_str(), what);
      };
      for (int det : {0, 1}) {
        deft::CompileOptions o = test_options(det != 0);
        o.backward_data_variant = v;
        step(det ? "check det" : "check fast");
        if (det && !det_ok) {
          try {
            run_gpu(d, t, 1, {true, true, true, false, false}, 1, o);
            ADD_FAILURE() << "a deterministic tm=128 wgmma data kernel was not refused";
          } catch (const deft::DescError& e) {
            EXPECT_EQ(e.field(), "tm") << e.what();
            EXPECT_NE(std::string(e.what()).find("deterministic"), std::string::npos) << e.what();
          }
          continue;
        }
        check_backward(d, t, det, o);
      }
      Tensors q = t;
      for (auto* x : {&q.input, &q.offset, &q.mask, &q.weight, &q.gout})
        quantize_in_place(*x, d.dtype);
      {  // fast mode: grad offset alone (no grad input) runs, and equals that of all three
        deft::CompileOptions f = test_options(false);
        f.backward_data_variant = v;
        step("fast grad_offset alone");
        const GpuGrads alone = run_gpu(d, q, 0, {false, true, false, false, false}, 1, f);
        step("fast all");
        const GpuGrads all = run_gpu(d, q, 0, {true, true, true, false, false}, 1, f);
        EXPECT_EQ(alone.raw[kOffset], all.raw[kOffset]) << "fast mode: grad_offset alone";
      }
      if (!det_ok) continue;
      deft::CompileOptions o = test_options(true);
      o.backward_data_variant = v;
      step("det all x3, again, subsets");
      const GpuGrads all = run_gpu(d, q, 1, {true, true, true, false, false}, 3, o);
      const GpuGrads again = run_gpu(d, q, 1, {true, true, true, false, false}, 1, o);
      for (int g = kInput; g <= kMask; ++g) {
        EXPECT_EQ(again.raw[g], all.raw[g]) << kGradName[g] << ": not bitwise reproducible";
        std::array<bool, kGrads> want{};
        want[g] = true;
        EXPECT_EQ(run_gpu(d, q, 1, want, 1, o).raw[g], all.raw[g]) << kGradName[g];
      }
    }
  }
}

// backward_data on wgmma in tf32 (opt-in): both layouts (the nchw grad_out tile transposed to
// K-major by its copy), output channels that fill no 32-channel slice (k = 80, 76), two offset
// groups, several channel steps a block, partial pixel blocks; fast and deterministic against
// the reference, and grad offset alone equal to the full run's.
TEST(GpuBackwardWgmma, DataTf32TilesMatchReference) {
  DEFT_SKIP_WITHOUT_GPU();
  if (device_arch() != 90) GTEST_SKIP() << "algo=gemm_wgmma runs on sm_90 only";
  std::vector<LayerDesc> layers = {make(2, 128, 9, 10, 80, 3, 1, 1, 2, DType::f32, Layout::nchw),
                                   make(2, 128, 7, 9, 256, 3, 1, 1, 1, DType::f32, Layout::nhwc),
                                   make(2, 64, 8, 9, 76, 3, 1, 1, 1, DType::f32, Layout::nhwc),
                                   make(3, 256, 6, 10, 96, 3, 1, 1, 1, DType::f32, Layout::nchw)};
  int ran = 0;
  for (LayerDesc& d : layers) {
    d.math = deft::MathMode::tf32;
    SCOPED_TRACE(deft::to_string(d));
    Tensors t = random_tensors(d, 2.0, 655);
    for (auto [tm, wgs, tn, stages, det] :
         {std::array{64, 2, 64, 3, 0}, {64, 1, 64, 0, 0}, {64, 2, 128, 0, 0}, {64, 2, 64, 3, 1},
          {128, 2, 64, 0, 0}}) {
      deft::Variant v;
      v.algo = deft::Algo::gemm_wgmma;
      v.tile_m = tm, v.tile_n = tn, v.tile_k = 32, v.threads = 128 * wgs, v.stages = stages;
      v.transpose = d.layout == Layout::nchw;
      ran += check_pass_variant(d, deft::Pass::backward_data, v, t, det);
    }
    deft::Variant v = deft::parse_variant("algo=gemm_wgmma tm=64 tn=64 tk=32 threads=256");
    v.transpose = d.layout == Layout::nchw;
    deft::CompileOptions f = test_options(false);
    f.backward_data_variant = v;
    Tensors q = t;
    for (auto* x : {&q.input, &q.offset, &q.mask, &q.weight, &q.gout})
      quantize_in_place(*x, d.dtype);
    const GpuGrads alone = run_gpu(d, q, 0, {false, true, false, false, false}, 1, f);
    const GpuGrads all = run_gpu(d, q, 0, {true, true, true, false, false}, 1, f);
    EXPECT_EQ(alone.raw[kOffset], all.raw[kOffset]) << "grad_offset alone";
  }
  EXPECT_EQ(ran, 18);  // tn=128 needs 128 channels an offset group: 2 of the 4 layers
}

// Grad weight on wgmma in tf32 (the warp-specialised form; 32-pixel chunks, both operands
// K-major, the nhwc grad_out transposed by its copy): wgmma_layers() in f32 (grad_out copies of
// 16 bytes: nchw h*w = 144 and 60; 8 bytes: h*w = 90; nhwc elements) and a 7x7 nchw one (h*w =
// 49: element copies); one and two producer warpgroups, one to four consumers, the plan's ring
// and the shallowest ones. The register form is refused in tf32, with a message saying so.
TEST(GpuBackwardWgmma, WeightTf32TilesMatchReference) {
  DEFT_SKIP_WITHOUT_GPU();
  if (device_arch() != 90) GTEST_SKIP() << "algo=gemm_wgmma runs on sm_90 only";
  std::vector<WgmmaLayer> layers = wgmma_layers();
  layers.push_back({make(3, 64, 7, 7, 64, 3, 1, 1, 1, DType::f32, Layout::nchw), 2.0});
  int ran = 0;
  for (WgmmaLayer& w : layers) {
    w.d.dtype = DType::f32;
    w.d.math = deft::MathMode::tf32;
    SCOPED_TRACE(deft::to_string(w.d));
    const Tensors t = random_tensors(w.d, w.sigma, 322);
    for (auto [tm, tn, prod, stages] : {std::array{128, 128, 1, 0}, {64, 64, 1, 2}, {128, 64, 2, 2},
                                        {256, 64, 1, 0}, {64, 128, 2, 3}, {256, 128, 1, 0},
                                        {256, 64, 2, 0}})
      ran += check_pass_variant(w.d, deft::Pass::backward_weight,
                                ws_weight_variant(w.d, tm, tn, prod, stages, 32), t, 0);
  }
  EXPECT_EQ(ran, 33);  // tn=128 needs 128 channels a group and offset group: 3 of the 6 layers
}

// The warp-specialised grad weight with its producer batch set (batch=N: items a producer lane
// keeps in flight): 4 and 8 (a whole chunk's items with tn=128) against the reference, f16,
// bf16 and tf32, both layouts, partial chunks.
TEST(GpuBackwardWgmma, WeightBatchesMatchReference) {
  DEFT_SKIP_WITHOUT_GPU();
  if (device_arch() != 90) GTEST_SKIP() << "algo=gemm_wgmma runs on sm_90 only";
  LayerDesc tf = make(3, 128, 6, 10, 96, 3, 1, 1, 1, DType::f32, Layout::nchw);
  tf.math = deft::MathMode::tf32;
  int ran = 0;
  for (const LayerDesc& d : {make(2, 128, 9, 10, 80, 3, 1, 1, 1, DType::f16, Layout::nchw),
                             make(2, 128, 7, 9, 256, 3, 1, 1, 1, DType::bf16, Layout::nhwc), tf}) {
    SCOPED_TRACE(deft::to_string(d));
    const Tensors t = random_tensors(d, 2.0, 323);
    const int kp = d.dtype == DType::f32 ? 32 : 64;
    for (auto [tm, tn, prod, batch] : {std::array{256, 128, 1, 4}, {256, 128, 1, 8}, {256, 64, 2, 4},
                                       {128, 128, 2, 8}, {128, 64, 1, 4}}) {
      deft::Variant v = ws_weight_variant(d, tm, tn, prod, 0, kp);
      v.batch = batch;
      ran += check_pass_variant(d, deft::Pass::backward_weight, v, t, 0);
    }
  }
  EXPECT_EQ(ran, 15);
}

// The streaming grad-input kernel's vector epilogue (vec=4, opt-in): strict f32 through the
// transpose pre-pass, fast and deterministic, two offset groups, a partial pixel block; f16 with
// groups the tensor cores do not take (nhwc); against the reference, and grad offset alone
// equal to the full run's.
TEST(GpuBackwardVariants, StreamingVectorEpilogueMatchesReference) {
  DEFT_SKIP_WITHOUT_GPU();
  LayerDesc f16 = make(2, 40, 9, 10, 40, 3, 1, 1, 1, DType::f16, Layout::nhwc);
  for (const LayerDesc& d : {make(2, 64, 11, 13, 48, 3, 1, 1, 2, DType::f32, Layout::nchw),
                             make(3, 128, 7, 9, 64, 3, 1, 1, 1, DType::f32, Layout::nchw), f16}) {
    SCOPED_TRACE(deft::to_string(d));
    const Tensors t = random_tensors(d, 2.0, 731);
    for (const char* text : {"algo=gemm_simt tm=64 tn=32 tk=16 threads=256 vec=4",
                             "algo=gemm_simt tm=64 tn=64 tk=16 threads=256 vec=4"}) {
      deft::Variant v = deft::parse_variant(text);
      v.transpose = d.layout == Layout::nchw;
      for (int det : {0, 1}) {
        const bool ran = check_pass_variant(d, deft::Pass::backward_data, v, t, det);
        EXPECT_TRUE(ran || v.tile_n == 64) << deft::to_string(v);  // tn=64 > 32 channels a group
      }
      deft::CompileOptions f = test_options(false);
      f.backward_data_variant = v;
      Tensors q = t;
      for (auto* x : {&q.input, &q.offset, &q.mask, &q.weight, &q.gout})
        quantize_in_place(*x, d.dtype);
      try {
        const GpuGrads alone = run_gpu(d, q, 0, {false, true, false, false, false}, 1, f);
        const GpuGrads all = run_gpu(d, q, 0, {true, true, true, false, false}, 1, f);
        EXPECT_EQ(alone.raw[kOffset], all.raw[kOffset]) << "grad_offset alone";
      } catch (const deft::DescError& e) {
        EXPECT_EQ(e.field(), "tn") << e.what();
      }
    }
  }
}

// The backward kernels of nhwc layers read the caller's input (and weight and grad_output) in
// vectors: a misaligned tensor is refused with a message naming it, before any launch.
TEST(GpuBackwardErrors, MisalignedTensorsGiveAClearError) {
  DEFT_SKIP_WITHOUT_GPU();
  for (const LayerDesc& d : {make(2, 64, 9, 11, 64, 3, 1, 1, 1, DType::f16, Layout::nhwc),
                             make(2, 64, 9, 11, 64, 3, 1, 64, 1, DType::f16, Layout::nhwc)}) {
    SCOPED_TRACE(deft::to_string(d));
    const Tensors t = random_tensors(d, 2.0, 78);
    const std::vector<uint8_t> x = encode(t.input, d.dtype);
    DeviceBuffer input(x.size() + 16), offset(encode(t.offset, d.dtype)),
        mask(encode(t.mask, d.dtype)), weight(encode(t.weight, d.dtype)),
        gout(encode(t.gout, d.dtype));
    DeviceBuffer gin(x.size()), gw(size_t(grad_size(d, kWeight)) * 2),
        goff(size_t(grad_size(d, kOffset)) * 2);
    DEFT_CUDA_CHECK(cudaMemcpy(input.get(), x.data(), x.size(), cudaMemcpyHostToDevice));
    const deft::Kernel kernel = deft::compile(d, test_options());
    Stream stream;
    auto message = [&](const void* in, bool data, bool wgt) -> std::string {
      try {
        kernel.backward({.input = in, .offset = offset.get(), .mask = mask.get(),
                         .weight = weight.get(), .grad_output = gout.get(),
                         .grad_input = data ? gin.get() : nullptr,
                         .grad_offset = data ? goff.get() : nullptr,
                         .grad_weight = wgt ? gw.get() : nullptr},
                        stream.cu());
      } catch (const deft::Error& e) {
        return e.what();
      }
      return "";
    };
    const char* base = static_cast<const char*>(input.get());
    const std::string m2 = message(base + 2, true, true);
    EXPECT_NE(m2.find("input at"), std::string::npos) << m2;
    EXPECT_NE(m2.find("not 16-byte aligned"), std::string::npos) << m2;
    // the grad-weight kernel alone reads the input in vectors too
    EXPECT_NE(message(base + 2, false, true).find("not 16-byte aligned"), std::string::npos);
    EXPECT_NE(message(base + 1, true, true).find("not aligned to its 2-byte elements"),
              std::string::npos);
    EXPECT_EQ(message(base, true, true), "");
    stream.sync();
    DEFT_CUDA_CHECK(cudaGetLastError());
  }
}

// The defaults read nchw layers through the transpose pre-pass; these run the direct nchw
// kernels (transpose=0) of every family: FMA, tensor cores and depthwise.
TEST(GpuBackwardVariants, NchwWithoutTranspose) {
  DEFT_SKIP_WITHOUT_GPU();
  const LayerDesc dense = make(2, 64, 12, 12, 48, 3, 1, 1, 2, DType::f16, Layout::nchw);
  LayerDesc fma = dense;
  fma.dtype = DType::f32;
  const LayerDesc dw = make(2, 32, 13, 9, 32, 3, 1, 32, 4, DType::f32, Layout::nchw);
  for (const LayerDesc& d : {dense, fma, dw}) {
    deft::CompileOptions o = test_options();
    LayerDesc data = d, weight = d;
    data.pass = deft::Pass::backward_data;
    weight.pass = deft::Pass::backward_weight;
    o.backward_data_variant = deft::default_variant(data);
    o.backward_weight_variant = deft::default_variant(weight);
    ASSERT_TRUE(o.backward_data_variant->transpose) << "the default should transpose";
    o.backward_data_variant->transpose = false;
    o.backward_weight_variant->transpose = false;
    if (o.backward_data_variant->algo == deft::Algo::depthwise) o.backward_data_variant->tile_m = 32;
    SCOPED_TRACE(deft::to_string(*o.backward_data_variant) + " / " +
                 deft::to_string(*o.backward_weight_variant));
    for (int det : {0, 1}) check_backward(d, random_tensors(d, 2.0, 99), det, o);
  }
}

}  // namespace
