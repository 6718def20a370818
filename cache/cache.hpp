// deft's persistent cache: one SQLite database holding compiled cubins (keyed by content) and
// tuning records. It is a cache: a corrupt file is moved aside with a warning and rebuilt.
// Knows nothing of kernels; keys and blobs are opaque to it.
#pragma once

#include <cstdint>
#include <iosfwd>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

struct sqlite3;

namespace deft::cache {

// Schema version stored in PRAGMA user_version.
inline constexpr int kSchemaVersion = 1;

// The fields a cubin's identity depends on; digest() is the primary key.
struct CubinKey {
  std::string deft_version;
  std::string source_hash;   // sha256 of the generated CUDA source
  std::string options;       // NVRTC options, space separated
  std::string arch;          // "sm_90"
  std::string nvrtc_version; // "13.0"
  std::string digest() const;  // sha256 over all fields, hex
};

struct CubinEntry {
  std::string key;
  std::string kernel_name;
  std::string desc;      // canonical LayerDesc text, for listing
  std::string variant;   // variant text, for listing
  std::string arch;
  int64_t size = 0;
  std::string created_at;  // UTC, ISO 8601
};

// One timed candidate of a tuning run.
struct CandidateTiming {
  std::string variant;
  double median_us = 0;  // < 0: failed (see error)
  std::string error;
};

// One tuning record: the winner for (desc, stats bucket, device, versions, search space).
struct TuningRecord {
  std::string desc;            // canonical LayerDesc
  std::string stats_bucket;    // e.g. "v1:p99=2" (bucketing version inside)
  std::string device;          // device fingerprint: name, cc, SM count
  std::string driver_version;
  std::string nvrtc_version;
  std::string deft_version;
  std::string search_space;    // hash of the search space
  std::string winner;          // variant text
  double winner_us = 0;
  double default_us = 0;
  std::vector<CandidateTiming> candidates;
  std::string created_at;
};

struct DatabaseInfo {
  std::string path;
  int schema_version = 0;
  int64_t cubins = 0;
  int64_t cubin_bytes = 0;
  int64_t tuning_records = 0;
  int64_t file_bytes = 0;
};

class Database {
 public:
  // Opens (creating directories and schema as needed). A file that is not a valid deft
  // database (garbage, truncated, newer schema) is renamed to <path>.corrupt-<time> with a
  // warning, and a fresh one is created. Throws deft::Error only if no database can be made.
  static std::shared_ptr<Database> open(const std::string& path);
  // Opens an existing database read-only (SQLITE_OPEN_READONLY; e.g. the shipped records).
  // Never creates, writes, or moves the file aside: a missing or unusable file throws
  // deft::Error naming it and the reason. Writes through it fail.
  static std::shared_ptr<Database> open_read_only(const std::string& path);
  ~Database();
  Database(const Database&) = delete;
  Database& operator=(const Database&) = delete;

  const std::string& path() const { return path_; }

  std::optional<std::vector<char>> get_cubin(const std::string& key);
  void put_cubin(const std::string& key, const std::vector<char>& cubin, const CubinEntry& meta);
  std::vector<CubinEntry> list_cubins();

  void put_tuning_record(const TuningRecord& record);
  // Newest record with all identity fields equal to `probe`'s (winner etc. ignored).
  std::optional<TuningRecord> find_tuning_record(const TuningRecord& probe);
  std::vector<TuningRecord> list_tuning_records(const std::string& desc = "");

  // Merges records (e.g. from read_records_jsonl) into this database in one transaction.
  // A record whose identity already has a record created at the same time or later is
  // skipped; otherwise it is added (it becomes the newest for its identity).
  struct MergeCounts {
    int64_t imported = 0, skipped = 0;
  };
  MergeCounts merge_tuning_records(const std::vector<TuningRecord>& records);

  DatabaseInfo info();
  void clear();  // deletes every row of every table

 private:
  explicit Database(std::string path);
  std::string path_;
  sqlite3* db_ = nullptr;
  std::mutex mu_;
};

// Tuning records as JSON lines ("deft-records/1", docs/model-format.md): a header line, then one
// record (with every candidate) per line. write returns the number of records written; read
// throws deft::Error naming the source and line of anything malformed.
int64_t write_records_jsonl(std::ostream& out, const std::vector<TuningRecord>& records);
std::vector<TuningRecord> read_records_jsonl(std::istream& in, const std::string& source);

// $DEFT_CACHE_DIR/deft.db, else $XDG_CACHE_HOME/deft/deft.db, else $HOME/.cache/deft/deft.db.
std::string default_database_path();

// Hex SHA-256 of bytes.
std::string sha256_hex(const void* data, size_t size);
inline std::string sha256_hex(const std::string& s) { return sha256_hex(s.data(), s.size()); }

}  // namespace deft::cache
