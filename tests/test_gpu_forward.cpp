// GPU correctness of deform_conv2d forward against the double-precision CPU reference:
// random descriptions over every dtype, layout and geometry option, kernel reuse, and
// non-finite / huge offsets. Every GPU test skips without a GPU. The few CPU tests at the end
// check the helpers and the tensor-shape contract these tests rely on.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "deft/deft.hpp"
#include "reference/deform_conv_ref.hpp"
#include "tests/gpu_test_util.hpp"

namespace {

using deft::Activation;
using deft::DType;
using deft::LayerDesc;
using deft::Layout;
using deft::MathMode;
using namespace deft::test;

// ---- one checked run ------------------------------------------------------------------------

// Host tensors of a description, in its layout (element counts do not depend on the layout).
struct HostTensors {
  std::vector<double> input, offset, mask, weight, bias;
};

// Inputs, weight and bias uniform in [-1, 1], offsets ~ N(0, sigma^2) px, mask uniform (0, 1).
HostTensors random_tensors(const LayerDesc& d, double sigma, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> sym(-1.0, 1.0), unit(0.0, 1.0);
  std::normal_distribution<double> px(0.0, sigma);
  const int64_t hw_out = d.out_h() * d.out_w();
  HostTensors t;
  t.input.resize(d.n * d.c * d.h * d.w);
  t.offset.resize(d.n * 2 * d.offset_groups * d.taps() * hw_out);
  t.mask.resize(d.mask ? d.n * d.offset_groups * d.taps() * hw_out : 0);
  t.weight.resize(d.k * d.c_per_group() * d.taps());
  t.bias.resize(d.bias ? d.k : 0);
  for (double& v : t.input) v = sym(rng);
  for (double& v : t.offset) v = px(rng);
  for (double& v : t.mask) v = unit(rng);
  for (double& v : t.weight) v = sym(rng);
  for (double& v : t.bias) v = sym(rng);
  return t;
}

double tolerance(const LayerDesc& d) {
  switch (d.dtype) {
    case DType::f32: return d.math == MathMode::tf32 ? 5e-3 : 1e-5;
    case DType::f64: return 1e-10;  // double math end to end: only summation order differs
    case DType::f16:
    case DType::bf16: return 1e-2;
  }
  return 0;
}

// Per-test database so tests neither read nor pollute the user's cache; "" (no persistent
// cache) when the build does not say where temporaries go.
deft::CompileOptions test_options() {
  deft::CompileOptions o;
#ifdef DEFT_TEST_TMP
  std::filesystem::create_directories(DEFT_TEST_TMP);
  o.cache_path = std::string(DEFT_TEST_TMP) + "/gpu_forward.db";
#else
  o.cache_path = "";
#endif
  return o;
}

constexpr size_t kGuardBytes = 256;  // poisoned tail after the output: must stay untouched

// Quantizes `t` to the description's dtype, runs the reference on the quantized values and the
// compiled kernel on the device, and checks: every output written and finite, nothing written
// past the end, relative error within the dtype's tolerance.
void check_forward(const LayerDesc& d, HostTensors t,
                   const deft::CompileOptions& options = test_options()) {
  SCOPED_TRACE("desc: " + deft::to_string(d));
  const DType dt = d.dtype;  // math=tf32 still stores f32
  for (auto* v : {&t.input, &t.offset, &t.mask, &t.weight, &t.bias}) quantize_in_place(*v, dt);
  ASSERT_GT(std::count_if(t.input.begin(), t.input.end(), [](double v) { return v != 0; }), 0);

  const int64_t out_count = d.n * d.k * d.out_h() * d.out_w();
  std::vector<double> ref(out_count);
  deft::ref::deform_conv2d_forward(d, t.input.data(), t.offset.data(),
                                   d.mask ? t.mask.data() : nullptr, t.weight.data(),
                                   d.bias ? t.bias.data() : nullptr, ref.data());

  DeviceBuffer input(encode(t.input, dt)), offset(encode(t.offset, dt)),
      mask(encode(t.mask, dt)), weight(encode(t.weight, dt)), bias(encode(t.bias, dt));
  const size_t out_bytes = (size_t)out_count * dtype_size(dt);
  DeviceBuffer output(out_bytes + kGuardBytes);
  output.fill_bytes(0xFF);  // NaN in every float format: an unwritten element shows
  DEFT_CUDA_CHECK(cudaDeviceSynchronize());  // uploads and poison complete before the launch

  const deft::Kernel kernel = deft::compile(d, options);
  ASSERT_TRUE(kernel.valid());
  SCOPED_TRACE("kernel: " + kernel.info().kernel_name + " [" + deft::to_string(kernel.variant()) +
               "]");
  Stream stream;
  kernel.forward({.input = input.get(),
                  .offset = offset.get(),
                  .mask = d.mask ? mask.get() : nullptr,
                  .weight = weight.get(),
                  .bias = d.bias ? bias.get() : nullptr,
                  .output = output.get()},
                 stream.cu());
  stream.sync();
  DEFT_CUDA_CHECK(cudaGetLastError());

  std::vector<uint8_t> bytes = output.download();
  const bool guard_intact = std::all_of(bytes.begin() + (ptrdiff_t)out_bytes, bytes.end(),
                                        [](uint8_t b) { return b == 0xFF; });
  EXPECT_TRUE(guard_intact) << "the kernel wrote past the end of the output";
  bytes.resize(out_bytes);
  const std::vector<double> out = decode(bytes, dt);

  const int64_t bad = count_nonfinite(out);
  if (bad) {
    const auto first = std::find_if(out.begin(), out.end(), [](double v) { return !std::isfinite(v); });
    ADD_FAILURE() << bad << " of " << out_count << " outputs are not finite (unwritten or NaN); "
                  << "first at element " << (first - out.begin());
  }
  const double err = relative_error(out, ref);
  EXPECT_LE(err, tolerance(d)) << "relative L2 error " << err;
}

// ---- (a) random descriptions ----------------------------------------------------------------

struct GpuCase {
  std::string name;  // gtest parameter name
  LayerDesc desc;
  double sigma;  // offset standard deviation in pixels
  uint64_t seed;
};

void PrintTo(const GpuCase& c, std::ostream* os) { *os << c.name; }

std::string case_name(int i, const LayerDesc& d) {
  std::string dt = d.math == MathMode::tf32 ? "tf32" : std::string(deft::to_string(d.dtype));
  return "case" + std::to_string(i) + "_" + dt + "_" + std::string(deft::to_string(d.layout));
}

// 30 seeded random descriptions: dtype cycles through (f32, tf32, f16, bf16, f64) and the layout
// alternates every five cases, so each (dtype, layout) pair appears three times; the geometry
// and options are drawn at random. Every fourth case uses sigma = 8 px offsets.
std::vector<GpuCase> random_cases() {
  std::mt19937_64 rng(20240611);
  auto pick = [&](std::initializer_list<int> v) {
    return *(v.begin() + std::uniform_int_distribution<size_t>(0, v.size() - 1)(rng));
  };
  const std::pair<int, int> kernels[] = {{1, 1}, {3, 3}, {5, 5}, {3, 1}};
  std::vector<GpuCase> cases;
  for (int i = 0; i < 30; ++i) {
    LayerDesc d;
    d.dtype = std::array{DType::f32, DType::f32, DType::f16, DType::bf16, DType::f64}[i % 5];
    d.math = i % 5 == 1 ? MathMode::tf32 : MathMode::fp32;
    d.layout = (i / 5) % 2 ? Layout::nhwc : Layout::nchw;
    d.n = pick({1, 2, 3});
    d.h = pick({9, 11, 13, 16, 19});
    d.w = pick({9, 10, 13, 17, 19});
    std::tie(d.r, d.s) = kernels[pick({0, 1, 2, 3})];
    d.stride_h = pick({1, 2}), d.stride_w = pick({1, 2});
    d.pad_h = pick({0, 1, 2}), d.pad_w = pick({0, 1, 2});
    d.dil_h = pick({1, 2}), d.dil_w = pick({1, 2});
    d.groups = pick({1, 2, 4});
    d.c = d.groups * pick({1, 2, 3, 4, 6});  // 1 .. 24
    d.k = d.groups * pick({1, 2, 3, 5});     // e.g. k = 20 with groups = 4
    do d.offset_groups = pick({1, 2, 4});
    while (d.c % d.offset_groups != 0);
    d.mask = pick({0, 1});
    d.bias = pick({0, 1});
    d.act = std::array{Activation::none, Activation::relu, Activation::gelu}[pick({0, 1, 2})];
    cases.push_back({case_name(i, d), d, i % 4 == 3 ? 8.0 : 2.0, 1000 + (uint64_t)i});
  }
  return cases;
}

// A DCNv2 layer (mask=1) with a square r x r kernel and padding `pad`.
LayerDesc desc(int64_t n, int64_t c, int64_t h, int64_t w, int64_t k, int r, int pad, int groups,
               int og, DType dt, Layout layout) {
  LayerDesc d;
  d.n = n, d.c = c, d.h = h, d.w = w, d.k = k, d.r = d.s = r, d.pad_h = d.pad_w = pad;
  d.groups = groups, d.offset_groups = og, d.dtype = dt, d.layout = layout, d.mask = true;
  return d;
}

// Hand-picked shapes the random draw may miss: a typical DCNv2 layer, depthwise, a longer
// reduction, channel counts that defeat vector loads, 1x1 stride 2, large offsets.
std::vector<GpuCase> fixed_cases() {
  std::vector<GpuCase> v;
  LayerDesc d = desc(2, 32, 16, 16, 32, 3, 1, 1, 1, DType::f32, Layout::nchw);
  d.bias = true, d.act = Activation::relu;
  v.push_back({"dcnv2_f32_nchw", d, 2.0, 1});
  d.layout = Layout::nhwc, d.dtype = DType::f16;
  v.push_back({"dcnv2_f16_nhwc", d, 2.0, 2});
  v.push_back({"depthwise_f32_nhwc", desc(1, 16, 13, 17, 16, 3, 1, 16, 4, DType::f32, Layout::nhwc), 2.0, 3});
  v.push_back({"depthwise_bf16_nchw", desc(2, 16, 13, 17, 16, 3, 1, 16, 4, DType::bf16, Layout::nchw), 2.0, 4});
  d = desc(2, 64, 12, 20, 64, 3, 1, 1, 2, DType::f16, Layout::nhwc);
  v.push_back({"long_reduction_f16_nhwc", d, 2.0, 5});
  d.dtype = DType::bf16, d.layout = Layout::nchw;
  v.push_back({"long_reduction_bf16_nchw", d, 2.0, 6});
  d.dtype = DType::f32, d.math = MathMode::tf32;
  v.push_back({"long_reduction_tf32_nchw", d, 2.0, 7});
  // Wide output tiles (tn=128) and, in tf32, dynamic shared memory above 48 KiB.
  d = desc(2, 64, 9, 11, 160, 3, 1, 1, 1, DType::f32, Layout::nchw);
  d.math = MathMode::tf32;
  v.push_back({"wide_tile_tf32_nchw", d, 2.0, 11});
  d = desc(2, 64, 9, 11, 160, 3, 1, 2, 1, DType::f16, Layout::nhwc);
  v.push_back({"wide_tile_f16_nhwc", d, 2.0, 12});
  // Depthwise nchw through the transpose pre-pass (16-byte vectors), with offset groups.
  v.push_back({"depthwise_f16_nhwc_c12", desc(2, 12, 11, 10, 12, 3, 1, 12, 1, DType::f16, Layout::nhwc), 2.0, 17});
  v.push_back({"depthwise_f32_nchw_transposed", desc(2, 32, 10, 14, 32, 3, 1, 32, 2, DType::f32, Layout::nchw), 2.0, 13});
  // Depthwise with 16-byte vectors: partial pixel blocks, bias + activation, offset groups,
  // a 5x5 kernel (several tap batches), and through the nchw transpose.
  d = desc(3, 64, 7, 9, 64, 3, 1, 64, 1, DType::f16, Layout::nhwc);
  d.bias = true, d.act = Activation::gelu;
  v.push_back({"depthwise_vec_f16_nhwc", d, 2.0, 14});
  v.push_back({"depthwise_vec_f32_nhwc_og2", desc(2, 128, 11, 5, 128, 3, 1, 128, 2, DType::f32, Layout::nhwc), 8.0, 15});
  v.push_back({"depthwise_vec_f16_nchw_og2", desc(2, 128, 7, 9, 128, 5, 2, 128, 2, DType::f16, Layout::nchw), 2.0, 16});
  // Offset groups of 32 channels, narrower than a block's 64: no points table (each thread
  // computes its own points), in both layouts.
  v.push_back({"depthwise_vec_f16_nhwc_og4", desc(2, 128, 8, 10, 128, 3, 1, 128, 4, DType::f16, Layout::nhwc), 2.0, 22});
  v.push_back({"depthwise_vec_f16_nchw_og4", desc(2, 128, 8, 10, 128, 3, 1, 128, 4, DType::f16, Layout::nchw), 2.0, 23});
  // Narrow images: one column (no 2 x 2 corner block: the per-channel path) and two columns
  // and rows (the block clamped at every point), with offsets that leave the image.
  v.push_back({"depthwise_vec_f16_nhwc_w1", desc(2, 64, 9, 1, 64, 3, 1, 64, 1, DType::f16, Layout::nhwc), 2.0, 20});
  v.push_back({"depthwise_vec_f32_nhwc_2x2", desc(3, 32, 2, 2, 32, 3, 1, 32, 1, DType::f32, Layout::nhwc), 8.0, 21});
  // The nchw transpose pre-pass with 16-byte vectors on both sides, partial 64 x 64 tiles
  // along the channels (40, 24) and the pixels (168, 60).
  v.push_back({"transpose16_partial_f16_nchw", desc(2, 40, 12, 14, 24, 3, 1, 1, 1, DType::f16, Layout::nchw), 2.0, 18});
  d = desc(3, 24, 6, 10, 28, 3, 1, 1, 1, DType::f32, Layout::nchw);
  d.math = MathMode::tf32;
  v.push_back({"transpose16_partial_tf32_nchw", d, 2.0, 19});
  v.push_back({"odd_channels_f32_nhwc", desc(3, 3, 11, 13, 5, 3, 1, 1, 1, DType::f32, Layout::nhwc), 2.0, 8});
  v.push_back({"odd_channels_f16_nhwc", desc(1, 6, 11, 13, 10, 3, 0, 2, 2, DType::f16, Layout::nhwc), 2.0, 9});
  d = desc(2, 8, 15, 15, 12, 1, 0, 1, 1, DType::bf16, Layout::nchw);
  d.stride_h = d.stride_w = 2;
  v.push_back({"pointwise_stride2_bf16_nchw", d, 2.0, 10});
  d = desc(1, 12, 13, 17, 20, 5, 2, 4, 2, DType::f32, Layout::nhwc);
  d.dil_h = d.dil_w = 2, d.pad_h = d.pad_w = 4, d.act = Activation::gelu;
  v.push_back({"far_offsets_f32_nhwc", d, 8.0, 11});
  d.dtype = DType::f64, d.layout = Layout::nchw;
  v.push_back({"far_offsets_f64_nchw", d, 8.0, 12});
  return v;
}

class GpuForward : public ::testing::TestWithParam<GpuCase> {};

TEST_P(GpuForward, MatchesReference) {
  DEFT_SKIP_WITHOUT_GPU();
  const GpuCase& c = GetParam();
  SCOPED_TRACE("case " + c.name + " sigma=" + std::to_string(c.sigma) +
               " seed=" + std::to_string(c.seed));
  check_forward(c.desc, random_tensors(c.desc, c.sigma, c.seed));
}

auto param_name = [](const ::testing::TestParamInfo<GpuCase>& info) { return info.param.name; };
INSTANTIATE_TEST_SUITE_P(Random, GpuForward, ::testing::ValuesIn(random_cases()), param_name);
INSTANTIATE_TEST_SUITE_P(Fixed, GpuForward, ::testing::ValuesIn(fixed_cases()), param_name);

// ---- (b) the same description compiles to the same kernel -----------------------------------

TEST(GpuCompile, SameDescriptionReturnsSameKernel) {
  DEFT_SKIP_WITHOUT_GPU();
  LayerDesc d = random_cases()[0].desc;
  SCOPED_TRACE(deft::to_string(d));
  const deft::CompileOptions options = test_options();
  const deft::Kernel k1 = deft::compile(d, options);
  const int64_t compiles = deft::stats().nvrtc_compiles;
  const deft::Kernel k2 = deft::compile(d, options);
  EXPECT_EQ(k1.impl(), k2.impl());
  EXPECT_EQ(deft::stats().nvrtc_compiles, compiles) << "second compile ran NVRTC again";
  // A parsed copy of the canonical text is the same description, hence the same kernel.
  EXPECT_EQ(deft::compile(deft::parse_layer_desc(deft::to_string(d)), options).impl(), k1.impl());
  // A different description is a different kernel.
  d.k += d.groups;
  EXPECT_NE(deft::compile(d, options).impl(), k1.impl());
}

// ---- (c) NaN, infinite and huge offsets sample zero ----------------------------------------

// Replaces about a fifth of the offsets (either coordinate, independently) with NaN, +-1e30 or
// +-inf; the reference gives those taps zero contribution.
void poison_offsets(std::vector<double>& offset, uint64_t seed) {
  const double inf = std::numeric_limits<double>::infinity();
  const double specials[] = {std::numeric_limits<double>::quiet_NaN(), 1e30, -1e30, inf, -inf};
  std::mt19937_64 rng(seed);
  std::bernoulli_distribution hit(0.2);
  std::uniform_int_distribution<int> which(0, 4);
  for (double& o : offset)
    if (hit(rng)) o = specials[which(rng)];  // f16 stores 1e30 as inf: still far outside
}

// True when `v` is valid for `d` and deft has a kernel for it (compiling it once, which the
// following compile() of the same options reuses).
bool variant_compiles(const LayerDesc& d, const deft::Variant& v) {
  deft::CompileOptions options = test_options();
  options.variant = v;
  try {
    deft::validate(d, v);
    deft::compile(d, options);
    return true;
  } catch (const deft::DescError&) {
  } catch (const deft::NotImplemented&) {
  }
  return false;
}

TEST(GpuForwardEdge, NonFiniteAndHugeOffsetsSampleZero) {
  DEFT_SKIP_WITHOUT_GPU();
  int seed = 100;
  for (DType dt : {DType::f32, DType::f16, DType::bf16, DType::f64})
    for (Layout layout : {Layout::nchw, Layout::nhwc}) {
      LayerDesc d;
      d.n = 2, d.c = 8, d.h = 13, d.w = 17, d.k = 12, d.r = d.s = 3, d.pad_h = d.pad_w = 1;
      d.offset_groups = 2, d.mask = true, d.bias = true, d.dtype = dt, d.layout = layout;
      HostTensors t = random_tensors(d, 2.0, ++seed);
      poison_offsets(t.offset, seed);
      // The default variant, and (where the layer allows it and a kernel exists) the
      // shared-memory window variant, whose out-of-window fallback is where a bad offset
      // could escape.
      std::vector<std::optional<deft::Variant>> variants = {std::nullopt};
      deft::Variant window = deft::default_variant(d);
      window.staging = deft::Staging::window, window.halo = 2;
      if (variant_compiles(d, window)) variants.push_back(window);
      for (const auto& v : variants) {
        SCOPED_TRACE(v ? "variant " + deft::to_string(*v) : std::string("default variant"));
        deft::CompileOptions options = test_options();
        options.variant = v;
        check_forward(d, t, options);
      }
    }
  // Depthwise with 16-byte vectors (nhwc, and nchw through the transpose): the clamped corner
  // block of deform_conv_depthwise.cuh gives a point outside the image (NaN, huge) weight zero.
  // One offset group: the points table (deft_dw_point once a point, in shared memory); two
  // (16 channels each, a block's 32 in two groups): each thread's own points.
  for (int og : {1, 2})
  for (DType dt : {DType::f32, DType::f16})
    for (Layout layout : {Layout::nchw, Layout::nhwc}) {
      LayerDesc d = desc(2, 32, 9, 12, 32, 3, 1, 32, og, dt, layout);
      d.bias = true;
      HostTensors t = random_tensors(d, 2.0, ++seed);
      poison_offsets(t.offset, seed);
      SCOPED_TRACE(deft::to_string(d));
      check_forward(d, t, test_options());
    }
}

// The depthwise forward with staging=window (the tile's input window in shared memory, points
// outside it from global memory): small and large offsets (the window serves most points, or
// few), partial tiles, both tile heights, halo 0 to 4, stride 2, dilation 2, a 5 x 5 kernel,
// offset groups, bias + activation, both layouts (nchw through the transpose), three dtypes,
// and NaN / huge offsets.
TEST(GpuForwardDwWindow, MatchesReference) {
  DEFT_SKIP_WITHOUT_GPU();
  struct Case {
    LayerDesc d;
    int tm, halo;
    double sigma;
    bool poison;
  };
  std::vector<Case> cases;
  for (DType dt : {DType::f16, DType::f32, DType::bf16})
    for (Layout layout : {Layout::nhwc, Layout::nchw}) {
      LayerDesc d = desc(2, 64, 13, 19, 64, 3, 1, 64, 1, dt, layout);  // tiles partial both ways
      cases.push_back({d, 64, 1, 0.5, false});
      cases.push_back({d, 32, 2, 8.0, false});
      d.bias = true, d.act = Activation::gelu;
      cases.push_back({d, 64, 0, 2.0, true});
    }
  LayerDesc d = desc(1, 128, 17, 12, 128, 3, 1, 128, 2, DType::f16, Layout::nhwc);
  d.stride_h = d.stride_w = 2;
  cases.push_back({d, 64, 1, 1.0, false});
  d = desc(2, 64, 12, 16, 64, 3, 2, 64, 1, DType::f16, Layout::nchw);
  d.dil_h = d.dil_w = 2;
  cases.push_back({d, 32, 4, 2.0, false});
  cases.push_back({desc(2, 32, 11, 9, 32, 5, 2, 32, 1, DType::f32, Layout::nhwc), 64, 2, 2.0, false});
  cases.push_back({desc(3, 64, 2, 3, 64, 3, 1, 64, 1, DType::f16, Layout::nhwc), 32, 1, 2.0, true});
  int seed = 300;
  int ran = 0;
  for (const Case& c : cases) {
    deft::Variant v = deft::default_variant(c.d);
    ASSERT_EQ(v.algo, deft::Algo::depthwise);
    v.tile_m = c.tm, v.staging = deft::Staging::window, v.halo = c.halo;
    SCOPED_TRACE(deft::to_string(c.d) + " variant " + deft::to_string(v) +
                 " sigma=" + std::to_string(c.sigma));
    ASSERT_TRUE(variant_compiles(c.d, v));
    HostTensors t = random_tensors(c.d, c.sigma, ++seed);
    if (c.poison) poison_offsets(t.offset, seed);
    deft::CompileOptions options = test_options();
    options.variant = v;
    check_forward(c.d, t, options);
    ++ran;
  }
  EXPECT_EQ(ran, int(cases.size()));
}

// A tensor that a kernel reads in 16-byte vectors but that starts 2 bytes past a 16-byte
// boundary is refused with a message naming it, before any launch; so is a pointer that is not
// on its element size. The context stays usable: a correct run follows.
TEST(GpuForwardEdge, MisalignedTensorsGiveAClearError) {
  DEFT_SKIP_WITHOUT_GPU();
  const LayerDesc d = desc(2, 64, 9, 11, 64, 3, 1, 1, 1, DType::f16, Layout::nhwc);
  const HostTensors t = random_tensors(d, 2.0, 77);
  const deft::Kernel kernel = deft::compile(d, test_options());
  const std::vector<uint8_t> x = encode(t.input, d.dtype);
  const std::vector<uint8_t> w = encode(t.weight, d.dtype);
  DeviceBuffer input(x.size() + 16), offset(encode(t.offset, d.dtype)),
      mask(encode(t.mask, d.dtype)), weight(w.size() + 16);
  DeviceBuffer output(size_t(d.n * d.k * d.out_h() * d.out_w()) * 2);
  DEFT_CUDA_CHECK(cudaMemcpy(input.get(), x.data(), x.size(), cudaMemcpyHostToDevice));
  DEFT_CUDA_CHECK(cudaMemcpy(weight.get(), w.data(), w.size(), cudaMemcpyHostToDevice));
  Stream stream;
  auto run = [&](const void* in, const void* wt) {
    kernel.forward({.input = in, .offset = offset.get(), .mask = mask.get(),
                    .weight = wt, .bias = nullptr, .output = output.get()},
                   stream.cu());
  };
  auto message = [&](const void* in, const void* wt) -> std::string {
    try {
      run(in, wt);
    } catch (const deft::Error& e) {
      return e.what();
    }
    return "";
  };
  const char* base = static_cast<const char*>(input.get());
  const char* wbase = static_cast<const char*>(weight.get());
  EXPECT_NE(message(base + 2, wbase).find("input at"), std::string::npos) << message(base + 2, wbase);
  EXPECT_NE(message(base + 2, wbase).find("not 16-byte aligned"), std::string::npos);
  EXPECT_NE(message(base + 1, wbase).find("not aligned to its 2-byte elements"), std::string::npos);
  if (kernel.variant().algo == deft::Algo::gemm_wgmma) {  // the weight pack's 16-byte loads
    EXPECT_NE(message(base, wbase + 2).find("weight at"), std::string::npos) << message(base, wbase + 2);
    EXPECT_NE(message(base, wbase + 2).find("not 16-byte aligned"), std::string::npos);
  }
  EXPECT_NO_THROW(run(base, wbase));
  stream.sync();
  DEFT_CUDA_CHECK(cudaGetLastError());
}

// The forward's workspace (here the channels-last input and the packed weight) comes from deft's
// pool, which keeps it across a synchronisation (the device's default pool would return it to
// the driver there) until release_workspace(); a forward after the release still works.
TEST(GpuForwardEdge, WorkspacePoolKeepsFreedMemoryUntilReleased) {
  DEFT_SKIP_WITHOUT_GPU();
  const LayerDesc d = desc(2, 64, 9, 11, 64, 3, 1, 1, 1, DType::f16, Layout::nchw);
  const HostTensors t = random_tensors(d, 2.0, 78);
  const deft::Kernel kernel = deft::compile(d, test_options());
  const uint64_t need = kernel.info().workspace_bytes;
  ASSERT_GT(need, 0u) << "an nchw layer reads a channels-last copy";
  DeviceBuffer input(encode(t.input, d.dtype)), offset(encode(t.offset, d.dtype)),
      mask(encode(t.mask, d.dtype)), weight(encode(t.weight, d.dtype));
  DeviceBuffer output(size_t(d.n * d.k * d.out_h() * d.out_w()) * 2);
  Stream stream;
  auto run = [&] {
    kernel.forward({.input = input.get(), .offset = offset.get(), .mask = mask.get(),
                    .weight = weight.get(), .bias = nullptr, .output = output.get()},
                   stream.cu());
    stream.sync();
    DEFT_CUDA_CHECK(cudaDeviceSynchronize());
  };
  run();
  deft::WorkspaceStats s = deft::workspace_stats();
  EXPECT_GE(s.reserved_bytes, need) << "freed workspace kept across the synchronisation";
  EXPECT_EQ(s.used_bytes, 0u) << "nothing in flight after the synchronisation";
  deft::release_workspace();
  s = deft::workspace_stats();
  EXPECT_EQ(s.reserved_bytes, 0u);
  run();
  EXPECT_GE(deft::workspace_stats().reserved_bytes, need);
  DEFT_CUDA_CHECK(cudaGetLastError());
}

TEST(GpuForwardEdge, AllOffsetsNaNGiveActivatedBias) {
  DEFT_SKIP_WITHOUT_GPU();
  for (Layout layout : {Layout::nchw, Layout::nhwc}) {
    LayerDesc d;
    d.n = 1, d.c = 4, d.h = 9, d.w = 11, d.k = 8, d.r = d.s = 3, d.pad_h = d.pad_w = 1;
    d.mask = true, d.bias = true, d.act = Activation::gelu, d.layout = layout;
    HostTensors t = random_tensors(d, 2.0, 7);
    std::fill(t.offset.begin(), t.offset.end(), std::numeric_limits<double>::quiet_NaN());
    check_forward(d, t);  // reference: gelu(bias[k]) everywhere
  }
}

// ---- (d) the Hopper wgmma kernel ------------------------------------------------------------

// Layers for algo=gemm_wgmma: partial pixel tiles, output channels that do not fill a tile,
// a partial 32-channel chunk (c/groups = 40), groups and offset groups (two offset groups in
// one weight group, and one offset group across two weight groups), strides, dilation, a 1x1
// and a 5x5 kernel, bias + activation, both layouts and all three dtypes (f32 in tf32 math
// with 16-channel chunks, also c/groups = 36: a chunk of 4 channels); every tile shape.
std::vector<GpuCase> wgmma_cases() {
  std::vector<GpuCase> v;
  LayerDesc d = desc(2, 64, 13, 17, 96, 3, 1, 1, 1, DType::f16, Layout::nhwc);
  v.push_back({"wgmma_f16_nhwc", d, 2.0, 41});
  d.layout = Layout::nchw, d.dtype = DType::bf16, d.bias = true, d.act = Activation::relu;
  v.push_back({"wgmma_bf16_nchw_bias_relu", d, 2.0, 42});
  d = desc(3, 40, 11, 9, 40, 3, 1, 1, 1, DType::f16, Layout::nchw);  // partial chunk, odd k
  v.push_back({"wgmma_partial_chunk_f16_nchw", d, 8.0, 43});
  d = desc(2, 128, 10, 12, 200, 3, 1, 2, 4, DType::bf16, Layout::nhwc);  // 2 ogs per group
  d.bias = true, d.act = Activation::gelu;
  v.push_back({"wgmma_groups_og4_bf16_nhwc", d, 2.0, 44});
  d = desc(1, 64, 12, 14, 64, 3, 1, 2, 1, DType::f16, Layout::nhwc);  // og spans 2 groups
  v.push_back({"wgmma_og_across_groups_f16_nhwc", d, 2.0, 45});
  d = desc(2, 64, 21, 19, 72, 3, 2, 1, 2, DType::f16, Layout::nchw);
  d.stride_h = d.stride_w = 2, d.dil_h = d.dil_w = 2;
  v.push_back({"wgmma_stride2_dil2_f16_nchw", d, 2.0, 46});
  d = desc(2, 96, 9, 9, 136, 5, 2, 1, 1, DType::bf16, Layout::nchw);
  v.push_back({"wgmma_5x5_bf16_nchw", d, 2.0, 47});
  d = desc(2, 48, 9, 11, 72, 5, 2, 1, 1, DType::f32, Layout::nhwc);  // 25 taps: the pack's
  d.math = MathMode::tf32;                                            // rounds of 16 and 9
  v.push_back({"wgmma_5x5_tf32_nhwc", d, 2.0, 55});
  d = desc(4, 256, 8, 8, 256, 1, 0, 1, 1, DType::f16, Layout::nhwc);
  v.push_back({"wgmma_1x1_f16_nhwc", d, 2.0, 48});
  d = desc(2, 64, 14, 14, 100, 3, 1, 1, 1, DType::f16, Layout::nchw);  // 196 px: 8-byte stores
  v.push_back({"wgmma_8byte_stores_f16_nchw", d, 2.0, 53});
  d.layout = Layout::nhwc;  // k = 100: 8-byte stores along the channels
  v.push_back({"wgmma_8byte_stores_f16_nhwc", d, 2.0, 54});
  d = desc(2, 64, 13, 17, 96, 3, 1, 1, 1, DType::f32, Layout::nhwc);
  d.math = MathMode::tf32;
  v.push_back({"wgmma_tf32_nhwc", d, 2.0, 49});
  d = desc(3, 36, 11, 9, 40, 3, 1, 1, 1, DType::f32, Layout::nchw);  // chunks of 16, 16, 4
  d.math = MathMode::tf32, d.bias = true, d.act = Activation::gelu;
  v.push_back({"wgmma_tf32_partial_chunk_nchw_bias_gelu", d, 8.0, 50});
  d = desc(2, 128, 10, 12, 200, 3, 1, 2, 4, DType::f32, Layout::nhwc);  // 2 ogs per group
  d.math = MathMode::tf32;
  v.push_back({"wgmma_tf32_groups_og4_nhwc", d, 2.0, 51});
  d = desc(2, 64, 21, 19, 72, 3, 2, 1, 2, DType::f32, Layout::nchw);
  d.stride_h = d.stride_w = 2, d.dil_h = d.dil_w = 2, d.math = MathMode::tf32;
  v.push_back({"wgmma_tf32_stride2_dil2_nchw", d, 2.0, 52});
  return v;
}

class GpuForwardWgmma : public ::testing::TestWithParam<GpuCase> {};

TEST_P(GpuForwardWgmma, EveryTileMatchesReference) {
  DEFT_SKIP_WITHOUT_GPU();
  if (device_arch() != 90) GTEST_SKIP() << "algo=gemm_wgmma runs on sm_90 only";
  const GpuCase& c = GetParam();
  SCOPED_TRACE("case " + c.name + " sigma=" + std::to_string(c.sigma));
  const HostTensors t = random_tensors(c.desc, c.sigma, c.seed);
  std::vector<deft::Variant> variants;
  for (int tm : {128, 64})
    for (int tn : {256, 128, 64}) {
      deft::Variant v;
      v.algo = deft::Algo::gemm_wgmma;
      v.tile_m = tm, v.tile_n = tn, v.tile_k = 64 / deft::dtype_size(c.desc.dtype);
      v.threads = 2 * tm;
      v.transpose = c.desc.layout == Layout::nchw;
      variants.push_back(v);
      // staging=window on two tiles, with no halo and with a 3-pixel halo (sigma 2 and 8 put
      // corners both inside and outside the window); skipped where a layer cannot take it
      // (a 1x1 kernel).
      if (tn == 256 || (tm == 64) != (tn == 128)) continue;
      v.staging = deft::Staging::window;
      v.halo = tm == 64 ? 0 : 3;
      try {
        deft::validate(c.desc, v);
      } catch (const deft::DescError&) {
        continue;
      }
      variants.push_back(v);
    }
  // The warp-specialised form (producer warpgroups sample A into shared memory): every
  // consumer grid (one or two consumer warpgroups, along the rows or the output channels,
  // tn = 512 included), one and two producer warpgroups, the shallowest rings they take (one
  // slot per producer warp, each slot refilled many times) and the plan's own depth. A tile
  // the layer cannot take is refused by the plan (a 5x5 kernel's points of 128 rows leave no
  // room for a ring of one stage per producer warp); at most one of the eleven may be.
  int ws_tiles = 0;
  for (auto [tm, tn, producers, stages] :
       {std::array{64, 256, 1, 0}, {64, 128, 1, 0}, {64, 128, 2, 0}, {64, 64, 2, 0}, {64, 64, 1, 0},
        {128, 64, 1, 0}, {128, 128, 2, 0}, {128, 256, 1, 0}, {64, 512, 1, 0}, {64, 256, 2, 8},
        {64, 128, 1, 4}}) {
    deft::Variant v;
    v.algo = deft::Algo::gemm_wgmma;
    v.tile_m = tm, v.tile_n = tn, v.tile_k = 64 / deft::dtype_size(c.desc.dtype);
    v.producers = producers, v.stages = stages;
    v.threads = 128 * (producers + tm / 64 * std::max(1, tn / 256));
    v.transpose = c.desc.layout == Layout::nchw;
    try {
      deft::validate(c.desc, v);
    } catch (const deft::DescError& e) {
      EXPECT_TRUE(e.field() == "stages" || e.field() == "tm") << deft::to_string(v) << ": " << e.what();
      continue;
    }
    ++ws_tiles;
    variants.push_back(v);
  }
  EXPECT_GE(ws_tiles, 10);
  // NVRTC for all of them at once (the run below finds them in deft's in-process cache), then
  // each against the reference.
  const std::vector<deft::Kernel> compiled = compile_in_parallel(c.desc, variants, test_options());
  for (const deft::Variant& v : variants) {
    SCOPED_TRACE("variant " + deft::to_string(v));
    deft::CompileOptions options = test_options();
    options.variant = v;
    check_forward(c.desc, t, options);
  }
  // On sm_90 the heuristic itself picks the wgmma kernel for these layers (where whole
  // chunks, or at least 64 channels, fill the reduction).
  const int64_t cg = c.desc.c_per_group();
  if (cg % (64 / deft::dtype_size(c.desc.dtype)) == 0 || cg >= 64)
    EXPECT_EQ(deft::default_variant(c.desc, 90).algo, deft::Algo::gemm_wgmma);
}

TEST(GpuForwardWgmmaEdge, NonFiniteAndHugeOffsetsSampleZero) {
  DEFT_SKIP_WITHOUT_GPU();
  if (device_arch() != 90) GTEST_SKIP() << "algo=gemm_wgmma runs on sm_90 only";
  int seed = 200;
  for (DType dt : {DType::f16, DType::bf16, DType::f32})
    for (Layout layout : {Layout::nchw, Layout::nhwc}) {
      LayerDesc d;
      if (dt == DType::f32) d.math = MathMode::tf32;
      d.n = 2, d.c = 64, d.h = 13, d.w = 17, d.k = 48, d.r = d.s = 3, d.pad_h = d.pad_w = 1;
      d.offset_groups = 2, d.mask = true, d.bias = true, d.dtype = dt, d.layout = layout;
      HostTensors t = random_tensors(d, 2.0, ++seed);
      poison_offsets(t.offset, seed);
      deft::CompileOptions options = test_options();
      options.variant = deft::default_variant(d, 90);
      ASSERT_EQ(options.variant->algo, deft::Algo::gemm_wgmma);
      check_forward(d, t, options);
      options.variant->producers = 1;  // the warp-specialised form
      options.variant->tile_m = 64, options.variant->tile_n = 64, options.variant->threads = 256;
      SCOPED_TRACE("variant " + deft::to_string(*options.variant));
      check_forward(d, t, options);
    }
}

INSTANTIATE_TEST_SUITE_P(Hopper, GpuForwardWgmma, ::testing::ValuesIn(wgmma_cases()), param_name);

// ---- CPU checks of the helpers and the contract the tests rely on ---------------------------

TEST(GpuTestUtil, HalfRoundsToNearestEven) {
  EXPECT_EQ(float_to_half_bits(1.0f), 0x3c00);
  EXPECT_EQ(float_to_half_bits(-2.0f), 0xc000);
  EXPECT_EQ(float_to_half_bits(1.0f + 0x1p-11f), 0x3c00);      // tie -> even
  EXPECT_EQ(float_to_half_bits(1.0f + 3 * 0x1p-11f), 0x3c02);  // tie -> even (up)
  EXPECT_EQ(float_to_half_bits(1.0f + 0x1p-11f + 0x1p-20f), 0x3c01);
  EXPECT_EQ(float_to_half_bits(65504.0f), 0x7bff);
  EXPECT_EQ(float_to_half_bits(65519.0f), 0x7bff);
  EXPECT_EQ(float_to_half_bits(65520.0f), 0x7c00);  // rounds to inf
  EXPECT_EQ(float_to_half_bits(1e30f), 0x7c00);
  EXPECT_EQ(float_to_half_bits(0x1p-14f), 0x0400);  // smallest normal
  EXPECT_EQ(float_to_half_bits(0x1p-24f), 0x0001);  // smallest subnormal
  EXPECT_EQ(float_to_half_bits(0x1p-25f), 0x0000);  // tie -> even (zero)
  EXPECT_EQ(float_to_half_bits(1.5f * 0x1p-24f), 0x0002);
  EXPECT_EQ(float_to_half_bits(-0.0f), 0x8000);
  EXPECT_TRUE(std::isnan(half_bits_to_double(float_to_half_bits(NAN))));
  EXPECT_EQ(half_bits_to_double(0x7bff), 65504.0);
  EXPECT_EQ(half_bits_to_double(0x0001), 0x1p-24);
  EXPECT_EQ(half_bits_to_double(0x3555), 0x1.554p-2);
}

TEST(GpuTestUtil, Bfloat16RoundsToNearestEven) {
  EXPECT_EQ(float_to_bfloat16_bits(1.0f), 0x3f80);
  EXPECT_EQ(float_to_bfloat16_bits(3.0f), 0x4040);
  EXPECT_EQ(float_to_bfloat16_bits(1.0f + 0x1p-8f), 0x3f80);      // tie -> even
  EXPECT_EQ(float_to_bfloat16_bits(1.0f + 3 * 0x1p-8f), 0x3f82);  // tie -> even (up)
  EXPECT_EQ(float_to_bfloat16_bits(1.0f + 0x1p-8f + 0x1p-20f), 0x3f81);
  EXPECT_NEAR(bfloat16_bits_to_double(float_to_bfloat16_bits(-1e30f)) / -1e30, 1.0, 0x1p-8);
  EXPECT_EQ(float_to_bfloat16_bits(std::numeric_limits<float>::max()), 0x7f80);  // -> inf
  EXPECT_TRUE(std::isnan(bfloat16_bits_to_double(float_to_bfloat16_bits(NAN))));
  EXPECT_EQ(bfloat16_bits_to_double(0x3f81), 1.0 + 0x1p-7);
}

TEST(GpuTestUtil, QuantizedValuesRoundTripAndPoisonIsNaN) {
  std::mt19937_64 rng(3);
  std::uniform_real_distribution<double> u(-3, 3);
  for (DType dt : {DType::f32, DType::f16, DType::bf16, DType::f64}) {
    SCOPED_TRACE(std::string(deft::to_string(dt)));
    std::vector<double> v(1000);
    for (double& x : v) x = u(rng);
    quantize_in_place(v, dt);
    EXPECT_EQ(decode(encode(v, dt), dt), v);
    const std::vector<double> poison = decode(std::vector<uint8_t>(64, 0xFF), dt);
    EXPECT_EQ(count_nonfinite(poison), (int64_t)poison.size());
  }
  EXPECT_EQ(quantize(1.0 + 0x1p-12, DType::f16), 1.0);
  EXPECT_EQ(quantize(0.1, DType::f32), (double)0.1f);
}

TEST(GpuTestUtil, RelativeError) {
  const std::vector<double> ref = {3.0, 4.0};
  EXPECT_EQ(relative_error(ref, ref), 0.0);
  EXPECT_DOUBLE_EQ(relative_error({3.0, 4.5}, ref), 0.1);
  EXPECT_EQ(relative_error({3.0, NAN}, ref), std::numeric_limits<double>::infinity());
  EXPECT_EQ(relative_error({3.0, INFINITY}, ref), std::numeric_limits<double>::infinity());
  EXPECT_EQ(relative_error({3.0}, ref), std::numeric_limits<double>::infinity());
}

TEST(GpuForwardContract, TensorShapesFollowTheLayout) {
  // The element counts check_forward() allocates must be what deft expects.
  LayerDesc d;
  d.n = 2, d.c = 12, d.h = 13, d.w = 17, d.k = 20, d.r = 3, d.s = 1, d.stride_h = 2;
  d.pad_w = 1, d.groups = 4, d.offset_groups = 2, d.mask = true, d.bias = true;
  const int64_t ho = d.out_h(), wo = d.out_w();  // 6, 19
  ASSERT_EQ(ho, 6);
  ASSERT_EQ(wo, 19);
  deft::TensorShapes s = deft::tensor_shapes(d);
  EXPECT_EQ(s.input, (std::vector<int64_t>{2, 12, 13, 17}));
  EXPECT_EQ(s.offset, (std::vector<int64_t>{2, 2 * 2 * 3, ho, wo}));
  EXPECT_EQ(s.mask, (std::vector<int64_t>{2, 2 * 3, ho, wo}));
  EXPECT_EQ(s.weight, (std::vector<int64_t>{20, 3, 3, 1}));
  EXPECT_EQ(s.bias, (std::vector<int64_t>{20}));
  EXPECT_EQ(s.output, (std::vector<int64_t>{2, 20, ho, wo}));
  d.layout = Layout::nhwc;
  s = deft::tensor_shapes(d);
  EXPECT_EQ(s.input, (std::vector<int64_t>{2, 13, 17, 12}));
  EXPECT_EQ(s.offset, (std::vector<int64_t>{2, ho, wo, 2 * 2 * 3}));
  EXPECT_EQ(s.mask, (std::vector<int64_t>{2, ho, wo, 2 * 3}));
  EXPECT_EQ(s.weight, (std::vector<int64_t>{20, 3, 1, 3}));
  EXPECT_EQ(s.output, (std::vector<int64_t>{2, ho, wo, 20}));
}

}  // namespace
