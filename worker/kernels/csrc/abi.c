/* What worker/kernels/abi.py checks before it uses the library: the header it was built from
 * and the sizes of the structs the two sides share. */
#include "kernels.h"

int64_t cpuk_abi_version(void) { return CPUK_ABI_VERSION; }

int64_t cpuk_sizeof_proj(void) { return (int64_t)sizeof(cpuk_proj); }

int64_t cpuk_sizeof_layer(void) { return (int64_t)sizeof(cpuk_layer); }

int64_t cpuk_sizeof_decode_step(void) { return (int64_t)sizeof(cpuk_decode_step); }
