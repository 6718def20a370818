// Independent checks of the double-precision CPU reference (reference/deform_conv_ref.cpp),
// which every GPU test trusts. Each expectation comes from somewhere else: a plain gather
// convolution written here, hand-computed numbers, exact interpolation of linear images, or
// the other layout. Uses only the inline parts of deft/ir.hpp (no libdeft).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "deft/ir.hpp"
#include "reference/deform_conv_ref.hpp"

namespace {

using deft::Activation;
using deft::LayerDesc;
using deft::Layout;

// ---- helpers --------------------------------------------------------------------------------

// A readable line for SCOPED_TRACE (deft::to_string lives in libdeft, which this file avoids).
std::string describe(const LayerDesc& d) {
  auto s = [](auto v) { return std::to_string(v); };
  return "n=" + s(d.n) + " c=" + s(d.c) + " h=" + s(d.h) + " w=" + s(d.w) + " k=" + s(d.k) +
         " r=" + s(d.r) + " s=" + s(d.s) + " stride=" + s(d.stride_h) + "x" + s(d.stride_w) +
         " pad=" + s(d.pad_h) + "x" + s(d.pad_w) + " dilation=" + s(d.dil_h) + "x" + s(d.dil_w) +
         " groups=" + s(d.groups) + " offset_groups=" + s(d.offset_groups) +
         " mask=" + s(int(d.mask)) + " bias=" + s(int(d.bias)) +
         " layout=" + (d.layout == Layout::nhwc ? "nhwc" : "nchw");
}

// Host tensors of one description (sizes are the same in both layouts).
struct Tensors {
  std::vector<double> input, offset, mask, weight, bias, output;
  explicit Tensors(const LayerDesc& d) {
    const int64_t hw_out = d.out_h() * d.out_w();
    input.resize(d.n * d.c * d.h * d.w);
    offset.resize(d.n * 2 * d.offset_groups * d.taps() * hw_out);
    mask.resize(d.n * d.offset_groups * d.taps() * hw_out);
    weight.resize(d.k * d.c_per_group() * d.taps());
    bias.resize(d.k);
    output.resize(d.n * d.k * hw_out);
  }
};

void fill_uniform(std::vector<double>& v, std::mt19937_64& rng, double lo, double hi) {
  std::uniform_real_distribution<double> u(lo, hi);
  for (double& x : v) x = u(rng);
}

// Random input / weight / bias in [-1, 1] and mask in (0, 1); offsets left to the caller.
void fill_random(Tensors& t, std::mt19937_64& rng) {
  fill_uniform(t.input, rng, -1, 1);
  fill_uniform(t.weight, rng, -1, 1);
  fill_uniform(t.bias, rng, -1, 1);
  fill_uniform(t.mask, rng, 0.01, 1);
}

void run_ref(const LayerDesc& d, Tensors& t) {
  deft::ref::deform_conv2d_forward(d, t.input.data(), t.offset.data(),
                                   d.mask ? t.mask.data() : nullptr, t.weight.data(),
                                   d.bias ? t.bias.data() : nullptr, t.output.data());
}

double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::abs(x));
  return m;
}

void expect_all_near(const std::vector<double>& got, const std::vector<double>& want,
                     double tol) {
  ASSERT_EQ(got.size(), want.size());
  ASSERT_GT(max_abs(want), 0.0) << "degenerate test: expected output is all zeros";
  int64_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!(std::abs(got[i] - want[i]) <= tol)) {
      if (++bad <= 5) ADD_FAILURE() << "element " << i << ": got " << got[i] << " want " << want[i];
    }
  }
  EXPECT_EQ(bad, 0) << "of " << got.size() << " elements";
}

