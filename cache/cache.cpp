// The cache database: cubins and tuning records in one SQLite file (WAL, busy timeout,
// one transaction per put). Opening validates the file; anything that is not a usable deft
// database of this schema is moved aside to <path>.corrupt-<time> and rebuilt, since
// everything in it can be recomputed.
#include "cache/cache.hpp"

#include <sqlite3.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>

#include <cmath>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <string_view>
#include <system_error>
#include <utility>

#include "deft/ir.hpp"

namespace deft::cache {
namespace fs = std::filesystem;
namespace {

// A failed SQLite call. It is a deft::Error; rc lets open() tell corruption from other failures.
class SqliteError : public Error {
 public:
  SqliteError(int rc, const std::string& path, std::string detail)
      : Error("cache database " + path + ": " + detail), rc_(rc), detail_(std::move(detail)) {}
  int rc() const { return rc_; }
  const std::string& detail() const { return detail_; }  // the message without the path

 private:
  int rc_;
  std::string detail_;
};

// Raised while validating a file that opened but is not a usable deft database.
struct NotADeftDatabase {
  std::string reason;
};

bool is_corruption(int rc) {
  int primary = rc & 0xff;
  return primary == SQLITE_NOTADB || primary == SQLITE_CORRUPT;
}

[[noreturn]] void throw_sqlite(sqlite3* db, int rc, const std::string& path,
                               std::string_view doing) {
  const char* message = db ? sqlite3_errmsg(db) : sqlite3_errstr(rc);
  throw SqliteError(rc, path, std::string(message) + " (while " + std::string(doing) + ")");
}

// SQL text for error messages: whitespace runs (the layout of the raw strings) become one space.
std::string one_line(std::string_view sql) {
  std::string out;
  for (char c : sql) {
    bool space = c == ' ' || c == '\n' || c == '\t';
    if (space && (out.empty() || out.back() == ' ')) continue;
    out += space ? ' ' : c;
  }
  return out;
}

// A prepared statement; parameters are bound, never spliced into the SQL text.
class Statement {
 public:
  Statement(sqlite3* db, const std::string& path, std::string_view sql)
      : db_(db), path_(path), sql_(one_line(sql)) {
    int rc = sqlite3_prepare_v2(db, sql.data(), int(sql.size()), &stmt_, nullptr);
    if (rc != SQLITE_OK) throw_sqlite(db_, rc, path_, "preparing: " + sql_);
  }
  ~Statement() { sqlite3_finalize(stmt_); }
  Statement(const Statement&) = delete;
  Statement& operator=(const Statement&) = delete;

  Statement& bind(int i, std::string_view s) {
    check(sqlite3_bind_text64(stmt_, i, s.data(), s.size(), SQLITE_TRANSIENT, SQLITE_UTF8));
    return *this;
  }
  Statement& bind(int i, int64_t v) {
    check(sqlite3_bind_int64(stmt_, i, v));
    return *this;
  }
  Statement& bind(int i, double v) {  // NaN is stored as NULL and read back as NaN
    check(sqlite3_bind_double(stmt_, i, v));
    return *this;
  }
  Statement& bind_blob(int i, const std::vector<char>& bytes) {
    // An empty vector's data() may be null, which SQLite would store as NULL, not as a blob.
    if (bytes.empty()) {
      check(sqlite3_bind_zeroblob(stmt_, i, 0));
    } else {
      check(sqlite3_bind_blob64(stmt_, i, bytes.data(), bytes.size(), SQLITE_TRANSIENT));
    }
    return *this;
  }

  // True while a row is available; false when done.
  bool step() {
    int rc = sqlite3_step(stmt_);
    if (rc == SQLITE_ROW) return true;
    if (rc == SQLITE_DONE) return false;
    throw_sqlite(db_, rc, path_, "running: " + sql_);
  }
  void run() {
    while (step()) {
    }
  }
  // Makes the statement ready to run again with new bindings.
  void reset() {
    sqlite3_reset(stmt_);
    sqlite3_clear_bindings(stmt_);
  }

