// make_plan: the arithmetic that turns a variant's choices into kernel constants and a grid.
#include "compiler/plan.hpp"

#include <algorithm>

#include <fmt/format.h>

namespace deft {

namespace {

bool pow2(int v) { return v > 0 && (v & (v - 1)) == 0; }

[[noreturn]] void bad(const char* field, const std::string& msg) { throw DescError(field, msg); }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t gcd64(int64_t a, int64_t b) {
  while (b) {
    const int64_t r = a % b;
    a = b;
    b = r;
  }
  return a;
}

// The largest power of two <= cap that divides v.
int pow2_divisor(int64_t v, int cap) {
  int b = 1;
  while (b * 2 <= cap && v % (b * 2) == 0) b *= 2;
  return b;
}

// Backward tensor-core tiles: `frags` 16x16 fragments shared evenly by the warps of at most
// `threads` threads (no warp without one); sets p.fpw (fragments per warp), returns the threads.
int split_fragments(KernelPlan& p, int frags, int threads) {
  const int warps = std::min(threads / 32, frags);
  if (frags % warps != 0 || frags / warps > 8)
    bad("threads", fmt::format("{} warps cannot share {} 16x16 fragments evenly (max 8 each)",
                               warps, frags));
  p.fpw = frags / warps;
  return warps * 32;
}

int align128(int64_t b) { return int((b + 127) / 128 * 128); }

int64_t align256(int64_t b) { return (b + 255) / 256 * 256; }

// Deterministic grad input of the resident WMMA, wgmma and depthwise kernels: the gather form
// (gin_mode 3, no 64-bit atomics; the same fixed-point sums, so the same bits) where the point
// and cell counts fit its 32-bit list indices, else 64-bit atomics (2).
int deterministic_gin_mode(const LayerDesc& d) {
  const GatherLayout g = gather_layout(d);
  return g.points < (int64_t(1) << 31) && g.cells + 1 < (int64_t(1) << 31) ? 3 : 2;
}

// backward_data on tensor cores with the block's grad_out tile resident in shared memory
// (templates/deform_conv_bwd_data_tc.cuh), where the layer allows it: channels-last input
// and krsc weight, each offset group inside one conv group, 16-byte weight rows, and the
// tiles within 113 KiB (two blocks per SM on sm_90). Leaves p.nstage = 0 (the streaming
// kernel) otherwise.
void plan_bwd_data_resident(const LayerDesc& d, KernelPlan& p, int ssize, int asize) {
  const int64_t cg = d.c_per_group(), cpog = d.c_per_offset_group();
  const int wv = 16 / ssize;
  if (!p.x_nhwc || !p.w_krsc || cg % cpog != 0 || cg % wv != 0 || p.bc % wv != 0) return;
  const int64_t kgp = ceil_div(d.k_per_group(), p.bk) * p.bk;
  const bool nhwc = d.layout == Layout::nhwc;  // grad_out's layout
  const int64_t gs = nhwc ? p.bp * (kgp + p.a_pad) : kgp * (p.bp + p.a_pad);
  const int gv = nhwc ? pow2_divisor(gcd64(d.k, d.k_per_group()), wv)
                      : pow2_divisor(gcd64(d.out_h() * d.out_w(), p.bp), wv);
  if (gv * ssize < 4) return;  // cp.async copies 4, 8 or 16 bytes
  for (int nstage = 3; nstage >= 2; --nstage) {
    const int64_t bytes = align128(gs * ssize) + align128(int64_t(nstage) * p.bk * (p.bc + p.a_pad) * ssize) +
                          align128(int64_t(p.bp) * (p.bc + 16) * 4) + int64_t(3) * p.block * asize;
    if (bytes <= 113 * 1024) {
      p.template_name = "deform_conv_bwd_data_tc.cuh";
      p.nstage = nstage;
      p.gv = gv;
      // deterministic: the gather form (f32 accumulation only: the values it stores are f32)
      if (p.gin_mode == 2 && asize == 4) p.gin_mode = deterministic_gin_mode(d);
      // EV = 4 only without 64-bit atomics: those have no vector form, and with scalar
      // channels the lanes of a pixel hit one sector per instruction.
      p.ev = p.gin_mode != 2 && d.c % 4 == 0 && p.bc % (4 * p.tpp) == 0 ? 4 : 1;
      p.smem_bytes = int(bytes);
      // epilogue corner vectors of the input, 16-byte weight copies, grad_out copy vectors
      if (!p.transpose) p.align_input = p.ev * dtype_size(d.dtype), p.align_weight = 16;
      p.align_gout = gv * dtype_size(d.dtype);
      return;
    }
  }
}

// backward_weight on tensor cores with 16-byte channel-vector gathers and a double-buffered
// pipeline (templates/deform_conv_bwd_weight_tc.cuh), where the layer allows it: channels-last
// input, 16-byte aligned channel vectors inside the groups, whole vectors per thread, and
// both buffers within 113 KiB. Leaves p.template_name alone otherwise.
void plan_bwd_weight_vector(const LayerDesc& d, KernelPlan& p, int ssize) {
  const int va = 16 / ssize;
  if (!p.x_nhwc || d.c % va != 0 || d.c_per_group() % va != 0 || p.bc % va != 0 ||
      (int64_t(p.bpw) * (p.bc / va)) % p.block != 0)
    return;
  const bool nhwc = d.layout == Layout::nhwc;  // grad_out's layout
  const int gv = nhwc ? pow2_divisor(gcd64(gcd64(d.k, d.k_per_group()), p.bo), va)
                      : pow2_divisor(gcd64(d.out_h() * d.out_w(), p.bpw), va);
  if (gv * ssize < 4) return;  // cp.async copies 4, 8 or 16 bytes
  const int64_t a = align128(int64_t(p.bpw) * (p.bc + p.a_pad) * ssize);
  const int64_t g = align128((nhwc ? int64_t(p.bpw) * (p.bo + p.a_pad) : int64_t(p.bo) * (p.bpw + p.a_pad)) * ssize);
  const int64_t bytes = std::max<int64_t>(2 * (a + g), int64_t(p.bo) * (p.bc + 4) * 4);
  if (bytes > 113 * 1024) return;
  p.template_name = "deform_conv_bwd_weight_tc.cuh";
  p.gv = gv;
  p.smem_bytes = int(bytes);
  if (!p.transpose) p.align_input = 16;  // 16-byte corner gathers
  p.align_gout = gv * dtype_size(d.dtype);  // grad_out copy vectors
}

// The backward_weight GEMM kernels' grid (BO x BC tiles of each tap and group, times the pixel
// ranges) and split partials: ranges of whole bpw-pixel slices, as many as bring the blocks to
// about `target_blocks`, within 65535 ranges and 256 MiB of partials (asize bytes each).
// With `sms` (> 0: blocks that run at once, one per SM) the split count is the one in
// [s, 2 s] (s from the target) that takes the fewest waves x slices per block: 36 tiles x 8
// splits = 288 blocks are 2.2 waves of 132, so three of 13 slices, while 11 splits are
// exactly three waves of 9 slices.
void plan_weight_splits(const LayerDesc& d, KernelPlan& p, int64_t m_total, int64_t target_blocks,
                        int asize, int64_t sms = 0) {
  const int64_t tiles = ceil_div(d.k_per_group(), p.bo) * (d.c_per_group() / p.bc);
  const int64_t blocks = tiles * d.taps() * d.groups;
  const int64_t slices = ceil_div(m_total, p.bpw);
  const int64_t w_elems = d.k * d.c_per_group() * d.taps();
  int64_t splits = std::clamp<int64_t>(ceil_div(target_blocks, blocks), 1, slices);
  if (sms > 0) {
    // time ~ waves x slices per block (the ranges are whole slices, the last one shorter)
    auto cost = [&](int64_t s) {
      const int64_t per = ceil_div(slices, s);
      return double(ceil_div(blocks * ceil_div(slices, per), sms)) * double(per);
    };
    int64_t best = splits;
    for (int64_t s = splits + 1; s <= 2 * splits && s <= slices; ++s)
      if (cost(s) < cost(best) * 0.99) best = s;
    splits = best;
  }
  splits = std::max<int64_t>(1, std::min<int64_t>(splits, (int64_t{256} << 20) / (w_elems * asize)));
  splits = std::min<int64_t>(splits, 65535);
  p.split_pix = ceil_div(slices, splits) * p.bpw;
  p.splits = int(ceil_div(m_total, p.split_pix));
  p.workspace_bytes = int64_t(p.splits) * w_elems * asize;
  if (tiles > 2147483647 || int64_t(d.taps()) * d.groups > 65535)
    bad("n", fmt::format("the launch grid {}x{}x{} is too large", tiles,
                         int64_t(d.taps()) * d.groups, p.splits));
  p.grid = {unsigned(tiles), unsigned(d.taps() * d.groups), unsigned(p.splits)};
}

// The depthwise kernels' channel vectors (deform_conv_depthwise.cuh and
// deform_conv_bwd_weight_dw.cuh): vec a power of two up to 16; read channels-last, whole
// 16-byte loads inside c and the offset groups; tn (channels per block) whole vectors.
void check_depthwise_vec(const LayerDesc& d, const Variant& v, const KernelPlan& p) {
  const int vec = v.vec, tsize = dtype_size(d.dtype);
  if (!pow2(vec) || vec > 16) bad("vec", fmt::format("vec={} must be 1, 2, 4, 8 or 16", vec));
  if (p.x_nhwc && vec > 1) {
    if ((vec * tsize) % 16 != 0)
      bad("vec", fmt::format("vec={} of {} is not a whole number of 16-byte loads", vec,
                             to_string(d.dtype)));
    if (d.c % vec != 0 || d.c_per_offset_group() % vec != 0)
      bad("vec", fmt::format("vec={} must divide c={} and c/offset_groups={}", vec, d.c,
                             d.c_per_offset_group()));
  }
  if (v.tile_n % vec != 0)
    bad("tn", fmt::format("tn={} (channels per block) must be a multiple of vec={}", v.tile_n,
                          vec));
}

// Depthwise backward_weight (templates/deform_conv_bwd_weight_dw.cuh): the depthwise
// forward's thread layout (vec channels per thread, tn channels and tm pixels per block), tk
// pixel steps per thread, so a block reduces tm * tk pixels (one of the splits), and
// dw_weight_taps_per_block taps.
void plan_bwd_weight_dw(const LayerDesc& d, const Variant& v, KernelPlan& p, int asize,
                        int64_t m_total) {
  p.template_name = "deform_conv_bwd_weight_dw.cuh";
  p.kernel_name = "deft_deform_conv2d_backward_weight";
  check_depthwise_vec(d, v, p);
  const int vec = v.vec, tsize = dtype_size(d.dtype);
  const int tpc = v.tile_n / vec;
  if (!pow2(tpc) || v.threads % tpc != 0)
    bad("tn", fmt::format("tn/vec={} (threads per pixel) must be a power of two dividing "
                          "threads={}", tpc, v.threads));
  if (v.tile_m != v.threads / tpc)
    bad("tm", fmt::format("tm={} must equal the pixels per block, threads*vec/tn={}", v.tile_m,
                          v.threads / tpc));
  p.vec = vec;
  p.ch_per_block = v.tile_n;
  p.pix_per_block = v.tile_m;
  p.t_size = tsize;
  p.block = unsigned(v.threads);
  p.tb = dw_weight_taps_per_block(d, vec);
  if (p.x_nhwc && !p.transpose && vec > 1) p.align_input = 16;  // 16-byte corner vectors
  // nchw grad_out through a channels-last copy where the lanes run along the channels (more
  // than one thread a pixel): in nchw they would each read another plane (perf notes round B18)
  p.gout_t = d.layout == Layout::nchw && p.x_nhwc && tpc > 1;
  p.workspace_gout_bytes = p.gout_t ? d.n * d.k * d.out_h() * d.out_w() * tsize : 0;
  const int64_t red_bytes = int64_t(v.threads / std::max(tpc, 32)) * tpc * vec * asize;
  if (red_bytes > 48 * 1024)
    bad("threads", fmt::format("threads={} with vec={} needs {} bytes of shared memory (max "
                               "49152)", v.threads, vec, red_bytes));
  p.smem_bytes = 0;  // static shared memory
  p.split_pix = int64_t(v.tile_m) * v.tile_k;
  const int64_t splits = ceil_div(m_total, p.split_pix);
  const int64_t w_elems = d.c * d.taps();
  if (splits > 65535 || splits * w_elems * asize > (int64_t{256} << 20))
    bad("tk", fmt::format("tk={} splits the {} pixels into {} ranges of {}, whose partial sums "
                          "exceed 65535 ranges or 256 MiB; raise tk", v.tile_k, m_total, splits,
                          p.split_pix));
  p.splits = int(splits);
  p.workspace_bytes = splits * w_elems * asize;
  const int64_t gx = ceil_div(d.c, v.tile_n);
  if (gx > 2147483647)
    bad("n", fmt::format("the launch grid {}x{}x{} is too large", gx, ceil_div(d.taps(), p.tb),
                         splits));
  p.grid = {unsigned(gx), unsigned(ceil_div(d.taps(), p.tb)), unsigned(splits)};
}

// backward_weight on wgmma (templates/deform_conv_bwd_weight_wgmma.cuh): tm = output channels
// per block (64 per warpgroup, threads = 2 tm), tn = input channels per block (64 or 128, inside
// one group and offset group), tk = 64 pixels per chunk (tf32: 32, the same bytes); f16/bf16,
// or f32 in tf32 math with producer warpgroups; channels-last input.
void plan_bwd_weight_wgmma(const LayerDesc& d, const Variant& v, KernelPlan& p, int64_t m_total) {
  p.template_name = "deform_conv_bwd_weight_wgmma.cuh";
  p.kernel_name = "deft_deform_conv2d_backward_weight";
  const bool tf32 = d.dtype == DType::f32 && d.math == MathMode::tf32;
  if (d.dtype != DType::f16 && d.dtype != DType::bf16 && !tf32)
    bad("algo", fmt::format("algo=gemm_wgmma for pass=backward_weight needs dtype f16, bf16, or "
                            "f32 with math=tf32, not dtype={} math={}", to_string(d.dtype),
                            to_string(d.math)));
  if (tf32 && v.producers == 0)
    bad("producers", "algo=gemm_wgmma for pass=backward_weight in tf32 runs the warp-specialised "
                     "form only: producers=1 or 2");
  if (!p.x_nhwc)
    bad("transpose", "algo=gemm_wgmma reads the input channels-last: nchw layers need transpose=1");
  if (v.tile_m != 64 && v.tile_m != 128 && v.tile_m != 256)
    bad("tm", fmt::format("algo=gemm_wgmma has tm=64, 128 or 256 output channels (one, two or "
                          "four warpgroups), not {}", v.tile_m));
  if (v.tile_n != 64 && v.tile_n != 128)
    bad("tn", fmt::format("algo=gemm_wgmma has tn=64 or 128 input channels, not {}", v.tile_n));
  if (d.c_per_group() % v.tile_n != 0 || d.c_per_offset_group() % v.tile_n != 0)
    bad("tn", fmt::format("tn={} must divide c/groups={} and c/offset_groups={}", v.tile_n,
                          d.c_per_group(), d.c_per_offset_group()));
  const int kp = tf32 ? 32 : 64;  // pixels a chunk: 128 bytes of k a core row
  if (v.tile_k != kp)
    bad("tk", fmt::format("algo=gemm_wgmma reduces {}-pixel chunks for {}: tk={}, not {}", kp,
                          to_string(d.dtype), kp, v.tile_k));
  if (v.producers < 0 || v.producers > 2)
    bad("producers", fmt::format("producers={} must be 0, 1 or 2 (warpgroups)", v.producers));
  const int want = wgmma_threads(Pass::backward_weight, v.tile_m, v.tile_n, v.producers);
  if (v.threads != want)
    bad("threads", fmt::format("algo=gemm_wgmma runs a warpgroup per 64 output channels{}: tm={}{} "
                               "needs threads={}, not {}", v.producers ? " and per producer" : "",
                               v.tile_m, v.producers ? fmt::format(" producers={}", v.producers) : "",
                               want, v.threads));
  if (d.h * d.w * d.c >= (int64_t{1} << 31))
    bad("algo", "algo=gemm_wgmma needs an image of fewer than 2^31 elements");
  p.bo = v.tile_m;
  p.bc = v.tile_n;
  p.bpw = 64;
  p.block = unsigned(v.threads);
  if (!p.transpose) p.align_input = 16;  // 16-byte corner gathers
  // 8-byte grad_out loads of four pixels (nchw, whole groups of four per image)
  if (d.layout == Layout::nchw && d.out_h() * d.out_w() % 4 == 0) p.align_gout = 8;
  if (v.producers == 0) {
    if (v.stages != 0)
      bad("stages", fmt::format("stages={} applies to pass=backward_weight with producers only",
                                v.stages));
    p.smem_bytes = 0;  // static: two 64-pixel chunks of tn channels
    // about 512 blocks (four per SM), fewer partials than the WMMA kernel's 2048-block target:
    // each one is a full weight-sized write and read for the reduce
    plan_weight_splits(d, p, m_total, 512, 4);
    return;
  }
  // warp-specialised: a consumer keeps tn / 2 accumulators (A and B come from shared memory),
  // a producer lane two items' corners and their addresses; ptxas compiles the kernel to the
  // threads' share of the 64 K registers
  if (65536 / want < v.tile_n / 2 + 36)
    bad("producers", fmt::format("tm={} tn={} producers={} is {} threads, leaving {} registers "
                                 "a thread: too few for a consumer's accumulators and its "
                                 "addresses", v.tile_m, v.tile_n, v.producers, want, 65536 / want));
  if (v.stages != 0 && (v.stages < std::max(2, v.producers) || v.stages > 8))
    bad("stages", fmt::format("algo=gemm_wgmma pass=backward_weight producers={} has a ring of "
                              "stages={} to 8, not {}", v.producers, std::max(2, v.producers),
                              v.stages));
  const int esize = dtype_size(d.dtype);
  const int64_t chunk = kp * int64_t(v.tile_n) * esize;
  // each producer warpgroup's two tables of kp sampling points (32-byte point, 4-byte image),
  // each consumer's four grad_out stages (64 channels x kp pixels)
  const int64_t tables = int64_t(v.producers) * 2 * kp * (32 + 4);
  const int64_t a_stages = int64_t(v.tile_m / 64) * 4 * 64 * kp * esize;
  p.nstage = v.stages ? v.stages : 8;
  while (p.nstage > 2 && p.nstage * (chunk + 16) + tables + a_stages > 227 * 1024) --p.nstage;
  if (p.nstage * (chunk + 16) + tables + a_stages > 227 * 1024)
    bad("stages", fmt::format("tm={} tn={} producers={} with a ring of {} needs more than 227 KiB "
                              "of shared memory", v.tile_m, v.tile_n, v.producers, p.nstage));
  p.bww_producers = v.producers;
  // a producer lane's items per batch of corner loads (variant batch; 0: by the register share)
  const int items = kp * (v.tile_n / (16 / esize)) / 128;
  if (v.batch != 0 && ((v.batch != 2 && v.batch != 4 && v.batch != 8) || v.batch > items))
    bad("batch", fmt::format("batch={} must be 2, 4 or 8 and at most the {} items a producer "
                             "lane gathers a chunk (tn={})", v.batch, items, v.tile_n));
  p.bww_batch = v.batch;
  p.smem_bytes = int(p.nstage * (chunk + 16) + tables + a_stages);  // all dynamic
  // the consumers' grad_out copies (GOUT_COPY): 16 bytes (8 pixels of a plane, or 8 channels
  // of a pixel), 8 bytes (4 pixels) or one element; grad_out aligned to match
  // (tf32: 16 bytes = 4 pixels of a plane, 8 = 2, or 4 = one element; nhwc grad_out is
  // transposed element by element)
  const int64_t hw = d.out_h() * d.out_w();
  if (tf32) {
    p.gout_copy = d.layout == Layout::nhwc ? 4 : hw % 4 == 0 ? 16 : hw % 2 == 0 ? 8 : 4;
  } else {
    const bool g16 = d.layout == Layout::nhwc ? d.k % 8 == 0 && d.k_per_group() % 8 == 0 : hw % 8 == 0;
    p.gout_copy = g16 ? 16 : (d.layout == Layout::nchw && hw % 4 == 0 ? 8 : 2);
  }
  p.align_gout = p.gout_copy;
  // one block per SM (the ring takes most of its shared memory): about two waves of blocks,
  // whole waves of the 132 SMs of an H100 SXM or H200 (the plan does not know the device)
  plan_weight_splits(d, p, m_total, 264, 4, 132);
}

// backward_data on wgmma (templates/deform_conv_bwd_data_wgmma.cuh): tm = 64 or 128 output
// pixels per block, tn = input channels per step (64 or 128, inside one offset group inside one
// conv group), tk = 64 output channels per weight slice, threads = 128 per warpgroup (1 to 4,
// as many for each 64-pixel half, taking turns over its channel steps); f16/bf16, channels-last
// input. The block's grad_out tile (tm pixels x the group's output channels) stays in shared
// memory with each warpgroup's weight ring.
void plan_bwd_data_wgmma(const LayerDesc& d, const Variant& v, KernelPlan& p, int64_t m_total,
                         int64_t in_elems) {
  p.template_name = "deform_conv_bwd_data_wgmma.cuh";
  p.kernel_name = "deft_deform_conv2d_backward_data";
  const bool tf32 = d.dtype == DType::f32 && d.math == MathMode::tf32;
  if (d.dtype != DType::f16 && d.dtype != DType::bf16 && !tf32)
    bad("algo", fmt::format("algo=gemm_wgmma for pass=backward_data needs dtype f16, bf16, or f32 "
                            "with math=tf32, not dtype={} math={}", to_string(d.dtype),
                            to_string(d.math)));
  const int64_t es = dtype_size(d.dtype);
  const int64_t ks = 128 / es;  // output channels per weight slice (128 bytes of k a row)
  if (!p.x_nhwc)
    bad("transpose", "algo=gemm_wgmma reads the input channels-last: nchw layers need transpose=1");
  if (v.tile_m != 64 && v.tile_m != 128)
    bad("tm", fmt::format("algo=gemm_wgmma for pass=backward_data has tm=64 or 128 output "
                          "pixels, not {}", v.tile_m));
  if (v.tile_n != 64 && v.tile_n != 128)
    bad("tn", fmt::format("algo=gemm_wgmma for pass=backward_data has tn=64 or 128 input "
                          "channels per step, not {}", v.tile_n));
  if (d.c_per_offset_group() % v.tile_n != 0 || d.c_per_group() % d.c_per_offset_group() != 0)
    bad("tn", fmt::format("tn={} must divide c/offset_groups={}, and each offset group must lie "
                          "inside one conv group (c/groups={})", v.tile_n,
                          d.c_per_offset_group(), d.c_per_group()));
  if (v.tile_k != ks)
    bad("tk", fmt::format("algo=gemm_wgmma for pass=backward_data reduces {}-channel weight "
                          "slices for {}: tk={}, not {}", ks, tf32 ? "tf32" : to_string(d.dtype),
                          ks, v.tile_k));
  const int halves = v.tile_m / 64;
  if (v.threads % (128 * halves) != 0 || v.threads > 512)
    bad("threads", fmt::format("algo=gemm_wgmma for pass=backward_data runs 1 to 4 warpgroups, "
                               "as many for each 64 pixels: tm={} takes threads={}, not {}",
                               v.tile_m, halves == 1 ? "128, 256, 384 or 512" : "256 or 512",
                               v.threads));
  if (v.stages != 0 && (v.stages < 3 || v.stages > 8))
    bad("stages", fmt::format("algo=gemm_wgmma for pass=backward_data has a weight ring of "
                              "stages=3 to 8, not {}", v.stages));
  // Deterministic mode with 128-pixel tiles: refused. Its four-warpgroup form spilled at 128
  // registers, and it is the tile session 9 saw fault; that fault was the null grad-input path
  // (every tile, both modes; removed since, docs/perf-notes.md round B13), but these tiles
  // have not run in deterministic mode since. The heuristic's deterministic tiles are tm=64.
  if (v.deterministic && v.tile_m != 64)
    bad("tm", fmt::format("algo=gemm_wgmma for pass=backward_data in deterministic mode has "
                          "tm=64 only, not {}", v.tile_m));
  p.bp = v.tile_m;
  p.bc = v.tile_n;
  p.block = unsigned(v.threads);
  const int64_t kgp = ceil_div(d.k_per_group(), ks) * ks, wgs = v.threads / 128;
  // the grad_out tile, every warpgroup's ring, the other warpgroups' point-grad sums
  const int64_t tile = kgp * p.bp * es, slice = 128 * int64_t(p.bc),
                sums = (wgs / halves - 1) * p.bp * 3 * 4;
  p.nstage = v.stages ? v.stages : 4;
  auto bytes = [&] { return tile + wgs * p.nstage * slice + sums; };
  if (!v.stages)  // deeper where the tile leaves room, shallower where it does not
    while (p.nstage > 3 && bytes() > 227 * 1024) --p.nstage;
  if (bytes() > 227 * 1024)
    bad("tm", fmt::format("k/groups={} with threads={} needs {} KiB of shared memory for the "
                          "grad_out tile and {} ring(s) of {} weight slices (max 227)",
                          d.k_per_group(), v.threads, (bytes() + 1023) / 1024, wgs, p.nstage));
  p.smem_bytes = int(bytes());
  p.gout_tile_bytes = tile, p.slice_bytes = slice;
  // two blocks an SM where their shared memory fits (228 KiB, 1 KiB of it reserved a block)
  // and their registers can (at most 128 a thread for 256 threads): the other block's
  // epilogue hides this one's latency
  // (not tf32's deterministic form: its 64-bit atomics on 16-byte corner vectors spilled at
  // 128 registers)
  p.min_blocks =
      2 * (bytes() + 1024) <= 228 * 1024 && v.threads <= 256 && !(tf32 && v.deterministic) ? 2 : 1;
  // grad_out copies of 8 elements (16 bytes), 4 or one: 8 pixels of a plane (nchw) or 8
  // channels of a pixel (nhwc) where the layer keeps them aligned and inside one image/group
  const int64_t hw = d.out_h() * d.out_w();
  const bool nhwc = d.layout == Layout::nhwc;
  const int64_t run = nhwc ? gcd64(d.k, d.k_per_group()) : hw;
  // (tf32: 4 channels of an nhwc pixel, 16 bytes, or 2; an nchw tile element by element, as
  // the copy transposes it to K-major)
  const int64_t kc = 16 / es;
  p.gv = tf32 && !nhwc ? 1 : run % kc == 0 ? int(kc) : run % (kc / 2) == 0 ? int(kc / 2) : 1;
  p.align_gout = p.gv > 1 ? int(p.gv * es) : 1;
  // epilogue corner vectors of 4 channels
  if (!p.transpose) p.align_input = int(4 * es);
  // the weight: packed by the kernel's own pre-pass (deft_pack_weight) from its layout, not
  // transposed to krsc
  p.w_krsc = d.layout == Layout::nhwc;
  p.workspace_weight_bytes = 0;
  p.workspace_packed_bytes = d.groups * d.taps() * d.c_per_group() * kgp * es;
  // deterministic: the gather form, as the resident WMMA kernel's (GPU-tested and timed in
  // session 12: the heuristic's deterministic default on sm_90 wherever it is the fast one)
  p.gin_mode = v.deterministic ? deterministic_gin_mode(d) : 1;
  p.gin_always = true;
  p.workspace_bytes = 32 + (p.gin_mode >= 2 ? 8 : 4) * in_elems;
  const int64_t gx = ceil_div(m_total, p.bp);
  if (gx > 2147483647 || d.offset_groups > 65535)
    bad("n", fmt::format("the launch grid {}x{}x{} is too large", gx, d.taps(), d.offset_groups));
  p.grid = {unsigned(gx), unsigned(d.taps()), unsigned(d.offset_groups)};
}

// Depthwise backward_data with staging=window (templates/deform_conv_bwd_data_dw.cuh,
// DW_WINDOW): the tile, the input window and its shared memory; returns the grid's x extent.
int64_t plan_bwd_data_dw_window(const LayerDesc& d, const Variant& v, KernelPlan& p) {
  const char* why = v.deterministic ? "the fast mode (deterministic mode gathers: det=0)"
                    : v.gin_gather  ? "float atomics (not gin=gather)"
                    : !p.x_nhwc     ? "channels-last input (nhwc, or transpose=1)"
                    : p.ev != 4     ? "an f32 grad-input workspace with 4-channel vectors (f16, "
                                      "bf16 or f32 with c/offset_groups a multiple of 4)"
                    : p.tpp != 32   ? "32 threads a pixel (threads = 32 x tm)"
                                    : nullptr;
  if (why) bad("staging", fmt::format("staging=window (depthwise backward_data) needs {}", why));
  if (v.halo < 0 || v.halo > 8) bad("halo", fmt::format("halo={} must be in [0, 8]", v.halo));
  if (!pow2(p.bp)) bad("tm", fmt::format("tm={} must be a power of two with staging=window", p.bp));
  // the squarest power-of-two tile, no wider than the image's rows need
  int tw = 1;
  while (tw * tw < p.bp) tw *= 2;
  while (tw > 1 && tw / 2 >= d.out_w()) tw /= 2;
  p.dw_window = true;
  p.tile_w = tw;
  p.tile_h = p.bp / tw;
  p.tiles_x = int(ceil_div(d.out_w(), p.tile_w));
  p.tiles_y = int(ceil_div(d.out_h(), p.tile_h));
  p.halo = v.halo;
  // the rows (columns) of the corners of the tile's points at zero offset, widened by the halo
  p.win_rows = int((p.tile_h - 1) * d.stride_h + (d.r - 1) * d.dil_h + 2 + 2 * v.halo);
  p.win_cols = int((p.tile_w - 1) * d.stride_w + (d.s - 1) * d.dil_w + 2 + 2 * v.halo);
  const int64_t slice = 32 * 4;  // channels a pass: 32 lanes x 4
  const int64_t bytes = 4 * slice * (int64_t(p.win_rows) * p.win_cols + d.taps());
  if (bytes > 200 * 1024)
    bad("halo", fmt::format("the input window ({} x {} pixels x {} channels, f32) and the "
                            "weight slice need {} bytes of shared memory (max 204800)",
                            p.win_rows, p.win_cols, slice, bytes));
  p.smem_bytes = int(bytes);
  return d.n * int64_t(p.tiles_y) * p.tiles_x;
}

// The depthwise kernels' 16-byte vector path: a channels-last input (nhwc, or the transpose's
// copy) read in vectors of vec elements that make whole 16-byte loads (VEC_PATH in
// deform_conv_depthwise.cuh adds an image of at least 2 x 2).
bool depthwise_vec_path(const LayerDesc& d, const KernelPlan& p, int vec) {
  return p.x_nhwc && vec > 1 && (vec * dtype_size(d.dtype)) % 16 == 0;
}

// Depthwise forward with staging=window (templates/deform_conv_depthwise.cuh, DW_WINDOW): a
// block owns tm = 8 x (tm / 8) output pixels of one image (tile_w = 8) and tn channels, stages
// the input window of the tile's corners at zero offset, widened by the halo, in shared memory
// ([pixel][tn channels], cp.async), and reads a point's 2 x 2 block from there when it lies
// inside, else from global memory; the threads take the tile's pixels in passes of
// threads / (tn / vec). Returns the grid's x extent (images x tiles).
int64_t plan_fwd_dw_window(const LayerDesc& d, const Variant& v, KernelPlan& p) {
  if (!depthwise_vec_path(d, p, v.vec) || d.h < 2 || d.w < 2)
    bad("staging", "staging=window (depthwise forward) needs the 16-byte vector path: channels-"
                   "last input (nhwc, or transpose=1), vec x the element size = 16 bytes, an "
                   "image of at least 2 x 2");
  if (v.tile_m != 32 && v.tile_m != 64)
    bad("tm", fmt::format("tm={} must be 32 or 64 with staging=window (a tile of 4 or 8 rows of "
                          "8 output pixels)", v.tile_m));
  if (v.halo < 0 || v.halo > 8) bad("halo", fmt::format("halo={} must be in [0, 8]", v.halo));
  p.dw_window = true;
  p.tile_w = 8;
  p.tile_h = v.tile_m / 8;
  p.tiles_x = int(ceil_div(d.out_w(), p.tile_w));
  p.tiles_y = int(ceil_div(d.out_h(), p.tile_h));
  p.halo = v.halo;
  p.win_rows = int((p.tile_h - 1) * d.stride_h + (d.r - 1) * d.dil_h + 2 + 2 * v.halo);
  p.win_cols = int((p.tile_w - 1) * d.stride_w + (d.s - 1) * d.dil_w + 2 + 2 * v.halo);
  const int64_t bytes =
      int64_t(dtype_size(d.dtype)) * v.tile_n * (int64_t(p.win_rows) * p.win_cols + d.taps());
  if (bytes > 200 * 1024)
    bad("halo", fmt::format("the input window ({} x {} pixels x {} channels) and the block's "
                            "weights need {} bytes of shared memory (max 204800)",
                            p.win_rows, p.win_cols, v.tile_n, bytes));
  p.smem_bytes = int(bytes);
  return d.n * int64_t(p.tiles_y) * p.tiles_x;
}

// Depthwise backward_data with gw=fused (templates/deform_conv_bwd_data_dw.cuh, FUSED_GW): the
// data kernel in the grad-weight kernel's layout (a thread: vec channels of one pixel; tpc
// threads a pixel, lanes of one warp; tb taps a block), so that it sums grad weight from the
// corners it loads for grad offset and grad mask. The point grads of a pixel are summed over
// the tpc threads by shuffles; where an offset group has more channels than a block (cbpog >
// 1) each block stores its part and deft_bwd_fused_pg adds them in order. Grad weight: each
// block's sums over its pixels (split partials, as deft_bwd_weight_reduce's), added in order by
// deft_bwd_fused_gw. No atomics in either: the same bits every run.
void plan_bwd_data_dw_fused(const LayerDesc& d, const Variant& v, KernelPlan& p, int64_t m_total) {
  const int tsize = dtype_size(d.dtype);
  if (v.staging != Staging::gather) bad("gw", "gw=fused needs staging=gather");
  if (!p.x_nhwc)
    bad("gw", "gw=fused needs a channels-last input: an nhwc layer, or transpose=1");
  if (d.dtype == DType::f64) bad("gw", "gw=fused sums in f32: not for f64 layers");
  auto& f = p.fw;
  f.vec = v.vec > 1 ? v.vec : 16 / tsize;
  if (f.vec * tsize != 16 && f.vec * tsize != 32)
    bad("vec", fmt::format("gw=fused takes vec={} (16 bytes of channels a thread) or {} (32), "
                           "not vec={}", 16 / tsize, 32 / tsize, v.vec));
  const int64_t cpog = d.c_per_offset_group();
  if (cpog % f.vec != 0)
    bad("vec", fmt::format("gw=fused with vec={} needs c/offset_groups={} a multiple of it",
                           f.vec, cpog));
  // threads a pixel: a power of two up to a warp whose channels divide the offset group's
  f.tpc = 1;
  while (f.tpc < 32 && cpog % (int64_t(f.tpc) * 2 * f.vec) == 0) f.tpc *= 2;
  if (v.threads % 32 != 0 || v.threads > 512)
    bad("threads", fmt::format("gw=fused needs threads a multiple of 32 up to 512, not {}",
                               v.threads));
  const int cpb = f.tpc * f.vec;
  f.cbpog = int(cpog / cpb);
  // taps a block: at most 24 grad-weight sums a thread (two blocks of 256 threads an SM),
  // batches of equal size
  const int taps = d.taps();
  const int batches = int(ceil_div(taps, std::max(1, 24 / f.vec)));
  f.tb = int(ceil_div(taps, batches));
  const int rows = v.threads / f.tpc;  // pixels a block step
  // pixel ranges: about 1024 blocks in all, each at least 4 steps
  const int64_t steps = ceil_div(m_total, rows);
  const int64_t tiles = (d.c / cpb) * batches;
  int64_t splits = std::clamp<int64_t>(ceil_div(1024, tiles), 1, std::max<int64_t>(1, steps / 4));
  f.split_pix = ceil_div(steps, splits) * rows;
  splits = ceil_div(m_total, f.split_pix);
  const int64_t w_elems = d.c * taps;
  if (splits > 65535 || splits * w_elems * 4 > (int64_t{256} << 20))
    bad("gw", fmt::format("gw=fused: {} pixels in {} ranges make too many partial sums",
                          m_total, splits));
  f.splits = int(splits);
  f.gw_bytes = splits * w_elems * 4;
  f.pg_bytes = f.cbpog > 1 ? int64_t(f.cbpog) * m_total * d.offset_groups * taps * 3 * 4 : 0;
  p.fused_gw = true;  // (its taps' weights: static shared memory, no DW_WSMEM)
  p.block = unsigned(v.threads);
  if (d.c / cpb > 2147483647) bad("n", "the launch grid is too large");
  p.grid = {unsigned(d.c / cpb), unsigned(batches), unsigned(splits)};
  // 16-byte vectors: corners (unless read from the transpose's copy) and grad_out (unless
  // read from the runtime's channels-last copy)
  if (!p.transpose) p.align_input = std::max(p.align_input, 16);
  if (!p.gout_t) p.align_gout = std::max(p.align_gout, 16);
}

void plan_backward(const LayerDesc& d, const Variant& v, KernelPlan& p) {
  const bool dw = v.algo == Algo::depthwise && d.pass == Pass::backward_data;
  const bool dww = v.algo == Algo::depthwise && d.pass == Pass::backward_weight;
  const bool wgw = v.algo == Algo::gemm_wgmma && d.pass == Pass::backward_weight;
  const bool wgd = v.algo == Algo::gemm_wgmma && d.pass == Pass::backward_data;
  p.use_tc = v.algo == Algo::gemm_tc;
  p.stage = p.acc;
  if (p.use_tc) {
    if (d.dtype == DType::f64 || (d.dtype == DType::f32 && d.math != MathMode::tf32))
      bad("algo", fmt::format("algo=gemm_tc needs dtype f16/bf16 or math=tf32, not dtype={} "
                              "math={}", to_string(d.dtype), to_string(d.math)));
    const bool f32 = d.dtype == DType::f32;
    p.stage = f32 ? "float" : p.t;
    p.tc_in = f32 ? "nvcuda::wmma::precision::tf32" : p.t;
    p.wk = f32 ? 8 : 16;
    p.a_pad = f32 ? 4 : 8;  // TC_PAD: keeps rows 32-byte aligned and off one bank
  }
  if (v.algo != Algo::gemm_simt && !p.use_tc && !dw && !dww && !wgw && !wgd)
    bad("algo", fmt::format("pass={} has algo=gemm_simt, gemm_tc, gemm_wgmma or depthwise, not "
                            "algo={}", to_string(d.pass), to_string(v.algo)));
  if ((dw || dww) && (d.c_per_group() != 1 || d.k_per_group() != 1))
    bad("algo", fmt::format("algo=depthwise needs groups == c == k, not groups={} c={} k={}",
                            d.groups, d.c, d.k));
  p.x_nhwc = p.w_krsc = d.layout == Layout::nhwc;  // tensors read in their own layout
  if (v.transpose) {
    // nchw layers: input (and, for backward_data, weight) transposed to nhwc / krsc by the
    // pre-pass; grad input accumulates channels-last and deft_bwd_finish transposes it back.
    if (d.layout != Layout::nchw) bad("transpose", "transpose=1 applies only to nchw layers");
    if (d.n > 65535 || d.k > 65535)
      bad("transpose", fmt::format("transpose=1 handles n and k up to 65535, not n={} k={}", d.n,
                                   d.k));
    p.transpose = true;
    p.x_nhwc = true;
    p.w_krsc = d.pass == Pass::backward_data;  // backward_weight never reads the weight
    p.workspace_input_bytes = d.n * d.c * d.h * d.w * dtype_size(d.dtype);
    p.workspace_weight_bytes =
        p.w_krsc ? d.k * d.c_per_group() * d.taps() * dtype_size(d.dtype) : 0;
  }
  if (v.threads > 1024 || v.threads < 32 || v.threads % 32 != 0)
    bad("threads", fmt::format("threads={} must be a multiple of 32 in [32, 1024]", v.threads));
  for (auto [f, x] : {std::pair<const char*, int>{"tm", v.tile_m}, {"tn", v.tile_n},
                      {"tk", v.tile_k}})
    if (!pow2(x) || x > 256)
      bad(f, fmt::format("{}={} must be a power of two no larger than 256", f, x));
  const int asize = d.dtype == DType::f64 ? 8 : 4;
  const int64_t common = gcd64(d.c_per_group(), d.c_per_offset_group());
  const int64_t m_total = d.n * d.out_h() * d.out_w();
  const int64_t in_elems = d.n * d.c * d.h * d.w;
  if (dw) {
    p.template_name = "deform_conv_bwd_data_dw.cuh";
    p.kernel_name = "deft_deform_conv2d_backward_data";
    p.bp = v.tile_m;  // pixels per block
    if (v.threads % p.bp != 0)
      bad("tm", fmt::format("tm={} must divide threads={}", p.bp, v.threads));
    p.tpp = v.threads / p.bp;  // threads per pixel
    p.block = v.threads;
    p.smem_bytes = 0;
    if (v.deterministic) p.gin_mode = 2;
    else p.gin_mode = (d.dtype == DType::f16 || d.dtype == DType::bf16 || p.transpose ||
                       v.staging == Staging::window) ? 1 : 0;  // the window flushes 16-byte vectors
    // deterministic with an f32 accumulator: the gather form without a values buffer (the
    // column gradient of a depthwise channel is weight x grad_out: the gather computes it);
    // gin=gather: the same gather in the fast mode, in f32 (gin_mode 4)
    if (v.gin_gather && asize != 4)
      bad("gin", fmt::format("gin=gather sums in f32: not for {} layers", to_string(d.dtype)));
    if (v.gin_gather && deterministic_gin_mode(d) != 3)
      bad("gin", "gin=gather: the layer has too many sampling points for the gather's 32-bit lists");
    if (v.gin_local) {
      const char* why = asize != 4 ? "an f32 workspace (f16, bf16 or f32 layers)"
                        : v.staging == Staging::window ? "staging=gather"
                        : d.c_per_offset_group() % 4 != 0 ? "c/offset_groups a multiple of 4"
                                                          : nullptr;
      if (why) bad("gin", fmt::format("gin=local needs {}", why));
      // deterministic: the near points' sums and the far points' reductions both in GIN_MODE
      // 2's 64-bit fixed point (integer sums: their order does not matter)
      p.gin_mode = v.deterministic ? 6 : 5;
    }
    // deterministic with an f32 accumulator, where the lists fit: the f32 gather over lists
    // sorted by point index (no bound kernel, no 64-bit sums: perf notes round B32), or with
    // gin=gather the fixed-point gather (3: the bits of the 64-bit atomics)
    if (p.gin_mode == 2 && asize == 4 && deterministic_gin_mode(d) == 3) {
      p.gin_mode = v.gin_gather ? 3 : 4;
      p.gather_sorted = !v.gin_gather;
    } else if (v.gin_gather) {
      p.gin_mode = 4;
    }
    p.gather_direct = p.gin_mode == 3 || p.gin_mode == 4;
    // grad_out through a channels-last copy where the lanes run along the channels (the
    // transposed input) or the gather reads it: ~10 us for a 16 MB grad_out against strided
    // reads along the channels of an nchw plane (docs/perf-notes.md round B17)
    p.gout_t = d.layout == Layout::nchw && (p.x_nhwc || p.gather_direct || p.gin_local_gather());
    p.workspace_gout_bytes = p.gout_t ? d.n * d.k * d.out_h() * d.out_w() * dtype_size(d.dtype) : 0;
    if (p.gather_direct) {
      // 8 channels a lane where a 16-bit layer's groups take them and its items (input
      // pixels x offset groups x slices) still fill the grid's blocks of 8 warps: dw512 fp16
      // gather 150 -> 138 us, while dw512_n1 (256 blocks instead of 512) lost 0.041 -> 0.047 ms
      // forward + backward (perf notes round B37)
      const int64_t cpog = d.c_per_offset_group();
      p.gather_vec = cpog % 4 == 0 ? 4 : 1;
      if (dtype_size(d.dtype) == 2 && cpog % 8 == 0 &&
          d.n * d.offset_groups * d.h * d.w * ceil_div(cpog, 256) >= 8 * kDirectGatherMaxBlocks)
        p.gather_vec = 8;
      p.gather_slices = int(ceil_div(cpog, 32 * p.gather_vec));
    }
    // the f32 gather of an nhwc layer writes grad input itself: its workspace is channels-last
    // like the layer, so the finish kernel would only convert (dw512 fp16: 12 us)
    p.gather_out = p.gather_direct && p.gin_mode == 4 && d.layout == Layout::nhwc;
    p.workspace_bytes =
        32 + (p.gather_out ? 0 : p.gin_fixed_point() ? 8 : p.gin_mode != 0 ? asize : 0) * in_elems;
    // channel vectors of 4 where they are contiguous and accumulate into the f32 workspace (or
    // scatter nothing: the gather forms)
    p.ev = p.x_nhwc && p.gin_mode != 0 && p.gin_mode != 2 && asize == 4 &&
                   d.c_per_offset_group() % 4 == 0
               ? 4
               : 1;
    if (!p.transpose) p.align_input = p.ev * dtype_size(d.dtype);  // corner vectors
    // the direct gather reads nhwc grad_out in vectors of gather_vec channels, the local
    // gather in vectors of 4, where a group has them
    if ((p.gather_direct || p.gin_local_gather()) && !p.gout_t && d.c_per_offset_group() % 4 == 0)
      p.align_gout = std::max(p.gather_direct ? p.gather_vec : 1, 4) * dtype_size(d.dtype);
    if (p.gin_local_gather()) {
      // the local gather (deft_bwd_lgather): 8 x 8 input tiles; the output pixels whose near
      // points can land in a tile's cells: an interval of TH + (r - 1) dil + 2 R rows
      auto& lg = p.lg;
      lg.radius = v.halo;
      lg.tiles_y = int(ceil_div(d.h, lg.tile));
      lg.tiles_x = int(ceil_div(d.w, lg.tile));
      lg.rows = int((lg.tile + (d.r - 1) * d.dil_h + 2 * v.halo) / d.stride_h + 1);
      lg.cols = int((lg.tile + (d.s - 1) * d.dil_w + 2 * v.halo) / d.stride_w + 1);
      lg.slices = int(ceil_div(d.c_per_offset_group(), 128));
      // up to 4 slices a block (16 accumulators a lane): the binning is done once for them
      // (perf notes round B27)
      lg.per_block = std::min(lg.slices, 4);
      // 1024 threads: 32 warps walk the tile's 64 pixels' lists, two each, and the binning
      // passes take a round or two (perf notes round B30: the kernel waits on loads; against
      // 256 threads the lgather took 0.62-0.87x the time at 512 threads, 0.59-0.83x at 1024,
      // where the 64-register cap spills 4 words on R <= 4)
      lg.threads = p.gin_mode == 6 ? 512 : 1024;  // 6: 64-bit sums, 16 more registers
      const int64_t cand = int64_t(lg.rows) * lg.cols * d.taps();
      const int64_t cells = int64_t(lg.tile + 1) * (lg.tile + 1);
      lg.smem_bytes = 16 * cand + 4 * 128 * lg.per_block * d.taps() + 4 * (2 * cells + 1);
      if (v.halo < 0 || v.halo > 8) bad("halo", fmt::format("halo={} must be in [0, 8]", v.halo));
      if (lg.smem_bytes > 200 * 1024)
        bad("halo", fmt::format("gin=local with halo={} needs {} bytes of shared memory (max "
                                "204800)", v.halo, lg.smem_bytes));
      if (int64_t(lg.tiles_y) * lg.tiles_x > 2147483647 || d.n > 65535 ||
          d.offset_groups * ceil_div(lg.slices, lg.per_block) > 65535)
        bad("n", "the local gather's grid is too large");
    }
    if (v.fuse_gw) {
      plan_bwd_data_dw_fused(d, v, p, m_total);  // its own layout, grid and weight staging
    } else {
      int64_t gx = ceil_div(m_total, p.bp);
      if (v.staging == Staging::window) gx = plan_bwd_data_dw_window(d, v, p);
      // lanes on channels (channels-last input): a lane's weights weight[c][tap] are taps x
      // dtype bytes apart, a warp's load touches 32 sectors, so the block stages them once in
      // shared memory as [tap][channel] (within 96 KiB: two blocks an SM keep their share)
      const int64_t wsm_bytes = d.taps() * d.c_per_offset_group() * asize;
      if (v.staging != Staging::window && p.x_nhwc && wsm_bytes <= 96 * 1024) {
        p.dw_wsmem = true;
        p.smem_bytes = int(wsm_bytes);
        // the channel step's grad_out vector (a channels-last grad_out, not the runtime's copy)
        if (p.ev > 1 && !p.gout_t) p.align_gout = std::max(p.align_gout, p.ev * dtype_size(d.dtype));
      }
      if (gx > 2147483647 || d.offset_groups > 65535)
        bad("n", fmt::format("the launch grid {}x{} is too large", gx, d.offset_groups));
      p.grid = {unsigned(gx), unsigned(d.offset_groups), 1};
    }
  } else if (wgd) {
    plan_bwd_data_wgmma(d, v, p, m_total, in_elems);
  } else if (d.pass == Pass::backward_data) {
    p.template_name = "deform_conv_bwd_data.cuh";
    p.kernel_name = "deft_deform_conv2d_backward_data";
    p.bp = v.tile_m;
    p.bk = v.tile_k;
    if (p.bp < 16) bad("tm", fmt::format("tm={} must be at least 16", p.bp));
    if (p.bk > 64) bad("tk", fmt::format("tk={} must be at most 64", p.bk));
    p.bc = pow2_divisor(common, v.tile_n);
    int threads = 0;
    if (p.use_tc) {
      if (p.bc < 16 || p.bp % 16 != 0)
        bad("tn", fmt::format("algo=gemm_tc needs 16-channel steps inside the groups and offset "
                              "groups (have {}) and tm a multiple of 16", p.bc));
      if (p.bk % p.wk != 0) bad("tk", fmt::format("tk={} must be a multiple of {}", p.bk, p.wk));
      threads = split_fragments(p, (p.bc / 16) * (p.bp / 16), v.threads);
      if (threads % p.bp != 0)
        bad("tm", fmt::format("tm={} must divide threads={}", p.bp, threads));
    } else {
    p.tn = std::min(4, p.bc);
    p.tm = 1;
    while (p.tm * 2 <= p.bc / p.tn && (p.bc / p.tm) * (p.bp / p.tn) > v.threads) p.tm *= 2;
    threads = (p.bc / p.tm) * (p.bp / p.tn);
    }
    if (threads % 32 != 0 || threads > 1024)
      bad("tm", fmt::format("tm={} with {} channels per step gives {} threads (a multiple of 32 "
                            "up to 1024 is needed)", p.bp, p.bc, threads));
    // vec: the epilogue's channels a thread; 4 asks the streaming kernel for vectors (the
    // resident tensor-core kernel has them wherever its layer allows)
    if (v.vec != 1 && v.vec != 4)
      bad("vec", fmt::format("pass=backward_data with algo={} has vec=1 or 4, not {}",
                             to_string(v.algo), v.vec));
    p.block = threads;
    p.tpp = threads / p.bp;
    const int ssize = p.use_tc ? (d.dtype == DType::f32 ? 4 : 2) : asize;
    if (v.deterministic) p.gin_mode = 2;
    else p.gin_mode = (d.dtype == DType::f16 || d.dtype == DType::bf16 || p.transpose) ? 1 : 0;
    if (p.use_tc) plan_bwd_data_resident(d, p, ssize, asize);
    if (p.nstage == 0) {
      // vec=4 (opt-in): the epilogue takes 4 neighbouring channels a thread: one vector load
      // per corner and, into an f32 workspace, one red.global.add.v4.f32 per corner instead of
      // 4 atomics; channels-last input and a grad-input workspace (the caller's grad input is
      // not known to be 16-byte aligned)
      p.ev = 1;
      if (v.vec == 4) {
        const char* why = !p.x_nhwc ? "channels-last input (nhwc, or transpose=1)"
                          : p.gin_mode == 0
                              ? "a grad-input workspace (f16/bf16, transpose=1 or det=1; strict "
                                "f32 nhwc scatters into the caller's grad input)"
                          : asize != 4                        ? "f32 accumulation (not f64)"
                          : d.c_per_offset_group() % 4 != 0   ? "c/offset_groups a multiple of 4"
                          : p.bc % (4 * p.tpp) != 0           ? "channel steps of 4 x threads a pixel"
                                                              : nullptr;
        if (why) bad("vec", fmt::format("vec=4 needs {}", why));
        p.ev = 4;
        if (!p.transpose) p.align_input = 4 * dtype_size(d.dtype);  // corner vectors
      }
      const int smem = ssize * p.bk * (p.bc + p.bp + 2 * p.a_pad) +
                       asize * (p.bc * (p.bp + 4) + 3 * threads);
      if (smem > 48 * 1024)
        bad("tm", fmt::format("the tiles need {} bytes of shared memory (max 49152)", smem));
      p.smem_bytes = 0;  // static shared memory
    }
    p.workspace_bytes =
        32 + (p.gin_mode >= 2 ? 8 : p.gin_mode == 1 ? asize : 0) * in_elems;
    const int64_t gx = ceil_div(m_total, p.bp);
    if (gx > 2147483647 || d.offset_groups > 65535)
      bad("n", fmt::format("the launch grid {}x{}x{} is too large", gx, d.taps(), d.offset_groups));
    p.grid = {unsigned(gx), unsigned(d.taps()), unsigned(d.offset_groups)};
  } else if (dww) {
    plan_bwd_weight_dw(d, v, p, asize, m_total);
  } else if (wgw) {
    plan_bwd_weight_wgmma(d, v, p, m_total);
  } else {
    p.template_name = "deform_conv_bwd_weight.cuh";
    p.kernel_name = "deft_deform_conv2d_backward_weight";
    p.bc = pow2_divisor(common, v.tile_n);
    int bo = 1;
    while (bo < v.tile_m && bo < d.k_per_group()) bo *= 2;
    p.bo = bo;
    if (p.use_tc) {
      if (p.bc < 16 || p.bo < 16)
        bad("tn", fmt::format("algo=gemm_tc needs at least 16 output channels (have {}) and "
                              "16-channel steps inside the groups and offset groups (have {})",
                              p.bo, p.bc));
      p.bpw = v.tile_k;
      if (p.bpw % p.wk != 0) bad("tk", fmt::format("tk={} must be a multiple of {}", p.bpw, p.wk));
      p.block = split_fragments(p, (p.bo / 16) * (p.bc / 16), v.threads);
      const int ssize = d.dtype == DType::f32 ? 4 : 2;
      const int tiles_bytes = ssize * p.bpw * (p.bc + p.bo + 2 * p.a_pad) + asize * p.bpw * 4 +
                              8 * p.bpw * 4;
      const int red_bytes = asize * p.bo * (p.bc + 4);
      p.smem_bytes = std::max(tiles_bytes, red_bytes);
      plan_bwd_weight_vector(d, p, ssize);
    } else {
    p.tmo = std::min(4, p.bo);
    p.tnc = std::min(4, p.bc);
    const int basen = (p.bo / p.tmo) * (p.bc / p.tnc);
    if (basen > v.threads)
      bad("threads", fmt::format("threads={} is fewer than the {} a {}x{} tile needs", v.threads,
                                 basen, p.bo, p.bc));
    p.ksplit = v.threads / basen;
    p.block = basen * p.ksplit;
    if (p.block % 32 != 0)
      bad("threads", fmt::format("a {}x{} tile gives {} threads, not a multiple of 32", p.bo,
                                 p.bc, p.block));
    p.bpw = std::max(v.tile_k, p.ksplit);
    const int tiles_bytes = asize * p.bpw * ((p.bc + 1) + (p.bo + 1) + 4) + 8 * p.bpw * 4;
    const int red_bytes = asize * p.block * p.tmo * p.tnc;
    p.smem_bytes = std::max(tiles_bytes, red_bytes);
    }
    if (p.smem_bytes > 113 * 1024)
      bad("tk", fmt::format("the tiles need {} bytes of shared memory (max 115712)", p.smem_bytes));
    plan_weight_splits(d, p, m_total, 2048, asize);
  }
}

}  // namespace

int wgmma_threads(Pass pass, int tm, int tn, int producers) {
  const int consumers = tm / 64 * (pass == Pass::forward ? std::max(1, tn / 256) : 1);
  return 128 * (consumers + producers);
}

int dw_weight_taps_per_block(const LayerDesc& d, int vec) {
  // as few batches as keep taps x vec within 36 sums, the taps shared evenly among them
  const int64_t batches = std::max<int64_t>(1, (d.taps() * std::max(vec, 1) + 35) / 36);
  return int((d.taps() + batches - 1) / batches);
}

int wgmma_window_rows(const LayerDesc& d, int bm, int halo) {
  const int64_t pix = d.out_h() * d.out_w(), wo = d.out_w();
  int64_t span = 1;  // most output rows one block's pixels (of one image) cover
  const int64_t blocks = ceil_div(d.n * pix, bm);
  for (int64_t b = 0; b < std::min<int64_t>(blocks, pix); ++b) {  // the starts repeat after pix
    const int64_t p0 = (b * bm) % pix, p1 = std::min(p0 + bm - 1, pix - 1);
    span = std::max(span, p1 / wo - p0 / wo + 1);
  }
  // rows of the taps' sampling points at zero offset, plus the bilinear second row below them
  return int((span - 1) * d.stride_h + (d.r - 1) * d.dil_h + 2 + 2 * int64_t(halo));
}

GatherLayout gather_layout(const LayerDesc& d, const KernelPlan& p) {
  return gather_layout(d, p.gather_direct);
}

GatherLayout gather_layout(const LayerDesc& d, bool direct) {
  GatherLayout g;
  g.points = d.n * d.out_h() * d.out_w() * d.offset_groups * d.taps();
  g.cells = d.n * d.offset_groups * (d.h + 1) * (d.w + 1);
  int64_t at = 0;
  auto take = [&](int64_t bytes) {
    const int64_t off = at;
    at += align256(bytes);
    return off;
  };
  g.counts = take(4 * (g.cells + 1));
  g.zero_bytes = at;
  g.cell_of = take(4 * g.points);
  g.rank = take(4 * g.points);
  g.frac = take(8 * g.points);
  g.list = take(4 * g.points);
  g.values = take(direct ? 0 : 4 * g.points * d.c_per_offset_group());
  g.bytes = at;
  return g;
}

KernelPlan make_plan(const LayerDesc& d, const Variant& v) {
  validate(d);
  require_implemented(d);
  KernelPlan p;
  switch (d.dtype) {
    case DType::f32: p.t = "float"; p.acc = "float"; p.pos = "float"; break;
    case DType::f16: p.t = "__half"; p.acc = "float"; p.pos = "float"; break;
    case DType::bf16: p.t = "__nv_bfloat16"; p.acc = "float"; p.pos = "float"; break;
    case DType::f64: p.t = "double"; p.acc = "double"; p.pos = "double"; break;
  }
  if (v.stages != 0 && v.algo != Algo::gemm_wgmma)
    bad("stages", fmt::format("stages={} applies to algo=gemm_wgmma only", v.stages));
  if (v.producers != 0 && (v.algo != Algo::gemm_wgmma || d.pass == Pass::backward_data))
    bad("producers", fmt::format("producers={} applies to algo=gemm_wgmma (forward and "
                                 "backward_weight) only", v.producers));
  if (v.batch != 0 && !(v.algo == Algo::gemm_wgmma && d.pass == Pass::backward_weight && v.producers > 0))
    bad("batch", fmt::format("batch={} applies to algo=gemm_wgmma pass=backward_weight with "
                             "producers only", v.batch));
  if (v.gin_gather && !(v.algo == Algo::depthwise && d.pass == Pass::backward_data))
    bad("gin", "gin=gather applies to algo=depthwise pass=backward_data only");
  if (v.gin_local && !(v.algo == Algo::depthwise && d.pass == Pass::backward_data))
    bad("gin", "gin=local applies to algo=depthwise pass=backward_data only");
  if (v.fuse_gw && !(v.algo == Algo::depthwise && d.pass == Pass::backward_data))
    bad("gw", "gw=fused applies to algo=depthwise pass=backward_data only");
  if (v.staging == Staging::gather && v.halo != 0 && !v.gin_local)
    bad("halo", fmt::format("halo={} applies to staging=window or gin=local only", v.halo));
  if (d.pass != Pass::forward) {
    if (v.staging != Staging::gather &&
        !(v.algo == Algo::depthwise && d.pass == Pass::backward_data))
      throw NotImplemented(fmt::format("not implemented: staging=window has a backward kernel "
                                       "for algo=depthwise pass=backward_data only, not algo={} "
                                       "pass={}", to_string(v.algo), to_string(d.pass)));
    plan_backward(d, v, p);
    // the gather forms (gin_mode 3, 4) sum into a channels-last workspace whatever the
    // input's layout; the others in the layout they read the input in
    p.ws_nhwc = d.pass == Pass::backward_data && (p.x_nhwc || p.gin_mode >= 3);  // (5: local)
    p.wide_offsets = d.h * d.w * (d.layout == Layout::nhwc ? d.c : 1) >= (int64_t{1} << 31);
    return p;
  }
  if (v.deterministic)
    bad("det", "det=1 applies to the backward passes only");
  if (v.threads < 32 || v.threads > 1024 || v.threads % 32 != 0)
    bad("threads", fmt::format("threads={} must be a multiple of 32 in [32, 1024]", v.threads));
  if (v.staging != Staging::gather && v.algo != Algo::gemm_wgmma && v.algo != Algo::depthwise)
    throw NotImplemented(fmt::format("not implemented: staging=window has a forward kernel for "
                                     "algo=gemm_wgmma and algo=depthwise only, not algo={}",
                                     to_string(v.algo)));
  p.block = v.threads;
  p.x_nhwc = p.w_krsc = d.layout == Layout::nhwc;
  if (v.transpose) {
    if (d.layout != Layout::nhwc) {
      p.transpose = p.x_nhwc = p.w_krsc = true;
      p.workspace_input_bytes = d.n * d.c * d.h * d.w * dtype_size(d.dtype);
      p.workspace_weight_bytes = d.k * d.c_per_group() * d.taps() * dtype_size(d.dtype);
      if (d.n > 65535 || d.k > 65535)
        bad("transpose", fmt::format("transpose=1 handles n and k up to 65535, not n={} k={}",
                                     d.n, d.k));
    } else {
      bad("transpose", "transpose=1 applies only to nchw layers");
    }
  }

  switch (v.algo) {
    case Algo::gemm_simt:
    case Algo::gemm_tc: {
      p.template_name = "deform_conv_gemm.cuh";
      for (auto [f, x] : {std::pair<const char*, int>{"tm", v.tile_m}, {"tn", v.tile_n},
                          {"tk", v.tile_k}})
        if (!pow2(x) || x > 256)
          bad(f, fmt::format("{}={} must be a power of two no larger than 256", f, x));
      p.use_tc = v.algo == Algo::gemm_tc;
      const int bm = v.tile_m, bn = v.tile_n, bk = v.tile_k, th = v.threads;
      if ((bm * bk) % th != 0)
        bad("tk", fmt::format("tm*tk={} must be a multiple of threads={}", bm * bk, th));
      p.a_elems = bm * bk / th;
      if (th % bm != 0)  // one output pixel per thread in the A gather
        bad("threads", fmt::format("threads={} must be a multiple of tm={}", th, bm));
      if ((bn * bk) % th != 0)
        bad("tn", fmt::format("tn*tk={} must be a multiple of threads={}", bn * bk, th));
      p.b_elems = bn * bk / th;
      if (p.a_elems > 32 || p.b_elems > 32)
        bad("threads", fmt::format("threads={} leaves {} A and {} B elements per thread (max 32)",
                                   th, p.a_elems, p.b_elems));
      if (p.use_tc) {
        if (d.dtype == DType::f64 || (d.dtype == DType::f32 && d.math != MathMode::tf32))
          bad("algo", fmt::format("algo=gemm_tc needs dtype f16/bf16 or math=tf32, not dtype={} "
                                  "math={}", to_string(d.dtype), to_string(d.math)));
        if (d.dtype == DType::f32) {
          p.stage = "float";
          p.tc_in = "nvcuda::wmma::precision::tf32";
          p.wk = 8;
          p.a_pad = p.b_pad = 4;
        } else {
          p.stage = p.t;
          p.tc_in = p.t;
          p.wk = 16;
          p.a_pad = p.b_pad = 8;
        }
        if (bk % p.wk != 0) bad("tk", fmt::format("tk={} must be a multiple of {}", bk, p.wk));
        const int warps = th / 32;
        // Warp grid: the split whose warp tile needs the fewest fragment loads per mma,
        // (fm + fn) / (fm * fn), i.e. the squarest warp tile.
        p.wm = 0;
        double best = 1e9;
        for (int wm = 1; wm <= warps; wm *= 2) {
          const int wn = warps / wm;
          if (warps % wm != 0 || bm % (16 * wm) != 0 || bn % (16 * wn) != 0) continue;
          const int fm = bm / (16 * wm), fn = bn / (16 * wn);
          const double cost = double(fm + fn) / (fm * fn);
          if (cost < best - 1e-9) best = cost, p.wm = wm;
        }
        if (p.wm == 0)
          bad("tn", fmt::format("a {}x{} tile does not split over {} warps of 16x16 fragments",
                                bm, bn, warps));
        p.wn = warps / p.wm;
        if (bm % (16 * p.wm) != 0 || bn % (16 * p.wn) != 0)
          bad("tn", fmt::format("a {}x{} tile does not split over a {}x{} warp grid of 16x16 "
                                "fragments", bm, bn, p.wm, p.wn));
        p.fm = bm / (16 * p.wm);
        p.fn = bn / (16 * p.wn);
        if (p.fm * p.fn > 16)
          bad("threads", fmt::format("{} fragments per warp is too many (max 16)", p.fm * p.fn));
      } else {
        p.stage = d.dtype == DType::f64 ? "double" : "float";
        // Rows padded by 4 elements where the stores into the k-major tiles run along k
        // (channels-last gathers, krsc weight): 2-way instead of 4- to 16-way bank conflicts,
        // rows still 16-byte aligned for the micro-tile's vector reads.
        p.a_pad = p.x_nhwc ? 4 : 0;
        p.b_pad = p.w_krsc ? 4 : 0;
        p.tn = std::max(1, bn / 16);
        if ((bm * bn) % (th * p.tn) != 0)
          bad("threads", fmt::format("threads={} cannot split a {}x{} tile", th, bm, bn));
        p.tm = bm * bn / (th * p.tn);
        if (p.tm < 1 || bm % p.tm != 0 || p.tm * p.tn > 64)
          bad("threads", fmt::format("threads={} gives a {}x{} micro-tile for a {}x{} tile", th,
                                     p.tm, p.tn, bm, bn));
      }
      const int stage_size = p.stage == "double" ? 8 : (p.stage == "float" ? 4 : 2);
      const int tsize0 = dtype_size(d.dtype);
      // 16-byte weight loads along the reduction: krsc weight, whole vectors in a group.
      p.vec_b = p.use_tc && p.w_krsc && d.c_per_group() % (16 / tsize0) == 0 &&
                (bn * bk) % (th * (16 / tsize0)) == 0 && bk % (16 / tsize0) == 0;
      const int a_tile = p.use_tc ? bm * (bk + p.a_pad) : bk * (bm + p.a_pad);
      const int b_tile = p.vec_b ? bn * (bk + p.b_pad) : bk * (bn + p.b_pad);
      const int ab = 2 * (a_tile + b_tile) * stage_size;
      // 16-byte corner loads: nhwc, whole vectors inside one group and one offset group.
      const int tsize = dtype_size(d.dtype);
      p.vec_a = p.x_nhwc && (p.a_elems * tsize) % 16 == 0 &&
                d.c_per_group() % p.a_elems == 0 && d.c_per_offset_group() % p.a_elems == 0;
      const int scratch = p.use_tc ? (th / 32) * 16 * 16 * 4 : 0;
      p.smem_bytes = std::max(ab, scratch);
      // Dynamic shared memory; above 48 KiB the launcher raises the kernel's limit. 96 KiB
      // fits every architecture from sm_80 on.
      if (p.smem_bytes > 96 * 1024)
        bad("tk", fmt::format("the tiles need {} bytes of shared memory (max 98304)",
                              p.smem_bytes));
      const int64_t m_total = d.n * d.out_h() * d.out_w();
      const int64_t gx = ceil_div(m_total, bm), gy = ceil_div(d.k_per_group(), bn);
      if (gx > 2147483647 || gy > 65535 || d.groups > 65535)
        bad("n", fmt::format("the launch grid {}x{}x{} is too large", gx, gy, d.groups));
      p.grid = {unsigned(gx), unsigned(gy), unsigned(d.groups)};
      break;
    }
    case Algo::gemm_wgmma: {
      p.template_name = "deform_conv_wgmma.cuh";
      p.wgmma = true;
      if (d.dtype != DType::f16 && d.dtype != DType::bf16 &&
          !(d.dtype == DType::f32 && d.math == MathMode::tf32))
        bad("algo", fmt::format("algo=gemm_wgmma needs dtype f16, bf16, or f32 with math=tf32, not "
                                "dtype={} math={}", to_string(d.dtype), to_string(d.math)));
      const int esize = dtype_size(d.dtype), vec = 16 / esize;
      p.wgmma_chunk = 64 / esize;
      if (!p.x_nhwc)
        bad("transpose", "algo=gemm_wgmma reads the input channels-last: nchw layers need transpose=1");
      // The weight is packed from its own layout by deft_pack_weight, never transposed.
      p.w_krsc = d.layout == Layout::nhwc;
      p.workspace_weight_bytes = 0;
      if (d.c_per_group() % vec != 0 || d.c_per_offset_group() % vec != 0)
        bad("algo", fmt::format("algo=gemm_wgmma needs c/groups={} and c/offset_groups={} to be "
                                "multiples of {} (16-byte channel vectors of {})",
                                d.c_per_group(), d.c_per_offset_group(), vec, to_string(d.dtype)));
      const bool ws = v.producers != 0;
      if (v.tile_m != 64 && v.tile_m != 128)
        bad("tm", fmt::format("algo=gemm_wgmma has tm=64 or 128 (one or two warpgroups), not {}", v.tile_m));
      if (v.tile_n != 64 && v.tile_n != 128 && v.tile_n != 256 && !(ws && v.tile_n == 512))
        bad("tn", fmt::format("algo=gemm_wgmma has tn=64, 128 or 256{}, not {}",
                              ws ? " or 512" : " (512 with producers)", v.tile_n));
      if (v.tile_k != p.wgmma_chunk)
        bad("tk", fmt::format("algo=gemm_wgmma reduces {}-channel chunks for {}: tk={}, not {}",
                              p.wgmma_chunk, to_string(d.dtype), p.wgmma_chunk, v.tile_k));
      if (ws) {
        if (v.producers < 1 || v.producers > 2)
          bad("producers", fmt::format("producers={} must be 1 or 2 (warpgroups)", v.producers));
        if (v.staging != Staging::gather)
          bad("staging", "staging=window has no warp-specialised form: producers=0");
        p.ws_producers = v.producers;
        p.ws_cm = v.tile_m / 64;
        const int cn = v.tile_n > 256 ? v.tile_n / 256 : 1;
        p.ws_consumers = p.ws_cm * cn;
        p.ws_bnw = v.tile_n / cn;
        // two 64 x 256 accumulators (128 registers a thread each) fill the register file
        if (p.ws_consumers > 2)
          bad("tn", fmt::format("tm={} tn={} needs {} consumer warpgroups of 64 x 256 (max 2)",
                                v.tile_m, v.tile_n, p.ws_consumers));
        const int want = wgmma_threads(Pass::forward, v.tile_m, v.tile_n, v.producers);
        if (v.threads != want)
          bad("threads", fmt::format("algo=gemm_wgmma tm={} tn={} producers={} runs {} consumer "
                                     "and {} producer warpgroups: threads={}, not {}", v.tile_m,
                                     v.tile_n, v.producers, p.ws_consumers, v.producers, want,
                                     v.threads));
        // a consumer's accumulators (bnw / 2 registers) plus ~30 within the threads' share of
        // the 64 K registers (ptxas compiles the kernel to the entry count: 512 threads leave
        // 128, too few for a 64 x 256 accumulator)
        if (65536 / want < p.ws_bnw / 2 + 30)
          bad("producers", fmt::format("producers={} with {} consumer warpgroups of 64 x {} is {} "
                                       "threads, leaving {} registers a thread: too few for the "
                                       "accumulators", v.producers, p.ws_consumers, p.ws_bnw,
                                       want, 65536 / want));
        p.ws_row_bytes = (v.tile_m * 4 + 127) / 128 * 128;
      } else if (v.threads != 2 * v.tile_m) {
        bad("threads", fmt::format("algo=gemm_wgmma runs a warpgroup per 64 rows: tm={} needs "
                                   "threads={}, not {}", v.tile_m, 2 * v.tile_m, v.threads));
      }
      if (d.h * d.w * d.c >= (int64_t{1} << 31))
        bad("algo", "algo=gemm_wgmma needs an image of fewer than 2^31 elements");
      const int bm = v.tile_m, bn = v.tile_n;
      // Offset groups that one weight group's channels touch.
      const int64_t cg = d.c_per_group(), cpog = d.c_per_offset_group();
      int64_t nog = 1;
      for (int64_t g = 0; g < d.groups; ++g)
        nog = std::max(nog, ((g + 1) * cg - 1) / cpog - g * cg / cpog + 1);
      p.nog = int(nog);
      p.pts_bytes = int(nog * d.taps() * bm * 32);
      if (v.staging == Staging::window) {
        // Input rows a block's pixels cover (one image: the first pixel's), with the halo.
        if (d.taps() < 3)
          bad("staging", fmt::format("staging=window loads one chunk ahead and needs at least 3 "
                                     "taps, not r x s = {}", d.taps()));
        if (v.halo < 0 || v.halo > 64)
          bad("halo", fmt::format("halo={} must be in [0, 64]", v.halo));
        p.window = true;
        p.wrows = wgmma_window_rows(d, bm, v.halo);
        p.win_bytes = int64_t(p.wrows) * d.w * 64;
      }
      const int64_t epi = (d.layout == Layout::nhwc ? int64_t(bm) * (bn + 8) : int64_t(bn) * (bm + 8)) * esize;
      constexpr int64_t kMaxSmem = 227 * 1024;  // sm_90's dynamic shared memory per block
      if (ws) {
        // The ring: per slot an A stage (bm rows x 64 bytes) and a B stage (bn x 64 bytes), and
        // two mbarriers; before it the points and the rows' image table. A producer warp waits
        // for its slot's previous round by the phase parity of the slot's "empty" barrier, which
        // names the round only modulo 2: no warp may run more than one round ahead, so the ring
        // holds at least one slot per producer warp. Two blocks per SM where the accumulators
        // (bnw / 2 registers a thread) and the shallowest ring allow them, else one with the
        // deepest ring up to 8 that fits.
        const int min_ns = 4 * v.producers;
        if (v.stages != 0 && (v.stages < min_ns || v.stages > 8))
          bad("stages", fmt::format("algo=gemm_wgmma producers={} ({} producer warps) has a ring of "
                                    "stages={} to 8, not {}", v.producers, min_ns, min_ns, v.stages));
        auto ws_bytes = [&](int ns) {
          return p.pts_bytes + p.ws_row_bytes + int64_t(ns) * (bm + bn) * 64 + 16 * ns;
        };
        // (a producer lane keeps 16 or 32 corner vectors in flight: 96 registers at least)
        const bool two = 65536 / (2 * v.threads) >= std::max(p.ws_bnw / 2 + 48, 96) &&
                         2 * (std::max(ws_bytes(v.stages ? v.stages : min_ns), epi) + 1024) <= 228 * 1024;
        p.min_blocks = two ? 2 : 1;
        const int64_t limit = two ? 228 * 1024 / 2 - 1024 : kMaxSmem;
        p.nstage = 0;
        for (int ns = 8; ns >= min_ns; --ns)
          if ((v.stages == 0 || ns == v.stages) && ws_bytes(ns) <= limit) {
            p.nstage = ns;
            break;
          }
        if (p.nstage == 0)
          bad("tm", fmt::format("the sampling points of {} taps x {} offset groups x {} rows and a "
                                "{}-stage ring (one slot per producer warp) need {} bytes of shared "
                                "memory (max {})", d.taps(), nog, bm, v.stages ? v.stages : min_ns,
                                ws_bytes(v.stages ? v.stages : min_ns), limit));
        // The epilogue tile reuses the points and the ring, but not the mbarriers after them
        // (memory of an mbarrier may be reused only after mbarrier.inval).
        const int64_t barriers_at = ws_bytes(p.nstage) - 16 * p.nstage;
        if (epi > barriers_at)
          bad("stages", fmt::format("the epilogue tile ({} bytes) would overlap the ring's "
                                    "mbarriers at byte {} with stages={}: take a deeper ring",
                                    epi, barriers_at, p.nstage));
        p.smem_bytes = int(std::max<int64_t>(ws_bytes(p.nstage), epi));
      }
      if (!ws && v.stages != 0 && (v.stages < 2 || v.stages > 4))
        bad("stages", fmt::format("algo=gemm_wgmma has a weight ring of stages=2, 3 or 4, not {}", v.stages));
      // points, the ring, its mbarriers (64 bytes kept) and the two window buffers
      auto main_bytes = [&](int ns) { return p.pts_bytes + int64_t(ns) * bn * 64 + 64 + 2 * p.win_bytes; };
      if (!ws) {
      p.nstage = 0;
      // A window variant takes the deepest ring that still leaves two blocks per SM (228 KiB,
      // 1 KiB each for the driver), where one exists.
      if (p.window && v.stages == 0)
        for (int ns : {4, 3, 2})
          if (2 * (std::max(main_bytes(ns), epi) + 1024) <= 228 * 1024) {
            p.nstage = ns;
            break;
          }
      if (p.nstage == 0)
        for (int ns : {4, 3, 2})
          if ((v.stages == 0 || ns == v.stages) && main_bytes(ns) <= kMaxSmem) {
            p.nstage = ns;
            break;
          }
      if (p.nstage == 0 && p.window)
        bad("halo", fmt::format("the input window ({} rows x {} pixels x 64 bytes, two buffers) and "
                                "the sampling points of {} rows need {} bytes of shared memory "
                                "with a 2-stage ring (max {})", p.wrows, d.w, bm, main_bytes(2),
                                kMaxSmem));
      if (p.nstage == 0)
        bad("tm", fmt::format("the sampling points of {} taps x {} offset groups x {} rows need {} "
                              "bytes of shared memory (max {})", d.taps(), nog, bm, p.pts_bytes, kMaxSmem));
      p.smem_bytes = int(std::max<int64_t>(main_bytes(p.nstage), epi));
      }
      // Output stores as wide as they can be (16, 8 or 4 bytes) while staying inside one
      // group's channels (nhwc) or one image's pixels (nchw).
      const int64_t fast = d.layout == Layout::nhwc ? d.k_per_group() : d.out_h() * d.out_w();
      p.out_store = esize;
      for (int b : {16, 8, 4})
        if (b >= esize && fast % (b / esize) == 0) {
          p.out_store = b;
          break;
        }
      p.block = v.threads;
      const int64_t m_total = d.n * d.out_h() * d.out_w();
      const int64_t gx = ceil_div(m_total, bm), nt = ceil_div(d.k_per_group(), bn);
      if (gx > 2147483647 || nt > 65535 || d.groups > 65535)
        bad("n", fmt::format("the launch grid {}x{}x{} is too large", gx, nt, d.groups));
      p.grid = {unsigned(gx), unsigned(nt), unsigned(d.groups)};
      const int64_t stages = ceil_div(cg, p.wgmma_chunk) * d.taps();
      p.workspace_packed_bytes = int64_t(d.groups) * nt * stages * bn * 64;
      p.pack_blocks = int64_t(d.groups) * nt * ceil_div(cg, p.wgmma_chunk) * (bn / 8);
      if (p.transpose)
        p.transpose_blocks = ceil_div(d.h * d.w, 64) * ceil_div(d.c, 64) * d.n;
      if (p.pack_blocks + p.transpose_blocks > 2147483647)
        bad("n", fmt::format("the pre-pass grid of {} blocks is too large",
                             p.pack_blocks + p.transpose_blocks));
      break;
    }
    case Algo::depthwise: {
      p.template_name = "deform_conv_depthwise.cuh";
      if (d.c_per_group() != 1 || d.k_per_group() != 1)
        bad("algo", fmt::format("algo=depthwise needs groups == c == k, not groups={} c={} k={}",
                                d.groups, d.c, d.k));
      check_depthwise_vec(d, v, p);
      const int vec = v.vec, tsize = dtype_size(d.dtype);
      const int tpc = v.tile_n / vec;
      if (v.threads % tpc != 0)
        bad("tn", fmt::format("threads={} must be a multiple of tn/vec={}", v.threads, tpc));
      if (v.staging == Staging::gather && v.tile_m != v.threads / tpc)
        bad("tm", fmt::format("tm={} must equal the pixels per block, threads*vec/tn={}",
                              v.tile_m, v.threads / tpc));
      p.vec = vec;
      p.ch_per_block = v.tile_n;
      p.pix_per_block = v.threads / tpc;
      p.t_size = tsize;
      const int64_t m_total = d.n * d.out_h() * d.out_w();
      int64_t gx = ceil_div(m_total, p.pix_per_block);
      const int64_t gy = ceil_div(d.c, v.tile_n);
      if (v.staging == Staging::window) gx = plan_fwd_dw_window(d, v, p);
      if (gx > 2147483647 || gy > 65535)
        bad("n", fmt::format("the launch grid {}x{} is too large", gx, gy));
      p.grid = {unsigned(gx), unsigned(gy), 1};
      break;
    }
  }
  // 16-byte gathers of the input (A tile vectors, wgmma, depthwise vectors) and weight loads,
  // unless they read the transpose pre-pass's copies; wgmma stores out_store bytes at a time.
  const bool depthwise_vec = v.algo == Algo::depthwise && depthwise_vec_path(d, p, p.vec);
  if (!p.transpose && (p.vec_a || p.wgmma || depthwise_vec)) p.align_input = 16;
  // (the wgmma forward's weight pack reads the weight in 16-byte vectors in either layout)
  if (p.wgmma || (!p.transpose && p.vec_b)) p.align_weight = 16;
  if (p.wgmma) p.align_output = p.out_store;
  if (depthwise_vec && d.pass == Pass::forward && d.h >= 2 && d.w >= 2) {
    // the block's weights staged in shared memory as [tap][channel] (16 KiB at most)
    p.dw_wvec = int64_t(d.taps()) * v.tile_n * dtype_size(d.dtype) <= 16384;
    p.dw_out_vec = d.layout == Layout::nhwc;
    if (p.dw_out_vec) p.align_output = 16;
  }
  p.wide_offsets = d.h * d.w * (d.layout == Layout::nhwc ? d.c : 1) >= (int64_t{1} << 31);
  return p;
}

}  // namespace deft