// An independent deformable convolution for integer offsets, NCHW only, loops in another
// order than the reference: each tap reads input[c, y + dy, x + dx] or zero outside the image.
// A non-finite or huge offset contributes zero. Fractional offsets are a test bug.
std::vector<double> gather_conv_nchw(const LayerDesc& d, const Tensors& t) {
  const int64_t HO = d.out_h(), WO = d.out_w(), T = d.taps();
  std::vector<double> out(d.n * d.k * HO * WO, 0.0);
  for (int64_t n = 0; n < d.n; ++n)
    for (int64_t k = 0; k < d.k; ++k) {
      const int64_t g = k / d.k_per_group();
      for (int64_t cl = 0; cl < d.c_per_group(); ++cl) {
        const int64_t c = g * d.c_per_group() + cl;
        const int64_t og = c / d.c_per_offset_group();
        for (int i = 0; i < d.r; ++i)
          for (int j = 0; j < d.s; ++j) {
            const int t_ = i * d.s + j;
            const double w = t.weight[((k * d.c_per_group() + cl) * d.r + i) * d.s + j];
            for (int64_t ho = 0; ho < HO; ++ho)
              for (int64_t wo = 0; wo < WO; ++wo) {
                const int64_t pix = ho * WO + wo;
                const double dy = t.offset[((n * d.offset_groups + og) * 2 * T + 2 * t_) * HO * WO + pix];
                const double dx = t.offset[((n * d.offset_groups + og) * 2 * T + 2 * t_ + 1) * HO * WO + pix];
                if (!std::isfinite(dy) || !std::isfinite(dx) || std::abs(dy) > 1e6 ||
                    std::abs(dx) > 1e6)
                  continue;
                EXPECT_EQ(dy, std::round(dy));
                EXPECT_EQ(dx, std::round(dx));
                const int64_t y = ho * d.stride_h - d.pad_h + i * d.dil_h + (int64_t)dy;
                const int64_t x = wo * d.stride_w - d.pad_w + j * d.dil_w + (int64_t)dx;
                if (y < 0 || y >= d.h || x < 0 || x >= d.w) continue;
                const double m = d.mask ? t.mask[((n * d.offset_groups + og) * T + t_) * HO * WO + pix] : 1.0;
                out[((n * d.k + k) * HO) * WO + pix] += w * m * t.input[((n * d.c + c) * d.h + y) * d.w + x];
              }
          }
      }
      for (int64_t p = 0; p < HO * WO; ++p)
        if (d.bias) out[((n * d.k + k) * HO) * WO + p] += t.bias[k];
    }
  return out;
}

// [n, ch, y, x] -> [n, y, x, ch]; also turns a weight [k, c/g, r, s] into [k, r, s, c/g].
std::vector<double> to_channels_last(const std::vector<double>& v, int64_t n, int64_t ch,
                                     int64_t ys, int64_t xs) {
  std::vector<double> out(v.size());
  for (int64_t a = 0; a < n; ++a)
    for (int64_t c = 0; c < ch; ++c)
      for (int64_t y = 0; y < ys; ++y)
        for (int64_t x = 0; x < xs; ++x)
          out[((a * ys + y) * xs + x) * ch + c] = v[((a * ch + c) * ys + y) * xs + x];
  return out;
}

LayerDesc make_desc(int64_t n, int64_t c, int64_t h, int64_t w, int64_t k, int r, int s,
                    int stride, int pad, int dil, int groups, int offset_groups, bool mask,
                    bool bias = false) {
  LayerDesc d;
  d.n = n, d.c = c, d.h = h, d.w = w, d.k = k, d.r = r, d.s = s;
  d.stride_h = d.stride_w = stride;
  d.pad_h = d.pad_w = pad;
  d.dil_h = d.dil_w = dil;
  d.groups = groups, d.offset_groups = offset_groups, d.mask = mask, d.bias = bias;
  return d;
}

