// Model files (format "deft-model/1", docs/model-format.md): a model's layers as LayerDesc
// text with optional counts and offset statistics. Parsing checks every field and names the
// layer (index and name) and the field in its errors.
#include <algorithm>
#include <cmath>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "deft/tuning.hpp"

namespace deft {
namespace {

using json = nlohmann::json;

// Where in the file a value sits, for error messages: "model.json: layers[3] (layer3.0.conv2)".
struct Where {
  std::string source;
  std::string layer;  // empty at the top level
  std::string prefix() const { return layer.empty() ? source : source + ": " + layer; }
};

[[noreturn]] void fail(const Where& at, const std::string& field, const std::string& message) {
  throw Error(fmt::format("{}: field \"{}\": {}", at.prefix(), field, message));
}

std::string shown(const json& v) {
  std::string s = v.dump();
  return s.size() > 60 ? s.substr(0, 57) + "..." : s;
}

void warn_unknown(const Where& at, const json& object, const std::set<std::string>& known,
                  const std::string& parent = "") {
  for (auto it = object.begin(); it != object.end(); ++it)
    if (!known.count(it.key()))
      spdlog::warn("{}: unknown field \"{}{}\" ignored", at.prefix(), parent, it.key());
}

std::string get_string(const Where& at, const json& object, const std::string& key) {
  auto it = object.find(key);
  if (it == object.end()) fail(at, key, "missing");
  if (!it->is_string()) fail(at, key, "must be a string, got " + shown(*it));
  return it->get<std::string>();
}

double get_number(const Where& at, const json& v, const std::string& field) {
  if (!v.is_number()) fail(at, field, "must be a number, got " + shown(v));
  const double d = v.get<double>();
  if (!std::isfinite(d)) fail(at, field, "must be finite");
  return d;
}

Percentiles get_percentiles(const Where& at, const json& v, const std::string& field) {
  if (!v.is_object()) fail(at, field, "must be an object {p50, p90, p99, max}, got " + shown(v));
  warn_unknown(at, v, {"p50", "p90", "p99", "max"}, field + ".");
  Percentiles p;
  double* slots[] = {&p.p50, &p.p90, &p.p99, &p.max};
  const char* names[] = {"p50", "p90", "p99", "max"};
  for (int i = 0; i < 4; ++i) {
    const std::string name = field + "." + names[i];
    auto it = v.find(names[i]);
    if (it == v.end()) fail(at, name, "missing");
    *slots[i] = get_number(at, *it, name);
    if (*slots[i] < 0) fail(at, name, fmt::format("{} is negative (a percentile of |d|)", *slots[i]));
    // Non-decreasing, up to float rounding in the exporter's interpolation.
    if (i > 0 && *slots[i] < *slots[i - 1] - 1e-6 * std::max(1.0, *slots[i - 1]))
      fail(at, name, fmt::format("{} is below {}.{} = {}", *slots[i], field, names[i - 1],
                                 *slots[i - 1]));
  }
  return p;
}

OffsetStats get_stats(const Where& at, const json& v) {
  if (!v.is_object()) fail(at, "stats", "must be an object, got " + shown(v));
  warn_unknown(at, v, {"samples", "abs_dy", "abs_dx", "outside_fraction", "sigma"}, "stats.");
  OffsetStats s;
  if (auto it = v.find("samples"); it != v.end()) {
    if (!it->is_number_integer() || it->get<int64_t>() < 0)
      fail(at, "stats.samples", "must be an integer >= 0, got " + shown(*it));
    s.samples = it->get<int64_t>();
  }
  const bool has_dy = v.contains("abs_dy"), has_dx = v.contains("abs_dx");
  if (has_dy) s.abs_dy = get_percentiles(at, v["abs_dy"], "stats.abs_dy");
  if (has_dx) s.abs_dx = get_percentiles(at, v["abs_dx"], "stats.abs_dx");
  if (auto it = v.find("outside_fraction"); it != v.end()) {
    s.outside_fraction = get_number(at, *it, "stats.outside_fraction");
    if (s.outside_fraction < 0 || s.outside_fraction > 1)
      fail(at, "stats.outside_fraction", fmt::format("{} is not in [0, 1]", s.outside_fraction));
  }
  if (auto it = v.find("sigma"); it != v.end()) {
    const double sigma = get_number(at, *it, "stats.sigma");
    if (!(sigma > 0)) fail(at, "stats.sigma", fmt::format("{} must be positive (pixels)", sigma));
    s.sigma = sigma;
  } else if (!has_dy || !has_dx) {
    fail(at, has_dy ? "stats.abs_dx" : "stats.abs_dy",
         "missing: without stats.sigma, the sigma comes from abs_dy.p50 and abs_dx.p50");
  }
  return s;
}

}  // namespace

Model parse_model(const std::string& text, const std::string& source) {
  json root;
  try {
    root = json::parse(text);
  } catch (const json::parse_error& e) {
    // e.byte is where the parser stopped; report a line and column.
    size_t line = 1, column = 1;
    for (size_t i = 0; i + 1 < e.byte && i < text.size(); ++i) {
      if (text[i] == '\n') ++line, column = 1;
      else ++column;
    }
    std::string what = e.what();
    if (auto p = what.find("syntax error"); p != std::string::npos) what = what.substr(p);
    throw Error(fmt::format("{}:{}:{}: not valid JSON: {}", source, line, column, what));
  }
  const Where top{source, ""};
  if (!root.is_object()) throw Error(source + ": a model file is a JSON object");
  warn_unknown(top, root, {"format", "model", "layers"});
  Model m;
  m.format = get_string(top, root, "format");
  if (m.format != "deft-model/1")
    fail(top, "format", fmt::format("\"{}\" is not \"deft-model/1\"", m.format));
  m.name = get_string(top, root, "model");
  auto layers = root.find("layers");
  if (layers == root.end()) fail(top, "layers", "missing");
  if (!layers->is_array()) fail(top, "layers", "must be an array, got " + shown(*layers));
  if (layers->empty()) fail(top, "layers", "is empty");
  std::map<std::string, size_t> names;
  for (size_t i = 0; i < layers->size(); ++i) {
    const json& l = (*layers)[i];
    Where at{source, fmt::format("layers[{}]", i)};
    if (!l.is_object()) throw Error(at.prefix() + ": a layer is a JSON object, got " + shown(l));
    ModelLayer layer;
    layer.name = get_string(at, l, "name");
    if (layer.name.empty()) fail(at, "name", "is empty");
    at.layer = fmt::format("layers[{}] ({})", i, layer.name);
    warn_unknown(at, l, {"name", "desc", "count", "stats"});
    if (layer.name.find('/') != std::string::npos || layer.name == "." || layer.name == "..")
      fail(at, "name", "must not contain '/' (it names the calibration file <name>.offsets.f32)");
    if (auto [it, fresh] = names.emplace(layer.name, i); !fresh)
      fail(at, "name", fmt::format("\"{}\" is also the name of layers[{}]", layer.name, it->second));
    const std::string desc = get_string(at, l, "desc");
    try {
      layer.desc = parse_layer_desc(desc);
      validate(layer.desc);
    } catch (const DescError& e) {
      fail(at, "desc", fmt::format("{} (desc field {})", e.what(), e.field()));
    } catch (const Error& e) {
      fail(at, "desc", e.what());
    }
    if (auto it = l.find("count"); it != l.end()) {
      if (!it->is_number_integer() || it->get<int64_t>() < 1)
        fail(at, "count", "must be an integer >= 1, got " + shown(*it));
      layer.count = it->get<int64_t>();
    }
    if (auto it = l.find("stats"); it != l.end() && !it->is_null()) layer.stats = get_stats(at, *it);
    m.layers.push_back(std::move(layer));
  }
  return m;
}

Model load_model(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error(fmt::format("cannot open model file {}", path));
  std::ostringstream text;
  text << f.rdbuf();
  return parse_model(text.str(), path);
}

std::vector<TuneEntry> tune_entries(const Model& model, const std::vector<double>& sigmas) {
  if (sigmas.size() != model.layers.size())
    throw Error(fmt::format("tune_entries: {} sigmas for {} layers", sigmas.size(),
                            model.layers.size()));
  std::vector<TuneEntry> out;
  std::map<std::pair<std::string, std::string>, size_t> seen;
  for (size_t i = 0; i < model.layers.size(); ++i) {
    const ModelLayer& l = model.layers[i];
    const std::string bucket = stats_bucket(sigmas[i]);
    auto [it, fresh] = seen.emplace(std::make_pair(to_string(l.desc), bucket), out.size());
    if (fresh) {
      TuneEntry e;
      e.desc = l.desc;
      e.sigma = sigmas[i];
      e.bucket = bucket;
      out.push_back(std::move(e));
    }
    out[it->second].layers.push_back(i);
    out[it->second].count += l.count;
  }
  return out;
}

}  // namespace deft
