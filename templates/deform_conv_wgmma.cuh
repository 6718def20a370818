// deform_conv2d forward on Hopper's warpgroup tensor cores (wgmma, sm_90a), channels-last
// input; f16 and bf16 (wgmma k16), and f32 in tf32 math (wgmma k8, operands rounded to tf32).
// An implicit GEMM per weight group:
//   out[m, kout] = sum over (chunk, tap, slot) of A[m, slot] * B[slot, kout]
// Each warpgroup owns 64 output pixels (rows) and all BN output channels of the block; its
// threads sample their own rows straight into the register A fragments of
// wgmma.m64nBNkKS (no A tile in shared memory), while B, the weight, streams through an
// NSTAGE-deep ring of shared-memory stages, each filled by one bulk copy (cp.async.bulk, issued
// by thread 0) that completes on the stage's mbarrier. The bulk copy writes through the async
// proxy, which wgmma reads through, so no proxy fence is needed (a fence.proxy.async per stage
// compiles to MEMBAR.ALL.CTA, which would also wait for the corner loads in flight).
//
// One main-loop stage is one tap of one CHUNK-channel chunk: 64 bytes of channels, so 32 of
// f16/bf16 or 16 of f32, in two k steps (k16, or k8 for tf32). Thread (lane = 4 g + t) of warp
// w in its warpgroup samples rows 16 w + g and 16 w + g + 8, channels VEC t .. VEC t + VEC - 1
// of the chunk (VEC = 16 bytes of elements): one 16-byte load per corner. A k16 step's
// register fragment wants k slots 2t, 2t+1, 2t+8, 2t+9 of each row (a k8 tf32 step: t, t+4),
// so the reduction order is permuted inside a chunk: the thread's combined 16-byte vector is
// four 32-bit fragment words, words 0-1 feeding k step 0 and words 2-3 k step 1 (see
// deft_slot_channel). deft_pack_weight writes the weight in that order (and zero-pads
// channels and output channels), one stage = BN x CHUNK elements in the core-matrix layout the
// wgmma descriptor reads: no swizzle, cores of 8 rows x 16 bytes = 128 contiguous bytes, cores
// along n 128 bytes apart (SBO), along k BN * 16 bytes (LBO).
//
// The reduction runs chunk-major (all taps of a chunk, then the next chunk), so that the
// input window of one chunk can stay in L1 while its taps sample it (ncu on dense512: 34% L1
// hits, docs/perf-notes.md round 5); the sampling points of every tap are computed once, up
// front, into shared memory.
//
// staging=window (WINDOW 1): the block's input window — WROWS input rows (the rows its pixels'
// taps cover and the bilinear row below them, HALO more above and below) x the full width x one
// chunk's channels — is copied into shared memory (cp.async, double-buffered by chunk: chunk
// k + 1's window loads while chunk k's taps run), and a corner inside it is read from there; a corner outside it (an offset larger
// than the halo, or a pixel of a second image in the tile) is read from global memory as
// without the window. The point table marks window corners with a negative offset:
// -1 - (window pixel index). Corners outside the image (weight 0) read window pixel 0.
//
// Warp-specialised form (WS 1, variant producers=P): the sampling moves out of the MMA warps.
// P producer warpgroups sample A into shared memory and CONSUMERS warpgroups only issue
// wgmmas, A and B both from shared-memory descriptors, so that the tensor cores do not wait on
// each stage's gathers (docs/perf-notes.md round 13). A ring of NSTAGE slots, each an A stage
// (BM rows x 64 bytes of channels, core-matrix layout, channels in their own order) and a B
// stage (the packed weight, as above but unpermuted); per slot a "full" mbarrier (the B bulk
// copy's bytes plus one arrival from the producer warp that wrote A) and an "empty" one (one
// arrival per consumer warp once its wgmmas of the slot retired). Producer warp w fills stages
// w, w + 4P, ...: lane 4 r + q samples vector q (VEC channels) of rows r, r + 8, ... of the
// stage, 4 corner loads each, combines them and stores the 16 bytes into the A stage; then a
// proxy fence (generic stores -> wgmma's async-proxy reads) and the arrival. Consumers: CM
// warpgroups along the rows (BM / 64) times BN / BNW along the output channels, each a
// 64 x BNW accumulator; one wgmma group stays in flight while the next stage's is issued.
//
// Constants from codegen: BM (64 per warpgroup), BN, THREADS, NSTAGE, KCH (chunks per group),
// NOG (offset groups a group's channels touch), PTS_BYTES, MIN_BLOCKS,
// OUT_STORE (bytes per output store: 16, 8, 4 or one element), TF32, WINDOW with HALO, WROWS
// and WIN_BYTES (one window buffer), PACK_BLOCKS (and TRANSPOSE_BLOCKS with TRANSPOSE_PACK: the
// pre-passes' grids), and deft_wgmma_kstep() for this BN and dtype.

