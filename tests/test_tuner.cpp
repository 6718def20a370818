// Tuner: search space, statistics buckets, the record policy of compile(), the CLI, and (on a
// GPU) a real tuning run whose record compile() then follows.
#include <gtest/gtest.h>

#include <fmt/format.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <set>

#include "compiler/plan.hpp"
#include "deft/deft.hpp"
#include "deft/tuning.hpp"
#include "tests/gpu_test_util.hpp"
#include "tests/test_tmp.hpp"
#include "tuner/select.hpp"

namespace {

using deft::testing::ScopedEnv;

using deft::parse_layer_desc;

const char* kDense =
    "deform_conv2d n=2 c=64 h=20 w=20 k=128 r=3 s=3 pad=1 groups=1 offset_groups=1 mask=1 "
    "dtype=f16 layout=nchw";
const char* kDepthwise =
    "deform_conv2d n=2 c=64 h=20 w=20 k=64 r=3 s=3 pad=1 groups=64 offset_groups=1 mask=1 "
    "dtype=f32 layout=nhwc";

TEST(SearchSpace, DefaultFirstAllValidNoDuplicates) {
  for (const char* text : {kDense, kDepthwise,
                           "deform_conv2d n=1 c=12 h=9 w=9 k=20 r=3 s=3 pad=1 groups=4 "
                           "offset_groups=2 dtype=f64 layout=nhwc"}) {
    auto d = parse_layer_desc(text);
    auto space = deft::search_space(d);
    ASSERT_GE(space.size(), 2u) << text;
    EXPECT_EQ(space.front(), deft::default_variant(d)) << text;
    std::set<std::string> seen;
    for (const auto& v : space) {
      EXPECT_NO_THROW(deft::validate(d, v)) << deft::to_string(v);
      EXPECT_TRUE(seen.insert(deft::to_string(v)).second) << "duplicate " << deft::to_string(v);
    }
  }
  for (const auto& v : deft::search_space(parse_layer_desc(kDepthwise)))
    EXPECT_EQ(v.algo, deft::Algo::depthwise);
}

// On sm_90 the space starts with the wgmma default and holds every wgmma tile; f16/bf16 no
// WMMA tile (they lost everywhere measured: session 20), tf32 still the portable WMMA
// variants; other architectures never see wgmma; the hash follows the architecture's space.
TEST(SearchSpace, Sm90AddsEveryWgmmaTile) {
  const auto d = parse_layer_desc(kDense);
  const auto space = deft::search_space(d, 90);
  ASSERT_FALSE(space.empty());
  EXPECT_EQ(space.front(), deft::default_variant(d, 90));
  EXPECT_EQ(space.front().algo, deft::Algo::gemm_wgmma);
  std::set<std::string> seen;
  int wgmma = 0, wmma = 0;
  for (const auto& v : space) {
    EXPECT_NO_THROW(deft::validate(d, v)) << deft::to_string(v);
    EXPECT_TRUE(seen.insert(deft::to_string(v)).second) << "duplicate " << deft::to_string(v);
    wgmma += v.algo == deft::Algo::gemm_wgmma;
    wmma += v.algo == deft::Algo::gemm_tc;
  }
  EXPECT_EQ(wgmma, 6 + 8);  // register-A tiles, warp-specialised tiles
  EXPECT_EQ(wmma, 0);
  EXPECT_EQ(space.size(), size_t(wgmma));
  auto tf32 = d;
  tf32.dtype = deft::DType::f32, tf32.math = deft::MathMode::tf32;
  int tf32_wgmma = 0, tf32_wmma = 0;
  for (const auto& v : deft::search_space(tf32, 90)) {
    tf32_wgmma += v.algo == deft::Algo::gemm_wgmma;
    tf32_wmma += v.algo == deft::Algo::gemm_tc;
  }
  EXPECT_EQ(tf32_wgmma, 6 + 8);
  EXPECT_GT(tf32_wmma, 4);
  for (int arch : {0, 80, 100})
    for (const auto& v : deft::search_space(d, arch)) EXPECT_NE(v.algo, deft::Algo::gemm_wgmma);
  EXPECT_NE(deft::search_space_hash(d, 90), deft::search_space_hash(d, 80));
  EXPECT_EQ(deft::search_space_hash(d, 0), deft::search_space_hash(d));
}

// SearchOptions::window adds staging=window variants of three wgmma tiles on sm_90, with the
// halos of the bucket's sigma (ceil of the p50, p90, p99 of |dy|); without it the space and its
// hash are those of search_space(desc, arch); other architectures get no window variants.
TEST(SearchSpace, WindowVariantsFollowTheBucketsSigma) {
  EXPECT_EQ(deft::window_halos(0.5), (std::vector<int>{1, 2}));
  EXPECT_EQ(deft::window_halos(2.0), (std::vector<int>{2, 4, 6}));
  EXPECT_EQ(deft::window_halos(3.0), (std::vector<int>{3, 7, 11}));  // bucket 4
  EXPECT_EQ(deft::window_halos(8.0), (std::vector<int>{6, 14, 16}));  // at most 16
  const auto d = parse_layer_desc(kDense);
  EXPECT_EQ(deft::search_space(d, deft::SearchOptions{90, false, 2.0}), deft::search_space(d, 90));
  EXPECT_EQ(deft::search_space_hash(d, deft::SearchOptions{90, false, 8.0}),
            deft::search_space_hash(d, 90));
  for (double sigma : {0.5, 2.0}) {
    const auto space = deft::search_space(d, deft::SearchOptions{90, true, sigma});
    EXPECT_EQ(space.front(), deft::default_variant(d, 90));
    std::set<std::string> seen;
    std::set<int> halos;
    int windows = 0;
    for (const auto& v : space) {
      EXPECT_TRUE(seen.insert(deft::to_string(v)).second) << deft::to_string(v);
      EXPECT_NO_THROW(deft::validate(d, v)) << deft::to_string(v);
      if (v.staging != deft::Staging::window) continue;
      ++windows;
      halos.insert(v.halo);
      EXPECT_EQ(v.algo, deft::Algo::gemm_wgmma);
    }
    const auto want = deft::window_halos(sigma);
    EXPECT_EQ(halos, std::set<int>(want.begin(), want.end())) << sigma;
    EXPECT_GE(windows, int(want.size())) << sigma;
    EXPECT_NE(deft::search_space_hash(d, deft::SearchOptions{90, true, sigma}),
              deft::search_space_hash(d, 90));
  }
  EXPECT_EQ(deft::search_space(d, deft::SearchOptions{80, true, 2.0}), deft::search_space(d, 80));
}

// The depthwise forward's staging=window candidates: with SearchOptions::window on sm_80+,
// 4 x 8 and 8 x 8 tiles (tm 32, 64) for each halo of the bucket up to 8, every one valid; none
// without the option or before sm_80; and the plan refuses what the kernel cannot do.
TEST(SearchSpace, DepthwiseForwardWindowVariants) {
  const auto d = parse_layer_desc(
      "deform_conv2d n=16 c=512 h=32 w=32 k=512 r=3 s=3 pad=1 groups=512 mask=1 dtype=f16 layout=nhwc");
  for (double sigma : {0.5, 2.0, 8.0}) {
    std::set<std::pair<int, int>> got;
    for (const auto& v : deft::search_space(d, deft::SearchOptions{90, true, sigma})) {
      if (v.staging != deft::Staging::window) continue;
      EXPECT_EQ(v.algo, deft::Algo::depthwise);
      EXPECT_NO_THROW(deft::validate(d, v)) << deft::to_string(v);
      got.insert({v.tile_m, v.halo});
    }
    std::set<std::pair<int, int>> want;
    for (int h : deft::window_halos(sigma))
      if (h <= 8) want.insert({32, h}), want.insert({64, h});
    EXPECT_EQ(got, want) << sigma;
    EXPECT_FALSE(want.empty());
    for (const auto& v : deft::search_space(d, deft::SearchOptions{75, true, sigma}))
      EXPECT_EQ(v.staging, deft::Staging::gather) << deft::to_string(v);
  }
  for (const auto& v : deft::search_space(d, deft::SearchOptions{90, false, 2.0}))
    EXPECT_EQ(v.staging, deft::Staging::gather) << deft::to_string(v);
  deft::Variant w = deft::default_variant(d, 90);
  w.staging = deft::Staging::window, w.halo = 2, w.tile_m = 64;
  const deft::KernelPlan p = deft::make_plan(d, w);
  EXPECT_TRUE(p.dw_window);
  EXPECT_EQ(p.tile_h, 8);
  EXPECT_EQ(p.win_rows, 7 + 2 + 2 + 4);  // the tile's rows, the kernel's, the +1 corner, halos
  EXPECT_EQ(p.smem_bytes, (15 * 15 + 9) * 64 * 2);
  EXPECT_EQ(p.grid[0], 16u * 4 * 4);
  w.tile_m = 48;
  EXPECT_THROW(deft::validate(d, w), deft::DescError);
  w.tile_m = 64, w.halo = 9;
  EXPECT_THROW(deft::validate(d, w), deft::DescError);
  // no 16-byte channel vectors with 12 channels of f16: no window
  const auto narrow = parse_layer_desc(
      "deform_conv2d n=2 c=12 h=11 w=10 k=12 r=3 s=3 pad=1 groups=12 mask=1 dtype=f16 layout=nhwc");
  deft::Variant nw = deft::default_variant(narrow, 90);
  nw.staging = deft::Staging::window, nw.halo = 1, nw.tile_m = 64;
  EXPECT_THROW(deft::validate(narrow, nw), deft::DescError);
}

TEST(SearchSpace, HashIsStableAndFollowsTheSpace) {
  auto a = parse_layer_desc(kDense), b = parse_layer_desc(kDepthwise);
  EXPECT_EQ(deft::search_space_hash(a), deft::search_space_hash(a));
  EXPECT_NE(deft::search_space_hash(a), deft::search_space_hash(b));
  EXPECT_EQ(deft::search_space_hash(a).size(), 16u);
}

TEST(StatsBucket, RoundsSigmaToAPowerOfTwo) {
  EXPECT_EQ(deft::stats_bucket(2.0), "v1:sigma~2");
  EXPECT_EQ(deft::stats_bucket(0.5), "v1:sigma~0.5");
  EXPECT_EQ(deft::stats_bucket(8.0), "v1:sigma~8");
  EXPECT_EQ(deft::stats_bucket(3.0), "v1:sigma~4");
  EXPECT_THROW(deft::stats_bucket(0.0), deft::Error);
  EXPECT_THROW(deft::stats_bucket(-1.0), deft::Error);
}

class Policy : public ::testing::Test {
 protected:
  deft::testing::TempDir dir_{"tuner"};
  std::shared_ptr<deft::cache::Database> db_ =
      deft::cache::Database::open((dir_.path() / "deft.db").string());
  deft::tuner::DeviceKey device_{"Test GPU|cc9.0|sm132", "13000"};
  deft::LayerDesc desc_ = parse_layer_desc(kDense);
  deft::Variant other_ = deft::search_space(desc_).back();

