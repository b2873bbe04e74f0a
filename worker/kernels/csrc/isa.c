/* The vector extensions the kernels' code paths use in this build (it is compiled with
 * -march=native, so those of the machine's that the code has a path for): AVX-512F for the
 * float32 projections' 16-lane tiles, AVX-512BW for the int8 integer path's 32-lane vectors
 * and AVX512-VNNI for its fused multiply-add (vpdpwssd), AVX512-BF16 for bfloat16 products in
 * pairs (vdpbf16ps) on projections of several rows, AVX2 for the int8 integer path
 * elsewhere and the 8-lane kernels, FMA as the compiler fuses the multiply-adds; NEON on Arm;
 * AMX-BF16 and AMX-INT8 tiles for bfloat16 and int8 projections of several rows, where the
 * OS grants them too. */
#include "amx.h"
#include "kernels.h"

#ifdef __AVX512F__
#define ISA_AVX512F "avx512f "
#else
#define ISA_AVX512F ""
#endif
#ifdef __AVX512BW__
#define ISA_AVX512BW "avx512bw "
#else
#define ISA_AVX512BW ""
#endif
#ifdef __AVX512VNNI__
#define ISA_AVX512VNNI "avx512vnni "
#else
#define ISA_AVX512VNNI ""
#endif
#ifdef __AVX512BF16__
#define ISA_AVX512BF16 "avx512bf16 "
#else
#define ISA_AVX512BF16 ""
#endif
#ifdef __AVX2__
#define ISA_AVX2 "avx2 "
#else
#define ISA_AVX2 ""
#endif
#ifdef __FMA__
#define ISA_FMA "fma "
#else
#define ISA_FMA ""
#endif
#ifdef __ARM_NEON
#define ISA_NEON "neon "
#else
#define ISA_NEON ""
#endif

const char *cpuk_isa(void) {
#define ISA ISA_AVX512F ISA_AVX512BW ISA_AVX512VNNI ISA_AVX512BF16 ISA_AVX2 ISA_FMA ISA_NEON
    return amx_ready() ? ISA "amxbf16 amxint8 " : ISA;
}
