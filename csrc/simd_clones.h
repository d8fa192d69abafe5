// FASTP2PHD_SIMD_CLONES: the CPU kernels' hot loops are compiled for AVX-512, AVX2 and baseline x86-64,
// and the loader picks one for this CPU (GCC target_clones; elsewhere, one baseline build).
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FASTP2PHD_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTP2PHD_SIMD_CLONES
#endif