  void put(const deft::cache::TuningRecord& key, const deft::Variant& winner) {
    auto r = key;
    r.winner = deft::to_string(winner);
    r.winner_us = 10;
    r.default_us = 20;
    r.candidates = {{deft::to_string(winner), 10, ""}};
    db_->put_tuning_record(r);
  }
  deft::Variant choose(const deft::CompileOptions& o = {}) {
    return deft::tuner::choose_variant(desc_, o, db_.get(), &device_);
  }
};

TEST_F(Policy, NoRecordMeansTheHeuristicDefault) {
  EXPECT_EQ(choose(), deft::default_variant(desc_));
}

TEST_F(Policy, AMatchingRecordPicksItsWinner) {
  ASSERT_NE(other_, deft::default_variant(desc_));
  put(deft::tuner::record_key(desc_, "v1:sigma~2", device_), other_);
  EXPECT_EQ(choose(), other_);
  deft::CompileOptions off;
  off.use_tuning_records = false;
  EXPECT_EQ(choose(off), deft::default_variant(desc_));
  deft::CompileOptions explicit_variant;
  explicit_variant.variant = deft::default_variant(desc_);
  EXPECT_EQ(choose(explicit_variant), deft::default_variant(desc_));
}

TEST_F(Policy, RecordsForAnotherKeyAreIgnored) {
  auto key = deft::tuner::record_key(desc_, "v1:sigma~2", device_);
  auto other_device = key, other_bucket = key, other_space = key, other_driver = key;
  other_device.device = "Other GPU|cc8.0|sm108";
  other_bucket.stats_bucket = "v1:sigma~8";
  other_space.search_space = "0000000000000000";
  other_driver.driver_version = "12000";
  for (const auto& k : {other_device, other_bucket, other_space, other_driver}) put(k, other_);
  EXPECT_EQ(choose(), deft::default_variant(desc_));
  deft::CompileOptions bucket8;
  bucket8.stats_bucket = "v1:sigma~8";
  EXPECT_EQ(choose(bucket8), other_);  // ... but the bucket it was tuned for finds it
}

// A record of the space with window variants (deft tune --window) is found like a plain one and,
// where both exist, preferred; a bucket's space holds the halos of that bucket's sigma.
TEST_F(Policy, AWindowSpaceRecordIsFoundAndPreferred) {
  const deft::tuner::DeviceKey h200{"Test GPU|cc9.0|sm132", "13000", 90};
  deft::Variant window_winner;
  for (const auto& v : deft::search_space(desc_, deft::SearchOptions{90, true, 2.0}))
    if (v.staging == deft::Staging::window) window_winner = v;
  ASSERT_EQ(window_winner.staging, deft::Staging::window);
  deft::CompileOptions o;
  o.arch = 90;
  auto pick = [&] { return deft::tuner::choose_variant(desc_, o, db_.get(), &h200); };
  EXPECT_EQ(pick(), deft::default_variant(desc_, 90));
  put(deft::tuner::record_key(desc_, "v1:sigma~2", h200, false), other_);
  EXPECT_EQ(pick(), other_);
  put(deft::tuner::record_key(desc_, "v1:sigma~2", h200, true), window_winner);
  EXPECT_EQ(pick(), window_winner);
  // The window record of bucket 2 is not one of bucket 8 (whose space has other halos).
  o.stats_bucket = "v1:sigma~8";
  EXPECT_EQ(pick(), deft::default_variant(desc_, 90));
  EXPECT_NE(deft::tuner::record_key(desc_, "v1:sigma~8", h200, true).search_space,
            deft::tuner::record_key(desc_, "v1:sigma~2", h200, true).search_space);
  EXPECT_EQ(deft::tuner::sigma_of_bucket("v1:sigma~0.5"), 0.5);
  EXPECT_EQ(deft::tuner::sigma_of_bucket("v2:other"), std::nullopt);
  EXPECT_EQ(deft::tuner::sigma_of_bucket("v1:sigma~2x"), std::nullopt);
}

TEST_F(Policy, AnUnusableWinnerFallsBackToTheDefault) {
  auto key = deft::tuner::record_key(desc_, "v1:sigma~2", device_);
  key.winner = "algo=depthwise vec=8";  // not valid for a dense layer
  key.winner_us = 1;
  db_->put_tuning_record(key);
  EXPECT_EQ(choose(), deft::default_variant(desc_));
}

std::string run(const std::string& cmd, int* rc) {
  std::string out;
  FILE* p = popen((cmd + " 2>&1").c_str(), "r");
  char buf[4096];
  while (p && fgets(buf, sizeof buf, p)) out += buf;
  const int status = p ? pclose(p) : -1;
  *rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return out;
}

TEST_F(Policy, CliInspectShowsTheRecord) {
  put(deft::tuner::record_key(desc_, "v1:sigma~2", device_), other_);
  int rc = 0;
  const std::string out = run(std::string(DEFT_CLI_PATH) + " inspect '" + kDense + "' --db " +
                                  (dir_.path() / "deft.db").string(),
                              &rc);
  EXPECT_EQ(rc, 0) << out;
  EXPECT_NE(out.find(deft::to_string(other_)), std::string::npos) << out;
  EXPECT_NE(out.find("Test GPU|cc9.0|sm132"), std::string::npos) << out;
  EXPECT_NE(out.find("winner 10.0 us (default 20.0 us)"), std::string::npos) << out;
}

TEST(TunerCli, TuneWithoutAGpuSaysSo) {
  if (deft::gpu_available()) GTEST_SKIP() << "a GPU is present";
  int rc = 0;
  const std::string out = run(std::string(DEFT_CLI_PATH) + " tune '" + kDense + "'", &rc);
  EXPECT_EQ(rc, 1) << out;
  EXPECT_NE(out.find("tune needs a GPU"), std::string::npos) << out;
}

TEST(GpuTune, WritesARecordThatCompileFollows) {
  DEFT_SKIP_WITHOUT_GPU();
  deft::testing::TempDir dir("gputune");
  const std::string db = (dir.path() / "deft.db").string();
  auto d = parse_layer_desc(
      "deform_conv2d n=2 c=32 h=14 w=14 k=64 r=3 s=3 pad=1 mask=1 dtype=f16 layout=nhwc");
  deft::TuneOptions o;
  o.cache_path = db;
  o.max_candidates = 6;
  o.seconds_per_candidate = 0.02;
  const deft::TuneResult r = deft::tune(d, o);
  ASSERT_EQ(r.candidates.size(), 6u);
  EXPECT_EQ(r.candidates.front().variant, deft::default_variant(d, r.arch));  // the GPU's own default
  EXPECT_EQ(r.candidates.front().rel_err, 0.0);
  int timed = 0;
  for (const auto& c : r.candidates) {
    if (c.median_us < 0) continue;
    ++timed;
    EXPECT_LE(c.rel_err, 1e-2) << deft::to_string(c.variant);
    EXPECT_GE(c.median_us, r.winner_us);
  }
  EXPECT_GE(timed, 2);
  EXPECT_GT(r.winner_us, 0);
  auto records = deft::cache::Database::open(db)->list_tuning_records(deft::to_string(d));
  ASSERT_EQ(records.size(), 1u);
  EXPECT_EQ(records[0].candidates.size(), 6u);
  EXPECT_EQ(records[0].stats_bucket, "v1:sigma~2");
  deft::CompileOptions co;
  co.cache_path = db;
  EXPECT_EQ(deft::compile(d, co).variant(), r.winner);
}

// ---- offset statistics (tuner/stats.cpp) ---------------------------------------------------

TEST(OffsetStats, PercentilesOfKnownInputs) {
  std::vector<double> v;
  for (int i = 100; i >= 1; --i) v.push_back(i);  // 1..100, reversed
  // Position p/100 * 99 between ranks, as numpy.percentile and torch.quantile compute it.
  EXPECT_DOUBLE_EQ(deft::percentile(v, 50), 50.5);
  EXPECT_DOUBLE_EQ(deft::percentile(v, 90), 90.1);
  EXPECT_DOUBLE_EQ(deft::percentile(v, 99), 99.01);
  EXPECT_EQ(deft::percentile(v, 100), 100);
  EXPECT_EQ(deft::percentile(v, 0), 1);
  std::vector<double> three = {3, 1, 2};
  EXPECT_EQ(deft::percentile(three, 50), 2);
  EXPECT_DOUBLE_EQ(deft::percentile(three, 90), 2.8);
  std::vector<double> empty;
  EXPECT_EQ(deft::percentile(empty, 50), 0);
  EXPECT_THROW(deft::percentile(three, 101), deft::Error);
}

// A 1x1 layer with a 4x4 output: 16 sampling points p = 4 ho + wo, with dy = 0.1 p and
// dx = +0.5 in column 0, -0.25 elsewhere, written in each layout's order.
TEST(OffsetStats, KnownInputsGiveKnownStatisticsInBothLayouts) {
  for (const char* layout : {"nchw", "nhwc"}) {
    auto d = parse_layer_desc(std::string("deform_conv2d n=1 c=2 h=4 w=4 k=2 r=1 s=1 layout=") + layout);
    const bool nhwc = std::string(layout) == "nhwc";
    std::vector<float> off(2 * 16);
    for (int p = 0; p < 16; ++p) {
      const float dy = 0.1f * float(p), dx = p % 4 == 0 ? 0.5f : -0.25f;
      off[nhwc ? p * 2 : p] = dy;
      off[nhwc ? p * 2 + 1 : 16 + p] = dx;
    }
    const deft::OffsetStats s = deft::compute_offset_stats(d, off.data(), off.size());
    EXPECT_EQ(s.samples, 16) << layout;
    // |dy| = 0, 0.1, ..., 1.5 (16 values): p50 at position 7.5 = 0.75, p90 at 13.5 = 1.35,
    // p99 at 14.85 = 1.485.
    EXPECT_NEAR(s.abs_dy.p50, 0.75, 1e-6) << layout;
    EXPECT_NEAR(s.abs_dy.p90, 1.35, 1e-6) << layout;
    EXPECT_NEAR(s.abs_dy.p99, 1.485, 1e-6) << layout;
    EXPECT_NEAR(s.abs_dy.max, 1.5, 1e-6) << layout;
    // |dx|: 12 x 0.25 (positions 0..11) and 4 x 0.5 (12..15).
    EXPECT_EQ(s.abs_dx.p50, 0.25) << layout;
    EXPECT_EQ(s.abs_dx.p90, 0.5) << layout;
    EXPECT_EQ(s.abs_dx.max, 0.5) << layout;
    // Outside (-1, 4) x (-1, 4): x = wo + dx stays inside (0.5 in column 0, 0.75..2.75
    // elsewhere); y = ho + 0.1 p is at most 3.1 for ho <= 2 and 4.2..4.5 for ho = 3: 4 of 16.
    EXPECT_NEAR(s.outside_fraction, 4.0 / 16, 1e-12) << layout;
    // sigma: the standard deviation of all 32 offset values.
    double sum = 0, sumsq = 0;
    for (float v : off) sum += v, sumsq += double(v) * v;
    const double mean = sum / 32;
    ASSERT_TRUE(s.sigma.has_value());
    EXPECT_NEAR(*s.sigma, std::sqrt(sumsq / 32 - mean * mean), 1e-9) << layout;
  }
}

TEST(OffsetStats, NaNCountsAsOutsideAndWrongCountsAreRejected) {
  auto d = parse_layer_desc("deform_conv2d n=1 c=1 h=4 w=4 k=1 r=1 s=1");
  std::vector<float> off(32, 0.0f);
  off[0] = std::nanf("");
  const auto s = deft::compute_offset_stats(d, off.data(), off.size());
  EXPECT_NEAR(s.outside_fraction, 1.0 / 16, 1e-12);
  EXPECT_EQ(s.abs_dy.max, 0);  // NaN is left out of the percentiles
  EXPECT_FALSE(s.sigma.has_value());  // every finite offset is 0
  EXPECT_EQ(deft::offset_sigma(s), 0.125);
  EXPECT_THROW(deft::compute_offset_stats(d, off.data(), 31), deft::Error);
}

// The window statistics (staging=window): of the corner reads inside the image, those outside
// the block's window. Zero offsets in blocks of one image read only the window; a pixel of a
// second image in a block reads global memory whatever the halo; an offset of 2.5 rows is
// served by halos of 2 and more (the window takes offsets in [-halo, halo + 1)) but not fully
// by 0 or 1; more halo never serves fewer reads.
// The tuner stops timing a candidate early when more runs cannot change its answer: not before
// kMinTimedRuns runs; then when it cannot win (fastest run >= 1.25 x the best median), or when
// its median has settled (that of all runs vs that of the first two thirds).
TEST(TuneTiming, StopsWhenMoreRunsCannotChangeTheAnswer) {
  EXPECT_FALSE(deft::timing_settled(std::vector<double>(9, 100.0), 0));
  EXPECT_FALSE(deft::timing_settled(std::vector<double>(9, 500.0), 100.0));
  EXPECT_TRUE(deft::timing_settled(std::vector<double>(10, 100.0), 0));
  EXPECT_TRUE(deft::timing_settled(std::vector<double>(10, 130.0), 100.0));  // cannot win
  // The first six runs' median is 120, all ten runs' 100: still moving.
  const std::vector<double> moving = {100, 100, 100, 120, 120, 120, 100, 100, 100, 100};
  EXPECT_FALSE(deft::timing_settled(moving, 0));
  EXPECT_FALSE(deft::timing_settled(moving, 90.0));  // its fastest run (100) could still win
  EXPECT_TRUE(deft::timing_settled(moving, 70.0));   // 100 >= 1.25 x 70
  std::vector<double> settled = moving;
  settled.insert(settled.end(), {100, 100, 100, 100, 100});  // the medians agree again
  EXPECT_TRUE(deft::timing_settled(settled, 0));
}

TEST(OffsetStats, WindowFractionsFollowTheKernelsWindow) {
  auto fractions = [](const char* text, float dy) {
    const auto d = parse_layer_desc(text);
    const size_t count = size_t(d.n * 2 * d.taps() * d.out_h() * d.out_w());
    std::vector<float> off(count, 0.0f);
    const int64_t plane = d.out_h() * d.out_w();
    for (int64_t n = 0; n < d.n; ++n)  // nchw offsets: channel 2t is dy of tap t
      for (int t = 0; t < d.taps(); ++t)
        for (int64_t p = 0; p < plane; ++p) off[size_t((n * 2 * d.taps() + 2 * t) * plane + p)] = dy;
    const deft::OffsetStats s = deft::compute_offset_stats(d, off.data(), off.size());
    std::map<std::pair<int, int>, double> out;
    for (const auto& w : s.window_outside) out[{w.tile_m, w.halo}] = w.outside;
    EXPECT_EQ(out.size(), std::size(deft::kWindowTiles) * std::size(deft::kWindowHalos));
    return out;
  };
  // 32 x 8 images: 64- and 128-pixel blocks hold whole rows of one image.
  const char* one_image = "deform_conv2d n=2 c=1 h=32 w=8 k=1 r=3 s=3 pad=1";
  for (const auto& [key, f] : fractions(one_image, 0.0f)) EXPECT_EQ(f, 0.0) << key.first << "/" << key.second;
  const auto shifted = fractions(one_image, 2.5f);
  for (int tm : deft::kWindowTiles) {
    EXPECT_GT(shifted.at({tm, 0}), 0.0) << tm;
    EXPECT_GT(shifted.at({tm, 1}), 0.0) << tm;
    EXPECT_EQ(shifted.at({tm, 2}), 0.0) << tm;
    EXPECT_EQ(shifted.at({tm, 4}), 0.0) << tm;
    EXPECT_EQ(shifted.at({tm, 8}), 0.0) << tm;
    double last = 1.0;
    for (int halo : deft::kWindowHalos) {
      EXPECT_LE(shifted.at({tm, halo}), last) << tm << "/" << halo;
      last = shifted.at({tm, halo});
    }
  }
  // 6 x 6 images (36 px): the first 64-pixel block holds image 0 and 28 pixels of image 1,
  // whose reads go to global memory; with zero offsets every in-image pixel reads its own
  // (y, x) corner and, inside the image, its right, lower and lower-right neighbours.
  const auto crossing = fractions("deform_conv2d n=2 c=1 h=6 w=6 k=1 r=1 s=1", 0.0f);
  auto reads = [](int p) {  // corner reads of pixel p (0..35) of a 6 x 6 image, offsets zero
    const int y = p / 6, x = p % 6;
    return 1 + (x + 1 < 6) + (y + 1 < 6) + (x + 1 < 6 && y + 1 < 6);
  };
  int total = 0, second = 0;
  for (int p = 0; p < 36; ++p) total += 2 * reads(p);
  for (int p = 0; p < 28; ++p) second += reads(p);
  for (int halo : deft::kWindowHalos) {
    EXPECT_NEAR(crossing.at({64, halo}), double(second) / total, 1e-12) << halo;
    // the one 128-pixel block starts in image 0: all of image 1 reads global memory
    EXPECT_NEAR(crossing.at({128, halo}), 0.5, 1e-12) << halo;
  }
}

TEST(OffsetStats, GaussianOffsetsGiveTheirSigmaAndBucket) {
  auto d = parse_layer_desc("deform_conv2d n=2 c=8 h=32 w=32 k=8 r=3 s=3 pad=1 offset_groups=2");
  const auto shapes = deft::tensor_shapes(d);
  size_t count = 1;
  for (auto x : shapes.offset) count *= size_t(x);
  std::mt19937 rng(7);
  for (double sigma : {0.5, 2.0, 6.0}) {
    std::normal_distribution<float> normal(0, float(sigma));
    std::vector<float> off(count);
    for (float& x : off) x = normal(rng);
    const auto s = deft::compute_offset_stats(d, off.data(), off.size());
    EXPECT_NEAR(deft::offset_sigma(s), sigma, 0.03 * sigma);
    EXPECT_NEAR(s.abs_dy.p90, 1.6449 * sigma, 0.05 * sigma);  // |N(0,s^2)| p90 = 1.645 s
    EXPECT_EQ(deft::stats_bucket(deft::offset_sigma(s)), deft::stats_bucket(sigma));
  }
}

TEST(OffsetStats, SigmaFromStatsOrMedians) {
  deft::OffsetStats s;
  s.abs_dy.p50 = s.abs_dx.p50 = 0.6744897501960817 * 3;
  EXPECT_NEAR(deft::offset_sigma(s), 3.0, 1e-9);
  s.sigma = 7.5;
  EXPECT_EQ(deft::offset_sigma(s), 7.5);
  deft::OffsetStats zero;
  EXPECT_EQ(deft::offset_sigma(zero), 0.125);  // all-zero offsets: the smallest bucket
}

TEST(OffsetStats, CalibrationFileErrorsNameTheFileAndExpectedSize) {
  deft::testing::TempDir dir("stats");
  auto d = parse_layer_desc("deform_conv2d n=1 c=4 h=5 w=5 k=4 r=3 s=3 pad=1");
  const size_t count = 1 * 18 * 5 * 5;
  const std::string file = (dir.path() / "l.offsets.f32").string();
  auto expect_error = [&](const std::string& needle) {
    try {
      deft::offset_stats_from_file(d, file);
      ADD_FAILURE() << "no exception";
    } catch (const deft::Error& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find(file), std::string::npos) << what;
      EXPECT_NE(what.find("expected " + std::to_string(count * 4) + " bytes"), std::string::npos)
          << what;
      EXPECT_NE(what.find(needle), std::string::npos) << what;
    }
  };
  expect_error("missing");
  std::vector<float> off(count, 0.5f);
  {
    std::ofstream f(file, std::ios::binary);
    f.write(reinterpret_cast<const char*>(off.data()), std::streamsize(off.size() * 4 - 4));
  }
  expect_error("has " + std::to_string(count * 4 - 4) + " bytes");
  {
    std::ofstream f(file, std::ios::binary);
    f.write(reinterpret_cast<const char*>(off.data()), std::streamsize(off.size() * 4));
  }
  const auto s = deft::offset_stats_from_file(d, file);
  EXPECT_EQ(s.samples, int64_t(count / 2));
  EXPECT_FLOAT_EQ(float(s.abs_dy.p50), 0.5f);
}

