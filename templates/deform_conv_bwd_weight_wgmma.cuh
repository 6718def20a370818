// deform_conv2d backward_weight on Hopper's warpgroup tensor cores (wgmma, sm_90a), f16 and
// bf16, channels-last input (nhwc layers, or the transpose pre-pass). Same contract, grid and
// split partials as deform_conv_bwd_weight.cuh: a block owns BO output channels x BN input
// channels of one tap and conv group over one range of pixels, and writes its partial sums;
// deft_bwd_weight_reduce adds the SPLITS partials in a fixed order. The GEMM
//   grad_weight[o][c] = sum over pixels p of grad_out[p][o] * col[p][c],
//   col[p][c] = mask * bilinear sample of channel c at p's sampling point,
// runs as wgmma.m64nBNk16 with M = output channels (one warpgroup per 64), K = pixels:
//  - A, grad_out, goes from global memory straight into each thread's register fragment;
//  - B, the sampled columns, is gathered by all threads as 16-byte channel vectors (8
//    channels, one load per corner) into shared memory in the MN-major core layout (8 pixels x
//    8 channels = 128 contiguous bytes per core; cores along the channels 128 bytes apart
//    (SBO), along the pixels BN * 16 bytes (LBO)), read with the transpose bit;
//  - chunks of KP = 64 pixels (four k steps) are double-buffered: chunk i + 1's gathers and
//    A loads are issued while chunk i's wgmmas run.
// The pixels of a k step are permuted against their k slots so that thread t's four A slots
// (2t, 2t+1, 2t+8, 2t+9) are four neighbouring pixels (4t .. 4t+3): one 8-byte load per row
// for an nchw grad_out. No atomics: the result is the same every run.
//
// Warp-specialised form (WS 1, variant producers=P; opt-in, docs/perf-notes.md round B8): P
// producer warpgroups gather whole chunks into a ring of NSTAGE shared-memory stages (warpgroup
// w fills chunks w, w + P, ...), and the BO / 64 consumer warpgroups only load their grad_out
// fragments (the next chunk's while the current chunk's wgmmas run) and issue the wgmmas. Per
// slot a "full" mbarrier (one arrival per producer warp, after its proxy fence) and an "empty"
// one (one per consumer warp, once its wgmmas of the slot retired).
//
// Constants from codegen: BO (64 per warpgroup), BN (64 or 128), THREADS (2 * BO + 128 *
// PRODUCERS), SPLITS, SPLIT_PIX (a multiple of 64), MIN_BLOCKS, WS, PRODUCERS (0 without WS),
// NSTAGE (WS), and deft_wgmma_kstep() for BN with B transposed.

constexpr int KP = 64;                       // pixels per chunk
constexpr int VEC = 8;                       // channels per 16-byte vector
constexpr int NV = BN / VEC;                 // vectors per pixel row of a chunk
constexpr int CHUNK_BYTES = KP * BN * 2;
constexpr bool GOUT_VEC = !NHWC && (HO * WO) % 4 == 0;  // 8-byte grad_out loads (4 pixels)
static_assert(sizeof(T) == 2, "16-bit elements");
static_assert(THREADS == 2 * BO + 128 * PRODUCERS && BO % 64 == 0,
              "one warpgroup per 64 output channels, plus the producer warpgroups");
static_assert(SPLIT_PIX % KP == 0, "whole chunks per split");
static_assert(CG % BN == 0 && CPOG % BN == 0, "a channel tile inside one group and offset group");

// Pixel (0 .. 15) of k slot s inside a k step: slot 8b + 2a + c holds pixel 4a + 2b + c.
__device__ __forceinline__ int deft_slot_pixel(int s) {
  return 4 * ((s % 8) / 2) + 2 * (s / 8) + s % 2;
}

