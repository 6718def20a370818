// Codegen + NVRTC without a GPU: every variant family compiles to a cubin for sm_90 in every
// dtype and layout, the resource report has no spills for the defaults, and the generated
// source bakes the layer in.
#include <gtest/gtest.h>

#include <array>

#include <regex>
#include <set>
#include <tuple>

#include <fmt/format.h>

#include "compiler/plan.hpp"
#include "tuner/select.hpp"
#include "deft/deft.hpp"
#include "deft/deft_c.h"

namespace {

deft::CompileInfo compile_for_sm90(const deft::LayerDesc& d, std::optional<deft::Variant> v = {}) {
  deft::CompileOptions o;
  o.arch = 90;
  o.cache_path = "";  // no database: always NVRTC
  o.variant = v;
  return deft::compile_offline(d, o);
}

// validate refuses the variant for the layer, naming `field`.
void refused(const std::string& text, const std::string& variant, const std::string& field) {
  try {
    deft::validate(deft::parse_layer_desc(text), deft::parse_variant(variant));
    ADD_FAILURE() << "accepted " << text << " / " << variant;
  } catch (const deft::DescError& e) {
    EXPECT_EQ(e.field(), field) << text << ": " << e.what();
  }
}

struct Case {
  std::string desc;
  std::string variant;  // "" = default
};

class CompileEveryVariant : public ::testing::TestWithParam<Case> {};

TEST_P(CompileEveryVariant, ToCubinForSm90) {
  const Case& c = GetParam();
  auto d = deft::parse_layer_desc(c.desc);
  std::optional<deft::Variant> v;
  if (!c.variant.empty()) v = deft::parse_variant(c.variant);
  deft::CompileInfo info = compile_for_sm90(d, v);
  ASSERT_GT(info.cubin.size(), 1000u);
  // ELF magic
  EXPECT_EQ(std::string(info.cubin.data(), 4), "\x7f" "ELF");
  EXPECT_FALSE(info.from_cache);
  EXPECT_NE(info.resource_report.find("Used"), std::string::npos) << info.resource_report;
  std::smatch m;
  ASSERT_TRUE(std::regex_search(info.resource_report, m, std::regex(R"((\d+) bytes spill stores)")));
}

const std::string kShape = "n=2 c=32 h=13 w=17 k=48 r=3 s=3 pad=1 ";

INSTANTIATE_TEST_SUITE_P(
    AllDtypesLayoutsAlgos, CompileEveryVariant,
    ::testing::Values(
        Case{"deform_conv2d " + kShape + "mask=1 dtype=f32 layout=nchw", ""},
        Case{"deform_conv2d " + kShape + "mask=1 dtype=f32 layout=nhwc", ""},
        Case{"deform_conv2d " + kShape + "mask=1 dtype=f32 math=tf32 layout=nchw", ""},
        Case{"deform_conv2d " + kShape + "mask=1 dtype=f32 math=tf32 layout=nhwc", ""},
        Case{"deform_conv2d " + kShape + "mask=0 dtype=f16 layout=nchw bias=1 act=relu", ""},
        Case{"deform_conv2d " + kShape + "mask=1 dtype=f16 layout=nhwc", ""},
        Case{"deform_conv2d " + kShape + "mask=1 dtype=bf16 layout=nchw act=gelu", ""},
        Case{"deform_conv2d " + kShape + "mask=1 dtype=bf16 layout=nhwc", ""},
        Case{"deform_conv2d " + kShape + "mask=1 dtype=f64 layout=nchw", ""},
        Case{"deform_conv2d " + kShape + "mask=1 dtype=f64 layout=nhwc bias=1", ""},
        Case{"deform_conv2d " + kShape + "mask=1 dtype=f16 layout=nchw",
             "algo=gemm_simt tm=64 tn=64 tk=16 threads=256"},
        Case{"deform_conv2d " + kShape + "groups=4 offset_groups=2 mask=1 dtype=f16 layout=nhwc",
             "algo=gemm_tc tm=64 tn=16 tk=32 threads=128"},
        // backward passes: every dtype and layout, fast and deterministic, depthwise, groups
        Case{"deform_conv2d " + kShape + "mask=1 dtype=f32 layout=nchw pass=backward_data", ""},
        Case{"deform_conv2d " + kShape + "mask=1 dtype=f16 layout=nhwc pass=backward_data",
             "algo=gemm_simt tm=64 tn=32 tk=16 threads=256 det=1"},
        Case{"deform_conv2d " + kShape + "mask=0 dtype=bf16 layout=nchw pass=backward_data", ""},
        Case{"deform_conv2d " + kShape + "mask=1 dtype=f64 layout=nhwc pass=backward_data",
             "algo=gemm_simt tm=32 tn=16 tk=16 threads=128 det=1"},
        Case{"deform_conv2d " + kShape + "groups=4 offset_groups=2 mask=1 dtype=f32 layout=nhwc "
             "pass=backward_weight", ""},
        Case{"deform_conv2d " + kShape + "mask=1 dtype=f16 layout=nchw pass=backward_weight bias=1", ""},
        Case{"deform_conv2d " + kShape + "mask=1 dtype=bf16 layout=nhwc pass=backward_weight", ""},
        Case{"deform_conv2d " + kShape + "mask=1 dtype=f64 layout=nchw pass=backward_weight", ""},
        Case{"deform_conv2d n=2 c=32 h=13 w=17 k=32 r=3 s=3 pad=1 groups=32 offset_groups=4 "
             "mask=1 dtype=f16 layout=nhwc pass=backward_data", ""},
        Case{"deform_conv2d n=2 c=32 h=13 w=17 k=32 r=3 s=3 pad=1 groups=32 mask=1 dtype=f32 "
             "layout=nchw pass=backward_weight", ""},
        Case{"deform_conv2d " + kShape + "mask=1 dtype=f16 layout=nchw",
             "algo=gemm_tc tm=128 tn=64 tk=32 threads=256"},
        Case{"deform_conv2d n=2 c=64 h=9 w=11 k=64 r=3 s=3 pad=1 groups=64 mask=1 dtype=f16 "
             "layout=nhwc", ""},
        Case{"deform_conv2d n=2 c=64 h=9 w=11 k=64 r=3 s=3 pad=1 groups=64 mask=1 dtype=f32 "
             "layout=nchw bias=1", ""},
        Case{"deform_conv2d n=2 c=24 h=9 w=11 k=24 r=3 s=3 pad=1 groups=24 offset_groups=3 "
             "mask=1 dtype=f64 layout=nhwc", ""}));

TEST(Codegen, DepthwiseLayersDefaultToTheDepthwiseKernel) {
  auto d = deft::parse_layer_desc(
      "deform_conv2d n=16 c=512 h=32 w=32 k=512 r=3 s=3 pad=1 groups=512 mask=1 dtype=f16 "
      "layout=nhwc");
  deft::Variant v = deft::default_variant(d);
  EXPECT_EQ(v.algo, deft::Algo::depthwise);
  EXPECT_EQ(v.vec, 8);  // 16-byte vectors of f16
  EXPECT_NO_THROW(deft::validate(d, v));
  // Not depthwise (k != c): the depthwise kernel refuses it.
  auto g = deft::parse_layer_desc(
      "deform_conv2d n=1 c=32 h=8 w=8 k=64 r=3 s=3 pad=1 groups=32 mask=1 dtype=f16 layout=nhwc");
  EXPECT_NE(deft::default_variant(g).algo, deft::Algo::depthwise);
  EXPECT_THROW(deft::validate(g, v), deft::DescError);
}

TEST(Codegen, SourceBakesTheLayerAndVariant) {
  auto d = deft::parse_layer_desc(
      "deform_conv2d n=3 c=24 h=11 w=19 k=40 r=3 s=5 stride=2 pad=1x2 dilation=2x1 groups=2 "
      "offset_groups=3 mask=1 dtype=bf16 layout=nhwc bias=1 act=gelu");
  std::string src = deft::generate_source(d, deft::default_variant(d));
  for (const char* want :
       {"constexpr long long N = 3;", "constexpr long long C = 24;", "constexpr long long H = 11;",
        "constexpr long long W = 19;", "constexpr long long K = 40;", "constexpr int R = 3;",
        "constexpr int S = 5;", "constexpr int SH = 2;", "constexpr int PW = 2;",
        "constexpr int DH = 2;", "constexpr int G = 2;", "constexpr int OG = 3;",
        "constexpr bool HAS_MASK = true;", "constexpr bool HAS_BIAS = true;",
        "constexpr int ACT = 2;", "constexpr bool NHWC = true;", "typedef __nv_bfloat16 T;",
        "#define USE_TC 1", "// layer:   deform_conv2d n=3"})
    EXPECT_NE(src.find(want), std::string::npos) << want;
}

TEST(Codegen, NotImplementedKindsNeverReachNvrtc) {
  deft::CompileOptions o;
  o.arch = 90;
  o.cache_path = "";
  const auto before = deft::stats().nvrtc_compiles;
  EXPECT_THROW(deft::compile_offline(deft::parse_layer_desc(
                                         "deform_aggregate n=1 c=8 h=8 w=8 k=8 r=3 s=3 pad=1 "
                                         "groups=2 offset_groups=2 layout=nhwc"),
                                     o),
               deft::NotImplemented);
  EXPECT_THROW(deft::compile_offline(deft::parse_layer_desc(
                                         "deform_conv2d n=1 c=8 h=8 w=8 k=8 pass=backward_data "
                                         "act=relu"),
                                     o),
               deft::NotImplemented);
  EXPECT_EQ(deft::stats().nvrtc_compiles, before);
}

// Without a GPU no workspace pool exists: the counters are zero and releasing is a no-op
// (neither touches the driver).
TEST(Codegen, WorkspacePoolWithoutGpuIsEmpty) {
  if (deft::gpu_available()) GTEST_SKIP() << "a GPU is present";
  const deft::WorkspaceStats s = deft::workspace_stats();
  EXPECT_EQ(s.reserved_bytes, 0u);
  EXPECT_EQ(s.used_bytes, 0u);
  EXPECT_NO_THROW(deft::release_workspace());
  uint64_t reserved = 1, used = 1;
  EXPECT_EQ(deft_workspace_bytes(&reserved, &used), 0);
  EXPECT_EQ(reserved, 0u);
  EXPECT_EQ(used, 0u);
  EXPECT_EQ(deft_release_workspace(), 0);
}

TEST(Codegen, CompileWithoutGpuGivesAClearError) {
  if (deft::gpu_available()) GTEST_SKIP() << "a GPU is present";
  try {
    deft::compile(deft::parse_layer_desc("deform_conv2d n=1 c=8 h=8 w=8 k=8 r=3 s=3 pad=1"));
    FAIL() << "compile without a GPU succeeded";
  } catch (const deft::Error& e) {
    const std::string msg = e.what();
    EXPECT_TRUE(msg.find("CUDA driver") != std::string::npos ||
                msg.find("CUDA device") != std::string::npos)
        << msg;
  }
}


// The backward passes read every tensor in the layer's own layout, except through the
// transpose pre-pass (nchw only): then the input (and, for backward_data, the weight) is read
// channels-last while offsets, masks and gradients keep the layer's layout.
TEST(Codegen, BackwardPassesReadTheLayersLayout) {
  for (const char* pass : {"backward_data", "backward_weight"}) {
    for (const char* layout : {"nchw", "nhwc"}) {
      for (bool transpose : {false, true}) {
        const bool nhwc = std::string(layout) == "nhwc";
        if (nhwc && transpose) continue;
        const deft::LayerDesc d = deft::parse_layer_desc(
            std::string("deform_conv2d n=1 c=16 h=8 w=8 k=16 r=3 s=3 pad=1 layout=") + layout +
            " pass=" + pass);
        deft::Variant v = deft::default_variant(d);
        v.transpose = transpose;
        const std::string src = deft::generate_source(d, v);
        const bool data = std::string(pass) == "backward_data";
        auto has = [&](const char* name, bool value) {
          EXPECT_NE(src.find(std::string("constexpr bool ") + name + " = " +
                             (value ? "true" : "false") + ";"),
                    std::string::npos)
              << pass << " " << layout << " transpose=" << transpose << " " << name;
        };
        has("NHWC", nhwc);
        has("X_NHWC", nhwc || transpose);
        has("W_KRSC", nhwc || (transpose && data));
      }
    }
  }
}


// The heuristic default must give a runnable plan for every valid description: a sweep over
// channel counts, groups, offset groups, dtypes, layouts and passes (source only, no NVRTC);
// 12 channels: depthwise layers whose channels fill no 16-byte vector.
TEST(Codegen, DefaultVariantPlansEveryDescription) {
  int checked = 0;
  for (const char* pass : {"forward", "backward_data", "backward_weight"})
    for (const char* dt : {"f32", "f32 math=tf32", "f16", "bf16", "f64"})
      for (const char* layout : {"nchw", "nhwc"})
        for (int c : {1, 3, 12, 16, 32, 48, 96, 128})
          for (int k : {1, 5, 12, 16, 20, 64, 160})
            for (int groups : {1, 2, 4, 12, 16})
              for (int og : {1, 2, 4}) {
                if (c % groups || k % groups || c % og) continue;
                const std::string text = fmt::format(
                    "deform_conv2d n=2 c={} h=9 w=11 k={} r=3 s=3 pad=1 groups={} "
                    "offset_groups={} mask=1 dtype={} layout={} pass={}",
                    c, k, groups, og, dt, layout, pass);
                const deft::LayerDesc d = deft::parse_layer_desc(text);
                EXPECT_NO_THROW(deft::generate_source(d, deft::default_variant(d))) << text;
                EXPECT_NO_THROW(deft::generate_source(d, deft::default_variant(d, 90))) << text;
                ++checked;
              }
  EXPECT_GT(checked, 1000);
}


// algo=gemm_wgmma: the sm_90 default for tensor-core forward layers; every tile compiles for
// sm_90a without spills and with the wgmma instructions in the PTX; other architectures get a
// clear error; layers it cannot run are refused with the rule they break.

// The PTX of layer d with variant v for sm_90 (uncached), which must target sm_90a.
std::string sm90a_ptx(const deft::LayerDesc& d, const deft::Variant& v) {
  deft::CompileOptions o;
  o.arch = 90;
  o.variant = v;
  o.cache_path = "";
  std::string ptx = deft::emit_ptx(d, o);
  EXPECT_NE(ptx.find(".target sm_90a"), std::string::npos);
  return ptx;
}

// Programmatic dependent launch (templates/common.cuh, deft_grid_begin): the runtime launches
// sm_90 modules so that a kernel may start before its predecessor in the stream has finished,
// which is safe only if every kernel waits (griddepcontrol.wait) before its first global
// memory access. Checked in the PTX of every kernel of each family's module (the pre-passes,
// the deterministic mode's gather kernels, the reductions) in every pass; sm_80 modules have
// no such instruction (the runtime launches them plainly).
TEST(Codegen, EveryKernelWaitsForItsPredecessorBeforeTouchingMemory) {
  const std::string dense = "deform_conv2d n=2 c=64 h=9 w=11 k=128 r=3 s=3 pad=1 mask=1 bias=1 ";
  const std::string dw = "deform_conv2d n=2 c=64 h=9 w=11 k=64 groups=64 r=3 s=3 pad=1 mask=1 bias=1 ";
  const std::vector<std::string> layers = {
      dense + "dtype=f16 layout=nchw", dense + "dtype=f32 layout=nhwc",
      dense + "dtype=f32 math=tf32 layout=nchw", dw + "dtype=f16 layout=nchw",
      dw + "dtype=f32 layout=nhwc"};
  const std::regex entry(R"(\.entry\s+(\w+))");
  const std::regex memory(R"(\b(ld|st|atom|red)\.global|\bcp\.async\.(ca|cg)|\bcp\.async\.bulk)");
  size_t kernels = 0;
  for (const std::string& text : layers) {
    for (const char* pass : {"forward", "backward_data", "backward_weight"}) {
      for (const bool det : {false, true}) {
        if (det && std::string(pass) == "forward") continue;
        for (const int arch : {80, 90}) {
          const deft::LayerDesc d = deft::parse_layer_desc(text + " pass=" + pass);
          deft::CompileOptions o;
          o.arch = 90;
          o.cache_path = "";
          o.deterministic = det;
          o.variant = deft::default_variant(d, arch, det);  // both architectures' families
          o.variant->deterministic = det;  // (the gather kernels of deterministic mode)
          SCOPED_TRACE(text + " pass=" + pass + (det ? " det" : "") + " variant " +
                       deft::to_string(*o.variant));
          const std::string ptx = deft::emit_ptx(d, o);
          std::vector<std::pair<size_t, std::string>> entries;
          for (auto it = std::sregex_iterator(ptx.begin(), ptx.end(), entry);
               it != std::sregex_iterator(); ++it)
            entries.push_back({size_t(it->position(0)), (*it)[1].str()});
          ASSERT_FALSE(entries.empty());
          for (size_t e = 0; e < entries.size(); ++e) {
            const size_t end = e + 1 < entries.size() ? entries[e + 1].first : ptx.size();
            const std::string body = ptx.substr(entries[e].first, end - entries[e].first);
            const size_t wait = body.find("griddepcontrol.wait");
            ASSERT_NE(wait, std::string::npos) << entries[e].second << " never waits";
            std::smatch m;
            if (std::regex_search(body, m, memory))
              EXPECT_LT(wait, size_t(m.position(0)))
                  << entries[e].second << ": " << m.str(0) << " before griddepcontrol.wait";
            EXPECT_NE(body.find("griddepcontrol.launch_dependents"), std::string::npos)
                << entries[e].second;
            ++kernels;
          }
        }
      }
    }
  }
  EXPECT_GE(kernels, 60u);  // the families' modules hold 1 to 7 kernels each
  // sm_80: none (the instruction needs sm_90)
  deft::CompileOptions o;
  o.arch = 80;
  o.cache_path = "";
  const std::string ptx80 = deft::emit_ptx(deft::parse_layer_desc(dense + "dtype=f16 layout=nchw"), o);
  EXPECT_NE(ptx80.find(".entry"), std::string::npos);
  EXPECT_EQ(ptx80.find("griddepcontrol"), std::string::npos);
}

// The depthwise forward's 16-byte vector path (deform_conv_depthwise.cuh, perf notes round 15):
// weights staged in shared memory and 16-byte nhwc stores where the plan says so, the
// per-channel path for images too narrow for a 2 x 2 corner block; in the PTX, four
// 16-byte corner loads a tap (36) and no scalar global weight load.
TEST(Codegen, DepthwiseForwardVectorPath) {
  const std::string base = "deform_conv2d n=2 c=64 k=64 groups=64 r=3 s=3 pad=1 mask=1 dtype=f16 ";
  struct Want {
    std::string desc;
    bool wvec, out_vec;
  };
  for (const Want& w : {Want{base + "h=9 w=11 layout=nhwc", true, true},
                        Want{base + "h=9 w=11 layout=nchw", true, false},
                        Want{base + "h=9 w=1 layout=nhwc", false, false}}) {
    SCOPED_TRACE(w.desc);
    const deft::LayerDesc d = deft::parse_layer_desc(w.desc);
    const deft::Variant v = deft::default_variant(d);
    ASSERT_EQ(v.algo, deft::Algo::depthwise);
    const deft::KernelPlan p = deft::make_plan(d, v);
    EXPECT_EQ(p.dw_wvec, w.wvec);
    EXPECT_EQ(p.dw_out_vec, w.out_vec);
    const std::string src = deft::generate_source(d, v);
    EXPECT_NE(src.find(fmt::format("constexpr int W_VEC = {};", w.wvec ? 1 : 0)), std::string::npos);
    EXPECT_NE(src.find(fmt::format("constexpr int OUT_VEC = {};", w.out_vec ? 1 : 0)), std::string::npos);
  }
  const deft::LayerDesc d = deft::parse_layer_desc(base + "h=9 w=11 layout=nhwc");
  deft::CompileOptions o;
  o.arch = 90;
  o.cache_path = "";
  const std::string ptx = deft::emit_ptx(d, o);
  auto count = [&](const std::string& what) {
    size_t n = 0;
    for (size_t at = ptx.find(what); at != std::string::npos; at = ptx.find(what, at + 1)) ++n;
    return n;
  };
  EXPECT_EQ(count("ld.global.nc.v4.u32"), 36u) << "four corner vectors a tap";
  // 27 offsets and masks, and the block's weight staging (a few loads a thread): before round
  // 15 each thread also read its 72 weights with scalar loads
  EXPECT_LT(count("ld.global.nc.u16"), 27u + 9u);
  EXPECT_EQ(count("ld.shared.v4.u32"), 9u) << "a tap's weights from shared memory";
  // The eight outputs: NVVM splits the 16-byte store of the union into four 4-byte stores
  // (noticed after the last device call; an explicit uint4 would give one)
  EXPECT_EQ(count("st.global.v2.u16"), 4u);
  EXPECT_EQ(count("st.global.u16"), 0u);
}

// Compiles every wgmma tile of layer d for sm_90a (tk: the dtype's chunk; transpose for nchw);
// expects no spills and `mma` (the wgmma instruction for tile width N, "{}" standing for N) in
// the PTX, and calls more(options) for further checks of each tile.
template <class More>
void expect_wgmma_tiles(const deft::LayerDesc& d, const char* mma, More&& more) {
  for (int tm : {64, 128})
    for (int tn : {64, 128, 256}) {
      const deft::Variant v = deft::parse_variant(fmt::format(
          "algo=gemm_wgmma tm={} tn={} tk={} threads={} transpose={}", tm, tn,
          64 / deft::dtype_size(d.dtype), 2 * tm, d.layout == deft::Layout::nchw ? 1 : 0));
      SCOPED_TRACE(deft::to_string(v));
      const deft::CompileInfo info = compile_for_sm90(d, v);
      EXPECT_NE(info.resource_report.find("0 bytes spill stores"), std::string::npos)
          << info.resource_report;
      const std::string ptx = sm90a_ptx(d, v);
      EXPECT_NE(ptx.find(fmt::format(fmt::runtime(mma), tn)), std::string::npos) << mma;
      deft::CompileOptions o;
      o.arch = 90;
      o.variant = v;
      o.cache_path = "";
      more(o, ptx);
    }
}

TEST(Codegen, WgmmaTilesCompileForSm90Only) {
  const auto d = deft::parse_layer_desc(
      "deform_conv2d n=2 c=64 h=13 w=17 k=96 r=3 s=3 pad=1 offset_groups=2 mask=1 dtype=bf16 "
      "layout=nchw bias=1 act=gelu");
  EXPECT_EQ(deft::default_variant(d, 90).algo, deft::Algo::gemm_wgmma);
  EXPECT_EQ(deft::default_variant(d, 80).algo, deft::Algo::gemm_tc);
  EXPECT_EQ(deft::default_variant(d, 0), deft::default_variant(d));
  expect_wgmma_tiles(d, "wgmma.mma_async.sync.aligned.m64n{}k16.f32.bf16.bf16",
                     [&](deft::CompileOptions o, const std::string&) {
                       o.arch = 80;
                       try {
                         deft::compile_offline(d, o);
                         ADD_FAILURE() << "compiled a wgmma kernel for sm_80";
                       } catch (const deft::Error& e) {
                         EXPECT_NE(std::string(e.what()).find("needs sm_90"), std::string::npos)
                             << e.what();
                       }
                     });
  const deft::Variant w = deft::default_variant(d, 90);
  auto refused = [&](const std::string& text, const std::string& field) {
    const auto bad = deft::parse_layer_desc(text);
    try {
      deft::validate(bad, w);
      ADD_FAILURE() << "accepted " << text;
    } catch (const deft::DescError& e) {
      EXPECT_EQ(e.field(), field) << text << ": " << e.what();
    }
  };
  refused("deform_conv2d n=2 c=64 h=13 w=17 k=96 r=3 s=3 pad=1 mask=1 dtype=f32 layout=nchw", "algo");
  refused("deform_conv2d n=2 c=36 h=13 w=17 k=96 r=3 s=3 pad=1 mask=1 dtype=f16 layout=nchw", "algo");
  refused("deform_conv2d n=2 c=64 h=13 w=17 k=96 r=3 s=3 pad=1 mask=1 dtype=f32 math=tf32 "
          "layout=nchw", "tk");  // tf32 reduces 16-channel chunks
  refused("deform_conv2d n=2 c=64 h=13 w=17 k=96 r=3 s=3 pad=1 mask=1 dtype=f16 layout=nhwc",
          "transpose");  // transpose=1 applies to nchw layers only
}

// What the kernels' vector accesses need of the caller's tensors (KernelPlan::align_*, which
// the runtime checks before a launch): 16-byte gathers where the kernel reads the caller's
// input channels-last, nothing for the transpose pre-pass's copies, grad_out copy vectors.
TEST(Codegen, PlansNameTheAlignmentTheirVectorsNeed) {
  struct A {
    const char* variant;  // "" the default (sm_90 for the forward)
    int input, weight, gout, output;
  };
  const std::string dense = "deform_conv2d n=2 c=64 h=12 w=12 k=64 r=3 s=3 pad=1 mask=1 dtype=f16 ";
  const std::string dw = "deform_conv2d n=2 c=64 h=12 w=12 k=64 groups=64 r=3 s=3 pad=1 mask=1 dtype=f16 ";
  const std::vector<std::pair<std::string, A>> cases = {
      {dense + "layout=nhwc", {"", 16, 16, 1, 16}},  // wgmma: 16-byte stores, the pack's loads
      {dense + "layout=nchw", {"", 1, 16, 1, 16}},   // transposed input
      {dense + "layout=nhwc pass=backward_data", {"", 8, 16, 16, 1}},  // 4-channel epilogue
      {dense + "layout=nchw pass=backward_data", {"", 1, 1, 16, 1}},
      {dense + "layout=nhwc pass=backward_weight", {"", 16, 1, 16, 1}},
      {dense + "layout=nchw pass=backward_weight",
       {"algo=gemm_wgmma tm=64 tn=64 tk=64 threads=128 transpose=1", 1, 1, 8, 1}},
      {dw + "layout=nhwc", {"", 16, 1, 1, 16}},  // 16-byte output stores too
      {dw + "layout=nchw", {"", 1, 1, 1, 1}},    // transposed input
      {dw + "layout=nhwc pass=backward_data", {"", 16, 1, 16, 1}},  // gw=fused: 16-byte vectors
      {dw + "layout=nhwc pass=backward_data",
       {"algo=depthwise tm=8 tn=1 tk=1 threads=256 halo=2 gin=local", 8, 1, 8, 1}},  // 4-channel grad_out vectors
      {dw + "layout=nhwc pass=backward_weight", {"", 16, 1, 1, 1}},
      {dw + "layout=nchw pass=backward_weight", {"", 1, 1, 1, 1}},
  };
  for (const auto& [text, a] : cases) {
    const deft::LayerDesc d = deft::parse_layer_desc(text);
    const deft::Variant v = *a.variant ? deft::parse_variant(a.variant) : deft::default_variant(d, 90);
    SCOPED_TRACE(text + " / " + deft::to_string(v));
    const deft::KernelPlan p = deft::make_plan(d, v);
    EXPECT_EQ(p.align_input, a.input);
    EXPECT_EQ(p.align_weight, a.weight);
    EXPECT_EQ(p.align_gout, a.gout);
    EXPECT_EQ(p.align_output, a.output);
  }
}

// The depthwise forward's search space (the window candidates included) compiles with NVRTC
// for sm_90, the first candidate of each code path, on layers that take each of the
// template's paths: 16-byte vectors in both layouts and three dtypes, a 5 x 5 kernel (several
// tap batches), offset groups narrower than a block, and channels too few for vectors. (A static_assert or an empty array in a
// branch that `if constexpr` discards is still compiled outside templates: session 21's call 2
// lost its GPU tests to one that only modules of another path reached.)
TEST(Codegen, DepthwiseForwardSpaceCompiles) {
  const std::string dw = "deform_conv2d n=2 k=64 c=64 groups=64 h=9 w=11 mask=1 ";
  int compiled = 0;
  for (const std::string& text :
       {dw + "r=3 s=3 pad=1 dtype=f16 layout=nhwc", dw + "r=3 s=3 pad=1 dtype=f16 layout=nchw",
        dw + "r=3 s=3 pad=1 dtype=f32 layout=nhwc bias=1 act=gelu",
        dw + "r=5 s=5 pad=2 dtype=bf16 layout=nchw",
        std::string("deform_conv2d n=2 k=128 c=128 groups=128 h=8 w=10 r=3 s=3 pad=1 mask=1 "
                    "offset_groups=4 dtype=f16 layout=nhwc"),
        std::string("deform_conv2d n=2 k=12 c=12 groups=12 h=11 w=10 r=3 s=3 pad=1 mask=1 "
                    "dtype=f16 layout=nhwc")}) {
    const deft::LayerDesc d = deft::parse_layer_desc(text);
    SCOPED_TRACE(text);
    const auto space = deft::search_space(d, deft::SearchOptions{90, true, 2.0});
    ASSERT_FALSE(space.empty());
    // the first candidate of each code path (vector width, transpose, staging): the tile sizes
    // within one path change constants only (all of them: ~95 s of NVRTC, too long for CI)
    std::set<std::tuple<int, bool, int>> paths;
    for (const deft::Variant& v : space) {
      ASSERT_EQ(v.algo, deft::Algo::depthwise);
      if (!paths.insert({v.vec, v.transpose, int(v.staging)}).second) continue;
      SCOPED_TRACE(deft::to_string(v));
      EXPECT_NO_THROW(compile_for_sm90(d, v));
      ++compiled;
    }
  }
  EXPECT_GT(compiled, 30);
}

// Grad weight on wgmma (deform_conv_bwd_weight_wgmma.cuh, opt-in: not the default, see
// docs/perf-notes.md round B7): every tile compiles for sm_90a with the transposed-B wgmma in
// the PTX (and the 64-wide tiles without spills); the rules it needs are enforced.
TEST(Codegen, WgmmaBackwardWeightTilesCompile) {
  for (const char* text :
       {"deform_conv2d n=2 c=128 h=9 w=10 k=256 r=3 s=3 pad=1 mask=1 dtype=f16 layout=nchw "
        "pass=backward_weight",
        "deform_conv2d n=2 c=128 h=7 w=9 k=256 r=3 s=3 pad=1 mask=1 dtype=bf16 layout=nhwc "
        "pass=backward_weight"}) {
    const auto d = deft::parse_layer_desc(text);
    SCOPED_TRACE(text);
    // the sm_90 default: the warp-specialised kernel, 256 x 64 with two producer warpgroups
    // for these 256 output channels
    const deft::Variant dv = deft::default_variant(d, 90);
    EXPECT_EQ(dv.algo, deft::Algo::gemm_wgmma);
    EXPECT_EQ(dv.tile_m, 256);
    EXPECT_EQ(dv.tile_n, 64);
    EXPECT_EQ(dv.producers, 2);
    EXPECT_EQ(deft::default_variant(d, 80).algo, deft::Algo::gemm_tc);  // no wgmma before sm_90
    deft::Variant def;
    def.algo = deft::Algo::gemm_wgmma;
    def.tile_k = 64;
    def.transpose = d.layout == deft::Layout::nchw;
    const char* ty = d.dtype == deft::DType::f16 ? "f16" : "bf16";
    for (int tm : {64, 128, 256})
      for (int tn : {64, 128}) {
        deft::Variant v = def;
        v.tile_m = tm, v.tile_n = tn, v.threads = 2 * tm;
        SCOPED_TRACE(deft::to_string(v));
        const deft::CompileInfo info = compile_for_sm90(d, v);
        if (tn == 64)
          EXPECT_NE(info.resource_report.find("0 bytes spill stores"), std::string::npos)
              << info.resource_report;
        const std::string ptx = sm90a_ptx(d, v);
        EXPECT_NE(ptx.find(fmt::format("wgmma.mma_async.sync.aligned.m64n{}k16.f32.{}.{}", tn, ty, ty)),
                  std::string::npos);
      }
    // the warp-specialised form: producer warpgroups gather into a ring of dynamic shared
    // memory (8 chunks where they fit), without spills, with the proxy fence in the PTX
    for (auto [tm, tn, prod] : {std::array{64, 64, 1}, {128, 128, 1}, {128, 64, 2}, {256, 64, 1},
                                {64, 128, 2}, {256, 64, 2}, {256, 128, 1}}) {
      deft::Variant v = def;
      v.tile_m = tm, v.tile_n = tn, v.producers = prod, v.threads = 2 * tm + 128 * prod;
      SCOPED_TRACE(deft::to_string(v));
      EXPECT_EQ(deft::parse_variant(deft::to_string(v)), v);
      const deft::CompileInfo info = compile_for_sm90(d, v);
      EXPECT_NE(info.resource_report.find("0 bytes spill stores"), std::string::npos)
          << info.resource_report;
      const std::string ptx = sm90a_ptx(d, v);
      // the ring's slots and mbarriers (8 where they fit), each producer warpgroup's two
      // point tables, each consumer's four grad_out stages
      const int fixed = prod * 2 * 64 * 36 + tm / 64 * 4 * 64 * 64 * 2;
      const int slots = std::min(8, (227 * 1024 - fixed) / (64 * tn * 2 + 16));
      EXPECT_EQ(info.dynamic_shared_bytes, slots * (64 * tn * 2 + 16) + fixed);
      EXPECT_NE(ptx.find("cp.async"), std::string::npos);  // the grad_out copies
      EXPECT_NE(ptx.find(fmt::format("wgmma.mma_async.sync.aligned.m64n{}k16.f32.{}.{}", tn, ty, ty)),
                std::string::npos);
      EXPECT_NE(ptx.find("fence.proxy.async.shared::cta"), std::string::npos);
      EXPECT_NE(ptx.find("mbarrier.try_wait.parity"), std::string::npos);
    }
  }
  // the warp-specialised grid: whole waves of 132 SMs where a few more splits make them so
  // (36 tiles x 8 splits = 288 blocks, 2.2 waves, become 36 x 11 = 396, three)
  {
    const auto d = deft::parse_layer_desc(
        "deform_conv2d n=32 c=256 h=14 w=14 k=256 r=3 s=3 pad=1 mask=1 dtype=f16 layout=nchw "
        "pass=backward_weight");
    const deft::KernelPlan p = deft::make_plan(d, deft::parse_variant(
        "algo=gemm_wgmma tm=256 tn=64 tk=64 threads=640 producers=1 transpose=1"));
    EXPECT_EQ(p.grid[0] * p.grid[1], 36u);
    EXPECT_EQ(p.grid[2], 11u);
    EXPECT_EQ(p.split_pix, 9 * 64);  // 98 slices of 64 pixels, 9 a block
    EXPECT_EQ(p.workspace_bytes, 11 * int64_t{256} * 256 * 9 * 4);
  }
  const std::string base = "deform_conv2d n=2 c=128 h=9 w=10 k=256 r=3 s=3 pad=1 mask=1 ";
  const std::string v = "algo=gemm_wgmma tm=128 tn=64 tk=64 threads=256 transpose=1";
  refused(base + "dtype=f32 math=tf32 layout=nchw pass=backward_weight", v, "producers");
  // the producer batch: 2, 4 or 8, at most a chunk's items (4 with tn=64), producers only
  refused(base + "dtype=f16 layout=nchw pass=backward_weight",
          "algo=gemm_wgmma tm=128 tn=64 tk=64 threads=384 producers=1 batch=8 transpose=1", "batch");
  refused(base + "dtype=f16 layout=nchw pass=backward_weight",
          "algo=gemm_wgmma tm=128 tn=128 tk=64 threads=384 producers=1 batch=3 transpose=1", "batch");
  refused(base + "dtype=f16 layout=nchw pass=backward_weight",
          "algo=gemm_wgmma tm=128 tn=64 tk=64 threads=256 batch=4 transpose=1", "batch");
  {
    const auto d = deft::parse_layer_desc(base + "dtype=f16 layout=nchw pass=backward_weight");
    const deft::Variant b = deft::parse_variant(
        "algo=gemm_wgmma tm=128 tn=128 tk=64 threads=384 producers=1 batch=4 transpose=1");
    EXPECT_EQ(b.batch, 4);
    EXPECT_EQ(deft::parse_variant(deft::to_string(b)), b);
    EXPECT_NE(deft::generate_source(d, b).find("constexpr int MAX_BATCH = 4;"), std::string::npos);
  }
  refused(base + "dtype=f32 layout=nchw pass=backward_weight",
          "algo=gemm_wgmma tm=128 tn=64 tk=32 threads=384 producers=1 transpose=1", "algo");
  refused(base + "dtype=f32 math=tf32 layout=nchw pass=backward_weight",
          "algo=gemm_wgmma tm=128 tn=64 tk=64 threads=384 producers=1 transpose=1", "tk");
  // tf32 (round B20): the warp-specialised form with 32-pixel chunks, k8 wgmmas on two K-major
  // operands (no transpose bits), the same shared-memory plan as 16-bit elements, no spills;
  // the sm_90 default for these 256 output channels in both layouts, as for f16 (nhwc since
  // round B22 timed its transposing grad_out copy)
  for (const char* layout : {"nchw", "nhwc"}) {
    const auto d = deft::parse_layer_desc(base + "dtype=f32 math=tf32 layout=" + layout +
                                          " pass=backward_weight");
    SCOPED_TRACE(deft::to_string(d));
    const deft::Variant dv = deft::default_variant(d, 90);
    EXPECT_EQ(dv.algo, deft::Algo::gemm_wgmma);
    EXPECT_EQ(dv.tile_k, 32);
    EXPECT_EQ(dv.producers, 2);
    for (auto [tm, tn, prod] : {std::array{64, 64, 1}, {128, 128, 2}, {256, 64, 2}, {256, 128, 1}}) {
      deft::Variant w;
      w.algo = deft::Algo::gemm_wgmma;
      w.tile_m = tm, w.tile_n = tn, w.tile_k = 32, w.producers = prod;
      w.threads = 2 * tm + 128 * prod;
      w.transpose = d.layout == deft::Layout::nchw;
      SCOPED_TRACE(deft::to_string(w));
      const deft::CompileInfo info = compile_for_sm90(d, w);
      EXPECT_NE(info.resource_report.find("0 bytes spill stores"), std::string::npos)
          << info.resource_report;
      const int fixed = prod * 2 * 32 * 36 + tm / 64 * 4 * 64 * 32 * 4;
      const int slots = std::min(8, (227 * 1024 - fixed) / (32 * tn * 4 + 16));
      EXPECT_EQ(info.dynamic_shared_bytes, slots * (32 * tn * 4 + 16) + fixed);
      const std::string ptx = sm90a_ptx(d, w);
      const std::string mma = fmt::format("wgmma.mma_async.sync.aligned.m64n{}k8.f32.tf32.tf32", tn);
      const size_t at = ptx.find(mma);
      ASSERT_NE(at, std::string::npos);
      // no transpose operands after the scale operands: "p, 1, 1;"
      EXPECT_NE(ptx.find("p, 1, 1;", at), std::string::npos);
      EXPECT_NE(ptx.find("cvt.rna.tf32.f32"), std::string::npos);  // operands rounded
    }
  }
  // tf32 grad_out copies: 16 bytes (4 pixels of a plane) where h*w is a multiple of 4, 8 bytes
  // (2 pixels) where of 2, else elements; nhwc always elements (the copy transposes)
  for (auto [hw, layout, bytes] : {std::tuple{"h=12 w=12", "nchw", 16}, {"h=9 w=10", "nchw", 8},
                                   {"h=7 w=7", "nchw", 4}, {"h=12 w=12", "nhwc", 4}}) {
    const auto d = deft::parse_layer_desc(
        fmt::format("deform_conv2d n=2 c=128 {} k=128 r=3 s=3 pad=1 mask=1 dtype=f32 math=tf32 "
                    "layout={} pass=backward_weight", hw, layout));
    deft::Variant w = deft::parse_variant("algo=gemm_wgmma tm=128 tn=128 tk=32 threads=512 producers=2");
    w.transpose = d.layout == deft::Layout::nchw;
    SCOPED_TRACE(deft::to_string(d));
    EXPECT_EQ(deft::make_plan(d, w).align_gout, bytes);
    EXPECT_NE(deft::generate_source(d, w).find(fmt::format("constexpr int GOUT_COPY = {};", bytes)),
              std::string::npos);
  }
  refused(base + "dtype=f16 layout=nchw pass=backward_weight",
          "algo=gemm_wgmma tm=128 tn=64 tk=64 threads=256 transpose=0", "transpose");
  refused(base + "dtype=f16 layout=nchw pass=backward_weight",
          "algo=gemm_wgmma tm=128 tn=64 tk=64 threads=128 transpose=1", "threads");
  refused(base + "dtype=f16 layout=nchw pass=backward_weight",
          "algo=gemm_wgmma tm=128 tn=64 tk=32 threads=256 transpose=1", "tk");
  refused("deform_conv2d n=2 c=96 h=9 w=10 k=256 r=3 s=3 pad=1 offset_groups=3 mask=1 dtype=f16 "
          "layout=nchw pass=backward_weight", v, "tn");  // 32 channels per offset group
  refused(base + "dtype=f32 layout=nchw pass=backward_data", v, "algo");  // strict f32
  // warp-specialised grad weight: threads count the producers; registers; ring depth
  refused(base + "dtype=f16 layout=nchw pass=backward_weight",
          "algo=gemm_wgmma tm=128 tn=64 tk=64 threads=256 producers=1 transpose=1", "threads");
  refused(base + "dtype=f16 layout=nchw pass=backward_weight",
          "algo=gemm_wgmma tm=256 tn=128 tk=64 threads=768 producers=2 transpose=1", "producers");
  refused(base + "dtype=f16 layout=nchw pass=backward_weight",
          "algo=gemm_wgmma tm=128 tn=64 tk=64 threads=512 producers=2 stages=1 transpose=1", "stages");
  refused(base + "dtype=f16 layout=nchw pass=backward_weight",
          "algo=gemm_wgmma tm=128 tn=64 tk=64 threads=256 stages=4 transpose=1", "stages");
  refused(base + "dtype=f16 layout=nchw pass=backward_data",
          "algo=gemm_tc tm=64 tn=64 tk=32 threads=256 producers=1 transpose=1", "producers");
}

// backward_data on wgmma (deform_conv_bwd_data_wgmma.cuh): every tile compiles for sm_90a
// without spills, fast and deterministic, with the wgmma that reads both operands from shared
// memory (A transposed for nchw grad_out, B transposed) and the cp.async copies in the PTX; the
// grad_out tile and the weight ring are what the plan says; the rules it needs are enforced.
TEST(Codegen, WgmmaBackwardDataTilesCompile) {
  for (const char* text :
       {"deform_conv2d n=2 c=256 h=9 w=10 k=512 r=3 s=3 pad=1 mask=1 dtype=f16 layout=nchw "
        "pass=backward_data",
        "deform_conv2d n=2 c=128 h=7 w=9 k=200 r=3 s=3 pad=1 mask=1 dtype=bf16 layout=nhwc "
        "pass=backward_data"}) {
    const auto d = deft::parse_layer_desc(text);
    SCOPED_TRACE(text);
    const bool nchw = d.layout == deft::Layout::nchw;
    const char* ty = d.dtype == deft::DType::f16 ? "f16" : "bf16";
    const int64_t kgp = (d.k + 63) / 64 * 64;
    for (auto [tm, wgs, tn, stages, det] :
         {std::array{64, 1, 64, 0, 0}, {64, 2, 128, 0, 1}, {64, 2, 128, 3, 0}, {64, 4, 64, 3, 1},
          {128, 2, 64, 0, 0}, {128, 4, 64, 3, 0}}) {
      const deft::Variant v = deft::parse_variant(fmt::format(
          "algo=gemm_wgmma tm={} tn={} tk=64 threads={} transpose={}{}{}", tm, tn, 128 * wgs,
          nchw ? 1 : 0, stages ? fmt::format(" stages={}", stages) : "", det ? " det=1" : ""));
      SCOPED_TRACE(deft::to_string(v));
      EXPECT_EQ(deft::parse_variant(deft::to_string(v)), v);
      const deft::CompileInfo info = compile_for_sm90(d, v);
      EXPECT_NE(info.resource_report.find("0 bytes spill stores"), std::string::npos)
          << info.resource_report;
      // the plan's rings: 4 slices each (3 where 4 do not fit), or the stages asked for; the
      // tile of tm pixels; the point sums of every warpgroup but the first of each half
      const int64_t fixed = tm * kgp * 2 + (wgs / (tm / 64) - 1) * tm * 3 * 4;
      const int ring = stages ? stages : fixed + wgs * 4 * 64 * tn * 2 <= 227 * 1024 ? 4 : 3;
      EXPECT_EQ(info.dynamic_shared_bytes, fixed + wgs * ring * 64 * tn * 2);
      EXPECT_NE(info.shared_layout.find(fmt::format("{} weight ring(s) {} x {}", wgs, ring,
                                                    64 * tn * 2)),
                std::string::npos) << info.shared_layout;
      const std::string ptx = sm90a_ptx(d, v);
      EXPECT_NE(ptx.find(fmt::format("wgmma.mma_async.sync.aligned.m64n{}k16.f32.{}.{}", tn, ty, ty)),
                std::string::npos);
      EXPECT_NE(ptx.find(fmt::format("p, 1, 1, {}, 1;", nchw ? 1 : 0)), std::string::npos)
          << "transpose bits";
      // the packed weight's slices, 16 bytes a copy, and the pre-pass that packs them (the
      // workspace counts its output: the group's channels x taps x output channels padded to 64)
      EXPECT_NE(ptx.find("cp.async.cg.shared.global"), std::string::npos);
      EXPECT_NE(ptx.find(".entry deft_pack_weight"), std::string::npos);
      const deft::KernelPlan plan = deft::make_plan(d, v);
      EXPECT_EQ(plan.workspace_packed_bytes, d.taps() * d.c * kgp * 2);
      // deterministic: the gather form, whose buffers the workspace figure counts too
      EXPECT_EQ(plan.gin_mode, det ? 3 : 1);
      EXPECT_EQ(info.workspace_bytes, plan.workspace_bytes + plan.workspace_packed_bytes +
                                          (det ? deft::gather_layout(d).bytes : 0));
      EXPECT_NE(ptx.find("fence.proxy.async.shared::cta"), std::string::npos);
      // the grad-input scatter: f32 vector reductions, or (deterministic) none
      if (det) {  // no 64-bit atomics: the values are stored and gathered per input pixel
        EXPECT_EQ(ptx.find(".add.u64"), std::string::npos);
        EXPECT_NE(ptx.find(".entry deft_bwd_gather"), std::string::npos);
      } else {
        EXPECT_NE(ptx.find("red.global.add.v4.f32"), std::string::npos);
      }
    }
  }
  const std::string base = "deform_conv2d n=2 c=128 h=9 w=10 r=3 s=3 pad=1 mask=1 ";
  const std::string bd = "k=256 dtype=f16 layout=nchw pass=backward_data";
  const std::string v = "algo=gemm_wgmma tm=64 tn=64 tk=64 threads=256 transpose=1";
  refused(base + "k=256 dtype=f32 layout=nchw pass=backward_data", v, "algo");  // strict f32
  refused(base + "k=256 dtype=f32 math=tf32 layout=nchw pass=backward_data", v, "tk");  // tk=32
  refused(base + bd, "algo=gemm_wgmma tm=64 tn=64 tk=64 threads=256 transpose=0", "transpose");
  refused(base + bd, "algo=gemm_wgmma tm=64 tn=64 tk=64 threads=192 transpose=1", "threads");
  refused(base + bd, "algo=gemm_wgmma tm=64 tn=64 tk=64 threads=640 transpose=1", "threads");
  refused(base + bd, "algo=gemm_wgmma tm=256 tn=64 tk=64 threads=512 transpose=1", "tm");
  refused(base + bd, "algo=gemm_wgmma tm=128 tn=64 tk=64 threads=384 transpose=1", "threads");
  refused(base + bd, "algo=gemm_wgmma tm=64 tn=64 tk=32 threads=256 transpose=1", "tk");
  // deterministic mode: 64-pixel tiles only (a 128-pixel one faulted on the H200, perf notes B13)
  refused(base + bd, "algo=gemm_wgmma tm=128 tn=64 tk=64 threads=256 transpose=1 det=1", "tm");
  refused(base + bd, "algo=gemm_wgmma tm=128 tn=64 tk=64 threads=512 transpose=1 det=1", "tm");
  refused(base + bd, "algo=gemm_wgmma tm=64 tn=64 tk=64 threads=256 stages=2 transpose=1", "stages");
  refused(base + bd, "algo=gemm_wgmma tm=64 tn=64 tk=64 threads=256 producers=1 transpose=1",
          "producers");
  // 64 channels per offset group: no 128-channel step
  refused(base + "k=256 offset_groups=2 dtype=f16 layout=nchw pass=backward_data",
          "algo=gemm_wgmma tm=64 tn=128 tk=64 threads=256 transpose=1", "tn");
  // an offset group across two conv groups
  refused("deform_conv2d n=2 c=128 h=9 w=10 k=256 r=3 s=3 pad=1 mask=1 groups=2 dtype=f16 "
          "layout=nchw pass=backward_data", v, "tn");
  // 64 pixels x 2048 output channels of grad_out (256 KiB) do not fit beside the rings
  refused(base + "k=2048 dtype=f16 layout=nchw pass=backward_data", v, "tm");
  // the grad_out copy width follows the layer (GV: 8 elements where 16-byte runs stay inside
  // a plane or a pixel's group, 4, else one), and each form compiles
  for (auto [text, gv] : {std::pair{"n=2 c=64 h=9 w=10 k=64 dtype=f16 layout=nchw", 1},  // h*w 90
                          {"n=3 c=64 h=6 w=10 k=64 dtype=bf16 layout=nchw", 4},         // 60
                          {"n=2 c=64 h=8 w=8 k=64 dtype=f16 layout=nchw", 8},           // 64
                          {"n=2 c=64 h=8 w=9 k=76 dtype=f16 layout=nhwc", 4},           // k 76
                          {"n=2 c=64 h=8 w=9 k=72 dtype=bf16 layout=nhwc", 8},
                          {"n=2 c=64 h=8 w=9 k=62 dtype=f16 layout=nhwc", 1}}) {
    const auto d = deft::parse_layer_desc(
        fmt::format("deform_conv2d {} r=3 s=3 pad=1 mask=1 pass=backward_data", text));
    const bool nchw = d.layout == deft::Layout::nchw;
    const deft::Variant wv = deft::parse_variant(fmt::format(
        "algo=gemm_wgmma tm=64 tn=64 tk=64 threads=256 transpose={}", nchw ? 1 : 0));
    SCOPED_TRACE(text);
    const deft::KernelPlan plan = deft::make_plan(d, wv);
    EXPECT_EQ(plan.gv, gv);
    EXPECT_EQ(plan.align_gout, gv > 1 ? gv * 2 : 1);
    const deft::CompileInfo info = compile_for_sm90(d, wv);
    EXPECT_NE(info.resource_report.find("0 bytes spill stores"), std::string::npos)
        << info.resource_report;
  }
}

// The warp-specialised wgmma forward (producers=1 or 2): every consumer grid compiles for
// sm_90a without spills, in f16 and tf32, with the shared-memory-A wgmma for the consumer's
// width in the PTX; a ring slot holds an A and a B stage; tiles that need more than two
// consumer warpgroups, the wrong thread count, a window or another pass are refused.
TEST(Codegen, WgmmaWarpSpecialisedCompiles) {
  for (const char* dt : {"dtype=f16", "dtype=f32 math=tf32"}) {
    const auto d = deft::parse_layer_desc(fmt::format(
        "deform_conv2d n=16 c=512 h=32 w=32 k=512 r=3 s=3 pad=1 mask=1 {} layout=nhwc", dt));
    const int tk = 64 / deft::dtype_size(d.dtype);
    for (auto [tm, tn, prod] : {std::array{64, 64, 1}, {64, 128, 1}, {64, 256, 1}, {64, 256, 2},
                                {64, 512, 1}, {128, 128, 2}, {128, 256, 1}}) {
      const int consumers = tm / 64 * std::max(1, tn / 256);
      const deft::Variant v = deft::parse_variant(fmt::format(
          "algo=gemm_wgmma tm={} tn={} tk={} threads={} producers={}", tm, tn, tk,
          128 * (prod + consumers), prod));
      SCOPED_TRACE(deft::to_string(v));
      EXPECT_EQ(deft::parse_variant(deft::to_string(v)), v);
      const deft::CompileInfo info = compile_for_sm90(d, v);
      EXPECT_NE(info.resource_report.find("0 bytes spill stores"), std::string::npos)
          << info.resource_report;
      EXPECT_NE(info.shared_layout.find(fmt::format("{} producer and {} consumer", prod, consumers)),
                std::string::npos) << info.shared_layout;
      const std::string ptx = sm90a_ptx(d, v);
      const std::string mma = fmt::format("wgmma.mma_async.sync.aligned.m64n{}k{}.f32.{}",
                                          tn / std::max(1, tn / 256), tk == 32 ? 16 : 8,
                                          tk == 32 ? "f16.f16" : "tf32.tf32");
      EXPECT_NE(ptx.find(mma), std::string::npos) << mma;
      EXPECT_NE(ptx.find("fence.proxy.async.shared::cta"), std::string::npos);
    }
  }
  const auto d = deft::parse_layer_desc(
      "deform_conv2d n=16 c=512 h=32 w=32 k=512 r=3 s=3 pad=1 mask=1 dtype=f16 layout=nhwc");
  auto refused = [&](const std::string& variant, const std::string& field, const std::string& desc = "") {
    try {
      deft::validate(desc.empty() ? d : deft::parse_layer_desc(desc), deft::parse_variant(variant));
      ADD_FAILURE() << "accepted " << variant;
    } catch (const deft::DescError& e) {
      EXPECT_EQ(e.field(), field) << variant << ": " << e.what();
    }
  };
  refused("algo=gemm_wgmma tm=128 tn=512 tk=32 threads=768 producers=1", "tn");  // 4 consumers
  refused("algo=gemm_wgmma tm=64 tn=512 tk=32 threads=128", "tn");  // 512 needs producers
  refused("algo=gemm_wgmma tm=64 tn=256 tk=32 threads=128 producers=1", "threads");
  refused("algo=gemm_wgmma tm=64 tn=256 tk=32 threads=640 producers=3", "producers");
  refused("algo=gemm_wgmma tm=64 tn=512 tk=32 threads=512 producers=2", "producers");  // 128 regs
  refused("algo=gemm_wgmma tm=64 tn=256 tk=32 threads=256 producers=1 staging=window halo=1", "staging");
  refused("algo=gemm_wgmma tm=64 tn=256 tk=32 threads=256 producers=1 stages=9", "stages");
  refused("algo=gemm_wgmma tm=64 tn=256 tk=32 threads=256 producers=1 stages=3", "stages");  // < 4 warps
  refused("algo=gemm_wgmma tm=64 tn=256 tk=32 threads=384 producers=2 stages=7", "stages");
  EXPECT_NO_THROW(deft::validate(d, deft::parse_variant(
      "algo=gemm_wgmma tm=64 tn=256 tk=32 threads=256 producers=1 stages=4")));
  // tf32, 128 x 256, nchw: the points (36864 bytes), the rows' images (512) and a 4-deep ring
  // (4 x 24576) end at byte 135680, before the 256 x 136 x 4-byte epilogue tile would; the
  // plan's own ring (7 deep) is long enough
  const auto tf32 = deft::parse_layer_desc(
      "deform_conv2d n=16 c=512 h=32 w=32 k=512 r=3 s=3 pad=1 mask=1 dtype=f32 math=tf32 "
      "layout=nchw");
  refused("algo=gemm_wgmma tm=128 tn=256 tk=16 threads=384 producers=1 stages=4 transpose=1",
          "stages", deft::to_string(tf32));
  EXPECT_NO_THROW(deft::validate(tf32, deft::parse_variant(
      "algo=gemm_wgmma tm=128 tn=256 tk=16 threads=384 producers=1 transpose=1")));
  refused("algo=gemm_tc tm=64 tn=64 tk=32 threads=256 producers=1", "producers");
  refused("algo=gemm_wgmma tm=128 tn=64 tk=64 threads=384 producers=1", "producers",
          "deform_conv2d n=2 c=128 h=9 w=10 k=256 r=3 s=3 pad=1 mask=1 dtype=f16 layout=nhwc "
          "pass=backward_data");
}

// staging=window on wgmma: window tiles up to 128 wide compile for sm_90a without spills, in
// f16 and tf32; the window's rows follow the tile's pixel span and the halo.
TEST(Codegen, WgmmaWindowCompiles) {
  for (const char* text :
       {"deform_conv2d n=4 c=128 h=32 w=32 k=128 r=3 s=3 pad=1 mask=1 dtype=f16 layout=nhwc",
        "deform_conv2d n=4 c=64 h=14 w=14 k=64 r=3 s=3 pad=1 mask=1 dtype=f32 math=tf32 "
        "layout=nchw"}) {
    const auto d = deft::parse_layer_desc(text);
    const int tk = 64 / deft::dtype_size(d.dtype);
    for (auto [tm, tn] : {std::pair{64, 128}, {128, 64}, {64, 64}})
      for (int halo : {0, 4}) {
        const deft::Variant v = deft::parse_variant(fmt::format(
            "algo=gemm_wgmma tm={} tn={} tk={} threads={} staging=window halo={} transpose={}", tm,
            tn, tk, 2 * tm, halo, d.layout == deft::Layout::nchw ? 1 : 0));
        SCOPED_TRACE(std::string(text) + " [" + deft::to_string(v) + "]");
        const deft::CompileInfo info = compile_for_sm90(d, v);
        EXPECT_NE(info.resource_report.find("0 bytes spill stores"), std::string::npos)
            << info.resource_report;
        const std::string src = deft::generate_source(d, v);
        EXPECT_NE(src.find("#define WINDOW 1"), std::string::npos);
        EXPECT_NE(src.find(fmt::format("constexpr int HALO = {};", halo)), std::string::npos);
      }
  }
  // 64 pixels of a 14-wide image span up to 6 output rows: 5 + 3 taps + 1 + 2 x 4 halo = 17.
  const auto d = deft::parse_layer_desc(
      "deform_conv2d n=4 c=64 h=14 w=14 k=64 r=3 s=3 pad=1 mask=1 dtype=f16 layout=nhwc");
  const std::string src = deft::generate_source(
      d, deft::parse_variant("algo=gemm_wgmma tm=64 tn=64 tk=32 threads=128 staging=window halo=4"));
  EXPECT_NE(src.find("constexpr int WROWS = 17;"), std::string::npos);
  EXPECT_NE(src.find(fmt::format("constexpr int WIN_BYTES = {};", 17 * 14 * 64)), std::string::npos);
}

// f32 in tf32 math: the same kernel with 16-channel chunks and m64nNk8 tf32 wgmma; every tile
// compiles for sm_90a without spills; the heuristic takes it where whole chunks fill the
// reduction; c/groups needs only 4-channel (16-byte) vectors.
TEST(Codegen, WgmmaTf32TilesCompile) {
  const auto d = deft::parse_layer_desc(
      "deform_conv2d n=2 c=64 h=13 w=17 k=96 r=3 s=3 pad=1 offset_groups=2 mask=1 dtype=f32 "
      "math=tf32 layout=nhwc bias=1 act=relu");
  const deft::Variant def = deft::default_variant(d, 90);
  EXPECT_EQ(def.algo, deft::Algo::gemm_wgmma);
  EXPECT_EQ(def.tile_k, 16);
  expect_wgmma_tiles(d, "wgmma.mma_async.sync.aligned.m64n{}k8.f32.tf32.tf32",
                     [](const deft::CompileOptions&, const std::string& ptx) {
                       EXPECT_NE(ptx.find("cvt.rna.tf32.f32"), std::string::npos);
                     });
  const auto c36 = deft::parse_layer_desc(
      "deform_conv2d n=2 c=36 h=13 w=17 k=96 r=3 s=3 pad=1 mask=1 dtype=f32 math=tf32 layout=nchw");
  EXPECT_NO_THROW(deft::validate(c36, deft::parse_variant(
                                          "algo=gemm_wgmma tm=64 tn=64 tk=16 threads=128 transpose=1")));
  EXPECT_EQ(deft::default_variant(c36, 90).algo, deft::Algo::gemm_tc);  // 36 % 16 != 0, < 64
  const auto c34 = deft::parse_layer_desc(
      "deform_conv2d n=2 c=34 h=13 w=17 k=96 r=3 s=3 pad=1 mask=1 dtype=f32 math=tf32 layout=nhwc");
  EXPECT_THROW(deft::validate(c34, deft::parse_variant("algo=gemm_wgmma tm=64 tn=64 tk=16 threads=128")),
               deft::DescError);
}

// Every variant the tuner tries for a layer compiles (the depthwise f16 nhwc search space held
// vec=1 variants whose half2 path declared a zero-length array: NVRTC refused 9 of 26).
TEST(Codegen, EveryTunerCandidateCompiles) {
  for (const char* text :
       {"deform_conv2d n=16 c=512 h=32 w=32 k=512 r=3 s=3 pad=1 groups=512 mask=1 dtype=f16 "
        "layout=nhwc",
        "deform_conv2d n=2 c=64 h=16 w=16 k=64 r=3 s=3 pad=1 mask=1 dtype=bf16 layout=nchw"}) {
    const deft::LayerDesc d = deft::parse_layer_desc(text);
    for (const deft::Variant& v : deft::search_space(d, 90)) {
      deft::CompileOptions o;
      o.arch = 90;
      o.cache_path = "";
      o.variant = v;
      EXPECT_NO_THROW(deft::compile_offline(d, o)) << text << " [" << deft::to_string(v) << "]";
    }
  }
}

// The heuristic's grad-input kernel on sm_90: the wgmma one (64 pixels, 64-channel steps, two
// warpgroups, 3 slices) for f16/bf16 groups of more than 64 output channels in the fast mode;
// the WMMA kernel in deterministic mode, for 64 output channels, and off sm_90 (tf32: its own
// test, WgmmaBackwardDataTf32TilesCompile).
TEST(Codegen, DefaultBackwardDataOnSm90) {
  auto desc = [](const char* rest) {
    return deft::parse_layer_desc(std::string("deform_conv2d n=16 r=3 s=3 pad=1 mask=1 ") + rest +
                                  " pass=backward_data");
  };
  for (const char* rest : {"c=512 h=32 w=32 k=512 dtype=f16 layout=nchw",
                           "c=256 h=14 w=14 k=256 dtype=bf16 layout=nhwc",
                           "c=128 h=56 w=56 k=128 stride=2 dtype=f16 layout=nchw"}) {
    const auto d = desc(rest);
    SCOPED_TRACE(rest);
    const deft::Variant v = deft::default_variant(d, 90);
    EXPECT_EQ(v.algo, deft::Algo::gemm_wgmma);
    EXPECT_EQ(deft::to_string(v),
              deft::to_string(deft::parse_variant(fmt::format(
                  "algo=gemm_wgmma tm=64 tn=64 tk=64 threads=256 stages=3 transpose={}",
                  d.layout == deft::Layout::nchw ? 1 : 0))));
    EXPECT_NO_THROW(deft::validate(d, v));
    // deterministic mode: the same tile (its gather form)
    EXPECT_EQ(deft::default_variant(d, 90, true), v);
    deft::Variant det = v;
    det.deterministic = true;
    EXPECT_EQ(deft::make_plan(d, det).gin_mode, 3);
    EXPECT_EQ(deft::default_variant(d, 80).algo, deft::Algo::gemm_tc);
    EXPECT_EQ(deft::default_variant(d, 0).algo, deft::Algo::gemm_tc);
  }
  EXPECT_EQ(deft::default_variant(desc("c=64 h=64 w=64 k=64 dtype=f16 layout=nchw"), 90).algo,
            deft::Algo::gemm_tc);
  EXPECT_EQ(
      deft::default_variant(desc("c=512 h=32 w=32 k=512 dtype=f32 math=tf32 layout=nchw"), 90, true)
          .algo,
      deft::Algo::gemm_wgmma);
  EXPECT_EQ(deft::default_variant(desc("c=64 h=64 w=64 k=64 dtype=f16 layout=nchw"), 90, true).algo,
            deft::Algo::gemm_tc);
  // the deterministic default is what choose_variant gives in deterministic mode
  deft::CompileOptions det;
  det.deterministic = true;
  det.arch = 90;
  const auto d = desc("c=512 h=32 w=32 k=512 dtype=f16 layout=nchw");
  EXPECT_EQ(deft::tuner::choose_variant(d, det), deft::default_variant(d, 90, true));
}

// The FMA forward's micro-tile reads shared memory in 16-byte vectors (4 floats, or 2 + 2
// doubles) where its runs of 4 rows and columns allow; the scalar form stays for tiles that
// do not (16 output channels: one column a thread). The heuristic's strict-f32 tile for groups
// of 128 output channels or more is 128 x 128 (8 x 8 a thread), 64 x 64 below.
TEST(Codegen, FmaMicroTileReadsVectors) {
  auto ptx_of = [](const std::string& desc, const std::string& variant) {
    deft::CompileOptions o;
    o.arch = 80;
    o.cache_path = "";
    if (!variant.empty()) o.variant = deft::parse_variant(variant);
    return deft::emit_ptx(deft::parse_layer_desc(desc), o);
  };
  const std::string dense = "deform_conv2d n=2 c=256 h=12 w=12 k=256 r=3 s=3 pad=1 mask=1 ";
  for (const char* lay : {"layout=nchw", "layout=nhwc"}) {
    SCOPED_TRACE(lay);
    const auto d = deft::parse_layer_desc(dense + "dtype=f32 " + lay);
    const deft::Variant v = deft::default_variant(d);
    EXPECT_EQ(v.algo, deft::Algo::gemm_simt);
    EXPECT_EQ(v.tile_m, 128);
    EXPECT_EQ(v.tile_n, 128);
    EXPECT_NE(ptx_of(dense + "dtype=f32 " + lay, "").find("ld.shared.v4.f32"), std::string::npos);
    EXPECT_NE(ptx_of(dense + "dtype=f64 " + lay, "").find("ld.shared.v2.f64"), std::string::npos);
  }
  EXPECT_EQ(deft::default_variant(deft::parse_layer_desc(
                "deform_conv2d n=2 c=64 h=12 w=12 k=64 r=3 s=3 pad=1 mask=1 dtype=f32"))
                .tile_n,
            64);
  // 16 output channels: TN = 1, scalar reads
  const std::string narrow = ptx_of(
      "deform_conv2d n=2 c=64 h=12 w=12 k=16 r=3 s=3 pad=1 mask=1 dtype=f32 layout=nchw",
      "algo=gemm_simt tm=64 tn=16 tk=16 threads=256");
  EXPECT_EQ(narrow.find("ld.shared.v4.f32"), std::string::npos);
  EXPECT_NE(narrow.find("ld.shared.f32"), std::string::npos);
}

// backward_data on wgmma in tf32 (f32 layers with math=tf32, opt-in): k8 wgmmas with both
// operands K-major (no transpose operands: an nchw grad_out tile is transposed by its copy, the
// packed weight written K-major), 32-channel weight slices, both operands rounded to tf32
// (cvt.rna), f32 vector reductions; no spills in the fast mode's tiles and the deterministic
// ones; the tile and the packed weight in 4-byte elements.
TEST(Codegen, WgmmaBackwardDataTf32TilesCompile) {
  for (const char* text :
       {"deform_conv2d n=2 c=256 h=9 w=10 k=512 r=3 s=3 pad=1 mask=1 dtype=f32 math=tf32 "
        "layout=nchw pass=backward_data",
        "deform_conv2d n=2 c=128 h=7 w=9 k=200 r=3 s=3 pad=1 mask=1 dtype=f32 math=tf32 "
        "layout=nhwc pass=backward_data",
        "deform_conv2d n=32 c=256 h=14 w=14 k=256 r=3 s=3 pad=1 mask=1 dtype=f32 math=tf32 "
        "layout=nchw pass=backward_data"}) {
    const auto d = deft::parse_layer_desc(text);
    SCOPED_TRACE(text);
    const bool nchw = d.layout == deft::Layout::nchw;
    const int64_t kgp = (d.k + 31) / 32 * 32;
    for (auto [tm, wgs, tn, stages, det] :
         {std::array{64, 2, 64, 3, 0}, {64, 1, 64, 0, 0}, {64, 2, 128, 0, 0}, {64, 2, 64, 3, 1},
          {64, 1, 64, 0, 1}}) {
      const deft::Variant v = deft::parse_variant(fmt::format(
          "algo=gemm_wgmma tm={} tn={} tk=32 threads={} transpose={}{}{}", tm, tn, 128 * wgs,
          nchw ? 1 : 0, stages ? fmt::format(" stages={}", stages) : "", det ? " det=1" : ""));
      SCOPED_TRACE(deft::to_string(v));
      const deft::CompileInfo info = compile_for_sm90(d, v);
      EXPECT_NE(info.resource_report.find("0 bytes spill stores"), std::string::npos)
          << info.resource_report;
      const deft::KernelPlan plan = deft::make_plan(d, v);
      EXPECT_EQ(plan.workspace_packed_bytes, d.taps() * d.c * kgp * 4);
      EXPECT_EQ(plan.gv, nchw ? 1 : 4);
      EXPECT_NE(info.shared_layout.find(fmt::format("grad_out tile {} ({} pixels x {} output",
                                                    tm * kgp * 4, tm, kgp)),
                std::string::npos) << info.shared_layout;
      const std::string ptx = sm90a_ptx(d, v);
      EXPECT_NE(ptx.find(fmt::format("wgmma.mma_async.sync.aligned.m64n{}k8.f32.tf32.tf32", tn)),
                std::string::npos);
      EXPECT_NE(ptx.find("p, 1, 1;"), std::string::npos) << "no transpose operands for tf32";
      EXPECT_NE(ptx.find("cvt.rna.tf32.f32"), std::string::npos);
      // nchw: the tile transposed element by element (4-byte copies); nhwc: 16-byte copies
      EXPECT_NE(ptx.find(nchw ? "cp.async.ca.shared.global" : "cp.async.cg.shared.global"),
                std::string::npos);
      if (det) {  // no 64-bit atomics: the values are stored and gathered per input pixel
        EXPECT_EQ(ptx.find(".add.u64"), std::string::npos);
        EXPECT_NE(ptx.find(".entry deft_bwd_gather"), std::string::npos);
      } else {
        EXPECT_NE(ptx.find("red.global.add.v4.f32"), std::string::npos);
      }
    }
  }
  // the heuristic's tf32 choice on sm_90 (fast mode): four warpgroups for 512 output channels
  // a group, else two, in both modes; strict f32 keeps the FMA kernel
  for (auto [k, threads] : {std::pair{512, 512}, {256, 256}, {128, 256}}) {
    const auto d = deft::parse_layer_desc(fmt::format(
        "deform_conv2d n=16 c=256 h=16 w=16 k={} r=3 s=3 pad=1 mask=1 dtype=f32 math=tf32 "
        "layout=nchw pass=backward_data", k));
    EXPECT_EQ(deft::default_variant(d, 90),
              deft::parse_variant(fmt::format("algo=gemm_wgmma tm=64 tn=64 tk=32 threads={} "
                                              "stages=3 transpose=1", threads)));
    EXPECT_EQ(deft::default_variant(d, 90, true), deft::default_variant(d, 90));
    EXPECT_EQ(deft::default_variant(d, 80).algo, deft::Algo::gemm_tc);
    auto strict = d;
    strict.math = deft::MathMode::fp32;
    EXPECT_EQ(deft::default_variant(strict, 90).algo, deft::Algo::gemm_simt);
  }
}

// The streaming grad-input kernel's vector epilogue (vec=4, opt-in): 4 neighbouring channels a
// thread, one 16-byte corner load and (f32 workspace) one red.global.add.v4.f32 per corner;
// fixed-point atomics per element in deterministic mode; the default (vec=1) keeps the scalar
// epilogue; the layers it cannot serve are refused naming vec.
TEST(Codegen, StreamingBackwardDataVectorEpilogue) {
  auto ptx_of = [](const std::string& desc, const std::string& variant) {
    deft::CompileOptions o;
    o.arch = 90;  // red.global.add.v4.f32 is sm_90's
    o.cache_path = "";
    o.variant = deft::parse_variant(variant);
    return deft::emit_ptx(deft::parse_layer_desc(desc), o);
  };
  const std::string f32 =
      "deform_conv2d n=2 c=64 h=12 w=12 k=48 r=3 s=3 pad=1 mask=1 dtype=f32 layout=nchw "
      "pass=backward_data";
  const std::string v = "algo=gemm_simt tm=64 tn=32 tk=16 threads=256 transpose=1";
  const std::string vec = ptx_of(f32, v + " vec=4");
  EXPECT_NE(vec.find("red.global.add.v4.f32"), std::string::npos);
  EXPECT_NE(vec.find("ld.global.nc.v4.f32"), std::string::npos);
  EXPECT_NE(vec.find("ld.shared.v4.f32"), std::string::npos) << "aligned micro-tile rows";
  EXPECT_EQ(ptx_of(f32, v).find("red.global.add.v4.f32"), std::string::npos);
  const std::string det = ptx_of(f32, v + " vec=4 det=1");
  EXPECT_NE(det.find("ld.global.nc.v4.f32"), std::string::npos);
  EXPECT_NE(det.find(".add.u64"), std::string::npos);
  // f16 with groups the tensor cores do not take (40 channels): the f32 workspace
  EXPECT_NE(ptx_of("deform_conv2d n=2 c=40 h=9 w=10 k=40 r=3 s=3 pad=1 mask=1 dtype=f16 "
                   "layout=nhwc pass=backward_data",
                   "algo=gemm_simt tm=64 tn=32 tk=16 threads=256 vec=4")
                .find("red.global.add.v4.f32"),
            std::string::npos);
  const std::string base = "deform_conv2d n=2 c=64 h=12 w=12 k=48 r=3 s=3 pad=1 mask=1 ";
  refused(base + "dtype=f32 layout=nchw pass=backward_data", v + " vec=2", "vec");
  refused(base + "dtype=f32 layout=nchw pass=backward_data",
          "algo=gemm_simt tm=64 tn=32 tk=16 threads=256 transpose=0 vec=4", "vec");  // nchw planes
  refused(base + "dtype=f32 layout=nhwc pass=backward_data",
          "algo=gemm_simt tm=64 tn=32 tk=16 threads=256 vec=4", "vec");  // the caller's grad input
  refused(base + "dtype=f64 layout=nchw pass=backward_data", v + " vec=4", "vec");
  refused("deform_conv2d n=2 c=66 h=12 w=12 k=48 r=3 s=3 pad=1 mask=1 dtype=f32 layout=nchw "
          "pass=backward_data", v + " vec=4", "vec");  // 66 channels: no whole vectors
}

}  // namespace