// ---- model files (tuner/model.cpp) -------------------------------------------------------

const char* kModel = R"({
  "format": "deft-model/1",
  "model": "tiny",
  "layers": [
    {"name": "a", "desc": "deform_conv2d n=2 c=64 h=20 w=20 k=128 r=3 s=3 pad=1 mask=1 dtype=f16"},
    {"name": "b", "desc": "deform_conv2d dtype=f16 mask=1 pad=1 k=128 c=64 n=2 h=20 w=20 r=3 s=3",
     "count": 3},
    {"name": "c", "desc": "deform_conv2d n=2 c=64 h=20 w=20 k=128 r=3 s=3 pad=1 mask=1 dtype=f16",
     "stats": {"samples": 1234, "abs_dy": {"p50": 1.3, "p90": 3.3, "p99": 5.1, "max": 9.0},
               "abs_dx": {"p50": 1.4, "p90": 3.0, "p99": 5.0, "max": 8.0},
               "outside_fraction": 0.01, "sigma": 8.0}},
    {"name": "d", "desc": "deform_conv2d n=2 c=64 h=20 w=20 k=64 r=3 s=3 pad=1 groups=64",
     "stats": {"abs_dy": {"p50": 0.33725, "p90": 1, "p99": 2, "max": 3},
               "abs_dx": {"p50": 0.33725, "p90": 1, "p99": 2, "max": 3}}}
  ]
})";

