// Marks functions compiled for both the host and the device, so per-element
// logic is written once and shared by the CPU loops and the CUDA kernels.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define ALLTOALL_HOST_DEVICE __host__ __device__
#else
#define ALLTOALL_HOST_DEVICE
#endif

#define ALLTOALL_INLINE ALLTOALL_HOST_DEVICE inline
