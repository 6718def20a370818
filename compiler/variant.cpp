// Variant: text form, validation against a layer, and the heuristic default.
#include <charconv>
#include <set>

#include <fmt/format.h>

#include "compiler/plan.hpp"
#include "deft/ir.hpp"

namespace deft {

std::string_view to_string(Algo a) {
  switch (a) {
    case Algo::gemm_simt: return "gemm_simt";
    case Algo::gemm_tc: return "gemm_tc";
    case Algo::depthwise: return "depthwise";
    case Algo::gemm_wgmma: return "gemm_wgmma";
  }
  return "?";
}

std::string_view to_string(Staging s) {
  return s == Staging::gather ? "gather" : "window";
}

std::string to_string(const Variant& v) {
  return fmt::format("algo={} tm={} tn={} tk={} threads={} vec={} staging={} halo={} transpose={}{}{}{}{}{}{}",
                     to_string(v.algo), v.tile_m, v.tile_n, v.tile_k, v.threads, v.vec,
                     to_string(v.staging), v.halo, v.transpose ? 1 : 0,
                     v.deterministic ? " det=1" : "", v.gin_gather ? " gin=gather" : v.gin_local ? " gin=local" : "",
                     v.fuse_gw ? " gw=fused" : "",
                     v.stages ? fmt::format(" stages={}", v.stages) : std::string(),
                     v.producers ? fmt::format(" producers={}", v.producers) : std::string(),
                     v.batch ? fmt::format(" batch={}", v.batch) : std::string());
}

Variant parse_variant(std::string_view text) {
  Variant v;
  std::set<std::string> seen;
  size_t i = 0;
  while (i < text.size()) {
    while (i < text.size() && text[i] == ' ') ++i;
    size_t j = i;
    while (j < text.size() && text[j] != ' ') ++j;
    if (j == i) break;
    std::string_view word = text.substr(i, j - i);
    i = j;
    auto eq = word.find('=');
    if (eq == std::string_view::npos)
      throw DescError(std::string(word), fmt::format("'{}' is not of the form field=value", word));
    std::string key(word.substr(0, eq));
    std::string_view val = word.substr(eq + 1);
    if (!seen.insert(key).second) throw DescError(key, fmt::format("{} is given twice", key));
    auto as_int = [&](int& out) {
      auto [p, ec] = std::from_chars(val.data(), val.data() + val.size(), out);
      if (ec != std::errc() || p != val.data() + val.size())
        throw DescError(key, fmt::format("{}={} is not an integer", key, val));
    };
    if (key == "algo") {
      if (val == "gemm_simt") v.algo = Algo::gemm_simt;
      else if (val == "gemm_tc") v.algo = Algo::gemm_tc;
      else if (val == "depthwise") v.algo = Algo::depthwise;
      else if (val == "gemm_wgmma") v.algo = Algo::gemm_wgmma;
      else throw DescError(key, fmt::format("algo={} is not one of gemm_simt|gemm_tc|depthwise|gemm_wgmma", val));
    } else if (key == "staging") {
      if (val == "gather") v.staging = Staging::gather;
      else if (val == "window") v.staging = Staging::window;
      else throw DescError(key, fmt::format("staging={} is not one of gather|window", val));
    } else if (key == "tm") as_int(v.tile_m);
    else if (key == "tn") as_int(v.tile_n);
    else if (key == "tk") as_int(v.tile_k);
    else if (key == "threads") as_int(v.threads);
    else if (key == "vec") as_int(v.vec);
    else if (key == "halo") as_int(v.halo);
    else if (key == "stages") as_int(v.stages);
    else if (key == "producers") as_int(v.producers);
    else if (key == "batch") as_int(v.batch);
    else if (key == "transpose") {
      if (val == "1") v.transpose = true;
      else if (val == "0") v.transpose = false;
      else throw DescError(key, fmt::format("transpose={} is not 0 or 1", val));
    }
    else if (key == "det") {
      if (val == "1") v.deterministic = true;
      else if (val == "0") v.deterministic = false;
      else throw DescError(key, fmt::format("det={} is not 0 or 1", val));
    }
    else if (key == "gin") {
      if (val == "gather") v.gin_gather = true, v.gin_local = false;
      else if (val == "local") v.gin_local = true, v.gin_gather = false;
      else if (val == "atomic") v.gin_gather = v.gin_local = false;
      else throw DescError(key, fmt::format("gin={} is not gather, local or atomic", val));
    }
    else if (key == "gw") {
      if (val == "fused") v.fuse_gw = true;
      else if (val == "separate") v.fuse_gw = false;
      else throw DescError(key, fmt::format("gw={} is not fused or separate", val));
    }
    else throw DescError(key, fmt::format("unknown variant field '{}'", key));
  }
  return v;
}

void validate(const LayerDesc& d, const Variant& v) { (void)make_plan(d, v); }

namespace {

// The depthwise kernels' channel layout (deform_conv_depthwise.cuh, deform_conv_bwd_weight_dw.cuh):
// 16-byte channel vectors where the channels allow them, 8 threads per pixel — nchw layers then
// read the transpose pre-pass's copy (the vector kernel beats plane gathers by ~2.5x,
// docs/perf-notes.md round 2), and the grad-weight kernel a channels-last copy of grad_out too
// (round B18); else single channels in nhwc (a power-of-two tile of up to 32, so the threads
// divide evenly) or four planes in nchw.
void depthwise_channels(const LayerDesc& d, Variant& v) {
  v.algo = Algo::depthwise;
  v.threads = 256;
  const int vec = 16 / dtype_size(d.dtype);
  const bool nhwc = d.layout == Layout::nhwc;
  if (d.c % vec == 0 && d.c_per_offset_group() % vec == 0 &&
      (nhwc || (d.n <= 65535 && d.k <= 65535))) {
    v.transpose = !nhwc;
    v.vec = vec;
    v.tile_n = int(std::min<int64_t>(8 * vec, d.c));
    while (v.tile_n % vec != 0 || 256 % (v.tile_n / vec) != 0) v.tile_n -= vec;
  } else {
    v.vec = nhwc ? 1 : 4;
    v.tile_n = v.vec;
    while (nhwc && v.tile_n * 2 <= std::min<int64_t>(32, d.c)) v.tile_n *= 2;
  }
  v.tile_m = v.threads * v.vec / v.tile_n;
}

// True where the plan accepts v for d (a DescError or NotImplemented says it cannot run it).
bool runs(const LayerDesc& d, const Variant& v) {
  try {
    validate(d, v);
    return true;
  } catch (const Error&) {
    return false;
  }
}

}  // namespace

Variant default_variant(const LayerDesc& d) {
  Variant v;
  // nchw: read a channels-last copy (and accumulate grad input channels-last): the gathers
  // and the grad-input atomics of neighbouring lanes then touch neighbouring channels.
  const bool bwd_transpose = d.layout == Layout::nchw && d.n <= 65535 && d.k <= 65535;
  if (d.pass == Pass::backward_data && d.c_per_group() == 1 && d.k_per_group() == 1) {
    v.algo = Algo::depthwise;
    v.threads = 256;
    // nhwc: a warp per pixel on neighbouring channels; nchw: 32 pixels along the lanes
    v.transpose = bwd_transpose;
    v.tile_m = d.layout == Layout::nhwc || v.transpose ? 8 : 32;
    v.tile_n = 1;
    v.tile_k = 1;
    return v;
  }
  // Tensor cores for the backward GEMMs where the dtype has them and the groups leave
  // 16-channel steps (and, for grad weight, 16 output channels per group).
  const bool tc_dtype = d.dtype == DType::f16 || d.dtype == DType::bf16 ||
                        (d.dtype == DType::f32 && d.math == MathMode::tf32);
  int64_t common = d.c_per_group();
  for (int64_t b = d.c_per_offset_group(); b;) {
    const int64_t r = common % b;
    common = b;
    b = r;
  }
  const bool tc16 = tc_dtype && common % 16 == 0;
  if (d.pass == Pass::backward_data) {
    v.algo = tc16 ? Algo::gemm_tc : Algo::gemm_simt;
    // output pixels per block: 32 where a 64-pixel f32 grad_out tile would not leave room
    // for two blocks per SM (deform_conv_bwd_data_tc.cuh keeps it in shared memory)
    v.tile_m = tc16 && d.dtype == DType::f32 && d.k_per_group() * 64 * 4 > 64 * 1024 ? 32 : 64;
    v.tile_n = tc16 && common % 64 == 0 ? 64 : 32;  // input channels per step
    v.tile_k = tc16 ? 32 : 16;   // output channels per reduction slice
    v.threads = 256;
    v.transpose = bwd_transpose;
    // f32 on the FMA kernel: 64-channel steps and 32-channel slices, from the sweep of
    // docs/perf-notes.md round B15 (H200, strict fp32, nchw, grad-input pass): dense512 6.39
    // against 11.12 ms for 32 x 16, resnet_res4 0.704 / 1.281, stride2 1.331 / 1.614; the
    // same tile won in deterministic mode on all five cases.
    if (!tc16 && d.dtype == DType::f32 && common % 64 == 0) {
      Variant wide = v;
      wide.tile_n = 64, wide.tile_k = 32;
      if (runs(d, wide)) return wide;
    }
    return v;
  }
  if (d.pass == Pass::backward_weight && d.c_per_group() == 1 && d.k_per_group() == 1) {
    // Depthwise: the depthwise forward's layout (templates/deform_conv_bwd_weight_dw.cuh).
    // 16-byte channel vectors, 8 threads per pixel (nchw: of the transposed input and a
    // channels-last copy of grad_out).
    depthwise_channels(d, v);
    // pixel steps per thread: up to 16, fewer until there are 512 blocks to spread
    const int64_t m_total = d.n * d.out_h() * d.out_w();
    const int tb = dw_weight_taps_per_block(d, v.vec);
    const int64_t per_split = (d.c + v.tile_n - 1) / v.tile_n * ((d.taps() + tb - 1) / tb);
    const int64_t pix = v.tile_m;
    v.tile_k = 16;
    while (v.tile_k > 1 && per_split * ((m_total + pix * v.tile_k - 1) / (pix * v.tile_k)) < 512)
      v.tile_k /= 2;
    // and enough pixels per range for the plan's limits on the partial sums (it says which)
    for (; v.tile_k < 256; v.tile_k *= 2) {
      try {
        validate(d, v);
        break;
      } catch (const DescError& e) {
        if (e.field() != "tk") break;
      }
    }
    return v;
  }
  if (d.pass == Pass::backward_weight) {
    const bool tc = tc16 && d.k_per_group() >= 16;
    v.algo = tc ? Algo::gemm_tc : Algo::gemm_simt;
    // From scripts/sweep_bwd.py (H100, fp16; docs/perf-notes.md round B5): 64 x 64 tiles with
    // 128-pixel slices for k/groups up to 256, 128 x 64 above.
    v.tile_m = tc && d.k_per_group() >= 512 ? 128 : 64;  // output channels per block
    v.tile_n = tc && common % 64 == 0 ? 64 : 32;  // input channels per block
    v.threads = 256;
    // Only with channel runs to gather: a depthwise block owns one channel, whose nhwc
    // elements lie c apart (measured: dw512 grad weight 1.55 -> 2.42 ms when transposed).
    v.transpose = bwd_transpose && common >= 8;
    // Pixels per reduction slice. The vector kernel (deform_conv_bwd_weight_tc.cuh, channels-
    // last input with 16-byte channel vectors) holds a slice's corner vectors in registers:
    // 64 pixels keep f16/bf16 at 128 registers (two blocks per SM), f32 needs 32. The scalar
    // kernels: 128 from the round-B5 sweep.
    const int va = 16 / dtype_size(d.dtype);
    const bool vec = tc && (d.layout == Layout::nhwc || v.transpose) && d.c % va == 0 &&
                     d.c_per_group() % va == 0;
    v.tile_k = !tc ? 32 : !vec ? 128 : d.dtype == DType::f32 ? 32 : 64;
    return v;
  }
  if (d.c_per_group() == 1 && d.k_per_group() == 1) {
    // Depthwise: one pixel x vec channels per thread; 16-byte vectors in nhwc.
    depthwise_channels(d, v);
    v.tile_k = 1;
    return v;
  }
  const bool tc = d.dtype == DType::f16 || d.dtype == DType::bf16 ||
                  (d.dtype == DType::f32 && d.math == MathMode::tf32);
  const int64_t kg = d.k_per_group();
  v.algo = tc ? Algo::gemm_tc : Algo::gemm_simt;
  v.tile_m = 64;
  v.tile_n = kg <= 16 ? 16 : (kg <= 32 ? 32 : (kg <= 64 || !tc ? 64 : 128));
  v.threads = 256;
  if (tc) {
    v.tile_k = 32;
    if (v.tile_n == 16) v.threads = 128;
  } else {
    v.tile_k = d.dtype == DType::f64 ? 8 : 16;
    // every thread loads at least one B element per slice
    v.tile_k = std::max(v.tile_k, v.threads / v.tile_n);
    // f32 groups of 128 output channels or more: 128 x 128 tiles, 8 x 8 per thread (16 FMAs
    // per 16-byte shared-memory read), from the sweep of docs/perf-notes.md round 15 (H200,
    // strict fp32): dense512 2.55 against 3.78 ms for 64 x 64, resnet_res4 0.330 against
    // 0.361; with 64 output channels (deft_64) 64 x 64 stays (0.133 against 0.187).
    if (d.dtype == DType::f32 && kg >= 128) v.tile_m = 128, v.tile_n = 128, v.tile_k = 16;
  }
  // nchw: gathering channel vectors from a transposed copy beats scalar gathers from planes
  // when whole 16-byte vectors fit the groups (see docs/perf-notes.md).
  const int a_elems = v.tile_m * v.tile_k / v.threads;
  v.transpose = d.layout == Layout::nchw && (a_elems * dtype_size(d.dtype)) % 16 == 0 &&
                d.c_per_group() % a_elems == 0 && d.c_per_offset_group() % a_elems == 0 &&
                d.n <= 65535 && d.k <= 65535;
  return v;
}

bool variant_needs_sm90a(const Variant& v) { return v.algo == Algo::gemm_wgmma; }

static Variant arch_default_variant(const LayerDesc& d, int arch, bool deterministic) {
  Variant base = default_variant(d);
  // Grad input, f16 and bf16 (and tf32, below), on sm_90, fast mode: the wgmma kernel
  // (templates/deform_conv_bwd_data_wgmma.cuh) with 64 pixels, 64-channel steps, two
  // warpgroups and a 3-slice ring, where a group has more than 64 output channels. From the
  // sweep of docs/perf-notes.md round B12 (H200, fp16 nchw, grad-input pass): 0.708 against
  // the WMMA kernel's 1.123 ms on dense512, 0.128 / 0.182 resnet_res4, 0.186 / 0.236
  // maskrcnn_res4, 0.379 / 0.394 stride2; with 64 output channels (deft_64) the WMMA kernel
  // stays (0.160 against 0.171). Deterministic mode takes the same tile: its gather form
  // (docs/perf-notes.md round B16b; measured in session 12) beats the WMMA kernel's gather form
  // on every case of the sweep, fp16 dense512 0.898 against 1.382 ms, resnet_res4 0.205 / 0.267,
  // maskrcnn_res4 0.253 / 0.318, stride2 0.545 / 0.576; tf32 dense512 1.293 / 3.859.
  // f32 in tf32 math: the same kernel's tf32 form (32-channel slices), from its sweep
  // (docs/perf-notes.md round B14, H200, nchw, grad-input pass): four warpgroups for 512
  // output channels a group (dense512 0.99 ms against WMMA's 3.62), else two (resnet_res4
  // 0.164 against 0.421).
  const bool tf32 = d.dtype == DType::f32 && d.math == MathMode::tf32;
  // Grad input on the FMA kernel, f32, fast mode, sm_90: the vector epilogue (vec=4: 4
  // channels a thread, 16-byte corner loads, one red.global.add.v4.f32 per corner), where the
  // plan takes it (channels-last input and a grad-input workspace: nchw with its transpose).
  // From the same sweep (round B15): dense512 6.18 against 6.39 ms, deft_64 0.305 / 0.410,
  // stride2 1.093 / 1.331. Deterministic mode keeps vec=1 (its fixed-point atomics cost 1.3-2.9x
  // there with vec=4).
  if (arch == 90 && !deterministic && d.pass == Pass::backward_data &&
      base.algo == Algo::gemm_simt && d.dtype == DType::f32) {
    Variant v = base;
    v.vec = 4;
    return runs(d, v) ? v : base;
  }
  // Depthwise grad input, f32 (strict or tf32), fast mode, sm_90: the f32 gather (gin=gather)
  // instead of the float atomics. Perf notes round B35 (H200, fp32 nhwc, sigma = 2, grad-input
  // pass): 0.51-0.98x the atomics' time on dw512, dw256_56, dw512_64, dw512_14 and dw512_n1
  // (42 against 83 us), 1.06x on dw1024_16 and dw128_96 (the tuner's space has the atomics);
  // forward + backward dw512 nhwc 0.636 -> 0.573 ms.
  if (arch == 90 && !deterministic && d.pass == Pass::backward_data &&
      base.algo == Algo::depthwise && d.dtype == DType::f32 && d.c_per_offset_group() % 4 == 0) {
    Variant v = base;
    v.gin_gather = true;
    return runs(d, v) ? v : base;
  }
  // Depthwise grad input, f16 and bf16, fast mode, sm_90: the local gather (gin=local halo=2)
  // where its binning is shared by at least two 128-channel slices and its grid has at least
  // 128 blocks (8 x 8 input tiles x images x offset groups x groups of four slices). Measured
  // (BENCHMARKS.md "Session 23", H200, fp16 nhwc, grad-input pass, L2 flushed, sigma = 2):
  // 0.69-0.87x the float atomics' time on dw512, dw1024_16, dw256_56, dw512_64 and dw512_14;
  // the atomics stay for dw128_96 (one slice: the best radius 1.06x) and dw512_n1 (16 blocks:
  // 1.41x). Other spreads are the tuner's (at sigma = 8 larger radii or the atomics win).
  if (arch == 90 && !deterministic && d.pass == Pass::backward_data &&
      base.algo == Algo::depthwise && (d.dtype == DType::f16 || d.dtype == DType::bf16) &&
      d.c_per_offset_group() % 4 == 0) {
    const int64_t slices = (d.c_per_offset_group() + 127) / 128;
    const int64_t blocks = ((d.h + 7) / 8) * ((d.w + 7) / 8) * d.n * d.offset_groups * ((slices + 3) / 4);
    if (slices >= 2 && blocks >= 128) {
      Variant v = base;
      v.gin_local = true;
      v.halo = 2;
      return runs(d, v) ? v : base;
    }
  }
  if (arch == 90 && d.pass == Pass::backward_data &&
      base.algo == Algo::gemm_tc && (d.dtype == DType::f16 || d.dtype == DType::bf16 || tf32) &&
      d.k_per_group() > 64) {
    Variant v;
    v.algo = Algo::gemm_wgmma;
    v.tile_m = 64, v.tile_n = 64, v.tile_k = tf32 ? 32 : 64, v.stages = 3;
    v.threads = tf32 && d.k_per_group() >= 512 ? 512 : 256;
    v.transpose = d.layout == Layout::nchw;
    return runs(d, v) ? v : base;
  }
  // wgmma exists on sm_90 (Hopper) alone. Only for the layers the tensor-core GEMM would take
  // (f16, bf16, f32 in tf32 math), with whole chunks (32 channels, 16 for tf32) or at least 64
  // channels per group (less would leave most of each chunk's k slots zero).
  // Grad weight, f16 and bf16, on sm_90: the warp-specialised wgmma kernel
  // (templates/deform_conv_bwd_weight_wgmma.cuh) where 64-channel tiles fit the groups and
  // offset groups, from the sweep of docs/perf-notes.md round B10 (H200, fp16 nchw):
  // 256 x 128 with one producer warpgroup for 512 output channels a group, 256 x 64 with two
  // above 128; up to 128, 128 x 128 with two where 128 channels fit, else 128 x 64 with one.
  // Else (and where the plan refuses it) the WMMA kernel. f32 in tf32 math (32-pixel chunks,
  // docs/perf-notes.md round B20): tiles of its own, below, in both layouts (round B22 timed
  // nhwc: the same tiles win there, 2.6-3.3x faster than the WMMA kernel on four of five cases).
  if (arch == 90 && d.pass == Pass::backward_weight && base.algo == Algo::gemm_tc &&
      (d.dtype == DType::f16 || d.dtype == DType::bf16 || tf32)) {
    const int64_t kg = d.k_per_group(), cg = d.c_per_group(), cpog = d.c_per_offset_group();
    Variant v = base;
    v.algo = Algo::gemm_wgmma;
    v.tile_k = tf32 ? 32 : 64;
    v.transpose = d.layout == Layout::nchw;
    const bool fit128 = cg % 128 == 0 && cpog % 128 == 0;
    if (tf32) {
      // 256 x 64 with two producer warpgroups, except 128 x 128 with two where the f16 rule
      // takes it (up to 128 output channels, 128 channels fitting the groups), from the sweeps
      // of rounds B20 and B21 (H200, tf32 nchw, grad-weight pass): dense512 1.555-1.576 ms
      // (256 x 128 P1 1.588-1.626; WMMA 4.078), resnet_res4 0.184-0.192 (WMMA 0.559),
      // maskrcnn_res4 0.228 (256 x 128 P1 0.262), deft_64 0.164 (128 x 64 P1 0.186; WMMA
      // 0.213); stride2 (128 output channels) 128 x 128 P2 0.227 against 0.283. The register
      // rule's batch on all: batch=4 spills in tf32 and lost everywhere. On nhwc (round B22):
      // the best or within 2 % of it on all five (dense512 1.500 ms, best 1.476; resnet_res4
      // 0.178, maskrcnn_res4 0.214, stride2 0.200, deft_64 0.185; WMMA 3.941, 0.554, 0.698,
      // 0.560, 0.213).
      const bool wide = kg <= 128 && fit128;
      v.tile_m = wide ? 128 : 256, v.tile_n = wide ? 128 : 64, v.producers = 2;
    } else {
      v.tile_m = kg > 128 ? 256 : 128;
      v.tile_n = fit128 && (kg >= 512 || kg <= 128) ? 128 : 64;
      v.producers = kg >= 512 && fit128 ? 1 : kg <= 128 && !fit128 ? 1 : 2;
      // 256 x 128 with one producer warpgroup: batches of 4 items a producer lane (the
      // register rule gives 2 at 640 threads), from the sweep of docs/perf-notes.md round B21
      // (H200, fp16 nchw, grad-weight pass): dense512 0.714 against 0.760 ms (batch=8: 0.827).
      if (v.tile_m == 256 && v.tile_n == 128 && v.producers == 1) v.batch = 4;
    }
    v.threads = wgmma_threads(Pass::backward_weight, v.tile_m, v.tile_n, v.producers);
    return runs(d, v) ? v : base;
  }
  const int chunk = 64 / dtype_size(d.dtype);
  if (arch != 90 || d.pass != Pass::forward || base.algo != Algo::gemm_tc ||
      (d.c_per_group() % chunk != 0 && d.c_per_group() < 64))
    return base;
  // Register-A tiles from the wgmma sweep (scripts/sweep.py --family wgmma, H200, fp16, both
  // layouts; docs/perf-notes.md round 5): the output-channel tile as wide as the group's output
  // channels (64 to 256), 64 pixel rows (two blocks per SM) except with 64-wide tiles, where
  // 128 rows won. Smaller tiles when a layer cannot take these (validate refuses them).
  const int64_t kg = d.k_per_group();
  // Groups of more than 64 output channels: the warp-specialised kernel (producer warpgroups
  // sample A into shared memory), from its sweep (docs/perf-notes.md round 13, H200, fp16 and
  // tf32, both layouts): 64 rows; over 256 output channels a 512-wide tile (two consumers
  // share each sample: one gather per sample for k = 512) with one producer warpgroup, else
  // the group's width (128 or 256) with two. 64 or fewer: the register-A kernel below won.
  // A layer with few output pixels narrows the tile (down to 128, two producers) while its grid
  // has fewer than 64 blocks: the tuner's exhaustive runs (H200, fp16 nchw, session 20,
  // docs/perf-notes.md) had 128-wide tiles 1.11-1.50x faster than the group-wide ones on
  // ResNet-50's batch-8 stages 3 and 4 (25 and 7 row blocks: 44.6 -> 40.0 us, 101.3 -> 67.5),
  // while at 98 row blocks (resnet_res4) the 256-wide tile stays 1.48x ahead of 128.
  if (kg > 64) {
    Variant v;
    v.algo = Algo::gemm_wgmma;
    v.tile_m = 64, v.tile_k = chunk, v.vec = 1;
    v.tile_n = kg > 256 ? 512 : kg > 128 ? 256 : 128;
    const int64_t row_blocks = (d.n * d.out_h() * d.out_w() + 63) / 64;
    constexpr int64_t kFewBlocks = 64;
    while (v.tile_n > 128 && row_blocks * ((kg + v.tile_n - 1) / v.tile_n) * d.groups < kFewBlocks)
      v.tile_n /= 2;
    v.producers = v.tile_n == 512 ? 1 : 2;
    v.threads = wgmma_threads(Pass::forward, v.tile_m, v.tile_n, v.producers);
    v.transpose = d.layout == Layout::nchw;
    if (runs(d, v)) return v;
  }
  // 64 output channels a group, f16 / bf16: the warp-specialised 64 x 64 tile with one
  // producer warpgroup, from the tuner's exhaustive runs (H200, fp16, session 20, docs/perf-
  // notes.md): deft_64 41.9 against the register-A 128 x 64's 48.2 us (nchw), 35.4 / 40.5
  // (nhwc). tf32 keeps the register-A tile (no tuning data).
  if (kg == 64 && (d.dtype == DType::f16 || d.dtype == DType::bf16)) {
    Variant v;
    v.algo = Algo::gemm_wgmma;
    v.tile_m = 64, v.tile_n = 64, v.tile_k = chunk, v.vec = 1, v.producers = 1;
    v.threads = wgmma_threads(Pass::forward, v.tile_m, v.tile_n, v.producers);
    v.transpose = d.layout == Layout::nchw;
    if (runs(d, v)) return v;
  }
  for (int bn : {256, 128, 64}) {
    if (bn > 64 && bn / 2 >= kg) continue;  // wider than the group's output channels
    for (int bm : {bn == 64 ? 128 : 64, bn == 64 ? 64 : 128}) {
      Variant v;
      v.algo = Algo::gemm_wgmma;
      v.tile_m = bm, v.tile_n = bn, v.tile_k = chunk, v.threads = 2 * bm, v.vec = 1;
      v.transpose = d.layout == Layout::nchw;
      if (runs(d, v)) return v;
    }
  }
  return base;
}

// The arch's choice above, then on sm_90 a depthwise grad-input pass sums grad weight itself
// (gw=fused: one gather of the corners instead of two) with grad input gathered per input
// pixel (gin=gather in the fast mode; deterministic mode gathers anyway), where the plan takes
// both. Perf notes round B36 (H200, fp16 nhwc, sigma = 2, PDL off): dw512's data kernel with
// the gather form 153 us, against 173 + 86 for the separate data and grad-weight kernels; with
// a scattering form (gin=local's far points, or the float atomics) the fused kernel took 283
// and lost, so it is the default only with the gather forms.
Variant default_variant(const LayerDesc& d, int arch, bool deterministic) {
  Variant v = arch_default_variant(d, arch, deterministic);
  if (arch == 90 && d.pass == Pass::backward_data && v.algo == Algo::depthwise &&
      v.staging == Staging::gather) {
    Variant f = v;
    f.fuse_gw = true;
    if (!deterministic) f.gin_gather = true, f.gin_local = false, f.halo = 0;
    Variant planned = f;
    planned.deterministic = deterministic;  // as the runtime will set it
    try {
      if (make_plan(d, planned).gather_direct) return f;
    } catch (const Error&) {
    }
  }
  return v;
}

}  // namespace deft
