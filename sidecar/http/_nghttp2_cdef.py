"""libnghttp2's declarations for cffi, in a file that imports nothing of the sidecar.

setup.py loads this file by path (the package's __init__ must not run at build time) to build
the compiled binding (API mode, `sidecar.http._nghttp2_api`); sidecar/http/_nghttp2.py uses
the same declarations for the ABI-mode fallback. Copied from nghttp2.h 1.52, field for field.
Pointers to bytes are declared `char *` where the header says `uint8_t *` (same ABI) so that
`ffi.unpack` returns `bytes`; the compiled build silences the C compiler's pointer-sign notes.
"""

from __future__ import annotations

from typing import Any, Final

CDEF: Final = r"""
typedef struct nghttp2_session nghttp2_session;
typedef struct nghttp2_session_callbacks nghttp2_session_callbacks;
typedef struct nghttp2_option nghttp2_option;

typedef struct { char *name; char *value; size_t namelen; size_t valuelen; uint8_t flags; }
    nghttp2_nv;
typedef struct { size_t length; int32_t stream_id; uint8_t type; uint8_t flags;
                 uint8_t reserved; } nghttp2_frame_hd;
typedef struct { int32_t stream_id; int32_t weight; uint8_t exclusive; } nghttp2_priority_spec;
typedef struct { nghttp2_frame_hd hd; size_t padlen; } nghttp2_data;
typedef struct { nghttp2_frame_hd hd; size_t padlen; nghttp2_priority_spec pri_spec;
                 nghttp2_nv *nva; size_t nvlen; int cat; } nghttp2_headers;
typedef struct { nghttp2_frame_hd hd; nghttp2_priority_spec pri_spec; } nghttp2_priority;
typedef struct { nghttp2_frame_hd hd; uint32_t error_code; } nghttp2_rst_stream;
typedef struct { int32_t settings_id; uint32_t value; } nghttp2_settings_entry;
typedef struct { nghttp2_frame_hd hd; size_t niv; nghttp2_settings_entry *iv; }
    nghttp2_settings;
typedef struct { nghttp2_frame_hd hd; size_t padlen; nghttp2_nv *nva; size_t nvlen;
                 int32_t promised_stream_id; uint8_t reserved; } nghttp2_push_promise;
typedef struct { nghttp2_frame_hd hd; uint8_t opaque_data[8]; } nghttp2_ping;
typedef struct { nghttp2_frame_hd hd; int32_t last_stream_id; uint32_t error_code;
                 uint8_t *opaque_data; size_t opaque_data_len; uint8_t reserved; }
    nghttp2_goaway;
typedef struct { nghttp2_frame_hd hd; int32_t window_size_increment; uint8_t reserved; }
    nghttp2_window_update;
typedef struct { nghttp2_frame_hd hd; void *payload; } nghttp2_extension;
typedef union {
  nghttp2_frame_hd hd; nghttp2_data data; nghttp2_headers headers;
  nghttp2_priority priority; nghttp2_rst_stream rst_stream; nghttp2_settings settings;
  nghttp2_push_promise push_promise; nghttp2_ping ping; nghttp2_goaway goaway;
  nghttp2_window_update window_update; nghttp2_extension ext;
} nghttp2_frame;

typedef union { int fd; void *ptr; } nghttp2_data_source;
typedef ssize_t (*nghttp2_data_source_read_callback)(
    nghttp2_session *session, int32_t stream_id, char *buf, size_t length,
    uint32_t *data_flags, nghttp2_data_source *source, void *user_data);
typedef struct { nghttp2_data_source source; nghttp2_data_source_read_callback read_callback; }
    nghttp2_data_provider;

typedef int (*nghttp2_on_frame_recv_callback)(nghttp2_session *, const nghttp2_frame *, void *);
typedef int (*nghttp2_on_begin_headers_callback)(nghttp2_session *, const nghttp2_frame *,
                                                 void *);
typedef int (*nghttp2_on_header_callback)(nghttp2_session *, const nghttp2_frame *,
    const char *name, size_t namelen, const char *value, size_t valuelen, uint8_t flags,
    void *);
typedef int (*nghttp2_on_data_chunk_recv_callback)(nghttp2_session *, uint8_t flags,
    int32_t stream_id, const char *data, size_t len, void *);
typedef int (*nghttp2_on_stream_close_callback)(nghttp2_session *, int32_t stream_id,
    uint32_t error_code, void *);
typedef int (*nghttp2_on_frame_not_send_callback)(nghttp2_session *, const nghttp2_frame *,
    int lib_error_code, void *);
typedef int (*nghttp2_error_callback2)(nghttp2_session *, int lib_error_code, const char *msg,
    size_t len, void *);

int nghttp2_session_callbacks_new(nghttp2_session_callbacks **callbacks_ptr);
void nghttp2_session_callbacks_set_on_frame_recv_callback(nghttp2_session_callbacks *,
    nghttp2_on_frame_recv_callback);
void nghttp2_session_callbacks_set_on_begin_headers_callback(nghttp2_session_callbacks *,
    nghttp2_on_begin_headers_callback);
void nghttp2_session_callbacks_set_on_header_callback(nghttp2_session_callbacks *,
    nghttp2_on_header_callback);
void nghttp2_session_callbacks_set_on_data_chunk_recv_callback(nghttp2_session_callbacks *,
    nghttp2_on_data_chunk_recv_callback);
void nghttp2_session_callbacks_set_on_stream_close_callback(nghttp2_session_callbacks *,
    nghttp2_on_stream_close_callback);
void nghttp2_session_callbacks_set_on_frame_not_send_callback(nghttp2_session_callbacks *,
    nghttp2_on_frame_not_send_callback);
void nghttp2_session_callbacks_set_error_callback2(nghttp2_session_callbacks *,
    nghttp2_error_callback2);

int nghttp2_option_new(nghttp2_option **option_ptr);
void nghttp2_option_del(nghttp2_option *option);
void nghttp2_option_set_no_auto_window_update(nghttp2_option *option, int val);
void nghttp2_option_set_max_send_header_block_length(nghttp2_option *option, size_t val);
void nghttp2_option_set_max_deflate_dynamic_table_size(nghttp2_option *option, size_t val);
void nghttp2_option_set_max_outbound_ack(nghttp2_option *option, size_t val);
void nghttp2_option_set_max_settings(nghttp2_option *option, size_t val);
void nghttp2_option_set_stream_reset_rate_limit(nghttp2_option *option, uint64_t burst,
                                                uint64_t rate);
void nghttp2_option_set_max_continuations(nghttp2_option *option, size_t val);
void nghttp2_option_set_no_closed_streams(nghttp2_option *option, int val);

int nghttp2_session_client_new2(nghttp2_session **session_ptr,
    const nghttp2_session_callbacks *callbacks, void *user_data, const nghttp2_option *option);
int nghttp2_session_server_new2(nghttp2_session **session_ptr,
    const nghttp2_session_callbacks *callbacks, void *user_data, const nghttp2_option *option);
void nghttp2_session_del(nghttp2_session *session);
ssize_t nghttp2_session_mem_recv(nghttp2_session *session, const char *in, size_t inlen);
ssize_t nghttp2_session_mem_send(nghttp2_session *session, const char **data_ptr);
int nghttp2_session_want_read(nghttp2_session *session);
int nghttp2_session_consume(nghttp2_session *session, int32_t stream_id, size_t size);
int nghttp2_session_consume_connection(nghttp2_session *session, size_t size);
int nghttp2_session_resume_data(nghttp2_session *session, int32_t stream_id);
int32_t nghttp2_session_get_stream_remote_window_size(nghttp2_session *session,
                                                      int32_t stream_id);
int32_t nghttp2_session_get_remote_window_size(nghttp2_session *session);
uint32_t nghttp2_session_get_remote_settings(nghttp2_session *session, int id);
uint32_t nghttp2_session_get_next_stream_id(nghttp2_session *session);
int32_t nghttp2_session_get_last_proc_stream_id(nghttp2_session *session);
int nghttp2_session_set_local_window_size(nghttp2_session *session, uint8_t flags,
                                          int32_t stream_id, int32_t window_size);

int nghttp2_submit_settings(nghttp2_session *session, uint8_t flags,
                            const nghttp2_settings_entry *iv, size_t niv);
int32_t nghttp2_submit_request(nghttp2_session *session, const nghttp2_priority_spec *pri_spec,
    const nghttp2_nv *nva, size_t nvlen, const nghttp2_data_provider *data_prd,
    void *stream_user_data);
int nghttp2_submit_response(nghttp2_session *session, int32_t stream_id,
    const nghttp2_nv *nva, size_t nvlen, const nghttp2_data_provider *data_prd);
int32_t nghttp2_submit_headers(nghttp2_session *session, uint8_t flags, int32_t stream_id,
    const nghttp2_priority_spec *pri_spec, const nghttp2_nv *nva, size_t nvlen,
    void *stream_user_data);
int nghttp2_submit_trailer(nghttp2_session *session, int32_t stream_id,
                           const nghttp2_nv *nva, size_t nvlen);
int nghttp2_submit_rst_stream(nghttp2_session *session, uint8_t flags, int32_t stream_id,
                              uint32_t error_code);
int nghttp2_submit_goaway(nghttp2_session *session, uint8_t flags, int32_t last_stream_id,
    uint32_t error_code, const char *opaque_data, size_t opaque_data_len);
int nghttp2_submit_ping(nghttp2_session *session, uint8_t flags, const char *opaque_data);
const char *nghttp2_strerror(int lib_error_code);
"""

