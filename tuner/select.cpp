// See select.hpp.
#include "tuner/select.hpp"

#include <spdlog/spdlog.h>

#include <map>
#include <mutex>
#include <set>

#include "deft/tuning.hpp"
#include "runtime/nvrtc.hpp"

namespace deft::tuner {

std::optional<double> sigma_of_bucket(const std::string& bucket) {
  const std::string prefix = "v1:sigma~";
  if (bucket.compare(0, prefix.size(), prefix) != 0) return std::nullopt;
  try {
    size_t used = 0;
    const double s = std::stod(bucket.substr(prefix.size()), &used);
    if (used != bucket.size() - prefix.size() || !(s > 0)) return std::nullopt;
    return s;
  } catch (const std::exception&) {
    return std::nullopt;
  }
}

cache::TuningRecord record_key(const LayerDesc& desc, const std::string& stats_bucket,
                               const DeviceKey& device, bool window) {
  cache::TuningRecord r;
  r.desc = to_string(desc);
  r.stats_bucket = stats_bucket;
  r.device = device.fingerprint;
  r.driver_version = device.driver_version;
  r.nvrtc_version = nvrtc::version();
  r.deft_version = version();
  const double sigma = sigma_of_bucket(stats_bucket).value_or(2.0);
  r.search_space = search_space_hash(desc, SearchOptions{device.arch, window, sigma});
  return r;
}

namespace {

std::mutex g_shipped_mu;
std::set<std::string> g_warned;  // paths already warned about (under g_shipped_mu)

void warn_once(const std::string& path, const std::string& message) {
  std::lock_guard lock(g_shipped_mu);
  if (g_warned.insert(path).second) spdlog::warn("{}", message);
}

// The record's winner if it is usable for `desc`, else nullopt (with a warning).
std::optional<Variant> usable_winner(const LayerDesc& desc, const cache::TuningRecord& rec,
                                     const std::string& from) {
  try {
    Variant v = parse_variant(rec.winner);
    validate(desc, v);
    spdlog::debug("tuning record for '{}' ({}): {}", rec.desc, from, rec.winner);
    return v;
  } catch (const Error& e) {
    spdlog::warn("ignoring the tuning record for '{}' in {}: its variant '{}' is unusable: {}",
                 rec.desc, from, rec.winner, e.what());
    return std::nullopt;
  }
}

}  // namespace

std::shared_ptr<cache::Database> shipped_database() {
  const std::string path = shipped_database_path();
  if (path.empty()) return nullptr;
  static std::map<std::string, std::shared_ptr<cache::Database>> open;  // nullptr: unusable
  {
    std::lock_guard lock(g_shipped_mu);
    if (auto it = open.find(path); it != open.end()) return it->second;
  }
  std::shared_ptr<cache::Database> db;
  try {
    db = cache::Database::open_read_only(path);
  } catch (const Error& e) {
    warn_once(path, std::string("shipped tuning records not used: ") + e.what());
  }
  std::lock_guard lock(g_shipped_mu);
  return open.emplace(path, db).first->second;
}

Variant choose_variant(const LayerDesc& desc, const CompileOptions& options, cache::Database* db,
                       const DeviceKey* device) {
  if (options.variant) return *options.variant;
  const int arch = options.arch.value_or(0);
  // backward_data records are tuned in the fast mode; the deterministic mode's costs differ
  // (its gather form adds a sort of the sampling points and a gather pass: measured 1.2-1.7x
  // the fast mode, by tile), so it keeps the heuristic
  if (desc.pass == Pass::backward_data && options.deterministic)
    return default_variant(desc, arch, true);
  if (!options.use_tuning_records || !device) return default_variant(desc, arch);
  // The user's database first: its records take precedence over the shipped ones. In each, a
  // record of the space with window variants (deft tune --window) before one of the plain space.
  // (Where the window variants do not apply, e.g. off sm_90, both keys are one: looked up once.)
  std::vector<cache::TuningRecord> keys = {record_key(desc, options.stats_bucket, *device, true)};
  if (auto plain = record_key(desc, options.stats_bucket, *device, false);
      plain.search_space != keys[0].search_space)
    keys.push_back(std::move(plain));
  if (db)
    for (const auto& key : keys)
      if (auto rec = db->find_tuning_record(key))
        if (auto v = usable_winner(desc, *rec, db->path())) return *v;
  if (auto shipped = shipped_database()) {
    try {
      for (const auto& key : keys)
        if (auto rec = shipped->find_tuning_record(key))
          if (auto v = usable_winner(desc, *rec, "shipped " + shipped->path())) return *v;
    } catch (const Error& e) {
      warn_once(shipped->path() + "#read", std::string("shipped tuning records: ") + e.what());
    }
  }
  return default_variant(desc, arch);
}

}  // namespace deft::tuner
