// Shared by the wgmma kernels (deform_conv_wgmma.cuh, deform_conv_bwd_weight_wgmma.cuh): the
// warpgroup MMA's ordering instructions and the shared-memory descriptor of their B operand.
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

// Descriptor of k step `h` (two core matrices along k) of a B operand at byte address `b`, no
// swizzle: core matrices of 128 contiguous bytes, 128 bytes apart along n (SBO) and BN * 16
// bytes along k (LBO). K-major B (the forward's packed weight: a core is 8 n-rows of 16 bytes
// of k) and MN-major B (the backward's sampled columns, read with the transpose bit: a core is
// 8 k-rows of 16 bytes of n) are both addressed this way.
__device__ __forceinline__ unsigned long long deft_b_desc(unsigned b, int h) {
  const unsigned long long addr = b + unsigned(h) * 2u * (BN * 16u);
  return ((addr & 0x3FFFFull) >> 4) | ((unsigned long long)((BN * 16) >> 4) << 16) |
         ((unsigned long long)(128 >> 4) << 32);
}
