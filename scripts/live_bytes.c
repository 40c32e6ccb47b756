// Peak live bytes of a process's heap allocations of 1 MiB or more (malloc, calloc, realloc,
// posix_memalign, aligned_alloc), for measuring what a training step keeps: LibTorch's CPU
// tensors come from posix_memalign, so on the CPU this counts the same tensors CUDA's allocator
// would hold on a GPU (memory-mapped weights are not allocations and are not counted). Prints the
// peak and the sizes alive at that moment to stderr at exit (BENCHMARKS.md, nineteenth session).
//
//   gcc -O2 -shared -fPIC -o live_bytes.so scripts/live_bytes.c -ldl -lpthread
//   LD_PRELOAD=$PWD/live_bytes.so ember bench ...
#define _GNU_SOURCE
#include <dlfcn.h>
#include <malloc.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#define MIN_TRACK (1 << 20)
#define SLOTS (1 << 16)
static void *keys[SLOTS]; static size_t sizes[SLOTS];
static size_t live, peak, peak_sizes[SLOTS]; static int have_peak;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static void *(*real_malloc)(size_t); static void (*real_free)(void *); static void *(*real_calloc)(size_t, size_t);
static void *(*real_realloc)(void *, size_t); static int (*real_memalign)(void **, size_t, size_t); static void *(*real_aligned)(size_t, size_t);
static __thread int busy;
static void init(void) {
  if (real_malloc) return;
  real_malloc = dlsym(RTLD_NEXT, "malloc"); real_free = dlsym(RTLD_NEXT, "free"); real_calloc = dlsym(RTLD_NEXT, "calloc");
  real_realloc = dlsym(RTLD_NEXT, "realloc"); real_memalign = dlsym(RTLD_NEXT, "posix_memalign"); real_aligned = dlsym(RTLD_NEXT, "aligned_alloc");
}
static size_t slot(void *p) { return ((uintptr_t)p >> 6) * 2654435761u % SLOTS; }
static void add(void *p, size_t n) {
  if (!p || n < MIN_TRACK) return;
  pthread_mutex_lock(&lock);
  size_t i = slot(p); while (keys[i]) i = (i + 1) % SLOTS;
  keys[i] = p; sizes[i] = n; live += n;
  if (live > peak) { peak = live; memcpy(peak_sizes, sizes, sizeof sizes); for (size_t j = 0; j < SLOTS; j++) if (!keys[j]) peak_sizes[j] = 0; }
  pthread_mutex_unlock(&lock);
}
static void del(void *p) {
  if (!p) return;
  pthread_mutex_lock(&lock);
  size_t i = slot(p);
  while (keys[i]) { if (keys[i] == p) { live -= sizes[i]; keys[i] = 0; sizes[i] = 0;
      // re-insert the cluster after i
      size_t j = (i + 1) % SLOTS; while (keys[j]) { void *k = keys[j]; size_t s = sizes[j]; keys[j] = 0; sizes[j] = 0; size_t t = slot(k); while (keys[t]) t = (t + 1) % SLOTS; keys[t] = k; sizes[t] = s; j = (j + 1) % SLOTS; }
      break; } i = (i + 1) % SLOTS; }
  pthread_mutex_unlock(&lock);
}
void *malloc(size_t n) { init(); void *p = real_malloc(n); add(p, n); return p; }
static char buf[4096]; static size_t used;
void *calloc(size_t a, size_t b) { if (!real_calloc) { void *p = buf + used; used += (a*b + 15) & ~15; return p; } void *p = real_calloc(a, b); add(p, a * b); return p; }
void free(void *p) { if ((char *)p >= buf && (char *)p < buf + sizeof buf) return; init(); del(p); real_free(p); }
void *realloc(void *p, size_t n) { init(); del(p); void *q = real_realloc(p, n); add(q, n); return q; }
int posix_memalign(void **out, size_t al, size_t n) { init(); int r = real_memalign(out, al, n); if (!r) add(*out, n); return r; }
void *aligned_alloc(size_t al, size_t n) { init(); void *p = real_aligned(al, n); add(p, n); return p; }
__attribute__((destructor)) static void report(void) {
  // histogram of sizes (MiB rounded to 0.5) at the peak
  size_t uniq[4096]; size_t cnt[4096]; int u = 0;
  for (size_t j = 0; j < SLOTS; j++) if (peak_sizes[j]) { size_t s = peak_sizes[j]; int k; for (k = 0; k < u; k++) if (uniq[k] == s) break; if (k == u && u < 4096) { uniq[u] = s; cnt[u] = 0; u++; } if (k < 4096) cnt[k]++; }
  fprintf(stderr, "LIVE_BYTES peak_live_mib=%.1f\n", peak / 1048576.0);
  for (int k = 0; k < u; k++) fprintf(stderr, "LIVE_BYTES size_mib=%.3f count=%zu total_mib=%.1f\n", uniq[k] / 1048576.0, cnt[k], uniq[k] * cnt[k] / 1048576.0);
}