// Geometries shared by several tests: groups, offset groups, stride, padding, dilation,
// asymmetric kernels and odd sizes.
std::vector<LayerDesc> geometries() {
  std::vector<LayerDesc> v = {
      make_desc(1, 1, 5, 6, 1, 1, 1, 1, 0, 1, 1, 1, false),
      make_desc(2, 4, 7, 9, 6, 3, 3, 1, 1, 1, 1, 1, true, true),
      make_desc(1, 8, 9, 8, 4, 3, 3, 2, 1, 1, 2, 4, true),
      make_desc(3, 6, 11, 10, 9, 5, 5, 1, 2, 1, 3, 2, false, true),
      make_desc(1, 4, 13, 17, 8, 3, 3, 1, 2, 2, 4, 4, true),
      make_desc(2, 12, 13, 17, 20, 3, 1, 2, 0, 2, 4, 2, true, true),
      make_desc(1, 4, 6, 7, 4, 3, 3, 1, 1, 1, 4, 1, true),  // depthwise
  };
  LayerDesc a = make_desc(1, 6, 9, 11, 4, 3, 5, 1, 0, 1, 2, 3, true);
  a.stride_h = 2, a.stride_w = 1, a.pad_h = 1, a.pad_w = 2, a.dil_h = 1, a.dil_w = 2;
  v.push_back(a);
  return v;
}

// ---- tests ----------------------------------------------------------------------------------

TEST(ReferenceConv, ZeroOffsetsAndUnitMaskEqualDirectConvolution) {
  std::mt19937_64 rng(1);
  for (LayerDesc d : geometries()) {
    SCOPED_TRACE(describe(d));
    Tensors t(d);
    fill_random(t, rng);
    std::fill(t.offset.begin(), t.offset.end(), 0.0);
    std::fill(t.mask.begin(), t.mask.end(), 1.0);
    const std::vector<double> want = gather_conv_nchw(d, t);
    run_ref(d, t);
    expect_all_near(t.output, want, 1e-12);
  }
}

TEST(ReferenceConv, IntegerOffsetsEqualShiftedConvolution) {
  std::mt19937_64 rng(2);
  std::uniform_int_distribution<int> shift(-3, 3);
  for (LayerDesc d : geometries()) {
    SCOPED_TRACE(describe(d));
    Tensors t(d);
    fill_random(t, rng);
    for (double& o : t.offset) o = shift(rng);  // some taps land outside the image
    const std::vector<double> want = gather_conv_nchw(d, t);
    run_ref(d, t);
    expect_all_near(t.output, want, 1e-12);
  }
}

TEST(ReferenceConv, HandComputedFractionalOffsets) {
  // One channel, 3x3 image I[y][x] = 2^(3y+x), 1x1 kernel with weight 3, mask 0.5, bias 0.25:
  //   out[y][x] = 3 * 0.5 * sample(y + dy, x + dx) + 0.25.
  // Pixel (0,0), offset (0.25, 0.5): y0=0 x0=0, ly=0.25 lx=0.5
  //   sample = .75*.5*I00 + .75*.5*I01 + .25*.5*I10 + .25*.5*I11
  //          = .375*1 + .375*2 + .125*8 + .125*16 = 4.125  ->  out = 6.1875 + .25 = 6.4375
  // Pixel (2,2), offset (0.5, -0.25): y = 2.5, x = 1.75, row 3 is outside (reads zero)
  //   sample = .5*.25*I21 + .5*.75*I22 = .125*128 + .375*256 = 112  ->  out = 168.25
  // Pixel (1,0), offset (-1.5, 0): y = -0.5: only row 0 counts, with weight 0.5
  //   sample = .5*I00 = 0.5  ->  out = 0.75 + .25 = 1
  // Other pixels have zero offsets: out = 1.5 * I[y][x] + 0.25.
  LayerDesc d = make_desc(1, 1, 3, 3, 1, 1, 1, 1, 0, 1, 1, 1, true, true);
  Tensors t(d);
  for (int y = 0; y < 3; ++y)
    for (int x = 0; x < 3; ++x) t.input[y * 3 + x] = std::ldexp(1.0, 3 * y + x);
  t.weight = {3.0};
  t.bias = {0.25};
  std::fill(t.mask.begin(), t.mask.end(), 0.5);
  std::fill(t.offset.begin(), t.offset.end(), 0.0);
  auto set_offset = [&](int y, int x, double dy, double dx) {
    t.offset[0 * 9 + y * 3 + x] = dy;
    t.offset[1 * 9 + y * 3 + x] = dx;
  };
  set_offset(0, 0, 0.25, 0.5);
  set_offset(2, 2, 0.5, -0.25);
  set_offset(1, 0, -1.5, 0.0);
  run_ref(d, t);
  std::vector<double> want(9);
  for (int i = 0; i < 9; ++i) want[i] = 1.5 * t.input[i] + 0.25;
  want[0] = 6.4375;
  want[8] = 168.25;
  want[3] = 1.0;
  for (int i = 0; i < 9; ++i) EXPECT_DOUBLE_EQ(t.output[i], want[i]) << "pixel " << i;
}

