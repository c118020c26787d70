/*
 * A stand-in for Rockchip's librkllmrt.so, so the real ctypes binding can be tested on a
 * machine without an NPU. Built once per ABI by tests/rkllm_fake.py:
 *
 *   gcc -shared -fPIC -O1 -pthread [-DRKLLM_ABI_130] -DFAKE_RKLLM_VERSION='"1.2.1"' \
 *       fake_rkllm.c -o librkllmrt.so
 *
 * Struct definitions are written to match the public rkllm.h of each release (1.2.1 - 1.2.3
 * share one ABI; RKLLM_ABI_130 selects 1.3.0's). Behaviour, deterministic:
 *   - the answer echoes the prompt and the number of image tokens received, ending in
 *     "café", one callback per word; a word with a multi-byte character arrives in two
 *     callbacks, the first ending inside the character with RKLLM_RUN_WAITING;
 *   - the callback runs on a thread of the library's own (pthread), rkllm_run blocks;
 *   - one "token" is one byte of text (an image token is one token), so tests can compute
 *     what fits: a turn needing more than max_context_len fails with RKLLM_RUN_ERROR;
 *   - keep_history, rkllm_clear_kv_cache, rkllm_abort and prompt caches work as documented;
 *   - every call and every argument is recorded (a run's sampling values too, when the
 *     1.3.0 infer params carry them); fake_rkllm_dump() returns them as JSON.
 * Test hooks: fake_rkllm_set("hold_after", n) makes generation wait after n callbacks until
 * rkllm_abort (at most 30 s); "hang_after" n makes it sleep after n callbacks for 60 s,
 * ignoring rkllm_abort (a runtime wedged in the NPU driver); "error_at" n reports an error
 * instead of callback n; "hook_run" n applies hold_after, hang_after and error_at to the
 * n-th rkllm_run only (1-based, counted since init or reset; 0: every run); "fail_init" 1
 * makes rkllm_init fail. fake_rkllm_reset() clears the log and the hooks.
 * For a runtime loaded by another process (the daemon), rkllm_init also reads the hooks from
 * the environment: FAKE_RKLLM_HOLD_AFTER, FAKE_RKLLM_HANG_AFTER, FAKE_RKLLM_ERROR_AT,
 * FAKE_RKLLM_HOOK_RUN, FAKE_RKLLM_REUSE ("reuse" 1: a run whose prompt and image start
 * like the previous run's prefills only the rest, as the real runtime's automatic prompt
 * cache reuse does; mode GET_LAST_HIDDEN_LAYER prefills and generates nothing); and FAKE_RKLLM_LOG=path appends every recorded call to that file as
 * one JSON line, plus {"fn":"hold"} / {"fn":"hang"} when generation starts holding or hanging.
 * The fake model file is any text file; "embed_dim=N" in it sets the embedding width used
 * to find the last float of an image embedding.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifndef FAKE_RKLLM_VERSION
#define FAKE_RKLLM_VERSION "1.2.1"
#endif

#define EXPORT __attribute__((visibility("default")))

#ifndef FAKE_RKLLM_NO_BANNER
/* The real runtime prints this at init; the binding reads the version from the file. */
EXPORT __attribute__((used)) const char fake_rkllm_banner[] =
    "rkllm-runtime version: " FAKE_RKLLM_VERSION ", rknpu driver version: %s, platform: %s";
#endif

/* ------------------------------------------------------------------ the ABI (rkllm.h) */

typedef void *LLMHandle;

typedef enum {
    RKLLM_RUN_NORMAL = 0,
    RKLLM_RUN_WAITING = 1,
    RKLLM_RUN_FINISH = 2,
    RKLLM_RUN_ERROR = 3,
} LLMCallState;

typedef enum {
    RKLLM_INPUT_PROMPT = 0,
    RKLLM_INPUT_TOKEN = 1,
    RKLLM_INPUT_EMBED = 2,
    RKLLM_INPUT_MULTIMODAL = 3,
} RKLLMInputType;

typedef enum {
    RKLLM_INFER_GENERATE = 0,
    RKLLM_INFER_GET_LAST_HIDDEN_LAYER = 1,
    RKLLM_INFER_GET_LOGITS = 2,
} RKLLMInferMode;

typedef struct {
    int32_t base_domain_id;
    int8_t embed_flash;
    int8_t enabled_cpus_num;
    uint32_t enabled_cpus_mask;
    uint8_t n_batch;
    int8_t use_cross_attn;
    uint8_t reserved[104];
} RKLLMExtendParam;

typedef struct {
    const char *model_path;
    int32_t max_context_len;
    int32_t max_new_tokens;
    int32_t top_k;
    int32_t n_keep;
    float top_p;
    float temperature;
    float repeat_penalty;
    float frequency_penalty;
    float presence_penalty;
    int32_t mirostat;
    float mirostat_tau;
    float mirostat_eta;
    bool skip_special_token;
#ifdef RKLLM_ABI_130
    bool ignore_eos_token;
#endif
    bool is_async;
#ifndef RKLLM_ABI_130
    const char *img_start;
    const char *img_end;
    const char *img_content;
#endif
    RKLLMExtendParam extend_param;
} RKLLMParam;

typedef struct {
    const char *lora_adapter_path;
    const char *lora_adapter_name;
    float scale;
} RKLLMLoraAdapter;

typedef struct {
    float *embed;
    size_t n_tokens;
} RKLLMEmbedInput;

typedef struct {
    int32_t *input_ids;
    size_t n_tokens;
} RKLLMTokenInput;