TEST(ModelFile, ParsesEveryFieldAndGroupsDuplicates) {
  const deft::Model m = deft::parse_model(kModel, "tiny.json");
  EXPECT_EQ(m.format, "deft-model/1");
  EXPECT_EQ(m.name, "tiny");
  ASSERT_EQ(m.layers.size(), 4u);
  EXPECT_EQ(m.layers[0].count, 1);
  EXPECT_EQ(m.layers[1].count, 3);
  EXPECT_EQ(deft::to_string(m.layers[0].desc), deft::to_string(m.layers[1].desc));
  ASSERT_TRUE(m.layers[2].stats.has_value());
  EXPECT_EQ(m.layers[2].stats->samples, 1234);
  EXPECT_EQ(m.layers[2].stats->abs_dy.p99, 5.1);
  EXPECT_EQ(m.layers[2].stats->abs_dx.max, 8.0);
  EXPECT_EQ(m.layers[2].stats->outside_fraction, 0.01);
  EXPECT_EQ(deft::offset_sigma(*m.layers[2].stats), 8.0);
  EXPECT_NEAR(deft::offset_sigma(*m.layers[3].stats), 0.5, 1e-3);  // from the medians
  std::vector<double> sigmas;
  for (const auto& l : m.layers) sigmas.push_back(l.stats ? deft::offset_sigma(*l.stats) : 2.0);
  const auto entries = deft::tune_entries(m, sigmas);
  // a and b: one entry (same canonical desc and bucket); c: same desc, bucket 8; d.
  ASSERT_EQ(entries.size(), 3u);
  EXPECT_EQ(entries[0].layers, (std::vector<size_t>{0, 1}));
  EXPECT_EQ(entries[0].count, 4);
  EXPECT_EQ(entries[0].bucket, "v1:sigma~2");
  EXPECT_EQ(entries[1].layers, (std::vector<size_t>{2}));
  EXPECT_EQ(entries[1].bucket, "v1:sigma~8");
  EXPECT_EQ(entries[2].bucket, "v1:sigma~0.5");
}

