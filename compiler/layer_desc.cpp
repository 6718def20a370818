// LayerDesc: canonical text form (print and parse) and validation.
#include <charconv>
#include <cmath>
#include <map>
#include <set>
#include <vector>

#include <fmt/format.h>

#include "deft/ir.hpp"

namespace deft {

namespace {

template <typename E>
struct EnumNames;
#define DEFT_ENUM_NAMES(E, ...)                                         \
  template <>                                                           \
  struct EnumNames<E> {                                                 \
    static constexpr std::pair<E, std::string_view> v[] = {__VA_ARGS__}; \
  };
DEFT_ENUM_NAMES(OpKind, {OpKind::deform_conv2d, "deform_conv2d"},
                {OpKind::deform_aggregate, "deform_aggregate"},
                {OpKind::masked_conv2d, "masked_conv2d"})
DEFT_ENUM_NAMES(DType, {DType::f32, "f32"}, {DType::f16, "f16"}, {DType::bf16, "bf16"},
                {DType::f64, "f64"})
DEFT_ENUM_NAMES(MathMode, {MathMode::fp32, "fp32"}, {MathMode::tf32, "tf32"})
DEFT_ENUM_NAMES(Layout, {Layout::nchw, "nchw"}, {Layout::nhwc, "nhwc"})
DEFT_ENUM_NAMES(Pass, {Pass::forward, "forward"}, {Pass::backward_data, "backward_data"},
                {Pass::backward_weight, "backward_weight"})
DEFT_ENUM_NAMES(Activation, {Activation::none, "none"}, {Activation::relu, "relu"},
                {Activation::gelu, "gelu"})
#undef DEFT_ENUM_NAMES

template <typename E>
std::string_view enum_name(E e) {
  for (auto& [v, n] : EnumNames<E>::v)
    if (v == e) return n;
  return "?";
}

template <typename E>
E parse_enum(std::string_view field, std::string_view text) {
  std::string allowed;
  for (auto& [v, n] : EnumNames<E>::v) {
    if (n == text) return v;
    allowed += allowed.empty() ? "" : "|";
    allowed += n;
  }
  throw DescError(std::string(field),
                  fmt::format("{}={} is not one of {}", field, text, allowed));
}

int64_t parse_int(std::string_view field, std::string_view text) {
  int64_t v = 0;
  auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc() || p != text.data() + text.size())
    throw DescError(std::string(field),
                    fmt::format("{}={} is not an integer", field, text));
  return v;
}

int parse_int32(std::string_view field, std::string_view text) {
  int64_t v = parse_int(field, text);
  if (v < INT32_MIN || v > INT32_MAX)
    throw DescError(std::string(field), fmt::format("{}={} is out of range", field, text));
  return static_cast<int>(v);
}

bool parse_bool(std::string_view field, std::string_view text) {
  if (text == "1" || text == "true") return true;
  if (text == "0" || text == "false") return false;
  throw DescError(std::string(field), fmt::format("{}={} is not 0 or 1", field, text));
}

// "2" -> (2, 2); "2x1" -> (2, 1)
std::pair<int, int> parse_pair(std::string_view field, std::string_view text) {
  auto x = text.find('x');
  if (x == std::string_view::npos) {
    int v = parse_int32(field, text);
    return {v, v};
  }
  return {parse_int32(field, text.substr(0, x)), parse_int32(field, text.substr(x + 1))};
}

std::string pair_text(int a, int b) {
  return a == b ? fmt::format("{}", a) : fmt::format("{}x{}", a, b);
}

// Shortest text that parses back to exactly the same double.
std::string double_text(double v) {
  char buf[64];
  auto [p, ec] = std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, p);
}

}  // namespace

std::string_view to_string(OpKind v) { return enum_name(v); }
std::string_view to_string(DType v) { return enum_name(v); }
std::string_view to_string(MathMode v) { return enum_name(v); }
std::string_view to_string(Layout v) { return enum_name(v); }
std::string_view to_string(Pass v) { return enum_name(v); }
std::string_view to_string(Activation v) { return enum_name(v); }

int dtype_size(DType t) {
  switch (t) {
    case DType::f32: return 4;
    case DType::f16: return 2;
    case DType::bf16: return 2;
    case DType::f64: return 8;
  }
  return 0;
}