TEST(ReferenceConv, FractionalOffsetsInterpolateLinearImagesExactly) {
  // Bilinear interpolation reproduces a linear function a*y + b*x + e exactly. Give every
  // channel its own linear image, steer every sample to a random point inside the image, and
  // the output becomes a closed-form sum (exercises offset indexing, dy/dx order, groups).
  std::mt19937_64 rng(3);
  for (LayerDesc d : geometries()) {
    SCOPED_TRACE(describe(d));
    Tensors t(d);
    fill_random(t, rng);
    std::vector<double> a(d.c), b(d.c), e(d.c);
    fill_uniform(a, rng, -1, 1), fill_uniform(b, rng, -1, 1), fill_uniform(e, rng, -1, 1);
    for (int64_t n = 0; n < d.n; ++n)
      for (int64_t c = 0; c < d.c; ++c)
        for (int64_t y = 0; y < d.h; ++y)
          for (int64_t x = 0; x < d.w; ++x)
            t.input[((n * d.c + c) * d.h + y) * d.w + x] = a[c] * y + b[c] * x + e[c] + n;
    const int64_t HO = d.out_h(), WO = d.out_w(), T = d.taps(), OG = d.offset_groups;
    std::uniform_real_distribution<double> ty(0, d.h - 1), tx(0, d.w - 1);
    std::vector<double> target_y(d.n * OG * T * HO * WO), target_x(target_y.size());
    for (int64_t n = 0; n < d.n; ++n)
      for (int64_t og = 0; og < OG; ++og)
        for (int64_t tap = 0; tap < T; ++tap)
          for (int64_t ho = 0; ho < HO; ++ho)
            for (int64_t wo = 0; wo < WO; ++wo) {
              const int64_t q = (((n * OG + og) * T + tap) * HO + ho) * WO + wo;
              target_y[q] = ty(rng), target_x[q] = tx(rng);
              const int64_t i = tap / d.s, j = tap % d.s;
              const int64_t o = ((n * 2 * OG * T + og * 2 * T + 2 * tap) * HO + ho) * WO + wo;
              t.offset[o] = target_y[q] - (ho * d.stride_h - d.pad_h + i * d.dil_h);
              t.offset[o + HO * WO] = target_x[q] - (wo * d.stride_w - d.pad_w + j * d.dil_w);
            }
    std::vector<double> want(t.output.size());
    for (int64_t n = 0; n < d.n; ++n)
      for (int64_t k = 0; k < d.k; ++k)
        for (int64_t ho = 0; ho < HO; ++ho)
          for (int64_t wo = 0; wo < WO; ++wo) {
            double acc = d.bias ? t.bias[k] : 0.0;
            for (int64_t cl = 0; cl < d.c_per_group(); ++cl) {
              const int64_t c = k / d.k_per_group() * d.c_per_group() + cl;
              const int64_t og = c / d.c_per_offset_group();
              for (int64_t tap = 0; tap < T; ++tap) {
                const int64_t q = (((n * OG + og) * T + tap) * HO + ho) * WO + wo;
                const double m = d.mask ? t.mask[q] : 1.0;  // same [n, og*T + t, ho, wo] order
                acc += t.weight[(k * d.c_per_group() + cl) * T + tap] * m *
                       (a[c] * target_y[q] + b[c] * target_x[q] + e[c] + n);
              }
            }
            want[((n * d.k + k) * HO + ho) * WO + wo] = acc;
          }
    run_ref(d, t);
    expect_all_near(t.output, want, 1e-11);
  }
}