  std::string text(int col) {
    const auto* p = reinterpret_cast<const char*>(sqlite3_column_text(stmt_, col));
    int n = sqlite3_column_bytes(stmt_, col);
    return p ? std::string(p, size_t(n)) : std::string();
  }
  int64_t integer(int col) { return sqlite3_column_int64(stmt_, col); }
  double real(int col) {
    if (sqlite3_column_type(stmt_, col) == SQLITE_NULL) return std::nan("");
    return sqlite3_column_double(stmt_, col);
  }
  std::vector<char> blob(int col) {
    const auto* p = static_cast<const char*>(sqlite3_column_blob(stmt_, col));
    int n = sqlite3_column_bytes(stmt_, col);
    return p ? std::vector<char>(p, p + n) : std::vector<char>();
  }

 private:
  void check(int rc) {
    if (rc != SQLITE_OK) throw_sqlite(db_, rc, path_, "binding: " + sql_);
  }
  sqlite3* db_;
  const std::string& path_;
  std::string sql_;
  sqlite3_stmt* stmt_ = nullptr;
};

void exec(sqlite3* db, const std::string& path, std::string_view sql) {
  Statement(db, path, sql).run();
}

// BEGIN IMMEDIATE takes the write lock up front, so the busy timeout applies; a deferred
// transaction that later upgrades to a writer can fail with SQLITE_BUSY at once.
class Transaction {
 public:
  Transaction(sqlite3* db, const std::string& path, bool write) : db_(db), path_(path) {
    exec(db_, path_, write ? "BEGIN IMMEDIATE" : "BEGIN");
  }
  ~Transaction() {
    if (open_) sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
  }
  Transaction(const Transaction&) = delete;
  Transaction& operator=(const Transaction&) = delete;
  void commit() {
    exec(db_, path_, "COMMIT");
    open_ = false;
  }

 private:
  sqlite3* db_;
  const std::string& path_;
  bool open_ = true;
};

struct CloseConnection {
  void operator()(sqlite3* db) const { sqlite3_close_v2(db); }
};
using Connection = std::unique_ptr<sqlite3, CloseConnection>;

std::string utc_now(const char* format) {
  std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  char buf[64];
  size_t n = std::strftime(buf, sizeof buf, format, &tm);
  return std::string(buf, n);
}

std::string iso_now() { return utc_now("%Y-%m-%dT%H:%M:%SZ"); }

std::string fmt_percent(char c) {  // URI percent-encoding of one byte
  static const char* hex = "0123456789ABCDEF";
  const auto u = static_cast<unsigned char>(c);
  return std::string{'%', hex[u >> 4], hex[u & 15]};
}

// The schema. Each table's columns, in order, are what validation checks an existing file for.
struct TableSpec {
  const char* name;
  std::vector<std::string> columns;
};

const std::vector<TableSpec>& expected_tables() {
  static const std::vector<TableSpec> tables = {
      {"cubins", {"key", "kernel_name", "desc", "variant", "arch", "size", "created_at", "data"}},
      {"tuning_records",
       {"id", "desc", "stats_bucket", "device", "driver_version", "nvrtc_version", "deft_version",
        "search_space", "winner", "winner_us", "default_us", "created_at"}},
      {"tuning_candidates", {"record_id", "variant", "median_us", "error"}},
  };
  return tables;
}

constexpr const char* kSchema[] = {
    R"(CREATE TABLE cubins(
         key TEXT PRIMARY KEY, kernel_name TEXT NOT NULL, "desc" TEXT NOT NULL,
         variant TEXT NOT NULL, arch TEXT NOT NULL, size INTEGER NOT NULL,
         created_at TEXT NOT NULL, data BLOB NOT NULL))",
    R"(CREATE TABLE tuning_records(
         id INTEGER PRIMARY KEY, "desc" TEXT NOT NULL, stats_bucket TEXT NOT NULL,
         device TEXT NOT NULL, driver_version TEXT NOT NULL, nvrtc_version TEXT NOT NULL,
         deft_version TEXT NOT NULL, search_space TEXT NOT NULL, winner TEXT NOT NULL,
         winner_us REAL, default_us REAL, created_at TEXT NOT NULL))",
    R"(CREATE INDEX tuning_records_identity ON tuning_records(
         "desc", stats_bucket, device, driver_version, nvrtc_version, deft_version, search_space))",
    R"(CREATE TABLE tuning_candidates(
         record_id INTEGER NOT NULL REFERENCES tuning_records(id) ON DELETE CASCADE,
         variant TEXT NOT NULL, median_us REAL, error TEXT NOT NULL))",
    R"(CREATE INDEX tuning_candidates_record ON tuning_candidates(record_id))",
};

