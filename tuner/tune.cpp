// deft::tune: compile the search space in parallel, check every candidate against the default
// variant's output on random inputs, time the survivors with CUDA events (L2 flushed between
// runs), keep every timing in a tuning record.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <future>
#include <random>
#include <thread>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "deft/deft.hpp"
#include "deft/tuning.hpp"
#include "runtime/database.hpp"
#include "runtime/driver.hpp"
#include "tuner/select.hpp"

namespace deft {

namespace {

// Round-to-nearest-even float -> half / bfloat16 bit patterns (finite inputs).
uint16_t to_half_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const int exp = int((x >> 23) & 0xff) - 127 + 15;
  uint32_t mant = x & 0x7fffffu;
  if (exp >= 31) return uint16_t(sign | 0x7c00u);
  if (exp <= 0) {  // subnormal or zero
    if (exp < -10) return uint16_t(sign);
    mant |= 0x800000u;
    const int shift = 14 - exp;
    uint32_t h = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1))) ++h;
    return uint16_t(sign | h);
  }
  uint32_t h = (uint32_t(exp) << 10) | (mant >> 13);
  const uint32_t rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) ++h;
  return uint16_t(sign | h);
}

uint16_t to_bf16_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  x += 0x7fffu + ((x >> 16) & 1);
  return uint16_t(x >> 16);
}

