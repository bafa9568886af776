// The subset of CUDA's cuda_fp8.h that kernels/cuda/fp8.cu uses, for its host
// emulation (fp8_emu.cpp): E4M3 with round-to-nearest-even and saturation to
// +-448, as the hardware's cvt.rn.satfinite. Consistency checks between the
// kernels do not depend on this rounding; the GPU check group "fp8 quantize"
// holds the real one to the CPU's bit for bit.
#pragma once
#include <cmath>

enum __nv_saturation_t { __NV_NOSAT, __NV_SATFINITE };
enum __nv_fp8_interpretation_t { __NV_E4M3, __NV_E5M2 };
struct __half_raw { float value; };
struct __half {
    float value;
    explicit __half(__half_raw raw) : value(raw.value) {}
};
static inline float __half2float(__half h) { return h.value; }

static inline unsigned char __nv_cvt_float_to_fp8(float x, __nv_saturation_t, __nv_fp8_interpretation_t) {
    if (std::isnan(x)) return 0x7f;
    const unsigned char sign = std::signbit(x) ? 0x80 : 0;
    const float a = std::fabs(x);
    if (a > 448.0f) return sign | 0x7e;
    int e;
    std::frexp(a, &e);  // a = m 2^e, m in [0.5, 1)
    const int exponent = e - 1 < -6 ? -6 : e - 1;  // subnormals share 2^-6's quantum
    const float quantum = std::ldexp(1.0f, exponent - 3);
    const float rounded = std::nearbyint(a / quantum) * quantum;  // ties to even
    if (rounded == 0.0f) return sign;
    std::frexp(rounded, &e);
    if (e - 1 < -6) return sign | (unsigned char)(rounded / std::ldexp(1.0f, -9));
    const int mantissa = (int)(rounded / std::ldexp(1.0f, e - 1) * 8.0f) - 8;
    return sign | (unsigned char)(((e - 1 + 7) << 3) | mantissa);
}

static inline __half_raw __nv_cvt_fp8_to_halfraw(unsigned char code, __nv_fp8_interpretation_t) {
    const float sign = code & 0x80 ? -1.0f : 1.0f;
    const int exponent = (code >> 3) & 0xf, mantissa = code & 7;
    if (exponent == 0xf && mantissa == 7) return {NAN};
    const float value = exponent == 0 ? std::ldexp((float)mantissa, -9)
                                      : std::ldexp(1.0f + mantissa / 8.0f, exponent - 7);
    return {sign * value};
}