TEST(ModelFile, ErrorsNameTheLayerAndTheField) {
  auto expect_error = [](const std::string& text, std::vector<std::string> needles) {
    try {
      deft::parse_model(text, "m.json");
      ADD_FAILURE() << "no exception for " << text;
    } catch (const deft::Error& e) {
      for (const auto& n : needles)
        EXPECT_NE(std::string(e.what()).find(n), std::string::npos) << e.what() << "\n  lacks: " << n;
    }
  };
  const std::string head = R"({"format": "deft-model/1", "model": "m", "layers": [)";
  const std::string ok = R"({"name": "ok", "desc": "deform_conv2d n=1 c=8 h=8 w=8 k=8 r=3 s=3"}, )";
  expect_error(head + ok + R"({"name": "x1"}]})", {"m.json: layers[1] (x1)", "\"desc\"", "missing"});
  expect_error(head + ok + R"({"name": "x1", "desc": "deform_conv2d c=64 k=64 groups=3"}]})",
               {"layers[1] (x1)", "\"desc\"", "groups=3 does not divide c=64", "desc field groups"});
  expect_error(head + ok + R"({"name": "x1", "desc": "deform_conv2d", "count": 0}]})",
               {"layers[1] (x1)", "\"count\"", ">= 1"});
  expect_error(head + ok + R"({"name": "x1", "desc": "deform_conv2d", "count": "2"}]})",
               {"layers[1] (x1)", "\"count\""});
  expect_error(head + ok + R"({"name": "x1", "desc": "deform_conv2d", "stats": {"abs_dy": {"p50": 1, "p90": 2, "p99": 3, "max": 4}}}]})",
               {"layers[1] (x1)", "\"stats.abs_dx\"", "missing"});
  expect_error(head + ok + R"({"name": "x1", "desc": "deform_conv2d", "stats": {"sigma": 2, "abs_dy": {"p50": 1, "p90": 0.5, "p99": 3, "max": 4}}}]})",
               {"layers[1] (x1)", "\"stats.abs_dy.p90\""});
  expect_error(head + ok + R"({"name": "x1", "desc": "deform_conv2d", "stats": {"sigma": -1}}]})",
               {"layers[1] (x1)", "\"stats.sigma\""});
  expect_error(head + ok + R"({"name": "x1", "desc": "deform_conv2d", "stats": {"sigma": 1, "outside_fraction": 2}}]})",
               {"layers[1] (x1)", "\"stats.outside_fraction\""});
  expect_error(head + ok + R"({"name": "ok", "desc": "deform_conv2d"}]})",
               {"layers[1] (ok)", "\"name\"", "layers[0]"});
  expect_error(head + ok + R"({"desc": "deform_conv2d"}]})", {"layers[1]", "\"name\"", "missing"});
  expect_error(head + ok + R"(42]})", {"layers[1]", "object"});
  expect_error(R"({"format": "deft-model/2", "model": "m", "layers": []})", {"\"format\"", "deft-model/1"});
  expect_error(R"({"format": "deft-model/1", "model": "m", "layers": []})", {"\"layers\"", "empty"});
  expect_error(R"({"format": "deft-model/1", "layers": [1]})", {"\"model\"", "missing"});
  expect_error("{\"format\": \"deft-model/1\",\n  \"model\": oops}", {"m.json:2:", "not valid JSON"});
}