#ifdef RKLLM_ABI_130
typedef struct {
    char *prompt;
    struct {
        float *image_embed;
        size_t n_image_tokens;
        size_t n_image;
        const char *image_start;
        const char *image_end;
        const char *image_content;
        size_t image_width;
        size_t image_height;
    } image;
    struct {
        float *video_embed;
        size_t n_frame_tokens;
        size_t n_frame_per_video;
        size_t n_video;
        const char *video_start;
        const char *video_end;
        const char *video_content;
        size_t frame_width;
        size_t frame_height;
    } video;
} RKLLMMultiModalInput;
#else
typedef struct {
    char *prompt;
    float *image_embed;
    size_t n_image_tokens;
    size_t n_image;
    size_t image_width;
    size_t image_height;
} RKLLMMultiModalInput;
#endif

typedef struct {
    const char *role;
    bool enable_thinking;
    RKLLMInputType input_type;
    union {
        const char *prompt_input;
        RKLLMEmbedInput embed_input;
        RKLLMTokenInput token_input;
        RKLLMMultiModalInput multimodal_input;
    };
} RKLLMInput;

typedef struct {
    const char *lora_adapter_name;
} RKLLMLoraParam;

typedef struct {
    int save_prompt_cache;
    const char *prompt_cache_path;
} RKLLMPromptCacheParam;

#ifdef RKLLM_ABI_130
typedef struct {
    int32_t top_k;
    float top_p;
    float temperature;
    float repeat_penalty;
    float frequency_penalty;
    float presence_penalty;
    int32_t mirostat;
    float mirostat_tau;
    float mirostat_eta;
} RKLLMSamplingParam;
#endif

typedef struct {
    RKLLMInferMode mode;
    RKLLMLoraParam *lora_params;
    RKLLMPromptCacheParam *prompt_cache_params;
#ifdef RKLLM_ABI_130
    RKLLMSamplingParam *sampling_params;
#endif
    int keep_history;
#ifdef RKLLM_ABI_130
    int32_t max_new_tokens;
#endif
} RKLLMInferParam;

typedef struct {
    const float *hidden_states;
    int embd_size;
    int num_tokens;
} RKLLMResultLastHiddenLayer;

typedef struct {
    const float *logits;
    int vocab_size;
    int num_tokens;
} RKLLMResultLogits;

typedef struct {
    float prefill_time_ms;
    int prefill_tokens;
    float generate_time_ms;
    int generate_tokens;
    float memory_usage_mb;
} RKLLMPerfStat;

typedef struct {
    const char *text;
    int32_t token_id;
    RKLLMResultLastHiddenLayer last_hidden_layer;
    RKLLMResultLogits logits;
    RKLLMPerfStat perf;
} RKLLMResult;

typedef int (*LLMResultCallback)(RKLLMResult *result, void *userdata, LLMCallState state);

#ifdef RKLLM_ABI_130
typedef struct {
    LLMResultCallback result_callback;
    void *result_userdata;
    void *tokenizer_callback; /* function pointers the fake never calls */
    void *tokenizer_userdata;
    void *embed_callback;
    void *embed_userdata;
} RKLLMCallback;
#endif

/* ------------------------------------------------------------------ the call log (JSON) */

static pthread_mutex_t g_log_mu = PTHREAD_MUTEX_INITIALIZER;
static char *g_log;
static size_t g_log_len, g_log_cap;
static long g_hold_after = -1, g_error_at = -1, g_fail_init = 0;
static long g_hang_after = -1, g_hook_run = 0, g_runs = 0;
/* "reuse" 1: like runtime 1.2.0+'s automatic prompt cache reuse, a run whose input starts
 * like the previous run's (same image) prefills only what differs; 0: it prefills all. */
static long g_reuse = 0;
static char *g_log_path; /* FAKE_RKLLM_LOG: every record also appended here, one a line */

static void log_file_line(const char *line) {
    if (!g_log_path) return;
    FILE *fp = fopen(g_log_path, "a");
    if (!fp) return;
    fputs(line, fp);
    fputc('\n', fp);
    fclose(fp);
}

typedef struct {
    char *buf;
    size_t len, cap;
    int first;
} Rec;

static void rec_raw(Rec *r, const char *s, size_t n) {
    if (r->len + n + 1 > r->cap) {
        size_t cap = r->cap ? r->cap : 256;
        while (r->len + n + 1 > cap) cap *= 2;
        r->buf = realloc(r->buf, cap);
        r->cap = cap;
    }
    memcpy(r->buf + r->len, s, n);
    r->len += n;
    r->buf[r->len] = 0;
}

static void rec_cstr(Rec *r, const char *s) { rec_raw(r, s, strlen(s)); }

static void rec_json_string(Rec *r, const char *s) {
    char tmp[8];
    rec_cstr(r, "\"");
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\') {
            tmp[0] = '\\';
            tmp[1] = (char)*p;
            rec_raw(r, tmp, 2);
        } else if (*p < 0x20) {
            snprintf(tmp, sizeof tmp, "\\u%04x", *p);
            rec_cstr(r, tmp);
        } else {
            rec_raw(r, (const char *)p, 1);
        }
    }
    rec_cstr(r, "\"");
}

static void rec_key(Rec *r, const char *k) {
    if (!r->first) rec_cstr(r, ",");
    r->first = 0;
    rec_json_string(r, k);
    rec_cstr(r, ":");
}

static void rec_begin(Rec *r, const char *fn) {
    memset(r, 0, sizeof *r);
    r->first = 1;
    rec_cstr(r, "{");
    rec_key(r, "fn");
    rec_json_string(r, fn);
}

static void rec_s(Rec *r, const char *k, const char *v) {
    rec_key(r, k);
    if (v) rec_json_string(r, v);
    else rec_cstr(r, "null");
}

static void rec_i(Rec *r, const char *k, long long v) {
    char tmp[32];
    rec_key(r, k);
    snprintf(tmp, sizeof tmp, "%lld", v);
    rec_cstr(r, tmp);
}

static void rec_f(Rec *r, const char *k, double v) {
    char tmp[64];
    rec_key(r, k);
    snprintf(tmp, sizeof tmp, "%.9g", v);
    rec_cstr(r, tmp);
}

