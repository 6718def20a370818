// Tests of the cache database: SHA-256 vectors, cubin and tuning-record round trips, recovery
// from files that are not usable databases, and writers in several threads and processes.
#include <gtest/gtest.h>

#include "tests/test_tmp.hpp"
#include <spdlog/sinks/ostream_sink.h>
#include <spdlog/spdlog.h>
#include <sqlite3.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "cache/cache.hpp"
#include "deft/ir.hpp"

namespace {
namespace fs = std::filesystem;
using namespace deft::cache;

// A fresh directory per test ("cache-<pid>-<n>-<test>").
class TempDir : public deft::testing::TempDir {
 public:
  TempDir() : deft::testing::TempDir("cache") {}
};

std::vector<char> random_bytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<char> out(n);
  for (auto& b : out) b = static_cast<char>(rng() & 0xff);
  // Zero bytes inside the blob must survive (no C-string handling anywhere).
  for (size_t i = 0; i < n; i += 97) out[i] = 0;
  return out;
}

void write_file(const fs::path& path, const std::vector<char>& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), std::streamsize(bytes.size()));
}

std::vector<char> read_file(const fs::path& path) {
  std::ifstream f(path, std::ios::binary);
  return std::vector<char>(std::istreambuf_iterator<char>(f), {});
}

// The files that moving `db` aside produced (not their -wal/-shm siblings).
std::vector<fs::path> corrupt_files(const fs::path& db) {
  std::vector<fs::path> out;
  const std::string prefix = db.filename().string() + ".corrupt-";
  for (const auto& e : fs::directory_iterator(db.parent_path())) {
    std::string name = e.path().filename().string();
    bool sibling = name.ends_with("-wal") || name.ends_with("-shm");
    if (name.starts_with(prefix) && !sibling) out.push_back(e.path());
  }
  return out;
}

// Runs SQL on the file through a plain SQLite connection; returns the first column of the
// first row (empty if none).
std::string raw_sql(const fs::path& path, const std::string& sql) {
  sqlite3* db = nullptr;
  std::string result;
  if (sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, nullptr) !=
      SQLITE_OK) {
    ADD_FAILURE() << "cannot open " << path << ": " << sqlite3_errmsg(db);
    sqlite3_close(db);
    return result;
  }
  sqlite3_busy_timeout(db, 10000);
  sqlite3_stmt* stmt = nullptr;
  if (sqlite3_prepare_v2(db, sql.c_str(), -1, &stmt, nullptr) != SQLITE_OK) {
    ADD_FAILURE() << sql << ": " << sqlite3_errmsg(db);
  } else {
    int rc = sqlite3_step(stmt);
    if (rc == SQLITE_ROW) {
      const auto* text = reinterpret_cast<const char*>(sqlite3_column_text(stmt, 0));
      result = text ? text : "";
    } else if (rc != SQLITE_DONE) {
      ADD_FAILURE() << sql << ": " << sqlite3_errmsg(db);
    }
  }
  sqlite3_finalize(stmt);
  sqlite3_close(db);
  return result;
}

CubinEntry meta_for(const std::string& name) {
  CubinEntry m;
  m.kernel_name = name;
  m.desc = "deform_conv2d n=1 c=64 h=56 w=56 k=64 r=3 s=3";
  m.variant = "tile=" + name;
  m.arch = "sm_90";
  return m;
}

TuningRecord make_record(const std::string& desc, const std::string& winner) {
  TuningRecord r;
  r.desc = desc;
  r.stats_bucket = "v1:p99=2";
  r.device = "NVIDIA H100 80GB HBM3 cc=9.0 sms=132";
  r.driver_version = "12080";
  r.nvrtc_version = "12.8";
  r.deft_version = "0.1.0";
  r.search_space = "ss-1234";
  r.winner = winner;
  r.winner_us = 12.5;
  r.default_us = 20.25;
  r.candidates = {{"tile=64x64", 20.25, ""},
                  {winner, 12.5, ""},
                  {"tile=256x8", -1, "compile error: too many registers"}};
  return r;
}

const std::regex kIsoUtc(R"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)");

// Routes spdlog's default logger into a string for the lifetime of the object.
class CaptureLog {
 public:
  CaptureLog() : old_(spdlog::default_logger()) {
    auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(out_);
    spdlog::set_default_logger(std::make_shared<spdlog::logger>("capture", sink));
  }
  ~CaptureLog() { spdlog::set_default_logger(old_); }
  std::string text() {
    spdlog::default_logger()->flush();
    return out_.str();
  }

 private:
  std::ostringstream out_;
  std::shared_ptr<spdlog::logger> old_;
};

class CacheTest : public ::testing::Test {
 protected:
  TempDir dir_;
  fs::path db_path_ = dir_.path() / "deft.db";
};

