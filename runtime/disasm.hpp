// Cubin inspection without a GPU: SASS through NVIDIA's nvdisasm, and the resource figures a
// cubin records about its kernels (registers, shared memory, stack) read from its ELF sections,
// so a cubin loaded from the cache can be described without compiling it again.
//
// CUDA 13 changed the cubin ELF header (EI_OSABI 0x41, the SM number in bits 8..15 of e_flags).
// Older nvdisasm builds (e.g. Debian's CUDA 11.8) reject such files; sass() then retries on a
// copy whose header is rewritten to the pre-13 form and says so in its first line.
#pragma once

#include <optional>
#include <string>
#include <vector>

namespace deft::disasm {

// Where nvdisasm is looked for, in order: $DEFT_NVDISASM (the executable, or a folder holding
// it), $CUDA_HOME/bin, /usr/local/cuda/bin, then every folder of $PATH.
std::vector<std::string> nvdisasm_candidates();

// The first existing, executable candidate, or nothing.
std::optional<std::string> find_nvdisasm();

// The SASS of a cubin, as nvdisasm prints it. Throws deft::Error when no nvdisasm is found
// (saying where it looked and how to get one) or when nvdisasm fails on the file.
std::string sass(const std::vector<char>& cubin);

// The SM number a cubin's ELF header names (90 for sm_90), or 0 if it is not a cubin.
int cubin_arch(const std::vector<char>& cubin);

// A copy of a CUDA 13 cubin with its ELF header rewritten to the pre-CUDA-13 form
// (EI_OSABI 0x33, EI_ABIVERSION 7, e_version 118, e_flags sm | sm << 16 | 0x500).
// Throws deft::Error if the input is not a 64-bit little-endian CUDA 13 cubin.
std::vector<char> with_legacy_header(const std::vector<char>& cubin);

// The kernels (entry functions) a cubin holds, in symbol-table order.
std::vector<std::string> kernel_names(const std::vector<char>& cubin);

// What a cubin records about one kernel. -1: not recorded.
struct KernelResources {
  int registers = -1;
  long long shared_bytes = -1;  // static shared memory (.nv.shared.<kernel>)
  long long stack_bytes = -1;   // EIATTR_MAX_STACK_SIZE, else EIATTR_FRAME_SIZE
};

// Reads the figures of `kernel` from the cubin's ELF sections. Throws deft::Error if the cubin
// is malformed or holds no such kernel.
KernelResources kernel_resources(const std::vector<char>& cubin, const std::string& kernel);

}  // namespace deft::disasm