std::string to_string(const LayerDesc& d) {
  const LayerDesc def;
  std::string s = fmt::format("{} n={} c={} h={} w={} k={} r={} s={}", to_string(d.op), d.n, d.c,
                              d.h, d.w, d.k, d.r, d.s);
  if (d.stride_h != 1 || d.stride_w != 1) s += " stride=" + pair_text(d.stride_h, d.stride_w);
  s += " pad=" + pair_text(d.pad_h, d.pad_w);
  if (d.dil_h != 1 || d.dil_w != 1) s += " dilation=" + pair_text(d.dil_h, d.dil_w);
  s += fmt::format(" groups={} offset_groups={} mask={}", d.groups, d.offset_groups,
                   d.mask ? 1 : 0);
  if (d.op == OpKind::deform_aggregate)
    s += fmt::format(" softmax={} offset_scale={} remove_center={}", d.softmax ? 1 : 0,
                     double_text(d.offset_scale), d.remove_center ? 1 : 0);
  s += fmt::format(" dtype={}", to_string(d.dtype));
  if (d.math != def.math) s += fmt::format(" math={}", to_string(d.math));
  s += fmt::format(" layout={}", to_string(d.layout));
  if (d.pass != def.pass) s += fmt::format(" pass={}", to_string(d.pass));
  if (d.bias != def.bias) s += fmt::format(" bias={}", d.bias ? 1 : 0);
  if (d.act != def.act) s += fmt::format(" act={}", to_string(d.act));
  return s;
}

LayerDesc parse_layer_desc(std::string_view text) {
  LayerDesc d;
  std::vector<std::string_view> words;
  size_t i = 0;
  while (i < text.size()) {
    while (i < text.size() && std::isspace(static_cast<unsigned char>(text[i]))) ++i;
    size_t j = i;
    while (j < text.size() && !std::isspace(static_cast<unsigned char>(text[j]))) ++j;
    if (j > i) words.push_back(text.substr(i, j - i));
    i = j;
  }
  if (words.empty()) throw DescError("op", "empty layer description");
  d.op = parse_enum<OpKind>("op", words[0]);
  std::set<std::string_view> seen;
  for (size_t w = 1; w < words.size(); ++w) {
    auto word = words[w];
    auto eq = word.find('=');
    if (eq == std::string_view::npos || eq == 0)
      throw DescError(std::string(word),
                      fmt::format("'{}' is not of the form field=value", word));
    auto key = word.substr(0, eq), val = word.substr(eq + 1);
    if (!seen.insert(key).second)
      throw DescError(std::string(key), fmt::format("{} is given twice", key));
    if (key == "n") d.n = parse_int(key, val);
    else if (key == "c") d.c = parse_int(key, val);
    else if (key == "h") d.h = parse_int(key, val);
    else if (key == "w") d.w = parse_int(key, val);
    else if (key == "k") d.k = parse_int(key, val);
    else if (key == "r") d.r = parse_int32(key, val);
    else if (key == "s") d.s = parse_int32(key, val);
    else if (key == "stride") std::tie(d.stride_h, d.stride_w) = parse_pair(key, val);
    else if (key == "pad") std::tie(d.pad_h, d.pad_w) = parse_pair(key, val);
    else if (key == "dilation") std::tie(d.dil_h, d.dil_w) = parse_pair(key, val);
    else if (key == "groups") d.groups = parse_int32(key, val);
    else if (key == "offset_groups") d.offset_groups = parse_int32(key, val);
    else if (key == "mask") d.mask = parse_bool(key, val);
    else if (key == "softmax") d.softmax = parse_bool(key, val);
    else if (key == "remove_center") d.remove_center = parse_bool(key, val);
    else if (key == "offset_scale") {
      std::string v(val);
      char* end = nullptr;
      d.offset_scale = std::strtod(v.c_str(), &end);
      if (v.empty() || *end != '\0')
        throw DescError("offset_scale", fmt::format("offset_scale={} is not a number", val));
    } else if (key == "dtype") d.dtype = parse_enum<DType>(key, val);
    else if (key == "math") d.math = parse_enum<MathMode>(key, val);
    else if (key == "layout") d.layout = parse_enum<Layout>(key, val);
    else if (key == "pass") d.pass = parse_enum<Pass>(key, val);
    else if (key == "bias") d.bias = parse_bool(key, val);
    else if (key == "act") d.act = parse_enum<Activation>(key, val);
    else
      throw DescError(std::string(key), fmt::format("unknown field '{}'", key));
  }
  if (d.op != OpKind::deform_aggregate) {
    for (auto f : {"softmax", "offset_scale", "remove_center"})
      if (seen.count(f))
        throw DescError(f, fmt::format("{} applies only to deform_aggregate", f));
  }
  validate(d);
  return d;
}