// The sm_90 grad-weight heuristic (compiler/variant.cpp, perf notes rounds B10, B20-B22): the
// warp-specialised wgmma tile by output channels a group, where 64-channel tiles fit (tf32, both
// layouts: 256 x 64 P2, or 128 x 128 P2 as for f16 up to 128 output channels; f16 256 x 128 P1 with
// batch=4); the WMMA kernel elsewhere (32 channels a group, strict f32, sm_80) and the
// depthwise kernel for depthwise layers. Every tile it picks passes the plan.
TEST(Heuristic, GradWeightOnSm90) {
  struct Want {
    const char* layer;
    int tm, tn, producers;  // tm = 0: not gemm_wgmma
    int batch = 0;
  };
  const Want wants[] = {
      {"n=16 c=512 h=32 w=32 k=512 dtype=f16", 256, 128, 1, 4},       // dense512
      {"n=32 c=256 h=14 w=14 k=256 dtype=f16", 256, 64, 2},           // resnet_res4
      {"n=2 c=256 h=50 w=84 k=256 dtype=bf16 layout=nhwc", 256, 64, 2},
      {"n=32 c=128 h=56 w=56 k=128 stride=2 dtype=f16", 128, 128, 2},  // stride2
      {"n=8 c=64 h=64 w=64 k=64 dtype=f16", 128, 64, 1},               // deft_64
      {"n=4 c=512 h=16 w=16 k=512 offset_groups=8 dtype=f16", 256, 64, 2},  // 64 per og
      {"n=4 c=128 h=16 w=16 k=128 groups=4 dtype=f16", 0, 0, 0},       // 32 channels a group
      {"n=4 c=128 h=16 w=16 k=128 dtype=f32 math=tf32", 128, 128, 2},  // tf32, stride2-like
      {"n=16 c=512 h=32 w=32 k=512 dtype=f32 math=tf32", 256, 64, 2},  // tf32 dense512
      {"n=8 c=64 h=64 w=64 k=64 dtype=f32 math=tf32", 256, 64, 2},     // tf32 deft_64
      {"n=4 c=128 h=16 w=16 k=128 dtype=f32 math=tf32 layout=nhwc", 128, 128, 2},  // nhwc tf32
      {"n=32 c=256 h=14 w=14 k=256 dtype=f32 math=tf32 layout=nhwc", 256, 64, 2},
      {"n=4 c=128 h=16 w=16 k=128 dtype=f32", 0, 0, 0},                // strict f32
      {"n=4 c=128 h=16 w=16 k=128 groups=128 dtype=f16", 0, 0, 0},     // depthwise
  };
  for (const Want& w : wants) {
    const auto d = deft::parse_layer_desc(fmt::format(
        "deform_conv2d {} r=3 s=3 pad=1 mask=1 pass=backward_weight", w.layer));
    SCOPED_TRACE(deft::to_string(d));
    const deft::Variant v = deft::default_variant(d, 90);
    EXPECT_NO_THROW(deft::validate(d, v)) << deft::to_string(v);
    EXPECT_EQ(deft::default_variant(d, 80), deft::default_variant(d));  // sm_90 only
    if (w.tm == 0) {
      EXPECT_NE(v.algo, deft::Algo::gemm_wgmma) << deft::to_string(v);
      EXPECT_EQ(v, deft::default_variant(d));
      continue;
    }
    EXPECT_EQ(v.algo, deft::Algo::gemm_wgmma);
    EXPECT_EQ(v.tile_m, w.tm);
    EXPECT_EQ(v.tile_n, w.tn);
    EXPECT_EQ(v.producers, w.producers);
    EXPECT_EQ(v.batch, w.batch);
    EXPECT_EQ(v.threads, 2 * w.tm + 128 * w.producers);
    EXPECT_EQ(v.transpose, d.layout == deft::Layout::nchw);
  }
}