int user_version(sqlite3* db, const std::string& path) {
  Statement s(db, path, "PRAGMA user_version");
  return s.step() ? int(s.integer(0)) : 0;
}

void check_columns(sqlite3* db, const std::string& path) {
  for (const TableSpec& table : expected_tables()) {
    Statement s(db, path, "SELECT name FROM pragma_table_info(?1) ORDER BY cid");
    s.bind(1, table.name);
    std::vector<std::string> columns;
    while (s.step()) columns.push_back(s.text(0));
    if (columns == table.columns) continue;
    if (columns.empty()) throw NotADeftDatabase{std::string("table ") + table.name + " is missing"};
    std::string got;
    for (const auto& c : columns) got += (got.empty() ? "" : ",") + c;
    throw NotADeftDatabase{std::string("table ") + table.name + " has columns (" + got +
                           ") which differ from this deft's schema"};
  }
}

// Checks an opened file, creating the schema in an empty one. Throws NotADeftDatabase, or
// SqliteError (corruption codes included) from the reads.
void validate_or_create(sqlite3* db, const std::string& path) {
  int version = user_version(db, path);
  if (version > kSchemaVersion) {
    throw NotADeftDatabase{"schema version " + std::to_string(version) +
                           " is newer than this deft's " + std::to_string(kSchemaVersion)};
  }
  {
    Statement s(db, path, "PRAGMA quick_check");
    std::string result = s.step() ? s.text(0) : "no result";
    if (result != "ok") throw NotADeftDatabase{"quick_check failed: " + result};
  }
  if (version == 0) {
    // Re-read under the write lock: another process may be creating the schema right now.
    Transaction tx(db, path, /*write=*/true);
    version = user_version(db, path);
    if (version == 0) {
      Statement count(db, path,
                      "SELECT count(*) FROM sqlite_schema WHERE name NOT LIKE 'sqlite_%'");
      if (count.step() && count.integer(0) > 0) {
        throw NotADeftDatabase{"schema version 0 but the file has tables: not a deft cache"};
      }
      for (const char* sql : kSchema) exec(db, path, sql);
      exec(db, path, "PRAGMA user_version = " + std::to_string(kSchemaVersion));
      tx.commit();
      return;
    }
    tx.commit();
  }
  if (version != kSchemaVersion) {
    throw NotADeftDatabase{"schema version " + std::to_string(version) + " is not " +
                           std::to_string(kSchemaVersion) + " and has no migration"};
  }
  check_columns(db, path);
}

// Opens the file (creating it if missing); reads nothing from it yet.
Connection connect(const std::string& path) {
  sqlite3* raw = nullptr;
  int rc = sqlite3_open_v2(path.c_str(), &raw, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE |
                                                  SQLITE_OPEN_NOMUTEX, nullptr);
  Connection db(raw);
  if (rc != SQLITE_OK) throw_sqlite(raw, rc, path, "opening");
  sqlite3_extended_result_codes(raw, 1);
  sqlite3_busy_timeout(raw, 10000);
  return db;
}