constexpr long long M_TOTAL = (long long)N * HO * WO;
constexpr int TAPS = R * S;
constexpr int VEC = 16 / int(sizeof(T));     // channels per 16-byte vector
constexpr int CHUNK = 4 * VEC;               // channels per stage (64 bytes)
constexpr int NUM_STAGES = KCH * TAPS;
constexpr int STAGE_ELEMS = BN * CHUNK;      // one packed weight stage
constexpr int STAGE_BYTES = STAGE_ELEMS * int(sizeof(T));
constexpr int NT = (KG + BN - 1) / BN;       // output-channel tiles per group
static_assert(WS || THREADS == BM * 2, "one warpgroup (128 threads) per 64 rows");
static_assert(STAGE_BYTES % 16 == 0, "bulk copies move whole 16-byte units");
static_assert(CG % VEC == 0 && CPOG % VEC == 0, "16-byte channel vectors inside groups");
static_assert(TF32 == (sizeof(T) == 4), "32-bit elements run in tf32");
static_assert(!WINDOW || TAPS >= 3, "a window loads one chunk ahead: three taps or more");

// Channel of packed slot j (0 .. CHUNK-1) inside its chunk: slot i of k step h is read from
// thread t's vector element e.
//   k16 (16-bit): t = (i % 8) / 2, word 2h + i / 8, e = 2 word + i % 2
//   k8 (tf32):    t = i % 4,       word 2h + i / 4, e = word
__host__ __device__ constexpr int deft_slot_channel(int j) {
  if constexpr (WS) {  // A from shared memory: no fragment order, channels in their own order
    return j;
  } else if constexpr (TF32) {
    const int h = j / 8, i = j % 8;
    return 4 * (i % 4) + 2 * h + i / 4;
  } else {
    const int h = j / 16, i = j % 16;
    return 8 * ((i % 8) / 2) + 4 * h + 2 * (i / 8) + i % 2;
  }
}
// The pack reads a 16-byte run of slots (VEC of them, kc VEC .. kc VEC + VEC - 1) as the
// channels slot_channel(kc VEC) + slot_channel(e): the order splits into a vector part and an
// element part. Checked here for every slot.
__host__ __device__ constexpr bool deft_slot_order_splits() {
  for (int kc = 0; kc < 4; ++kc)
    for (int e = 0; e < VEC; ++e)
      if (deft_slot_channel(kc * VEC + e) != deft_slot_channel(kc * VEC) + deft_slot_channel(e))
        return false;
  return true;
}
static_assert(deft_slot_order_splits(), "slot order = vector base + element offset");

// The bits of an f32 value rounded to the nearest tf32 (deft_round_tf32), as wgmma reads them.
__device__ __forceinline__ unsigned deft_tf32_bits(float x) {
  return __float_as_uint(deft_round_tf32(x));
}

// First offset group of weight group g.
__device__ __forceinline__ int deft_og_first(int g) { return int((long long)g * CG / CPOG); }

// packed[g][nt][stage = chunk * TAPS + tap][core layout of BN x CHUNK] from the weight in its
// own layout (kcrs, or krsc for nhwc layers); zero for channels >= CG and kout >= KG; tf32
// layers store the rounded value. Element e of a stage holds output channel n = (e % (BN VEC))
// / VEC and slot j = (e / (BN VEC)) VEC + e % VEC, so 8 output channels' VEC slots of one core
// column are 128 contiguous bytes.
//
// A block packs 8 output channels x one chunk x the taps (PACK_TT at a time) through shared
// memory, in 16-byte vectors on both sides, the index arithmetic once a vector (element by
// element it was ~65 instructions an element and bound the pack: perf notes, session 19):
//  - loads: per output channel, its weight row as the source holds it — krsc: PACK_TT runs of
//    CHUNK channels (4 vectors each); kcrs: CHUNK x TAPS contiguous elements (a channel's taps
//    after the one before), whole vectors as CG is a multiple of VEC and the chunk starts on
//    one. A kcrs layer of more than 16 taps splits the taps and its rows, and loads element by
//    element;
//  - stores: one 16-byte vector = one output channel's VEC slots of one k column (kc) of one
//    tap, its VEC elements read from shared memory at the slots' channels.
constexpr int PACK_TT = TAPS < 16 ? TAPS : 16;
static_assert(PACK_BLOCKS == (long long)G * NT * KCH * (BN / 8),
              "plan.pack_blocks: a block of 8 output channels x one chunk");
static_assert(BN % 8 == 0, "the pack moves 8 output channels a block");
constexpr int PACK_ROW = CHUNK * PACK_TT;                       // one output channel's elements
constexpr bool PACK_VEC_LOADS = W_KRSC || PACK_TT == TAPS;      // rows of whole vectors
constexpr int PACK_VECS = 8 * PACK_ROW / VEC;                   // vectors a block-pass moves
constexpr int PACK_LOADS = (PACK_VEC_LOADS ? PACK_VECS : 8 * PACK_ROW) / 256 +
                           ((PACK_VEC_LOADS ? PACK_VECS : 8 * PACK_ROW) % 256 != 0);  // a thread