// Deterministic grad input: the gather form (gin_mode 3) where the resident WMMA kernel, the
// wgmma kernel or the depthwise kernel (direct: no values buffer) runs the pass, 64-bit atomics
// (2) in the streaming and f64 kernels; the gather buffers' layout (counts first, the only part
// zeroed; 256-byte aligned pieces).
TEST(Codegen, DeterministicGradInputTakesTheGatherFormWhereItCan) {
  auto mode = [](const std::string& desc, const std::string& variant) {
    return deft::make_plan(deft::parse_layer_desc(desc), deft::parse_variant(variant)).gin_mode;
  };
  const std::string dense =
      "deform_conv2d n=16 c=512 h=32 w=32 k=512 r=3 s=3 pad=1 mask=1 pass=backward_data ";
  const std::string tc = "algo=gemm_tc tm=64 tn=64 tk=32 threads=256 transpose=1";
  EXPECT_EQ(mode(dense + "dtype=f16", tc + " det=1"), 3);
  EXPECT_EQ(mode(dense + "dtype=f16", tc), 1);
  EXPECT_EQ(mode(dense + "dtype=f32 math=tf32", "algo=gemm_tc tm=32 tn=64 tk=32 threads=256 transpose=1 det=1"), 3);
  EXPECT_EQ(mode(dense + "dtype=f16", "algo=gemm_wgmma tm=64 tn=64 tk=64 threads=256 stages=3 transpose=1 det=1"), 3);
  EXPECT_EQ(mode(dense + "dtype=f32", "algo=gemm_simt tm=64 tn=64 tk=32 threads=256 transpose=1 det=1"), 2);
  EXPECT_EQ(mode(dense + "dtype=f64", "algo=gemm_simt tm=64 tn=32 tk=16 threads=256 transpose=1 det=1"), 2);
  const std::string dw = "deform_conv2d n=2 c=64 h=9 w=9 k=64 groups=64 r=3 s=3 pad=1 mask=1 pass=backward_data ";
  const std::string dwv = "algo=depthwise tm=8 tn=1 tk=1 threads=256 transpose=1";
  // the depthwise kernel's deterministic default: the f32 gather over sorted lists (4, sorted);
  // gin=gather det=1 the fixed-point gather (3)
  auto sorted = [](const std::string& desc, const std::string& variant) {
    return deft::make_plan(deft::parse_layer_desc(desc), deft::parse_variant(variant)).gather_sorted;
  };
  for (const char* dt : {"dtype=f16", "dtype=bf16", "dtype=f32"}) {
    SCOPED_TRACE(dt);
    EXPECT_EQ(mode(dw + dt, dwv + " det=1"), 4);
    EXPECT_TRUE(sorted(dw + dt, dwv + " det=1"));
    EXPECT_EQ(mode(dw + dt, dwv + " gin=gather det=1"), 3);
    EXPECT_FALSE(sorted(dw + dt, dwv + " gin=gather det=1"));
    EXPECT_FALSE(sorted(dw + dt, dwv + " gin=gather"));
  }
  EXPECT_FALSE(sorted(dense + "dtype=f16", tc + " det=1"));  // the values gather: fixed point
  EXPECT_EQ(mode(dw + "dtype=f16", dwv), 1);
  // the fast mode's lanes run along the channels of the transposed input: grad_out through its
  // channels-last copy too
  EXPECT_TRUE(deft::make_plan(deft::parse_layer_desc(dw + "dtype=f16"), deft::parse_variant(dwv)).gout_t);
  EXPECT_NE(deft::generate_source(deft::parse_layer_desc(dw + "dtype=f16"), deft::parse_variant(dwv))
                .find("constexpr bool GOUT_T = true;"),
            std::string::npos);
  EXPECT_FALSE(deft::make_plan(deft::parse_layer_desc(dw + "dtype=f16 layout=nhwc"),
                               deft::parse_variant("algo=depthwise tm=8 tn=1 tk=1 threads=256")).gout_t);
  EXPECT_EQ(mode(dw + "dtype=f64", dwv + " det=1"), 2);
  // gin=gather: the same gather in the fast mode, summing in f32 (4; deterministic mode keeps 3)
  EXPECT_EQ(mode(dw + "dtype=f16", dwv + " gin=gather"), 4);
  EXPECT_EQ(mode(dw + "dtype=f32", dwv + " gin=gather det=1"), 3);
  {
    const auto dd = deft::parse_layer_desc(dw + "dtype=f16");
    const deft::KernelPlan p4 = deft::make_plan(dd, deft::parse_variant(dwv + " gin=gather"));
    EXPECT_TRUE(p4.gather_direct && p4.gout_t);
    EXPECT_EQ(p4.workspace_bytes, 32 + 4 * 2 * 64 * 9 * 9);  // f32 accumulators
    const std::string src = deft::generate_source(dd, deft::parse_variant(dwv + " gin=gather"));
    EXPECT_NE(src.find("#define GIN_MODE 4"), std::string::npos);
  }
  for (const char* layout : {"nchw", "nhwc"}) {
    SCOPED_TRACE(layout);
    const auto dd = deft::parse_layer_desc(dw + "dtype=f16 layout=" + layout);
    const deft::Variant vd = deft::parse_variant(
        std::string("algo=depthwise tm=8 tn=1 tk=1 threads=256 det=1") +
        (std::string(layout) == "nchw" ? " transpose=1" : ""));
    const deft::KernelPlan p = deft::make_plan(dd, vd);
    EXPECT_TRUE(p.gather_direct);
    EXPECT_EQ(p.gout_t, std::string(layout) == "nchw");
    EXPECT_EQ(p.workspace_gout_bytes, p.gout_t ? 2 * 64 * 9 * 9 * 2 : 0);
    EXPECT_EQ(p.ev, 4);  // it scatters nothing: channel vectors as in the fast mode
    EXPECT_EQ(p.gather_vec, 4);  // 162 warps' items: too few for 8 channels a lane
    EXPECT_EQ(p.gather_slices, 1);
    EXPECT_EQ(p.align_gout, std::string(layout) == "nhwc" ? 8 : 1);  // the gather's vectors
    // a layer whose gather fills its 1024 blocks with 8 channels a lane takes them (dw512),
    // one image of it does not (dw512_n1), nor f32
    for (auto [n, dt, vec] : {std::tuple{16, "f16", 8}, std::tuple{1, "f16", 4}, std::tuple{16, "f32", 4}}) {
      const auto big = deft::parse_layer_desc(fmt::format(
          "deform_conv2d n={} c=512 h=32 w=32 k=512 groups=512 r=3 s=3 pad=1 mask=1 "
          "pass=backward_data dtype={} layout={}", n, dt, layout));
      const deft::KernelPlan pb = deft::make_plan(big, vd);
      EXPECT_EQ(pb.gather_vec, vec) << n << " " << dt;
      EXPECT_EQ(pb.gather_slices, 512 / (32 * vec));
    }
    const deft::GatherLayout g = deft::gather_layout(dd, p);
    EXPECT_EQ(g.list + (4 * g.points + 255) / 256 * 256, g.values);
    EXPECT_EQ(g.bytes, g.values);  // no values
    // the module: the gather reads grad_out, weight and mask, over lists the sort kernel
    // orders; no 64-bit atomic adds anywhere
    EXPECT_EQ(p.gin_mode, 4);
    EXPECT_TRUE(p.gather_sorted);
    // nhwc: the gather writes grad input itself (no f32 workspace, no finish); nchw: f32
    // accumulators, transposed back by the finish
    const bool nhwc = std::string(layout) == "nhwc";
    EXPECT_EQ(p.gather_out, nhwc);
    EXPECT_EQ(p.workspace_bytes, 32 + (nhwc ? 0 : 4 * 2 * 64 * 9 * 9));
    const std::string src = deft::generate_source(dd, vd);
    EXPECT_NE(src.find("#define GATHER_DIRECT 1"), std::string::npos);
    EXPECT_NE(src.find("#define GATHER_SORTED 1"), std::string::npos);
    EXPECT_EQ(src.find("#define GATHER_OUT 1") != std::string::npos, nhwc);
    // nchw: the transpose kernel for the input's and grad_out's channels-last copies
    EXPECT_EQ(src.find("deft_transpose(") != std::string::npos, std::string(layout) == "nchw");
    deft::CompileOptions o;
    o.arch = 90;
    o.cache_path = "";
    o.variant = vd;
    const std::string ptx = deft::emit_ptx(dd, o);
    EXPECT_EQ(ptx.find(".add.u64"), std::string::npos);
    EXPECT_NE(ptx.find("deft_bwd_gather"), std::string::npos);
    EXPECT_NE(ptx.find(".entry deft_bwd_sort"), std::string::npos);
    EXPECT_FALSE(p.gin_fixed_point());  // no deft_bwd_bound launch: f32 sums need no scale
  }
  // a 7 x 9 nchw plane: grad_out copies of one element, so the streaming kernel, atomics
  EXPECT_EQ(mode("deform_conv2d n=2 c=64 h=7 w=9 k=48 r=3 s=3 pad=1 offset_groups=2 mask=1 "
                 "dtype=f16 pass=backward_data", "algo=gemm_tc tm=64 tn=32 tk=32 threads=256 transpose=1 det=1"), 2);

  const auto d = deft::parse_layer_desc(dense + "dtype=f16 offset_groups=2");
  const deft::GatherLayout g = deft::gather_layout(d);
  EXPECT_EQ(g.points, int64_t{16} * 32 * 32 * 2 * 9);
  EXPECT_EQ(g.cells, int64_t{16} * 2 * 33 * 33);
  EXPECT_EQ(g.counts, 0);
  EXPECT_EQ(g.zero_bytes, (4 * (g.cells + 1) + 255) / 256 * 256);
  for (int64_t off : {g.cell_of, g.rank, g.frac, g.list, g.values, g.bytes}) EXPECT_EQ(off % 256, 0);
  EXPECT_EQ(g.cell_of, g.zero_bytes);
  EXPECT_EQ(g.values - g.list, (4 * g.points + 255) / 256 * 256);
  EXPECT_EQ(g.bytes - g.values, 4 * g.points * 256);  // f32 per point and channel of its group
}

