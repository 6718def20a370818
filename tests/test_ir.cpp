// LayerDesc / Variant text forms and validation: round trips and every rule's error message.
#include <gtest/gtest.h>

#include <random>

#include "deft/ir.hpp"

namespace {

using deft::DescError;
using deft::LayerDesc;

TEST(LayerDescText, IssueExampleRoundTripsExactly) {
  const std::string text =
      "deform_conv2d n=8 c=64 h=64 w=64 k=64 r=3 s=3 pad=1 groups=1 offset_groups=1 mask=1 "
      "dtype=f16 layout=nchw";
  LayerDesc d = deft::parse_layer_desc(text);
  EXPECT_EQ(d.n, 8);
  EXPECT_EQ(d.c, 64);
  EXPECT_EQ(d.r, 3);
  EXPECT_EQ(d.pad_h, 1);
  EXPECT_EQ(d.pad_w, 1);
  EXPECT_TRUE(d.mask);
  EXPECT_EQ(d.dtype, deft::DType::f16);
  EXPECT_EQ(deft::to_string(d), text);
}

TEST(LayerDescText, OptionalFieldsPrintOnlyWhenSet) {
  const std::string text =
      "deform_conv2d n=2 c=12 h=13 w=17 k=20 r=3 s=1 stride=2x1 pad=1x0 dilation=2 groups=4 "
      "offset_groups=2 mask=0 dtype=f32 math=tf32 layout=nhwc bias=1 act=gelu";
  EXPECT_EQ(deft::to_string(deft::parse_layer_desc(text)), text);
}

TEST(LayerDescText, AnyFieldOrderParsesToTheCanonicalForm) {
  LayerDesc a = deft::parse_layer_desc(
      "deform_conv2d   layout=nhwc dtype=bf16 k=8 c=4 n=1 h=5 w=6 r=3 s=3 pad=1");
  LayerDesc b = deft::parse_layer_desc(deft::to_string(a));
  EXPECT_EQ(a, b);
  EXPECT_EQ(deft::to_string(a), deft::to_string(b));
}

TEST(LayerDescText, AggregateOptionsRoundTrip) {
  const std::string text =
      "deform_aggregate n=2 c=64 h=16 w=16 k=64 r=3 s=3 pad=1 groups=4 offset_groups=4 mask=0 "
      "softmax=1 offset_scale=0.5 remove_center=1 dtype=f16 layout=nhwc";
  EXPECT_EQ(deft::to_string(deft::parse_layer_desc(text)), text);
}

TEST(LayerDescText, RandomDescriptionsRoundTrip) {
  std::mt19937 rng(1234);
  auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  for (int i = 0; i < 500; ++i) {
    LayerDesc d;
    d.groups = 1 << pick(0, 2);
    d.offset_groups = 1 << pick(0, 2);
    d.c = 4 * d.groups * d.offset_groups * pick(1, 4);
    d.k = d.groups * pick(1, 9);
    d.n = pick(1, 9);
    d.h = pick(12, 70);
    d.w = pick(12, 70);
    d.r = pick(1, 5);
    d.s = pick(1, 5);
    d.stride_h = pick(1, 3);
    d.stride_w = pick(1, 3);
    d.pad_h = pick(0, 2);
    d.pad_w = pick(0, 2);
    d.dil_h = pick(1, 2);
    d.dil_w = pick(1, 2);
    d.mask = pick(0, 1);
    d.bias = pick(0, 1);
    d.act = static_cast<deft::Activation>(pick(0, 2));
    d.dtype = static_cast<deft::DType>(pick(0, 3));
    d.math = d.dtype == deft::DType::f32 && pick(0, 1) ? deft::MathMode::tf32 : deft::MathMode::fp32;
    d.layout = static_cast<deft::Layout>(pick(0, 1));
    d.pass = static_cast<deft::Pass>(pick(0, 2));
    ASSERT_NO_THROW(deft::validate(d)) << deft::to_string(d);
    const std::string text = deft::to_string(d);
    LayerDesc back = deft::parse_layer_desc(text);
    EXPECT_EQ(back, d) << text;
    EXPECT_EQ(deft::to_string(back), text);
  }
}

struct BadCase {
  std::string text;
  std::string field;
  std::string message;  // substring of the error
};

class LayerDescErrors : public ::testing::TestWithParam<BadCase> {};

TEST_P(LayerDescErrors, NameTheFieldAndTheRule) {
  const BadCase& c = GetParam();
  try {
    deft::parse_layer_desc(c.text);
    FAIL() << "accepted: " << c.text;
  } catch (const DescError& e) {
    EXPECT_EQ(e.field(), c.field) << e.what();
    EXPECT_NE(std::string(e.what()).find(c.message), std::string::npos)
        << "message: " << e.what() << "\nexpected to contain: " << c.message;
  }
}

const std::string kBase = "deform_conv2d n=8 c=64 h=64 w=64 k=64 r=3 s=3 pad=1 ";

INSTANTIATE_TEST_SUITE_P(
    EveryRule, LayerDescErrors,
    ::testing::Values(
        BadCase{"", "op", "empty layer description"},
        BadCase{"conv9d n=1", "op", "conv9d is not one of deform_conv2d|deform_aggregate|masked_conv2d"},
        BadCase{kBase + "groups=3", "groups", "groups=3 does not divide c=64"},
        BadCase{"deform_conv2d n=1 c=64 h=8 w=8 k=30 r=3 s=3 groups=4", "groups",
                "groups=4 does not divide k=30"},
        BadCase{kBase + "offset_groups=5", "offset_groups", "offset_groups=5 does not divide c=64"},
        BadCase{kBase + "n=0", "n", "given twice"},
        BadCase{"deform_conv2d n=0 c=4 h=4 w=4 k=4", "n", "n=0 must be at least 1"},
        BadCase{"deform_conv2d n=1 c=-4 h=4 w=4 k=4", "c", "c=-4 must be at least 1"},
        BadCase{"deform_conv2d n=1 c=4 h=0 w=4 k=4", "h", "h=0 must be at least 1"},
        BadCase{"deform_conv2d n=1 c=4 h=4 w=0 k=4", "w", "w=0 must be at least 1"},
        BadCase{"deform_conv2d n=1 c=4 h=4 w=4 k=0", "k", "k=0 must be at least 1"},
        BadCase{"deform_conv2d n=1 c=4 h=4 w=4 k=4 r=0", "r", "r=0 must be at least 1"},
        BadCase{"deform_conv2d n=1 c=4 h=4 w=4 k=4 s=0", "s", "s=0 must be at least 1"},
        BadCase{"deform_conv2d n=1 c=4 h=40 w=40 k=4 r=33 s=3", "r", "exceeds 31x31"},
        BadCase{"deform_conv2d n=1 c=4 h=4 w=4 k=4 stride=0", "stride", "stride=0 must be at least 1"},
        BadCase{"deform_conv2d n=1 c=4 h=4 w=4 k=4 pad=-1", "pad", "pad=-1 must not be negative"},
        BadCase{"deform_conv2d n=1 c=4 h=4 w=4 k=4 dilation=0", "dilation",
                "dilation=0 must be at least 1"},
        BadCase{"deform_conv2d n=1 c=4 h=4 w=4 k=4 groups=0", "groups", "groups=0 must be at least 1"},
        BadCase{"deform_conv2d n=1 c=4 h=4 w=4 k=4 offset_groups=0", "offset_groups",
                "offset_groups=0 must be at least 1"},
        BadCase{"deform_conv2d n=1 c=4 h=2 w=8 k=4 r=3 s=3", "h", "output height would be 0"},
        BadCase{"deform_conv2d n=1 c=4 h=8 w=2 k=4 r=3 s=3", "w", "output width would be 0"},
        BadCase{"deform_conv2d n=1 c=4 h=8 w=8 k=4 n=99999999999", "n", "given twice"},
        BadCase{"deform_conv2d n=99999999999 c=4 h=8 w=8 k=4", "n", "exceeds the limit"},
        BadCase{"deform_conv2d n=x c=4 h=8 w=8 k=4", "n", "n=x is not an integer"},
        BadCase{"deform_conv2d n=1 c=4 h=8 w=8 k=4 r=3.5", "r", "r=3.5 is not an integer"},
        BadCase{"deform_conv2d n=1 c=4 h=8 w=8 k=4 mask=2", "mask", "mask=2 is not 0 or 1"},
        BadCase{"deform_conv2d n=1 c=4 h=8 w=8 k=4 bias=yes", "bias", "bias=yes is not 0 or 1"},
        BadCase{"deform_conv2d n=1 c=4 h=8 w=8 k=4 dtype=f8", "dtype", "dtype=f8 is not one of f32|f16|bf16|f64"},
        BadCase{"deform_conv2d n=1 c=4 h=8 w=8 k=4 layout=chwn", "layout", "layout=chwn is not one of nchw|nhwc"},
        BadCase{"deform_conv2d n=1 c=4 h=8 w=8 k=4 pass=sideways", "pass", "pass=sideways is not one of"},
        BadCase{"deform_conv2d n=1 c=4 h=8 w=8 k=4 act=tanh", "act", "act=tanh is not one of none|relu|gelu"},
        BadCase{"deform_conv2d n=1 c=4 h=8 w=8 k=4 math=fp8", "math", "math=fp8 is not one of fp32|tf32"},
        BadCase{"deform_conv2d n=1 c=4 h=8 w=8 k=4 dtype=f16 math=tf32", "math",
                "math=tf32 applies only to dtype=f32, not dtype=f16"},
        BadCase{"deform_conv2d n=1 c=4 h=8 w=8 k=4 colour=red", "colour", "unknown field 'colour'"},
        BadCase{"deform_conv2d n=1 c=4 h=8 w=8 k=4 oops", "oops", "is not of the form field=value"},
        BadCase{"deform_conv2d n=1 c=4 h=8 w=8 k=4 softmax=1", "softmax",
                "softmax applies only to deform_aggregate"},
        BadCase{"deform_aggregate n=1 c=4 h=8 w=8 k=4 layout=nchw", "layout",
                "deform_aggregate is channels-last"},
        BadCase{"deform_aggregate n=1 c=4 h=8 w=8 k=8 layout=nhwc", "k", "k=8 must equal c=4"},
        BadCase{"deform_aggregate n=1 c=4 h=8 w=8 k=4 groups=2 offset_groups=1 layout=nhwc",
                "offset_groups", "offset_groups=1 must equal groups=2"},
        BadCase{"deform_aggregate n=1 c=4 h=8 w=8 k=4 r=2 s=2 remove_center=1 layout=nhwc",
                "remove_center", "remove_center needs an odd kernel"},
        BadCase{"deform_aggregate n=1 c=4 h=8 w=8 k=4 offset_scale=abc layout=nhwc", "offset_scale",
                "offset_scale=abc is not a number"},
        BadCase{"deform_aggregate n=1 c=4 h=8 w=8 k=4 offset_scale=inf layout=nhwc", "offset_scale",
                "offset_scale must be finite"},
        BadCase{"masked_conv2d n=1 c=4 h=8 w=8 k=4 offset_groups=2", "offset_groups",
                "masked_conv2d has no offsets"}));

TEST(LayerDescImplemented, KindsAndPassesWithoutKernelsAreRejected) {
  auto d = deft::parse_layer_desc(
      "deform_aggregate n=1 c=4 h=8 w=8 k=4 r=3 s=3 pad=1 layout=nhwc");
  EXPECT_THROW(deft::require_implemented(d), deft::NotImplemented);
  d = deft::parse_layer_desc("masked_conv2d n=1 c=4 h=8 w=8 k=4 r=3 s=3 pad=1");
  EXPECT_THROW(deft::require_implemented(d), deft::NotImplemented);
  // The backward passes exist, but not with a fused activation.
  EXPECT_NO_THROW(deft::require_implemented(deft::parse_layer_desc(kBase + "pass=backward_data")));
  EXPECT_NO_THROW(deft::require_implemented(deft::parse_layer_desc(kBase + "pass=backward_weight")));
  d = deft::parse_layer_desc(kBase + "pass=backward_data act=gelu");
  try {
    deft::require_implemented(d);
    FAIL();
  } catch (const deft::NotImplemented& e) {
    EXPECT_NE(std::string(e.what()).find("not implemented"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("act=gelu"), std::string::npos);
  }
  EXPECT_NO_THROW(deft::require_implemented(deft::parse_layer_desc(kBase)));
}

TEST(VariantText, RoundTripsAndRejectsUnknownFields) {
  deft::Variant v;
  v.algo = deft::Algo::gemm_tc;
  v.tile_m = 128;
  v.tile_n = 32;
  v.tile_k = 32;
  v.threads = 128;
  const std::string text = deft::to_string(v);
  EXPECT_EQ(text, "algo=gemm_tc tm=128 tn=32 tk=32 threads=128 vec=1 staging=gather halo=0 transpose=0");
  EXPECT_EQ(deft::parse_variant(text), v);
  EXPECT_THROW(deft::parse_variant("algo=magic"), DescError);
  EXPECT_THROW(deft::parse_variant("tm=abc"), DescError);
  EXPECT_THROW(deft::parse_variant("speed=11"), DescError);
  // The wgmma ring depth is printed only when set, so older variant texts stay canonical.
  v.algo = deft::Algo::gemm_wgmma, v.stages = 3;
  EXPECT_EQ(deft::to_string(v), "algo=gemm_wgmma tm=128 tn=32 tk=32 threads=128 vec=1 staging=gather "
                                "halo=0 transpose=0 stages=3");
  EXPECT_EQ(deft::parse_variant(deft::to_string(v)), v);
  // so is the depthwise grad input's gather form
  deft::Variant g = deft::parse_variant("algo=depthwise tm=8 tn=1 tk=1 threads=256 gin=gather");
  EXPECT_TRUE(g.gin_gather);
  EXPECT_EQ(deft::to_string(g), "algo=depthwise tm=8 tn=1 tk=1 threads=256 vec=1 staging=gather "
                                "halo=0 transpose=0 gin=gather");
  EXPECT_EQ(deft::parse_variant(deft::to_string(g)), g);
  EXPECT_FALSE(deft::parse_variant("algo=depthwise gin=atomic").gin_gather);
  EXPECT_THROW(deft::parse_variant("gin=sorted"), DescError);
}

TEST(VariantValidation, RejectsVariantsThatCannotRunTheLayer) {
  auto f32 = deft::parse_layer_desc(kBase + "dtype=f32");
  auto f16 = deft::parse_layer_desc(kBase + "dtype=f16");
  auto expect_field = [](const LayerDesc& d, const std::string& vtext, const std::string& field) {
    try {
      deft::validate(d, deft::parse_variant(vtext));
      ADD_FAILURE() << "accepted " << vtext;
    } catch (const DescError& e) {
      EXPECT_EQ(e.field(), field) << e.what();
    }
  };
  expect_field(f32, "algo=gemm_tc", "algo");           // tensor cores need f16/bf16/tf32
  expect_field(f16, "algo=gemm_simt tm=48", "tm");     // not a power of two
  expect_field(f16, "algo=gemm_simt threads=100", "threads");
  expect_field(f16, "algo=gemm_tc tm=128 tn=256 tk=64 threads=512", "tk");  // shared memory
  expect_field(f16, "algo=gemm_tc stages=2", "stages");  // the wgmma ring only
  expect_field(f16, "algo=gemm_wgmma tm=64 tn=64 tk=32 threads=128 transpose=1 stages=5",
               "stages");
  // gin=gather: the depthwise grad input's, with an f32 accumulator
  const std::string dw = "deform_conv2d n=2 c=32 h=8 w=8 k=32 groups=32 r=3 s=3 pad=1 mask=1 ";
  const std::string gv = "algo=depthwise tm=8 tn=1 tk=1 threads=256 gin=gather";
  expect_field(f16, gv, "gin");  // forward
  expect_field(deft::parse_layer_desc(dw + "dtype=f16 pass=backward_weight"), gv, "gin");
  expect_field(deft::parse_layer_desc(dw + "dtype=f64 pass=backward_data"), gv, "gin");
  expect_field(deft::parse_layer_desc(kBase + "dtype=f16 pass=backward_data"),
               "algo=gemm_tc tm=64 tn=64 tk=32 threads=256 gin=gather", "gin");
  EXPECT_NO_THROW(deft::validate(deft::parse_layer_desc(dw + "dtype=f16 pass=backward_data"), deft::parse_variant(gv)));
  // grad weight on wgmma in tf32: the warp-specialised form only, 32-pixel chunks; strict f32
  // refused (no tensor cores)
  const auto wtf = deft::parse_layer_desc(kBase + "dtype=f32 math=tf32 layout=nhwc pass=backward_weight");
  const auto wf32 = deft::parse_layer_desc(kBase + "dtype=f32 layout=nhwc pass=backward_weight");
  EXPECT_NO_THROW(deft::validate(wtf, deft::parse_variant("algo=gemm_wgmma tm=64 tn=64 tk=32 threads=256 producers=1")));
  expect_field(wtf, "algo=gemm_wgmma tm=64 tn=64 tk=32 threads=128", "producers");
  expect_field(wtf, "algo=gemm_wgmma tm=64 tn=64 tk=64 threads=256 producers=1", "tk");
  expect_field(wf32, "algo=gemm_wgmma tm=64 tn=64 tk=32 threads=256 producers=1", "algo");
  EXPECT_NO_THROW(deft::validate(f32, deft::default_variant(f32)));
  EXPECT_NO_THROW(deft::validate(f16, deft::default_variant(f16)));
  EXPECT_EQ(deft::default_variant(f16).algo, deft::Algo::gemm_tc);
  EXPECT_EQ(deft::default_variant(f32).algo, deft::Algo::gemm_simt);
}

}  // namespace
