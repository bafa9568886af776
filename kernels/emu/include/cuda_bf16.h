// Empty: the emulated kernel families do not use bf16 (common.cuh includes it).
#pragma once