template <int B> struct deft_uint_of;
template <> struct deft_uint_of<2> { typedef unsigned short type; };
template <> struct deft_uint_of<4> { typedef unsigned type; };

__device__ __forceinline__ void deft_pack_block(const T* __restrict__ weight, T* __restrict__ packed,
                                                long long blk) {
  typedef typename deft_uint_of<sizeof(T)>::type U;
  // [8 output channels][PACK_ROW]: krsc rows tap-major (tap CHUNK + c), kcrs channel-major
  // (c tt + tap)
  __shared__ __align__(16) U s[8 * PACK_ROW];
  const int ng = int(blk % (BN / 8));
  const long long rest = blk / (BN / 8);
  const int chunk = int(rest % KCH);
  const int nt = int(rest / KCH % NT), g = int(rest / KCH / NT);
  const int cl0 = chunk * CHUNK;
  const long long ko0 = (long long)g * KG + nt * BN + ng * 8;  // the block's first output channel
  const int kouts = KG - (nt * BN + ng * 8);                   // of which valid (may be <= 0)
  U* dst = reinterpret_cast<U*>(packed) + ((long long)g * NT + nt) * NUM_STAGES * STAGE_ELEMS +
           ng * 8 * VEC;
  for (int t0 = 0; t0 < TAPS; t0 += PACK_TT) {
    const int tt = TAPS - t0 < PACK_TT ? TAPS - t0 : PACK_TT;
    if (t0 > 0) __syncthreads();  // the previous taps' stores have read s
    if constexpr (PACK_VEC_LOADS) {
      // every load of the thread issued before the first is stored
      uint4 v[PACK_LOADS];
#pragma unroll
      for (int u = 0; u < PACK_LOADS; ++u) {
        const int i = threadIdx.x + u * 256;
        const int nl = i / (4 * tt), vv = i % (4 * tt);
        v[u] = make_uint4(0, 0, 0, 0);
        if (i < 32 * tt && nl < kouts) {
          const long long ko = ko0 + nl;
          if constexpr (W_KRSC) {
            const int tl = vv / 4, cv = cl0 + (vv % 4) * VEC;
            if (cv < CG) v[u] = __ldg(reinterpret_cast<const uint4*>(weight + (ko * TAPS + t0 + tl) * CG + cv));
          } else if (vv * VEC < (CG - cl0) * TAPS) {
            v[u] = __ldg(reinterpret_cast<const uint4*>(weight + (ko * CG + cl0) * TAPS + vv * VEC));
          }
        }
      }
#pragma unroll
      for (int u = 0; u < PACK_LOADS; ++u) {
        const int i = threadIdx.x + u * 256;
        if (i < 32 * tt)
          *reinterpret_cast<uint4*>(s + (i / (4 * tt)) * PACK_ROW + (i % (4 * tt)) * VEC) = v[u];
      }
    } else {  // kcrs rows split by the taps: element by element
      U v[PACK_LOADS];
#pragma unroll
      for (int u = 0; u < PACK_LOADS; ++u) {
        const int i = threadIdx.x + u * 256;
        const int nl = i / (CHUNK * tt), r = i % (CHUNK * tt), c = r / tt, tl = r % tt;
        v[u] = 0;
        if (i < 8 * CHUNK * tt && nl < kouts && cl0 + c < CG)
          v[u] = __ldg(reinterpret_cast<const U*>(weight) + ((ko0 + nl) * CG + cl0 + c) * TAPS + t0 + tl);
      }
#pragma unroll
      for (int u = 0; u < PACK_LOADS; ++u) {
        const int i = threadIdx.x + u * 256;
        if (i < 8 * CHUNK * tt) s[(i / (CHUNK * tt)) * PACK_ROW + i % (CHUNK * tt)] = v[u];
      }
    }
    __syncthreads();
    // vector i: output channel i % 8, k column (i / 8) % 4, tap i / 32 of this pass
    for (int i = threadIdx.x; i < 32 * tt; i += 256) {
      const int nl = i % 8, kc = (i / 8) % 4, tl = i / 32;
      const int c0 = deft_slot_channel(kc * VEC);
      const U* row = s + nl * PACK_ROW + (W_KRSC ? tl * CHUNK + c0 : c0 * tt + tl);
      U e[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        e[j] = row[W_KRSC ? deft_slot_channel(j) : deft_slot_channel(j) * tt];
        if constexpr (TF32) e[j] = deft_tf32_bits(__uint_as_float(e[j]));
      }
      unsigned w[4];  // the vector's 32-bit words (two 16-bit elements, or one)
#pragma unroll
      for (int k = 0; k < 4; ++k)
        w[k] = sizeof(T) == 2 ? unsigned(e[2 * k % VEC]) | unsigned(e[(2 * k + 1) % VEC]) << 16
                              : unsigned(e[k % VEC]);
      *reinterpret_cast<uint4*>(dst + ((long long)chunk * TAPS + t0 + tl) * STAGE_ELEMS +
                                kc * BN * VEC + nl * VEC) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
}

#if !TRANSPOSE_PACK
// The pack alone (nhwc layers; nchw ones run deft_transpose_pack): PACK_BLOCKS blocks of 256.
extern "C" __global__ void __launch_bounds__(256)
    deft_pack_weight(const T* __restrict__ weight, T* __restrict__ packed) {
  deft_grid_begin();
  deft_pack_block(weight, packed, blockIdx.x);
}
#endif

// One ring stage's weight: arms the stage's mbarrier with its byte count (one arrival) and
// starts the bulk copy that completes on it.
__device__ __forceinline__ void deft_bulk_load(unsigned dst, const void* src, unsigned bar) {
  asm volatile(
      "{\n.reg .b64 state;\n"
      "mbarrier.arrive.expect_tx.shared::cta.b64 state, [%2], %3;\n"
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %3, [%2];\n}\n"
      ::"r"(dst), "l"(src), "r"(bar), "n"(STAGE_BYTES) : "memory");
}

// VEC channels of one sampled row as four A-fragment words (packed pairs, or tf32 values).
__device__ __forceinline__ uint4 deft_combine(const uint4 (&c)[4], const float4& w) {
#if TF32
  const float4 v = deft_combine4f(c, w);
  return make_uint4(deft_tf32_bits(v.x), deft_tf32_bits(v.y), deft_tf32_bits(v.z),
                    deft_tf32_bits(v.w));
#else
  return deft_combine8(c, w.x, w.y, w.z, w.w);
#endif
}

// Sampling points of every (offset group, tap, row) of the block of rows m0 .. m0 + BM - 1,
// weight group offset groups og0 .. og0 + NOG - 1, computed by thread tid of THREADS; rows past
// the tensor and offset groups past OG get zero weights. staging=window (WINDOW): corners inside
// the window (image nb, input rows wy0 .. wy0 + WROWS - 1) become -1 - (window pixel index).
__device__ __forceinline__ void deft_fill_points(int4* pts_off, float4* pts_w,
                                                 const T* __restrict__ offset,
                                                 const T* __restrict__ mask, long long m0,
                                                 int og0, int tid, long long nb, int wy0) {
  (void)nb, (void)wy0;
  for (int i = tid; i < NOG * TAPS * BM; i += THREADS) {
    const int row = i % BM, tap = (i / BM) % TAPS, ogl = i / (BM * TAPS);
    const long long m = m0 + row;
    SamplePoint p;
#pragma unroll
    for (int q = 0; q < 4; ++q) p.off[q] = 0, p.w[q] = 0.f;
    if (m < M_TOTAL && og0 + ogl < OG) {
      const long long n = m / (HO * WO);
      const int rem = int(m - n * (HO * WO));
      const int ho = rem / WO, wo = rem % WO;
      p = deft_sample_point(offset, mask, n, ho, wo, tap, og0 + ogl);
#if WINDOW
      if (n == nb) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          if (p.off[q] == 0 && p.w[q] == 0.f) {
            p.off[q] = -1;  // a corner outside the image: window pixel 0, not global memory
          } else {
            const int pix = int(p.off[q] / C), y = pix / int(W);
            if (y >= wy0 && y < wy0 + WROWS) p.off[q] = -1 - (pix - wy0 * int(W));
          }
        }
      }
#endif
    }
    pts_off[i] = make_int4(p.off[0], p.off[1], p.off[2], p.off[3]);
    pts_w[i] = make_float4(p.w[0], p.w[1], p.w[2], p.w[3]);
  }
}