// The depthwise grad input with staging=window: the tile and window the plan derives, the
// shared memory it asks for, the constants the source gets, an NVRTC compile without spills,
// and clear refusals where the kernel cannot run.
// gin=local: the local gather's tile, candidate region and shared memory, and what it refuses.
TEST(Codegen, DepthwiseGradInputLocal) {
  const std::string dw =
      "deform_conv2d n=2 c=256 h=9 w=11 k=256 groups=256 r=3 s=3 pad=1 mask=1 pass=backward_data ";
  const std::string loc = "algo=depthwise tm=8 tn=1 tk=1 threads=256 halo=2 gin=local";
  const auto d = deft::parse_layer_desc(dw + "dtype=f16 layout=nhwc");
  const deft::Variant v = deft::parse_variant(loc);
  EXPECT_TRUE(v.gin_local);
  EXPECT_EQ(deft::to_string(v).find("gin=local") != std::string::npos, true);
  const deft::KernelPlan p = deft::make_plan(d, v);
  EXPECT_EQ(p.gin_mode, 5);
  EXPECT_FALSE(p.gather_direct);
  EXPECT_TRUE(p.ws_nhwc);
  EXPECT_EQ(p.lg.tiles_y, 2);  // 9 rows in tiles of 8
  EXPECT_EQ(p.lg.tiles_x, 2);
  EXPECT_EQ(p.lg.radius, 2);
  EXPECT_EQ(p.lg.rows, 8 + 2 + 4 + 1);  // tile, taps - 1, 2 R, one more
  EXPECT_EQ(p.lg.cols, 8 + 2 + 4 + 1);
  EXPECT_EQ(p.lg.slices, 2);            // 256 channels in slices of 128
  EXPECT_EQ(p.lg.per_block, 2);         // both in one block
  EXPECT_EQ(p.lg.smem_bytes, 16 * 15 * 15 * 9 + 4 * 256 * 9 + 4 * (2 * 81 + 1));
  // 1024 channels: 8 slices, 4 a block
  const deft::KernelPlan wide = deft::make_plan(
      deft::parse_layer_desc("deform_conv2d n=2 c=1024 h=9 w=11 k=1024 groups=1024 r=3 s=3 pad=1 "
                             "mask=1 pass=backward_data dtype=f16 layout=nhwc"),
      v);
  EXPECT_EQ(wide.lg.slices, 8);
  EXPECT_EQ(wide.lg.per_block, 4);
  const deft::CompileInfo info = compile_for_sm90(d, v);
  EXPECT_NE(info.source.find("#define GIN_MODE 5"), std::string::npos);
  EXPECT_NE(info.source.find("constexpr int LG_R = 2;"), std::string::npos);
  EXPECT_NE(info.source.find("constexpr int LG_SPB = 2;"), std::string::npos);
  EXPECT_EQ(info.source.find("#define GATHER_DIRECT"), std::string::npos);
  auto refused = [&](const std::string& desc, const std::string& var, const std::string& field) {
    try {
      deft::make_plan(deft::parse_layer_desc(dw + desc), deft::parse_variant(var));
      ADD_FAILURE() << var << " was accepted";
    } catch (const deft::DescError& e) {
      EXPECT_EQ(e.field(), field) << e.what();
    }
  };
  // deterministic: the fixed-point form (gin_mode 6), a 64-bit workspace, 512 threads
  const deft::Variant dv = deft::parse_variant(loc + " det=1");
  const deft::KernelPlan dp = deft::make_plan(d, dv);
  EXPECT_EQ(dp.gin_mode, 6);
  EXPECT_EQ(dp.lg.threads, 512);
  EXPECT_EQ(p.lg.threads, 1024);
  EXPECT_EQ(dp.workspace_bytes, 32 + 8 * 2 * 256 * 9 * 11);
  const deft::CompileInfo dinfo = compile_for_sm90(d, dv);
  EXPECT_NE(dinfo.source.find("#define GIN_MODE 6"), std::string::npos);
  const std::regex spills(R"(([1-9]\d*) bytes spill stores)");
  EXPECT_FALSE(std::regex_search(dinfo.resource_report, spills)) << dinfo.resource_report;
  refused("dtype=f64 layout=nhwc", loc, "gin");
  refused("dtype=f64 layout=nhwc", loc + " det=1", "gin");
  refused("dtype=f16 layout=nhwc", "algo=depthwise tm=8 tn=1 tk=1 threads=256 halo=9 gin=local", "halo");
  refused("dtype=f16 layout=nhwc", "algo=depthwise tm=8 tn=1 tk=1 threads=256 halo=2", "halo");
}