# The engine's callbacks as C functions that call Python (API mode only): generated C, much
# cheaper to enter than the libffi closures of ABI mode's ffi.callback.
EXTERN_PYTHON: Final = r"""
extern "Python" int h2e_begin_headers(nghttp2_session *, const nghttp2_frame *, void *);
extern "Python" int h2e_header(nghttp2_session *, const nghttp2_frame *, const char *, size_t,
                               const char *, size_t, uint8_t, void *);
extern "Python" int h2e_data_chunk(nghttp2_session *, uint8_t, int32_t, const char *, size_t,
                                   void *);
extern "Python" int h2e_frame_recv(nghttp2_session *, const nghttp2_frame *, void *);
extern "Python" int h2e_stream_close(nghttp2_session *, int32_t, uint32_t, void *);
extern "Python" int h2e_frame_not_send(nghttp2_session *, const nghttp2_frame *, int, void *);
extern "Python" int h2e_error(nghttp2_session *, int, const char *, size_t, void *);
extern "Python" ssize_t h2e_read(nghttp2_session *, int32_t, char *, size_t, uint32_t *,
                                 nghttp2_data_source *, void *);
"""

MODULE: Final = "sidecar.http._nghttp2_api"
# char * against uint8_t * (see above), and the const of nghttp2's callback typedefs.
COMPILE_ARGS: Final = ["-Wno-pointer-sign", "-Wno-incompatible-pointer-types",
                       "-Wno-discarded-qualifiers"]


def builder() -> Any:
    """The cffi builder of the compiled binding (needs cffi, a C compiler, libnghttp2-dev)."""
    import cffi

    ffibuilder = cffi.FFI()
    ffibuilder.cdef(CDEF + EXTERN_PYTHON)
    ffibuilder.set_source(MODULE, "#include <nghttp2/nghttp2.h>", libraries=["nghttp2"],
                          extra_compile_args=COMPILE_ARGS)
    return ffibuilder
