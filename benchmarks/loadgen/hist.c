#include "hist.h"

#include <string.h>

void hist_init(hist_t *h) { memset(h, 0, sizeof(*h)); }

static unsigned bucket_of(uint64_t v) {
  if (v < HIST_SUB) return (unsigned)v;
  unsigned e = 63u - (unsigned)__builtin_clzll(v); /* floor(log2 v) >= 7 */
  if (e > HIST_MAX_EXP) return HIST_BUCKETS - 1;
  unsigned mant = (unsigned)(v >> (e - HIST_SUB_BITS)) - HIST_SUB; /* 0..127 */
  return HIST_SUB + (e - HIST_SUB_BITS) * HIST_SUB + mant;
}

/* Midpoint of a bucket's value range. */
static uint64_t bucket_value(unsigned b) {
  if (b < HIST_SUB) return b;
  unsigned e = (b - HIST_SUB) / HIST_SUB + HIST_SUB_BITS;
  uint64_t mant = (b - HIST_SUB) % HIST_SUB + HIST_SUB;
  uint64_t lo = mant << (e - HIST_SUB_BITS);
  uint64_t width = 1ull << (e - HIST_SUB_BITS);
  return lo + width / 2;
}

void hist_add(hist_t *h, uint64_t v) {
  h->counts[bucket_of(v)]++;
  h->n++;
  h->sum += (double)v;
  if (v > h->max) h->max = v;
}

void hist_merge(hist_t *into, const hist_t *from) {
  for (unsigned i = 0; i < HIST_BUCKETS; i++) into->counts[i] += from->counts[i];
  into->n += from->n;
  into->sum += from->sum;
  if (from->max > into->max) into->max = from->max;
}

uint64_t hist_quantile(const hist_t *h, double q) {
  if (h->n == 0) return 0;
  /* rank of the sample we want, 1-based: ceil(q * n), at least 1 */
  double r = q * (double)h->n;
  uint64_t rank = (uint64_t)r;
  if ((double)rank < r) rank++;
  if (rank < 1) rank = 1;
  if (rank > h->n) rank = h->n;
  uint64_t seen = 0;
  for (unsigned i = 0; i < HIST_BUCKETS; i++) {
    seen += h->counts[i];
    if (seen >= rank) {
      uint64_t v = bucket_value(i);
      return v > h->max ? h->max : v;
    }
  }
  return h->max;
}
