// Tuning records as JSON lines ("deft-records/1"), the portable form of `deft cache export` and
// `deft cache import`: a header line {"format": "deft-records/1"}, then one record per line with
// every candidate. Timings that are not numbers (a failed candidate's NaN) are written as null.
#include <cmath>
#include <istream>
#include <ostream>

#include <nlohmann/json.hpp>

#include "cache/cache.hpp"
#include "deft/ir.hpp"

namespace deft::cache {
namespace {

using json = nlohmann::json;
constexpr const char* kFormat = "deft-records/1";

json number_or_null(double v) { return std::isfinite(v) ? json(v) : json(nullptr); }

// Reads the fields of one record line; `where` prefixes errors ("file:3").
struct LineReader {
  const json& object;
  std::string where;

  const json& at(const char* key) const {
    auto it = object.find(key);
    if (it == object.end()) throw Error(where + ": field \"" + key + "\" is missing");
    return *it;
  }
  std::string text(const char* key) const {
    const json& v = at(key);
    if (!v.is_string()) throw Error(where + ": field \"" + key + "\" must be a string");
    return v.get<std::string>();
  }
  static double number(const json& v, const std::string& where, const std::string& key) {
    if (v.is_null()) return std::nan("");
    if (!v.is_number()) throw Error(where + ": field \"" + key + "\" must be a number or null");
    return v.get<double>();
  }
};

}  // namespace

int64_t write_records_jsonl(std::ostream& out, const std::vector<TuningRecord>& records) {
  out << json{{"format", kFormat}}.dump() << '\n';
  for (const TuningRecord& r : records) {
    json candidates = json::array();
    for (const CandidateTiming& c : r.candidates)
      candidates.push_back(
          {{"variant", c.variant}, {"median_us", number_or_null(c.median_us)}, {"error", c.error}});
    json line = {{"desc", r.desc},
                 {"stats_bucket", r.stats_bucket},
                 {"device", r.device},
                 {"driver_version", r.driver_version},
                 {"nvrtc_version", r.nvrtc_version},
                 {"deft_version", r.deft_version},
                 {"search_space", r.search_space},
                 {"winner", r.winner},
                 {"winner_us", number_or_null(r.winner_us)},
                 {"default_us", number_or_null(r.default_us)},
                 {"created_at", r.created_at},
                 {"candidates", std::move(candidates)}};
    out << line.dump() << '\n';
  }
  out.flush();
  if (!out) throw Error("cannot write the exported records");
  return int64_t(records.size());
}

std::vector<TuningRecord> read_records_jsonl(std::istream& in, const std::string& source) {
  std::vector<TuningRecord> out;
  std::string line;
  size_t number = 0;
  bool header = false;
  while (std::getline(in, line)) {
    ++number;
    const std::string where = source + ":" + std::to_string(number);
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    json v;
    try {
      v = json::parse(line);
    } catch (const json::parse_error& e) {
      throw Error(where + ": not valid JSON: " + e.what());
    }
    if (!v.is_object()) throw Error(where + ": a line is a JSON object");
    if (!header) {
      auto f = v.find("format");
      if (f == v.end() || !f->is_string() || f->get<std::string>() != kFormat)
        throw Error(where + ": the first line must be {\"format\": \"" + kFormat +
                    "\"}: not a deft records file");
      header = true;
      continue;
    }
    LineReader r{v, where};
    TuningRecord rec;
    rec.desc = r.text("desc");
    rec.stats_bucket = r.text("stats_bucket");
    rec.device = r.text("device");
    rec.driver_version = r.text("driver_version");
    rec.nvrtc_version = r.text("nvrtc_version");
    rec.deft_version = r.text("deft_version");
    rec.search_space = r.text("search_space");
    rec.winner = r.text("winner");
    rec.winner_us = LineReader::number(r.at("winner_us"), where, "winner_us");
    rec.default_us = LineReader::number(r.at("default_us"), where, "default_us");
    rec.created_at = r.text("created_at");
    if (rec.created_at.empty()) throw Error(where + ": field \"created_at\" is empty");
    const json& cands = r.at("candidates");
    if (!cands.is_array()) throw Error(where + ": field \"candidates\" must be an array");
    for (size_t i = 0; i < cands.size(); ++i) {
      const std::string cw = where + ": candidates[" + std::to_string(i) + "]";
      if (!cands[i].is_object()) throw Error(cw + ": must be an object");
      LineReader c{cands[i], cw};
      rec.candidates.push_back({c.text("variant"),
                                LineReader::number(c.at("median_us"), cw, "median_us"),
                                c.text("error")});
    }
    out.push_back(std::move(rec));
  }
  if (in.bad()) throw Error(source + ": read failed");
  if (!header) throw Error(source + ": empty: not a deft records file");
  return out;
}

}  // namespace deft::cache