// The pragmas every connection needs. The first read of the file happens here.
void configure(sqlite3* raw, const std::string& path) {
  std::string mode;
  try {
    Statement s(raw, path, "PRAGMA journal_mode=WAL");
    if (s.step()) mode = s.text(0);
  } catch (const SqliteError& e) {
    if (is_corruption(e.rc())) throw;
    // A filesystem without shared-memory support refuses WAL; the rollback journal works too.
    spdlog::debug("cache database {}: WAL not available: {}", path, e.what());
  }
  // WAL with synchronous=NORMAL cannot corrupt the file, only lose the last commits on power
  // loss, which is acceptable for a cache and saves an fsync per put.
  if (mode == "wal") exec(raw, path, "PRAGMA synchronous=NORMAL");
  exec(raw, path, "PRAGMA foreign_keys=ON");
}

using FileId = std::pair<dev_t, ino_t>;
std::optional<FileId> file_id(const std::string& path) {
  struct stat st{};
  if (::stat(path.c_str(), &st) != 0) return std::nullopt;
  return FileId{st.st_dev, st.st_ino};
}

bool exists(const std::string& path) {
  std::error_code ec;
  return fs::exists(path, ec);
}

// Renames path (and its -wal/-shm) to <path>.corrupt-<UTC time>[-N] and warns.
void move_aside(const std::string& path, const std::string& reason) {
  std::string base = path + ".corrupt-" + utc_now("%Y%m%dT%H%M%S");
  std::string aside = base;
  for (int n = 1; exists(aside) || exists(aside + "-wal") || exists(aside + "-shm"); ++n) {
    aside = base + "-" + std::to_string(n);
  }
  std::error_code ec;
  fs::rename(path, aside, ec);
  if (ec && !exists(path)) return;  // another process moved it first
  if (ec) {
    std::error_code rm;
    fs::remove(path, rm);
    if (rm) {
      throw Error("cache database " + path + " is unusable (" + reason +
                  ") and can be neither moved aside (" + ec.message() + ") nor removed (" +
                  rm.message() + ")");
    }
    spdlog::warn("cache database {} is unusable ({}); could not move it to {} ({}), removed it",
                 path, reason, aside, ec.message());
  } else {
    spdlog::warn("cache database {} is unusable ({}); moved it to {} and created a new one",
                 path, reason, aside);
  }
  for (const char* suffix : {"-wal", "-shm"}) {
    std::string sibling = path + suffix;
    if (!exists(sibling)) continue;
    std::error_code sib;
    fs::rename(sibling, aside + suffix, sib);
    if (sib) fs::remove(sibling, sib);
  }
}

std::string identity_where() {  // parameters ?1..?7 in TuningRecord's identity order
  return R"("desc" = ?1 AND stats_bucket = ?2 AND device = ?3 AND driver_version = ?4 AND
            nvrtc_version = ?5 AND deft_version = ?6 AND search_space = ?7)";
}

constexpr const char* kRecordColumns =
    R"(id, "desc", stats_bucket, device, driver_version, nvrtc_version, deft_version,
       search_space, winner, winner_us, default_us, created_at)";

TuningRecord read_record(Statement& s) {  // columns as kRecordColumns, id skipped
  TuningRecord r;
  r.desc = s.text(1);
  r.stats_bucket = s.text(2);
  r.device = s.text(3);
  r.driver_version = s.text(4);
  r.nvrtc_version = s.text(5);
  r.deft_version = s.text(6);
  r.search_space = s.text(7);
  r.winner = s.text(8);
  r.winner_us = s.real(9);
  r.default_us = s.real(10);
  r.created_at = s.text(11);
  return r;
}

std::vector<CandidateTiming> read_candidates(sqlite3* db, const std::string& path, int64_t id) {
  Statement s(db, path,
              "SELECT variant, median_us, error FROM tuning_candidates WHERE record_id = ?1 "
              "ORDER BY rowid");
  s.bind(1, id);
  std::vector<CandidateTiming> out;
  while (s.step()) out.push_back({s.text(0), s.real(1), s.text(2)});
  return out;
}

}  // namespace