static void rec_b(Rec *r, const char *k, int v) {
    rec_key(r, k);
    rec_cstr(r, v ? "true" : "false");
}

static void rec_end(Rec *r) {
    rec_cstr(r, "}");
    pthread_mutex_lock(&g_log_mu);
    size_t need = g_log_len + r->len + 2;
    if (need > g_log_cap) {
        size_t cap = g_log_cap ? g_log_cap : 4096;
        while (need > cap) cap *= 2;
        g_log = realloc(g_log, cap);
        g_log_cap = cap;
    }
    if (g_log_len) g_log[g_log_len++] = ',';
    memcpy(g_log + g_log_len, r->buf, r->len);
    g_log_len += r->len;
    g_log[g_log_len] = 0;
    log_file_line(r->buf);
    pthread_mutex_unlock(&g_log_mu);
    free(r->buf);
    r->buf = NULL;
}

static void log_event(const char *fn, const char *what) {
    Rec r;
    rec_begin(&r, fn);
    rec_s(&r, "what", what);
    rec_end(&r);
}

/* JSON array of every call since the last reset; returns its length (without the NUL). */
EXPORT size_t fake_rkllm_dump(char *buf, size_t n) {
    pthread_mutex_lock(&g_log_mu);
    size_t need = g_log_len + 2;
    if (buf && n > need) {
        buf[0] = '[';
        if (g_log_len) memcpy(buf + 1, g_log, g_log_len);
        buf[g_log_len + 1] = ']';
        buf[g_log_len + 2] = 0;
    }
    pthread_mutex_unlock(&g_log_mu);
    return need;
}

EXPORT void fake_rkllm_reset(void) {
    pthread_mutex_lock(&g_log_mu);
    g_log_len = 0;
    if (g_log) g_log[0] = 0;
    g_hold_after = -1;
    g_error_at = -1;
    g_fail_init = 0;
    g_hang_after = -1;
    g_hook_run = 0;
    g_runs = 0;
    g_reuse = 0;
    pthread_mutex_unlock(&g_log_mu);
}

EXPORT int fake_rkllm_set(const char *key, long value) {
    if (!strcmp(key, "hold_after")) g_hold_after = value;
    else if (!strcmp(key, "error_at")) g_error_at = value;
    else if (!strcmp(key, "fail_init")) g_fail_init = value;
    else if (!strcmp(key, "hang_after")) g_hang_after = value;
    else if (!strcmp(key, "hook_run")) g_hook_run = value;
    else if (!strcmp(key, "reuse")) g_reuse = value;
    else return -1;
    return 0;
}

#define OFF(T, f) rec_i(&r, #T "." #f, (long long)offsetof(T, f))
#define SIZE(T) rec_i(&r, "sizeof " #T, (long long)sizeof(T))

/* Struct sizes and field offsets as this compiler lays them out, for the layout tests. */
EXPORT size_t fake_rkllm_layout(char *buf, size_t n) {
    Rec r;
    memset(&r, 0, sizeof r);
    r.first = 1;
    rec_cstr(&r, "{");
    SIZE(RKLLMExtendParam);
    OFF(RKLLMExtendParam, embed_flash);
    OFF(RKLLMExtendParam, enabled_cpus_num);
    OFF(RKLLMExtendParam, enabled_cpus_mask);
    OFF(RKLLMExtendParam, n_batch);
    OFF(RKLLMExtendParam, use_cross_attn);
    OFF(RKLLMExtendParam, reserved);
    SIZE(RKLLMParam);
    OFF(RKLLMParam, max_context_len);
    OFF(RKLLMParam, max_new_tokens);
    OFF(RKLLMParam, top_k);
    OFF(RKLLMParam, n_keep);
    OFF(RKLLMParam, top_p);
    OFF(RKLLMParam, temperature);
    OFF(RKLLMParam, repeat_penalty);
    OFF(RKLLMParam, frequency_penalty);
    OFF(RKLLMParam, presence_penalty);
    OFF(RKLLMParam, mirostat);
    OFF(RKLLMParam, mirostat_tau);
    OFF(RKLLMParam, mirostat_eta);
    OFF(RKLLMParam, skip_special_token);
    OFF(RKLLMParam, is_async);
#ifdef RKLLM_ABI_130
    OFF(RKLLMParam, ignore_eos_token);
#else
    OFF(RKLLMParam, img_start);
    OFF(RKLLMParam, img_end);
    OFF(RKLLMParam, img_content);
#endif
    OFF(RKLLMParam, extend_param);
    SIZE(RKLLMLoraAdapter);
    OFF(RKLLMLoraAdapter, scale);
    SIZE(RKLLMMultiModalInput);
    OFF(RKLLMMultiModalInput, prompt);
#ifdef RKLLM_ABI_130
    OFF(RKLLMMultiModalInput, image.image_embed);
    OFF(RKLLMMultiModalInput, image.n_image_tokens);
    OFF(RKLLMMultiModalInput, image.n_image);
    OFF(RKLLMMultiModalInput, image.image_start);
    OFF(RKLLMMultiModalInput, image.image_end);
    OFF(RKLLMMultiModalInput, image.image_content);
    OFF(RKLLMMultiModalInput, image.image_width);
    OFF(RKLLMMultiModalInput, image.image_height);
    OFF(RKLLMMultiModalInput, video);
    OFF(RKLLMMultiModalInput, video.n_video);
    OFF(RKLLMMultiModalInput, video.frame_height);
#else
    OFF(RKLLMMultiModalInput, image_embed);
    OFF(RKLLMMultiModalInput, n_image_tokens);
    OFF(RKLLMMultiModalInput, n_image);
    OFF(RKLLMMultiModalInput, image_width);
    OFF(RKLLMMultiModalInput, image_height);
#endif
    SIZE(RKLLMInput);
    OFF(RKLLMInput, enable_thinking);
    OFF(RKLLMInput, input_type);
    OFF(RKLLMInput, prompt_input);
    OFF(RKLLMInput, multimodal_input);
    SIZE(RKLLMInferParam);
    OFF(RKLLMInferParam, lora_params);
    OFF(RKLLMInferParam, prompt_cache_params);
    OFF(RKLLMInferParam, keep_history);
#ifdef RKLLM_ABI_130
    OFF(RKLLMInferParam, sampling_params);
    OFF(RKLLMInferParam, max_new_tokens);
    SIZE(RKLLMSamplingParam);
    OFF(RKLLMSamplingParam, mirostat_eta);
    SIZE(RKLLMCallback);
    OFF(RKLLMCallback, result_userdata);
    OFF(RKLLMCallback, embed_userdata);
#endif
    SIZE(RKLLMPromptCacheParam);
    OFF(RKLLMPromptCacheParam, prompt_cache_path);
    SIZE(RKLLMResult);
    OFF(RKLLMResult, token_id);
    OFF(RKLLMResult, last_hidden_layer);
    OFF(RKLLMResult, logits);
    OFF(RKLLMResult, perf);
    SIZE(RKLLMPerfStat);
    OFF(RKLLMPerfStat, prefill_tokens);
    OFF(RKLLMPerfStat, generate_time_ms);
    OFF(RKLLMPerfStat, generate_tokens);
    OFF(RKLLMPerfStat, memory_usage_mb);
    rec_cstr(&r, "}");
    size_t need = r.len;
    if (buf && n > need) memcpy(buf, r.buf, need + 1);
    free(r.buf);
    return need;
}

