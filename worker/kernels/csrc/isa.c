/* The vector extensions the kernels' code paths use in this build (it is compiled with
 * -march=native, so those of the machine's that the code has a path for): AVX-512F for the
 * float32 projections' 16-lane tiles, AVX-512BW for the int8 integer path's 32-lane vectors
 * and AVX512-VNNI for its fused multiply-add (vpdpwssd), AVX512-BF16 for bfloat16 products in
 * pairs (vdpbf16ps) on projections of several rows, AVX2 for the int8 integer path
 * elsewhere and the 8-lane kernels, FMA as the compiler fuses the multiply-adds; NEON on Arm. */
#include "kernels.h"

const char *cpuk_isa(void) {
    return ""
#ifdef __AVX512F__
           "avx512f "
#endif
#ifdef __AVX512BW__
           "avx512bw "
#endif
#ifdef __AVX512VNNI__
           "avx512vnni "
#endif
#ifdef __AVX512BF16__
           "avx512bf16 "
#endif
#ifdef __AVX2__
           "avx2 "
#endif
#ifdef __FMA__
           "fma "
#endif
#ifdef __ARM_NEON
           "neon "
#endif
           ;
}