std::string CubinKey::digest() const {
  // Length-prefixed fields: no choice of field contents can make two keys serialize alike.
  std::string text = "deft-cubin-key-v1";
  for (const std::string* field : {&deft_version, &source_hash, &options, &arch, &nvrtc_version}) {
    text += '\n';
    text += std::to_string(field->size());
    text += ':';
    text += *field;
  }
  return sha256_hex(text);
}

Database::Database(std::string path) : path_(std::move(path)) {}

Database::~Database() { sqlite3_close_v2(db_); }

std::shared_ptr<Database> Database::open(const std::string& path) {
  if (path.empty()) throw Error("cache database path is empty");
  fs::path parent = fs::path(path).parent_path();
  if (!parent.empty()) {
    std::error_code ec;
    fs::create_directories(parent, ec);
    if (ec) {
      throw Error("cache database " + path + ": cannot create directory " + parent.string() +
                  ": " + ec.message());
    }
  }
  std::shared_ptr<Database> self(new Database(path));
  // Attempt 0 opens the file as found; later attempts follow a move-aside. Three failures in a
  // row mean the fresh file is unusable too, which is an error, not corruption.
  for (int attempt = 0;; ++attempt) {
    std::string reason;
    std::optional<FileId> opened;
    try {
      Connection db = connect(path);
      opened = file_id(path);
      configure(db.get(), path);
      validate_or_create(db.get(), path);
      self->db_ = db.release();
      return self;
    } catch (const NotADeftDatabase& e) {
      reason = e.reason;
    } catch (const SqliteError& e) {
      if (!is_corruption(e.rc())) throw;
      reason = e.detail();
    }
    if (attempt >= 2) {
      throw Error("cache database " + path + " is still unusable after moving it aside: " + reason);
    }
    // Move it aside only if it is still the file we judged: another process that found the
    // same corruption may already have replaced it with a fresh database.
    if (opened && file_id(path) == opened) move_aside(path, reason);
  }
}

std::shared_ptr<Database> Database::open_read_only(const std::string& path) {
  if (path.empty()) throw Error("read-only database path is empty");
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) throw Error("database " + path + " does not exist");
  auto try_open = [&](bool immutable) {
    // immutable=1 (a URI parameter) reads a WAL-mode file where its -shm cannot be created,
    // e.g. in a read-only directory; SQLite then takes no locks, which a shipped file allows.
    std::string uri = path;
    int flags = SQLITE_OPEN_READONLY | SQLITE_OPEN_NOMUTEX;
    if (immutable) {
      std::string escaped;
      for (char c : fs::absolute(path).string()) {
        if (c == '%' || c == '?' || c == '#') escaped += fmt_percent(c);
        else escaped += c;
      }
      uri = "file:" + escaped + "?immutable=1";
      flags |= SQLITE_OPEN_URI;
    }
    sqlite3* raw = nullptr;
    int rc = sqlite3_open_v2(uri.c_str(), &raw, flags, nullptr);
    Connection db(raw);
    if (rc != SQLITE_OK) throw_sqlite(raw, rc, path, "opening read-only");
    sqlite3_extended_result_codes(raw, 1);
    sqlite3_busy_timeout(raw, 10000);
    const int version = user_version(raw, path);
    if (version != kSchemaVersion)
      throw NotADeftDatabase{"schema version " + std::to_string(version) + ", this deft reads " +
                             std::to_string(kSchemaVersion)};
    check_columns(raw, path);
    return db;
  };
  std::shared_ptr<Database> self(new Database(path));
  try {
    try {
      self->db_ = try_open(false).release();
    } catch (const SqliteError& e) {
      const int primary = e.rc() & 0xff;
      if (primary != SQLITE_CANTOPEN && primary != SQLITE_READONLY) throw;
      self->db_ = try_open(true).release();
    }
  } catch (const NotADeftDatabase& e) {
    throw Error("database " + path + " is not a usable deft database: " + e.reason);
  } catch (const SqliteError& e) {
    throw Error("database " + path + " cannot be read: " + e.detail());
  }
  return self;
}