/* ------------------------------------------------------------------ one model instance */

typedef struct {
    RKLLMParam param;
    char *model_path;
    char *tag_start, *tag_end, *tag_content; /* 1.2.x: from the init params */
    LLMResultCallback cb;
    void *cb_userdata;
    char *system, *prefix, *postfix;
    int system_tokens;
    int system_cached;
    int kv;
    int embed_dim;
    char *lora_name;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int abort_flag;
    int busy; /* calls (other than abort) inside the library for this handle */
    char *last_input; /* the previous run's prompt and image, for prefix reuse */
    double last_sig;
} Fake;

static char *dup_or_null(const char *s) { return s ? strdup(s) : NULL; }

/* The runtime is not reentrant: record any call that overlaps another on the handle. */
static void enter(Fake *f, const char *fn) {
    pthread_mutex_lock(&f->mu);
    int overlap = f->busy > 0;
    f->busy++;
    pthread_mutex_unlock(&f->mu);
    if (overlap) log_event("VIOLATION", fn);
}

static void leave(Fake *f) {
    pthread_mutex_lock(&f->mu);
    f->busy--;
    pthread_mutex_unlock(&f->mu);
}

static void rec_param(Rec *r, const RKLLMParam *p) {
    rec_s(r, "model_path", p->model_path);
    rec_i(r, "max_context_len", p->max_context_len);
    rec_i(r, "max_new_tokens", p->max_new_tokens);
    rec_i(r, "top_k", p->top_k);
    rec_i(r, "n_keep", p->n_keep);
    rec_f(r, "top_p", p->top_p);
    rec_f(r, "temperature", p->temperature);
    rec_f(r, "repeat_penalty", p->repeat_penalty);
    rec_f(r, "frequency_penalty", p->frequency_penalty);
    rec_f(r, "presence_penalty", p->presence_penalty);
    rec_i(r, "mirostat", p->mirostat);
    rec_f(r, "mirostat_tau", p->mirostat_tau);
    rec_f(r, "mirostat_eta", p->mirostat_eta);
    rec_b(r, "skip_special_token", p->skip_special_token);
#ifdef RKLLM_ABI_130
    rec_b(r, "ignore_eos_token", p->ignore_eos_token);
#endif
    rec_b(r, "is_async", p->is_async);
#ifndef RKLLM_ABI_130
    rec_s(r, "img_start", p->img_start);
    rec_s(r, "img_end", p->img_end);
    rec_s(r, "img_content", p->img_content);
#endif
    rec_i(r, "base_domain_id", p->extend_param.base_domain_id);
    rec_i(r, "embed_flash", p->extend_param.embed_flash);
    rec_i(r, "enabled_cpus_num", p->extend_param.enabled_cpus_num);
    rec_i(r, "enabled_cpus_mask", p->extend_param.enabled_cpus_mask);
    rec_i(r, "n_batch", p->extend_param.n_batch);
    rec_i(r, "use_cross_attn", p->extend_param.use_cross_attn);
    int nonzero = 0;
    for (size_t i = 0; i < sizeof p->extend_param.reserved; i++) nonzero += p->extend_param.reserved[i] != 0;
    rec_i(r, "reserved_nonzero", nonzero);
}

EXPORT RKLLMParam rkllm_createDefaultParam(void) {
    RKLLMParam p;
    memset(&p, 0, sizeof p);
    /* Distinct values, so tests can tell what the binding set from what it left alone. */
    p.max_context_len = 512;
    p.max_new_tokens = -1;
    p.top_k = 40;
    p.n_keep = 7;
    p.top_p = 0.95f;
    p.temperature = 0.8f;
    p.repeat_penalty = 1.05f;
    p.frequency_penalty = 0.25f;
    p.presence_penalty = 0.125f;
    p.mirostat = 0;
    p.mirostat_tau = 5.0f;
    p.mirostat_eta = 0.1f;
    p.skip_special_token = false;
    p.is_async = false;
    p.extend_param.n_batch = 1;
    Rec r;
    rec_begin(&r, "rkllm_createDefaultParam");
    rec_end(&r);
    return p;
}

static int read_embed_dim(const char *path, int *dim) {
    FILE *fp = fopen(path, "rb");
    if (!fp) return -1;
    char buf[4096];
    size_t n = fread(buf, 1, sizeof buf - 1, fp);
    fclose(fp);
    buf[n] = 0;
    char *p = strstr(buf, "embed_dim=");
    *dim = p ? atoi(p + 10) : 0;
    return 0;
}

