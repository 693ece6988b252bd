/* Running a C helper's parts on threads of their own. */
#ifndef HAM_PARTS_H
#define HAM_PARTS_H
#include <pthread.h>
#include <stddef.h>

#define HAM_MAX_PARTS 64

/* Runs part(parts + i * size) for i in [0, n), n <= HAM_MAX_PARTS: part 0 on this thread, the
 * others on threads of their own; a part whose thread could not start runs here afterwards. */
static void ham_run_parts(void *(*part)(void *), void *parts, size_t size, int n) {
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

/* Part `index` of `parts` equal shares of `total` items: the items [*lo, *hi). */
static inline void ham_part_range(long total, int index, int parts, long *lo, long *hi) {
  *lo = total * index / parts;
  *hi = total * (index + 1) / parts;
}

#endif
