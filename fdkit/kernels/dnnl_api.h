// The part of oneDNN v3's C API (dnnl.h, Apache-2.0, Intel) that linear.cc calls, declared here: paddle's
// wheel ships oneDNN's library (libs/libdnnl.so.3) but not its headers. Values are those of oneDNN 3.x's
// dnnl_types.h / dnnl_common_types.h; the loader checks the library's major version at run time.
#pragma once

#include <cstddef>
#include <cstdint>

extern "C" {

typedef int dnnl_status_t;  // dnnl_success = 0
typedef int64_t dnnl_dims_t[12];  // DNNL_MAX_NDIMS
typedef struct dnnl_engine* dnnl_engine_t;
typedef struct dnnl_stream* dnnl_stream_t;
typedef struct dnnl_memory_desc* dnnl_memory_desc_t;
typedef const struct dnnl_memory_desc* const_dnnl_memory_desc_t;
typedef struct dnnl_memory* dnnl_memory_t;
typedef struct dnnl_primitive_desc* dnnl_primitive_desc_t;
typedef const struct dnnl_primitive_desc* const_dnnl_primitive_desc_t;
typedef struct dnnl_primitive* dnnl_primitive_t;
typedef const struct dnnl_primitive* const_dnnl_primitive_t;
typedef const struct dnnl_primitive_attr* const_dnnl_primitive_attr_t;
typedef struct {
  int arg;
  dnnl_memory_t memory;
} dnnl_exec_arg_t;

enum { dnnl_success = 0 };
enum { dnnl_cpu = 1 };                                // dnnl_engine_kind_t
enum { dnnl_stream_in_order = 1 };                    // dnnl_stream_flags_t
enum { dnnl_bf16 = 2, dnnl_f32 = 3, dnnl_u8 = 6 };    // dnnl_data_type_t
enum { dnnl_format_tag_any = 1, dnnl_ab = 3 };        // dnnl_format_tag_t
enum { dnnl_query_src_md = 129, dnnl_query_weights_md = 131, dnnl_query_dst_md = 133 };  // dnnl_query_t
enum { DNNL_ARG_SRC = 1, DNNL_ARG_DST = 17, DNNL_ARG_WEIGHTS = 33 };

typedef struct {
  int major, minor, patch;
  const char* hash;
  unsigned cpu_runtime, gpu_runtime;
} dnnl_version_t;

const dnnl_version_t* dnnl_version(void);
dnnl_status_t dnnl_engine_create(dnnl_engine_t* engine, int kind, size_t index);
dnnl_status_t dnnl_stream_create(dnnl_stream_t* stream, dnnl_engine_t engine, unsigned flags);
dnnl_status_t dnnl_stream_wait(dnnl_stream_t stream);
dnnl_status_t dnnl_memory_desc_create_with_tag(dnnl_memory_desc_t* memory_desc, int ndims,
                                               const dnnl_dims_t dims, int data_type, int tag);
dnnl_status_t dnnl_memory_desc_clone(dnnl_memory_desc_t* memory_desc, const_dnnl_memory_desc_t existing);
dnnl_status_t dnnl_memory_desc_destroy(dnnl_memory_desc_t memory_desc);
int dnnl_memory_desc_equal(const_dnnl_memory_desc_t lhs, const_dnnl_memory_desc_t rhs);
size_t dnnl_memory_desc_get_size(const_dnnl_memory_desc_t memory_desc);
dnnl_status_t dnnl_memory_create(dnnl_memory_t* memory, const_dnnl_memory_desc_t memory_desc,
                                 dnnl_engine_t engine, void* handle);
dnnl_status_t dnnl_memory_set_data_handle(dnnl_memory_t memory, void* handle);
dnnl_status_t dnnl_memory_destroy(dnnl_memory_t memory);
dnnl_status_t dnnl_matmul_primitive_desc_create(dnnl_primitive_desc_t* primitive_desc, dnnl_engine_t engine,
                                                const_dnnl_memory_desc_t src_desc,
                                                const_dnnl_memory_desc_t weights_desc,
                                                const_dnnl_memory_desc_t bias_desc,
                                                const_dnnl_memory_desc_t dst_desc,
                                                const_dnnl_primitive_attr_t attr);
dnnl_status_t dnnl_reorder_primitive_desc_create(dnnl_primitive_desc_t* reorder_primitive_desc,
                                                 const_dnnl_memory_desc_t src_desc, dnnl_engine_t src_engine,
                                                 const_dnnl_memory_desc_t dst_desc, dnnl_engine_t dst_engine,
                                                 const_dnnl_primitive_attr_t attr);
const_dnnl_memory_desc_t dnnl_primitive_desc_query_md(const_dnnl_primitive_desc_t primitive_desc, int what,
                                                      int index);
dnnl_status_t dnnl_primitive_desc_destroy(dnnl_primitive_desc_t primitive_desc);
dnnl_status_t dnnl_primitive_create(dnnl_primitive_t* primitive, const_dnnl_primitive_desc_t primitive_desc);
dnnl_status_t dnnl_primitive_execute(const_dnnl_primitive_t primitive, dnnl_stream_t stream, int nargs,
                                     const dnnl_exec_arg_t* args);
dnnl_status_t dnnl_primitive_destroy(dnnl_primitive_t primitive);

}  // extern "C"