/* The hooks from the environment, for a runtime loaded by a process the test cannot call
 * into (the daemon under test). */
static void env_hooks(void) {
    const char *v;
    if ((v = getenv("FAKE_RKLLM_HOLD_AFTER")) && *v) g_hold_after = atol(v);
    if ((v = getenv("FAKE_RKLLM_HANG_AFTER")) && *v) g_hang_after = atol(v);
    if ((v = getenv("FAKE_RKLLM_ERROR_AT")) && *v) g_error_at = atol(v);
    if ((v = getenv("FAKE_RKLLM_HOOK_RUN")) && *v) g_hook_run = atol(v);
    if ((v = getenv("FAKE_RKLLM_REUSE")) && *v) g_reuse = atol(v);
    if ((v = getenv("FAKE_RKLLM_LOG")) && *v) {
        pthread_mutex_lock(&g_log_mu);
        free(g_log_path);
        g_log_path = strdup(v);
        pthread_mutex_unlock(&g_log_mu);
    }
}

#ifdef RKLLM_ABI_130
EXPORT int rkllm_init(LLMHandle *handle, RKLLMParam *param, RKLLMCallback *callback)
#else
EXPORT int rkllm_init(LLMHandle *handle, RKLLMParam *param, LLMResultCallback callback)
#endif
{
    Rec r;
    rec_begin(&r, "rkllm_init");
    rec_i(&r, "sizeof_param", sizeof(RKLLMParam));
    rec_param(&r, param);
#ifdef RKLLM_ABI_130
    rec_b(&r, "callback_struct", callback != NULL);
    rec_b(&r, "result_callback", callback && callback->result_callback);
    rec_b(&r, "result_userdata", callback && callback->result_userdata);
    rec_b(&r, "tokenizer_callback", callback && callback->tokenizer_callback);
    rec_b(&r, "embed_callback", callback && callback->embed_callback);
    LLMResultCallback cb = callback ? callback->result_callback : NULL;
#else
    rec_b(&r, "result_callback", callback != NULL);
    LLMResultCallback cb = callback;
#endif
    int dim = 0;
    int ret = 0;
    env_hooks();
    if (g_fail_init) ret = -1;
    else if (!param->model_path || read_embed_dim(param->model_path, &dim) != 0) ret = -2;
    else if (!cb) ret = -3;
    rec_i(&r, "ret", ret);
    rec_end(&r);
    if (ret != 0) {
        *handle = NULL;
        return ret;
    }
    Fake *f = calloc(1, sizeof *f);
    f->param = *param;
    f->model_path = strdup(param->model_path);
#ifndef RKLLM_ABI_130
    f->tag_start = dup_or_null(param->img_start);
    f->tag_end = dup_or_null(param->img_end);
    f->tag_content = dup_or_null(param->img_content);
#else
    f->cb_userdata = callback->result_userdata;
#endif
    f->cb = cb;
    f->embed_dim = dim;
    f->system = strdup("");
    f->prefix = strdup("");
    f->postfix = strdup("");
    pthread_mutex_init(&f->mu, NULL);
    pthread_cond_init(&f->cv, NULL);
    *handle = f;
    return 0;
}

EXPORT int rkllm_set_chat_template(LLMHandle h, const char *system, const char *prefix,
                                   const char *postfix) {
    Fake *f = h;
    enter(f, "rkllm_set_chat_template");
    Rec r;
    rec_begin(&r, "rkllm_set_chat_template");
    rec_s(&r, "system", system);
    rec_s(&r, "prefix", prefix);
    rec_s(&r, "postfix", postfix);
    rec_end(&r);
    free(f->system);
    free(f->prefix);
    free(f->postfix);
    f->system = strdup(system ? system : "");
    f->prefix = strdup(prefix ? prefix : "");
    f->postfix = strdup(postfix ? postfix : "");
    f->system_tokens = (int)strlen(f->system);
    f->system_cached = 0;
    f->kv = 0;
    leave(f);
    return 0;
}

EXPORT int rkllm_load_lora(LLMHandle h, RKLLMLoraAdapter *a) {
    Fake *f = h;
    enter(f, "rkllm_load_lora");
    Rec r;
    rec_begin(&r, "rkllm_load_lora");
    rec_s(&r, "path", a->lora_adapter_path);
    rec_s(&r, "name", a->lora_adapter_name);
    rec_f(&r, "scale", a->scale);
    FILE *fp = a->lora_adapter_path ? fopen(a->lora_adapter_path, "rb") : NULL;
    int ret = fp ? 0 : -1;
    if (fp) fclose(fp);
    rec_i(&r, "ret", ret);
    rec_end(&r);
    if (ret == 0) {
        free(f->lora_name);
        f->lora_name = dup_or_null(a->lora_adapter_name);
    }
    leave(f);
    return ret;
}

static const char CACHE_MAGIC[] = "FAKE-PROMPT-CACHE\n";

EXPORT int rkllm_load_prompt_cache(LLMHandle h, const char *path) {
    Fake *f = h;
    enter(f, "rkllm_load_prompt_cache");
    char buf[64] = {0};
    FILE *fp = path ? fopen(path, "rb") : NULL;
    if (fp) {
        size_t n = fread(buf, 1, sizeof buf - 1, fp);
        buf[n] = 0;
        fclose(fp);
    }
    int ret = (fp && !strncmp(buf, CACHE_MAGIC, strlen(CACHE_MAGIC))) ? 0 : -1;
    if (ret == 0) {
        f->system_cached = 1;
        f->kv = f->system_tokens;
    }
    Rec r;
    rec_begin(&r, "rkllm_load_prompt_cache");
    rec_s(&r, "path", path);
    rec_i(&r, "ret", ret);
    rec_end(&r);
    leave(f);
    return ret;
}