// Sample points on and around the border of a 4x5 image, with hand-derived expectations.
struct BorderPoint {
  double y, x;
  double (*expect)(const double* I);  // I[y*5 + x]
};
const int kBH = 4, kBW = 5;
const BorderPoint kBorderPoints[] = {
    {-1.0, 2.0, [](const double*) { return 0.0; }},            // y == -1: outside
    {-0.5, 2.0, [](const double* I) { return 0.5 * I[2]; }},   // half of row 0
    {kBH - 0.5, 1.0, [](const double* I) { return 0.5 * I[3 * 5 + 1]; }},  // y = H-0.5
    {kBH - 1.0, 4.0, [](const double* I) { return I[3 * 5 + 4]; }},        // y = H-1: last row
    {(double)kBH, 0.0, [](const double*) { return 0.0; }},     // y == H: outside
    {2.0, -1.0, [](const double*) { return 0.0; }},            // x == -1
    {2.0, kBW - 0.5, [](const double* I) { return 0.5 * I[2 * 5 + 4]; }},   // x = W-0.5
    {2.0, kBW - 1.0, [](const double* I) { return I[2 * 5 + 4]; }},         // x = W-1
    {2.0, (double)kBW, [](const double*) { return 0.0; }},     // x == W
    {-0.5, -0.5, [](const double* I) { return 0.25 * I[0]; }}, // corner, one of four taps
    {kBH - 0.5, kBW - 0.5, [](const double* I) { return 0.25 * I[3 * 5 + 4]; }},
    {-1.5, 2.0, [](const double*) { return 0.0; }},
    {10.0, 10.0, [](const double*) { return 0.0; }},
    {-1.0, -1.0, [](const double*) { return 0.0; }},
    {1.25, 2.5, [](const double* I) {  // interior: ly = .25, lx = .5
       return .75 * .5 * I[1 * 5 + 2] + .75 * .5 * I[1 * 5 + 3] + .25 * .5 * I[2 * 5 + 2] +
              .25 * .5 * I[2 * 5 + 3];
     }},
};

TEST(ReferenceBilinear, BorderPoints) {
  std::mt19937_64 rng(4);
  std::vector<double> I(kBH * kBW);
  fill_uniform(I, rng, 0.5, 1.5);  // nonzero everywhere, so a wrong zero cannot pass
  // The same plane stored channels-last among 3 channels (row stride 15, column stride 3).
  std::vector<double> I3(3 * kBH * kBW, -7.0);
  for (int p = 0; p < kBH * kBW; ++p) I3[p * 3 + 1] = I[p];
  for (const BorderPoint& p : kBorderPoints) {
    SCOPED_TRACE("y=" + std::to_string(p.y) + " x=" + std::to_string(p.x));
    EXPECT_DOUBLE_EQ(deft::ref::sample_bilinear(I.data(), kBH, kBW, kBW, 1, p.y, p.x), p.expect(I.data()));
    EXPECT_DOUBLE_EQ(deft::ref::sample_bilinear(I3.data() + 1, kBH, kBW, 3 * kBW, 3, p.y, p.x),
                     p.expect(I.data()));
  }
  // Just inside -1 and just below H the value tends continuously to zero / the last row.
  EXPECT_NEAR(deft::ref::sample_bilinear(I.data(), kBH, kBW, kBW, 1, -1 + 1e-9, 0), 1e-9 * I[0], 1e-15);
  EXPECT_NEAR(deft::ref::sample_bilinear(I.data(), kBH, kBW, kBW, 1, kBH - 1e-9, 0), 1e-9 * I[15], 1e-15);
}