// The shipped example models: every layer is a canonical, valid, implemented description.
TEST(ModelFile, ExampleModelsLoadAndEveryLayerValidates) {
  const std::filesystem::path examples =
      std::filesystem::path(__FILE__).parent_path().parent_path() / "examples";
  struct Expect {
    const char* file;
    int64_t total_count;
    int64_t n;
  };
  for (const Expect& e : {Expect{"resnet50_dcn.json", 4 + 6 + 3, 8},
                          Expect{"maskrcnn_dcn.json", 4 + 6 + 3, 2}}) {
    const deft::Model m = deft::load_model((examples / e.file).string());
    int64_t total = 0;
    for (const auto& l : m.layers) {
      EXPECT_NO_THROW(deft::validate(l.desc)) << l.name;
      EXPECT_NO_THROW(deft::require_implemented(l.desc)) << l.name;
      EXPECT_EQ(l.desc.n, e.n) << l.name;
      EXPECT_EQ(l.desc.dtype, deft::DType::f16) << l.name;
      EXPECT_EQ(l.desc.c, l.desc.k) << l.name;
      total += l.count;
    }
    EXPECT_EQ(total, e.total_count) << e.file;
    // The desc text is exactly deft's canonical form.
    std::ifstream f(examples / e.file);
    const std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    for (const auto& l : m.layers)
      EXPECT_NE(text.find("\"" + deft::to_string(l.desc) + "\""), std::string::npos) << l.name;
  }
  // Spot checks of the geometry: the first block of each stage has stride 2.
  const auto r = deft::load_model((examples / "resnet50_dcn.json").string());
  EXPECT_EQ(r.layers[0].desc.h, 56);
  EXPECT_EQ(r.layers[0].desc.out_h(), 28);
  EXPECT_EQ(r.layers[3].desc.h, 14);
  EXPECT_EQ(r.layers[5].desc.out_w(), 7);
  const auto mr = deft::load_model((examples / "maskrcnn_dcn.json").string());
  EXPECT_EQ(mr.layers[1].desc.h, 100);
  EXPECT_EQ(mr.layers[1].desc.w, 168);
  EXPECT_EQ(mr.layers[3].desc.out_w(), 84);
  EXPECT_EQ(mr.layers[5].desc.out_h(), 25);
  EXPECT_EQ(mr.layers[5].desc.out_w(), 42);
}

// ---- budget --------------------------------------------------------------------------------

TEST(Budget, SharesAndCandidateWindows) {
  EXPECT_DOUBLE_EQ(deft::layer_share(60, 4), 15);
  EXPECT_DOUBLE_EQ(deft::layer_share(-5, 3), 2 * deft::kMinCandidateSeconds);
  EXPECT_DOUBLE_EQ(deft::layer_share(10, 0), 10);
  const deft::CandidateBudget unlimited(0, 0.25, 40);
  EXPECT_DOUBLE_EQ(unlimited.timing_seconds(), 0.25);
  EXPECT_TRUE(unlimited.may_start(39, 1e9));
  const deft::CandidateBudget tight(1.0, 0.25, 40);
  EXPECT_DOUBLE_EQ(tight.timing_seconds(), 0.025);
  EXPECT_TRUE(tight.may_start(0, 5.0));  // the default always runs
  EXPECT_TRUE(tight.may_start(3, 0.99));
  EXPECT_FALSE(tight.may_start(3, 1.0));
  const deft::CandidateBudget tiny(0.001, 0.25, 40);
  EXPECT_DOUBLE_EQ(tiny.timing_seconds(), deft::kMinCandidateSeconds);
}

TEST(Budget, SimulatedTuningStopsWhenTheLayerShareIsUsed) {
  deft::testing::TempDir dir("budget");
  auto d = parse_layer_desc(kDense);
  deft::TuneOptions o;
  o.cache_path = (dir.path() / "deft.db").string();
  const size_t space = deft::search_space(d).size();
  ASSERT_GT(space, 10u);
  const auto all = deft::simulate_tune(d, o);
  EXPECT_EQ(all.candidates.size(), space);
  const auto some = deft::simulate_tune(d, o, deft::TuneLimits{0.05});  // 5 windows of 0.01 s
  EXPECT_EQ(some.candidates.size(), 5u);
  EXPECT_EQ(some.candidates.front().variant, deft::default_variant(d));
  auto records = deft::cache::Database::open(*o.cache_path)->list_tuning_records(deft::to_string(d));
  ASSERT_EQ(records.size(), 2u);
  EXPECT_EQ(records[1].candidates.size(), 5u);
  EXPECT_EQ(records[1].device, "simulated|cc0.0|sm0");
}

// ---- shipped database precedence ---------------------------------------------------------