EXPORT int rkllm_release_prompt_cache(LLMHandle h) {
    Fake *f = h;
    enter(f, "rkllm_release_prompt_cache");
    log_event("rkllm_release_prompt_cache", "");
    leave(f);
    return 0;
}

/* ------------------------------------------------------------------ generation */

typedef struct {
    Fake *f;
    const char *answer;
    void *userdata;
    int max_new;
    int prefill_tokens;
    char errmsg[256];
    int error;
    int generated;
    int aborted;
    int paused;
    int finished;
    pthread_t caller;
    int other_thread;
    long run; /* 1-based rkllm_run number, for hook_run */
} Job;

static int aborted(Fake *f) {
    pthread_mutex_lock(&f->mu);
    int a = f->abort_flag;
    pthread_mutex_unlock(&f->mu);
    return a;
}

/* Wait until rkllm_abort, or 30 s so a broken test cannot hang forever. */
static void hold(Fake *f) {
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += 30;
    pthread_mutex_lock(&f->mu);
    while (!f->abort_flag) {
        if (pthread_cond_timedwait(&f->cv, &f->mu, &until) == ETIMEDOUT) break;
    }
    pthread_mutex_unlock(&f->mu);
}

/* A runtime wedged in the driver: sleeps 60 s whatever rkllm_abort says. */
static void hang(void) {
    struct timespec left = {60, 0};
    while (nanosleep(&left, &left) == -1 && errno == EINTR) {
    }
}

static void mark(const char *what) {
    char line[64];
    snprintf(line, sizeof line, "{\"fn\":\"%s\"}", what);
    pthread_mutex_lock(&g_log_mu);
    log_file_line(line);
    pthread_mutex_unlock(&g_log_mu);
}

static int hooked(const Job *j) { return g_hook_run <= 0 || j->run == g_hook_run; }

static int emit(Job *j, const char *s, size_t n, LLMCallState state) {
    char *piece = strndup(s, n);
    RKLLMResult res;
    memset(&res, 0, sizeof res);
    res.text = piece;
    res.token_id = 1000 + j->generated;
    int ret = j->f->cb(&res, j->userdata, state);
    free(piece);
    j->generated++;
    return ret;
}

static void *generate(void *arg) {
    Job *j = arg;
    Fake *f = j->f;
    RKLLMResult res;
    memset(&res, 0, sizeof res);
    j->other_thread = !pthread_equal(pthread_self(), j->caller);
    if (j->error) {
        res.text = j->errmsg;
        f->cb(&res, j->userdata, RKLLM_RUN_ERROR);
        return NULL;
    }
    const char *p = j->answer;
    while (*p) {
        if (hooked(j) && g_hold_after >= 0 && j->generated == g_hold_after) {
            mark("hold");
            hold(f);
        }
        if (hooked(j) && g_hang_after >= 0 && j->generated == g_hang_after) {
            mark("hang");
            hang();
        }
        if (aborted(f)) {
            j->aborted = 1;
            return NULL; /* no FINISH after an abort: the binding must not wait for one */
        }
        if (j->generated >= j->max_new) break;
        if (hooked(j) && g_error_at >= 0 && j->generated == g_error_at) {
            snprintf(j->errmsg, sizeof j->errmsg, "fake: injected error at token %d", j->generated);
            res.text = j->errmsg;
            j->error = 1;
            f->cb(&res, j->userdata, RKLLM_RUN_ERROR);
            return NULL;
        }
        const char *q = p + 1; /* a word, with the space before it */
        while (*q && *q != ' ') q++;
        const char *m = p; /* the first multi-byte character's lead byte, if any */
        while (m < q && (unsigned char)*m < 0xC0) m++;
        int ret;
        if (m < q) {
            ret = emit(j, p, (size_t)(m + 1 - p), RKLLM_RUN_WAITING);
            if (ret == 0 && j->generated < j->max_new)
                ret = emit(j, m + 1, (size_t)(q - m - 1), RKLLM_RUN_NORMAL);
        } else {
            ret = emit(j, p, (size_t)(q - p), RKLLM_RUN_NORMAL);
        }
        p = q;
        if (ret == 1) {
            j->paused = 1;
            return NULL;
        }
    }
    memset(&res, 0, sizeof res);
    res.perf.prefill_tokens = j->prefill_tokens;
    res.perf.prefill_time_ms = 0.5f * (float)j->prefill_tokens;
    res.perf.generate_tokens = j->generated;
    res.perf.generate_time_ms = 10.0f * (float)j->generated;
    res.perf.memory_usage_mb = 256.0f;
    j->finished = 1;
    f->cb(&res, j->userdata, RKLLM_RUN_FINISH);
    return NULL;
}

static void rec_floats(Rec *r, const float *e, size_t n) {
    if (!e || n == 0) {
        rec_s(r, "embed_first", NULL);
        rec_s(r, "embed_last", NULL);
        rec_s(r, "embed_sum", NULL);
        return;
    }
    double sum = 0;
    for (size_t i = 0; i < n; i++) sum += e[i];
    rec_f(r, "embed_first", e[0]);
    rec_f(r, "embed_last", e[n - 1]);
    rec_f(r, "embed_sum", sum);
}

static size_t slen(const char *s) { return s ? strlen(s) : 0; }

