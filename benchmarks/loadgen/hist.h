/* Log-linear latency histogram (nanoseconds).
 *
 * Values below HIST_SUB are counted exactly; larger values fall in buckets
 * that keep the top 8 significant bits, i.e. a relative error below 1/128
 * (< 0.8 %).  The exact maximum is tracked separately.
 */
#ifndef LOADGEN_HIST_H
#define LOADGEN_HIST_H

#include <stdint.h>

#define HIST_SUB_BITS 7
#define HIST_SUB (1u << HIST_SUB_BITS)
#define HIST_MAX_EXP 48 /* values up to 2^48 ns (~3 days) */
#define HIST_BUCKETS (HIST_SUB + (HIST_MAX_EXP - HIST_SUB_BITS + 1) * HIST_SUB)

typedef struct {
  uint64_t counts[HIST_BUCKETS];
  uint64_t n;
  uint64_t max;
  double sum;
} hist_t;

void hist_init(hist_t *h);
void hist_add(hist_t *h, uint64_t v);
void hist_merge(hist_t *into, const hist_t *from);
/* Value (ns) below which a fraction q (0..1) of the samples fall. */
uint64_t hist_quantile(const hist_t *h, double q);

#endif