std::string file_bytes(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

TEST_F(Policy, ShippedRecordsApplyWhenTheUserHasNoneAndTheUsersTakePrecedence) {
  const auto key = deft::tuner::record_key(desc_, "v1:sigma~2", device_);
  const auto space = deft::search_space(desc_);
  ASSERT_GE(space.size(), 3u);
  const deft::Variant shipped_winner = space[1], user_winner = space[2];
  const auto shipped_path = dir_.path() / "shipped.db";
  {
    auto shipped = deft::cache::Database::open(shipped_path.string());
    auto r = key;
    r.winner = deft::to_string(shipped_winner);
    r.winner_us = 5;
    r.default_us = 20;
    shipped->put_tuning_record(r);
  }
  const std::string before = file_bytes(shipped_path);
  ScopedEnv env("DEFT_SHIPPED_DB", shipped_path.string());
  EXPECT_EQ(deft::shipped_database_path(), shipped_path.string());
  EXPECT_EQ(choose(), shipped_winner);  // the user's database has no record
  put(key, user_winner);
  EXPECT_EQ(choose(), user_winner);     // the user's record wins
  // A user record for another bucket does not hide the shipped one of this bucket.
  deft::CompileOptions bucket8;
  bucket8.stats_bucket = "v1:sigma~8";
  EXPECT_EQ(choose(bucket8), deft::default_variant(desc_));
  deft::CompileOptions off;
  off.use_tuning_records = false;
  EXPECT_EQ(choose(off), deft::default_variant(desc_));
  // Without a user database (cache_path ""), the shipped record still applies.
  EXPECT_EQ(deft::tuner::choose_variant(desc_, {}, nullptr, &device_), shipped_winner);
  EXPECT_EQ(file_bytes(shipped_path), before) << "the shipped database was written";
  {
    ScopedEnv none("DEFT_SHIPPED_DB", "");
    EXPECT_EQ(deft::shipped_database_path(), "");
    EXPECT_EQ(deft::tuner::choose_variant(desc_, {}, nullptr, &device_), deft::default_variant(desc_));
  }
}

TEST_F(Policy, AnUnusableShippedDatabaseIsIgnoredAndLeftAlone) {
  const auto shipped_path = dir_.path() / "garbage.db";
  {
    std::ofstream f(shipped_path, std::ios::binary);
    f << std::string(4096, 'x');
  }
  ScopedEnv env("DEFT_SHIPPED_DB", shipped_path.string());
  EXPECT_EQ(choose(), deft::default_variant(desc_));
  EXPECT_EQ(file_bytes(shipped_path), std::string(4096, 'x'));
  EXPECT_FALSE(std::filesystem::exists(dir_.path() / "garbage.db-wal"));
  EXPECT_EQ(deft::tuner::shipped_database(), nullptr);
  ScopedEnv missing("DEFT_SHIPPED_DB", (dir_.path() / "missing.db").string());
  EXPECT_EQ(choose(), deft::default_variant(desc_));
  EXPECT_FALSE(std::filesystem::exists(dir_.path() / "missing.db"));
}

// GPU: a layer budget far below one compile stops after the default variant.
// The backward passes tuned on the GPU: every candidate runs through Kernel::backward (only
// that pass's gradients) and is checked against the default's; on sm_90 the wgmma kernels'
// tiles are among the timed; the record is found by a compile of that pass (backward_data: in
// the fast mode only).
TEST(GpuTune, BackwardPassesWriteRecordsThePassFollows) {
  DEFT_SKIP_WITHOUT_GPU();
  for (const char* pass : {"backward_data", "backward_weight"}) {
  SCOPED_TRACE(pass);
  const bool data = std::string(pass) == "backward_data";
  deft::testing::TempDir dir("gputune-bwd");
  const std::string db = (dir.path() / "deft.db").string();
  auto d = parse_layer_desc(fmt::format(
      "deform_conv2d n=2 c=128 h=12 w=12 k=128 r=3 s=3 pad=1 mask=1 dtype=f16 layout=nchw "
      "pass={}", pass));
  deft::TuneOptions o;
  o.cache_path = db;
  o.seconds_per_candidate = 0.02;
  const deft::TuneResult r = deft::tune(d, o);
  ASSERT_GT(r.candidates.size(), 4u);
  EXPECT_EQ(r.candidates.front().variant, deft::default_variant(d, r.arch));
  EXPECT_EQ(r.candidates.front().rel_err, 0.0);
  int timed = 0, wgmma = 0;
  for (const auto& c : r.candidates) {
    if (c.median_us < 0) continue;
    EXPECT_TRUE(c.error.empty()) << deft::to_string(c.variant) << ": " << c.error;
    ++timed;
    wgmma += c.variant.algo == deft::Algo::gemm_wgmma;
    EXPECT_LE(c.rel_err, 1e-2) << deft::to_string(c.variant);
    EXPECT_GE(c.median_us, r.winner_us);
  }
  EXPECT_GE(timed, 4);
  if (r.arch == 90) EXPECT_GE(wgmma, data ? 3 : 5);
  auto records = deft::cache::Database::open(db)->list_tuning_records(deft::to_string(d));
  ASSERT_EQ(records.size(), 1u);
  deft::CompileOptions co;
  co.cache_path = db;
  EXPECT_EQ(deft::compile(d, co).variant(), r.winner);
  co.deterministic = true;
  deft::Variant det_pick = data ? deft::default_variant(d, r.arch, true) : r.winner;
  det_pick.deterministic = true;
  EXPECT_EQ(deft::compile(d, co).variant(), det_pick);
  }
}

TEST(GpuTune, ALayerBudgetStopsTryingCandidates) {
  DEFT_SKIP_WITHOUT_GPU();
  deft::testing::TempDir dir("gpubudget");
  auto d = parse_layer_desc(
      "deform_conv2d n=2 c=32 h=14 w=14 k=64 r=3 s=3 pad=1 mask=1 dtype=f16 layout=nhwc");
  deft::TuneOptions o;
  o.cache_path = (dir.path() / "deft.db").string();
  o.seconds_per_candidate = 0.02;
  const deft::TuneResult r = deft::tune(d, o, deft::TuneLimits{1e-3});
  ASSERT_EQ(r.candidates.size(), 1u);
  // The one candidate tried is the default for this GPU's architecture (wgmma on sm_90).
  EXPECT_GT(r.arch, 0);
  EXPECT_EQ(r.winner, deft::default_variant(d, r.arch)) << r.device;
  auto records = deft::cache::Database::open(*o.cache_path)->list_tuning_records();
  ASSERT_EQ(records.size(), 1u);
  EXPECT_EQ(records[0].candidates.size(), 1u);
}

// GPU: the real CLI path of a model file through one worker process (--devices 0).
TEST(GpuTune, CliModelFileWithAWorkerWritesRecordsThatCompileFollows) {
  DEFT_SKIP_WITHOUT_GPU();
  deft::testing::TempDir dir("gpumodel");
  const std::string desc =
      "deform_conv2d n=2 c=32 h=14 w=14 k=64 r=3 s=3 pad=1 mask=1 dtype=f16 layout=nhwc";
  const auto model = dir.path() / "m.json";
  {
    std::ofstream f(model);
    f << R"({"format": "deft-model/1", "model": "m", "layers": [{"name": "l", "desc": ")" << desc
      << R"(", "count": 2, "stats": {"sigma": 1.0}}]})";
  }
  const std::string db = (dir.path() / "deft.db").string();
  int rc = 0;
  const std::string out = run(std::string(DEFT_CLI_PATH) + " tune " + model.string() +
                                  " --devices 0 --max-candidates 4 --seconds 0.02 --db " + db,
                              &rc);
  ASSERT_EQ(rc, 0) << out;
  EXPECT_NE(out.find("[1/1] l [device 0]  default "), std::string::npos) << out;
  auto records = deft::cache::Database::open(db)->list_tuning_records();
  ASSERT_EQ(records.size(), 1u);
  EXPECT_EQ(records[0].stats_bucket, "v1:sigma~1");
  EXPECT_EQ(records[0].candidates.size(), 4u);
  deft::CompileOptions co;
  co.cache_path = db;
  co.stats_bucket = "v1:sigma~1";
  EXPECT_EQ(deft::to_string(deft::compile(parse_layer_desc(desc), co).variant()), records[0].winner);
}