EXPORT int rkllm_run(LLMHandle h, RKLLMInput *in, RKLLMInferParam *ip, void *userdata) {
    Fake *f = h;
    enter(f, "rkllm_run");
    Job j;
    memset(&j, 0, sizeof j);
    j.f = f;
    j.caller = pthread_self();
    pthread_mutex_lock(&g_log_mu);
    j.run = ++g_runs;
    pthread_mutex_unlock(&g_log_mu);
    Rec r;
    rec_begin(&r, "rkllm_run");
    rec_s(&r, "role", in->role);
    rec_b(&r, "enable_thinking", in->enable_thinking);
    rec_i(&r, "input_type", in->input_type);
    rec_i(&r, "mode", ip->mode);
    rec_i(&r, "keep_history", ip->keep_history);
    rec_s(&r, "lora", ip->lora_params ? ip->lora_params->lora_adapter_name : NULL);
    rec_b(&r, "prompt_cache", ip->prompt_cache_params != NULL);
    if (ip->prompt_cache_params) {
        rec_i(&r, "save_prompt_cache", ip->prompt_cache_params->save_prompt_cache);
        rec_s(&r, "prompt_cache_path", ip->prompt_cache_params->prompt_cache_path);
    }
#ifdef RKLLM_ABI_130
    rec_b(&r, "sampling_params", ip->sampling_params != NULL);
    if (ip->sampling_params) { /* the values this run samples with */
        const RKLLMSamplingParam *sp = ip->sampling_params;
        rec_i(&r, "top_k", sp->top_k);
        rec_f(&r, "top_p", sp->top_p);
        rec_f(&r, "temperature", sp->temperature);
        rec_f(&r, "repeat_penalty", sp->repeat_penalty);
        rec_f(&r, "frequency_penalty", sp->frequency_penalty);
        rec_f(&r, "presence_penalty", sp->presence_penalty);
        rec_i(&r, "mirostat", sp->mirostat);
    }
    rec_i(&r, "infer_max_new_tokens", ip->max_new_tokens);
#endif
    rec_b(&r, "userdata", userdata != NULL);

    const char *prompt = NULL;
    const char *tag_start = NULL, *tag_end = NULL, *tag_content = NULL;
    size_t n_image_tokens = 0, n_image = 0;
    double img_sig = 0;
    if (in->input_type == RKLLM_INPUT_PROMPT) {
        prompt = in->prompt_input;
    } else if (in->input_type == RKLLM_INPUT_MULTIMODAL) {
        const RKLLMMultiModalInput *mm = &in->multimodal_input;
        prompt = mm->prompt;
#ifdef RKLLM_ABI_130
        n_image_tokens = mm->image.n_image_tokens;
        n_image = mm->image.n_image;
        tag_start = mm->image.image_start;
        tag_end = mm->image.image_end;
        tag_content = mm->image.image_content;
        rec_i(&r, "image_width", (long long)mm->image.image_width);
        rec_i(&r, "image_height", (long long)mm->image.image_height);
        rec_i(&r, "n_video", (long long)mm->video.n_video);
        rec_b(&r, "video_embed", mm->video.video_embed != NULL);
        const float *embed = mm->image.image_embed;
#else
        n_image_tokens = mm->n_image_tokens;
        n_image = mm->n_image;
        tag_start = f->tag_start;
        tag_end = f->tag_end;
        tag_content = f->tag_content;
        rec_i(&r, "image_width", (long long)mm->image_width);
        rec_i(&r, "image_height", (long long)mm->image_height);
        const float *embed = mm->image_embed;
#endif
        rec_i(&r, "n_image_tokens", (long long)n_image_tokens);
        rec_i(&r, "n_image", (long long)n_image);
        rec_s(&r, "image_start", tag_start);
        rec_s(&r, "image_end", tag_end);
        rec_s(&r, "image_content", tag_content);
        size_t dim = f->embed_dim > 0 ? (size_t)f->embed_dim : 1;
        rec_floats(&r, embed, n_image * n_image_tokens * dim);
        size_t n_floats = n_image * n_image_tokens * dim;
        if (embed && n_floats) img_sig = embed[0] + 2.0 * embed[n_floats - 1] + (double)n_floats;
    }
    rec_s(&r, "prompt", prompt);

    /* Context bookkeeping: one byte is one token, an image token is one token. */
    pthread_mutex_lock(&f->mu);
    f->abort_flag = 0;
    pthread_mutex_unlock(&f->mu);
    if (!ip->keep_history) f->kv = f->system_cached ? f->system_tokens : 0;
    int kv_before = f->kv;
    int system_new = f->system_cached ? 0 : f->system_tokens;
    int input = (int)(slen(f->prefix) + slen(prompt) + slen(f->postfix));
    int multimodal = in->input_type == RKLLM_INPUT_MULTIMODAL;
    if (multimodal && prompt && strstr(prompt, "<image>"))
        input += (int)(slen(tag_start) + slen(tag_end) + n_image * n_image_tokens) - 7;
    j.max_new = f->param.max_new_tokens;
#ifdef RKLLM_ABI_130
    if (ip->max_new_tokens > 0) j.max_new = ip->max_new_tokens;
#endif
    if (j.max_new < 0) j.max_new = 1 << 30;
    if (ip->mode == RKLLM_INFER_GET_LAST_HIDDEN_LAYER) j.max_new = 0; /* prefill only */
    j.prefill_tokens = system_new + input;
    int reused = 0;
    if (g_reuse && prompt && f->last_input && f->last_sig == img_sig) {
        size_t l = 0;
        while (prompt[l] && prompt[l] == f->last_input[l]) l++;
        reused = (int)(slen(f->prefix) + l);
        const char *img = strstr(prompt, "<image>");
        if (multimodal && img && (size_t)(img - prompt) + 7 <= l)
            reused += (int)(slen(tag_start) + slen(tag_end) + n_image * n_image_tokens) - 7;
        if (reused > input - 1) reused = input - 1;
        j.prefill_tokens -= reused;
    }
    rec_i(&r, "reused_tokens", reused);
    if (!prompt) {
        j.error = 1;
        snprintf(j.errmsg, sizeof j.errmsg, "fake: no prompt");
    } else if (in->input_type != RKLLM_INPUT_PROMPT && !multimodal) {
        j.error = 1;
        snprintf(j.errmsg, sizeof j.errmsg, "fake: input type %d not supported", in->input_type);
    } else if (multimodal && !strstr(prompt, "<image>")) {
        j.error = 1;
        snprintf(j.errmsg, sizeof j.errmsg, "fake: multimodal prompt without <image>");
    } else if (multimodal && (!tag_start || !tag_end || !tag_content)) {
        j.error = 1;
        snprintf(j.errmsg, sizeof j.errmsg, "fake: image tags not set");
    } else if (ip->lora_params && (!f->lora_name || !ip->lora_params->lora_adapter_name ||
                                   strcmp(f->lora_name, ip->lora_params->lora_adapter_name))) {
        j.error = 1;
        snprintf(j.errmsg, sizeof j.errmsg, "fake: lora adapter not loaded");
    } else if ((long)f->kv + system_new + input + (j.max_new < (1 << 30) ? j.max_new : 0) >
               f->param.max_context_len) {
        j.error = 1;
        snprintf(j.errmsg, sizeof j.errmsg,
                 "fake: %d tokens in context + %d input + %d new exceed max_context_len %d",
                 f->kv + system_new, input, j.max_new, f->param.max_context_len);
    }

    char *answer = NULL;
    if (!j.error) {
        size_t n = strlen(prompt) + 96;
        answer = malloc(n);
        snprintf(answer, n, "Echo: %s | image tokens: %zu | café", prompt, n_image * n_image_tokens);
        j.answer = answer;
    }
#ifdef RKLLM_ABI_130
    j.userdata = userdata ? userdata : f->cb_userdata;
#else
    j.userdata = userdata;
#endif
    pthread_t th;
    pthread_create(&th, NULL, generate, &j);
    pthread_join(th, NULL);

    if (!j.error) {
        free(f->last_input);
        f->last_input = dup_or_null(prompt);
        f->last_sig = img_sig;
        f->system_cached = 1;
        if (ip->keep_history) f->kv += system_new + input + j.generated;
        else f->kv = f->system_tokens;
        if (ip->prompt_cache_params && ip->prompt_cache_params->save_prompt_cache &&
            ip->prompt_cache_params->prompt_cache_path) {
            FILE *fp = fopen(ip->prompt_cache_params->prompt_cache_path, "wb");
            if (fp) {
                fputs(CACHE_MAGIC, fp);
                fputs(f->system, fp);
                fclose(fp);
            }
        }
    }
    rec_i(&r, "kv_before", kv_before);
    rec_i(&r, "kv_after", f->kv);
    rec_i(&r, "prefill_tokens", j.prefill_tokens);
    rec_i(&r, "generate_tokens", j.generated);
    rec_b(&r, "aborted", j.aborted);
    rec_b(&r, "paused", j.paused);
    rec_b(&r, "finished", j.finished);
    rec_s(&r, "error", j.error ? j.errmsg : NULL);
    rec_b(&r, "callback_on_other_thread", j.other_thread);
    rec_end(&r);
    free(answer);
    leave(f);
    return j.error ? -1 : 0;
}