void validate(const LayerDesc& d) {
  auto positive = [](const char* f, int64_t v) {
    if (v < 1) throw DescError(f, fmt::format("{}={} must be at least 1", f, v));
  };
  auto non_negative = [](const char* f, int64_t v) {
    if (v < 0) throw DescError(f, fmt::format("{}={} must not be negative", f, v));
  };
  positive("n", d.n);
  positive("c", d.c);
  positive("h", d.h);
  positive("w", d.w);
  positive("k", d.k);
  positive("r", d.r);
  positive("s", d.s);
  positive("stride", d.stride_h);
  positive("stride", d.stride_w);
  non_negative("pad", d.pad_h);
  non_negative("pad", d.pad_w);
  positive("dilation", d.dil_h);
  positive("dilation", d.dil_w);
  positive("groups", d.groups);
  positive("offset_groups", d.offset_groups);
  // Keep every tensor's element count and every index product within int64 comfortably,
  // and per-dimension sizes within what a launch grid can cover.
  constexpr int64_t kMaxDim = int64_t{1} << 24;
  for (auto [f, v] : {std::pair<const char*, int64_t>{"n", d.n}, {"c", d.c}, {"h", d.h},
                      {"w", d.w}, {"k", d.k}})
    if (v > kMaxDim) throw DescError(f, fmt::format("{}={} exceeds the limit {}", f, v, kMaxDim));
  if (d.r > 31 || d.s > 31)
    throw DescError(d.r > 31 ? "r" : "s", fmt::format("kernel {}x{} exceeds 31x31", d.r, d.s));
  if (d.c % d.groups != 0)
    throw DescError("groups", fmt::format("groups={} does not divide c={}", d.groups, d.c));
  if (d.k % d.groups != 0)
    throw DescError("groups", fmt::format("groups={} does not divide k={}", d.groups, d.k));
  if (d.c % d.offset_groups != 0)
    throw DescError("offset_groups", fmt::format("offset_groups={} does not divide c={}",
                                                 d.offset_groups, d.c));
  if (d.out_h() < 1)
    throw DescError("h", fmt::format("output height would be {}: h={} with r={} pad={} "
                                     "dilation={} stride={} leaves no output row",
                                     d.out_h(), d.h, d.r, d.pad_h, d.dil_h, d.stride_h));
  if (d.out_w() < 1)
    throw DescError("w", fmt::format("output width would be {}: w={} with s={} pad={} "
                                     "dilation={} stride={} leaves no output column",
                                     d.out_w(), d.w, d.s, d.pad_w, d.dil_w, d.stride_w));
  if (d.math == MathMode::tf32 && d.dtype != DType::f32)
    throw DescError("math", fmt::format("math=tf32 applies only to dtype=f32, not dtype={}",
                                        to_string(d.dtype)));
  const int64_t total = d.n * d.c * d.h * d.w;
  if (total > (int64_t{1} << 40))
    throw DescError("n", fmt::format("input of {} elements exceeds 2^40", total));
  switch (d.op) {
    case OpKind::deform_conv2d:
      break;
    case OpKind::deform_aggregate:
      if (d.layout != Layout::nhwc)
        throw DescError("layout", "deform_aggregate is channels-last: layout must be nhwc");
      if (d.k != d.c)
        throw DescError("k", fmt::format("deform_aggregate keeps channels: k={} must equal c={}",
                                         d.k, d.c));
      if (d.offset_groups != d.groups)
        throw DescError("offset_groups",
                        fmt::format("deform_aggregate: offset_groups={} must equal groups={}",
                                    d.offset_groups, d.groups));
      if (d.remove_center && (d.r % 2 == 0 || d.s % 2 == 0))
        throw DescError("remove_center",
                        fmt::format("remove_center needs an odd kernel, not {}x{}", d.r, d.s));
      if (!std::isfinite(d.offset_scale))
        throw DescError("offset_scale", "offset_scale must be finite");
      break;
    case OpKind::masked_conv2d:
      if (d.offset_groups != 1)
        throw DescError("offset_groups", "masked_conv2d has no offsets: offset_groups must be 1");
      break;
  }
}

void require_implemented(const LayerDesc& d) {
  if (d.op != OpKind::deform_conv2d)
    throw NotImplemented(fmt::format("not implemented: no kernel for op {} yet", to_string(d.op)));
  if (d.pass != Pass::forward && d.act != Activation::none)
    throw NotImplemented(fmt::format(
        "not implemented: pass={} with a fused activation (act={}); apply the activation "
        "outside deft for training", to_string(d.pass), to_string(d.act)));
}

}  // namespace deft