std::optional<std::vector<char>> Database::get_cubin(const std::string& key) {
  std::lock_guard lock(mu_);
  Statement s(db_, path_, "SELECT data FROM cubins WHERE key = ?1");
  s.bind(1, key);
  if (!s.step()) return std::nullopt;
  return s.blob(0);
}

void Database::put_cubin(const std::string& key, const std::vector<char>& cubin,
                         const CubinEntry& meta) {
  std::lock_guard lock(mu_);
  Transaction tx(db_, path_, /*write=*/true);
  Statement s(db_, path_,
              R"(INSERT OR REPLACE INTO cubins(key, kernel_name, "desc", variant, arch, size,
                                              created_at, data)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8))");
  s.bind(1, key)
      .bind(2, meta.kernel_name)
      .bind(3, meta.desc)
      .bind(4, meta.variant)
      .bind(5, meta.arch)
      .bind(6, int64_t(cubin.size()))
      .bind(7, meta.created_at.empty() ? iso_now() : meta.created_at)
      .bind_blob(8, cubin);
  s.run();
  tx.commit();
}

std::vector<CubinEntry> Database::list_cubins() {
  std::lock_guard lock(mu_);
  Statement s(db_, path_,
              R"(SELECT key, kernel_name, "desc", variant, arch, size, created_at
                 FROM cubins ORDER BY rowid)");
  std::vector<CubinEntry> out;
  while (s.step()) {
    out.push_back({s.text(0), s.text(1), s.text(2), s.text(3), s.text(4), s.integer(5),
                   s.text(6)});
  }
  return out;
}

// Binds a record's identity fields (desc ... search_space) to parameters 1..7.
static Statement& bind_identity(Statement& s, const TuningRecord& r) {
  return s.bind(1, r.desc)
      .bind(2, r.stats_bucket)
      .bind(3, r.device)
      .bind(4, r.driver_version)
      .bind(5, r.nvrtc_version)
      .bind(6, r.deft_version)
      .bind(7, r.search_space);
}

// Inserts a record and its candidates; the caller holds the lock and a write transaction.
static void insert_record(sqlite3* db, const std::string& path, const TuningRecord& record) {
  {
    Statement s(db, path,
                R"(INSERT INTO tuning_records("desc", stats_bucket, device, driver_version,
                     nvrtc_version, deft_version, search_space, winner, winner_us, default_us,
                     created_at)
                   VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11))");
    bind_identity(s, record)
        .bind(8, record.winner)
        .bind(9, record.winner_us)
        .bind(10, record.default_us)
        .bind(11, record.created_at.empty() ? iso_now() : record.created_at);
    s.run();
  }
  int64_t id = sqlite3_last_insert_rowid(db);
  Statement c(db, path,
              "INSERT INTO tuning_candidates(record_id, variant, median_us, error) "
              "VALUES (?1, ?2, ?3, ?4)");
  for (const CandidateTiming& t : record.candidates) {
    c.bind(1, id).bind(2, t.variant).bind(3, t.median_us).bind(4, t.error);
    c.run();
    c.reset();
  }
}

void Database::put_tuning_record(const TuningRecord& record) {
  std::lock_guard lock(mu_);
  Transaction tx(db_, path_, /*write=*/true);
  insert_record(db_, path_, record);
  tx.commit();
}