// Epilogue: bias and activation in f32, staged through a shared-memory tile for coalesced
// stores. nhwc: cs[row][col], stored along the channels; nchw: cs[col][row], along the pixels.
constexpr int CS_LD = NHWC ? BN + 8 : BM + 8;

// One warpgroup's accumulators into the tile: accumulator i of this thread (lane 4 g + t) is
// column col0 + 8 (i / 4) + 2 t + i % 2, row row0 + 8 ((i / 2) % 2).
template <int NACC>
__device__ __forceinline__ void deft_stage_acc(T* cs, const float (&acc)[NACC], int row0, int col0,
                                               int t, int n0, int g, const T* __restrict__ bias) {
#pragma unroll
  for (int i = 0; i < NACC; ++i) {
    const int col = col0 + 8 * (i / 4) + 2 * t + i % 2, row = row0 + 8 * ((i / 2) % 2);
    float v = acc[i];
    if (HAS_BIAS && n0 + col < KG) v += deft_widen(bias[(long long)g * KG + n0 + col]);
    v = deft_activate(v);
    cs[NHWC ? row * CS_LD + col : col * CS_LD + row] = deft_from<T>(v);
  }
}

// The BM x BN tile to the output (rows m0 .., output channels n0 .. of group g), OUT_STORE
// bytes a store, by thread tid of nthreads.
__device__ __forceinline__ void deft_store_tile(const T* cs, T* __restrict__ out, long long m0,
                                                int n0, int g, int tid, int nthreads) {
  constexpr int V = OUT_STORE / int(sizeof(T));  // elements per store
  constexpr int ROW_V = NHWC ? BN / V : BM / V;  // vectors along the fast dimension
  for (int idx = tid; idx < (BM * BN) / V; idx += nthreads) {
    const int fast = (idx % ROW_V) * V, slow = idx / ROW_V;
    const int row = NHWC ? slow : fast, col = NHWC ? fast : slow;
    const long long m = m0 + row;
    if (m >= M_TOTAL || n0 + col >= KG) continue;
    T* dst;
    if constexpr (NHWC) {
      dst = out + m * K + (long long)g * KG + n0 + col;
    } else {
      const long long n = m / (HO * WO), pix = m - n * (HO * WO);
      dst = out + (n * K + (long long)g * KG + n0 + col) * (HO * WO) + pix;
    }
    const T* src = cs + slow * CS_LD + fast;
    if constexpr (OUT_STORE == 16) *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    else if constexpr (OUT_STORE == 8) *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(src);
    else if constexpr (OUT_STORE == 4) *reinterpret_cast<unsigned*>(dst) = *reinterpret_cast<const unsigned*>(src);
    else *dst = *src;
  }
}