__device__ __forceinline__ unsigned short deft_bits(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ unsigned short deft_bits(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
__device__ __forceinline__ unsigned deft_pack2(T lo, T hi) {
  return (unsigned)deft_bits(lo) | ((unsigned)deft_bits(hi) << 16);
}

// Gathers the sampled columns of the KP pixels p0 .. of this block's tap t (offset group og,
// input channels c0 ..) into the chunk buffer dst, by GW warps (this one: warp, lane).
// Layout: k row (slot order) r = (warp % 8) * 8 + lane % 8 (+ 8 GW per pass), vectors lane / 8
// + 4 (vgroup + VGROUPS j): 8 lanes of a store phase write 8 rows of one core.
template <int GW>
__device__ __forceinline__ void deft_gather_columns(const T* __restrict__ input,
                                                    const T* __restrict__ offset,
                                                    const T* __restrict__ mask, unsigned char* dst,
                                                    long long p0, long long p_end, int t, int og,
                                                    long long c0, int warp, int lane) {
  constexpr int PASSES = GW >= 8 ? 1 : 8 / GW;  // pixel passes of the gather
  constexpr int VGROUPS = GW >= 8 ? GW / 8 : 1;  // warps sharing a pixel's vectors
  constexpr int VPT = NV / (4 * VGROUPS);        // vectors per thread per pass
  static_assert(VPT * 4 * VGROUPS == NV && PASSES * GW * 8 >= KP, "gather layout");
  const int grow = (warp % 8) * 8 + lane % 8;
  const int vbase = lane / 8 + 4 * (GW >= 8 ? warp / 8 : 0);
#pragma unroll
  for (int pass = 0; pass < PASSES; ++pass) {
    const int r = grow + pass * GW * 8;
    if (r >= KP) break;
    const long long m = p0 + (r / 16) * 16 + deft_slot_pixel(r % 16);
    SamplePoint sp;
#pragma unroll
    for (int q = 0; q < 4; ++q) sp.off[q] = 0, sp.w[q] = 0.f;
    long long n = 0;
    if (m < p_end) {
      n = m / (HO * WO);
      const int rem = int(m - n * (HO * WO));
      sp = deft_sample_point(offset, mask, n, rem / WO, rem % WO, t, og);
    }
    const T* image = input + n * ((long long)H * W * C) + c0;
    unsigned char* row = dst + (r / 8) * (BN * 16) + (r % 8) * 16;
    uint4 raw[VPT][4];
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int v = vbase + 4 * VGROUPS * j;
#pragma unroll
      for (int q = 0; q < 4; ++q)
        raw[j][q] = __ldg(reinterpret_cast<const uint4*>(image + sp.off[q] + VEC * v));
    }
    const float w[4] = {sp.w[0], sp.w[1], sp.w[2], sp.w[3]};
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int v = vbase + 4 * VGROUPS * j;
      *reinterpret_cast<uint4*>(row + v * 128) = deft_combine8(raw[j], w[0], w[1], w[2], w[3]);
    }
  }
}

// The A (grad_out) fragment of the chunk of pixels p0 ..: rows orow, orow + 8 (output channels
// of group g), k slots 2 tq, 2 tq + 1, 2 tq + 8, 2 tq + 9 of each k step = pixels 4 tq .. 4 tq + 3
// of the step.
__device__ __forceinline__ void deft_load_gout_frag(const T* __restrict__ gout, unsigned (&a)[4][4],
                                                    long long p0, long long p_end, int g, int orow,
                                                    int tq) {
#pragma unroll
  for (int ks = 0; ks < 4; ++ks) {
    const long long m = p0 + ks * 16 + 4 * tq;
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // rows orow, orow + 8
      const int o = orow + 8 * h;
      T v[4];
      if (GOUT_VEC && m + 3 < p_end && o < KG) {
        const long long n = m / (HO * WO), q = m - n * (HO * WO);
        const uint2 u = __ldg(reinterpret_cast<const uint2*>(
            gout + (n * K + (long long)g * KG + o) * (HO * WO) + q));
        a[ks][h] = u.x;
        a[ks][2 + h] = u.y;
        continue;
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const long long mm = m + e;
        v[e] = deft_from<T>(0.f);
        if (mm < p_end && o < KG) {
          const long long n = mm / (HO * WO);
          v[e] = gout[deft_gout_index(n, (long long)g * KG + o, mm - n * (HO * WO))];
        }
      }
      a[ks][h] = deft_pack2(v[0], v[1]);
      a[ks][2 + h] = deft_pack2(v[2], v[3]);
    }
  }
}

// This block's partial sums: accumulator e of this thread is row orow + 8 ((e / 2) % 2), column
// 8 (e / 4) + 2 tq + e % 2.
__device__ __forceinline__ void deft_store_weight_partial(Acc* __restrict__ partial,
                                                          const float (&acc)[BN / 2], int g,
                                                          int orow, int cl0, int t, int tq) {
  Acc* dst = partial + (long long)blockIdx.z * W_ELEMS;
#pragma unroll
  for (int e = 0; e < BN / 2; ++e) {
    const int o = orow + 8 * ((e / 2) % 2), col = 8 * (e / 4) + 2 * tq + e % 2;
    if (o < KG) dst[(((long long)g * KG + o) * CG + cl0 + col) * TAPS + t] = acc[e];
  }
}