float from_half_bits(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  int exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ffu, x;
  if (exp == 31) {
    x = sign | 0x7f800000u | (mant << 13);
  } else if (exp == 0) {
    if (mant == 0) {
      x = sign;
    } else {
      exp = 1;
      while (!(mant & 0x400u)) mant <<= 1, --exp;
      x = sign | (uint32_t(exp - 15 + 127) << 23) | ((mant & 0x3ffu) << 13);
    }
  } else {
    x = sign | (uint32_t(exp - 15 + 127) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

// A device buffer holding `count` elements of `dtype`.
struct DeviceBuffer {
  CUdeviceptr ptr = 0;
  size_t bytes = 0;
  DeviceBuffer(size_t count, DType dtype) : bytes(count * dtype_size(dtype)) {
    if (bytes) driver::check(driver::api().mem_alloc(&ptr, bytes), "cuMemAlloc (tuner)");
  }
  ~DeviceBuffer() {
    if (ptr) driver::api().mem_free(ptr);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void* get() const { return reinterpret_cast<void*>(ptr); }
};

size_t elements(const std::vector<int64_t>& shape) {
  size_t n = 1;
  for (int64_t s : shape) n *= size_t(s);
  return shape.empty() ? 0 : n;
}

void upload(const DeviceBuffer& b, const std::vector<double>& v, DType dtype) {
  std::vector<unsigned char> host(b.bytes);
  for (size_t i = 0; i < v.size(); ++i) {
    switch (dtype) {
      case DType::f32: { float f = float(v[i]); std::memcpy(&host[i * 4], &f, 4); break; }
      case DType::f64: std::memcpy(&host[i * 8], &v[i], 8); break;
      case DType::f16: { uint16_t h = to_half_bits(float(v[i])); std::memcpy(&host[i * 2], &h, 2); break; }
      case DType::bf16: { uint16_t h = to_bf16_bits(float(v[i])); std::memcpy(&host[i * 2], &h, 2); break; }
    }
  }
  driver::check(driver::api().memcpy_htod(b.ptr, host.data(), b.bytes), "cuMemcpyHtoD (tuner)");
}

std::vector<double> download(const DeviceBuffer& b, DType dtype) {
  std::vector<unsigned char> host(b.bytes);
  driver::check(driver::api().memcpy_dtoh(host.data(), b.ptr, b.bytes), "cuMemcpyDtoH (tuner)");
  const size_t n = b.bytes / dtype_size(dtype);
  std::vector<double> v(n);
  for (size_t i = 0; i < n; ++i) {
    switch (dtype) {
      case DType::f32: { float f; std::memcpy(&f, &host[i * 4], 4); v[i] = f; break; }
      case DType::f64: std::memcpy(&v[i], &host[i * 8], 8); break;
      case DType::f16: { uint16_t h; std::memcpy(&h, &host[i * 2], 2); v[i] = from_half_bits(h); break; }
      case DType::bf16: {
        uint16_t h; std::memcpy(&h, &host[i * 2], 2);
        uint32_t x = uint32_t(h) << 16; float f; std::memcpy(&f, &x, 4); v[i] = f; break;
      }
    }
  }
  return v;
}

// Appends b's elements (none for an empty buffer) to out.
void download_into(std::vector<double>& out, const DeviceBuffer& b, DType dtype) {
  if (!b.bytes) return;
  const std::vector<double> v = download(b, dtype);
  out.insert(out.end(), v.begin(), v.end());
}

// ||a - ref|| / ||ref||; +inf if anything is not finite.
double relative_error(const std::vector<double>& a, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    num += (a[i] - ref[i]) * (a[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

// Candidates must reproduce the default variant's output this closely (different summation
// orders and tile products, same arithmetic).
double tolerance(const LayerDesc& d) {
  switch (d.dtype) {
    case DType::f64: return 1e-10;
    case DType::f32: return d.math == MathMode::tf32 ? 5e-3 : 1e-5;
    default: return 1e-2;
  }
}

// Writes the tuning record of `result` (every candidate's timing) into the options' database.
void write_record(const LayerDesc& desc, const TuneResult& result, const TuneOptions& opt,
                  const tuner::DeviceKey& device) {
  if (!opt.write_record) return;
  const std::string path = resolve_cache_path(opt.cache_path);
  if (path.empty()) return;
  cache::TuningRecord rec = tuner::record_key(desc, result.stats_bucket, device, opt.window);
  rec.winner = to_string(result.winner);
  rec.winner_us = result.winner_us;
  rec.default_us = result.default_us;
  for (const TuneCandidate& c : result.candidates)
    rec.candidates.push_back({to_string(c.variant), c.median_us, c.error});
  database_for(path)->put_tuning_record(rec);
}

// The winner: the fastest candidate that ran (the default when nothing beat it).
void pick_winner(TuneResult& result) {
  const TuneCandidate& def = result.candidates.front();
  if (def.median_us < 0) throw Error("tune: the default variant failed: " + def.error);
  result.default_us = def.median_us;
  result.winner = def.variant;
  result.winner_us = def.median_us;
  for (const TuneCandidate& c : result.candidates)
    if (c.median_us >= 0 && c.median_us < result.winner_us)
      result.winner = c.variant, result.winner_us = c.median_us;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

CandidateBudget::CandidateBudget(double layer_seconds, double max_seconds_per_candidate,
                                 size_t candidates)
    : layer_seconds_(layer_seconds), timing_seconds_(max_seconds_per_candidate) {
  if (layer_seconds_ > 0 && candidates > 0)
    timing_seconds_ = std::min(timing_seconds_, layer_seconds_ / double(candidates));
  timing_seconds_ = std::max(timing_seconds_, kMinCandidateSeconds);
}

bool timing_settled(std::vector<double> times, double best_us) {
  if (times.size() < kMinTimedRuns) return false;
  if (best_us > 0 && *std::min_element(times.begin(), times.end()) >= kCannotWin * best_us)
    return true;
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  const double all = median(times);
  const double early = median(std::vector<double>(times.begin(), times.begin() + times.size() * 2 / 3));
  return std::fabs(all - early) <= kSettled * all;
}

bool CandidateBudget::may_start(size_t already_tried, double elapsed_seconds) const {
  return already_tried == 0 || layer_seconds_ <= 0 || elapsed_seconds < layer_seconds_;
}

double layer_share(double budget_left, size_t layers_left) {
  return std::max(budget_left / double(std::max<size_t>(layers_left, 1)),
                  2 * kMinCandidateSeconds);
}

TuneResult tune(const LayerDesc& desc, const TuneOptions& opt) { return tune(desc, opt, {}); }

namespace {

// Every pass is tuned; the description's pass says which kernel.
void require_tunable(const LayerDesc& desc) {
  validate(desc);
  require_implemented(desc);
}

}  // namespace

TuneResult tune(const LayerDesc& desc, const TuneOptions& opt, const TuneLimits& limits) {
  const auto started = std::chrono::steady_clock::now();
  require_tunable(desc);
  const CUdevice dev = driver::ensure_context();
  const driver::DeviceInfo dinfo = driver::device_info(dev);
  const driver::Api& api = driver::api();

  TuneResult result;
  result.desc = to_string(desc);
  result.stats_bucket = stats_bucket(opt.offset_sigma);
  result.device = dinfo.fingerprint();
  result.arch = dinfo.arch();
  std::vector<Variant> space =
      search_space(desc, SearchOptions{result.arch, opt.window, opt.offset_sigma});
  if (opt.max_candidates > 0 && int(space.size()) > opt.max_candidates)
    space.resize(opt.max_candidates);

  // Candidates are compiled in parallel batches just before they are timed, so that a budget
  // that runs out spares the compiles of the candidates it never reaches. A backward
  // candidate is the forward kernel's (its default) backward_data or backward_weight variant:
  // it runs through Kernel::backward with only that pass's gradients requested (grad input,
  // offset and mask; or grad weight), its pre-passes included.
  const bool data = desc.pass == Pass::backward_data;
  const bool wgrad = desc.pass == Pass::backward_weight;
  LayerDesc fwd = desc;
  fwd.pass = Pass::forward;
  CompileOptions copt;
  copt.cache_path = opt.cache_path;
  const unsigned workers = std::max(1u, std::min(8u, std::thread::hardware_concurrency()));
  std::vector<Kernel> kernels(space.size());
  std::vector<std::string> errors(space.size());
  auto compile_batch = [&](size_t first) {
    std::vector<std::future<void>> batch;
    for (size_t i = first; i < std::min(space.size(), first + workers); ++i)
      batch.push_back(std::async(std::launch::async, [&, i] {
        try {
          CompileOptions o = copt;
          if (data || wgrad) {
            (data ? o.backward_data_variant : o.backward_weight_variant) = space[i];
            kernels[i] = compile(fwd, o);
            kernels[i].prepare_backward(0);
          } else {
            o.variant = space[i];
            kernels[i] = compile(desc, o);
          }
        } catch (const std::exception& e) {
          errors[i] = e.what();
        }
      }));
    for (auto& f : batch) f.wait();
  };
  compile_batch(0);
  if (!kernels[0].valid())
    throw Error(fmt::format("tune: the default variant failed to compile: {}", errors[0]));
  const CandidateBudget budget(limits.layer_seconds, opt.seconds_per_candidate, space.size());

  // Random inputs (never zeros): input, weight ~ U(-1, 1) (weight scaled by 1/sqrt(fan in)),
  // offsets ~ N(0, sigma^2) px, mask ~ U(0, 1), bias ~ U(-0.5, 0.5).
  const TensorShapes shapes = tensor_shapes(desc);
  std::mt19937_64 rng(opt.seed);
  std::uniform_real_distribution<double> uni(-1, 1), unit(0, 1);
  std::normal_distribution<double> normal(0, opt.offset_sigma);
  auto random = [&](const std::vector<int64_t>& shape, auto& dist, double scale) {
    std::vector<double> v(elements(shape));
    for (double& x : v) x = dist(rng) * scale;
    return v;
  };
  const double fan_in = double(desc.c_per_group() * desc.taps());
  DeviceBuffer input(elements(shapes.input), desc.dtype), offset(elements(shapes.offset), desc.dtype),
      mask(elements(shapes.mask), desc.dtype), weight(elements(shapes.weight), desc.dtype),
      bias(elements(shapes.bias), desc.dtype), output(elements(shapes.output), desc.dtype);
  upload(input, random(shapes.input, uni, 1.0), desc.dtype);
  upload(offset, random(shapes.offset, normal, 1.0), desc.dtype);
  if (desc.mask) upload(mask, random(shapes.mask, unit, 1.0), desc.dtype);
  upload(weight, random(shapes.weight, uni, 1.0 / std::sqrt(fan_in)), desc.dtype);
  if (desc.bias) upload(bias, random(shapes.bias, uni, 0.5), desc.dtype);
  ForwardArgs args;
  args.input = input.get();
  args.offset = offset.get();
  args.mask = desc.mask ? mask.get() : nullptr;
  args.weight = weight.get();
  args.bias = desc.bias ? bias.get() : nullptr;
  args.output = output.get();
  // backward passes: grad_output ~ U(-1, 1) in; out, grad input, offset and mask
  // (backward_data) or grad weight (backward_weight)
  const size_t n_in = data ? elements(shapes.input) : 0, n_off = data ? elements(shapes.offset) : 0,
               n_mask = data && desc.mask ? elements(shapes.mask) : 0,
               n_w = wgrad ? elements(shapes.weight) : 0;
  DeviceBuffer gout(data || wgrad ? elements(shapes.output) : 0, desc.dtype), gin(n_in, desc.dtype),
      goff(n_off, desc.dtype), gmask(n_mask, desc.dtype), gw(n_w, desc.dtype);
  if (data || wgrad) upload(gout, random(shapes.output, uni, 1.0), desc.dtype);
  BackwardArgs bargs;
  bargs.input = args.input, bargs.offset = args.offset, bargs.mask = args.mask;
  bargs.weight = args.weight, bargs.grad_output = gout.get();
  bargs.grad_input = n_in ? gin.get() : nullptr, bargs.grad_offset = n_off ? goff.get() : nullptr;
  bargs.grad_mask = n_mask ? gmask.get() : nullptr;
  bargs.grad_weight = n_w ? gw.get() : nullptr;
  const std::vector<const DeviceBuffer*> outs =
      data ? std::vector<const DeviceBuffer*>{&gin, &goff, &gmask}
           : wgrad ? std::vector<const DeviceBuffer*>{&gw} : std::vector<const DeviceBuffer*>{&output};
  auto run = [&](size_t i) {
    if (data || wgrad) kernels[i].backward(bargs, nullptr, 0);
    else kernels[i].forward(args, nullptr);
  };
  // the outputs poisoned (NaN in every float format) before the checked run, then read back
  auto poison = [&] {
    for (const DeviceBuffer* b : outs)
      if (b->bytes) driver::check(api.memset_d8(b->ptr, 0xff, b->bytes), "cuMemsetD8");
  };
  auto fetch = [&] {
    std::vector<double> out;
    for (const DeviceBuffer* b : outs) download_into(out, *b, desc.dtype);
    return out;
  };

  // L2 flush between timed runs: write a buffer larger than any L2 (outside the events).
  DeviceBuffer flush(size_t(256) << 20, DType::f32);
  auto flush_l2 = [&] { driver::check(api.memset_d8(flush.ptr, 0, flush.bytes), "cuMemsetD8"); };
  CUevent start, stop;
  driver::check(api.event_create(&start, 0), "cuEventCreate");
  driver::check(api.event_create(&stop, 0), "cuEventCreate");

  std::vector<double> reference;
  double best_us = 0;  // the best median so far (0: none yet)
  for (size_t i = 0; i < space.size(); ++i) {
    if (!budget.may_start(i, seconds_since(started))) {
      spdlog::info("tune {}: the layer's budget of {:.2f} s is used after {} of {} candidates",
                   result.desc, limits.layer_seconds, i, space.size());
      break;
    }
    if (i > 0 && i % workers == 0) compile_batch(i);
    TuneCandidate c;
    c.variant = space[i];
    c.error = errors[i];
    if (!kernels[i].valid()) {
      result.candidates.push_back(c);
      continue;
    }
    try {
      // Correctness: poisoned outputs, one run, compare.
      poison();
      run(i);
      driver::check(api.ctx_sync(), "kernel run");
      std::vector<double> out = fetch();
      if (i == 0) reference = out;
      c.rel_err = relative_error(out, reference);
      if (!(c.rel_err <= tolerance(desc))) {
        c.error = fmt::format("output differs from the default variant's (relative error {:.3g})",
                              c.rel_err);
        result.candidates.push_back(c);
        continue;
      }
      // Timing: 3 warm-up runs, then runs until the budget, 100 runs, or the point where more
      // runs cannot change the answer (timing_settled); median.
      for (int w = 0; w < 3; ++w) run(i);
      std::vector<double> times;
      const auto t0 = std::chrono::steady_clock::now();
      while (times.size() < 100) {
        flush_l2();
        driver::check(api.event_record(start, nullptr), "cuEventRecord");
        run(i);
        driver::check(api.event_record(stop, nullptr), "cuEventRecord");
        driver::check(api.event_sync(stop), "cuEventSynchronize");
        float ms = 0;
        driver::check(api.event_elapsed(&ms, start, stop), "cuEventElapsedTime");
        times.push_back(ms * 1000.0);
        const double spent =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        if (times.size() >= kMinTimedRuns && spent > budget.timing_seconds()) break;
        if (timing_settled(times, best_us)) break;
      }
      std::sort(times.begin(), times.end());
      c.median_us = times[times.size() / 2];
      c.timed_runs = int(times.size());
      if (best_us <= 0 || c.median_us < best_us) best_us = c.median_us;
    } catch (const std::exception& e) {
      c.error = e.what();
      c.median_us = -1;
      // A fault (illegal address, ...) leaves the context unusable: every later candidate
      // would fail for this one's sake. Name the culprit instead of recording noise.
      if (api.ctx_sync() != CUDA_SUCCESS)
        throw Error(fmt::format("tune: variant '{}' broke the CUDA context ({}); no record "
                                "written. Please report it with the layer description.",
                                to_string(c.variant), c.error));
    }
    spdlog::info("tune {}: {} -> {}", result.desc, to_string(c.variant),
                 c.median_us >= 0 ? fmt::format("{:.1f} us", c.median_us) : c.error);
    result.candidates.push_back(c);
  }
  api.event_destroy(start);
  api.event_destroy(stop);

  pick_winner(result);
  write_record(desc, result, opt,
               tuner::DeviceKey{dinfo.fingerprint(), std::to_string(dinfo.driver_version),
                                result.arch});
  return result;
}

TuneResult simulate_tune(const LayerDesc& desc, const TuneOptions& opt, const TuneLimits& limits) {
  require_tunable(desc);
  TuneResult result;
  result.desc = to_string(desc);
  result.stats_bucket = stats_bucket(opt.offset_sigma);
  result.device = "simulated|cc0.0|sm0";
  std::vector<Variant> space = search_space(desc, SearchOptions{0, opt.window, opt.offset_sigma});
  if (opt.max_candidates > 0 && int(space.size()) > opt.max_candidates)
    space.resize(opt.max_candidates);
  const CandidateBudget budget(limits.layer_seconds, opt.seconds_per_candidate, space.size());
  double elapsed = 0;  // simulated: each candidate costs its timing window
  for (size_t i = 0; i < space.size() && budget.may_start(i, elapsed); ++i) {
    TuneCandidate c;
    c.variant = space[i];
    // 100 us for the default, 50..150 us for the others, from a hash of the variant text.
    const std::string h = cache::sha256_hex(to_string(c.variant) + "|" + result.desc);
    c.median_us = i == 0 ? 100.0 : 50.0 + double(std::stoul(h.substr(0, 4), nullptr, 16) % 1000) / 10;
    c.rel_err = 0;
    result.candidates.push_back(c);
    elapsed += budget.timing_seconds();
  }
  pick_winner(result);
  write_record(desc, result, opt, tuner::DeviceKey{result.device, "0"});
  return result;
}

}  // namespace deft