Database::MergeCounts Database::merge_tuning_records(const std::vector<TuningRecord>& records) {
  std::lock_guard lock(mu_);
  MergeCounts counts;
  Transaction tx(db_, path_, /*write=*/true);
  // ISO 8601 UTC times compare correctly as text.
  Statement newest(db_, path_,
                   "SELECT max(created_at) FROM tuning_records WHERE " + identity_where());
  for (const TuningRecord& r : records) {
    if (r.created_at.empty()) throw Error("cache: a merged tuning record has no created_at");
    bind_identity(newest, r);
    const bool have = newest.step() && !newest.text(0).empty();
    const bool newer = !have || r.created_at > newest.text(0);
    newest.reset();
    if (!newer) {
      ++counts.skipped;
      continue;
    }
    insert_record(db_, path_, r);
    ++counts.imported;
  }
  tx.commit();
  return counts;
}

std::optional<TuningRecord> Database::find_tuning_record(const TuningRecord& probe) {
  std::lock_guard lock(mu_);
  Transaction tx(db_, path_, /*write=*/false);  // the record and its candidates from one snapshot
  Statement s(db_, path_,
              std::string("SELECT ") + kRecordColumns + " FROM tuning_records WHERE " +
                  identity_where() + " ORDER BY id DESC LIMIT 1");
  bind_identity(s, probe);
  if (!s.step()) return std::nullopt;
  TuningRecord r = read_record(s);
  r.candidates = read_candidates(db_, path_, s.integer(0));
  tx.commit();
  return r;
}

std::vector<TuningRecord> Database::list_tuning_records(const std::string& desc) {
  std::lock_guard lock(mu_);
  Transaction tx(db_, path_, /*write=*/false);
  Statement s(db_, path_,
              std::string("SELECT ") + kRecordColumns +
                  R"( FROM tuning_records WHERE ?1 = '' OR "desc" = ?1 ORDER BY id)");
  s.bind(1, desc);
  std::vector<TuningRecord> out;
  while (s.step()) {
    out.push_back(read_record(s));
    out.back().candidates = read_candidates(db_, path_, s.integer(0));
  }
  tx.commit();
  return out;
}

DatabaseInfo Database::info() {
  std::lock_guard lock(mu_);
  DatabaseInfo info;
  info.path = path_;
  Transaction tx(db_, path_, /*write=*/false);
  info.schema_version = user_version(db_, path_);
  {
    Statement s(db_, path_, "SELECT count(*), coalesce(sum(size), 0) FROM cubins");
    if (s.step()) {
      info.cubins = s.integer(0);
      info.cubin_bytes = s.integer(1);
    }
  }
  {
    Statement s(db_, path_, "SELECT count(*) FROM tuning_records");
    if (s.step()) info.tuning_records = s.integer(0);
  }
  tx.commit();
  for (const std::string& file : {path_, path_ + "-wal"}) {
    std::error_code ec;
    auto size = fs::file_size(file, ec);
    if (!ec) info.file_bytes += int64_t(size);
  }
  return info;
}

void Database::clear() {
  std::lock_guard lock(mu_);
  Transaction tx(db_, path_, /*write=*/true);
  exec(db_, path_, "DELETE FROM tuning_candidates");
  exec(db_, path_, "DELETE FROM tuning_records");
  exec(db_, path_, "DELETE FROM cubins");
  tx.commit();
}

std::string default_database_path() {
  auto env = [](const char* name) -> std::string {
    const char* v = std::getenv(name);
    return v ? std::string(v) : std::string();
  };
  if (std::string dir = env("DEFT_CACHE_DIR"); !dir.empty()) {
    return (fs::path(dir) / "deft.db").string();
  }
  if (std::string dir = env("XDG_CACHE_HOME"); !dir.empty()) {
    return (fs::path(dir) / "deft" / "deft.db").string();
  }
  if (std::string home = env("HOME"); !home.empty()) {
    return (fs::path(home) / ".cache" / "deft" / "deft.db").string();
  }
  throw Error("no cache directory: set DEFT_CACHE_DIR (or XDG_CACHE_HOME or HOME)");
}

}  // namespace deft::cache