TEST(Codegen, DepthwiseGradInputWindow) {
  const std::string dw =
      "deform_conv2d n=2 c=256 h=9 w=11 k=256 groups=256 r=3 s=3 pad=1 mask=1 pass=backward_data ";
  const std::string win = "algo=depthwise tm=16 tn=1 tk=1 threads=512 staging=window halo=1";
  const auto d = deft::parse_layer_desc(dw + "dtype=f16 layout=nhwc");
  const deft::KernelPlan p = deft::make_plan(d, deft::parse_variant(win));
  EXPECT_TRUE(p.dw_window);
  EXPECT_EQ(p.gin_mode, 1);
  EXPECT_EQ(p.ev, 4);
  EXPECT_EQ(p.tile_h, 4);
  EXPECT_EQ(p.tile_w, 4);
  EXPECT_EQ(p.tiles_y, 3);  // 9 rows in tiles of 4
  EXPECT_EQ(p.tiles_x, 3);  // 11 columns
  EXPECT_EQ(p.win_rows, 3 + 2 + 2 + 2);  // tile rows - 1, taps - 1, the bilinear pair, halo x 2
  EXPECT_EQ(p.win_cols, 9);
  EXPECT_EQ(p.smem_bytes, 4 * 128 * (9 * 9 + 9));  // window + the slice's weights, f32
  EXPECT_EQ(p.grid[0], 2u * 3 * 3);
  // strict f32 nhwc scatters into the caller's grad input by default; the window takes the
  // workspace (16-byte vector flushes)
  EXPECT_EQ(deft::make_plan(deft::parse_layer_desc(dw + "dtype=f32 layout=nhwc"),
                            deft::parse_variant(win)).gin_mode, 1);
  const deft::CompileInfo info = compile_for_sm90(d, deft::parse_variant(win));
  EXPECT_NE(info.resource_report.find("0 bytes spill stores"), std::string::npos)
      << info.resource_report;
  EXPECT_NE(info.source.find("#define DW_WINDOW 1"), std::string::npos);
  EXPECT_NE(info.source.find("constexpr int WIN_ROWS = 9;"), std::string::npos);
  EXPECT_EQ(info.dynamic_shared_bytes, p.smem_bytes);
  // the default kernel has no window
  EXPECT_NE(deft::generate_source(d, deft::parse_variant("algo=depthwise tm=8 tn=1 tk=1 threads=256"))
                .find("#define DW_WINDOW 0"),
            std::string::npos);
  refused(dw + "dtype=f16", win + " transpose=1 det=1", "staging");  // deterministic: gathers
  refused(dw + "dtype=f16", win + " transpose=1 gin=gather", "staging");
  refused(dw + "dtype=f16", win, "staging");                         // nchw without transpose
  refused(dw + "dtype=f64 layout=nhwc", win, "staging");              // f64 accumulators
  refused(dw + "dtype=f16 layout=nhwc",
          "algo=depthwise tm=16 tn=1 tk=1 threads=256 staging=window halo=1", "staging");
  refused(dw + "dtype=f16 layout=nhwc",
          "algo=depthwise tm=16 tn=1 tk=1 threads=512 staging=window halo=9", "halo");
  refused(dw + "dtype=f16 layout=nhwc", "algo=depthwise tm=8 tn=1 tk=1 threads=256 halo=1", "halo");
  // forward and grad weight have no window kernel
  EXPECT_THROW(deft::validate(deft::parse_layer_desc(
                                  "deform_conv2d n=2 c=64 h=9 w=9 k=64 groups=64 r=3 s=3 pad=1 "
                                  "dtype=f16 layout=nhwc pass=backward_weight"),
                              deft::parse_variant(win)),
               deft::NotImplemented);
}