TEST(ReferenceBilinear, BorderPointsThroughTheOperatorInBothLayouts) {
  // 3 channels, weight picks channel 1, 1x1 kernel: output pixel p = sample of channel 1 at
  // the p-th border point (offset = point - pixel position).
  std::mt19937_64 rng(5);
  const int npts = sizeof(kBorderPoints) / sizeof(kBorderPoints[0]);
  ASSERT_LE(npts, kBH * kBW);
  for (Layout layout : {Layout::nchw, Layout::nhwc}) {
    LayerDesc d = make_desc(1, 3, kBH, kBW, 1, 1, 1, 1, 0, 1, 1, 1, false);
    d.layout = layout;
    SCOPED_TRACE(describe(d));
    Tensors t(d);
    fill_uniform(t.input, rng, 0.5, 1.5);
    t.weight = {0.0, 1.0, 0.0};
    std::fill(t.offset.begin(), t.offset.end(), 0.0);
    std::vector<double> plane(kBH * kBW);  // channel 1 as a plain [h, w] plane
    for (int p = 0; p < kBH * kBW; ++p)
      plane[p] = layout == Layout::nchw ? t.input[kBH * kBW + p] : t.input[p * 3 + 1];
    auto off = [&](int p, int comp) -> double& {  // offset channel comp (0: dy, 1: dx)
      return layout == Layout::nchw ? t.offset[comp * kBH * kBW + p] : t.offset[p * 2 + comp];
    };
    for (int p = 0; p < npts; ++p) {
      off(p, 0) = kBorderPoints[p].y - p / kBW;
      off(p, 1) = kBorderPoints[p].x - p % kBW;
    }
    run_ref(d, t);
    for (int p = 0; p < npts; ++p)
      EXPECT_NEAR(t.output[p], kBorderPoints[p].expect(plane.data()), 1e-14) << "point " << p;
  }
}

TEST(ReferenceConv, NanAndHugeOffsetsContributeZero) {
  const double inf = std::numeric_limits<double>::infinity();
  const double specials[] = {std::numeric_limits<double>::quiet_NaN(), 1e30, -1e30, inf, -inf,
                             -std::numeric_limits<double>::quiet_NaN(), 1e300};
  std::mt19937_64 rng(6);
  std::uniform_int_distribution<int> shift(-2, 2), pick(0, 6);
  std::bernoulli_distribution special(0.15);
  for (LayerDesc d : geometries()) {
    SCOPED_TRACE(describe(d));
    Tensors t(d);
    fill_random(t, rng);
    for (double& o : t.offset) o = special(rng) ? specials[pick(rng)] : shift(rng);
    const std::vector<double> want = gather_conv_nchw(d, t);
    run_ref(d, t);
    for (double v : t.output) ASSERT_TRUE(std::isfinite(v));
    expect_all_near(t.output, want, 1e-12);
  }
}

TEST(ReferenceConv, NchwAndNhwcAgreeAfterTransposing) {
  std::mt19937_64 rng(7);
  std::normal_distribution<double> offset_px(0.0, 2.0);
  for (LayerDesc d : geometries()) {
    d.act = Activation::relu;
    SCOPED_TRACE(describe(d));
    Tensors a(d);
    fill_random(a, rng);
    for (double& o : a.offset) o = offset_px(rng);
    run_ref(d, a);

    LayerDesc dl = d;
    dl.layout = Layout::nhwc;
    Tensors b(dl);
    const int64_t HO = d.out_h(), WO = d.out_w();
    b.input = to_channels_last(a.input, d.n, d.c, d.h, d.w);
    b.offset = to_channels_last(a.offset, d.n, 2 * d.offset_groups * d.taps(), HO, WO);
    b.mask = to_channels_last(a.mask, d.n, d.offset_groups * d.taps(), HO, WO);
    b.weight = to_channels_last(a.weight, d.k, d.c_per_group(), d.r, d.s);
    b.bias = a.bias;
    run_ref(dl, b);
    expect_all_near(b.output, to_channels_last(a.output, d.n, d.k, HO, WO), 1e-12);
  }
}