TEST(Sha256, StandardVectors) {
  EXPECT_EQ(sha256_hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(sha256_hex(nullptr, 0),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(sha256_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  EXPECT_EQ(sha256_hex(std::string(1000000, 'a')),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

// Lengths around the padding boundaries (one vs two final blocks); expected values from
// an independent implementation (Python's hashlib) over bytes (7i+3) mod 256.
TEST(Sha256, PaddingBoundaries) {
  const std::pair<size_t, const char*> cases[] = {
      {55, "e7313d333c272e639f790978283f9eb392e843d0f29b7016828bb1daa4aac70b"},
      {56, "4324d65f3c103567f5589c710bc08f8523f929a9272e3af36fc968e52abc6c27"},
      {63, "81c80242132f230c3bd41b3e63bbcff16107339549214a99614ff26664625055"},
      {64, "39e3d7b6b5d075d37d053ad89b24b41bef4f3c29760c84447cab3f3be1882241"},
      {65, "aacca6ff74fdbb296d165a45cecfa04e5127bc008770fbbdd48006f2d2fae95e"},
      {119, "9ce7368e4daf32341631b492e80359dc9f594b48453cd0dd5bf0b19279cc177e"},
      {120, "7836b787757e95e58b3ca5aec90b1b004e8deba1e50e9675af9cabf1a13a04b5"},
      {128, "d2742f1f4ac6bb7ca2b239ee18402ba8b3f9f8e652d2a72973c2b9ba11c08cf6"},
  };
  for (const auto& [n, expected] : cases) {
    std::vector<unsigned char> bytes(n);
    for (size_t i = 0; i < n; ++i) bytes[i] = static_cast<unsigned char>((i * 7 + 3) & 0xff);
    EXPECT_EQ(sha256_hex(bytes.data(), bytes.size()), expected) << "length " << n;
  }
}

TEST(CubinKeyTest, DigestChangesWithEveryField) {
  CubinKey base{"0.1.0", "abc123", "-O3 --std=c++17", "sm_90", "12.8"};
  const std::string digest = base.digest();
  EXPECT_TRUE(std::regex_match(digest, std::regex("[0-9a-f]{64}"))) << digest;
  EXPECT_EQ(CubinKey(base).digest(), digest);

  std::string CubinKey::*const fields[] = {&CubinKey::deft_version, &CubinKey::source_hash,
                                           &CubinKey::options, &CubinKey::arch,
                                           &CubinKey::nvrtc_version};
  std::set<std::string> seen = {digest};
  for (auto field : fields) {
    CubinKey changed = base;
    changed.*field += "x";
    EXPECT_TRUE(seen.insert(changed.digest()).second) << "field value " << changed.*field;
  }
  // Moving characters across a field boundary must change the digest too.
  for (size_t i = 0; i + 1 < std::size(fields); ++i) {
    CubinKey a = base, b = base;
    a.*fields[i] = "ab";
    a.*fields[i + 1] = "c";
    b.*fields[i] = "a";
    b.*fields[i + 1] = "bc";
    EXPECT_NE(a.digest(), b.digest()) << "fields " << i << " and " << i + 1;
  }
}

TEST_F(CacheTest, CubinRoundTrip) {
  auto db = Database::open(db_path_.string());
  EXPECT_EQ(db->path(), db_path_.string());
  const auto blob = random_bytes(100000, 1);
  ASSERT_EQ(blob[0], 0);
  db->put_cubin("k1", blob, meta_for("kernel_a"));
  const auto other = random_bytes(333, 2);
  db->put_cubin("k2", other, meta_for("kernel_b"));

  auto got = db->get_cubin("k1");
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(*got, blob);
  got = db->get_cubin("k2");
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(*got, other);

  // INSERT OR REPLACE: a second put of the same key replaces the blob, keeps one row.
  const auto replacement = random_bytes(5000, 3);
  db->put_cubin("k1", replacement, meta_for("kernel_a2"));
  got = db->get_cubin("k1");
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(*got, replacement);
  EXPECT_EQ(db->list_cubins().size(), 2u);

  // An empty cubin is still a hit, not a miss.
  db->put_cubin("empty", {}, meta_for("kernel_e"));
  got = db->get_cubin("empty");
  ASSERT_TRUE(got.has_value());
  EXPECT_TRUE(got->empty());
}

TEST_F(CacheTest, UnknownKeyMisses) {
  auto db = Database::open(db_path_.string());
  EXPECT_FALSE(db->get_cubin("nope").has_value());
  db->put_cubin("present", random_bytes(10, 4), meta_for("k"));
  EXPECT_FALSE(db->get_cubin("nope").has_value());
  EXPECT_FALSE(db->get_cubin("presen").has_value());
  EXPECT_FALSE(db->get_cubin("").has_value());
  EXPECT_TRUE(db->get_cubin("present").has_value());
}

TEST_F(CacheTest, ListInfoClear) {
  auto db = Database::open(db_path_.string());
  DatabaseInfo empty = db->info();
  EXPECT_EQ(empty.path, db_path_.string());
  EXPECT_EQ(empty.schema_version, kSchemaVersion);
  EXPECT_EQ(empty.cubins, 0);
  EXPECT_EQ(empty.cubin_bytes, 0);
  EXPECT_EQ(empty.tuning_records, 0);

  const size_t sizes[] = {100, 2000, 30000};
  for (int i = 0; i < 3; ++i) {
    CubinEntry meta = meta_for("kernel_" + std::to_string(i));
    if (i == 2) meta.created_at = "2024-01-02T03:04:05Z";
    db->put_cubin("key" + std::to_string(i), random_bytes(sizes[i], 10 + i), meta);
  }
  db->put_tuning_record(make_record("desc-a", "tile=128x32"));
  db->put_tuning_record(make_record("desc-b", "tile=64x16"));

  auto list = db->list_cubins();
  ASSERT_EQ(list.size(), 3u);
  for (int i = 0; i < 3; ++i) {
    const CubinEntry expected = meta_for("kernel_" + std::to_string(i));
    EXPECT_EQ(list[i].key, "key" + std::to_string(i));
    EXPECT_EQ(list[i].kernel_name, expected.kernel_name);
    EXPECT_EQ(list[i].desc, expected.desc);
    EXPECT_EQ(list[i].variant, expected.variant);
    EXPECT_EQ(list[i].arch, expected.arch);
    EXPECT_EQ(list[i].size, int64_t(sizes[i]));
    EXPECT_TRUE(std::regex_match(list[i].created_at, kIsoUtc)) << list[i].created_at;
  }
  EXPECT_EQ(list[2].created_at, "2024-01-02T03:04:05Z");

  DatabaseInfo info = db->info();
  EXPECT_EQ(info.path, db_path_.string());
  EXPECT_EQ(info.schema_version, kSchemaVersion);
  EXPECT_EQ(info.cubins, 3);
  EXPECT_EQ(info.cubin_bytes, 32100);
  EXPECT_EQ(info.tuning_records, 2);
  int64_t on_disk = int64_t(fs::file_size(db_path_));
  fs::path wal = db_path_.string() + "-wal";
  if (fs::exists(wal)) on_disk += int64_t(fs::file_size(wal));
  EXPECT_GT(info.file_bytes, 32100);
  EXPECT_EQ(info.file_bytes, on_disk);

  db->clear();
  EXPECT_TRUE(db->list_cubins().empty());
  EXPECT_TRUE(db->list_tuning_records().empty());
  EXPECT_FALSE(db->get_cubin("key0").has_value());
  EXPECT_FALSE(db->find_tuning_record(make_record("desc-a", "")).has_value());
  info = db->info();
  EXPECT_EQ(info.cubins, 0);
  EXPECT_EQ(info.cubin_bytes, 0);
  EXPECT_EQ(info.tuning_records, 0);
  EXPECT_EQ(raw_sql(db_path_, "SELECT count(*) FROM tuning_candidates"), "0");
}

TEST_F(CacheTest, TuningRecordRoundTrip) {
  auto db = Database::open(db_path_.string());
  TuningRecord r = make_record("deform_conv2d n=2 c=32", "tile=128x32");
  r.candidates.push_back({"tile=32x32", std::nan(""), "timed out"});
  db->put_tuning_record(r);

  auto got = db->find_tuning_record(r);
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(got->desc, r.desc);
  EXPECT_EQ(got->stats_bucket, r.stats_bucket);
  EXPECT_EQ(got->device, r.device);
  EXPECT_EQ(got->driver_version, r.driver_version);
  EXPECT_EQ(got->nvrtc_version, r.nvrtc_version);
  EXPECT_EQ(got->deft_version, r.deft_version);
  EXPECT_EQ(got->search_space, r.search_space);
  EXPECT_EQ(got->winner, r.winner);
  EXPECT_EQ(got->winner_us, r.winner_us);
  EXPECT_EQ(got->default_us, r.default_us);
  EXPECT_TRUE(std::regex_match(got->created_at, kIsoUtc)) << got->created_at;
  ASSERT_EQ(got->candidates.size(), r.candidates.size());
  for (size_t i = 0; i + 1 < r.candidates.size(); ++i) {
    EXPECT_EQ(got->candidates[i].variant, r.candidates[i].variant);
    EXPECT_EQ(got->candidates[i].median_us, r.candidates[i].median_us);
    EXPECT_EQ(got->candidates[i].error, r.candidates[i].error);
  }
  EXPECT_EQ(got->candidates.back().variant, "tile=32x32");
  EXPECT_TRUE(std::isnan(got->candidates.back().median_us));
  EXPECT_EQ(got->candidates.back().error, "timed out");

  // A given created_at is kept as is.
  TuningRecord dated = make_record("dated", "w");
  dated.created_at = "2023-05-06T07:08:09Z";
  db->put_tuning_record(dated);
  got = db->find_tuning_record(dated);
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(got->created_at, "2023-05-06T07:08:09Z");
}

TEST_F(CacheTest, FindPicksNewestAndMissesOnAnyIdentityField) {
  auto db = Database::open(db_path_.string());
  TuningRecord older = make_record("desc-x", "tile=older");
  TuningRecord newer = make_record("desc-x", "tile=newer");
  newer.candidates = {{"tile=newer", 3.0, ""}};
  db->put_tuning_record(older);
  db->put_tuning_record(newer);
  db->put_tuning_record(make_record("desc-y", "tile=other"));

  TuningRecord probe = make_record("desc-x", "ignored");
  probe.winner_us = 999;
  probe.candidates.clear();
  auto got = db->find_tuning_record(probe);
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(got->winner, "tile=newer");
  ASSERT_EQ(got->candidates.size(), 1u);
  EXPECT_EQ(got->candidates[0].variant, "tile=newer");

  std::string TuningRecord::*const identity[] = {
      &TuningRecord::desc,          &TuningRecord::stats_bucket,  &TuningRecord::device,
      &TuningRecord::driver_version, &TuningRecord::nvrtc_version, &TuningRecord::deft_version,
      &TuningRecord::search_space};
  for (auto field : identity) {
    TuningRecord miss = probe;
    miss.*field += "-changed";
    EXPECT_FALSE(db->find_tuning_record(miss).has_value()) << "field value " << miss.*field;
  }

  EXPECT_EQ(db->list_tuning_records().size(), 3u);
  auto x = db->list_tuning_records("desc-x");
  ASSERT_EQ(x.size(), 2u);
  EXPECT_EQ(x[0].winner, "tile=older");
  EXPECT_EQ(x[0].candidates.size(), 3u);
  EXPECT_EQ(x[1].winner, "tile=newer");
  EXPECT_EQ(db->list_tuning_records("desc-y").size(), 1u);
  EXPECT_TRUE(db->list_tuning_records("desc-z").empty());
}

TEST_F(CacheTest, ReopenKeepsRows) {
  const auto blob = random_bytes(4096, 5);
  {
    auto db = Database::open(db_path_.string());
    db->put_cubin("kept", blob, meta_for("kernel"));
    db->put_tuning_record(make_record("desc-kept", "tile=kept"));
  }
  auto db = Database::open(db_path_.string());
  auto got = db->get_cubin("kept");
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(*got, blob);
  auto record = db->find_tuning_record(make_record("desc-kept", ""));
  ASSERT_TRUE(record.has_value());
  EXPECT_EQ(record->winner, "tile=kept");
  EXPECT_EQ(record->candidates.size(), 3u);
  EXPECT_TRUE(corrupt_files(db_path_).empty());
  EXPECT_EQ(raw_sql(db_path_, "PRAGMA user_version"), std::to_string(kSchemaVersion));
  EXPECT_EQ(raw_sql(db_path_, "PRAGMA journal_mode"), "wal");
}

TEST_F(CacheTest, CreatesParentDirectories) {
  fs::path nested = dir_.path() / "a" / "b" / "deft.db";
  auto db = Database::open(nested.string());
  db->put_cubin("k", random_bytes(10, 6), meta_for("kernel"));
  EXPECT_TRUE(fs::exists(nested));
}

TEST_F(CacheTest, EmptyFileIsAFreshDatabase) {
  write_file(db_path_, {});
  auto db = Database::open(db_path_.string());
  db->put_cubin("k", random_bytes(10, 7), meta_for("kernel"));
  EXPECT_TRUE(db->get_cubin("k").has_value());
  EXPECT_TRUE(corrupt_files(db_path_).empty());
}

TEST_F(CacheTest, GarbageFileIsMovedAside) {
  const auto garbage = random_bytes(65536, 8);
  write_file(db_path_, garbage);
  CaptureLog log;
  auto db = Database::open(db_path_.string());

  auto aside = corrupt_files(db_path_);
  ASSERT_EQ(aside.size(), 1u);
  EXPECT_EQ(read_file(aside[0]), garbage);
  EXPECT_TRUE(std::regex_match(aside[0].filename().string(),
                               std::regex(R"(deft\.db\.corrupt-\d{8}T\d{6}(-\d+)?)")))
      << aside[0];
  const std::string warning = log.text();
  EXPECT_NE(warning.find(db_path_.string()), std::string::npos) << warning;
  EXPECT_NE(warning.find(aside[0].string()), std::string::npos) << warning;
  EXPECT_NE(warning.find("warn"), std::string::npos) << warning;

  db->put_cubin("k", random_bytes(100, 10), meta_for("kernel"));
  EXPECT_TRUE(db->get_cubin("k").has_value());
  EXPECT_EQ(db->info().cubins, 1);
}

TEST_F(CacheTest, TruncatedFileIsMovedAside) {
  {
    auto db = Database::open(db_path_.string());
    for (int i = 0; i < 50; ++i) {
      db->put_cubin("k" + std::to_string(i), random_bytes(8192, 100 + i), meta_for("kernel"));
    }
    db->put_tuning_record(make_record("d", "w"));
  }
  // Closing the last connection checkpoints the WAL into the main file and deletes it.
  ASSERT_FALSE(fs::exists(db_path_.string() + "-wal"));
  const auto size = fs::file_size(db_path_);
  ASSERT_GT(size, 50u * 8192);
  fs::resize_file(db_path_, size / 2);

  CaptureLog log;
  auto db = Database::open(db_path_.string());
  auto aside = corrupt_files(db_path_);
  ASSERT_EQ(aside.size(), 1u);
  EXPECT_EQ(fs::file_size(aside[0]), size / 2);
  EXPECT_NE(log.text().find(aside[0].string()), std::string::npos) << log.text();

  EXPECT_EQ(db->info().cubins, 0);
  db->put_cubin("fresh", random_bytes(100, 11), meta_for("kernel"));
  EXPECT_TRUE(db->get_cubin("fresh").has_value());
}

TEST_F(CacheTest, NewerSchemaIsMovedAside) {
  {
    auto db = Database::open(db_path_.string());
    db->put_cubin("old", random_bytes(100, 12), meta_for("kernel"));
  }
  raw_sql(db_path_, "PRAGMA user_version = " + std::to_string(kSchemaVersion + 1));
  ASSERT_EQ(raw_sql(db_path_, "PRAGMA user_version"), std::to_string(kSchemaVersion + 1));

  CaptureLog log;
  auto db = Database::open(db_path_.string());
  auto aside = corrupt_files(db_path_);
  ASSERT_EQ(aside.size(), 1u);
  EXPECT_NE(log.text().find("newer"), std::string::npos) << log.text();
  EXPECT_EQ(db->info().schema_version, kSchemaVersion);
  EXPECT_FALSE(db->get_cubin("old").has_value());
  db->put_cubin("new", random_bytes(100, 13), meta_for("kernel"));
  EXPECT_TRUE(db->get_cubin("new").has_value());
}

// The -wal goes along with the file: here it holds the newer user_version, which another
// process (holding the file open, so nobody checkpoints) has committed.
TEST_F(CacheTest, WalIsMovedAsideWithItsFile) {
  {
    auto db = Database::open(db_path_.string());
    db->put_cubin("old", random_bytes(100, 15), meta_for("kernel"));
  }
  const std::string newer = std::to_string(kSchemaVersion + 1);
  int ready[2], release[2];
  ASSERT_EQ(pipe(ready), 0);
  ASSERT_EQ(pipe(release), 0);
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    close(ready[0]);
    close(release[1]);
    sqlite3* raw = nullptr;
    int status = 1;
    if (sqlite3_open_v2(db_path_.c_str(), &raw, SQLITE_OPEN_READWRITE, nullptr) == SQLITE_OK &&
        sqlite3_exec(raw, ("PRAGMA user_version = " + newer).c_str(), nullptr, nullptr,
                     nullptr) == SQLITE_OK) {
      status = 0;
    }
    (void)!write(ready[1], "r", 1);
    char c;
    while (read(release[0], &c, 1) > 0) {
    }
    _exit(status);  // without closing: the commit stays in the -wal, not checkpointed
  }
  close(ready[1]);
  close(release[0]);
  char c = 0;
  EXPECT_EQ(read(ready[0], &c, 1), 1);
  close(ready[0]);
  const fs::path wal = db_path_.string() + "-wal";
  EXPECT_TRUE(fs::exists(wal) && fs::file_size(wal) > 0);

  {
    CaptureLog log;
    auto db = Database::open(db_path_.string());
    EXPECT_EQ(db->info().schema_version, kSchemaVersion);
    EXPECT_FALSE(db->get_cubin("old").has_value());
  }
  close(release[1]);
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "child status " << status;

  auto aside = corrupt_files(db_path_);
  ASSERT_EQ(aside.size(), 1u);
  EXPECT_TRUE(fs::exists(aside[0].string() + "-wal"));
  // Only with its -wal does the moved file show the newer version it was judged by.
  EXPECT_EQ(raw_sql(aside[0], "PRAGMA user_version"), newer);
}

TEST_F(CacheTest, WrongColumnsAreMovedAside) {
  raw_sql(db_path_, "CREATE TABLE cubins(key TEXT PRIMARY KEY, data BLOB)");
  raw_sql(db_path_, "PRAGMA user_version = " + std::to_string(kSchemaVersion));
  CaptureLog log;
  auto db = Database::open(db_path_.string());
  EXPECT_EQ(corrupt_files(db_path_).size(), 1u);
  EXPECT_NE(log.text().find("cubins"), std::string::npos) << log.text();
  db->put_cubin("k", random_bytes(100, 14), meta_for("kernel"));
  EXPECT_TRUE(db->get_cubin("k").has_value());
}

TEST_F(CacheTest, ForeignSqliteFileIsMovedAside) {
  raw_sql(db_path_, "CREATE TABLE something_else(x INTEGER)");
  CaptureLog log;
  auto db = Database::open(db_path_.string());
  EXPECT_EQ(corrupt_files(db_path_).size(), 1u);
  EXPECT_EQ(db->info().schema_version, kSchemaVersion);
}

TEST_F(CacheTest, RepeatedCorruptionGetsDistinctNames) {
  CaptureLog log;
  for (int i = 0; i < 3; ++i) {
    write_file(db_path_, random_bytes(4096, 20 + i));
    auto db = Database::open(db_path_.string());
  }
  // Within one second the timestamped name repeats; a counter must keep all three.
  EXPECT_EQ(corrupt_files(db_path_).size(), 3u);
}

TEST_F(CacheTest, UnusablePathThrowsWithoutMovingAnything) {
  // A directory where the file should be: not corruption, so nothing is renamed.
  fs::create_directories(db_path_);
  EXPECT_THROW(Database::open(db_path_.string()), deft::Error);
  EXPECT_TRUE(fs::is_directory(db_path_));
  EXPECT_TRUE(corrupt_files(db_path_).empty());

  // A regular file where the parent directory should be.
  fs::path blocker = dir_.path() / "blocker";
  write_file(blocker, {'x'});
  EXPECT_THROW(Database::open((blocker / "deft.db").string()), deft::Error);
  EXPECT_THROW(Database::open(""), deft::Error);
}

TEST_F(CacheTest, SqliteErrorsAfterOpeningThrowWithPathAndMessage) {
  auto db = Database::open(db_path_.string());
  raw_sql(db_path_, "DROP TABLE cubins");
  try {
    db->get_cubin("k");
    FAIL() << "expected deft::Error";
  } catch (const deft::Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find(db_path_.string()), std::string::npos) << what;
    EXPECT_NE(what.find("no such table: cubins"), std::string::npos) << what;
  }
  EXPECT_THROW(db->put_cubin("k", random_bytes(10, 30), meta_for("kernel")), deft::Error);
  // The failed put rolled back its transaction: other writes still go through.
  db->put_tuning_record(make_record("after", "w"));
  EXPECT_TRUE(db->find_tuning_record(make_record("after", "")).has_value());
}

// Saves and restores the variables default_database_path() reads.
class EnvGuard {
 public:
  EnvGuard() {
    for (const char* name : kNames) {
      const char* v = std::getenv(name);
      saved_.emplace_back(v ? std::optional<std::string>(v) : std::nullopt);
    }
  }
  ~EnvGuard() {
    for (size_t i = 0; i < std::size(kNames); ++i) {
      if (saved_[i]) {
        setenv(kNames[i], saved_[i]->c_str(), 1);
      } else {
        unsetenv(kNames[i]);
      }
    }
  }

 private:
  static constexpr const char* kNames[] = {"DEFT_CACHE_DIR", "XDG_CACHE_HOME", "HOME"};
  std::vector<std::optional<std::string>> saved_;
};

TEST(DefaultDatabasePath, FollowsEnvironment) {
  EnvGuard guard;
  setenv("DEFT_CACHE_DIR", "/tmp/deft-cache", 1);
  setenv("XDG_CACHE_HOME", "/xdg", 1);
  setenv("HOME", "/home/someone", 1);
  EXPECT_EQ(default_database_path(), "/tmp/deft-cache/deft.db");
  setenv("DEFT_CACHE_DIR", "", 1);
  EXPECT_EQ(default_database_path(), "/xdg/deft/deft.db");
  unsetenv("DEFT_CACHE_DIR");
  setenv("XDG_CACHE_HOME", "", 1);
  EXPECT_EQ(default_database_path(), "/home/someone/.cache/deft/deft.db");
  unsetenv("XDG_CACHE_HOME");
  EXPECT_EQ(default_database_path(), "/home/someone/.cache/deft/deft.db");
}

std::string child_key(int child, int i) {
  return "child" + std::to_string(child) + "-cubin" + std::to_string(i);
}
std::string child_desc(int child, int i) {
  return "child" + std::to_string(child) + "-desc" + std::to_string(i);
}
uint32_t child_seed(int child, int i) { return uint32_t(1000 * (child + 1) + i); }

TEST_F(CacheTest, ThreadsSharingOneDatabaseLoseNothing) {
  auto db = Database::open(db_path_.string());
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&db, t] {
      for (int i = 0; i < 50; ++i) {
        db->put_cubin(child_key(t, i), random_bytes(256, child_seed(t, i)), meta_for("k"));
        if (i % 5 == 0) db->put_tuning_record(make_record(child_desc(t, i), "w"));
        db->get_cubin(child_key(t, i / 2));
      }
    });
  }
  for (auto& th : threads) th.join();
  DatabaseInfo info = db->info();
  EXPECT_EQ(info.cubins, 200);
  EXPECT_EQ(info.tuning_records, 40);
}