#if !WS
extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS)
    KERNEL_NAME(const T* __restrict__ input, const T* __restrict__ offset,
                const T* __restrict__ mask, const T* __restrict__ packed,
                const T* __restrict__ bias, T* __restrict__ out) {
  deft_grid_begin();
  extern __shared__ __align__(128) unsigned char smem[];  // plan.smem_bytes, set at launch
  int4* pts_off = reinterpret_cast<int4*>(smem);          // [NOG][TAPS][BM]
  float4* pts_w = reinterpret_cast<float4*>(smem + PTS_BYTES / 2);
  unsigned char* ring = smem + PTS_BYTES;                  // NSTAGE B stages
  const unsigned ring_addr = (unsigned)__cvta_generic_to_shared(ring);
  const unsigned bar_addr = ring_addr + NSTAGE * STAGE_BYTES;  // NSTAGE mbarriers (8 bytes)
#if WINDOW
  unsigned char* win = ring + NSTAGE * STAGE_BYTES + 64;  // 2 window buffers, after the mbarriers
#endif

  const int tid = threadIdx.x;
  const long long m0 = (long long)blockIdx.x * BM;
  const int nt = blockIdx.y, n0 = nt * BN;
  const int g = blockIdx.z;
  const T* bsrc = packed + ((long long)g * NT + nt) * NUM_STAGES * STAGE_ELEMS;

  auto load_b = [&](int stage) {  // thread 0 only
    const int slot = stage % NSTAGE;
    deft_bulk_load(ring_addr + slot * STAGE_BYTES, bsrc + (long long)stage * STAGE_ELEMS,
                   bar_addr + 8 * slot);
  };
  if (tid == 0) {
#pragma unroll
    for (int i = 0; i < NSTAGE; ++i) deft_mbar_init_count(bar_addr + 8 * i, 1);
    // the initialised barriers visible to the async proxy before the first copy completes
    asm volatile("fence.mbarrier_init.release.cluster;\nfence.proxy.async.shared::cta;\n" ::: "memory");
#pragma unroll
    for (int s = 0; s < NSTAGE - 1; ++s)
      if (s < NUM_STAGES) load_b(s);
  }

#if WINDOW
  // The window: image nb (the block's first pixel's), input rows wy0 .. wy0 + WROWS - 1.
  const long long nb = m0 / (HO * WO);
  const int wy0 = int((m0 - nb * (HO * WO)) / WO) * SH - PH - HALO;
  // Copies chunk k's window into buffer k % 2: 16 bytes (VEC channels) per copy, zeros for rows
  // outside the image and channels past the group.
  auto load_window = [&](int chunk) {
    unsigned char* dst = win + (chunk & 1) * WIN_BYTES;
    const T* src = input + nb * ((long long)H * W * C) + (long long)g * CG + chunk * CHUNK;
    for (int i = tid; i < WROWS * int(W) * 4; i += THREADS) {
      const int q = i % 4, pix = i / 4, y = wy0 + pix / int(W), x = pix % int(W);
      const bool ok = y >= 0 && y < H && chunk * CHUNK + q * VEC < CG;
      const T* from = ok ? src + ((long long)y * W + x) * C + q * VEC : input;
      deft_cp_async<16>(dst + pix * 64 + q * 16, from, ok);
    }
    deft_cp_commit<>();
  };
  load_window(0);
#endif

  // Sampling points of every (offset group, tap, row) of the block, once.
  const int og0 = deft_og_first(g);
#if WINDOW
  deft_fill_points(pts_off, pts_w, offset, mask, m0, og0, tid, nb, wy0);
#else
  deft_fill_points(pts_off, pts_w, offset, mask, m0, og0, tid, 0, 0);
#endif

  // This thread's two rows and its 8 channels of each chunk.
  const int warp = tid / 32, lane = tid % 32;
  const int wg = warp / 4, gq = lane / 4, t = lane % 4;
  const int row0 = wg * 64 + (warp % 4) * 16 + gq;  // and row0 + 8
  const T* image[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const long long m = m0 + row0 + 8 * h;
    const long long n = m < M_TOTAL ? m / (HO * WO) : 0;
    image[h] = input + n * ((long long)H * W * C) + (long long)g * CG + VEC * t;
  }

  // The raw corner vectors of one stage (two rows), fetched two stages ahead of their use so
  // that the loads' latency hides behind a whole stage of tensor-core work.
  struct Raw {
    uint4 c[2][4];
    float4 w[2];
  };
  auto fetch = [&](int stage, Raw& r) {
    const int chunk = stage / TAPS, tap = stage % TAPS;
    const int cl = chunk * CHUNK + VEC * t;
#if WINDOW
    const unsigned char* wb = win + (chunk & 1) * WIN_BYTES + 16 * t;
#endif
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (cl < CG) {
        const int ogl = (g * CG + cl) / CPOG - og0;
        const int i = (ogl * TAPS + tap) * BM + row0 + 8 * h;
        const int4 off = pts_off[i];
        r.w[h] = pts_w[i];
        const T* base = image[h] + chunk * CHUNK;
#if WINDOW
        auto corner = [&](int o) {
          if (o >= 0) return __ldg(reinterpret_cast<const uint4*>(base + o));
          return *reinterpret_cast<const uint4*>(wb + (-1 - o) * 64);
        };
        r.c[h][0] = corner(off.x);
        r.c[h][1] = corner(off.y);
        r.c[h][2] = corner(off.z);
        r.c[h][3] = corner(off.w);
#else
        r.c[h][0] = __ldg(reinterpret_cast<const uint4*>(base + off.x));
        r.c[h][1] = __ldg(reinterpret_cast<const uint4*>(base + off.y));
        r.c[h][2] = __ldg(reinterpret_cast<const uint4*>(base + off.z));
        r.c[h][3] = __ldg(reinterpret_cast<const uint4*>(base + off.w));
#endif
      } else {  // channels past the group: zero samples
#pragma unroll
        for (int q = 0; q < 4; ++q) r.c[h][q] = make_uint4(0, 0, 0, 0);
        r.w[h] = make_float4(0.f, 0.f, 0.f, 0.f);
      }
    }
  };
  // A fragments of a stage's two k steps: {row0, row0+8, row0, row0+8} words 2h, 2h, 2h+1, 2h+1.
  auto combine = [&](const Raw& r, unsigned (&a)[2][4]) {
    const uint4 v0 = deft_combine(r.c[0], r.w[0]), v1 = deft_combine(r.c[1], r.w[1]);
    a[0][0] = v0.x, a[0][1] = v1.x, a[0][2] = v0.y, a[0][3] = v1.y;
    a[1][0] = v0.z, a[1][1] = v1.z, a[1][2] = v0.w, a[1][3] = v1.w;
  };

  float acc[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) acc[i] = 0.f;
  unsigned afrag[2][2][4];  // [set][k step][word]
  Raw raw[2];