#if !WS
extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS)
    KERNEL_NAME(const T* __restrict__ input, const T* __restrict__ offset,
                const T* __restrict__ mask, const T* __restrict__ gout,
                Acc* __restrict__ partial) {
  __shared__ __align__(128) unsigned char bufs[2 * CHUNK_BYTES];
  const unsigned buf_addr = (unsigned)__cvta_generic_to_shared(bufs);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const WeightTile wt = deft_weight_tile<BO, BN>();
  const int o0 = wt.o0, cl0 = wt.cl0, t = wt.t, g = wt.g, og = wt.og;
  const long long c0 = wt.c0, p_begin = wt.p_begin, p_end = wt.p_end;
  const int chunks = int((p_end - p_begin + KP - 1) / KP);

  // A fragment of this thread: rows o0 + 64 wg + 16 (warp % 4) + gq (+ 8).
  const int wg = warp / 4, gq = lane / 4, tq = lane % 4;
  const int orow = o0 + wg * 64 + (warp % 4) * 16 + gq;
  unsigned a[4][4];  // [k step][word]
  auto gather = [&](int chunk, int b) {
    deft_gather_columns<THREADS / 32>(input, offset, mask, bufs + b * CHUNK_BYTES,
                                      p_begin + (long long)chunk * KP, p_end, t, og, c0, warp, lane);
  };
  auto load_a = [&](int chunk) {
    deft_load_gout_frag(gout, a, p_begin + (long long)chunk * KP, p_end, g, orow, tq);
  };

  float acc[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) acc[i] = 0.f;

  if (chunks > 0) {
    gather(0, 0);
    load_a(0);
  }
#pragma unroll 1
  for (int i = 0; i < chunks; ++i) {
    // this thread's stores of chunk i visible to the tensor cores (async proxy), then every
    // thread's; chunk i - 1's wgmmas were waited for, so buffer (i + 1) % 2 is free
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();
    const unsigned b = buf_addr + (i % 2) * CHUNK_BYTES;
    deft_wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) deft_wgmma_kstep(acc, a[ks], deft_b_desc(b, ks));
    deft_wgmma_commit();
    if (i + 1 < chunks) gather(i + 1, (i + 1) % 2);
    deft_wgmma_wait<0>();
    if (i + 1 < chunks) load_a(i + 1);
  }

  deft_store_weight_partial(partial, acc, g, orow, cl0, t, tq);
}
#endif  // !WS

#if WS
extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS)
    KERNEL_NAME(const T* __restrict__ input, const T* __restrict__ offset,
                const T* __restrict__ mask, const T* __restrict__ gout,
                Acc* __restrict__ partial) {
  constexpr int CONSUMERS = BO / 64;
  extern __shared__ __align__(128) unsigned char ring[];  // NSTAGE chunks, 2 NSTAGE mbarriers
  const unsigned ring_addr = (unsigned)__cvta_generic_to_shared(ring);
  const unsigned full = ring_addr + NSTAGE * CHUNK_BYTES, empty = full + 8 * NSTAGE;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const WeightTile wt = deft_weight_tile<BO, BN>();
  const int o0 = wt.o0, cl0 = wt.cl0, t = wt.t, g = wt.g, og = wt.og;
  const long long c0 = wt.c0, p_begin = wt.p_begin, p_end = wt.p_end;
  const int chunks = int((p_end - p_begin + KP - 1) / KP);

  if (tid == 0) {
    for (int i = 0; i < NSTAGE; ++i) {
      deft_mbar_init_count(full + 8 * i, 4);               // the producer warpgroup's warps
      deft_mbar_init_count(empty + 8 * i, 4 * CONSUMERS);  // every consumer warp
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (warp >= 4 * CONSUMERS) {
    // ---- producer warpgroup pg: chunks pg, pg + PRODUCERS, ... A warpgroup runs at most one
    // round of the ring ahead (NSTAGE >= PRODUCERS), so the parity names the right phase.
    const int pg = warp / 4 - CONSUMERS;
    for (int i = pg; i < chunks; i += PRODUCERS) {
      const int slot = i % NSTAGE, round = i / NSTAGE;
      if (round > 0) deft_mbar_spin(empty + 8 * slot, (round - 1) & 1);
      deft_gather_columns<4>(input, offset, mask, ring + slot * CHUNK_BYTES,
                             p_begin + (long long)i * KP, p_end, t, og, c0, warp % 4, lane);
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // for the wgmmas
      __syncwarp();
      if (lane == 0) deft_mbar_arrive(full + 8 * slot);
    }
    return;
  }

  // ---- consumer warpgroup wg: output channels o0 + 64 wg ..
  const int wg = warp / 4, gq = lane / 4, tq = lane % 4;
  const int orow = o0 + wg * 64 + (warp % 4) * 16 + gq;
  unsigned a[2][4][4];  // [chunk parity][k step][word]
  float acc[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) acc[i] = 0.f;
  if (chunks > 0) deft_load_gout_frag(gout, a[0], p_begin, p_end, g, orow, tq);
#pragma unroll 1
  for (int i = 0; i < chunks; i += 2) {
    // two chunks a step, so that each one's A fragment set is named at compile time
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int c = i + h;
      if (c >= chunks) break;
      const int slot = c % NSTAGE;
      deft_mbar_spin(full + 8 * slot, (c / NSTAGE) & 1);  // the chunk's columns landed
      const unsigned b = ring_addr + slot * CHUNK_BYTES;
      deft_wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < 4; ++ks) deft_wgmma_kstep(acc, a[h][ks], deft_b_desc(b, ks));
      deft_wgmma_commit();
      // the next chunk's grad_out while the tensor cores work (the other fragment set)
      if (c + 1 < chunks)
        deft_load_gout_frag(gout, a[1 - h], p_begin + (long long)(c + 1) * KP, p_end, g, orow, tq);
      deft_wgmma_wait<0>();
      __syncwarp();
      if (lane == 0) deft_mbar_arrive(empty + 8 * slot);  // this warp is done with the slot
    }
  }
  deft_store_weight_partial(partial, acc, g, orow, cl0, t, tq);
}
#endif  // WS
