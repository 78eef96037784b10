/* cublas_loader.c - finds libcublas at run time and resolves what we use.
 *
 * Why: the extension must build and import where cuBLAS is absent (CI, a
 * toolkit without cuBLAS) and must not pin one cuBLAS install. cuBLAS is
 * needed only when a CUDA backend is created; failing to find it then is an
 * RL_ERR_DEVICE whose message says what to install.
 *
 * Search order (first that dlopen()s wins):
 *   1. every directory in $RJEPA_CUBLAS_DIR (':'-separated), then the file
 *      itself if $RJEPA_CUBLAS_DIR names a file;
 *   2. the sonames libcublas.so.13, .so.12, .so (LD_LIBRARY_PATH, ld cache,
 *      or a copy already loaded into the process, e.g. by torch);
 *   3. pip's nvidia-cublas layout next to this extension and in the running
 *      interpreter's prefix (as started, i.e. a venv's, then the resolved
 *      binary's, then $VIRTUAL_ENV): <site-packages>/nvidia/cu13/lib,
 *      <site-packages>/nvidia/cublas/lib (cu12 wheels);
 *   4. $CUDA_HOME/lib64, /usr/local/cuda/lib64.
 * libcublas.so carries RPATH $ORIGIN, so its libcublasLt is found beside it.
 */
#if defined(RL_WITH_CUDA) && !defined(RL_CUDA_EMULATED) /* emulated: kernels/emu/emu_cublas.cpp */
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cuda_internal.h"

static const char *const k_sonames[] = {"libcublas.so.13", "libcublas.so.12", "libcublas.so"};

/* Tries `dir/name` for each soname; on success fills api->lib/path. */
static int try_dir(rl_cublas_api *api, const char *dir)
{
    for (size_t i = 0; i < sizeof k_sonames / sizeof k_sonames[0]; i++) {
        char path[1024];
        int n = snprintf(path, sizeof path, "%s/%s", dir, k_sonames[i]);
        if (n <= 0 || (size_t)n >= sizeof path || access(path, R_OK) != 0)
            continue;
        void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
        if (h) {
            api->lib = h;
            snprintf(api->path, sizeof api->path, "%s", path);
            return 1;
        }
    }
    return 0;
}

/* site-packages/nvidia/{cu13,cublas}/lib under one site-packages dir. */
static int try_site_packages(rl_cublas_api *api, const char *site)
{
    static const char *const subdirs[] = {"nvidia/cu13/lib", "nvidia/cublas/lib"};
    for (size_t i = 0; i < 2; i++) {
        char dir[900];
        int n = snprintf(dir, sizeof dir, "%s/%s", site, subdirs[i]);
        if (n > 0 && (size_t)n < sizeof dir && try_dir(api, dir))
            return 1;
    }
    return 0;
}

/* <prefix>/lib/python3.*\/site-packages for a Python installation prefix. */
static int try_python_prefix(rl_cublas_api *api, const char *prefix)
{
    char libdir[700];
    int n = snprintf(libdir, sizeof libdir, "%s/lib", prefix);
    if (n <= 0 || (size_t)n >= sizeof libdir)
        return 0;
    DIR *d = opendir(libdir);
    if (!d)
        return 0;
    int found = 0;
    struct dirent *e;
    while (!found && (e = readdir(d)) != NULL) {
        if (strncmp(e->d_name, "python3", 7) != 0)
            continue;
        static const char *const kinds[] = {"site-packages", "dist-packages"};
        for (size_t k = 0; k < 2 && !found; k++) {
            char site[850];
            n = snprintf(site, sizeof site, "%s/%s/%s", libdir, e->d_name, kinds[k]);
            if (n > 0 && (size_t)n < sizeof site)
                found = try_site_packages(api, site);
        }
    }
    closedir(d);
    return found;
}

/* Directory two levels above `path` (file -> its dir -> parent). */
static void parent_of_dir_of(const char *path, char *out, size_t cap)
{
    snprintf(out, cap, "%s", path);
    for (int up = 0; up < 2; up++) {
        char *slash = strrchr(out, '/');
        if (!slash) {
            out[0] = '\0';
            return;
        }
        *slash = '\0';
    }
}

/* The interpreter as it was started (argv[0], symlinks not resolved, so a
 * venv's bin/python3 -> its venv), looked up on PATH when it has no '/'. */
static int interpreter_path(char *out, size_t cap)
{
    char arg0[1024];
    FILE *f = fopen("/proc/self/cmdline", "rb");
    if (!f)
        return 0;
    size_t n = fread(arg0, 1, sizeof arg0 - 1, f);
    fclose(f);
    arg0[n] = '\0'; /* cmdline is NUL-separated: this is argv[0] */
    if (!arg0[0])
        return 0;
    if (strchr(arg0, '/')) {
        snprintf(out, cap, "%s", arg0);
        return 1;
    }
    const char *path = getenv("PATH");
    char buf[4096];
    snprintf(buf, sizeof buf, "%s", path ? path : "");
    for (char *save = NULL, *d = strtok_r(buf, ":", &save); d; d = strtok_r(NULL, ":", &save)) {
        int m = snprintf(out, cap, "%s/%s", d, arg0);
        if (m > 0 && (size_t)m < cap && access(out, X_OK) == 0)
            return 1;
    }
    return 0;
}