#if WINDOW
  deft_cp_wait<0>();  // this thread's copies of window 0; the barrier makes all of them visible
#endif
  __syncthreads();  // points visible
  fetch(0, raw[0]);
  if (NUM_STAGES > 1) fetch(1, raw[1]);
  combine(raw[0], afrag[0]);

  // Stage s (A fragments in `cur`, its raw vectors consumed): wait for its B stage, refill the
  // ring, issue the two k-step wgmmas; while they run, fetch stage s + 2 into the raw set stage s
  // used and combine stage s + 1 into `next`; then wait for the wgmmas.
  auto step = [&](int s, unsigned (&cur)[2][4], unsigned (&next)[2][4], Raw& free_raw,
                  const Raw& next_raw) {
#if WINDOW
    // Stage s + 2 (fetched below) starts chunk k: its window (issued at chunk k - 1's first
    // stage) must have landed, for every thread after the barrier.
    if ((s + 2) % TAPS == 0 && s + 2 >= TAPS && s + 2 < NUM_STAGES) deft_cp_wait<0>();
#endif
    deft_mbar_spin(bar_addr + 8 * (s % NSTAGE), (s / NSTAGE) & 1);  // stage s landed
    __syncthreads();  // every wgmma of stage s - 1 is done: its ring slot may be refilled
    if (tid == 0 && s + NSTAGE - 1 < NUM_STAGES) load_b(s + NSTAGE - 1);
#if WINDOW
    // Chunk k = s / TAPS begins: load chunk k + 1's window into the buffer chunk k - 1 used,
    // whose last corners were fetched in step s - 3 (TAPS >= 3), before this barrier.
    if (s % TAPS == 0 && s / TAPS + 1 < KCH) load_window(s / TAPS + 1);
#endif
    const unsigned b = ring_addr + (s % NSTAGE) * STAGE_BYTES;
    deft_wgmma_fence();
    deft_wgmma_kstep(acc, cur[0], deft_b_desc(b, 0));
    deft_wgmma_kstep(acc, cur[1], deft_b_desc(b, 1));
    deft_wgmma_commit();
    if (s + 2 < NUM_STAGES) fetch(s + 2, free_raw);
    if (s + 1 < NUM_STAGES) combine(next_raw, next);
    deft_wgmma_wait<0>();
  };
  for (int s = 0; s < NUM_STAGES; s += 2) {
    step(s, afrag[0], afrag[1], raw[0], raw[1]);
    if (s + 1 < NUM_STAGES) step(s + 1, afrag[1], afrag[0], raw[1], raw[0]);
  }
  __syncthreads();  // every copy was waited for; the ring and the points are free: the
                    // epilogue tile reuses them

  T* cs = reinterpret_cast<T*>(smem);
  deft_stage_acc(cs, acc, row0, 0, t, n0, g, bias);
  __syncthreads();
  deft_store_tile(cs, out, m0, n0, g, tid, THREADS);
}
#endif  // !WS

