// Shared by the wgmma kernels (deform_conv_wgmma.cuh, deform_conv_bwd_weight_wgmma.cuh,
// deform_conv_bwd_data_wgmma.cuh): the warpgroup MMA's ordering instructions, the
// shared-memory operand descriptors, a warpgroup's named barrier, and the mbarriers of the
// warp-specialised forms' rings.
// Constants from codegen: BN (the B tile's width, n).

__device__ __forceinline__ void deft_wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void deft_wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int PENDING>
__device__ __forceinline__ void deft_wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(PENDING) : "memory");
}

// Pins the accumulator registers at this point of the program (no instruction): reads and
// writes of them stay on their side of the wgmma wait / fence next to it.
template <int NA>
__device__ __forceinline__ void deft_wgmma_fence_acc(float (&d)[NA]) {
#pragma unroll
  for (int i = 0; i < NA; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// Descriptor of k step `h` (two core matrices along k) of an operand tile at byte address
// `a`, no swizzle: core matrices of 128 contiguous bytes, 128 bytes apart along m or n (SBO)
// and KSTRIDE bytes along k (LBO). K-major tiles (a core is 8 m/n-rows of 16 bytes of k) and
// MN-major ones (read with the transpose bit: a core is 8 k-rows of 16 bytes of m/n) are both
// addressed this way.
template <unsigned KSTRIDE>
__device__ __forceinline__ unsigned long long deft_smem_desc(unsigned a, int h) {
  const unsigned long long addr = a + unsigned(h) * 2u * KSTRIDE;
  return ((addr & 0x3FFFFull) >> 4) | ((unsigned long long)(KSTRIDE >> 4) << 16) |
         ((unsigned long long)(128 >> 4) << 32);
}
// The B tile: BN columns, so cores BN * 16 bytes apart along k. K-major for the forward's
// packed weight, MN-major for the backward's sampled columns.
__device__ __forceinline__ unsigned long long deft_b_desc(unsigned b, int h) {
  return deft_smem_desc<BN * 16u>(b, h);
}

// Named barrier `id` (1 .. 15) of the 128 threads of one warpgroup.
__device__ __forceinline__ void deft_warpgroup_sync(int id) {
  asm volatile("bar.sync %0, 128;\n" ::"r"(id) : "memory");
}

// mbarriers of a producer/consumer ring: initialised with the number of arrivals a phase takes,
// arrived at, and waited on by phase parity.
__device__ __forceinline__ void deft_mbar_init_count(unsigned bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void deft_mbar_arrive(unsigned bar) {
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(bar)
               : "memory");
}
// Spins until the phase of parity `parity` of the mbarrier at `bar` has completed.
__device__ __forceinline__ void deft_mbar_spin(unsigned bar, unsigned parity) {
  unsigned done = 0;
  while (!done)
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done) : "r"(bar), "r"(parity) : "memory");
}
