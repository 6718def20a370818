// Tuner: search space, statistics buckets, the record policy of compile(), the CLI, and (on a
// GPU) a real tuning run whose record compile() then follows.
#include <gtest/gtest.h>

#include <cstdio>
#include <set>

#include "deft/deft.hpp"
#include "tests/gpu_test_util.hpp"
#include "tests/test_tmp.hpp"
#include "tuner/select.hpp"

namespace {

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
  EXPECT_EQ(r.candidates.front().variant, deft::default_variant(d));
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

}  // namespace