#if WS
// ---- warp-specialised form: producer warpgroups sample, consumer warpgroups multiply ----
// Constants from codegen: PRODUCERS, CONSUMERS, CM (consumer warpgroups along the rows), BNW
// (output channels per consumer), ROW_BYTES (the rows' image table), MAX_BATCH (items a producer
// lane loads at once), and deft_wgmma_ss() for BNW.
constexpr int A_STAGE_BYTES = BM * 64;         // BM rows x 64 bytes of channels
constexpr int PROD_WARPS = 4 * PRODUCERS;      // producer warps
constexpr int ITEMS = BM / 8;                  // (row, vector) items per producer lane per stage
// Items whose corner loads are issued together: all 8 of a 64-row stage (32 loads in flight a
// lane) where the block's register cap allows it, else 4.
constexpr int BATCH = ITEMS < MAX_BATCH ? ITEMS : MAX_BATCH;
static_assert(THREADS == 128 * (PRODUCERS + CONSUMERS), "warpgroups: producers + consumers");
static_assert(CM * 64 == BM && CONSUMERS % CM == 0 && (CONSUMERS / CM) * BNW == BN, "consumer grid");
static_assert(ITEMS % BATCH == 0, "whole batches");

// Descriptor of k step h of consumer row block cm of an A stage at byte address a: core matrices
// of 8 rows x 16 bytes, 128 bytes apart along the rows (SBO), BM * 16 bytes along k (LBO).
__device__ __forceinline__ unsigned long long deft_a_desc(unsigned a, int cm, int h) {
  return deft_smem_desc<BM * 16u>(a + unsigned(cm) * 1024u, h);
}
// Barrier 1 among the consumer warpgroups only (the producers may have left).
__device__ __forceinline__ void deft_consumer_sync() {
  asm volatile("bar.sync 1, %0;\n" ::"n"(CONSUMERS * 128) : "memory");
}

extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS)
    KERNEL_NAME(const T* __restrict__ input, const T* __restrict__ offset,
                const T* __restrict__ mask, const T* __restrict__ packed,
                const T* __restrict__ bias, T* __restrict__ out) {
  deft_grid_begin();
  extern __shared__ __align__(128) unsigned char smem[];  // plan.smem_bytes, set at launch
  int4* pts_off = reinterpret_cast<int4*>(smem);          // [NOG][TAPS][BM]
  float4* pts_w = reinterpret_cast<float4*>(smem + PTS_BYTES / 2);
  int* row_img = reinterpret_cast<int*>(smem + PTS_BYTES);  // image of each row
  unsigned char* a_ring = smem + PTS_BYTES + ROW_BYTES;      // NSTAGE A stages
  unsigned char* b_ring = a_ring + NSTAGE * A_STAGE_BYTES;   // NSTAGE B stages
  const unsigned a_addr = (unsigned)__cvta_generic_to_shared(a_ring);
  const unsigned b_addr = (unsigned)__cvta_generic_to_shared(b_ring);
  const unsigned full = b_addr + NSTAGE * STAGE_BYTES;       // NSTAGE mbarriers, then
  const unsigned empty = full + 8 * NSTAGE;                  // NSTAGE more

  const int tid = threadIdx.x;
  const long long m0 = (long long)blockIdx.x * BM;
  const int nt = blockIdx.y, n0 = nt * BN;
  const int g = blockIdx.z;
  const T* bsrc = packed + ((long long)g * NT + nt) * NUM_STAGES * STAGE_ELEMS;

  if (tid == 0) {
    for (int i = 0; i < NSTAGE; ++i) {
      deft_mbar_init_count(full + 8 * i, 2);              // the B copy's arrival + the producer's
      deft_mbar_init_count(empty + 8 * i, 4 * CONSUMERS);  // one per consumer warp
    }
    asm volatile("fence.mbarrier_init.release.cluster;\nfence.proxy.async.shared::cta;\n" ::: "memory");
  }
  // Sampling points of every (offset group, tap, row) of the block, once; each row's image.
  const int og0 = deft_og_first(g);
  deft_fill_points(pts_off, pts_w, offset, mask, m0, og0, tid, 0, 0);
  for (int row = tid; row < BM; row += THREADS)
    row_img[row] = m0 + row < M_TOTAL ? int((m0 + row) / (HO * WO)) : 0;
  __syncthreads();  // points and barriers visible

  const int warp = tid / 32, lane = tid % 32;
  if (warp >= 4 * CONSUMERS) {
    // ---- producer warp pw: stages pw, pw + PROD_WARPS, ...
    const int pw = warp - 4 * CONSUMERS, q = lane % 4, r8 = lane / 4;
    for (int s = pw; s < NUM_STAGES; s += PROD_WARPS) {
      const int slot = s % NSTAGE, round = s / NSTAGE;
      if (round > 0) deft_mbar_spin(empty + 8 * slot, (round - 1) & 1);  // the slot is free
      if (lane == 0) deft_bulk_load(b_addr + slot * STAGE_BYTES, bsrc + (long long)s * STAGE_ELEMS,
                                    full + 8 * slot);
      const int chunk = s / TAPS, tap = s % TAPS;
      const int cl = chunk * CHUNK + VEC * q;
      unsigned char* dst = a_ring + slot * A_STAGE_BYTES + q * (BM * 16) + r8 * 16;
      if (cl < CG) {
        const int pbase = (((g * CG + cl) / CPOG - og0) * TAPS + tap) * BM + r8;
        const T* chan = input + (long long)g * CG + cl;
#pragma unroll
        for (int b = 0; b < ITEMS; b += BATCH) {
          uint4 c[BATCH][4];
          float4 w[BATCH];
#pragma unroll
          for (int i = 0; i < BATCH; ++i) {
            const int row = 8 * (b + i);  // + r8, in pbase and below
            const int4 off = pts_off[pbase + row];
            w[i] = pts_w[pbase + row];
            const T* base = chan + (long long)row_img[r8 + row] * (H * W * C);
            c[i][0] = __ldg(reinterpret_cast<const uint4*>(base + off.x));
            c[i][1] = __ldg(reinterpret_cast<const uint4*>(base + off.y));
            c[i][2] = __ldg(reinterpret_cast<const uint4*>(base + off.z));
            c[i][3] = __ldg(reinterpret_cast<const uint4*>(base + off.w));
          }
#pragma unroll
          for (int i = 0; i < BATCH; ++i)
            *reinterpret_cast<uint4*>(dst + (b + i) * 128) = deft_combine(c[i], w[i]);
        }
      } else {  // channels past the group: zero samples
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) *reinterpret_cast<uint4*>(dst + i * 128) = make_uint4(0, 0, 0, 0);
      }
      // this lane's A stores visible to the wgmmas (async proxy), then the warp's arrival
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
      __syncwarp();
      if (lane == 0) deft_mbar_arrive(full + 8 * slot);
    }
    return;
  }

  // ---- consumer warpgroup cw: rows 64 cm .. 64 cm + 63, output channels BNW cn .. of the tile
  const int cw = warp / 4, cm = cw % CM, cn = cw / CM;
  float acc[BNW / 2];
#pragma unroll
  for (int i = 0; i < BNW / 2; ++i) acc[i] = 0.f;
  for (int s = 0; s < NUM_STAGES; ++s) {
    const int slot = s % NSTAGE;
    deft_mbar_spin(full + 8 * slot, (s / NSTAGE) & 1);  // A written, B landed
    const unsigned a = a_addr + slot * A_STAGE_BYTES;
    const unsigned b = b_addr + slot * STAGE_BYTES + cn * BNW * 16;
    deft_wgmma_fence();
    deft_wgmma_ss(acc, deft_a_desc(a, cm, 0), deft_b_desc(b, 0));
    deft_wgmma_ss(acc, deft_a_desc(a, cm, 1), deft_b_desc(b, 1));
    deft_wgmma_commit();
    deft_wgmma_wait<1>();  // stage s - 1's wgmmas retired: its slot may be refilled
    if (s > 0) {
      __syncwarp();
      if (lane == 0) deft_mbar_arrive(empty + 8 * ((s - 1) % NSTAGE));
    }
  }
  deft_wgmma_wait<0>();
  deft_consumer_sync();  // every consumer done with the ring: the epilogue tile reuses it

  T* cs = reinterpret_cast<T*>(smem);
  deft_stage_acc(cs, acc, 64 * cm + 16 * (warp % 4) + lane / 4, BNW * cn, lane % 4, n0, g, bias);
  deft_consumer_sync();
  deft_store_tile(cs, out, m0, n0, g, tid, CONSUMERS * 128);
}
#endif  // WS