// Two processes, each with its own connection, write into one new file at the same time.
TEST_F(CacheTest, ConcurrentProcessesLoseNothing) {
  constexpr int kChildren = 2, kCubins = 200, kRecordEvery = 4;  // 50 records per child
  const std::string path = db_path_.string();
  int start[2];
  ASSERT_EQ(pipe(start), 0);
  std::vector<pid_t> children;
  for (int child = 0; child < kChildren; ++child) {
    pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      // Never return into gtest from here.
      close(start[1]);
      char c;
      while (read(start[0], &c, 1) > 0) {
      }  // EOF: the parent released both children at once
      int status = 0;
      try {
        auto db = Database::open(path);
        for (int i = 0; i < kCubins; ++i) {
          db->put_cubin(child_key(child, i), random_bytes(1000 + i, child_seed(child, i)),
                        meta_for("kernel"));
          if (i % kRecordEvery == 0) {
            db->put_tuning_record(make_record(child_desc(child, i), "w" + std::to_string(i)));
          }
        }
      } catch (const std::exception& e) {
        std::fprintf(stderr, "child %d: %s\n", child, e.what());
        status = 1;
      }
      _exit(status);
    }
    children.push_back(pid);
  }
  close(start[0]);
  close(start[1]);
  for (pid_t pid : children) {
    int status = 0;
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "child status " << status;
  }

  auto db = Database::open(path);
  EXPECT_TRUE(corrupt_files(db_path_).empty());
  DatabaseInfo info = db->info();
  EXPECT_EQ(info.cubins, kChildren * kCubins);
  EXPECT_EQ(info.tuning_records, kChildren * kCubins / kRecordEvery);
  for (int child = 0; child < kChildren; ++child) {
    for (int i = 0; i < kCubins; ++i) {
      auto got = db->get_cubin(child_key(child, i));
      ASSERT_TRUE(got.has_value()) << child_key(child, i);
      EXPECT_EQ(*got, random_bytes(1000 + i, child_seed(child, i))) << child_key(child, i);
      if (i % kRecordEvery == 0) {
        auto record = db->find_tuning_record(make_record(child_desc(child, i), ""));
        ASSERT_TRUE(record.has_value()) << child_desc(child, i);
        EXPECT_EQ(record->winner, "w" + std::to_string(i));
        EXPECT_EQ(record->candidates.size(), 3u);
      }
    }
  }
  EXPECT_EQ(raw_sql(db_path_, "PRAGMA integrity_check"), "ok");
  EXPECT_EQ(raw_sql(db_path_, "SELECT count(*) FROM tuning_candidates"),
            std::to_string(3 * kChildren * kCubins / kRecordEvery));
}