static int try_env_dirs(rl_cublas_api *api, const char *env)
{
    char buf[4096];
    snprintf(buf, sizeof buf, "%s", env);
    for (char *save = NULL, *tok = strtok_r(buf, ":", &save); tok; tok = strtok_r(NULL, ":", &save)) {
        if (try_dir(api, tok))
            return 1;
        void *h = dlopen(tok, RTLD_NOW | RTLD_LOCAL); /* a file named directly */
        if (h) {
            api->lib = h;
            snprintf(api->path, sizeof api->path, "%s", tok);
            return 1;
        }
    }
    return 0;
}

static int find_library(rl_cublas_api *api)
{
    const char *env = getenv("RJEPA_CUBLAS_DIR");
    if (env && *env && try_env_dirs(api, env))
        return 1;
    for (size_t i = 0; i < sizeof k_sonames / sizeof k_sonames[0]; i++) {
        void *h = dlopen(k_sonames[i], RTLD_NOW | RTLD_LOCAL);
        if (h) {
            api->lib = h;
            snprintf(api->path, sizeof api->path, "%s", k_sonames[i]);
            return 1;
        }
    }
    /* next to this extension: <site>/rjepa_latent/_core.so -> <site> */
    Dl_info info;
    char dir[1024];
    if (dladdr((void *)&rl_cublas_load, &info) && info.dli_fname) {
        parent_of_dir_of(info.dli_fname, dir, sizeof dir);
        if (dir[0] && try_site_packages(api, dir))
            return 1;
    }
    /* the interpreter's prefix: <prefix>/bin/python3 -> <prefix>, first as
     * started (a venv), then the resolved binary (a system install) */
    char exe[1024];
    if (interpreter_path(exe, sizeof exe)) {
        parent_of_dir_of(exe, dir, sizeof dir);
        if (dir[0] && try_python_prefix(api, dir))
            return 1;
    }
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n > 0) {
        exe[n] = '\0';
        parent_of_dir_of(exe, dir, sizeof dir);
        if (dir[0] && try_python_prefix(api, dir))
            return 1;
    }
    const char *venv = getenv("VIRTUAL_ENV");
    if (venv && *venv && try_python_prefix(api, venv))
        return 1;
    const char *cuda_home = getenv("CUDA_HOME");
    if (cuda_home && *cuda_home) {
        snprintf(dir, sizeof dir, "%s/lib64", cuda_home);
        if (try_dir(api, dir))
            return 1;
    }
    return try_dir(api, "/usr/local/cuda/lib64");
}

#define RL_RESOLVE(field, symbol)                                                           \
    do {                                                                                    \
        *(void **)(&api->field) = dlsym(api->lib, symbol);                                  \
        if (!api->field) {                                                                  \
            rl_status st_ = RL_FAIL(RL_ERR_DEVICE, "cuBLAS at %s lacks the symbol %s",       \
                                    api->path, symbol);                                     \
            rl_cublas_unload(api);                                                          \
            return st_;                                                                     \
        }                                                                                   \
    } while (0)

rl_status rl_cublas_load(rl_cublas_api *api)
{
    memset(api, 0, sizeof *api);
    if (!find_library(api))
        return RL_FAIL(RL_ERR_DEVICE,
                       "cuBLAS not found (tried $RJEPA_CUBLAS_DIR, libcublas.so.13/.12 on the "
                       "library path, site-packages/nvidia/cu13/lib and nvidia/cublas/lib, "
                       "$CUDA_HOME/lib64, /usr/local/cuda/lib64): run `pip install nvidia-cublas` "
                       "(CUDA 13) or set RJEPA_CUBLAS_DIR to the directory holding libcublas.so");
    RL_RESOLVE(create, "cublasCreate_v2");
    RL_RESOLVE(destroy, "cublasDestroy_v2");
    RL_RESOLVE(set_stream, "cublasSetStream_v2");
    RL_RESOLVE(set_workspace, "cublasSetWorkspace_v2");
    RL_RESOLVE(set_math_mode, "cublasSetMathMode");
    RL_RESOLVE(gemm_ex, "cublasGemmEx");
    RL_RESOLVE(get_version, "cublasGetVersion_v2");
    *(void **)(&api->status_string) = dlsym(api->lib, "cublasGetStatusString");
    return RL_OK;
}

void rl_cublas_unload(rl_cublas_api *api)
{
    /* The library stays mapped on purpose: cuBLAS registers process-level
     * state (atexit handlers), and unloading it under a live CUDA context is
     * a known source of crashes at exit. We only drop our handle. */
    api->lib = NULL;
}

#else  /* !RL_WITH_CUDA or emulated */
typedef int rl_cublas_loader_unused_; /* ISO C forbids an empty translation unit */
#endif /* RL_WITH_CUDA */