TEST(ReferenceEpilogue, BiasThenActivation) {
  std::mt19937_64 rng(8);
  std::normal_distribution<double> offset_px(0.0, 2.0);
  for (LayerDesc d : geometries()) {
    d.bias = false, d.act = Activation::none;
    SCOPED_TRACE(describe(d));
    Tensors t(d);
    fill_random(t, rng);
    for (double& o : t.offset) o = offset_px(rng);
    run_ref(d, t);
    const std::vector<double> plain = t.output;
    const int64_t hw = d.out_h() * d.out_w();
    std::vector<double> with_bias(plain.size());
    for (size_t i = 0; i < plain.size(); ++i) with_bias[i] = plain[i] + t.bias[(i / hw) % d.k];

    d.bias = true;
    run_ref(d, t);
    expect_all_near(t.output, with_bias, 1e-12);

    d.act = Activation::relu;
    run_ref(d, t);
    std::vector<double> want(plain.size());
    for (size_t i = 0; i < want.size(); ++i) want[i] = std::max(0.0, with_bias[i]);
    expect_all_near(t.output, want, 1e-12);
    EXPECT_LT(*std::min_element(with_bias.begin(), with_bias.end()), 0.0) << "relu untested";

    d.act = Activation::gelu;
    run_ref(d, t);
    for (size_t i = 0; i < want.size(); ++i)
      want[i] = 0.5 * with_bias[i] * (1.0 + std::erf(with_bias[i] / std::sqrt(2.0)));
    expect_all_near(t.output, want, 1e-12);
  }
}

TEST(ReferenceEpilogue, KnownActivationValues) {
  // Zero weights: output = act(bias). GELU values from 0.5 x (1 + erf(x / sqrt 2)).
  LayerDesc d = make_desc(1, 2, 3, 3, 4, 1, 1, 1, 0, 1, 1, 1, false, true);
  Tensors t(d);
  std::mt19937_64 rng(9);
  fill_uniform(t.input, rng, -1, 1);
  std::fill(t.weight.begin(), t.weight.end(), 0.0);
  std::fill(t.offset.begin(), t.offset.end(), 0.5);
  t.bias = {1.0, -1.0, 2.0, -0.5};
  const double relu[] = {1.0, 0.0, 2.0, 0.0};
  const double gelu[] = {0.8413447460685429, -0.15865525393145707, 1.9544997361036416,
                         -0.15426876936299344};
  d.act = Activation::relu;
  run_ref(d, t);
  for (int k = 0; k < 4; ++k) EXPECT_DOUBLE_EQ(t.output[k * 9 + 4], relu[k]);
  d.act = Activation::gelu;
  run_ref(d, t);
  for (int k = 0; k < 4; ++k) EXPECT_NEAR(t.output[k * 9 + 4], gelu[k], 1e-15);
}

TEST(ReferenceConv, RejectsInconsistentDescriptions) {
  LayerDesc d = make_desc(1, 6, 5, 5, 4, 3, 3, 1, 1, 1, 4, 1, false);  // groups=4, c=6
  Tensors bad(d);
  EXPECT_THROW(run_ref(d, bad), deft::DescError);
  d = make_desc(1, 4, 5, 5, 4, 3, 3, 1, 1, 1, 1, 1, true);
  Tensors t(d);
  EXPECT_THROW(deft::ref::deform_conv2d_forward(d, t.input.data(), t.offset.data(), nullptr,
                                                t.weight.data(), nullptr, t.output.data()),
               deft::DescError);  // mask=1 without a mask tensor
}

// ---- backward -------------------------------------------------------------------------------