// The depthwise data kernel stages its offset group's weights in shared memory where its lanes
// run along the channels (channels-last input: nhwc, or nchw with transpose=1; perf notes round
// B28): TAPS x channels of the accumulator type, within 96 KiB; the nchw kernel without the
// transpose (lanes on pixels, one weight a warp) and the window keep the global loads. Every
// form that takes the staging compiles with NVRTC, the staged weight read as a vector.
TEST(Codegen, DepthwiseGradInputStagesItsWeights) {
  const std::string dw = "deform_conv2d n=2 c=64 h=9 w=11 k=64 groups=64 r=3 s=3 pad=1 mask=1 "
                         "pass=backward_data ";
  struct W {
    std::string desc, variant;  // variant "" = default
    bool staged;
    int smem, ev;
  };
  const std::vector<W> cases = {
      {dw + "dtype=f16 layout=nhwc", "", true, 9 * 64 * 4, 4},
      {dw + "dtype=bf16 layout=nchw", "", true, 9 * 64 * 4, 4},  // transpose=1 by default
      // f32 on sm_90: the gather form (channel vectors; it scatters nothing)
      {dw + "dtype=f32 layout=nhwc", "", true, 9 * 64 * 4, 4},
      {dw + "dtype=f32 layout=nhwc", "algo=depthwise tm=8 tn=1 tk=1 threads=256", true, 9 * 64 * 4,
       1},  // the float atomics into grad input
      {dw + "dtype=f64 layout=nhwc", "", true, 9 * 64 * 8, 1},    // double accumulators
      {dw + "dtype=f16 layout=nhwc", "algo=depthwise tm=8 tn=1 tk=1 threads=256 det=1", true,
       9 * 64 * 4, 4},
      {dw + "dtype=f16 layout=nhwc", "algo=depthwise tm=8 tn=1 tk=1 threads=256 halo=1 gin=local",
       true, 9 * 64 * 4, 4},
      {"deform_conv2d n=2 c=96 h=9 w=11 k=96 groups=96 r=5 s=5 pad=2 offset_groups=2 mask=0 "
       "pass=backward_data dtype=f16 layout=nhwc", "", true, 25 * 48 * 4, 4},
      {dw + "dtype=f16 layout=nchw", "algo=depthwise tm=32 tn=1 tk=1 threads=256 transpose=0",
       false, 0, 1},
      {dw + "dtype=f16 layout=nhwc", "algo=depthwise tm=8 tn=1 tk=1 threads=256 staging=window "
       "halo=1", false, -1, 4},
      // 2816 channels x 9 taps x 4 bytes = 99 KiB: over the limit
      {"deform_conv2d n=1 c=2816 h=4 w=4 k=2816 groups=2816 r=3 s=3 pad=1 mask=1 "
       "pass=backward_data dtype=f16 layout=nhwc", "", false, 0, 4},
  };
  for (const W& w : cases) {
    const deft::LayerDesc d = deft::parse_layer_desc(w.desc);
    deft::Variant v = w.variant.empty() ? deft::default_variant(d, 90) : deft::parse_variant(w.variant);
    v.fuse_gw = false;  // (gw=fused stages its own taps' weights: Codegen.DepthwiseFusedGradWeight)
    SCOPED_TRACE(w.desc + " / " + deft::to_string(v));
    const deft::KernelPlan p = deft::make_plan(d, v);
    EXPECT_EQ(p.dw_wsmem, w.staged);
    EXPECT_EQ(p.ev, w.ev);
    if (w.smem >= 0) EXPECT_EQ(p.smem_bytes, w.smem);
    if (!w.staged) continue;
    const deft::CompileInfo info = compile_for_sm90(d, v);
    EXPECT_NE(info.source.find("#define DW_WSMEM 1"), std::string::npos);
    EXPECT_EQ(info.dynamic_shared_bytes, w.smem);
  }
}