// The issue's case: two processes insert 200 tuning records each into one database at the same
// time (one transaction per record); all 400 arrive with their candidates, and the file is sound.
TEST_F(CacheTest, TwoProcessesInsertingTuningRecordsLoseNone) {
  constexpr int kChildren = 2, kRecords = 200;
  const std::string path = db_path_.string();
  Database::open(path);  // the schema exists before the race; the race is about the records
  int start[2];
  ASSERT_EQ(pipe(start), 0);
  std::vector<pid_t> children;
  for (int child = 0; child < kChildren; ++child) {
    pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      close(start[1]);
      char c;
      while (read(start[0], &c, 1) > 0) {
      }
      int status = 0;
      try {
        auto db = Database::open(path);
        for (int i = 0; i < kRecords; ++i)
          db->put_tuning_record(make_record(child_desc(child, i), "w" + std::to_string(i)));
      } catch (const std::exception& e) {
        std::fprintf(stderr, "child %d: %s\n", child, e.what());
        status = 1;
      }
      _exit(status);
    }
    children.push_back(pid);
  }
  close(start[0]);
  close(start[1]);
  for (pid_t pid : children) {
    int status = 0;
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "child status " << status;
  }
  EXPECT_EQ(raw_sql(db_path_, "PRAGMA integrity_check"), "ok");
  EXPECT_EQ(raw_sql(db_path_, "SELECT count(*) FROM tuning_records"),
            std::to_string(kChildren * kRecords));
  EXPECT_EQ(raw_sql(db_path_, "SELECT count(DISTINCT \"desc\") FROM tuning_records"),
            std::to_string(kChildren * kRecords));
  EXPECT_EQ(raw_sql(db_path_, "SELECT count(*) FROM tuning_candidates"),
            std::to_string(3 * kChildren * kRecords));
  auto db = Database::open(path);
  EXPECT_TRUE(corrupt_files(db_path_).empty());
  for (int child = 0; child < kChildren; ++child)
    for (int i = 0; i < kRecords; i += 37) {
      auto r = db->find_tuning_record(make_record(child_desc(child, i), ""));
      ASSERT_TRUE(r.has_value()) << child_desc(child, i);
      EXPECT_EQ(r->winner, "w" + std::to_string(i));
    }
}

