// Device helpers for the bf16 tensor-core kernels (mma.sync m16n8k16, fp32 accumulation):
// asynchronous global -> shared copies, ldmatrix fragment loads and the mma itself.
//
// Fragment layouts of m16n8k16 (g = lane / 4, t = lane % 4):
//   A (16x16, row): a0 (row g, cols 2t, 2t+1), a1 (row g+8, same), a2 (row g, cols 8+2t..), a3 (row g+8, ..)
//   B (16x8, col):  b0 (k 2t, 2t+1; n g), b1 (k 8+2t, 8+2t+1; n g)
//   C (16x8 fp32):  c0, c1 (row g, cols 2t, 2t+1), c2, c3 (row g+8, same)
// so a C tile rounded to bf16 pairs is an A fragment of the next product with no shuffles.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

namespace ossrl::cuda {

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return uint32_t(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, or 16 zero bytes when !valid (nothing is read then).
__device__ __forceinline__ void copy_async16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
// 4 bytes global -> shared (zero when !valid).
__device__ __forceinline__ void copy_async4(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void copy_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void copy_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// Four 8x8 b16 matrices; lane l gives the address of row l % 8 of matrix l / 8, and register
// i receives matrix i (thread: row g, cols 2t, 2t+1; transposed: rows 2t, 2t+1, col g).
__device__ __forceinline__ void load_matrix_x4(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}
__device__ __forceinline__ void load_matrix_x4_trans(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

// c (16x8 fp32) += a (16x16 bf16, row) * b (16x8 bf16, col).
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  // Not volatile: a pure register op, free to be scheduled among the loads.
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t bits(__nv_bfloat162 x) { return *reinterpret_cast<const uint32_t*>(&x); }

// Two fp32 values as one register of bf16 pairs (round to nearest even).
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) { return bits(__floats2bfloat162_rn(lo, hi)); }

// S (16 queries x 8*kBlocks keys, fp32 mma accumulators, zeroed first) = Q · Kᵀ for one warp,
// head_dim 64, with the queries split into bf16 hi + lo parts (two mmas per k-step, ~16
// significant bits of q). key_row(r) is the shared-memory address of key r's 64 bf16 dims;
// ldmatrix of K rows gives the col-major B fragment.
template <int kBlocks, class KeyRow>
__device__ __forceinline__ void qk_scores_split(float (&s)[kBlocks][4], const uint32_t (&q_hi)[4][4],
                                                const uint32_t (&q_lo)[4][4], KeyRow key_row, int lane) {
#pragma unroll
  for (int j = 0; j < kBlocks; ++j) {
    s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
    uint32_t b[2][4];
    const uint16_t* row = key_row(j * 8 + lane % 8) + (lane / 8) * 8;
    load_matrix_x4(b[0], shared_address(row));       // dims 0..31: k-steps 0 and 1
    load_matrix_x4(b[1], shared_address(row + 32));  // dims 32..63: k-steps 2 and 3
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) {
      mma_bf16(s[j], q_hi[ks], b[ks / 2][(ks % 2) * 2], b[ks / 2][(ks % 2) * 2 + 1]);
      mma_bf16(s[j], q_lo[ks], b[ks / 2][(ks % 2) * 2], b[ks / 2][(ks % 2) * 2 + 1]);
    }
  }
}

}  // namespace ossrl::cuda