// Backward passes are not tuned (yet): a clear error before any GPU work, in both entry points.
// The backward passes' spaces: the default first, the WMMA tiles around it, and on sm_90 for
// f16, bf16 and tf32 the wgmma kernels' tiles (none for strict f32); depthwise layers have
// their default and, for grad input, its gin=gather and gin=local forms (and, opt-in,
// staging=window). A simulated tuning writes a record keyed by the pass's description,
// which choose_variant then finds for that pass: backward_data in the fast mode only,
// backward_weight (deterministic in both modes) in both.
TEST(TunerPolicy, BackwardPassesAreTuned) {
  for (const char* pass : {"backward_data", "backward_weight"}) {
  SCOPED_TRACE(pass);
  const bool data = std::string(pass) == "backward_data";
  const auto d = deft::parse_layer_desc(fmt::format(
      "deform_conv2d n=2 c=128 h=16 w=16 k=128 r=3 s=3 pad=1 mask=1 dtype=f16 layout=nchw "
      "pass={}", pass));
  for (int arch : {0, 90}) {
    const auto space = deft::search_space(d, deft::SearchOptions{arch, false, 2.0});
    ASSERT_GT(space.size(), 4u);
    EXPECT_EQ(space.front(), deft::default_variant(d, arch));
    int wgmma = 0;
    for (const auto& v : space) {
      EXPECT_NO_THROW(deft::validate(d, v)) << deft::to_string(v);
      wgmma += v.algo == deft::Algo::gemm_wgmma;
    }
    EXPECT_EQ(wgmma > 0, arch == 90) << arch;
  }
  // tf32: both wgmma kernels' tf32 forms on sm_90 (grad weight: 32-pixel chunks), valid; strict
  // f32 none
  auto tf32 = deft::parse_layer_desc(fmt::format(
      "deform_conv2d n=2 c=128 h=16 w=16 k=128 r=3 s=3 pad=1 dtype=f32 math=tf32 pass={}", pass));
  int tf32_wgmma = 0;
  for (const auto& v : deft::search_space(tf32, deft::SearchOptions{90, false, 2.0})) {
    tf32_wgmma += v.algo == deft::Algo::gemm_wgmma;
    EXPECT_NO_THROW(deft::validate(tf32, v)) << deft::to_string(v);
  }
  EXPECT_GT(tf32_wgmma, 0);
  auto f32 = tf32;
  f32.math = deft::MathMode::fp32;
  for (const auto& v : deft::search_space(f32, deft::SearchOptions{90, false, 2.0}))
    EXPECT_NE(v.algo, deft::Algo::gemm_wgmma) << deft::to_string(v);
  auto dw = deft::parse_layer_desc(fmt::format(
      "deform_conv2d n=2 c=64 h=16 w=16 k=64 r=3 s=3 pad=1 groups=64 pass={}", pass));
  // grad input: the gather form and gin=local with radii 1, 2, 4 and the spread's 6 (sigma 2,
  // fast mode)
  const auto dw_plain = deft::search_space(dw);
  ASSERT_EQ(dw_plain.size(), data ? 6u : 1u);
  if (data) {
    EXPECT_TRUE(dw_plain[1].gin_gather);
    for (size_t i = 2; i < 6; ++i) {
      EXPECT_TRUE(dw_plain[i].gin_local) << deft::to_string(dw_plain[i]);
      EXPECT_EQ(dw_plain[i].halo, (std::array<int, 4>{1, 2, 4, 6})[i - 2]);
    }
    // sigma 0.5 asks for no radius beyond 2
    EXPECT_EQ(deft::search_space(dw, deft::SearchOptions{0, false, 0.5}).size(), 5u);
  }
  // with SearchOptions::window, grad input also has staging=window with tiles of 8 and 16
  // pixels and the halos of the offsets' spread (sigma 2: 2, 4, 6)
  const auto dw_space = deft::search_space(dw, deft::SearchOptions{0, true, 2.0});
  ASSERT_EQ(dw_space.size(), data ? 6u + 6u : 1u);
  if (data) {
    EXPECT_TRUE(dw_space[1].gin_gather);
    std::vector<std::pair<int, int>> windows;
    for (size_t i = 6; i < dw_space.size(); ++i) {
      EXPECT_EQ(dw_space[i].staging, deft::Staging::window) << deft::to_string(dw_space[i]);
      EXPECT_EQ(dw_space[i].threads, 32 * dw_space[i].tile_m);
      windows.emplace_back(dw_space[i].tile_m, dw_space[i].halo);
    }
    EXPECT_EQ(windows, (std::vector<std::pair<int, int>>{{8, 2}, {8, 4}, {8, 6}, {16, 2}, {16, 4}, {16, 6}}));
    // the spread decides the halos: sigma 0.5 asks for 1 and 2, sigma 8 for 6 (its 14 and 16
    // would not fit shared memory)
    auto halos = [&](double sigma) {
      std::set<int> h;
      for (const auto& v : deft::search_space(dw, deft::SearchOptions{0, true, sigma}))
        if (v.staging == deft::Staging::window) h.insert(v.halo);
      return h;
    };
    EXPECT_EQ(halos(0.5), (std::set<int>{1, 2}));
    EXPECT_EQ(halos(8.0), (std::set<int>{6}));
  }

  deft::testing::TempDir dir("tune-bwd");
  deft::TuneOptions o;
  o.cache_path = (dir.path() / "deft.db").string();
  const deft::TuneResult r = deft::simulate_tune(d, o);
  EXPECT_EQ(r.desc, deft::to_string(d));
  EXPECT_EQ(r.candidates.size(), deft::search_space(d).size());
  auto db = deft::cache::Database::open(*o.cache_path);
  const deft::tuner::DeviceKey sim{"simulated|cc0.0|sm0", "0"};
  deft::CompileOptions fast;
  EXPECT_EQ(deft::tuner::choose_variant(d, fast, db.get(), &sim), r.winner);
  deft::CompileOptions det;
  det.deterministic = true;
  EXPECT_EQ(deft::tuner::choose_variant(d, det, db.get(), &sim),
            data ? deft::default_variant(d) : r.winner);
  // the forward pass of the same layer has no record
  auto f = d;
  f.pass = deft::Pass::forward;
  EXPECT_EQ(deft::tuner::choose_variant(f, fast, db.get(), &sim), deft::default_variant(f));
  }
}

}  // namespace