// ---- read-only databases (the shipped records) -----------------------------------------------

TEST_F(CacheTest, ReadOnlyOpenReadsAndNeverWrites) {
  {
    auto db = Database::open(db_path_.string());
    db->put_tuning_record(make_record("d", "w"));
  }
  const auto before = read_file(db_path_);
  auto ro = Database::open_read_only(db_path_.string());
  auto r = ro->find_tuning_record(make_record("d", ""));
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->winner, "w");
  EXPECT_EQ(r->candidates.size(), 3u);
  EXPECT_THROW(ro->put_tuning_record(make_record("e", "w")), deft::Error);
  EXPECT_THROW(ro->put_cubin("k", random_bytes(10, 1), meta_for("k")), deft::Error);
  ro.reset();
  EXPECT_EQ(read_file(db_path_), before);
}

TEST_F(CacheTest, ReadOnlyOpenOfAMissingOrBadFileThrowsAndTouchesNothing) {
  try {
    Database::open_read_only(db_path_.string());
    ADD_FAILURE() << "no exception";
  } catch (const deft::Error& e) {
    EXPECT_NE(std::string(e.what()).find(db_path_.string()), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(db_path_)) << "a read-only open created the file";

  const auto garbage = random_bytes(8192, 3);
  write_file(db_path_, garbage);
  try {
    Database::open_read_only(db_path_.string());
    ADD_FAILURE() << "no exception";
  } catch (const deft::Error& e) {
    EXPECT_NE(std::string(e.what()).find(db_path_.string()), std::string::npos) << e.what();
  }
  EXPECT_EQ(read_file(db_path_), garbage);
  EXPECT_TRUE(corrupt_files(db_path_).empty()) << "a read-only file must never be moved aside";

  fs::remove(db_path_);
  raw_sql(db_path_, "CREATE TABLE other(x)");  // SQLite, but not deft's
  EXPECT_THROW(Database::open_read_only(db_path_.string()), deft::Error);
}

// ---- export / import -------------------------------------------------------------------------

TEST_F(CacheTest, RecordsJsonLinesRoundTripKeepsEveryField) {
  auto a = make_record("desc a", "wa");
  a.created_at = "2024-01-02T03:04:05Z";
  a.candidates.push_back({"nan-variant", std::nan(""), "no timing"});
  auto b = make_record("desc \"b\"\twith\nodd chars", "wb");
  b.created_at = "2024-01-02T03:04:06Z";
  b.candidates.clear();
  std::stringstream io;
  EXPECT_EQ(write_records_jsonl(io, {a, b}), 2);
  const std::string text = io.str();
  EXPECT_EQ(text.rfind("{\"format\":\"deft-records/1\"}\n", 0), 0u) << text;
  EXPECT_EQ(std::count(text.begin(), text.end(), '\n'), 3) << text;
  const auto back = read_records_jsonl(io, "mem");
  ASSERT_EQ(back.size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    const auto& want = i == 0 ? a : b;
    EXPECT_EQ(back[i].desc, want.desc);
    EXPECT_EQ(back[i].stats_bucket, want.stats_bucket);
    EXPECT_EQ(back[i].device, want.device);
    EXPECT_EQ(back[i].driver_version, want.driver_version);
    EXPECT_EQ(back[i].nvrtc_version, want.nvrtc_version);
    EXPECT_EQ(back[i].deft_version, want.deft_version);
    EXPECT_EQ(back[i].search_space, want.search_space);
    EXPECT_EQ(back[i].winner, want.winner);
    EXPECT_EQ(back[i].winner_us, want.winner_us);
    EXPECT_EQ(back[i].default_us, want.default_us);
    EXPECT_EQ(back[i].created_at, want.created_at);
    ASSERT_EQ(back[i].candidates.size(), want.candidates.size());
  }
  EXPECT_EQ(back[0].candidates[1].median_us, 12.5);
  EXPECT_EQ(back[0].candidates[2].error, "compile error: too many registers");
  EXPECT_TRUE(std::isnan(back[0].candidates[3].median_us));
}

TEST_F(CacheTest, RecordsJsonLinesErrorsNameTheLineAndField) {
  auto expect_error = [](const std::string& text, const std::string& needle) {
    std::istringstream in(text);
    try {
      read_records_jsonl(in, "f.jsonl");
      ADD_FAILURE() << "no exception for " << text;
    } catch (const deft::Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_error("", "f.jsonl: empty");
  expect_error("{\"format\":\"other\"}\n", "f.jsonl:1");
  expect_error("{\"format\":\"deft-records/1\"}\n{\"desc\":\"d\"}\n", "f.jsonl:2: field \"stats_bucket\"");
  expect_error("{\"format\":\"deft-records/1\"}\n\n{not json\n", "f.jsonl:3: not valid JSON");
}

TEST_F(CacheTest, MergeAddsNewerRecordsAndSkipsOlderOrEqualOnes) {
  auto db = Database::open(db_path_.string());
  auto base = make_record("d", "w-mid");
  base.created_at = "2024-06-01T00:00:00Z";
  db->put_tuning_record(base);
  auto older = base, same = base, newer = base, other = base;
  older.winner = "w-old";
  older.created_at = "2024-05-01T00:00:00Z";
  newer.winner = "w-new";
  newer.created_at = "2024-07-01T00:00:00Z";
  other.desc = "other desc";
  const auto counts = db->merge_tuning_records({older, same, newer, other});
  EXPECT_EQ(counts.imported, 2);
  EXPECT_EQ(counts.skipped, 2);
  EXPECT_EQ(db->find_tuning_record(make_record("d", ""))->winner, "w-new");
  EXPECT_EQ(db->list_tuning_records("d").size(), 2u);
  EXPECT_EQ(db->info().tuning_records, 3);
  const auto again = db->merge_tuning_records({older, same, newer, other});
  EXPECT_EQ(again.imported, 0);
  EXPECT_EQ(again.skipped, 4);
}

}  // namespace