// The depthwise grad input's heuristic default on sm_90: grad weight summed by the data kernel
// (gw=fused) with grad input gathered per input pixel (the fast mode's gin=gather; the
// deterministic mode's sorted gather), perf notes round B36; f64 keeps the float atomics and
// the separate grad-weight kernel. Other architectures: none of the sm_90 forms.
TEST(Heuristic, DepthwiseGradInputFusesGradWeightWithTheGather) {
  auto dw = [](int n, int c, int hw, const char* dtype, const char* layout = "nhwc") {
    return deft::parse_layer_desc(fmt::format(
        "deform_conv2d n={} c={} h={} w={} k={} groups={} r=3 s=3 pad=1 mask=1 dtype={} "
        "layout={} pass=backward_data", n, c, hw, hw, c, c, dtype, layout));
  };
  struct C {
    deft::LayerDesc d;
    bool det;
  };
  const std::vector<C> cases = {
      {dw(16, 512, 32, "f16"), false},          {dw(16, 1024, 16, "bf16"), false},
      {dw(1, 512, 32, "f16"), false},           {dw(4, 128, 96, "f16"), false},
      {dw(16, 512, 32, "f16"), true},           {dw(16, 512, 32, "f32"), false},
      {dw(1, 512, 32, "f32", "nchw"), false},   {dw(16, 512, 32, "f16", "nchw"), true},
      {dw(16, 512, 32, "f64"), false},
  };
  for (const C& c : cases) {
    SCOPED_TRACE(deft::to_string(c.d) + (c.det ? " det" : ""));
    deft::Variant v = deft::default_variant(c.d, 90, c.det);
    v.deterministic = c.det;  // as the runtime sets it
    const bool f64 = c.d.dtype == deft::DType::f64;  // atomics into grad input itself
    EXPECT_EQ(v.fuse_gw, !f64);
    EXPECT_EQ(v.gin_gather, !f64 && !c.det);
    EXPECT_FALSE(v.gin_local);
    const deft::KernelPlan p = deft::make_plan(c.d, v);
    EXPECT_EQ(p.gin_mode, f64 ? 0 : 4);
    EXPECT_EQ(p.gather_sorted, c.det);
    EXPECT_EQ(p.fused_gw, !f64);
    const deft::Variant v80 = deft::default_variant(c.d, 80, c.det);
    EXPECT_FALSE(v80.fuse_gw || v80.gin_local || (v80.gin_gather && !c.det));  // measured on sm_90 only
  }
}

