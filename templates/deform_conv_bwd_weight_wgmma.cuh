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
// Constants from codegen: BO (64 per warpgroup), BN (64 or 128), THREADS (2 * BO), SPLITS,
// SPLIT_PIX (a multiple of 64), MIN_BLOCKS, and deft_wgmma_kstep() for BN with B transposed.

constexpr int KP = 64;                       // pixels per chunk
constexpr int VEC = 8;                       // channels per 16-byte vector
constexpr int NV = BN / VEC;                 // vectors per pixel row of a chunk
constexpr int WARPS = THREADS / 32;
constexpr int PASSES = WARPS >= 8 ? 1 : 8 / WARPS;  // pixel passes of the gather
constexpr int VGROUPS = WARPS >= 8 ? WARPS / 8 : 1;  // warps sharing a pixel's vectors
constexpr int VPT = NV / (4 * VGROUPS);              // vectors per thread per pass
constexpr int CHUNK_BYTES = KP * BN * 2;
constexpr bool GOUT_VEC = !NHWC && (HO * WO) % 4 == 0;  // 8-byte grad_out loads (4 pixels)
static_assert(sizeof(T) == 2, "16-bit elements");
static_assert(THREADS == 2 * BO && BO % 64 == 0, "one warpgroup per 64 output channels");
static_assert(VPT * 4 * VGROUPS == NV && PASSES * WARPS * 8 >= KP, "gather layout");
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

  // Gather layout: k row (slot order) r = (warp % 8) * 8 + lane % 8 (+ 32 per pass), vectors
  // lane / 8 + 4 (vgroup + VGROUPS j): 8 lanes of a store phase write 8 rows of one core.
  const int grow = (warp % 8) * 8 + lane % 8;
  const int vbase = lane / 8 + 4 * (WARPS >= 8 ? warp / 8 : 0);
  auto gather = [&](int chunk, int b) {
    unsigned char* dst = bufs + b * CHUNK_BYTES;
#pragma unroll
    for (int pass = 0; pass < PASSES; ++pass) {
      const int r = grow + pass * WARPS * 8;
      if (r >= KP) break;
      const long long m = p_begin + (long long)chunk * KP + (r / 16) * 16 + deft_slot_pixel(r % 16);
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
  };

  // A fragment of this thread: rows o0 + 64 wg + 16 (warp % 4) + gq (+ 8), k slots 2t, 2t+1,
  // 2t+8, 2t+9 of each k step = pixels 4t .. 4t+3 of the step.
  const int wg = warp / 4, gq = lane / 4, tq = lane % 4;
  const int orow = o0 + wg * 64 + (warp % 4) * 16 + gq;
  unsigned a[4][4];  // [k step][word]
  auto load_a = [&](int chunk) {
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) {
      const long long m = p_begin + (long long)chunk * KP + ks * 16 + 4 * tq;
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

  // Accumulator e of this thread: row orow + 8 ((e / 2) % 2), column 8 (e / 4) + 2 tq + e % 2.
  Acc* dst = partial + (long long)blockIdx.z * W_ELEMS;
#pragma unroll
  for (int e = 0; e < BN / 2; ++e) {
    const int o = orow + 8 * ((e / 2) % 2), col = 8 * (e / 4) + 2 * tq + e % 2;
    if (o < KG) dst[(((long long)g * KG + o) * CG + cl0 + col) * TAPS + t] = acc[e];
  }
}