// The reference gradients against central finite differences of the reference forward, in
// both layouts, with groups, offset groups, mask, bias, stride and dilation. Offsets keep
// their fractional parts away from pixel boundaries, where the sample is smooth (bilinear, so
// central differences are exact up to rounding).
TEST(ReferenceBackward, MatchesFiniteDifferences) {
  for (Layout layout : {Layout::nchw, Layout::nhwc}) {
    LayerDesc d;
    d.n = 2, d.c = 4, d.h = 5, d.w = 6, d.k = 6, d.r = 3, d.s = 2;
    d.pad_h = 1, d.pad_w = 1, d.stride_w = 2, d.dil_h = 2;
    d.groups = 2, d.offset_groups = 2, d.mask = true, d.bias = true, d.layout = layout;
    SCOPED_TRACE(deft::to_string(d.layout));
    std::mt19937_64 rng(31);
    std::uniform_real_distribution<double> sym(-1, 1), frac(0.15, 0.85), unit(0, 1);
    std::uniform_int_distribution<int> whole(-3, 2);
    const int64_t hw = d.out_h() * d.out_w();
    std::vector<double> input(d.n * d.c * d.h * d.w), offset(d.n * 2 * d.offset_groups * d.taps() * hw),
        mask(d.n * d.offset_groups * d.taps() * hw), weight(d.k * d.c_per_group() * d.taps()),
        bias(d.k), gout(d.n * d.k * hw);
    for (auto* v : {&input, &weight, &bias, &gout})
      for (double& x : *v) x = sym(rng);
    for (double& x : offset) x = whole(rng) + frac(rng);
    for (double& x : mask) x = unit(rng);
    auto loss = [&] {
      std::vector<double> out(gout.size());
      deft::ref::deform_conv2d_forward(d, input.data(), offset.data(), mask.data(), weight.data(),
                                       bias.data(), out.data());
      double s = 0;
      for (size_t i = 0; i < out.size(); ++i) s += out[i] * gout[i];
      return s;
    };
    std::vector<double> gi(input.size()), go(offset.size()), gm(mask.size()), gw(weight.size()),
        gb(bias.size());
    deft::ref::deform_conv2d_backward(d, input.data(), offset.data(), mask.data(), weight.data(),
                                      gout.data(), gi.data(), go.data(), gm.data(), gw.data(),
                                      gb.data());
    auto check = [&](std::vector<double>& p, const std::vector<double>& g, const char* name) {
      double worst = 0;
      for (size_t i = 0; i < p.size(); ++i) {
        const double keep = p[i], h = 1e-6;
        p[i] = keep + h;
        const double up = loss();
        p[i] = keep - h;
        const double down = loss();
        p[i] = keep;
        worst = std::max(worst, std::abs((up - down) / (2 * h) - g[i]));
      }
      EXPECT_LT(worst, 1e-7) << name;
    };
    check(input, gi, "grad_input");
    check(offset, go, "grad_offset");
    check(mask, gm, "grad_mask");
    check(weight, gw, "grad_weight");
    check(bias, gb, "grad_bias");
    // Some gradient is non-trivial everywhere it should be.
    EXPECT_GT(*std::max_element(go.begin(), go.end()), 0.01);
  }
}

// Points outside the image or at NaN positions contribute nothing to any gradient.
TEST(ReferenceBackward, OutsideAndNanPointsContributeNothing) {
  LayerDesc d;
  d.n = 1, d.c = 2, d.h = 4, d.w = 4, d.k = 3, d.r = 1, d.s = 1, d.mask = true;
  std::vector<double> input(32, 1.5), offset(2 * 16), mask(16, 0.5), weight(6, 0.75), gout(48, 1.0);
  for (size_t i = 0; i < offset.size(); ++i) offset[i] = i % 3 == 0 ? std::nan("") : 1e9;
  std::vector<double> gi(32, -1), go(32, -1), gm(16, -1), gw(6, -1);
  deft::ref::deform_conv2d_backward(d, input.data(), offset.data(), mask.data(), weight.data(),
                                    gout.data(), gi.data(), go.data(), gm.data(), gw.data(), nullptr);
  for (auto* v : {&gi, &go, &gm, &gw})
    for (double x : *v) EXPECT_EQ(x, 0.0);
}

}  // namespace
