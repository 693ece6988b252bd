/* Running a C helper's parts on threads of their own. */
#ifndef HAM_PARTS_H
#define HAM_PARTS_H
#include <pthread.h>
#include <stddef.h>

#define HAM_MAX_PARTS 64

/* Runs part(parts + i * size) for i in [0, n), n <= HAM_MAX_PARTS: part 0 on this thread, the
 * others on threads of their own; a part whose thread could not start runs here afterwards. */
static inline void ham_run_parts(void *(*part)(void *), void *parts, size_t size, int n) {
  pthread_t threads[HAM_MAX_PARTS];
  int started[HAM_MAX_PARTS] = {0};
  char *at = parts;
  for (int i = 1; i < n; i++)
    started[i] = pthread_create(&threads[i], NULL, part, at + i * size) == 0;
  part(at);
  for (int i = 1; i < n; i++) {
    if (started[i])
      pthread_join(threads[i], NULL);
    else
      part(at + i * size);
  }
}

struct ham_share {
  void (*run)(const void *job, long lo, long hi);
  const void *job;
  long lo, hi;
};

static inline void *ham_run_share(void *arg) {
  const struct ham_share *S = arg;
  S->run(S->job, S->lo, S->hi);
  return NULL;
}

/* Runs run(job, lo, hi) over `parts` equal shares [lo, hi) of the items [0, total), each share
 * on a thread of its own (ham_run_parts); parts is held to [1, min(total, HAM_MAX_PARTS)]. */
static inline void ham_run_shares(void (*run)(const void *, long, long), const void *job,
                                  long total, int parts) {
  if (parts > HAM_MAX_PARTS) parts = HAM_MAX_PARTS;
  if ((long)parts > total) parts = (int)total;
  if (parts < 1) parts = 1;
  struct ham_share shares[HAM_MAX_PARTS];
  for (int i = 0; i < parts; i++)
    shares[i] = (struct ham_share){run, job, total * i / parts, total * (i + 1) / parts};
  ham_run_parts(ham_run_share, shares, sizeof shares[0], parts);
}

#endif