EXPORT int rkllm_run_async(LLMHandle h, RKLLMInput *in, RKLLMInferParam *ip, void *userdata) {
    (void)h; (void)in; (void)ip; (void)userdata;
    log_event("rkllm_run_async", "not supported by the fake");
    return -1;
}

EXPORT int rkllm_abort(LLMHandle h) {
    Fake *f = h;
    pthread_mutex_lock(&f->mu);
    f->abort_flag = 1;
    pthread_cond_broadcast(&f->cv);
    pthread_mutex_unlock(&f->mu);
    log_event("rkllm_abort", "");
    return 0;
}

EXPORT int rkllm_is_running(LLMHandle h) {
    Fake *f = h;
    pthread_mutex_lock(&f->mu);
    int running = f->busy > 0;
    pthread_mutex_unlock(&f->mu);
#ifdef RKLLM_ABI_130
    return running;
#else
    return !running; /* 1.2.x documents 0 while a task runs */
#endif
}

EXPORT int rkllm_clear_kv_cache(LLMHandle h, int keep_system_prompt, int *start_pos, int *end_pos) {
    Fake *f = h;
    enter(f, "rkllm_clear_kv_cache");
    Rec r;
    rec_begin(&r, "rkllm_clear_kv_cache");
    rec_i(&r, "keep_system_prompt", keep_system_prompt);
    rec_b(&r, "start_pos", start_pos != NULL);
    rec_b(&r, "end_pos", end_pos != NULL);
    if (keep_system_prompt) {
        f->kv = f->system_cached ? f->system_tokens : 0;
    } else {
        f->kv = 0;
        f->system_cached = 0;
    }
    rec_i(&r, "kv_after", f->kv);
    rec_end(&r);
    leave(f);
    return 0;
}

#ifndef FAKE_RKLLM_OLD
EXPORT int rkllm_get_kv_cache_size(LLMHandle h, int *sizes) {
    Fake *f = h;
    enter(f, "rkllm_get_kv_cache_size");
    sizes[0] = f->kv;
    leave(f);
    return 0;
}

EXPORT int rkllm_set_function_tools(LLMHandle h, const char *system, const char *tools,
                                    const char *tool_response) {
    (void)h; (void)system; (void)tools; (void)tool_response;
    log_event("rkllm_set_function_tools", "");
    return 0;
}

EXPORT int rkllm_set_cross_attn_params(LLMHandle h, void *params) {
    (void)h; (void)params;
    log_event("rkllm_set_cross_attn_params", "");
    return 0;
}
#endif

EXPORT int rkllm_destroy(LLMHandle h) {
    Fake *f = h;
    if (!f) return -1;
    enter(f, "rkllm_destroy");
    log_event("rkllm_destroy", "");
    free(f->model_path);
    free(f->tag_start);
    free(f->tag_end);
    free(f->tag_content);
    free(f->system);
    free(f->prefix);
    free(f->postfix);
    free(f->lora_name);
    free(f->last_input);
    pthread_mutex_destroy(&f->mu);
    pthread_cond_destroy(&f->cv);
    free(f);
    return 0;
}