// Whatever the default of a depthwise grad input, the tuner's space holds the float atomics,
// the gather form and the local gather at radii 1, 2, 4 and the spread's (a gin=local default must not drop
// the atomics, the pick at large spreads).
TEST(Heuristic, DepthwiseGradInputSpaceKeepsTheAtomics) {
  for (const char* text :
       {"deform_conv2d n=16 c=512 h=32 w=32 k=512 groups=512 r=3 s=3 pad=1 mask=1 dtype=f16 "
        "layout=nhwc pass=backward_data",
        "deform_conv2d n=1 c=512 h=32 w=32 k=512 groups=512 r=3 s=3 pad=1 mask=1 dtype=f16 "
        "layout=nhwc pass=backward_data"}) {
    SCOPED_TRACE(text);
    const deft::LayerDesc d = deft::parse_layer_desc(text);
    std::set<std::string> got;
    for (const deft::Variant& v : deft::search_space(d, 90)) got.insert(deft::to_string(v));
    deft::Variant a = deft::default_variant(d, 90);
    a.gin_local = a.gin_gather = false, a.halo = 0;
    std::vector<deft::Variant> want = {a};
    deft::Variant g = a;
    g.gin_gather = true;
    want.push_back(g);
    for (int r : {1, 2, 4, 6}) {  // 6: the spread's radius at the default sigma of 2
      deft::Variant l = a;
      l.gin_local = true, l.halo = r;
      want.push_back(l);
    }
    for (const deft::Variant& v : want) EXPECT_TRUE(got.count(deft::to_string(v))) << deft::to_string(v);
    EXPECT_EQ(got.size(), want.size());
  }
}
